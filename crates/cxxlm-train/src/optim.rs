//! Muon for the blocks' matrices, AdamW for the embedding and the head (nanochat's
//! split), gradient clipping and the learning-rate schedule. State is kept per
//! parameter, so that it can be split by rank.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub matrix_lr: f64,
    pub embedding_lr: f64,
    pub unembedding_lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    pub muon_momentum: f64,
    /// Muon's momentum rises linearly from this value over `momentum_warmup_steps`.
    pub muon_momentum_start: f64,
    pub momentum_warmup_steps: u64,
    pub newton_schulz_steps: usize,
    /// Clip the global gradient norm to this (0 = off).
    pub grad_clip: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            matrix_lr: 0.02,
            embedding_lr: 0.2,
            unembedding_lr: 0.004,
            betas: [0.8, 0.95],
            eps: 1e-10,
            weight_decay: 0.0,
            muon_momentum: 0.95,
            muon_momentum_start: 0.85,
            momentum_warmup_steps: 300,
            newton_schulz_steps: 5,
            grad_clip: 1.0,
        }
    }
}

/// Warmup, constant, then linear warmdown to `final_lr_frac`; fractions of the steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Schedule {
    pub warmup_frac: f64,
    pub warmdown_frac: f64,
    pub final_lr_frac: f64,
}

impl Default for Schedule {
    /// nanochat's: no warmup, the last 20% down to zero.
    fn default() -> Self {
        Schedule {
            warmup_frac: 0.0,
            warmdown_frac: 0.2,
            final_lr_frac: 0.0,
        }
    }
}

impl Schedule {
    pub fn lr_scale(&self, step: u64, total: u64) -> f64 {
        let (step, total) = (step as f64, total as f64);
        let warmup = (self.warmup_frac * total).round();
        let warmdown = (self.warmdown_frac * total).round();
        if step < warmup {
            (step + 1.0) / warmup
        } else if step < total - warmdown {
            1.0
        } else {
            let left = ((total - step) / warmdown.max(1.0)).clamp(0.0, 1.0);
            left + (1.0 - left) * self.final_lr_frac
        }
    }
}

/// The orthogonal factor of `g`'s polar decomposition, approximately: five steps of the
/// quintic Newton-Schulz iteration in bf16 (Keller Jordan's coefficients), which map
/// every singular value into roughly [0.7, 1.2].
pub fn orthogonalize(g: &Tensor, steps: usize) -> Tensor {
    let (a, b, c) = (3.4445, -4.7750, 2.0315);
    let size = g.size();
    let tall = size[0] > size[1];
    let mut x = g.to_kind(Kind::BFloat16);
    if tall {
        x = x.tr();
    }
    x = &x / (x.norm().to_kind(Kind::Float) + 1e-7).to_kind(Kind::BFloat16);
    for _ in 0..steps {
        let s = x.matmul(&x.tr());
        let poly = &s * b + s.matmul(&s) * c;
        x = &x * a + poly.matmul(&x);
    }
    if tall {
        x = x.tr();
    }
    x
}

enum Rule {
    Muon { lr: f64, shape_scale: f64 },
    Adam { lr: f64 },
}

struct Slot {
    name: String,
    param: Tensor,
    rule: Rule,
    /// Muon: momentum; AdamW: first and second moments.
    state: Vec<Tensor>,
}

pub struct Optimizer {
    config: OptimConfig,
    slots: Vec<Slot>,
}

impl Optimizer {
    /// AdamW for `wte` and `lm_head` with LRs scaled by `(width / 768)^-0.5`, Muon for
    /// every other (2-D) weight.
    pub fn new(params: &[(String, Tensor)], width: usize, config: OptimConfig) -> Self {
        let dmodel_scale = (width as f64 / 768.0).powf(-0.5);
        let slots = params
            .iter()
            .map(|(name, p)| {
                let zeros = || p.zeros_like();
                let (rule, state) = match name.as_str() {
                    "wte" => (
                        Rule::Adam {
                            lr: config.embedding_lr * dmodel_scale,
                        },
                        vec![zeros(), zeros()],
                    ),
                    "lm_head" => (
                        Rule::Adam {
                            lr: config.unembedding_lr * dmodel_scale,
                        },
                        vec![zeros(), zeros()],
                    ),
                    _ => {
                        let s = p.size();
                        let shape_scale = (s[0] as f64 / s[1] as f64).max(1.0).sqrt();
                        (
                            Rule::Muon {
                                lr: config.matrix_lr,
                                shape_scale,
                            },
                            vec![zeros()],
                        )
                    }
                };
                Slot {
                    name: name.clone(),
                    param: p.shallow_clone(),
                    rule,
                    state,
                }
            })
            .collect();
        Optimizer { config, slots }
    }

    /// Clips gradients to the configured global norm; returns the norm before clipping
    /// (a device scalar: reading it waits for the GPU).
    pub fn clip_gradients(&self) -> Tensor {
        let _guard = tch::no_grad_guard();
        let squares: Vec<Tensor> = self
            .slots
            .iter()
            .map(|s| s.param.grad().square().sum(Kind::Float))
            .collect();
        let norm = Tensor::stack(&squares, 0).sum(Kind::Float).sqrt();
        if self.config.grad_clip > 0.0 {
            let coef = (self.config.grad_clip / (&norm + 1e-6)).clamp_max(1.0);
            for s in &self.slots {
                let _ = s.param.grad().g_mul_(&coef);
            }
        }
        norm
    }

