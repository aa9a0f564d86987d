//! A lean byte-level BPE trainer: pieces are counted once (in parallel), then merges
//! are applied only to the pieces that contain the merged pair, with pair counts kept
//! up to date incrementally and a lazily corrected max-heap choosing the next merge.

use rayon::prelude::*;
use regex::Regex;
use rustc_hash::FxHashMap as HashMap;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::bpe::PieceCache;
use crate::{
    Bpe, TokenizerError, FIRST_STAGE_SHARE, INDENTATION_APART_PATTERN, PATTERN, PIECE_PATTERN,
    RESERVED_SPECIALS,
};

type Pair = (u32, u32);
/// Changes of pair counts.
type Deltas = Vec<(Pair, i64)>;

pub struct Trainer {
    vocab_size: usize,
    piece_pattern: &'static str,
    splitter: Regex,
    line_splitter: Regex,
    counts: HashMap<String, u64>,
    line_counts: HashMap<String, u64>,
    line_bytes: usize,
    second_stage_bytes: usize,
    max_token_bytes: usize,
    superword_line_breaks: bool,
}

impl Trainer {
    pub fn new(vocab_size: usize) -> Result<Self, TokenizerError> {
        if vocab_size < 256 + RESERVED_SPECIALS {
            return Err(TokenizerError::VocabTooSmall(vocab_size));
        }
        Ok(Trainer {
            vocab_size,
            piece_pattern: PIECE_PATTERN,
            splitter: Regex::new(PIECE_PATTERN).expect("static pattern"),
            line_splitter: Regex::new(PATTERN).expect("static pattern"),
            counts: HashMap::default(),
            line_counts: HashMap::default(),
            line_bytes: 0,
            second_stage_bytes: 0,
            max_token_bytes: 0,
            superword_line_breaks: true,
        })
    }

    /// Also learn second-stage (superword) merges, from the lines of the first `bytes`
    /// of text; 0 (the default) learns the whole vocabulary in the first stage.
    pub fn with_second_stage_bytes(mut self, bytes: usize) -> Self {
        self.second_stage_bytes = bytes;
        self
    }

    /// Never learn a token longer than `bytes` (0, the default: no limit), in either stage.
    pub fn with_max_token_bytes(mut self, bytes: usize) -> Self {
        self.max_token_bytes = bytes;
        self
    }

    /// Whether a second-stage merge may join a piece that holds a line break (`;\n`,
    /// ` {\n`) to what comes before it (true, the default): false keeps superwords
    /// within a line, no whole lines as tokens.
    pub fn with_superword_line_breaks(mut self, allowed: bool) -> Self {
        self.superword_line_breaks = allowed;
        self
    }

    /// Whether first-stage pieces keep a line's indentation apart from the punctuation and
    /// line break before it ([`INDENTATION_APART_PATTERN`]); false (the default) joins them
    /// ([`PIECE_PATTERN`]). Set before feeding text.
    pub fn with_indentation_apart(mut self, apart: bool) -> Self {
        self.piece_pattern = match apart {
            true => INDENTATION_APART_PATTERN,
            false => PIECE_PATTERN,
        };
        self.splitter = Regex::new(self.piece_pattern).expect("static pattern");
        self
    }

    /// Count the pieces and lines of a batch of texts (the texts can be dropped after).
    pub fn feed(&mut self, texts: &[String]) {
        count_into(&mut self.counts, &self.splitter, texts);
        if self.line_bytes < self.second_stage_bytes {
            count_into(&mut self.line_counts, &self.line_splitter, texts);
            self.line_bytes += texts.iter().map(String::len).sum::<usize>();
        }
    }

    pub fn distinct_pieces(&self) -> usize {
        self.counts.len()
    }

    pub fn train(self) -> Result<Bpe, TokenizerError> {
        let learned = self.vocab_size - RESERVED_SPECIALS;
        let cap = match self.max_token_bytes {
            0 => usize::MAX,
            n => n,
        };
        let mut state = Learner::new(self.counts, None);
        if self.second_stage_bytes == 0 {
            state.learn(learned, cap, true);
            return Bpe::new(
                state.tokens,
                state.merges,
                self.vocab_size,
                self.piece_pattern,
            );
        }
        state.learn(
            256 + ((learned - 256) as f64 * FIRST_STAGE_SHARE) as usize,
            cap,
            true,
        );
        let stage_one = Bpe::new(
            state.tokens.clone(),
            state.merges.clone(),
            self.vocab_size,
            self.piece_pattern,
        )?;
        let mut state = Learner::new(self.line_counts, Some((&stage_one, state)));
        state.learn(learned, cap, self.superword_line_breaks);
        Bpe::new(state.tokens, state.merges, self.vocab_size, PATTERN)
    }
}

