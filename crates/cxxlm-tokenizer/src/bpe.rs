use rayon::prelude::*;
use regex::Regex;
use rustc_hash::FxHashMap as HashMap;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::{special_tokens, TokenizerError, RESERVED_SPECIALS};
#[cfg(doc)]
use crate::{PATTERN, PIECE_PATTERN};

/// Encoded pieces, per thread (see [`Bpe::encode_cached`]); cleared when full.
#[derive(Default)]
pub struct PieceCache {
    map: HashMap<String, Vec<u32>>,
}

impl PieceCache {
    const CAPACITY: usize = 1 << 16;
}

/// What [`Bpe::heal`] took off a prompt: the first token generated must be one of
/// `allowed`, each beginning with `prefix`, which the completion then leaves out.
#[derive(Debug, Clone, PartialEq)]
pub struct Healing {
    pub prefix: Vec<u8>,
    pub allowed: Vec<u32>,
}

impl Healing {
    /// The completion's bytes from the generated tokens' bytes: without the prefix.
    pub fn strip<'a>(&self, generated: &'a [u8]) -> &'a [u8] {
        generated
            .strip_prefix(self.prefix.as_slice())
            .unwrap_or(generated)
    }
}

/// A trained byte-level BPE: ids 0-255 are the bytes, then one id per learned token,
/// and the special tokens occupy the last [`RESERVED_SPECIALS`] ids of the vocabulary.
#[derive(Debug, Clone)]
pub struct Bpe {
    tokens: Vec<Vec<u8>>,
    merges: Vec<[u32; 3]>,
    ranks: HashMap<(u32, u32), (u32, u32)>,
    vocab_size: usize,
    splitter: Regex,
    pattern: &'static str,
}

impl Bpe {
    /// `merges` in rank order, each `[left, right, result]`; `tokens` holds the bytes
    /// of every id below the specials. Text is split into pieces by `pattern`
    /// ([`PIECE_PATTERN`] or [`crate::INDENTATION_APART_PATTERN`] for first-stage merges
    /// only, [`PATTERN`] with superwords).
    pub fn new(
        tokens: Vec<Vec<u8>>,
        merges: Vec<[u32; 3]>,
        vocab_size: usize,
        pattern: &'static str,
    ) -> Result<Self, TokenizerError> {
        if vocab_size < 256 + RESERVED_SPECIALS || tokens.len() > vocab_size - RESERVED_SPECIALS {
            return Err(TokenizerError::VocabTooSmall(vocab_size));
        }
        let ranks = merges
            .iter()
            .enumerate()
            .map(|(r, m)| ((m[0], m[1]), (r as u32, m[2])))
            .collect();
        Ok(Bpe {
            tokens,
            merges,
            ranks,
            vocab_size,
            splitter: Regex::new(pattern).expect("static pattern"),
            pattern,
        })
    }

    /// The pre-tokenizer's split pattern.
    pub fn pattern(&self) -> &'static str {
        self.pattern
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn tokens(&self) -> &[Vec<u8>] {
        &self.tokens
    }

    pub fn merges(&self) -> &[[u32; 3]] {
        &self.merges
    }

    pub fn special_base(&self) -> u32 {
        (self.vocab_size - RESERVED_SPECIALS) as u32
    }

    /// The id of a special token such as `<|bos|>`.
    pub fn special_id(&self, name: &str) -> Option<u32> {
        special_tokens()
            .iter()
            .position(|s| s == name)
            .map(|i| self.special_base() + i as u32)
    }

