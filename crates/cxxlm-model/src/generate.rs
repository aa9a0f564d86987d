//! Generation with a KV cache of slots: a prompt runs through the model once (prefill)
//! into its slot, then each step feeds one new token per active slot, each at its own
//! position, attending to what its slot holds. Slots are independent, so prompts of
//! different lengths share a batch and a slot can start a new sequence (or continue
//! a cached prefix) while the others decode: batched generation ([`Gpt::generate`]) and
//! the server's continuous batching drive the same [`Decoder`]. On CUDA a step of each
//! batch shape is captured once as a CUDA graph and replayed for every token
//! (`CXXLM_CUDA_GRAPHS=0` turns that off), and a step's attention reads only each row's
//! filled positions, split over the keys so that a few long rows still fill the GPU
//! ([`cxxlm_cuda::Fused::decode_attention`]; `CXXLM_DECODE_KERNEL=0` reads the cache's
//! whole capacity through a mask instead). Sampling: temperature (0 = greedy), top-k,
//! top-p and a repetition guard (off by default), per row.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

use crate::gpt::{Cached, Read};
use crate::{Gpt, ModelConfig};
use cxxlm_cuda::{CudaGraph, Fused};

/// Keys and values of every layer, `(slots + 1, kv_heads, capacity, head_dim)`; the last
/// row is scratch, written by the padding entries of a captured step's batch.
pub struct KvCache {
    pub(crate) keys: Vec<Tensor>,
    pub(crate) values: Vec<Tensor>,
    /// `0..capacity` on the device, for the masks of decoding steps.
    pub(crate) positions: Tensor,
}

/// The decoding attention kernel of `model`'s device when its cache is bf16 on CUDA (unless
/// `CXXLM_DECODE_KERNEL=0`), once the kernel has matched its definition there at the
/// model's head shapes; None otherwise: attention then reads the cache through a mask.
fn decode_kernel(model: &Gpt) -> Option<Fused> {
    let Device::Cuda(index) = model.device() else {
        return None;
    };
    let c = &model.config;
    let dim = c.head_dim();
    if model.compute != Kind::BFloat16
        || !dim.is_multiple_of(2)
        || dim > cxxlm_cuda::fused::MAX_DECODE_HEAD_DIM
        || std::env::var("CXXLM_DECODE_KERNEL").is_ok_and(|v| v == "0")
    {
        return None;
    }
    /// A device and head shapes (heads, kv heads, dim).
    type Shape = (usize, usize, usize, usize);
    let shape: Shape = (index, c.heads, c.kv_heads, dim);
    static CHECKED: Mutex<Vec<(Shape, bool)>> = Mutex::new(Vec::new());
    let mut checked = CHECKED.lock().unwrap_or_else(|p| p.into_inner());
    let fused = match Fused::for_device(model.device()) {
        Ok(fused) => fused,
        Err(e) => {
            eprintln!("warning: decoding without the attention kernel: {e}");
            return None;
        }
    };
    if let Some((_, ok)) = checked.iter().find(|(s, _)| *s == shape) {
        return ok.then_some(fused);
    }
    let _guard = tch::no_grad_guard();
    let check = cxxlm_cuda::check::decode_attention(
        fused,
        16,
        c.heads as i64,
        c.kv_heads as i64,
        dim as i64,
        600,
        model.device(),
    );
    if !check.ok() {
        eprintln!(
            "warning: decoding without the attention kernel: it disagrees with its definition on this GPU ({}: error {:.2e} > {:.0e})",
            check.name, check.error, check.tolerance
        );
    }
    checked.push((shape, check.ok()));
    check.ok().then_some(fused)
}

/// `values` (slots, rows, positions) as an int64 tensor on `device`.
fn indices(values: impl IntoIterator<Item = usize>, device: Device) -> Tensor {
    let values: Vec<i64> = values.into_iter().map(|v| v as i64).collect();
    Tensor::from_slice(&values).to_device(device)
}

/// Whether decoding steps are replayed as CUDA graphs on `device`.
fn use_graphs(device: Device) -> bool {
    device.is_cuda() && std::env::var("CXXLM_CUDA_GRAPHS").map_or(true, |v| v != "0")
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub temperature: f64,
    /// Keep the `top_k` most likely tokens (0 = all).
    pub top_k: i64,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f64,
    pub max_new_tokens: usize,
    pub seed: u64,
    /// The repetition guard, llama.cpp's `repeat_penalty`: the logits of tokens among
    /// the last [`Sampling::repeat_last_n`] (prompt included) are divided by it when
    /// positive and multiplied when negative, so a model that starts to loop is pushed
    /// off its loop. 1 turns it off (the default; benchmarks keep it off).
    pub repeat_penalty: f64,
    pub repeat_last_n: usize,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 256,
            seed: 0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
        }
    }
}

impl Sampling {
    /// Whether the repetition guard changes anything.
    pub fn guards_repetition(&self) -> bool {
        self.repeat_penalty != 1.0 && self.repeat_last_n > 0
    }
}