fn count_into(counts: &mut HashMap<String, u64>, splitter: &Regex, texts: &[String]) {
    let batch = texts
        .par_iter()
        .fold(HashMap::<&str, u64>::default, |mut m, t| {
            for piece in splitter.find_iter(t) {
                *m.entry(piece.as_str()).or_default() += 1;
            }
            m
        })
        .reduce(HashMap::default, |a, b| {
            // Fold the smaller map into the larger.
            if a.len() >= b.len() {
                merge_into(a, b)
            } else {
                merge_into(b, a)
            }
        });
    for (piece, n) in batch {
        match counts.get_mut(piece) {
            Some(c) => *c += n,
            None => {
                counts.insert(piece.to_string(), n);
            }
        }
    }
}

/// Words as symbol ids, all in one buffer: a `Vec` per word would cost its header and
/// an allocation each, more than the symbols of most words. A merge only shortens a
/// word, so it is rewritten in place.
#[derive(Default)]
struct Words {
    symbols: Vec<u32>,
    /// Start in `symbols` and current length of each word.
    spans: Vec<(usize, u32)>,
}

impl Words {
    fn extend(&mut self, words: impl IntoIterator<Item = Vec<u32>>) {
        for word in words {
            self.spans.push((self.symbols.len(), word.len() as u32));
            self.symbols.extend(word);
        }
    }

    /// Gives back what growing the buffers reserved beyond their contents.
    fn shrink_to_fit(&mut self) {
        self.symbols.shrink_to_fit();
        self.spans.shrink_to_fit();
    }

    fn get(&self, i: usize) -> &[u32] {
        let (start, len) = self.spans[i];
        &self.symbols[start..start + len as usize]
    }

    fn iter(&self) -> impl Iterator<Item = &[u32]> {
        (0..self.spans.len()).map(|i| self.get(i))
    }

    /// Replaces word `i` by `shorter`, which is no longer than it.
    fn shorten(&mut self, i: usize, shorter: &[u32]) {
        let (start, len) = &mut self.spans[i];
        debug_assert!(shorter.len() <= *len as usize);
        self.symbols[*start..*start + shorter.len()].copy_from_slice(shorter);
        *len = shorter.len() as u32;
    }
}

/// No occurrence list yet.
const NO_SLOT: u32 = u32::MAX;

/// Occurrence lists of the tracked pairs, in slots that are reused once freed.
#[derive(Default)]
struct Lists {
    slots: Vec<Vec<u32>>,
    free: Vec<u32>,
}

impl Lists {
    fn take_slot(&mut self) -> u32 {
        self.free.pop().unwrap_or_else(|| {
            self.slots.push(Vec::new());
            (self.slots.len() - 1) as u32
        })
    }

    /// Empties a slot for reuse; returns what it listed.
    fn free(&mut self, slot: u32) -> Vec<u32> {
        self.free.push(slot);
        std::mem::take(&mut self.slots[slot as usize])
    }
}

/// The state of BPE learning: words (distinct pieces as symbol ids) with their counts,
/// the tokens and merges so far, pair counts and where each pair occurs.
struct Learner {
    words: Words,
    counts: Vec<i64>,
    tokens: Vec<Vec<u8>>,
    ids: HashMap<Vec<u8>, u32>,
    merges: Vec<[u32; 3]>,
}

impl Learner {
    /// Words from counted pieces: as bytes, or encoded by the previous stage (whose
    /// tokens and merges are kept and extended).
    fn new(pieces: HashMap<String, u64>, previous: Option<(&Bpe, Learner)>) -> Self {
        let mut pieces: Vec<(String, u64)> = pieces.into_iter().collect();
        pieces.sort_unstable();
        let counts: Vec<i64> = pieces.iter().map(|(_, c)| *c as i64).collect();
        match previous {
            None => {
                let tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
                let mut words = Words::default();
                words.extend(
                    pieces
                        .iter()
                        .map(|(p, _)| p.bytes().map(u32::from).collect()),
                );
                words.shrink_to_fit();
                Learner {
                    words,
                    counts,
                    ids: tokens
                        .iter()
                        .enumerate()
                        .map(|(i, t)| (t.clone(), i as u32))
                        .collect(),
                    tokens,
                    merges: Vec::new(),
                }
            }
            Some((bpe, prev)) => {
                let Learner {
                    tokens,
                    ids,
                    merges,
                    words: earlier,
                    ..
                } = prev;
                drop(earlier);
                let mut words = Words::default();
                // In chunks, so that the encoded lines never exist twice. Lines repeat
                // pieces: each thread keeps the pieces it has encoded.
                for chunk in pieces.chunks(1 << 16) {
                    let encoded: Vec<Vec<u32>> = chunk
                        .par_iter()
                        .map_init(PieceCache::default, |cache, (p, _)| {
                            bpe.encode_cached(p, cache)
                        })
                        .collect();
                    words.extend(encoded);
                }
                words.shrink_to_fit();
                Learner {
                    words,
                    counts,
                    tokens,
                    ids,
                    merges,
                }
            }
        }
    }