    /// The pieces the pre-tokenizer cuts a text into. Every character matches some
    /// branch of the pattern, but a gap between matches would still be its own piece,
    /// as in HF's `Split` with `Isolated`.
    pub fn pieces<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut out = Vec::new();
        let mut last = 0;
        for m in self.splitter.find_iter(text) {
            if m.start() > last {
                out.push(&text[last..m.start()]);
            }
            out.push(m.as_str());
            last = m.end();
        }
        if last < text.len() {
            out.push(&text[last..]);
        }
        out
    }

    /// Plain text to ids. Special tokens are never produced: `<|bos|>` in the text is
    /// encoded as the characters it is made of.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_cached(text, &mut PieceCache::default())
    }

    /// [`Bpe::encode`] remembering pieces already encoded: C++ repeats whole lines
    /// (`}\n`, `return 0;\n`, include lines), so a cache kept across the texts one
    /// thread encodes saves most of the merging.
    pub fn encode_cached(&self, text: &str, cache: &mut PieceCache) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3);
        for piece in self.pieces(text) {
            if let Some(ids) = cache.map.get(piece) {
                out.extend_from_slice(ids);
                continue;
            }
            let start = out.len();
            self.encode_piece(piece.as_bytes(), &mut out);
            if cache.map.len() >= PieceCache::CAPACITY {
                cache.map.clear();
            }
            cache.map.insert(piece.to_string(), out[start..].to_vec());
        }
        out
    }

    pub fn encode_batch(&self, texts: &[&str]) -> Vec<Vec<u32>> {
        texts
            .par_iter()
            .map_init(PieceCache::default, |cache, t| self.encode_cached(t, cache))
            .collect()
    }

    /// Merge the lowest-ranked adjacent pair, leftmost first, until none is left (what
    /// HF's BPE model does), with a heap of candidate pairs over a linked list of
    /// symbols: O(n log n) in the piece length.
    fn encode_piece(&self, bytes: &[u8], out: &mut Vec<u32>) {
        let n = bytes.len();
        if n == 1 {
            out.push(bytes[0] as u32);
            return;
        }
        let mut sym: Vec<u32> = bytes.iter().map(|&b| b as u32).collect();
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut alive = vec![true; n];
        let mut heap: BinaryHeap<Reverse<(u32, usize)>> = BinaryHeap::new();
        for i in 0..n - 1 {
            if let Some(&(rank, _)) = self.ranks.get(&(sym[i], sym[i + 1])) {
                heap.push(Reverse((rank, i)));
            }
        }
        while let Some(Reverse((rank, i))) = heap.pop() {
            let j = next[i];
            if !alive[i] || j >= n {
                continue;
            }
            // The pair at `i` may have changed since this entry was pushed.
            match self.ranks.get(&(sym[i], sym[j])) {
                Some(&(r, new)) if r == rank => {
                    sym[i] = new;
                    alive[j] = false;
                    next[i] = next[j];
                    if next[j] < n {
                        prev[next[j]] = i;
                    }
                    if let Some(&(r, _)) = prev
                        .get(i)
                        .filter(|&&p| p < n)
                        .and_then(|&p| self.ranks.get(&(sym[p], sym[i])))
                    {
                        heap.push(Reverse((r, prev[i])));
                    }
                    if next[i] < n {
                        if let Some(&(r, _)) = self.ranks.get(&(sym[i], sym[next[i]])) {
                            heap.push(Reverse((r, i)));
                        }
                    }
                }
                _ => {}
            }
        }
        let mut i = 0;
        while i < n {
            out.push(sym[i]);
            i = next[i];
        }
    }

    /// Token healing: a prompt's last token may be the start of a longer one the
    /// training text always had there (`" {\n"` ends a prompt, but a body's first line
    /// was `" {\n    "` in training), so the model would read the cut as a sign that
    /// no indentation follows. Removes that token from `ids` and returns what the
    /// first generated token must begin with: its bytes, and the ids that do. None
    /// (and `ids` untouched) when the last token is special or nothing extends it.
    pub fn heal(&self, ids: &mut Vec<u32>) -> Option<Healing> {
        let last = self.tokens.get(*ids.last()? as usize)?;
        let allowed: Vec<u32> = (0..self.tokens.len() as u32)
            .filter(|&t| self.tokens[t as usize].starts_with(last))
            .collect();
        if allowed.len() < 2 {
            return None;
        }
        let prefix = last.clone();
        ids.pop();
        Some(Healing { prefix, allowed })
    }

    /// Ids to bytes; special tokens become their text.
    pub fn decode(&self, ids: &[u32]) -> Vec<u8> {
        let specials = special_tokens();
        let mut out = Vec::new();
        for &id in ids {
            match self.tokens.get(id as usize) {
                Some(t) => out.extend_from_slice(t),
                None => {
                    if let Some(s) = id
                        .checked_sub(self.special_base())
                        .and_then(|i| specials.get(i as usize))
                    {
                        out.extend_from_slice(s.as_bytes());
                    }
                }
            }
        }
        out
    }
}