/// `logits (B, V)` with row `i`'s tokens among the last `repeat_last_n` of `recent[i]`
/// penalized by `each[i]`'s repetition guard.
fn penalize(logits: &Tensor, each: &[Sampling], recent: &[&[u32]]) -> Tensor {
    let windows: Vec<&[u32]> = each
        .iter()
        .zip(recent)
        .map(|(s, r)| match s.guards_repetition() {
            true => &r[r.len().saturating_sub(s.repeat_last_n)..],
            false => &r[..0],
        })
        .collect();
    let width = windows.iter().map(|w| w.len()).max().unwrap_or(0);
    if width == 0 {
        return logits.shallow_clone();
    }
    // One gather and one scatter for the batch: short windows are padded with their
    // own last token (a repeated index writes the same value), empty ones with token 0
    // at penalty 1.
    let mut ids = Vec::with_capacity(windows.len() * width);
    let mut penalty = Vec::with_capacity(windows.len());
    for (w, s) in windows.iter().zip(each) {
        let pad = w.last().copied().unwrap_or(0);
        ids.extend((0..width).map(|i| *w.get(i).unwrap_or(&pad) as i64));
        penalty.push(if w.is_empty() { 1.0 } else { s.repeat_penalty });
    }
    let device = logits.device();
    let rows = windows.len() as i64;
    let ids = Tensor::from_slice(&ids)
        .view([rows, width as i64])
        .to_device(device);
    let penalty = Tensor::from_slice(&penalty)
        .view([rows, 1])
        .to_device(device)
        .to_kind(logits.kind());
    let seen = logits.gather(1, &ids, false);
    let guarded = (&seen / &penalty).where_self(&seen.gt(0.0), &(&seen * &penalty));
    logits.scatter(1, &ids, &guarded)
}

/// `logits (B, V)` with row `i`'s tokens outside `allowed[i]` ruled out (rows without a
/// set, or past the end of `allowed`, keep every token; with no set at all, `logits`
/// themselves, no mask made).
pub fn allow_only(logits: &Tensor, allowed: &[Option<Vec<u32>>]) -> Tensor {
    if allowed.iter().all(Option::is_none) {
        return logits.shallow_clone();
    }
    let (rows, vocab) = (logits.size()[0] as usize, logits.size()[1] as usize);
    let mut mask = vec![0f32; rows * vocab];
    for (row, set) in allowed.iter().enumerate().take(rows) {
        if let Some(set) = set {
            let line = &mut mask[row * vocab..(row + 1) * vocab];
            line.fill(f32::NEG_INFINITY);
            for &t in set.iter().filter(|&&t| (t as usize) < vocab) {
                line[t as usize] = 0.0;
            }
        }
    }
    let mask = Tensor::from_slice(&mask)
        .view([rows as i64, vocab as i64])
        .to_device(logits.device())
        .to_kind(logits.kind());
    logits + mask
}

/// Below this temperature sampling is greedy: logits a hundredth apart are then e^100
/// apart in probability, and smaller ones would overflow.
const GREEDY_BELOW: f64 = 1e-4;

/// The next token of each row of `logits (B, V)`.
fn choose(logits: &Tensor, s: &Sampling) -> Tensor {
    if s.temperature < GREEDY_BELOW {
        return logits.argmax(-1, false);
    }
    // A strong repetition guard can push logits past the float range: they stay the
    // largest (or smallest) finite ones, so that the probabilities are defined.
    let mut logits = (logits.to_kind(Kind::Float) / s.temperature).nan_to_num(
        None,
        f64::from(f32::MAX),
        f64::from(f32::MIN),
    );
    let vocab = logits.size()[1];
    if s.top_k > 0 && s.top_k < vocab {
        let (kth, _) = logits.topk(s.top_k, -1, true, true);
        let floor = kth.narrow(1, s.top_k - 1, 1);
        logits = logits.masked_fill(&logits.lt_tensor(&floor), f64::NEG_INFINITY);
    }
    if s.top_p < 1.0 {
        let (sorted, order) = logits.sort(-1, true);
        let probs = sorted.softmax(-1, Kind::Float);
        // Drop a token when the tokens before it already reach top_p.
        let before = probs.cumsum(-1, Kind::Float) - &probs;
        let drop_sorted = before.gt(s.top_p.max(0.0));
        let drop = drop_sorted.zeros_like().scatter(-1, &order, &drop_sorted);
        logits = logits.masked_fill(&drop, f64::NEG_INFINITY);
    }
    logits
        .softmax(-1, Kind::Float)
        .multinomial(1, false)
        .squeeze_dim(1)
}

/// The next token of each row of `logits (B, V)`, row `i` sampled by `each[i]`
/// (temperature, top-k, top-p and the repetition guard over `recent[i]`, the row's
/// tokens so far; `recent` may be empty when no row guards repetition).
pub fn sample(logits: &Tensor, each: &[Sampling], recent: &[&[u32]]) -> Vec<u32> {
    let _guard = tch::no_grad_guard();
    let guarded;
    let logits = if recent.len() == each.len() && each.iter().any(Sampling::guards_repetition) {
        guarded = penalize(logits, each, recent);
        &guarded
    } else {
        logits
    };
    let same = |a: &Sampling, b: &Sampling| {
        a.temperature == b.temperature && a.top_k == b.top_k && a.top_p == b.top_p
    };
    let chosen = match each.first() {
        Some(first) if each.iter().all(|s| same(s, first)) => choose(logits, first),
        _ => Tensor::cat(
            &each
                .iter()
                .enumerate()
                .map(|(i, s)| choose(&logits.narrow(0, i as i64, 1), s))
                .collect::<Vec<_>>(),
            0,
        ),
    };
    let host: Vec<i64> = Vec::try_from(&chosen.to_device(Device::Cpu)).expect("token ids");
    host.into_iter().map(|t| t as u32).collect()
}

/// The slots a decoding step advances.
#[derive(Debug, Clone, Copy)]
pub enum Rows<'a> {
    /// Slots `first..first + n`, read in place (batched generation).
    Range(usize, usize),
    /// Any slots, their cache rows gathered for attention (the server's active set).
    List(&'a [usize]),
}

impl Rows<'_> {
    fn len(&self) -> usize {
        match self {
            Rows::Range(_, n) => *n,
            Rows::List(rows) => rows.len(),
        }
    }
}

/// A captured decoding step: its fixed inputs and the logits each replay writes.
struct Captured {
    graph: CudaGraph,
    ids: Tensor,
    rows: Tensor,
    pos: Tensor,
    logits: Tensor,
}