    /// Learn merges until there are `target` tokens (or no pair occurs twice), none making
    /// a token longer than `cap` bytes, nor (unless `line_breaks`) joining a token that
    /// holds a line break to another.
    fn learn(&mut self, target: usize, cap: usize, line_breaks: bool) {
        let Learner {
            words,
            counts,
            tokens,
            ids,
            merges,
        } = self;

        // Each tracked pair: its count, and the slot in `lists` of where it occurs
        // (word indices, appended: a word may be listed twice or no longer hold the
        // pair; both are sorted out when the pair is merged). One table for both, and
        // plain vectors for the lists: they cost a quarter of hash sets.
        // A pair whose token would be too long is never tracked.
        let fits = |tokens: &[Vec<u8>], p: Pair| {
            let (a, b) = (&tokens[p.0 as usize], &tokens[p.1 as usize]);
            a.len() + b.len() <= cap
                && (line_breaks || !a.iter().chain(b.iter()).any(|&c| c == b'\n'))
        };
        let mut seen: HashMap<Pair, i64> = HashMap::default();
        for (i, w) in words.iter().enumerate() {
            for p in w.windows(2) {
                *seen.entry((p[0], p[1])).or_default() += counts[i];
            }
        }
        // A pair of existing tokens that occurs once can never be merged (merges only
        // take occurrences away from such pairs), so it is not tracked at all: most
        // pairs that cross piece boundaries in the second stage are of this kind.
        seen.retain(|&p, c| *c >= 2 && fits(tokens, p));
        // New pairs (with new tokens) join as merges go: room for as many again spares
        // the table a resize (old and new tables held at once) when it is largest.
        let mut pairs: HashMap<Pair, (i64, u32)> = HashMap::default();
        pairs.reserve(2 * seen.len());
        let mut lists = Lists::default();
        for (p, c) in seen {
            pairs.insert(p, (c, lists.take_slot()));
        }
        for (i, w) in words.iter().enumerate() {
            for p in w.windows(2) {
                if let Some(&(_, slot)) = pairs.get(&(p[0], p[1])) {
                    let list = &mut lists.slots[slot as usize];
                    if list.last() != Some(&(i as u32)) {
                        list.push(i as u32);
                    }
                }
            }
        }
        for list in &mut lists.slots {
            list.shrink_to_fit();
        }
        let mut heap: BinaryHeap<(i64, Reverse<Pair>)> =
            pairs.iter().map(|(&p, &(c, _))| (c, Reverse(p))).collect();

        while tokens.len() < target {
            // Every change of a count pushes an entry and leaves the old one behind:
            // rebuilt from the counts when stale entries outnumber live ones.
            if heap.len() > 2 * pairs.len() + (1 << 16) {
                heap = pairs.iter().map(|(&p, &(c, _))| (c, Reverse(p))).collect();
            }
            let Some((count, Reverse(pair))) = heap.pop() else {
                break;
            };
            let current = pairs.get(&pair).map_or(0, |e| e.0);
            if current != count {
                if current > 0 {
                    heap.push((current, Reverse(pair)));
                }
                continue;
            }
            if count < 2 {
                break;
            }
            let bytes: Vec<u8> = [
                tokens[pair.0 as usize].as_slice(),
                tokens[pair.1 as usize].as_slice(),
            ]
            .concat();
            let new = match ids.get(&bytes) {
                Some(&id) => id,
                None => {
                    let id = tokens.len() as u32;
                    ids.insert(bytes.clone(), id);
                    tokens.push(bytes);
                    id
                }
            };
            merges.push([pair.0, pair.1, new]);
            let (_, slot) = pairs.remove(&pair).expect("a counted pair");
            let mut affected = lists.free(slot);
            affected.sort_unstable();
            affected.dedup();
            let mut changed: HashMap<Pair, i64> = HashMap::default();
            let mut gained: Vec<(Pair, u32)> = Vec::new();
            // In chunks, so a pair found in most words does not hold a second copy of
            // all of them at once.
            for chunk in affected.chunks(1 << 14) {
                let updates: Vec<(u32, Vec<u32>, Deltas)> = chunk
                    .par_iter()
                    .filter_map(|&w| {
                        let (merged, deltas) = merge_word(words.get(w as usize), pair, new)?;
                        let n = counts[w as usize];
                        Some((
                            w,
                            merged,
                            deltas.into_iter().map(|(p, d)| (p, d * n)).collect(),
                        ))
                    })
                    .collect();
                for (w, merged, deltas) in updates {
                    for (p, d) in deltas {
                        *changed.entry(p).or_default() += d;
                        if d > 0 {
                            gained.push((p, w));
                        }
                    }
                    words.shorten(w as usize, &merged);
                }
            }
            for (p, d) in changed {
                if p == pair || !fits(tokens, p) {
                    continue;
                }
                if d > 0 {
                    // Pairs with the new token only grow now: one seen once stays so
                    // and is not tracked, like the first ones.
                    let (c, slot) = pairs.entry(p).or_insert((0, NO_SLOT));
                    *c += d;
                    if *c >= 2 {
                        if *slot == NO_SLOT {
                            *slot = lists.take_slot();
                        }
                        heap.push((*c, Reverse(p)));
                    } else if let Some((_, slot)) = pairs.remove(&p) {
                        if slot != NO_SLOT {
                            lists.free(slot);
                        }
                    }
                } else if let Some((c, _)) = pairs.get_mut(&p) {
                    // Untracked pairs (seen once) have nothing to count down.
                    *c += d;
                }
            }
            for (p, w) in gained {
                if let Some(&(_, slot)) = pairs.get(&p) {
                    lists.slots[slot as usize].push(w);
                }
            }
        }
    }
}

