//! The C++ tokenizer: a pre-tokenizer that knows C++ lexemes and layout, a byte-level
//! BPE trainer, an encoder, the HF `tokenizer.json` format (so `tokenizers` and
//! `transformers` load what we train), the chat template ([`chat`]), and the layout of
//! the text a model reads ([`layout`]).

mod bpe;
mod byte_level;
pub mod chat;
mod hf;
pub mod layout;
mod train;

pub use bpe::{Bpe, Healing, PieceCache};
pub use hf::{from_hf_json, load, to_hf_json};
pub use train::Trainer;

/// First-stage pieces: identifiers (with the space before them), numbers of up to three
/// digits, punctuation runs together with a line break and the indentation after it
/// (`;\n    ` is one piece: C++ layout is regular), then line breaks and spaces.
/// Written without look-around so that Rust's `regex`, Oniguruma (Python `tokenizers`)
/// and `fancy-regex` split identically; every character is matched by some branch.
pub const PIECE_PATTERN: &str = r" ?[\p{L}_][\p{L}\p{N}_]*|\p{N}{1,3}| ?[^\s\p{L}\p{N}_]+(?:[\r\n]+[ \t]*)?|[\r\n]+[ \t]*|[ \t]+|\s+";

/// First-stage pieces with a line's indentation apart from the punctuation and line break
/// before it (`;\n`, then `    `), as GPT-4's pattern splits them (`tok train
/// --indentation-apart`): the variant that tells whether joining them costs the model.
pub const INDENTATION_APART_PATTERN: &str =
    r" ?[\p{L}_][\p{L}\p{N}_]*|\p{N}{1,3}| ?[^\s\p{L}\p{N}_]+[\r\n]*|[\r\n]+|[ \t]+|\s+";

/// Second-stage pieces, and the encoding pattern of a tokenizer trained with a second
/// stage: whole lines with their line break. Merges learned in the second stage cross
/// the first stage's boundaries (superwords such as ` = 0;\n` or `std::string&`), as
/// SuperBPE does; first-stage merges rank first. Off by default: a d12 trained with them
/// wrote C++ that compiled half as often (`BENCHMARKS.md`).
pub const PATTERN: &str = r"[^\n]*\n|[^\n]+";

/// With a second stage, the share of learned tokens that come from the first stage.
pub const FIRST_STAGE_SHARE: f64 = 0.8;

/// The special tokens of the design, at fixed ids at the top of the vocabulary, followed
/// by reserved ones up to [`RESERVED_SPECIALS`].
pub const SPECIALS: [&str; 12] = [
    "<|bos|>",
    "<|eos|>",
    "<|pad|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|thought_start|>",
    "<|thought_end|>",
    "<|query_tool|>",
    "<|tool_result|>",
    "<|file_sep|>",
    "<|repo_name|>",
];
pub const RESERVED_SPECIALS: usize = 64;
pub const DEFAULT_VOCAB: usize = 32_768;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{0}")]
    Format(String),
    #[error("vocabulary of {0} is too small: it needs 256 byte tokens and {RESERVED_SPECIALS} special ids")]
    VocabTooSmall(usize),
}