/// A KV cache of `slots` sequences of up to `capacity` tokens, and the decoding steps
/// captured for it. Tensors it returns are valid until its next call.
pub struct Decoder {
    weights: Vec<Tensor>,
    cache: KvCache,
    slots: usize,
    capacity: usize,
    graphs: bool,
    kernel: Option<Fused>,
    /// Step shapes run once eagerly (the second run of a shape is captured).
    warm: HashSet<(usize, Read)>,
    captured: HashMap<(usize, Read), Captured>,
}

impl Decoder {
    /// The bytes a decoder of `config`'s model holds, made with `slots` and `capacity` as
    /// [`Gpt::decoder`] takes them, computing in `compute`: a copy of the weights, and the
    /// keys and values of every layer for the slots and a spare row.
    pub fn bytes(config: &ModelConfig, slots: usize, capacity: usize, compute: Kind) -> u64 {
        let c = config;
        let cache =
            2 * c.depth * (slots + 1) * c.kv_heads * capacity.clamp(1, c.seq_len) * c.head_dim();
        ((c.params() + cache) * compute.elt_size_in_bytes()) as u64
    }
}

impl Gpt {
    /// A decoder of `slots` sequences of up to `capacity` tokens (at most the context).
    pub fn decoder(&self, slots: usize, capacity: usize) -> Decoder {
        let c = &self.config;
        let capacity = capacity.clamp(1, c.seq_len);
        let shape = [
            slots as i64 + 1,
            c.kv_heads as i64,
            capacity as i64,
            c.head_dim() as i64,
        ];
        let make = || {
            (0..c.depth)
                .map(|_| Tensor::zeros(shape, (self.compute, self.device())))
                .collect()
        };
        Decoder {
            weights: self.compute_weights(),
            cache: KvCache {
                keys: make(),
                values: make(),
                positions: Tensor::arange(capacity as i64, (Kind::Int64, self.device())),
            },
            slots,
            capacity,
            graphs: use_graphs(self.device()),
            kernel: decode_kernel(self),
            warm: HashSet::new(),
            captured: HashMap::new(),
        }
    }

    /// Continues each prompt by up to `max_new_tokens`, each row as it would alone, in
    /// one [`Decoder`] of a slot per prompt ([`Gpt::generate_healed`]).
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        sampling: &Sampling,
        stop: &mut dyn FnMut(usize, &[u32]) -> bool,
    ) -> Vec<Vec<u32>> {
        self.generate_healed(prompts, &[], sampling, 0, stop)
    }

    /// Continues each prompt by up to `max_new_tokens` (fewer where the context ends),
    /// each row as it would alone, in the `slots` slots of one [`Decoder`] (0: one per
    /// prompt). A row stops when `stop(row, generated so far)` says so; each step
    /// advances only the rows still going, and waiting prompts take the slots of the
    /// stopped ones, so a batch does not run at the pace of its longest row. The first
    /// token of row `i` is one of `first[i]` where that is given (token healing: the
    /// prompt's last token was taken off, and what follows must begin with it); `first`
    /// may be empty. Prompts longer than the model's context keep their last tokens.
    pub fn generate_healed(
        &self,
        prompts: &[Vec<u32>],
        first: &[Option<Vec<u32>>],
        sampling: &Sampling,
        slots: usize,
        stop: &mut dyn FnMut(usize, &[u32]) -> bool,
    ) -> Vec<Vec<u32>> {
        let slots = if slots == 0 { prompts.len() } else { slots };
        let mut decoder = None;
        self.generate_reusing(&mut decoder, prompts, first, sampling, slots, stop)
    }

    /// [`Gpt::generate_healed`] in `decoder`, kept between calls: the one given where it
    /// has the slots and the room (its weights brought up to the model's, its captured
    /// steps kept), else a new one of at least its capacity. A caller that generates
    /// batch after batch (RL) so captures its decoding steps once.
    pub fn generate_reusing(
        &self,
        decoder: &mut Option<Decoder>,
        prompts: &[Vec<u32>],
        first: &[Option<Vec<u32>>],
        sampling: &Sampling,
        slots: usize,
        stop: &mut dyn FnMut(usize, &[u32]) -> bool,
    ) -> Vec<Vec<u32>> {
        let _guard = tch::no_grad_guard();
        tch::manual_seed(sampling.seed as i64);
        let n = prompts.len();
        if n == 0 || sampling.max_new_tokens == 0 {
            return vec![Vec::new(); n];
        }
        let context = self.config.seq_len;
        let trimmed: Vec<&[u32]> = prompts
            .iter()
            .map(|p| {
                let p: &[u32] = if p.is_empty() { &[0] } else { p };
                &p[p.len().saturating_sub(context.saturating_sub(1).max(1))..]
            })
            .collect();
        let budget = |row: usize| sampling.max_new_tokens.min(context - trimmed[row].len());
        let capacity = (0..n)
            .map(|r| trimmed[r].len() + budget(r))
            .max()
            .unwrap_or(1);
        let slots = slots.clamp(1, n);
        let decoder = match decoder.take() {
            Some(mut d) if d.slots >= slots && d.capacity >= capacity => {
                d.refresh_weights(self);
                decoder.insert(d)
            }
            old => {
                let capacity = old.map_or(capacity, |d| d.capacity.max(capacity));
                decoder.insert(self.decoder(slots, capacity))
            }
        };
        // Waiting prompts are prefilled together: all that fit at the start, then once
        // an eighth of the slots are free (or the last ones are).
        let batch_admission = slots.div_ceil(8);
        let each = vec![sampling.clone(); slots];
        let guard = sampling.guards_repetition();
        // The tokens the repetition guard looks back on: the prompt's, then the row's.
        let mut recent: Vec<Vec<u32>> = match guard {
            true => trimmed.iter().map(|p| p.to_vec()).collect(),
            false => Vec::new(),
        };
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); n];
        let mut free: Vec<usize> = (0..slots).rev().collect();
        let mut waiting = 0..n;
        // The rows being decoded, and the logits `(live, V)` of their next tokens.
        let mut live: Vec<Live> = Vec::with_capacity(slots);
        let mut logits: Option<Tensor> = None;
        loop {
            let left = waiting.len();
            if left > 0 && (free.len() >= batch_admission.min(left) || live.is_empty()) {
                let rows: Vec<usize> = waiting.by_ref().take(free.len()).collect();
                let at: Vec<usize> = (0..rows.len()).map(|_| free.pop().unwrap()).collect();
                let texts: Vec<&[u32]> = rows.iter().map(|&r| trimmed[r]).collect();
                let healed: Vec<Option<Vec<u32>>> = rows
                    .iter()
                    .map(|&r| first.get(r).cloned().flatten())
                    .collect();
                let new = allow_only(&decoder.prefill(self, &at, 0, &texts), &healed);
                logits = Some(match logits.take() {
                    Some(old) => Tensor::cat(&[old, new], 0),
                    None => new,
                });
                live.extend(rows.iter().zip(&at).map(|(&row, &slot)| Live {
                    row,
                    slot,
                    position: trimmed[row].len(),
                }));
            }
            let Some(current) = logits.take() else {
                break;
            };
            let views: Vec<&[u32]> = match guard {
                true => live.iter().map(|l| recent[l.row].as_slice()).collect(),
                false => Vec::new(),
            };
            let next = sample(&current, &each[..live.len()], &views);
            let mut going = Vec::with_capacity(live.len());
            let mut tokens = Vec::with_capacity(live.len());
            for (l, t) in live.drain(..).zip(next) {
                if guard {
                    recent[l.row].push(t);
                }
                let row = &mut out[l.row];
                row.push(t);
                if stop(l.row, row) || row.len() >= budget(l.row) {
                    free.push(l.slot);
                } else {
                    going.push(l);
                    tokens.push(t);
                }
            }
            live = going;
            if live.is_empty() {
                continue;
            }
            let at: Vec<usize> = live.iter().map(|l| l.slot).collect();
            let positions: Vec<usize> = live.iter().map(|l| l.position).collect();
            logits = Some(decoder.step_some(self, &at, &tokens, &positions));
            for l in &mut live {
                l.position += 1;
            }
        }
        out
    }
}