    /// One update at `lr_scale` of the configured LRs; `step` counts from 0.
    pub fn step(&mut self, step: u64, lr_scale: f64) {
        let _guard = tch::no_grad_guard();
        let c = &self.config;
        let warm = (step as f64 / c.momentum_warmup_steps.max(1) as f64).min(1.0);
        let momentum = (1.0 - warm) * c.muon_momentum_start + warm * c.muon_momentum;
        let t = step as f64 + 1.0;
        let (b1, b2) = (c.betas[0], c.betas[1]);
        for slot in &mut self.slots {
            let g = slot.param.grad();
            match slot.rule {
                Rule::Muon { lr, shape_scale } => {
                    let buf = &mut slot.state[0];
                    let _ = buf.lerp_(&g, 1.0 - momentum);
                    let nesterov = g.lerp(buf, momentum);
                    let update = orthogonalize(&nesterov, c.newton_schulz_steps);
                    let _ = slot
                        .param
                        .g_add_(&(update.to_kind(Kind::Float) * (-lr * lr_scale * shape_scale)));
                }
                Rule::Adam { lr } => {
                    let lr = lr * lr_scale;
                    if c.weight_decay > 0.0 {
                        let _ = slot.param.g_mul_scalar_(1.0 - lr * c.weight_decay);
                    }
                    let _ = slot.state[0].lerp_(&g, 1.0 - b1);
                    let _ = slot.state[1].g_mul_scalar_(b2);
                    let _ = slot.state[1].g_add_(&(g.square() * (1.0 - b2)));
                    let denom = (slot.state[1].sqrt() / (1.0 - b2.powf(t)).sqrt()) + c.eps;
                    let _ = slot
                        .param
                        .g_add_(&(&slot.state[0] / denom * (-lr / (1.0 - b1.powf(t)))));
                }
            }
        }
    }

    pub fn zero_grad(&mut self) {
        for s in &mut self.slots {
            s.param.zero_grad();
        }
    }

    /// Every state tensor by name (`<param>.momentum`, `<param>.exp_avg`, ...).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .flat_map(|s| {
                let names: &[&str] = match s.rule {
                    Rule::Muon { .. } => &["momentum"],
                    Rule::Adam { .. } => &["exp_avg", "exp_avg_sq"],
                };
                names
                    .iter()
                    .zip(&s.state)
                    .map(|(n, t)| (format!("{}.{n}", s.name), t.shallow_clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Restores what [`Optimizer::state`] returned.
    pub fn load_state(&mut self, tensors: &[(String, Tensor)]) -> Result<(), String> {
        let _guard = tch::no_grad_guard();
        let expected = self.state();
        if expected.len() != tensors.len() {
            return Err(format!(
                "optimizer state holds {} tensors, this model needs {}",
                tensors.len(),
                expected.len()
            ));
        }
        for (name, mut t) in expected {
            let src = tensors
                .iter()
                .find(|(n, _)| *n == name)
                .ok_or_else(|| format!("optimizer state lacks {name}"))?;
            if src.1.size() != t.size() {
                return Err(format!("optimizer state {name} has another shape"));
            }
            t.copy_(&src.1);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn newton_schulz_orthogonalizes() {
        tch::manual_seed(0);
        for shape in [[64, 64], [96, 32], [32, 128]] {
            let g = Tensor::randn(shape, (Kind::Float, Device::Cpu));
            let x = orthogonalize(&g, 5).to_kind(Kind::Float);
            let (_, s, _) = x.svd(true, true);
            let (lo, hi) = (s.min().double_value(&[]), s.max().double_value(&[]));
            assert!(
                lo > 0.5 && hi < 1.3,
                "{shape:?}: singular values in [{lo}, {hi}]"
            );
            // Close to the exact polar factor U V^T.
            let (u, _, v) = g.svd(true, true);
            let polar = u.matmul(&v.tr());
            let cos = (&x * &polar).sum(Kind::Float) / (x.norm() * polar.norm());
            assert!(cos.double_value(&[]) > 0.95, "{shape:?}");
        }
    }

    #[test]
    fn schedule_warms_up_holds_and_decays() {
        let s = Schedule {
            warmup_frac: 0.1,
            warmdown_frac: 0.3,
            final_lr_frac: 0.1,
        };
        assert!((s.lr_scale(0, 100) - 0.1).abs() < 1e-9);
        assert_eq!(s.lr_scale(10, 100), 1.0);
        assert_eq!(s.lr_scale(69, 100), 1.0);
        assert!((s.lr_scale(85, 100) - (0.5 + 0.5 * 0.1)).abs() < 1e-9);
        assert!((s.lr_scale(100, 100) - 0.1).abs() < 1e-9);
    }

    #[test]
    fn adam_matches_the_closed_form_first_step() {
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let params = vec![("wte".to_string(), p.shallow_clone())];
        (&p * Tensor::from_slice(&[3.0f32, -0.5]))
            .sum(Kind::Float)
            .backward();
        let mut opt = Optimizer::new(&params, 768, OptimConfig::default());
        opt.step(0, 1.0);
        // First AdamW step moves each weight by lr against the gradient's sign.
        let moved: Vec<f32> = Vec::try_from(&p).unwrap();
        assert!(
            (moved[0] - 0.8).abs() < 1e-5 && (moved[1] + 1.8).abs() < 1e-5,
            "{moved:?}"
        );
    }
}