/// The special tokens' strings, reserved ones included, in id order.
pub fn special_tokens() -> Vec<String> {
    (0..RESERVED_SPECIALS)
        .map(|i| match SPECIALS.get(i) {
            Some(s) => s.to_string(),
            None => format!("<|reserved_{i}|>"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trained_with(second_stage_bytes: usize) -> (Bpe, Vec<String>) {
        let texts: Vec<String> = (0..50)
            .map(|i| format!("int value_{i} = compute({i});\nreturn value_{i};\n}}\n"))
            .collect();
        let mut t = Trainer::new(512)
            .unwrap()
            .with_second_stage_bytes(second_stage_bytes);
        t.feed(&texts);
        (t.train().unwrap(), texts)
    }

    fn trained() -> (Bpe, Vec<String>) {
        trained_with(0)
    }

    /// Real C++: the libstdc++ headers of the machine's g++.
    fn libstdcxx_headers(max_bytes: usize) -> Vec<String> {
        let mut dirs: Vec<_> = std::fs::read_dir("/usr/include/c++")
            .expect("libstdc++ headers under /usr/include/c++ (g++ installed)")
            .flatten()
            .map(|e| e.path().join("bits"))
            .filter(|d| d.is_dir())
            .collect();
        dirs.sort();
        let dir = dirs.last().expect("a /usr/include/c++/N/bits directory");
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        files.sort();
        let mut texts = Vec::new();
        let mut total = 0;
        for f in files {
            if let Ok(text) = std::fs::read_to_string(&f) {
                total += text.len();
                texts.push(text);
                if total >= max_bytes {
                    break;
                }
            }
        }
        texts
    }

    /// Byte ranges of the pieces `pattern` cuts `text` into.
    fn piece_ends(text: &str, pattern: &str) -> std::collections::BTreeSet<usize> {
        let re = regex::Regex::new(pattern).unwrap();
        re.find_iter(text).map(|m| m.end()).collect()
    }

    #[test]
    fn one_stage_by_default_fills_the_vocabulary_and_keeps_to_pieces() {
        let texts = libstdcxx_headers(400_000);
        let mut t = Trainer::new(2048).unwrap();
        t.feed(&texts);
        let bpe = t.train().unwrap();
        // Every id below the specials is a learned token: none left reserved and unused.
        assert_eq!(bpe.tokens().len(), 2048 - RESERVED_SPECIALS);
        assert_eq!(bpe.merges().len(), 2048 - RESERVED_SPECIALS - 256);
        assert_eq!(bpe.pattern(), PIECE_PATTERN);
        // No token holds a line break followed by more code (a break may carry the
        // indentation after it, as the piece `;\n    ` does).
        for t in bpe.tokens() {
            if let Some(nl) = t.iter().position(|&b| b == b'\n') {
                assert!(
                    t[nl..].iter().all(u8::is_ascii_whitespace),
                    "token {:?} crosses a line",
                    String::from_utf8_lossy(t)
                );
            }
        }
        assert_keeps_to_pieces_and_reloads(&bpe, &texts, PIECE_PATTERN);
    }

    /// No token of an encoded text crosses a piece boundary of `pattern`, and the HF JSON
    /// reloads with the same pattern and encoding.
    fn assert_keeps_to_pieces_and_reloads(bpe: &Bpe, texts: &[String], pattern: &str) {
        for text in texts.iter().take(5) {
            let ends = piece_ends(text, pattern);
            let mut at = 0;
            for id in bpe.encode(text) {
                let next = at + bpe.decode(&[id]).len();
                assert!(
                    ends.range(at + 1..next).next().is_none(),
                    "token {:?} crosses a piece boundary",
                    String::from_utf8_lossy(&bpe.decode(&[id]))
                );
                at = next;
            }
            assert_eq!(at, text.len());
        }
        let back = from_hf_json(&to_hf_json(bpe).to_string()).unwrap();
        assert_eq!(back.pattern(), pattern);
        assert_eq!(back.encode(&texts[0]), bpe.encode(&texts[0]));
    }

    #[test]
    fn indentation_apart_leaves_no_line_break_before_indentation_in_a_token() {
        let texts = libstdcxx_headers(400_000);
        let train = |apart| {
            let mut t = Trainer::new(2048).unwrap().with_indentation_apart(apart);
            t.feed(&texts);
            t.train().unwrap()
        };
        let breaks_into_indentation = |bpe: &Bpe| {
            bpe.tokens().iter().any(|t| {
                t.windows(2)
                    .any(|w| w[0] == b'\n' && matches!(w[1], b' ' | b'\t'))
            })
        };
        assert!(breaks_into_indentation(&train(false)));
        let apart = train(true);
        assert_eq!(apart.pattern(), INDENTATION_APART_PATTERN);
        assert!(!breaks_into_indentation(&apart));
        assert!(apart.tokens().iter().any(|t| t.as_slice() == b";\n"));
        assert_keeps_to_pieces_and_reloads(&apart, &texts, INDENTATION_APART_PATTERN);
    }

    #[test]
    fn round_trip_compression_and_json_reload() {
        let (bpe, texts) = trained();
        for x in &texts {
            assert_eq!(bpe.decode(&bpe.encode(x)), x.as_bytes());
        }
        assert!(bpe.encode(&texts[0]).len() * 3 < texts[0].len());
        let odd = "naïve — 😀\t\r\n\u{0}";
        assert_eq!(bpe.decode(&bpe.encode(odd)), odd.as_bytes());
        let back = from_hf_json(&to_hf_json(&bpe).to_string()).unwrap();
        assert_eq!(back.encode(&texts[3]), bpe.encode(&texts[3]));
        assert_eq!(back.merges(), bpe.merges());
    }

    #[test]
    fn specials_are_vocabulary_entries_and_older_files_still_load() {
        let (bpe, texts) = trained();
        let base = bpe.special_base() as usize;
        let mut json = to_hf_json(&bpe);
        assert_eq!(json["added_tokens"], serde_json::json!([]));
        assert_eq!(json["model"]["vocab"]["<|bos|>"], base);
        assert_eq!(json["model"]["vocab"]["<|reserved_63|>"], base + 63);
        // Files written before listed the special tokens as added tokens only.
        let vocab = json["model"]["vocab"].as_object_mut().unwrap();
        let specials = special_tokens();
        for s in &specials {
            vocab.remove(s);
        }
        json["added_tokens"] = specials
            .iter()
            .enumerate()
            .map(|(i, s)| serde_json::json!({"id": base + i, "content": s, "special": true}))
            .collect();
        let older = from_hf_json(&json.to_string()).unwrap();
        assert_eq!(older.encode(&texts[1]), bpe.encode(&texts[1]));
        assert_eq!(older.special_id("<|eos|>"), Some(base as u32 + 1));
        json["added_tokens"][3]["content"] = "<|oops|>".into();
        assert!(from_hf_json(&json.to_string()).is_err());
    }

    #[test]
    fn specials_have_fixed_ids_and_never_come_from_text() {
        let mut t = Trainer::new(512).unwrap();
        t.feed(&libstdcxx_headers(100_000));
        let bpe = t.train().unwrap();
        assert_eq!(bpe.special_id("<|bos|>"), Some(448));
        assert_eq!(bpe.special_id("<|repo_name|>"), Some(459));
        assert!(!bpe.encode("<|bos|><|eos|>").iter().any(|&id| id >= 448));
        assert_eq!(bpe.decode(&[448]), b"<|bos|>");
    }

    #[test]
    fn superword_merges_cross_piece_boundaries_when_asked_for() {
        let (bpe, texts) = trained_with(1 << 20);
        assert_eq!(bpe.pattern(), PATTERN);
        // ` = compute(` spans three first-stage pieces (` =`, ` compute`, `(`).
        assert!(bpe.tokens().iter().any(|t| t.starts_with(b" = compute(")));
        let back = from_hf_json(&to_hf_json(&bpe).to_string()).unwrap();
        assert_eq!(back.pattern(), PATTERN);
        assert_eq!(back.encode(&texts[2]), bpe.encode(&texts[2]));
        let (one_stage, _) = trained();
        assert!(!one_stage
            .tokens()
            .iter()
            .any(|t| t.starts_with(b" = compute(")));
    }

    #[test]
    fn a_cap_on_token_length_holds_in_both_stages_and_text_still_round_trips() {
        let texts: Vec<String> = (0..50)
            .map(|i| format!("int value_{i} = compute({i});\nreturn value_{i};\n}}\n"))
            .collect();
        let longest = |bpe: &Bpe| bpe.tokens().iter().map(Vec::len).max().unwrap();
        for second_stage in [0, 1 << 20] {
            let train = |cap| {
                let mut t = Trainer::new(512)
                    .unwrap()
                    .with_second_stage_bytes(second_stage)
                    .with_max_token_bytes(cap);
                t.feed(&texts);
                t.train().unwrap()
            };
            assert!(longest(&train(0)) > 4);
            let capped = train(4);
            assert_eq!(longest(&capped), 4, "second stage: {second_stage}");
            for text in &texts {
                assert_eq!(capped.decode(&capped.encode(text)), text.as_bytes());
            }
        }
    }

    #[test]
    fn superwords_kept_within_lines_take_in_no_line_break() {
        let texts: Vec<String> = (0..50)
            .map(|i| format!("int value_{i} = compute({i});\nreturn value_{i};\n}}\n"))
            .collect();
        let train = |line_breaks| {
            let mut t = Trainer::new(512)
                .unwrap()
                .with_second_stage_bytes(1 << 20)
                .with_superword_line_breaks(line_breaks);
            t.feed(&texts);
            t.train().unwrap()
        };
        // First-stage pieces hold a line break only after punctuation (`;\n`): a token
        // with a line break and a letter or digit is a superword that took one in.
        let joins_a_line_break = |bpe: &Bpe| {
            bpe.tokens()
                .iter()
                .any(|t| t.contains(&b'\n') && t.iter().any(u8::is_ascii_alphanumeric))
        };
        assert!(joins_a_line_break(&train(true)));
        let within = train(false);
        assert!(!joins_a_line_break(&within));
        assert!(within
            .tokens()
            .iter()
            .any(|t| t.as_slice() == b" = compute("));
        for text in &texts {
            assert_eq!(within.decode(&within.encode(text)), text.as_bytes());
        }
    }

    #[test]
    fn healing_backs_off_a_token_that_training_text_extended() {
        let texts: Vec<String> = (0..50)
            .map(|i| format!("namespace n_{i} {{\nint f_{i}() {{\n    return {i};\n}}\n}}\n"))
            .collect();
        let mut t = Trainer::new(600).unwrap();
        t.feed(&texts);
        let bpe = t.train().unwrap();
        let prompt = "int g() {\n";
        let mut ids = bpe.encode(prompt);
        let whole = ids.clone();
        let healing = bpe
            .heal(&mut ids)
            .expect("the prompt's last token is extended");
        assert_eq!(ids.len() + 1, whole.len());
        // What was taken off is exactly the prompt's tail, and every allowed first token
        // carries it: among them the brace with the body's indentation.
        let kept = bpe.decode(&ids);
        assert_eq!(
            [kept.as_slice(), &healing.prefix].concat(),
            prompt.as_bytes()
        );
        for &t in &healing.allowed {
            assert!(bpe.tokens()[t as usize].starts_with(&healing.prefix));
        }
        // The text as training had it continues the kept tokens with an allowed one
        // that carries the body's indentation, which the whole prompt's last token ruled
        // out.
        let body = bpe.encode("int g() {\n    return 1;");
        assert_eq!(body[..ids.len()], ids[..]);
        let next = body[ids.len()];
        assert!(healing.allowed.contains(&next));
        assert!(bpe.tokens()[next as usize].ends_with(b"    "));
        assert_ne!(body[..whole.len()], whole[..]);
        let generated = [healing.prefix.as_slice(), b"    return 1;"].concat();
        assert_eq!(healing.strip(&generated), b"    return 1;");
        // A special token, or one that nothing extends, is left alone.
        let mut special = vec![bpe.special_id("<|bos|>").unwrap()];
        assert!(bpe.heal(&mut special).is_none());
        assert_eq!(special.len(), 1);
        let mut nothing: Vec<u32> = Vec::new();
        assert!(bpe.heal(&mut nothing).is_none());
    }
}