/// A row of [`Gpt::generate_healed`] being decoded: its slot, and the position its
/// next token is fed at.
struct Live {
    row: usize,
    slot: usize,
    position: usize,
}

impl Decoder {
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Tokens a slot holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Brings the weights the decoder reads up to `model`'s, in place: its captured steps
    /// read them where they are.
    fn refresh_weights(&mut self, model: &Gpt) {
        let _guard = tch::no_grad_guard();
        for (mine, now) in self.weights.iter_mut().zip(model.compute_weights()) {
            if mine.data_ptr() != now.data_ptr() {
                mine.copy_(&now);
            }
        }
    }

    /// On CUDA, captures the decoding step of every batch size a server's set of active
    /// slots can take ([`Rows::List`]), so that no request waits for a capture. The
    /// slots' position 0 is written with a placeholder, which their first prompt writes
    /// over. Elsewhere nothing is captured, and this does nothing.
    pub fn capture_steps(&mut self, model: &Gpt) {
        let mut n = 1;
        while self.graphs {
            let rows: Vec<usize> = (0..n.min(self.slots)).collect();
            let (tokens, positions) = (vec![0; rows.len()], vec![0; rows.len()]);
            // The first run of a shape is eager, the second captured.
            for _ in 0..2 {
                let _ = self.step(model, Rows::List(&rows), &tokens, &positions);
            }
            if n >= self.slots {
                break;
            }
            n *= 2;
        }
    }

    /// [`Decoder::step`] of the slots `slots` (any, in any order) of the `self.slots`.
    /// Where a step would gather copies of their cache rows (without the decoding
    /// attention kernel), every slot is stepped in place instead, the others on a
    /// placeholder at position 0 (a prompt taking such a slot writes over it), and the
    /// logits of `slots` are kept.
    fn step_some(
        &mut self,
        model: &Gpt,
        slots: &[usize],
        tokens: &[u32],
        positions: &[usize],
    ) -> Tensor {
        let all = Rows::Range(0, self.slots);
        if slots.iter().copied().eq(0..self.slots) {
            return self.step(model, all, tokens, positions);
        }
        if self.kernel.is_some() {
            return self.step(model, Rows::List(slots), tokens, positions);
        }
        let (mut every_token, mut every_position) = (vec![0; self.slots], vec![0; self.slots]);
        for ((&slot, &t), &p) in slots.iter().zip(tokens).zip(positions) {
            every_token[slot] = t;
            every_position[slot] = p;
        }
        let logits = self.step(model, all, &every_token, &every_position);
        logits.index_select(0, &indices(slots.iter().copied(), logits.device()))
    }

