//! Batches of `(B, T+1)` token windows for rank `r` of `W`, from a memory-mapped pack.
//!
//! All ranks generate the same global stream of rows and each keeps its own `B` of
//! every `W x B`, so ranks see disjoint data and the stream does not depend on `W`:
//! a state saved by any rank resumes the run on any number of ranks. The state is the
//! epoch, the position in the epoch's shuffled order and, for best-fit packing, the
//! candidate buffer; restoring it yields exactly the batches an uninterrupted loader
//! would have produced.

use serde::{Deserialize, Serialize};
use std::sync::Arc;

use crate::indexed::IndexedDataset;
use crate::rng::Rng;
use crate::{PackError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The token stream cut into windows of `T+1` overlapping by one token, in a
    /// shuffled order per epoch.
    Sequential,
    /// Rows filled best-fit from a buffer of shuffled documents (as nanochat does): the
    /// largest that fits, else the shortest cropped to the space left, so most rows
    /// start with `<|bos|>`. Documents longer than a row are first cut into row-sized
    /// pieces overlapping by one token (every token after a document's first is a
    /// target once), so only cropped tails are lost.
    BestFit,
}

#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// Rows per rank and step.
    pub batch: usize,
    pub seq_len: usize,
    pub rank: usize,
    pub world: usize,
    pub mode: Mode,
    pub seed: u64,
    /// Documents a best-fit row chooses among.
    pub buffer: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoaderState {
    pub mode: Mode,
    pub seed: u64,
    pub seq_len: usize,
    pub epoch: u64,
    /// Position in the epoch's order.
    pub next: u64,
    /// Best-fit candidates (item ids).
    pub buffer: Vec<u32>,
    /// Rows produced so far (all ranks).
    pub rows: u64,
    /// Tokens of best-fit candidates cut off at the end of a row.
    pub cropped_tokens: u64,
}

/// Row-major `(rows, cols)` tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub rows: usize,
    pub cols: usize,
    pub tokens: Vec<u32>,
    /// Each row cut into the pieces of the documents it holds, their lengths in order
    /// (summing to `cols`): where document masking keeps them apart.
    pub documents: Vec<Vec<usize>>,
}

pub struct Loader {
    data: Arc<IndexedDataset>,
    config: LoaderConfig,
    /// `(first token, length)` of every window or document piece.
    items: Vec<(u64, u32)>,
    order: Vec<u32>,
    state: LoaderState,
}

impl Loader {
    pub fn new(data: Arc<IndexedDataset>, config: LoaderConfig) -> Result<Self> {
        if config.batch == 0 || config.seq_len == 0 || config.rank >= config.world {
            return Err(PackError::Config(format!(
                "loader needs a batch and sequence length above 0 and rank < world (got batch {}, seq_len {}, rank {} of {})",
                config.batch, config.seq_len, config.rank, config.world
            )));
        }
        let items = items(&data, &config);
        if items.is_empty() {
            return Err(PackError::Format {
                path: data.path().to_path_buf(),
                message: format!(
                    "holds {} tokens: not enough for one row of {}",
                    data.total_tokens(),
                    config.seq_len + 1
                ),
            });
        }
        let state = LoaderState {
            mode: config.mode,
            seed: config.seed,
            seq_len: config.seq_len,
            epoch: 0,
            next: 0,
            buffer: Vec::new(),
            rows: 0,
            cropped_tokens: 0,
        };
        let order = epoch_order(items.len(), config.seed, 0);
        Ok(Loader {
            data,
            config,
            items,
            order,
            state,
        })
    }

    pub fn state(&self) -> &LoaderState {
        &self.state
    }

    /// Continues from a saved state (of any rank and world size).
    pub fn restore(&mut self, state: LoaderState) -> Result<()> {
        if (state.mode, state.seed, state.seq_len)
            != (self.config.mode, self.config.seed, self.config.seq_len)
        {
            return Err(PackError::Config(format!(
                "loader state is for {:?} rows of {} tokens with seed {}, this run asks for {:?} rows of {} with seed {}",
                state.mode, state.seq_len, state.seed, self.config.mode, self.config.seq_len, self.config.seed
            )));
        }
        if state.next as usize > self.items.len()
            || state.buffer.iter().any(|&i| i as usize >= self.items.len())
        {
            return Err(PackError::Config(
                "loader state does not fit this dataset (was it packed again?)".into(),
            ));
        }
        self.order = epoch_order(self.items.len(), state.seed, state.epoch);
        self.state = state;
        Ok(())
    }

