//! How text is laid out for a model: as the data stage laid out its training text (LF
//! line ends, no trailing whitespace, and by default no indentation). Everything a model
//! reads (prompts, chat turns, fine-tuning examples) goes through [`normalize`] first, so
//! that it sees what it was trained on.

/// A model's text layout, as its training text had it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The training text had its indentation stripped.
    pub strip_indentation: bool,
}

pub fn trim_trailing(line: &str) -> &str {
    line.trim_end_matches([' ', '\t', '\u{b}', '\u{c}'])
}

fn trim_indentation(line: &str) -> &str {
    line.trim_start_matches([' ', '\t'])
}

/// Whole lines normalized: LF, no trailing whitespace, no indentation when stripped.
pub fn normalize(text: &str, layout: Layout) -> String {
    normalize_pieces(&[text], layout).remove(0)
}

/// Consecutive pieces of one text (a fill-in-the-middle example's prefix, middle and
/// suffix) normalized as the whole text would be, and cut where the pieces met: a line
/// that runs across a cut keeps its inner spaces, and loses its indentation and trailing
/// whitespace only at its ends.
pub fn normalize_pieces(pieces: &[&str], layout: Layout) -> Vec<String> {
    let text = pieces.concat();
    let mut ends = Vec::with_capacity(pieces.len());
    for p in pieces {
        ends.push(ends.last().copied().unwrap_or(0) + p.len());
    }
    let mut out = vec![String::new(); pieces.len()];
    // Appends text[from..to] to the pieces that held it.
    let emit = |from: usize, to: usize, out: &mut Vec<String>| {
        let mut at = from;
        for (i, &end) in ends.iter().enumerate() {
            if at < to && at < end {
                let upto = end.min(to);
                out[i].push_str(&text[at..upto]);
                at = upto;
            }
        }
    };
    let mut start = 0;
    while start <= text.len() {
        let rest = &text[start..];
        let (line_len, break_len) = match rest.find(['\r', '\n']) {
            Some(i) if rest[i..].starts_with("\r\n") => (i, 2),
            Some(i) => (i, 1),
            None => (rest.len(), 0),
        };
        let line = trim_trailing(&rest[..line_len]);
        let kept = match layout.strip_indentation {
            true => trim_indentation(line),
            false => line,
        };
        let from = start + (line.len() - kept.len());
        emit(from, from + kept.len(), &mut out);
        if break_len == 0 {
            break;
        }
        // The line break, as LF, goes to the piece that held its first byte.
        let at = start + line_len;
        let piece = ends
            .iter()
            .position(|&e| at < e)
            .unwrap_or(pieces.len() - 1);
        out[piece].push('\n');
        start = at + break_len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRIP: Layout = Layout {
        strip_indentation: true,
    };
    const KEEP: Layout = Layout {
        strip_indentation: false,
    };

    #[test]
    fn lines_lose_trailing_whitespace_and_their_indentation_when_stripped() {
        let text = "int f() {\r\n    return 1;  \r\n\t}\n  \n";
        assert_eq!(normalize(text, STRIP), "int f() {\nreturn 1;\n}\n\n");
        assert_eq!(normalize(text, KEEP), "int f() {\n    return 1;\n\t}\n\n");
        assert_eq!(normalize("a\rb", KEEP), "a\nb");
        assert_eq!(normalize("", STRIP), "");
    }

    #[test]
    fn pieces_are_cut_where_they_met_in_the_normalized_whole() {
        let pieces = [
            "int f() {\n    int x = ",
            "y  +\n    1;",
            "  \n    return x;\r",
            "\n}",
        ];
        for layout in [STRIP, KEEP] {
            let cut = normalize_pieces(&pieces, layout);
            assert_eq!(cut.concat(), normalize(&pieces.concat(), layout));
        }
        let cut = normalize_pieces(&pieces, STRIP);
        assert_eq!(
            cut,
            ["int f() {\nint x = ", "y  +\n1;", "\nreturn x;\n", "}"]
        );
        // A piece that starts inside a line's indentation loses it.
        let cut = normalize_pieces(&["a\n  ", "  b"], STRIP);
        assert_eq!(cut, ["a\n", "b"]);
    }
}
