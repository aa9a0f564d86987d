//! Muon for the blocks' matrices, AdamW for the embedding and the head (nanochat's
//! split), gradient clipping and the learning-rate schedule. State is named per
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
/// every singular value into roughly [0.7, 1.2]. `g` is one matrix or a stack of them.
pub fn orthogonalize(g: &Tensor, steps: usize) -> Tensor {
    if g.dim() == 2 {
        return orthogonalize(&g.unsqueeze(0), steps).squeeze_dim(0);
    }
    let (a, b, c) = (3.4445, -4.7750, 2.0315);
    let size = g.size();
    let tall = size[1] > size[2];
    let mut x = g.to_kind(Kind::BFloat16);
    if tall {
        x = x.transpose(-2, -1);
    }
    let norm = x.norm_scalaropt_dim(2, [-2, -1], true);
    x = &x / (norm + 1e-7);
    for _ in 0..steps {
        // a X + (b A + c A^2) X with A = X X^T, as three batched GEMMs.
        let s = x.matmul(&x.transpose(-2, -1));
        let poly = s.baddbmm(&s, &s, b, c);
        x = x.baddbmm(&poly, &x, a, 1.0);
    }
    if tall {
        x = x.transpose(-2, -1);
    }
    x
}

/// Same-shape matrices updated together: their gradients are stacked so that
/// Newton-Schulz runs as a few batched GEMMs instead of many small ones.
struct MuonGroup {
    params: Vec<(String, Tensor)>,
    momentum: Tensor,
    shape_scale: f64,
}

struct AdamSlot {
    name: String,
    param: Tensor,
    lr: f64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

pub struct Optimizer {
    config: OptimConfig,
    muon: Vec<MuonGroup>,
    adam: Vec<AdamSlot>,
}

impl Optimizer {
    /// AdamW for `wte` and `lm_head` with LRs scaled by `(width / 768)^-0.5`, Muon for
    /// every other (2-D) weight.
    pub fn new(params: &[(String, Tensor)], width: usize, config: OptimConfig) -> Self {
        let dmodel_scale = (width as f64 / 768.0).powf(-0.5);
        let mut muon: Vec<MuonGroup> = Vec::new();
        let mut adam = Vec::new();
        for (name, p) in params {
            let lr = match name.as_str() {
                "wte" => Some(config.embedding_lr),
                "lm_head" => Some(config.unembedding_lr),
                _ => None,
            };
            if let Some(lr) = lr {
                adam.push(AdamSlot {
                    name: name.clone(),
                    param: p.shallow_clone(),
                    lr: lr * dmodel_scale,
                    exp_avg: p.zeros_like(),
                    exp_avg_sq: p.zeros_like(),
                });
                continue;
            }
            let entry = (name.clone(), p.shallow_clone());
            match muon.iter_mut().find(|g| g.params[0].1.size() == p.size()) {
                Some(g) => g.params.push(entry),
                None => {
                    let s = p.size();
                    muon.push(MuonGroup {
                        params: vec![entry],
                        momentum: Tensor::new(),
                        shape_scale: (s[0] as f64 / s[1] as f64).max(1.0).sqrt(),
                    })
                }
            }
        }
        for g in &mut muon {
            let s = g.params[0].1.size();
            g.momentum = g.params[0].1.new_zeros(
                [g.params.len() as i64, s[0], s[1]],
                (Kind::Float, g.params[0].1.device()),
            );
        }
        Optimizer { config, muon, adam }
    }

