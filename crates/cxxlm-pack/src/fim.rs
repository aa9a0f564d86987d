//! Fill-in-the-middle as StarCoder trains it: a document is cut at two points drawn
//! uniformly over its characters into prefix, middle and suffix, each tokenized on its
//! own, and laid out so the model learns to write the middle after seeing both sides:
//!
//! - PSM: `<|bos|><|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>M<|eos|>`
//! - SPM: `<|bos|><|fim_prefix|><|fim_suffix|>S<|fim_middle|>PM<|eos|>` (the variant of
//!   Bavarian et al. that StarCoder uses, where the prefix continues into the middle).

use cxxlm_tokenizer::{Bpe, PieceCache};

use crate::rng::Rng;
use crate::{PackError, Result};

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FimConfig {
    /// Share of training documents rearranged.
    pub rate: f64,
    /// Share of rearranged documents in SPM rather than PSM order.
    pub spm_rate: f64,
    /// Cut only at line starts (spans of whole lines).
    pub line_aligned: bool,
    pub seed: u64,
}

impl Default for FimConfig {
    fn default() -> Self {
        FimConfig {
            rate: 0.5,
            spm_rate: 0.5,
            line_aligned: false,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Plain,
    Psm,
    Spm,
}

/// The special ids a packed document uses.
#[derive(Debug, Clone, Copy)]
pub struct Specials {
    pub bos: u32,
    pub eos: u32,
    pub prefix: u32,
    pub middle: u32,
    pub suffix: u32,
    pub repo_name: u32,
    pub file_sep: u32,
}

impl Specials {
    pub fn of(bpe: &Bpe) -> Self {
        let id = |name| {
            bpe.special_id(name)
                .expect("every tokenizer has the design's specials")
        };
        Specials {
            bos: id("<|bos|>"),
            eos: id("<|eos|>"),
            prefix: id("<|fim_prefix|>"),
            middle: id("<|fim_middle|>"),
            suffix: id("<|fim_suffix|>"),
            repo_name: id("<|repo_name|>"),
            file_sep: id("<|file_sep|>"),
        }
    }
}

/// Turns documents into token sequences, choosing layouts and cut points from a
/// generator keyed by the document id, so the result depends on neither order nor
/// parallelism.
pub struct Packer<'a> {
    pub bpe: &'a Bpe,
    pub specials: Specials,
    pub fim: FimConfig,
}

impl<'a> Packer<'a> {
    pub fn new(bpe: &'a Bpe, fim: FimConfig) -> Self {
        Packer {
            bpe,
            specials: Specials::of(bpe),
            fim,
        }
    }

    /// `<|bos|>` text `<|eos|>`, or a FIM rearrangement with probability `rate`.
    pub fn document(
        &self,
        id: &str,
        text: &str,
        rate: f64,
        cache: &mut PieceCache,
    ) -> (Vec<u32>, Layout) {
        let mut rng = Rng::keyed(self.fim.seed, id.as_bytes());
        let layout = self.layout(&mut rng, rate);
        let mut encode = |part: &str| self.bpe.encode_cached(part, cache);
        let tokens = if layout == Layout::Plain {
            let s = &self.specials;
            [vec![s.bos], encode(text), vec![s.eos]].concat()
        } else {
            let (lo, hi) = self.cut_points(text, &mut rng);
            let (prefix, middle, suffix) = (&text[..lo], &text[lo..hi], &text[hi..]);
            let (prefix, middle, suffix) = (encode(prefix), encode(middle), encode(suffix));
            self.arrange(layout, &prefix, &middle, &suffix)
        };
        (tokens, layout)
    }

    /// Plain, or rearranged with probability `rate` (SPM for `spm_rate` of those).
    pub(crate) fn layout(&self, rng: &mut Rng, rate: f64) -> Layout {
        if !rng.chance(rate) {
            Layout::Plain
        } else if rng.chance(self.fim.spm_rate) {
            Layout::Spm
        } else {
            Layout::Psm
        }
    }

    /// A FIM document of the tokenized prefix, middle and suffix, framed by
    /// `<|bos|>` and `<|eos|>`.
    pub(crate) fn arrange(
        &self,
        layout: Layout,
        prefix: &[u32],
        middle: &[u32],
        suffix: &[u32],
    ) -> Vec<u32> {
        let s = &self.specials;
        let mut out = vec![s.bos, s.prefix];
        if layout == Layout::Psm {
            out.extend(prefix);
            out.push(s.suffix);
            out.extend(suffix);
            out.push(s.middle);
        } else {
            out.push(s.suffix);
            out.extend(suffix);
            out.push(s.middle);
            out.extend(prefix);
        }
        out.extend(middle);
        out.push(s.eos);
        out
    }

