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
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let unified;
        let text = if text.contains('\r') {
            unified = text.replace("\r\n", "\n").replace('\r', "\n");
            unified.as_str()
        } else {
            text
        };
        let mut out = String::with_capacity(text.len());
        let mut blank_run = 0usize;
        let mut pending_blank = 0usize;
        for line in text.split('\n') {
            let mut line = line.trim_end_matches([' ', '\t', '\u{b}', '\u{c}']);
            if self.config.strip_indentation {
                line = line.trim_start_matches([' ', '\t']);
            }
            if line.is_empty() {
                blank_run += 1;
                if blank_run <= self.config.max_blank_lines {
                    pending_blank += 1;
                }
                continue;
            }
            // Blank lines are emitted only once a non-blank line follows them, so
            // trailing blank lines vanish and leading ones follow the same limit.
            for _ in 0..pending_blank {
                out.push('\n');
            }
            pending_blank = 0;
            blank_run = 0;
            out.push_str(line);
            out.push('\n');
        }
        out
    }
}

impl Step for Normalize {
    fn name(&self) -> &'static str {
        "normalize"
    }

    fn apply(&self, doc: &mut Document, counters: &mut Counters) -> Verdict {
        let normalized = self.normalize(&doc.text);
        if normalized.len() != doc.text.len() || normalized != doc.text {
            counters.bump("changed", 1);
        }
        doc.text = normalized;
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