    /// One update at `lr_scale` of the configured LRs (`step` counts from 0), after
    /// clipping the gradients to the configured global norm. Returns the norm before
    /// clipping (a device scalar: reading it waits for the GPU).
    pub fn step(&mut self, step: u64, lr_scale: f64) -> Tensor {
        let _guard = tch::no_grad_guard();
        let c = &self.config;
        let stacked: Vec<Tensor> = self
            .muon
            .iter()
            .map(|g| {
                Tensor::stack(
                    &g.params.iter().map(|(_, p)| p.grad()).collect::<Vec<_>>(),
                    0,
                )
            })
            .collect();
        let adam_grads: Vec<Tensor> = self.adam.iter().map(|s| s.param.grad()).collect();
        let squares: Vec<Tensor> = stacked
            .iter()
            .chain(&adam_grads)
            .map(|g| g.square().sum(Kind::Float))
            .collect();
        let norm = Tensor::stack(&squares, 0).sum(Kind::Float).sqrt();
        if c.grad_clip > 0.0 {
            let coef = (c.grad_clip / (&norm + 1e-6)).clamp_max(1.0);
            for g in stacked.iter().chain(&adam_grads) {
                let _ = g.shallow_clone().g_mul_(&coef);
            }
        }

        let warm = (step as f64 / c.momentum_warmup_steps.max(1) as f64).min(1.0);
        let momentum = (1.0 - warm) * c.muon_momentum_start + warm * c.muon_momentum;
        for (group, g) in self.muon.iter_mut().zip(&stacked) {
            let _ = group.momentum.lerp_(g, 1.0 - momentum);
            let nesterov = g.lerp(&group.momentum, momentum);
            let update = orthogonalize(&nesterov, c.newton_schulz_steps).to_kind(Kind::Float)
                * (-c.matrix_lr * lr_scale * group.shape_scale);
            for (i, (_, p)) in group.params.iter_mut().enumerate() {
                let _ = p.g_add_(&update.select(0, i as i64));
            }
        }

        let t = step as f64 + 1.0;
        let (b1, b2) = (c.betas[0], c.betas[1]);
        for (slot, g) in self.adam.iter_mut().zip(&adam_grads) {
            let lr = slot.lr * lr_scale;
            if c.weight_decay > 0.0 {
                let _ = slot.param.g_mul_scalar_(1.0 - lr * c.weight_decay);
            }
            let _ = slot.exp_avg.lerp_(g, 1.0 - b1);
            let _ = slot.exp_avg_sq.g_mul_scalar_(b2);
            let _ = slot.exp_avg_sq.g_add_(&(g.square() * (1.0 - b2)));
            let denom = (slot.exp_avg_sq.sqrt() / (1.0 - b2.powf(t)).sqrt()) + c.eps;
            let _ = slot
                .param
                .g_add_(&(&slot.exp_avg / denom * (-lr / (1.0 - b1.powf(t)))));
        }
        norm
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in self.muon.iter_mut().flat_map(|g| g.params.iter_mut()) {
            p.zero_grad();
        }
        for s in &mut self.adam {
            s.param.zero_grad();
        }
    }

    /// Every state tensor by name (`<param>.momentum`, `<param>.exp_avg`, ...).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for g in &self.muon {
            for (i, (name, _)) in g.params.iter().enumerate() {
                out.push((format!("{name}.momentum"), g.momentum.select(0, i as i64)));
            }
        }
        for s in &self.adam {
            out.push((format!("{}.exp_avg", s.name), s.exp_avg.shallow_clone()));
            out.push((
                format!("{}.exp_avg_sq", s.name),
                s.exp_avg_sq.shallow_clone(),
            ));
        }
        out
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
        // Gaussian rectangular matrices are well conditioned; give the square one singular
        // values from 0.02 to 1 (five iterations cannot lift values near zero).
        let (q1, _) = Tensor::linalg_qr(
            &Tensor::randn([64, 64], (Kind::Float, Device::Cpu)),
            "reduced",
        );
        let (q2, _) = Tensor::linalg_qr(
            &Tensor::randn([64, 64], (Kind::Float, Device::Cpu)),
            "reduced",
        );
        let spectrum = Tensor::linspace(0.02, 1.0, 64, (Kind::Float, Device::Cpu));
        let square = q1.matmul(&spectrum.diag(0)).matmul(&q2);
        for g in [
            square,
            Tensor::randn([96, 32], (Kind::Float, Device::Cpu)),
            Tensor::randn([32, 128], (Kind::Float, Device::Cpu)),
        ] {
            let shape = g.size();
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
        // A stack is orthogonalized matrix by matrix.
        let stack = Tensor::randn([3, 16, 48], (Kind::Float, Device::Cpu));
        let together = orthogonalize(&stack, 5);
        let alone = orthogonalize(&stack.select(0, 1), 5);
        let diff = (together.select(0, 1) - alone)
            .abs()
            .max()
            .to_kind(Kind::Float);
        assert!(diff.double_value(&[]) < 1e-2);
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
        let norm = opt.step(0, 1.0).double_value(&[]);
        assert!((norm - (9.0f64 + 0.25).sqrt()).abs() < 1e-5);
        // First AdamW step moves each weight by lr against the gradient's sign.
        let moved: Vec<f32> = Vec::try_from(&p).unwrap();
        assert!(
            (moved[0] - 0.8).abs() < 1e-5 && (moved[1] + 1.8).abs() < 1e-5,
            "{moved:?}"
        );
    }
}