    /// This rank's rows of the next global step.
    pub fn next_batch(&mut self) -> Batch {
        let cols = self.config.seq_len + 1;
        let mut tokens = Vec::with_capacity(self.config.batch * cols);
        let mut documents = Vec::with_capacity(self.config.batch);
        let mine = self.config.rank * self.config.batch..(self.config.rank + 1) * self.config.batch;
        for row in 0..self.config.world * self.config.batch {
            let pieces = self.next_row();
            if mine.contains(&row) {
                let mut lengths = Vec::new();
                for (start, len) in pieces {
                    self.data.extend(start, len as usize, &mut tokens);
                    self.data.document_pieces(start, len as usize, &mut lengths);
                }
                documents.push(lengths);
            }
        }
        Batch {
            rows: self.config.batch,
            cols,
            tokens,
            documents,
        }
    }

    fn next_item(&mut self) -> u32 {
        if self.state.next as usize == self.order.len() {
            self.state.epoch += 1;
            self.state.next = 0;
            self.order = epoch_order(self.items.len(), self.state.seed, self.state.epoch);
        }
        self.state.next += 1;
        self.order[self.state.next as usize - 1]
    }

    fn next_row(&mut self) -> Vec<(u64, u32)> {
        self.state.rows += 1;
        if self.config.mode == Mode::Sequential {
            let item = self.next_item();
            return vec![self.items[item as usize]];
        }
        let mut left = (self.config.seq_len + 1) as u32;
        let mut pieces = Vec::new();
        while left > 0 {
            while self.state.buffer.len() < self.config.buffer.max(1) {
                let item = self.next_item();
                self.state.buffer.push(item);
            }
            let len = |i: &u32| self.items[*i as usize].1;
            let fits = (0..self.state.buffer.len())
                .filter(|&k| len(&self.state.buffer[k]) <= left)
                .max_by_key(|&k| (len(&self.state.buffer[k]), std::cmp::Reverse(k)));
            let k = fits.unwrap_or_else(|| {
                (0..self.state.buffer.len())
                    .min_by_key(|&k| (len(&self.state.buffer[k]), k))
                    .expect("buffer is full")
            });
            let (start, n) = self.items[self.state.buffer.swap_remove(k) as usize];
            let take = n.min(left);
            self.state.cropped_tokens += (n - take) as u64;
            pieces.push((start, take));
            left -= take;
        }
        pieces
    }
}

fn items(data: &IndexedDataset, config: &LoaderConfig) -> Vec<(u64, u32)> {
    let t = config.seq_len as u64;
    match config.mode {
        Mode::Sequential => {
            let windows = data.total_tokens().saturating_sub(1) / t;
            (0..windows).map(|k| (k * t, t as u32 + 1)).collect()
        }
        Mode::BestFit => {
            let row = t + 1;
            let mut out = Vec::new();
            for doc in 0..data.len() {
                let (start, len) = (data.doc_start(doc), data.doc_len(doc) as u64);
                let mut off = 0;
                loop {
                    out.push((start + off, (len - off).min(row) as u32));
                    if off + row >= len {
                        break;
                    }
                    off += t;
                }
            }
            out
        }
    }
}

fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    Rng::keyed(seed, &epoch.to_le_bytes()).shuffle(&mut order);
    order
}