fn merge_into<'a>(
    mut big: HashMap<&'a str, u64>,
    small: HashMap<&'a str, u64>,
) -> HashMap<&'a str, u64> {
    for (k, v) in small {
        *big.entry(k).or_default() += v;
    }
    big
}

/// `word` with every occurrence of `pair` (left to right) replaced by `new`, and the
/// changes in adjacent pair counts, computed locally at each occurrence as HF's trainer
/// does: the neighbour on the left is the current symbol (possibly `new` from the
/// previous occurrence, whose right-hand change this then corrects). `None` if the pair
/// does not occur.
fn merge_word(word: &[u32], pair: Pair, new: u32) -> Option<(Vec<u32>, Deltas)> {
    let mut out = Vec::with_capacity(word.len());
    let mut deltas = Vec::new();
    let mut i = 0;
    while i < word.len() {
        if i + 1 < word.len() && (word[i], word[i + 1]) == pair {
            if let Some(&left) = out.last() {
                deltas.push(((left, pair.0), -1));
                deltas.push(((left, new), 1));
            }
            deltas.push((pair, -1));
            if let Some(&right) = word.get(i + 2) {
                deltas.push(((pair.1, right), -1));
                deltas.push(((new, right), 1));
            }
            out.push(new);
            i += 2;
        } else {
            out.push(word[i]);
            i += 1;
        }
    }
    (out.len() < word.len()).then_some((out, deltas))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recount(words: &[Vec<u32>]) -> HashMap<Pair, i64> {
        let mut m = HashMap::default();
        for w in words {
            for p in w.windows(2) {
                *m.entry((p[0], p[1])).or_default() += 1;
            }
        }
        m.retain(|_, v| *v != 0);
        m
    }

    #[test]
    fn merge_deltas_match_a_recount() {
        for word in [
            vec![1, 2, 1, 2, 3],
            vec![1, 2, 1, 2],
            vec![5, 1, 2],
            vec![1, 1, 1, 1],
            vec![3, 1, 2, 2, 1, 2],
        ] {
            let pair = if word == [1, 1, 1, 1] { (1, 1) } else { (1, 2) };
            let (merged, deltas) = merge_word(&word, pair, 9).unwrap();
            let mut counts = recount(std::slice::from_ref(&word));
            for (p, d) in deltas {
                *counts.entry(p).or_default() += d;
            }
            counts.retain(|_, v| *v != 0);
            assert_eq!(counts, recount(&[merged]), "{word:?}");
        }
    }
}
