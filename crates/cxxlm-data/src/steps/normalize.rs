use serde_json::json;

use super::{Counters, Step, Verdict};
use crate::config::NormalizeConfig;
use crate::document::Document;

/// LF line ends, no BOM, no trailing whitespace, optionally no indentation, runs of
/// blank lines cut to `max_blank_lines`, exactly one newline at the end. What was done
/// is recorded in `meta.normalized` so the original layout is known to be gone.
///
/// Indentation stripping also reindents multi-line raw string literals; C++ meaning is
/// otherwise unchanged.
pub struct Normalize {
    config: NormalizeConfig,
}

impl Normalize {
    pub fn new(config: NormalizeConfig) -> Self {
        Normalize { config }
    }

    pub fn normalize(&self, text: &str) -> String {
        let mut out = text.to_string();
        self.normalize_in_place(&mut out);
        out
    }

    /// [`Normalize::normalize`] over `text` itself: every change removes bytes or turns
    /// `\r` into `\n`, so the result is written over the input as it is read, and a
    /// document of hundreds of MB is never held twice. Returns whether it changed.
    pub fn normalize_in_place(&self, text: &mut String) -> bool {
        let mut buf = std::mem::take(text).into_bytes();
        let len = buf.len();
        let mut r = if buf.starts_with("\u{feff}".as_bytes()) {
            3
        } else {
            0
        };
        let mut changed = r > 0;
        let mut w = 0;
        let (mut blank_run, mut pending_blank) = (0usize, 0usize);
        // Bytes are written at `w`, never past what has been read, except for the one
        // line break a last line without one gets.
        let mut put = |buf: &mut Vec<u8>, w: &mut usize, byte: u8| {
            match buf.get_mut(*w) {
                Some(b) if *b == byte => {}
                Some(b) => {
                    *b = byte;
                    changed = true;
                }
                None => {
                    buf.push(byte);
                    changed = true;
                }
            }
            *w += 1;
        };
        let mut moved = false;
        loop {
            let end = r + memchr::memchr2(b'\n', b'\r', &buf[r..]).unwrap_or(len - r);
            let next = match buf.get(end) {
                None => len,
                Some(b'\r') if buf.get(end + 1) == Some(&b'\n') => end + 2,
                Some(_) => end + 1,
            };
            let mut stop = end;
            while stop > r && matches!(buf[stop - 1], b' ' | b'\t' | 0x0b | 0x0c) {
                stop -= 1;
            }
            let mut start = r;
            if self.config.strip_indentation {
                while start < stop && matches!(buf[start], b' ' | b'\t') {
                    start += 1;
                }
            }
            if start == stop {
                blank_run += 1;
                if blank_run <= self.config.max_blank_lines {
                    pending_blank += 1;
                }
            } else {
                // Blank lines are emitted only once a non-blank line follows them, so
                // trailing blank lines vanish and leading ones follow the same limit.
                for _ in 0..pending_blank {
                    put(&mut buf, &mut w, b'\n');
                }
                pending_blank = 0;
                blank_run = 0;
                if w != start {
                    buf.copy_within(start..stop, w);
                    moved = true;
                }
                w += stop - start;
                put(&mut buf, &mut w, b'\n');
            }
            if end == len {
                break;
            }
            r = next;
        }
        changed |= moved || w != len;
        buf.truncate(w);
        // Only ASCII bytes were removed or replaced: still UTF-8.
        *text = String::from_utf8(buf)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
        changed
    }
}

impl Step for Normalize {
    fn name(&self) -> &'static str {
        "normalize"
    }

    fn apply(&self, doc: &mut Document, counters: &mut Counters) -> Verdict {
        if self.normalize_in_place(&mut doc.text) {
            counters.bump("changed", 1);
        }
        doc.meta.insert(
            "normalized".into(),
            json!({ "indent_stripped": self.config.strip_indentation }),
        );
        if doc.text.is_empty() {
            return Verdict::Drop("empty_after_normalize");
        }
        Verdict::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(strip: bool, text: &str) -> String {
        Normalize::new(NormalizeConfig {
            enabled: true,
            strip_indentation: strip,
            max_blank_lines: 2,
        })
        .normalize(text)
    }

    #[test]
    fn line_ends_bom_trailing_space_and_blank_runs() {
        let raw = "\u{feff}int a;  \r\nint b;\t\r\r\n\n\n\n\n  int c;\n\n\n";
        assert_eq!(norm(false, raw), "int a;\nint b;\n\n\n  int c;\n");
    }

    /// The normalization written plainly, copying, to check the in-place one against.
    fn copying(strip: bool, max_blank_lines: usize, text: &str) -> String {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let text = text.replace("\r\n", "\n").replace('\r', "\n");
        let (mut out, mut blank_run, mut pending) = (String::new(), 0, 0);
        for line in text.split('\n') {
            let mut line = line.trim_end_matches([' ', '\t', '\u{b}', '\u{c}']);
            if strip {
                line = line.trim_start_matches([' ', '\t']);
            }
            if line.is_empty() {
                blank_run += 1;
                pending += usize::from(blank_run <= max_blank_lines);
                continue;
            }
            out.push_str(&"\n".repeat(pending));
            (pending, blank_run) = (0, 0);
            out.push_str(line);
            out.push('\n');
        }
        out
    }

    #[test]
    fn in_place_matches_copying_on_every_layout() {
        let pieces = [
            "a", "int x;", " ", "\t", "\r", "\n", "\r\n", "\u{b}", "\u{c}", "é", "\u{feff}",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for case in 0..5000 {
            let mut text = String::new();
            for _ in 0..case % 24 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                text.push_str(pieces[(seed % pieces.len() as u64) as usize]);
            }
            for (strip, max_blank_lines) in [(false, 2), (true, 0), (false, 1)] {
                let step = Normalize::new(NormalizeConfig {
                    enabled: true,
                    strip_indentation: strip,
                    max_blank_lines,
                });
                let mut in_place = text.clone();
                let changed = step.normalize_in_place(&mut in_place);
                let expected = copying(strip, max_blank_lines, &text);
                assert_eq!(in_place, expected, "{text:?}");
                assert_eq!(changed, expected != text, "{text:?}");
            }
        }
    }

    #[test]
    fn indentation_stripping_is_optional() {
        let raw = "void f() {\n    return;\n\t}\n";
        assert_eq!(norm(true, raw), "void f() {\nreturn;\n}\n");
        assert_eq!(norm(false, raw), raw);
    }

    #[test]
    fn whitespace_only_file_is_dropped_and_meta_recorded() {
        let step = Normalize::new(NormalizeConfig::default());
        let mut d = super::super::doc("   \n\t\n");
        assert_eq!(
            step.apply(&mut d, &mut Counters::default()),
            Verdict::Drop("empty_after_normalize")
        );
        let mut d = super::super::doc("int x;");
        assert_eq!(step.apply(&mut d, &mut Counters::default()), Verdict::Keep);
        assert_eq!(d.text, "int x;\n");
        assert_eq!(d.meta["normalized"]["indent_stripped"], true);
    }
}