    /// Stores `prompts[i]` in slot `slots[i]` from position `from` on (the slots' first
    /// `from` positions are kept as they are) and returns the logits `(n, V)` after
    /// each prompt's last token. Prompts must be non-empty and end within the capacity.
    /// A prompt given several times from position 0 (samples of one prompt) runs through
    /// the model once, and its keys and values are copied to the other slots.
    pub fn prefill(
        &mut self,
        model: &Gpt,
        slots: &[usize],
        from: usize,
        prompts: &[&[u32]],
    ) -> Tensor {
        let _guard = tch::no_grad_guard();
        let n = prompts.len();
        let t = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        assert!(
            n > 0
                && slots.len() == n
                && slots.iter().all(|&s| s < self.slots)
                && prompts.iter().all(|p| !p.is_empty())
                && from + t <= self.capacity,
            "prefill of {n} prompts of up to {t} tokens from {from} into slots {slots:?} of {} x {}",
            self.slots,
            self.capacity
        );
        let mut seen: HashMap<&[u32], usize> = HashMap::new();
        let first_of: Vec<usize> = (0..n)
            .map(|i| *seen.entry(prompts[i]).or_insert(i))
            .collect();
        if from == 0 && first_of.iter().enumerate().any(|(i, &f)| f != i) {
            return self.prefill_once_each(model, slots, prompts, &first_of);
        }
        let mut ids: Vec<i64> = Vec::with_capacity(n * t);
        for p in prompts {
            ids.extend(p.iter().map(|&x| x as i64));
            ids.extend(std::iter::repeat_n(0, t - p.len()));
        }
        let device = model.device();
        let idx = Tensor::from_slice(&ids)
            .view([n as i64, t as i64])
            .to_device(device);
        let in_order = slots.windows(2).all(|w| w[1] == w[0] + 1);
        let read = match in_order {
            true => Read::Range(slots[0] as i64),
            false => Read::Gather,
        };
        let rows = indices(slots.iter().copied(), device);
        let cached = Cached::Fill {
            cache: &self.cache,
            rows: &rows,
            read,
            from: from as i64,
        };
        let h = model.forward(&self.weights, &idx, cached);
        let last = indices(
            prompts.iter().enumerate().map(|(i, p)| i * t + p.len() - 1),
            device,
        );
        let h = h.view([(n * t) as i64, -1]).index_select(0, &last);
        model.logits(&h, self.weights.last().expect("lm_head"))
    }

    /// [`Decoder::prefill`] from position 0 of the prompts `i` with `first_of[i] == i`,
    /// the others (`prompts[i] == prompts[first_of[i]]`) copied from their slots.
    fn prefill_once_each(
        &mut self,
        model: &Gpt,
        slots: &[usize],
        prompts: &[&[u32]],
        first_of: &[usize],
    ) -> Tensor {
        let unique: Vec<usize> = (0..prompts.len()).filter(|&i| first_of[i] == i).collect();
        let logits = self.prefill(
            model,
            &unique.iter().map(|&i| slots[i]).collect::<Vec<_>>(),
            0,
            &unique.iter().map(|&i| prompts[i]).collect::<Vec<_>>(),
        );
        let copies: Vec<usize> = (0..prompts.len()).filter(|&i| first_of[i] != i).collect();
        let device = model.device();
        let to = indices(copies.iter().map(|&i| slots[i]), device);
        let from = indices(copies.iter().map(|&i| slots[first_of[i]]), device);
        let t = copies.iter().map(|&i| prompts[i].len()).max().unwrap_or(0) as i64;
        for all in self.cache.keys.iter().chain(&self.cache.values) {
            let mut filled = all.narrow(2, 0, t);
            let _ = filled.index_copy_(0, &to, &filled.index_select(0, &from));
        }
        let row_of = indices(
            first_of.iter().map(|f| {
                unique
                    .iter()
                    .position(|u| u == f)
                    .expect("a first is unique")
            }),
            device,
        );
        logits.index_select(0, &row_of)
    }

    /// Feeds `tokens[i]` to slot `rows[i]` at position `positions[i]` (the slot holds
    /// the positions before it) and returns the logits `(n, V)` after them.
    pub fn step(&mut self, model: &Gpt, rows: Rows, tokens: &[u32], positions: &[usize]) -> Tensor {
        let _guard = tch::no_grad_guard();
        let n = rows.len();
        assert!(tokens.len() == n && positions.len() == n && n > 0);
        assert!(
            positions.iter().all(|&p| p < self.capacity),
            "a step past the capacity"
        );
        let slot_of: Vec<i64> = match rows {
            Rows::Range(first, n) => (first..first + n).map(|r| r as i64).collect(),
            Rows::List(list) => list.iter().map(|&r| r as i64).collect(),
        };
        assert!(slot_of.iter().all(|&r| (r as usize) < self.slots));
        let device = model.device();
        if !self.graphs {
            let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
            let pos: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
            let read = match rows {
                Rows::Range(first, _) => Read::Range(first as i64),
                Rows::List(_) => Read::Gather,
            };
            // Attention reads the filled part of the cache only.
            let span = positions.iter().max().map_or(1, |&p| p + 1) as i64;
            return self.run_step(model, &ids, &slot_of, &pos, read, span, device);
        }
        // A captured step has fixed shapes: a gathered batch is padded to a power of two
        // with entries that write to the scratch row.
        let (bucket, read) = match rows {
            Rows::Range(first, n) => (n, Read::Range(first as i64)),
            Rows::List(list) => (list.len().next_power_of_two(), Read::Gather),
        };
        let pad = bucket - n;
        let ids: Vec<i64> = tokens
            .iter()
            .map(|&t| t as i64)
            .chain(std::iter::repeat_n(0, pad))
            .collect();
        let pos: Vec<i64> = positions
            .iter()
            .map(|&p| p as i64)
            .chain(std::iter::repeat_n(0, pad))
            .collect();
        let slot_of: Vec<i64> = slot_of
            .into_iter()
            .chain(std::iter::repeat_n(self.slots as i64, pad))
            .collect();
        let key = (bucket, read);
        if !self.captured.contains_key(&key) && self.warm.insert(key) {
            let span = self.capacity as i64;
            let logits = self.run_step(model, &ids, &slot_of, &pos, read, span, device);
            return logits.narrow(0, 0, n as i64);
        }
        if !self.captured.contains_key(&key) {
            let Device::Cuda(index) = device else {
                unreachable!("graphs are used on CUDA only")
            };
            let b = bucket as i64;
            let ids_t = Tensor::zeros([b, 1], (Kind::Int64, device));
            let rows_t = Tensor::zeros([b], (Kind::Int64, device));
            let pos_t = Tensor::zeros([b], (Kind::Int64, device));
            let span = self.capacity as i64;
            let captured = CudaGraph::capture(index, || {
                let cached = Cached::Step {
                    cache: &self.cache,
                    rows: &rows_t,
                    read,
                    pos: &pos_t,
                    span,
                    kernel: self.kernel,
                };
                let h = model.forward(&self.weights, &ids_t, cached);
                model.logits(&h.select(1, 0), self.weights.last().expect("lm_head"))
            });
            match captured {
                Ok((graph, logits)) => {
                    let c = Captured {
                        graph,
                        ids: ids_t,
                        rows: rows_t,
                        pos: pos_t,
                        logits,
                    };
                    self.captured.insert(key, c);
                }
                Err(e) => {
                    eprintln!("warning: decoding without CUDA graphs: {e}");
                    self.graphs = false;
                    let span = self.capacity as i64;
                    let logits = self.run_step(model, &ids, &slot_of, &pos, read, span, device);
                    return logits.narrow(0, 0, n as i64);
                }
            }
        }
        let c = &self.captured[&key];
        c.ids
            .shallow_clone()
            .copy_(&Tensor::from_slice(&ids).view([bucket as i64, 1]));
        c.rows.shallow_clone().copy_(&Tensor::from_slice(&slot_of));
        c.pos.shallow_clone().copy_(&Tensor::from_slice(&pos));
        if let Err(e) = c.graph.replay() {
            panic!("replaying the decoding step: {e}");
        }
        c.logits.narrow(0, 0, n as i64)
    }