/// Every window of a split once, in order, split among ranks: for bits per byte over a
/// validation set. The last batch may have fewer rows.
pub fn eval_batches(
    data: &IndexedDataset,
    batch: usize,
    seq_len: usize,
    rank: usize,
    world: usize,
) -> impl Iterator<Item = Batch> + '_ {
    let windows = data.total_tokens().saturating_sub(1) / seq_len as u64;
    let mine: Vec<u64> = (rank as u64..windows).step_by(world.max(1)).collect();
    let cols = seq_len + 1;
    (0..mine.len().div_ceil(batch.max(1))).map(move |b| {
        let rows = &mine[b * batch..((b + 1) * batch).min(mine.len())];
        let mut tokens = Vec::with_capacity(rows.len() * cols);
        let mut documents = Vec::with_capacity(rows.len());
        for &w in rows {
            data.extend(w * seq_len as u64, cols, &mut tokens);
            let mut lengths = Vec::new();
            data.document_pieces(w * seq_len as u64, cols, &mut lengths);
            documents.push(lengths);
        }
        Batch {
            rows: rows.len(),
            cols,
            tokens,
            documents,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::indexed::{IndexedWriter, TokenType};

    const BOS: u32 = 1;

    /// Documents of varied lengths, each `BOS, doc, doc, ...`.
    fn dataset(dir: &std::path::Path) -> Arc<IndexedDataset> {
        let prefix = dir.join("train");
        let mut w = IndexedWriter::create(&prefix, TokenType::Uint16).unwrap();
        for d in 0..60u32 {
            let len = 1 + (d * 37 % 50) as usize;
            let mut doc = vec![BOS];
            doc.extend(std::iter::repeat_n(d + 10, len));
            w.push(&doc).unwrap();
        }
        w.finish().unwrap();
        Arc::new(IndexedDataset::open(&prefix).unwrap())
    }

    fn config(mode: Mode, batch: usize, rank: usize, world: usize) -> LoaderConfig {
        LoaderConfig {
            batch,
            seq_len: 16,
            rank,
            world,
            mode,
            seed: 7,
            buffer: 8,
        }
    }

    #[test]
    fn restored_state_continues_exactly_on_any_world_size() {
        let dir = tempfile::tempdir().unwrap();
        let data = dataset(dir.path());
        for mode in [Mode::Sequential, Mode::BestFit] {
            // One rank with batch 4 sees what two ranks with batch 2 see together.
            let mut single = Loader::new(data.clone(), config(mode, 4, 0, 1)).unwrap();
            let mut ranks: Vec<Loader> = (0..2)
                .map(|r| Loader::new(data.clone(), config(mode, 2, r, 2)).unwrap())
                .collect();
            let mut saved = None;
            let mut expected = Vec::new();
            for step in 0..40 {
                if step == 13 {
                    let json = serde_json::to_string(ranks[1].state()).unwrap();
                    saved = Some(serde_json::from_str::<LoaderState>(&json).unwrap());
                }
                let whole = single.next_batch();
                let parts: Vec<Batch> = ranks.iter_mut().map(|l| l.next_batch()).collect();
                assert_eq!(
                    whole.tokens,
                    [parts[0].tokens.clone(), parts[1].tokens.clone()].concat()
                );
                assert_eq!(whole.tokens.len(), 4 * 17);
                if step >= 13 {
                    expected.push(whole.tokens);
                }
            }
            assert!(single.state().epoch >= 1, "the test crosses an epoch");
            let state = saved.unwrap();
            // Resume the two-rank run on one rank, and on two ranks again.
            let mut resumed = Loader::new(data.clone(), config(mode, 4, 0, 1)).unwrap();
            resumed.restore(state.clone()).unwrap();
            let mut resumed_ranks: Vec<Loader> = (0..2)
                .map(|r| {
                    let mut l = Loader::new(data.clone(), config(mode, 2, r, 2)).unwrap();
                    l.restore(state.clone()).unwrap();
                    l
                })
                .collect();
            for want in &expected {
                assert_eq!(&resumed.next_batch().tokens, want, "{mode:?}");
                let parts: Vec<u32> = resumed_ranks
                    .iter_mut()
                    .flat_map(|l| l.next_batch().tokens)
                    .collect();
                assert_eq!(&parts, want, "{mode:?}");
            }
        }
    }

    #[test]
    fn best_fit_loses_only_cropped_tails() {
        let dir = tempfile::tempdir().unwrap();
        let data = dataset(dir.path());
        let mut l = Loader::new(data.clone(), config(Mode::BestFit, 8, 0, 1)).unwrap();
        let (mut seen, mut bos_first) = (0u64, 0);
        for _ in 0..30 {
            let b = l.next_batch();
            bos_first += b.tokens.chunks(b.cols).filter(|r| r[0] == BOS).count();
            seen += b.tokens.len() as u64;
        }
        let st = l.state().clone();
        assert_eq!(seen, st.rows * 17);
        let len = |i: u32| l.items[i as usize].1 as u64;
        let consumed: u64 = (0..=st.epoch)
            .flat_map(|e| {
                let upto = if e == st.epoch {
                    st.next as usize
                } else {
                    l.items.len()
                };
                epoch_order(l.items.len(), 7, e)[..upto].to_vec()
            })
            .map(len)
            .sum();
        let buffered: u64 = st.buffer.iter().map(|&i| len(i)).sum();
        assert_eq!(seen + st.cropped_tokens, consumed - buffered);
        assert!(st.cropped_tokens < seen / 4, "{st:?}");
        assert!(
            bos_first > 30 * 8 / 2,
            "{bos_first} rows start at a document"
        );
    }

    /// A long document's pieces overlap by one token: each of its tokens but the first is
    /// predicted by exactly one of them.
    #[test]
    fn best_fit_pieces_make_every_token_a_target_once() {
        let dir = tempfile::tempdir().unwrap();
        let data = dataset(dir.path());
        for seq_len in [4, 7, 16] {
            let mut c = config(Mode::BestFit, 1, 0, 1);
            c.seq_len = seq_len;
            let pieces = items(&data, &c);
            for doc in 0..data.len() {
                let (start, len) = (data.doc_start(doc), data.doc_len(doc) as u64);
                let mut targets: Vec<u64> = pieces
                    .iter()
                    .filter(|(s, _)| (start..start + len).contains(s))
                    .flat_map(|&(s, n)| s + 1..s + n as u64)
                    .collect();
                targets.sort();
                assert_eq!(targets, (start + 1..start + len).collect::<Vec<_>>());
            }
        }
    }

    /// Each row's document pieces cover it and each holds one document's tokens: no
    /// `<|bos|>` after its first token, one token value besides.
    #[test]
    fn rows_are_cut_at_document_starts() {
        let dir = tempfile::tempdir().unwrap();
        let data = dataset(dir.path());
        let mut batches: Vec<Batch> = eval_batches(&data, 3, 16, 0, 1).collect();
        for mode in [Mode::Sequential, Mode::BestFit] {
            let mut l = Loader::new(data.clone(), config(mode, 4, 0, 1)).unwrap();
            batches.extend((0..20).map(|_| l.next_batch()));
        }
        let mut pieces = 0;
        for b in &batches {
            assert_eq!(b.documents.len(), b.rows);
            for (row, lengths) in b.tokens.chunks(b.cols).zip(&b.documents) {
                assert_eq!(lengths.iter().sum::<usize>(), b.cols);
                let mut rest = row;
                for &n in lengths {
                    let (piece, after) = rest.split_at(n);
                    rest = after;
                    assert!(n > 0 && !piece[1..].contains(&BOS), "{row:?} {lengths:?}");
                    let body: Vec<u32> = piece.iter().copied().filter(|&t| t != BOS).collect();
                    assert!(body.windows(2).all(|w| w[0] == w[1]), "{row:?} {lengths:?}");
                    pieces += 1;
                }
            }
        }
        assert!(pieces > 2 * batches.len(), "rows hold several documents");
    }

    #[test]
    fn refuses_mismatched_state_and_tiny_data() {
        let dir = tempfile::tempdir().unwrap();
        let data = dataset(dir.path());
        let l = Loader::new(data.clone(), config(Mode::Sequential, 2, 0, 1)).unwrap();
        let mut other = Loader::new(data.clone(), config(Mode::BestFit, 2, 0, 1)).unwrap();
        assert!(other.restore(l.state().clone()).is_err());
        let mut long = config(Mode::Sequential, 2, 0, 1);
        long.seq_len = 100_000;
        let e = Loader::new(data, long).err().unwrap().to_string();
        assert!(e.contains("not enough for one row"), "{e}");
    }

    #[test]
    fn eval_batches_cover_every_window_once() {
        let dir = tempfile::tempdir().unwrap();
        let data = dataset(dir.path());
        let windows = (data.total_tokens() - 1) / 16;
        let all: Vec<Batch> = (0..2)
            .flat_map(|r| eval_batches(&data, 3, 16, r, 2).collect::<Vec<_>>())
            .collect();
        assert_eq!(all.iter().map(|b| b.rows as u64).sum::<u64>(), windows);
    }
}