    /// Two byte offsets `lo <= hi` at character (or line) boundaries, drawn uniformly.
    pub(crate) fn cut_points(&self, text: &str, rng: &mut Rng) -> (usize, usize) {
        let boundaries: Vec<usize> = if self.fim.line_aligned {
            std::iter::once(0)
                .chain(text.match_indices('\n').map(|(i, _)| i + 1))
                .chain(std::iter::once(text.len()))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect()
        } else {
            text.char_indices()
                .map(|(i, _)| i)
                .chain(std::iter::once(text.len()))
                .collect()
        };
        let n = boundaries.len() as u64;
        let a = boundaries[rng.below(n) as usize];
        let b = boundaries[rng.below(n) as usize];
        (a.min(b), a.max(b))
    }

    /// The original document's bytes from a packed sequence of any layout: PSM and SPM
    /// are put back in prefix, middle, suffix order.
    pub fn restore(&self, tokens: &[u32]) -> Result<Vec<u8>> {
        Ok(self.bpe.decode(&self.in_order(tokens)?))
    }

    /// A packed sequence's tokens between `<|bos|>` and `<|eos|>`, a FIM layout's parts
    /// put back in prefix, middle, suffix order.
    pub(crate) fn in_order(&self, tokens: &[u32]) -> Result<Vec<u32>> {
        let s = &self.specials;
        let bad = |m: &str| PackError::Fim(m.to_string());
        let body = tokens
            .strip_prefix(&[s.bos])
            .and_then(|t| t.strip_suffix(&[s.eos]))
            .ok_or_else(|| bad("a packed document starts with <|bos|> and ends with <|eos|>"))?;
        let Some(rest) = body.strip_prefix(&[s.prefix]) else {
            return Ok(body.to_vec());
        };
        let find = |t: &[u32], id: u32, what: &str| {
            t.iter()
                .position(|&x| x == id)
                .ok_or_else(|| bad(&format!("no {what}")))
        };
        if let Some(rest) = rest.strip_prefix(&[s.suffix]) {
            let m = find(rest, s.middle, "<|fim_middle|>")?;
            return Ok([&rest[m + 1..], &rest[..m]].concat());
        }
        let sfx = find(rest, s.suffix, "<|fim_suffix|>")?;
        let mid = sfx + 1 + find(&rest[sfx + 1..], s.middle, "<|fim_middle|>")?;
        Ok([&rest[..sfx], &rest[mid + 1..], &rest[sfx + 1..mid]].concat())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cxxlm_tokenizer::Trainer;

    fn tokenizer() -> Bpe {
        let texts: Vec<String> = (0..40)
            .map(|i| format!("int f{i}(int x) {{\n  return x * {i};\n}}\n// naïve ✓\n"))
            .collect();
        let mut t = Trainer::new(600).unwrap();
        t.feed(&texts);
        t.train().unwrap()
    }

    #[test]
    fn every_layout_restores_the_document() {
        let bpe = tokenizer();
        let text = "int main() {\n  // naïve ✓ 😀\n  return f3(2);\n}\n";
        for line_aligned in [false, true] {
            let packer = Packer::new(
                &bpe,
                FimConfig {
                    line_aligned,
                    ..Default::default()
                },
            );
            let mut seen = std::collections::HashSet::new();
            for i in 0..200 {
                let id = format!("doc-{i}");
                let (tokens, layout) = packer.document(&id, text, 0.5, &mut PieceCache::default());
                seen.insert(format!("{layout:?}"));
                assert_eq!(tokens[0], packer.specials.bos);
                assert_eq!(*tokens.last().unwrap(), packer.specials.eos);
                assert_eq!(packer.restore(&tokens).unwrap(), text.as_bytes(), "{id}");
                let again = packer.document(&id, text, 0.5, &mut PieceCache::default());
                assert_eq!(again.0, tokens, "the same id gives the same packing");
            }
            assert_eq!(seen.len(), 3, "{seen:?}");
        }
    }

    #[test]
    fn line_aligned_cuts_fall_on_line_starts() {
        let bpe = tokenizer();
        let packer = Packer::new(
            &bpe,
            FimConfig {
                line_aligned: true,
                ..Default::default()
            },
        );
        let text = "a\nbb\nccc\n";
        for i in 0..50 {
            let (lo, hi) = packer.cut_points(text, &mut Rng::keyed(i, b""));
            for p in [lo, hi] {
                assert!(p == 0 || text.as_bytes()[p - 1] == b'\n', "{p}");
            }
        }
    }

    #[test]
    fn rates_are_respected() {
        let bpe = tokenizer();
        let packer = Packer::new(&bpe, FimConfig::default());
        let mut cache = PieceCache::default();
        let layouts: Vec<Layout> = (0..2000)
            .map(|i| packer.document(&i.to_string(), "x;\n", 0.5, &mut cache).1)
            .collect();
        let plain = layouts.iter().filter(|l| **l == Layout::Plain).count();
        let spm = layouts.iter().filter(|l| **l == Layout::Spm).count();
        assert!((900..1100).contains(&plain), "{plain}");
        assert!((400..600).contains(&spm), "{spm}");
        assert!((0..50)
            .all(|i| packer.document(&i.to_string(), "x", 0.0, &mut cache).1 == Layout::Plain));
    }
}
