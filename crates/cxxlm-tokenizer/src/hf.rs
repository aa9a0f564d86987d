//! HF `tokenizer.json`: a byte-level BPE model with our split pattern as pre-tokenizer,
//! loadable by `tokenizers` and `transformers`. The special tokens are entries of the
//! model's vocabulary, not `added_tokens`: `tokenizers` cuts added tokens out of any
//! text before encoding it (and its switch against that, `encode_special_tokens`, is not
//! saved in the file), whereas ours never makes a special token from text. So encoding
//! gives our ids on every text, `<|bos|>` written in a file included; special tokens
//! are put in by id (`token_to_id("<|bos|>")`), as we do.

use serde_json::{json, Value};
use std::collections::HashMap;

use crate::byte_level::{byte_to_char, decode, encode};
use crate::{
    special_tokens, Bpe, TokenizerError, INDENTATION_APART_PATTERN, PATTERN, PIECE_PATTERN,
};

pub fn to_hf_json(bpe: &Bpe) -> Value {
    let table = byte_to_char();
    let names: Vec<String> = bpe.tokens().iter().map(|t| encode(t, &table)).collect();
    let specials = special_tokens();
    let special_ids = (bpe.special_base()..).map(|id| id as usize);
    let vocab: serde_json::Map<String, Value> = names
        .iter()
        .enumerate()
        .chain(special_ids.zip(&specials))
        .map(|(i, n)| (n.clone(), json!(i)))
        .collect();
    let merges: Vec<Value> = bpe
        .merges()
        .iter()
        .map(|m| json!([names[m[0] as usize], names[m[1] as usize]]))
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                { "type": "Split", "pattern": { "Regex": bpe.pattern() }, "behavior": "Isolated", "invert": false },
                { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false }
            ]
        },
        "post_processor": null,
        "decoder": { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges
        }
    })
}

fn bad(what: impl Into<String>) -> TokenizerError {
    TokenizerError::Format(what.into())
}

/// Read a `tokenizer.json` written by [`to_hf_json`]. A tokenizer with another split
/// pattern, model type or special tokens is refused: ids from it would not mean what
/// our models were trained on.
/// A `tokenizer.json` file; errors name the file.
pub fn load(path: &std::path::Path) -> Result<Bpe, TokenizerError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| TokenizerError::Format(format!("{}: {e}", path.display())))?;
    from_hf_json(&text).map_err(|e| TokenizerError::Format(format!("{}: {e}", path.display())))
}

pub fn from_hf_json(text: &str) -> Result<Bpe, TokenizerError> {
    let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let pattern = v
        .pointer("/pre_tokenizer/pretokenizers/0/pattern/Regex")
        .and_then(Value::as_str);
    // One stage splits into C++ pieces (indentation joined or apart); with superwords,
    // into lines.
    let Some(pattern) = [PIECE_PATTERN, INDENTATION_APART_PATTERN, PATTERN]
        .into_iter()
        .find(|p| pattern == Some(*p))
    else {
        return Err(bad("not a cxxlm tokenizer: its pre-tokenizer pattern differs from this version's (retrain it with `cxxlm tok train`)"));
    };
    if v.pointer("/model/type").and_then(Value::as_str) != Some("BPE") {
        return Err(bad("model is not BPE"));
    }
    let table = byte_to_char();
    let vocab = v
        .pointer("/model/vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("no model.vocab"))?;
    let added = v
        .get("added_tokens")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no added_tokens"))?;
    // The special tokens take the last ids: as vocabulary entries, or (in files written
    // before they left it) as `added_tokens`.
    let specials = special_tokens();
    let id_of = |v: &Value| v.as_u64().map(|id| id as usize);
    let base = match added.first() {
        Some(a) => id_of(&a["id"]),
        None => vocab.get(&specials[0]).and_then(id_of),
    }
    .ok_or_else(|| bad(format!("no special token {} with an id", specials[0])))?;
    if !added.is_empty() && added.len() != specials.len() {
        return Err(bad("special tokens differ from this version's"));
    }
    for (i, a) in added.iter().enumerate() {
        if a["content"].as_str() != Some(specials[i].as_str()) || id_of(&a["id"]) != Some(base + i)
        {
            return Err(bad(format!(
                "special token {i} is not {} at id {}",
                specials[i],
                base + i
            )));
        }
    }
    let mut regular: Vec<(&String, usize)> = Vec::with_capacity(vocab.len());
    let mut listed = 0;
    for (name, id) in vocab {
        let id = id_of(id).ok_or_else(|| bad(format!("vocab id of {name:?} is not a number")))?;
        match id.checked_sub(base) {
            None => regular.push((name, id)),
            Some(i) if specials.get(i) == Some(name) => listed += 1,
            Some(i) => {
                return Err(bad(format!(
                    "vocab entry {name:?} at id {id} is not special token {i}"
                )))
            }
        }
    }
    if listed != if added.is_empty() { specials.len() } else { 0 } {
        return Err(bad("special tokens differ from this version's"));
    }
    let mut tokens: Vec<Option<Vec<u8>>> = vec![None; regular.len()];
    let mut ids: HashMap<&str, u32> = HashMap::new();
    for (name, id) in regular {
        let bytes = decode(name, &table)
            .ok_or_else(|| bad(format!("vocab entry {name:?} is not byte-level")))?;
        *tokens
            .get_mut(id)
            .ok_or_else(|| bad("vocab ids have gaps"))? = Some(bytes);
        ids.insert(name, id as u32);
    }
    let tokens: Vec<Vec<u8>> = tokens
        .into_iter()
        .collect::<Option<_>>()
        .ok_or_else(|| bad("vocab ids have gaps"))?;
    let merges = v
        .pointer("/model/merges")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no model.merges"))?;
    let mut out = Vec::with_capacity(merges.len());
    for m in merges {
        let (a, b) = match m {
            Value::Array(p) if p.len() == 2 => {
                (p[0].as_str().unwrap_or(""), p[1].as_str().unwrap_or(""))
            }
            Value::String(s) => s
                .split_once(' ')
                .ok_or_else(|| bad(format!("merge {s:?}")))?,
            _ => return Err(bad(format!("merge {m}"))),
        };
        let joined = format!("{a}{b}");
        let (Some(&x), Some(&y), Some(&z)) = (ids.get(a), ids.get(b), ids.get(joined.as_str()))
        else {
            return Err(bad(format!(
                "merge {a:?} {b:?} names tokens not in the vocabulary"
            )));
        };
        out.push([x, y, z]);
    }
    Bpe::new(tokens, out, base + specials.len(), pattern)
}