    #[allow(clippy::too_many_arguments)]
    fn run_step(
        &self,
        model: &Gpt,
        ids: &[i64],
        rows: &[i64],
        pos: &[i64],
        read: Read,
        span: i64,
        device: Device,
    ) -> Tensor {
        let to = |v: &[i64]| Tensor::from_slice(v).to_device(device);
        let (ids_t, rows_t, pos_t) = (to(ids).view([ids.len() as i64, 1]), to(rows), to(pos));
        let cached = Cached::Step {
            cache: &self.cache,
            rows: &rows_t,
            read,
            pos: &pos_t,
            span,
            kernel: self.kernel,
        };
        let h = model.forward(&self.weights, &ids_t, cached);
        model.logits(&h.select(1, 0), self.weights.last().expect("lm_head"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Gpt {
        let config = ModelConfig {
            seq_len: 32,
            ..ModelConfig::preset("tiny", 100).unwrap()
        };
        let mut m = Gpt::new(config, Device::Cpu, 3).unwrap();
        let randomized: Vec<(String, Tensor)> = m
            .params()
            .iter()
            .map(|(n, p)| (n.clone(), p.randn_like() * 0.2))
            .collect();
        m.load(&randomized).unwrap();
        m
    }

    #[test]
    fn a_decoder_holds_the_bytes_it_is_said_to() {
        let m = model();
        for (slots, capacity) in [(1, 8), (5, 32), (3, 1000)] {
            let d = m.decoder(slots, capacity);
            let tensors = d.weights.iter().chain(&d.cache.keys).chain(&d.cache.values);
            let held: usize = tensors
                .map(|t| t.numel() * t.kind().elt_size_in_bytes())
                .sum();
            let said = Decoder::bytes(&m.config, slots, capacity, m.compute_kind());
            assert_eq!(held as u64, said, "{slots} slots of {capacity}");
        }
    }

    #[test]
    fn cached_greedy_decoding_matches_recomputing_the_whole_context() {
        let _rng = crate::TORCH_RNG.lock();
        let m = model();
        let prompt: Vec<u32> = vec![5, 17, 3, 99, 42];
        let got = m.generate(
            &[prompt.clone(), prompt.clone()],
            &Sampling {
                max_new_tokens: 10,
                ..Default::default()
            },
            &mut |_, _| false,
        );
        let mut seq: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
        for _ in 0..10 {
            let h = m.hidden(&Tensor::from_slice(&seq).unsqueeze(0));
            let last = h.select(1, seq.len() as i64 - 1);
            let logits = m.logits(&last, m.compute_weights().last().unwrap());
            seq.push(logits.argmax(-1, false).int64_value(&[0]));
        }
        let want: Vec<u32> = seq[5..].iter().map(|&t| t as u32).collect();
        assert_eq!(got, vec![want.clone(), want]);
    }

    #[test]
    fn prompts_of_different_lengths_continue_as_they_would_alone() {
        let _rng = crate::TORCH_RNG.lock();
        let m = model();
        let prompts: Vec<Vec<u32>> = vec![vec![5, 17], vec![3, 99, 42, 7, 7, 1], vec![8, 8, 8]];
        let greedy = Sampling {
            max_new_tokens: 8,
            ..Default::default()
        };
        let together = m.generate(&prompts, &greedy, &mut |_, _| false);
        for (p, got) in prompts.iter().zip(&together) {
            let alone = m.generate(std::slice::from_ref(p), &greedy, &mut |_, _| false);
            assert_eq!(got, &alone[0], "prompt {p:?}");
        }
    }

    #[test]
    fn a_kept_decoder_samples_as_a_new_one_after_the_weights_change() {
        let _rng = crate::TORCH_RNG.lock();
        let sampling = Sampling {
            max_new_tokens: 6,
            temperature: 0.9,
            seed: 11,
            ..Default::default()
        };
        let go = &mut |_: usize, _: &[u32]| false;
        let batches: [Vec<Vec<u32>>; 3] = [
            vec![vec![5, 17, 3], vec![9, 9], vec![4]],
            // Fewer prompts: the kept decoder, two of its slots used.
            vec![vec![1, 2, 3], vec![7]],
            // Longer than it holds: a new decoder, with room for it.
            vec![vec![8; 20], vec![6, 5]],
        ];
        // In bf16 the decoder reads copies of the weights, in fp32 the weights themselves.
        for compute in [Kind::BFloat16, Kind::Float] {
            let mut m = model();
            m.compute = compute;
            let mut kept = None;
            for (k, prompts) in batches.iter().enumerate() {
                let got = m.generate_reusing(&mut kept, prompts, &[], &sampling, prompts.len(), go);
                let want = m.generate(prompts, &sampling, go);
                assert_eq!(got, want, "{compute:?}, batch {k}");
                let capacity = kept.as_ref().map(Decoder::capacity);
                assert_eq!(capacity, Some(if k < 2 { 9 } else { 26 }), "batch {k}");
                // The model learns between batches (its weights change in place).
                let moved: Vec<(String, Tensor)> = m
                    .params()
                    .iter()
                    .map(|(n, p)| (n.clone(), p * 1.5 + 0.05))
                    .collect();
                m.load(&moved).unwrap();
            }
        }
    }

    /// Greedy continuations of `prompt` by `n` tokens, alone.
    fn alone(m: &Gpt, prompt: &[u32], n: usize) -> Vec<u32> {
        let greedy = Sampling {
            max_new_tokens: n,
            ..Default::default()
        };
        m.generate(&[prompt.to_vec()], &greedy, &mut |_, _| false)
            .remove(0)
    }

    #[test]
    fn waiting_prompts_take_the_slots_of_stopped_rows_and_continue_as_alone() {
        let _rng = crate::TORCH_RNG.lock();
        let m = model();
        let prompts: Vec<Vec<u32>> = (0..7u32)
            .map(|i| (0..2 + i % 4).map(|j| (i * 13 + j * 7) % 100).collect())
            .collect();
        // Rows 0 and 2 stop together, so two prompts are prefilled at once into slots
        // out of order, and the steps after read slots out of order.
        let lengths = [3, 6, 3, 5, 2, 4, 7];
        let greedy = Sampling {
            max_new_tokens: 8,
            ..Default::default()
        };
        let mut calls = 0;
        let got = m.generate_healed(&prompts, &[], &greedy, 4, &mut |row, t| {
            calls += 1;
            t.len() == lengths[row]
        });
        for (row, p) in prompts.iter().enumerate() {
            assert_eq!(got[row], alone(&m, p, lengths[row]), "row {row}");
        }
        // Rows are asked about once per token they write, none after they stopped.
        assert_eq!(calls, lengths.iter().sum::<usize>());
    }

    #[test]
    fn samples_of_one_prompt_share_its_prefill_and_continue_as_alone() {
        let _rng = crate::TORCH_RNG.lock();
        let m = model();
        let (a, b): (Vec<u32>, Vec<u32>) = (vec![5, 17, 3, 99], vec![8, 1, 2]);
        let mut d = m.decoder(5, 32);
        let prompts: [&[u32]; 5] = [&a, &b, &a, &a, &b];
        let slots = [3, 0, 4, 1, 2];
        let shared = d.prefill(&m, &slots, 0, &prompts);
        let mut each = m.decoder(5, 32);
        let alone: Vec<Tensor> = (0..5)
            .map(|i| each.prefill(&m, &[slots[i]], 0, &[prompts[i]]))
            .collect();
        let difference = (shared - Tensor::cat(&alone, 0))
            .abs()
            .max()
            .double_value(&[]);
        assert!(difference < 1e-5, "{difference}");
        // The copied slots decode as the computed ones do.
        let greedy = Sampling {
            max_new_tokens: 6,
            ..Default::default()
        };
        let got = m.generate(&prompts.map(<[u32]>::to_vec), &greedy, &mut |_, _| false);
        for (p, g) in prompts.iter().zip(&got) {
            assert_eq!(g, &self::alone(&m, p, 6));
        }
    }

    #[test]
    fn slots_join_leave_and_reuse_a_cached_prefix_as_if_alone() {
        let _rng = crate::TORCH_RNG.lock();
        let m = model();
        let greedy = [Sampling::default()];
        let mut d = m.decoder(4, 32);
        let (a, b): (Vec<u32>, Vec<u32>) = (vec![5, 17, 3, 99], vec![8, 1, 2, 3, 4, 5, 6]);
        // Slot 2 decodes `a` alone for three tokens, then slot 0 joins with `b`.
        let mut got_a = sample(&d.prefill(&m, &[2], 0, &[&a]), &greedy, &[]);
        for i in 0..3 {
            let last = *got_a.last().unwrap();
            let next = d.step(&m, Rows::List(&[2]), &[last], &[a.len() + i]);
            got_a.extend(sample(&next, &greedy, &[]));
        }
        let mut got_b = sample(&d.prefill(&m, &[0], 0, &[&b]), &greedy, &[]);
        for i in 3..7 {
            let tokens = [*got_a.last().unwrap(), *got_b.last().unwrap()];
            let pos = [a.len() + i, b.len() + i - 3];
            let next = sample(
                &d.step(&m, Rows::List(&[2, 0]), &tokens, &pos),
                &[Sampling::default(), Sampling::default()],
                &[],
            );
            got_a.push(next[0]);
            got_b.push(next[1]);
        }
        assert_eq!(got_a, alone(&m, &a, 8));
        assert_eq!(got_b, alone(&m, &b, 5));
        // Slot 2 holds `a` and what followed; a prompt sharing `a` continues from there.
        let c: Vec<u32> = a.iter().copied().chain([42, 42]).collect();
        let reused = d.prefill(&m, &[2], a.len(), &[&c[a.len()..]]);
        let fresh = m.decoder(1, 32).prefill(&m, &[0], 0, &[&c]);
        assert!((reused - fresh).abs().max().double_value(&[]) < 1e-4);
    }

    #[test]
    fn a_healed_row_starts_with_an_allowed_token_and_the_others_are_free() {
        let _rng = crate::TORCH_RNG.lock();
        let m = model();
        let prompts = vec![vec![5, 17, 3], vec![5, 17, 3], vec![8, 1]];
        let s = Sampling {
            temperature: 1.0,
            max_new_tokens: 4,
            seed: 3,
            ..Default::default()
        };
        let free = m.generate(&prompts, &s, &mut |_, _| false);
        let unlikely: Vec<u32> = (0..m.config.vocab_size as u32)
            .filter(|&t| t != free[0][0] && t != free[1][0])
            .take(2)
            .collect();
        let first = [Some(unlikely.clone()), Some(vec![unlikely[1]])];
        let healed = m.generate_healed(&prompts, &first, &s, 0, &mut |_, _| false);
        assert!(unlikely.contains(&healed[0][0]));
        assert_eq!(healed[1][0], unlikely[1]);
        // The row without a set, and every step after the first, sample as before.
        assert_eq!(healed[2], free[2]);
        assert_eq!(healed[1].len(), 4);
    }

    #[test]
    fn sampling_respects_top_k_top_p_and_stops() {
        let _rng = crate::TORCH_RNG.lock();
        let m = model();
        let prompts = vec![vec![1, 2, 3]; 8];
        let sampled = |top_k, top_p| {
            m.generate(
                &prompts,
                &Sampling {
                    temperature: 1.0,
                    top_k,
                    top_p,
                    max_new_tokens: 12,
                    seed: 7,
                    ..Default::default()
                },
                &mut |_, _| false,
            )
        };
        let greedy = m.generate(
            &prompts[..1],
            &Sampling {
                max_new_tokens: 12,
                ..Default::default()
            },
            &mut |_, _| false,
        );
        // top-k 1 and a tiny top-p both leave only the most likely token.
        assert!(sampled(1, 1.0).iter().all(|r| *r == greedy[0]));
        assert!(sampled(0, 1e-6).iter().all(|r| *r == greedy[0]));
        let free = sampled(0, 1.0);
        assert!(
            free.iter().any(|r| *r != greedy[0]),
            "sampling at temperature 1 varies"
        );
        assert_eq!(sampled(0, 1.0), free, "the seed fixes the samples");
        let stopped = m.generate(
            &prompts[..2],
            &Sampling {
                max_new_tokens: 12,
                ..Default::default()
            },
            &mut |row, so_far| row == 0 && so_far.len() == 3,
        );
        assert_eq!((stopped[0].len(), stopped[1].len()), (3, 12));
    }

    #[test]
    fn any_settings_give_a_token() {
        let logits = Tensor::from_slice(&[3.0f32, -1.0, 0.5, 1.0, 2.0, -2.0]).view([2, 3]);
        // A temperature near 0 is greedy.
        let tiny = Sampling {
            temperature: 1e-300,
            ..Default::default()
        };
        assert_eq!(sample(&logits, &[tiny.clone(), tiny], &[]), [0, 1]);
        // A guard of 1e-30 pushes logits past the float range; top-p at or below 0 keeps
        // the likeliest token; settings with no meaning still give some token.
        let recent: [&[u32]; 2] = [&[1, 2], &[0]];
        let _rng = crate::TORCH_RNG.lock();
        for (temperature, top_p, repeat_penalty) in [
            (0.7, 0.9, 1e-30),
            (0.7, -0.5, 1.0),
            (0.7, 0.0, 0.0),
            (f64::NAN, f64::NAN, f64::NAN),
            (f64::INFINITY, 1.0, -1.0),
        ] {
            let s = Sampling {
                temperature,
                top_p,
                repeat_penalty,
                ..Default::default()
            };
            let got = sample(&logits, &[s.clone(), s], &recent);
            assert!(
                got.iter().all(|&t| t < 3),
                "{temperature} {top_p} {repeat_penalty}: {got:?}"
            );
        }
    }

    #[test]
    fn the_repetition_guard_divides_positive_and_multiplies_negative_logits() {
        let row = [2.0f32, -1.0, 0.5, 1.0];
        let logits = Tensor::from_slice(&[row, row, row].concat()).view([3, 4]);
        let guard = Sampling {
            repeat_penalty: 2.0,
            ..Default::default()
        };
        let each = [guard.clone(), Sampling::default(), guard];
        let recent: [&[u32]; 3] = [&[0, 1, 0], &[0, 1], &[]];
        let got: Vec<f32> = Vec::try_from(penalize(&logits, &each, &recent).view([-1])).unwrap();
        assert_eq!(got[..4], [1.0, -2.0, 0.5, 1.0]);
        assert_eq!(
            got[4..],
            [row, row].concat()[..],
            "off, or nothing seen yet"
        );
    }

    #[test]
    fn the_repetition_guard_pushes_greedy_decoding_off_its_loop() {
        let _rng = crate::TORCH_RNG.lock();
        let m = model();
        let prompt = vec![vec![1, 2, 3]];
        let run = |repeat_penalty| {
            let s = Sampling {
                max_new_tokens: 24,
                repeat_penalty,
                repeat_last_n: 8,
                ..Default::default()
            };
            m.generate(&prompt, &s, &mut |_, _| false).remove(0)
        };
        let repeats = |v: &[u32]| {
            (1..v.len())
                .filter(|&i| v[i.saturating_sub(8)..i].contains(&v[i]))
                .count()
        };
        let plain = run(1.0);
        assert!(
            repeats(&plain) > 4,
            "a random model loops when greedy: {plain:?}"
        );
        let guarded = run(1e4);
        assert!(
            repeats(&guarded) < repeats(&plain) / 2,
            "{plain:?} -> {guarded:?}"
        );
        assert_eq!(run(1.0), plain, "off is plain greedy decoding");
    }
}
