//! Batched generation with a KV cache: the prompts run through the model once (prefill),
//! then each step feeds one new token per sequence and attends to the cached keys and
//! values. On CUDA the step is captured once as a CUDA graph and replayed for every
//! token (`CXXLM_CUDA_GRAPHS=0` turns that off). Sampling: temperature (0 = greedy),
//! top-k, top-p, a per-sequence stop test.

use tch::{Device, Kind, Tensor};

use crate::gpt::Cached;
use crate::Gpt;
use cxxlm_cuda::CudaGraph;

/// Keys and values of every layer, `(B, kv_heads, capacity, head_dim)`, filled up to `len`.
pub struct KvCache {
    pub(crate) keys: Vec<Tensor>,
    pub(crate) values: Vec<Tensor>,
    pub(crate) len: i64,
    /// `(B, capacity)`: false at the left padding of shorter prompts; None when there is none.
    pub(crate) attend: Option<Tensor>,
    /// `0..capacity` on the device, for the masks of decoding steps.
    pub(crate) positions: Tensor,
}

/// Whether decoding steps are replayed as CUDA graphs on `device`.
fn use_graphs(device: Device) -> bool {
    device.is_cuda() && std::env::var("CXXLM_CUDA_GRAPHS").map_or(true, |v| v != "0")
}

#[derive(Debug, Clone)]
pub struct Sampling {
    pub temperature: f64,
    /// Keep the `top_k` most likely tokens (0 = all).
    pub top_k: i64,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f64,
    pub max_new_tokens: usize,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 256,
            seed: 0,
        }
    }
}

/// The next token of each row of `logits (B, V)`.
fn choose(logits: &Tensor, s: &Sampling) -> Tensor {
    if s.temperature <= 0.0 {
        return logits.argmax(-1, false);
    }
    let mut logits = logits / s.temperature;
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
        let drop_sorted = before.gt(s.top_p);
        let drop = drop_sorted.zeros_like().scatter(-1, &order, &drop_sorted);
        logits = logits.masked_fill(&drop, f64::NEG_INFINITY);
    }
    logits
        .softmax(-1, Kind::Float)
        .multinomial(1, false)
        .squeeze_dim(1)
}

impl Gpt {
    pub fn new_cache(&self, batch: usize, capacity: usize) -> KvCache {
        let c = &self.config;
        let shape = [
            batch as i64,
            c.kv_heads as i64,
            capacity as i64,
            c.head_dim() as i64,
        ];
        let kind = if self.device().is_cuda() {
            Kind::BFloat16
        } else {
            Kind::Float
        };
        let make = || {
            (0..c.depth)
                .map(|_| Tensor::zeros(shape, (kind, self.device())))
                .collect()
        };
        KvCache {
            keys: make(),
            values: make(),
            len: 0,
            attend: None,
            positions: Tensor::arange(capacity as i64, (Kind::Int64, self.device())),
        }
    }

    /// Continues each prompt by up to `max_new_tokens`. Shorter prompts are padded on the
    /// left and the padding masked, so each row continues as it would alone. A row stops
    /// when `stop(row, generated so far)` says so; generation ends when every row has
    /// stopped. Prompts longer than the model's context keep their last tokens.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        sampling: &Sampling,
        stop: &mut dyn FnMut(usize, &[u32]) -> bool,
    ) -> Vec<Vec<u32>> {
        let _guard = tch::no_grad_guard();
        tch::manual_seed(sampling.seed as i64);
        let batch = prompts.len();
        let context = self.config.seq_len;
        let lens: Vec<usize> = prompts
            .iter()
            .map(|p| p.len().clamp(1, context.saturating_sub(1).max(1)))
            .collect();
        let keep = lens.iter().copied().max().unwrap_or(1);
        let budget = sampling.max_new_tokens.min(context - keep);
        let mut ids: Vec<i64> = Vec::with_capacity(batch * keep);
        let mut attend: Vec<bool> = Vec::with_capacity(batch * (keep + budget));
        for (p, &len) in prompts.iter().zip(&lens) {
            let p: &[u32] = if p.is_empty() { &[0] } else { p };
            ids.extend(std::iter::repeat_n(0, keep - len));
            ids.extend(p[p.len() - len..].iter().map(|&t| t as i64));
            attend.extend((0..keep + budget).map(|i| i >= keep - len));
        }
        let weights = self.compute_weights();
        let head = weights.last().expect("lm_head");
        let mut cache = self.new_cache(batch, keep + budget);
        if lens.iter().any(|&l| l != keep) {
            cache.attend = Some(
                Tensor::from_slice(&attend)
                    .view([batch as i64, (keep + budget) as i64])
                    .to_device(self.device()),
            );
        }
        let idx = Tensor::from_slice(&ids)
            .view([batch as i64, keep as i64])
            .to_device(self.device());
        let h = self.forward(&weights, &idx, Cached::Fill(&mut cache));
        let mut logits = self.logits(&h.select(1, keep as i64 - 1), head);
        // The decoding step's inputs live in fixed tensors, so that a captured step
        // replays on new values: the tokens, and the position they go to.
        let step_ids = Tensor::zeros([batch as i64, 1], (Kind::Int64, self.device()));
        let at = Tensor::zeros([1], (Kind::Int64, self.device()));
        let step = || {
            let h = self.forward(&weights, &step_ids, Cached::Step(&cache, &at));
            self.logits(&h.select(1, 0), head)
        };
        let mut graph: Option<(CudaGraph, Tensor)> = None;
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); batch];
        let mut done = vec![false; batch];
        for i in 0..budget {
            let next = choose(&logits, sampling);
            let host: Vec<i64> = Vec::try_from(&next.to_device(Device::Cpu)).expect("ids");
            for (row, &t) in host.iter().enumerate() {
                if !done[row] {
                    out[row].push(t as u32);
                    done[row] = stop(row, &out[row]);
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
            step_ids.shallow_clone().copy_(&next.unsqueeze(1));
            let _ = at.shallow_clone().fill_((keep + i) as i64);
            // The first step runs as it is (warming up what it uses); the second is
            // captured, and replayed from then on.
            if i == 1 && use_graphs(self.device()) {
                if let Device::Cuda(index) = self.device() {
                    graph = CudaGraph::capture(index, step)
                        .map_err(|e| eprintln!("warning: decoding without CUDA graphs: {e}"))
                        .ok();
                }
            }
            logits = match &graph {
                Some((g, captured)) => match g.replay() {
                    Ok(()) => captured.shallow_clone(),
                    Err(e) => panic!("replaying the decoding step: {e}"),
                },
                None => step(),
            };
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelConfig;

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
}
