//! Muon for the blocks' matrices (or AdamW, `matrices = "adamw"`), AdamW for the
//! embedding and the head (nanochat's split), gradient clipping and the learning-rate schedule; the state is split among
//! the ranks of a data-parallel run and named per parameter, so that a run resumes on
//! any number of ranks.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use cxxlm_cuda::fused::AdamwStep;
use cxxlm_cuda::Fused;

use crate::dist::{flat_padded, Comm};
use crate::Result;

/// What updates the blocks' matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Matrices {
    Muon,
    /// AdamW at `matrix_lr` (the baseline Muon is measured against; PyTorch references
    /// use it).
    Adamw,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub matrices: Matrices,
    /// Muon's rate, or AdamW's for the matrices with `matrices = "adamw"`.
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
            matrices: Matrices::Muon,
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

/// Warmup, constant, then warmdown to `final_lr_frac`; fractions of the steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Schedule {
    pub warmup_frac: f64,
    pub warmdown_frac: f64,
    pub final_lr_frac: f64,
    /// The warmdown's shape (left out of the run's record when linear, as runs before
    /// it had it).
    #[serde(skip_serializing_if = "Warmdown::is_linear")]
    pub warmdown: Warmdown,
}

/// How the learning rate falls over the warmdown, `f` going from 0 to 1 across it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Warmdown {
    /// `1 - f`.
    #[default]
    Linear,
    /// `1 - sqrt(f)` (nanochat's SFT, after arXiv:2405.18392).
    Sqrt,
}

impl Warmdown {
    fn is_linear(&self) -> bool {
        *self == Warmdown::Linear
    }
}

impl Default for Schedule {
    /// nanochat's: no warmup, the last 20% down to zero.
    fn default() -> Self {
        Schedule {
            warmup_frac: 0.0,
            warmdown_frac: 0.2,
            final_lr_frac: 0.0,
            warmdown: Warmdown::Linear,
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
            let left = match self.warmdown {
                Warmdown::Linear => left,
                Warmdown::Sqrt => 1.0 - (1.0 - left).sqrt(),
            };
            left + (1.0 - left) * self.final_lr_frac
        }
    }
}

/// How Newton-Schulz is computed for a stack of k x m matrices (k <= m once tall ones are
/// transposed). Both forms give the same result in exact arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewtonSchulz {
    /// Each step updates X (k x m): 2 k^2 m + k^3 multiply-adds.
    Standard,
    /// Each step updates the k x k Gram matrix R = X X^T and the k x k product Q of the
    /// steps' polynomials; X is touched only at the start, at restarts and at the end
    /// (Tri Dao's "Gram Newton-Schulz", 2026). Five steps cost 4 k^2 m + 14 k^3
    /// multiply-adds instead of 10 k^2 m + 5 k^3: a third less at d12's and d20's MLP
    /// shape (m = 4 k), more for square matrices.
    Gram,
}

/// Whether the Gram form restarts before `step`: Q is folded into X and R recomputed
/// from it, so that the rounding R gathers from step to step compounds over three steps
/// at most (at 2 of 5, as in Dao's).
fn gram_restarts_at(step: usize) -> bool {
    step % 3 == 2
}

impl NewtonSchulz {
    /// The form with less work for matrices of `rows` x `cols`.
    pub fn cheaper(rows: i64, cols: i64) -> NewtonSchulz {
        match rows.max(cols) >= 2 * rows.min(cols) {
            true => NewtonSchulz::Gram,
            false => NewtonSchulz::Standard,
        }
    }
}

/// The dtype Newton-Schulz runs in: fp32 on CPUs, most of which have no bf16 or fp16
/// arithmetic and emulate their matrix products tens of times slower; fp16 on GPUs, whose
/// tensor cores take it as fast as bf16 and whose three more bits of mantissa leave about
/// an eighth of bf16's rounding in the result (the values stay far inside fp16's range:
/// X's singular values under 1.3, the Gram form's R under 1 and Q under 3.5^3).
fn newton_schulz_kind(device: tch::Device) -> Kind {
    match device {
        tch::Device::Cuda(_) => Kind::Half,
        _ => Kind::Float,
    }
}

/// The orthogonal factor of `g`'s polar decomposition, approximately: `steps` steps of the
/// quintic Newton-Schulz iteration (Keller Jordan's coefficients), which map every
/// singular value into roughly [0.7, 1.2], in the form with less work and its dtype. `g`
/// is one matrix or a stack of them; `fused` divides them by their norms first.
pub fn orthogonalize(fused: Fused, g: &Tensor, steps: usize) -> Tensor {
    let size = g.size();
    let form = NewtonSchulz::cheaper(size[size.len() - 2], size[size.len() - 1]);
    orthogonalize_as(fused, g, steps, form, newton_schulz_kind(g.device()))
}

/// [`orthogonalize`] in a given form and dtype.
pub fn orthogonalize_as(
    fused: Fused,
    g: &Tensor,
    steps: usize,
    form: NewtonSchulz,
    kind: Kind,
) -> Tensor {
    let stack = match g.dim() {
        2 => g.unsqueeze(0),
        _ => g.shallow_clone(),
    };
    let x = newton_schulz(&fused.normalize_matrices(&stack, kind), steps, form);
    match g.dim() {
        2 => x.squeeze_dim(0),
        _ => x,
    }
}

/// `steps` steps of Newton-Schulz in `form` on a stack of matrices each divided by its
/// Frobenius norm, in the form's dtype.
fn newton_schulz(x: &Tensor, steps: usize, form: NewtonSchulz) -> Tensor {
    let size = x.size();
    let tall = size[1] > size[2];
    let x = match tall {
        true => x.transpose(-2, -1),
        false => x.shallow_clone(),
    };
    let x = match form {
        NewtonSchulz::Standard => standard_newton_schulz(x, steps),
        NewtonSchulz::Gram => gram_newton_schulz(x, steps),
    };
    match tall {
        true => x.transpose(-2, -1),
        false => x,
    }
}

const NEWTON_SCHULZ: (f64, f64, f64) = (3.4445, -4.7750, 2.0315);

fn standard_newton_schulz(mut x: Tensor, steps: usize) -> Tensor {
    let (a, b, c) = NEWTON_SCHULZ;
    for _ in 0..steps {
        // a X + (b A + c A^2) X with A = X X^T, as three batched GEMMs.
        let s = x.matmul(&x.transpose(-2, -1));
        let poly = s.baddbmm(&s, &s, b, c);
        x = x.baddbmm(&poly, &x, a, 1.0);
    }
    x
}

/// The standard step is X <- P X with P = a + b R + c R^2 and R = X X^T, so after some
/// steps X = Q X0 with Q the product of their P's; all are polynomials in X0 X0^T and
/// commute, so the next R is P R P, and Q <- Q P.
fn gram_newton_schulz(mut x: Tensor, steps: usize) -> Tensor {
    let (a, b, c) = NEWTON_SCHULZ;
    let mut r = x.matmul(&x.transpose(-2, -1));
    let mut q: Option<Tensor> = None;
    for step in 0..steps {
        if gram_restarts_at(step) {
            if let Some(q) = q.take() {
                x = q.matmul(&x);
                r = x.matmul(&x.transpose(-2, -1));
            }
        }
        let p = r.baddbmm(&r, &r, b, c);
        let _ = p.diagonal(0, -2, -1).g_add_scalar_(a);
        // The R that a restart recomputes, or that no step reads, is not carried.
        if step + 1 < steps && !gram_restarts_at(step + 1) {
            r = p.matmul(&r.matmul(&p));
        }
        q = Some(match q {
            Some(q) => q.matmul(&p),
            None => p,
        });
    }
    match q {
        Some(q) => q.matmul(&x),
        None => x,
    }
}

/// Newton-Schulz on `device` in the form and dtype runs use for d12's, d20's and the 3B's
/// matrices (and the standard form in bf16 beside each, the usual choice, for scale),
/// against the standard form in fp32, on matrices whose singular values fall from 1 to
/// 1e-3, where rounding shows first.
pub fn newton_schulz_checks(device: tch::Device) -> Vec<cxxlm_cuda::check::Check> {
    let mut checks = Vec::new();
    for [count, rows, cols] in [
        [8, 768, 768],
        [4, 768, 3072],
        [2, 1280, 5120],
        [2, 3072, 768],
        [2, 2560, 2560],
        [1, 2560, 6848],
    ] {
        let short = rows.min(cols);
        let float = (Kind::Float, device);
        let (u, _) = Tensor::linalg_qr(&Tensor::randn([count, rows, short], float), "reduced");
        let (v, _) = Tensor::linalg_qr(&Tensor::randn([count, cols, short], float), "reduced");
        let spectrum = Tensor::logspace(0.0, -3.0, short, 10.0, float);
        let g = (u * spectrum.unsqueeze(0)).matmul(&v.transpose(-2, -1));
        let want = orthogonalize_as(Fused::Reference, &g, 5, NewtonSchulz::Standard, Kind::Float);
        let used = NewtonSchulz::cheaper(rows, cols);
        let forms = [
            (used, newton_schulz_kind(device)),
            (NewtonSchulz::Standard, Kind::BFloat16),
        ];
        for (form, kind) in forms {
            checks.push(cxxlm_cuda::check::Check::relative_l2(
                format!("Newton-Schulz, {form:?} form in {kind:?}, {count} x {rows} x {cols}"),
                &orthogonalize_as(Fused::Reference, &g, 5, form, kind),
                &want,
                0.1,
            ));
        }
    }
    checks
}

/// Where the weights live between steps (`train.sharding`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sharding {
    /// Every rank holds every weight and gradient; the optimizer's state is split among
    /// the ranks (ZeRO-1/2).
    #[default]
    Optimizer,
    /// Each rank holds only its part of every weight, gradient and optimizer state
    /// (ZeRO-3, FSDP): the optimizer's parts, gathered layer by layer for the passes.
    Full,
}

/// This rank's part of some weights (fp32) and their gradient, averaged over the ranks.
pub(crate) struct Shard {
    pub(crate) weights: Tensor,
    pub(crate) grad: Tensor,
}

/// What a rank keeps of an AdamW weight.
enum Held {
    /// The weight whole (the model's own), updated with every rank's part, gathered.
    All(Tensor),
    /// Only this rank's part, with its gradient (full sharding).
    Part(Shard),
}

/// Where full sharding keeps a weight: the optimizer's part of it on each rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    /// Whole on rank `rank` (a Muon matrix).
    Whole { rank: usize },
    /// Flattened, padded to a multiple of the ranks and cut in parts of `part` elements:
    /// rank r keeps the r-th (AdamW).
    Flat { part: i64 },
}

/// What a rank keeps of a group's matrices.
enum Stack {
    /// All of them, `[matrices, rows, cols]`: the model's weights and their gradients are
    /// views of these stacks, so that a step reads every gradient and updates every
    /// weight of the group at once, without copying them together.
    Whole(Shard),
    /// Only the matrices it owns, `[per_rank, rows, cols]` (full sharding).
    Part(Shard),
}

/// Same-shape matrices updated together: Newton-Schulz runs on their stack as a few
/// batched GEMMs instead of many small ones. With several ranks, each owns `per_rank`
/// consecutive matrices of the stack (padded with zero matrices to a multiple of the
/// ranks): it keeps their momentum, orthogonalizes them, and the updates are gathered
/// (or, with full sharding, applied to the matrices it keeps).
struct MuonGroup {
    names: Vec<String>,
    stack: Stack,
    per_rank: usize,
    /// This rank's matrices: `[per_rank, rows, cols]`.
    momentum: Tensor,
    shape_scale: f64,
}

impl MuonGroup {
    /// Indices into `names` of the matrices this rank owns, with their index in its part.
    fn owned(&self, rank: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        let first = rank * self.per_rank;
        (first..(first + self.per_rank).min(self.names.len())).map(move |i| (i, i - first))
    }
}

/// AdamW on one weight; each rank keeps the state of its part of the flattened weight
/// (padded to a multiple of the ranks) and the updated parts are gathered (or, with full
/// sharding, that part is all the rank keeps of the weight).
struct AdamSlot {
    name: String,
    held: Held,
    numel: i64,
    lr: f64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// Sharded like ZeRO stage 1-2 (nanochat's DistMuon and DistAdamW): gradients are
/// reduce-scattered, each rank updates its part with its part of the state, and the
/// results are all-gathered. With [`Optimizer::shard_weights`] (ZeRO-3) each rank keeps
/// only those parts of the weights, whose gradients arrive already reduce-scattered, and
/// the step needs no collective but the gradient norm's. On one rank every collective is
/// the identity.
pub struct Optimizer {
    config: OptimConfig,
    /// Where AdamW's arithmetic and Muon's passes around Newton-Schulz run: kernels on a
    /// GPU, or tch operations.
    fused: Fused,
    muon: Vec<MuonGroup>,
    adam: Vec<AdamSlot>,
    rank: usize,
    world: usize,
}

impl Shard {
    fn zeros(shape: &[i64], device: tch::Device) -> Shard {
        let zeros = || Tensor::zeros(shape, (Kind::Float, device));
        Shard {
            weights: zeros(),
            grad: zeros(),
        }
    }
}

impl Held {
    fn zero_grad(&mut self) {
        match self {
            Held::All(param) => param.zero_grad(),
            Held::Part(shard) => {
                let _ = shard.grad.zero_();
            }
        }
    }
}

impl MuonGroup {
    /// The group of `params`, which from now on are views of its stacks.
    fn new(names: Vec<String>, mut params: Vec<Tensor>, world: usize) -> MuonGroup {
        let s = params[0].size();
        let per_rank = params.len().div_ceil(world);
        MuonGroup {
            momentum: params[0].new_zeros(
                [per_rank as i64, s[0], s[1]],
                (Kind::Float, params[0].device()),
            ),
            shape_scale: (s[0] as f64 / s[1] as f64).max(1.0).sqrt(),
            names,
            stack: Stack::Whole(stack_in_place(&mut params)),
            per_rank,
        }
    }

    /// Elements of one of its matrices.
    fn matrix_numel(&self) -> i64 {
        self.momentum.size()[1..].iter().product()
    }

    /// This rank's share of the group's gradients, averaged over the ranks.
    fn gradients(&self, comm: &Comm) -> Result<Tensor> {
        let mut stacked = match &self.stack {
            Stack::Part(shard) => return Ok(shard.grad.shallow_clone()),
            Stack::Whole(whole) => whole.grad.shallow_clone(),
        };
        let padding = (self.per_rank * comm.size() - self.names.len()) as i64;
        if padding > 0 {
            let s = stacked.size();
            let zeros =
                stacked.new_zeros([padding, s[1], s[2]], (stacked.kind(), stacked.device()));
            stacked = Tensor::cat(&[stacked, zeros], 0);
        }
        comm.reduce_scatter_mean(&stacked)
    }

    /// Adds `scale` x this rank's orthogonalized matrices to the weights: to the whole
    /// ones once every rank's are gathered, or to the ones it keeps.
    fn apply(&mut self, orthogonal: &Tensor, scale: f64, fused: Fused, comm: &Comm) -> Result<()> {
        match &self.stack {
            Stack::Whole(whole) => {
                // Gathered in Newton-Schulz's dtype, and scaled after.
                let update = comm.all_gather(orthogonal)?;
                let matrices = self.names.len() as i64;
                fused.muon_update_(&whole.weights, &update.narrow(0, 0, matrices), scale);
            }
            Stack::Part(shard) => fused.muon_update_(&shard.weights, orthogonal, scale),
        }
        Ok(())
    }
}

/// Moves same-shape weights into one stack and their gradients into another, of which
/// they become views.
fn stack_in_place(params: &mut [Tensor]) -> Shard {
    let weights = tch::no_grad(|| Tensor::stack(params, 0));
    let grad = weights.zeros_like();
    for (i, p) in params.iter_mut().enumerate() {
        p.set_data(&weights.select(0, i as i64));
        if !p.requires_grad() {
            continue;
        }
        if !p.grad().defined() {
            tch::with_grad(|| (p.sum(Kind::Float) * 0.0).backward());
        }
        p.grad().set_data(&grad.select(0, i as i64));
    }
    Shard { weights, grad }
}

impl AdamSlot {
    fn new(name: &str, param: &Tensor, lr: f64, world: usize) -> AdamSlot {
        let part = flat_padded(param, world).size()[0] / world as i64;
        let state = || param.new_zeros([part], (Kind::Float, param.device()));
        AdamSlot {
            name: name.to_string(),
            held: Held::All(param.shallow_clone()),
            numel: param.numel() as i64,
            lr,
            exp_avg: state(),
            exp_avg_sq: state(),
        }
    }

    fn part(&self) -> i64 {
        self.exp_avg.size()[0]
    }

    /// This rank's part of the gradient, averaged over the ranks.
    fn gradient(&self, comm: &Comm) -> Result<Tensor> {
        match &self.held {
            Held::All(param) => comm.reduce_scatter_mean(&flat_padded(&param.grad(), comm.size())),
            Held::Part(shard) => Ok(shard.grad.shallow_clone()),
        }
    }
}

impl Optimizer {
    /// AdamW for `wte` and `lm_head` with LRs scaled by `(width / 768)^-0.5`, Muon for
    /// every other (2-D) weight; state for rank `rank` of `world`.
    pub fn new(
        params: &[(String, Tensor)],
        width: usize,
        config: OptimConfig,
        rank: usize,
        world: usize,
    ) -> Self {
        let dmodel_scale = (width as f64 / 768.0).powf(-0.5);
        // Same-shape matrices, by shape in order of appearance.
        let mut matrices: Vec<(Vec<String>, Vec<Tensor>)> = Vec::new();
        let mut adam = Vec::new();
        for (name, p) in params {
            let lr = match (name.as_str(), config.matrices) {
                ("wte", _) => Some(config.embedding_lr * dmodel_scale),
                ("lm_head", _) => Some(config.unembedding_lr * dmodel_scale),
                (_, Matrices::Adamw) => Some(config.matrix_lr),
                (_, Matrices::Muon) => None,
            };
            if let Some(lr) = lr {
                adam.push(AdamSlot::new(name, p, lr, world));
                continue;
            }
            match matrices.iter_mut().find(|(_, m)| m[0].size() == p.size()) {
                Some((names, same)) => {
                    names.push(name.clone());
                    same.push(p.shallow_clone());
                }
                None => matrices.push((vec![name.clone()], vec![p.shallow_clone()])),
            }
        }
        Optimizer {
            config,
            fused: Fused::Reference,
            muon: matrices
                .into_iter()
                .map(|(names, params)| MuonGroup::new(names, params, world))
                .collect(),
            adam,
            rank,
            world,
        }
    }

    /// Runs AdamW, and Muon's passes around Newton-Schulz, with `fused`'s steps (the
    /// model's kernels, on a GPU). Refused, with the step that disagrees, unless each step gives its definition's
    /// result on `device` first.
    pub fn use_fused(&mut self, fused: Fused, device: tch::Device) -> Result<(), String> {
        let checks = cxxlm_cuda::check::optimizer_steps(fused, device);
        match checks.iter().find(|c| !c.ok()) {
            Some(bad) => Err(format!(
                "{} error {:.2e} > {:.0e}",
                bad.name, bad.error, bad.tolerance
            )),
            None => {
                self.fused = fused;
                Ok(())
            }
        }
    }

    /// One update at `lr_scale` of the configured LRs (`step` counts from 0), after
    /// averaging the gradients over the ranks and clipping them to the configured global
    /// norm; none where that norm or `loss` (a device scalar, the same on every rank) is
    /// not finite, decided on the device so that the host need not wait for the passes
    /// before launching the update. Returns the norm before clipping (a device scalar:
    /// reading it waits for the GPU); the weights and the state are those before the step
    /// where it is not finite.
    pub fn step(&mut self, step: u64, lr_scale: f64, loss: &Tensor, comm: &Comm) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let c = &self.config;
        let muon_grads = self
            .muon
            .iter()
            .map(|g| g.gradients(comm))
            .collect::<Result<Vec<_>>>()?;
        let adam_grads = self
            .adam
            .iter()
            .map(|s| s.gradient(comm))
            .collect::<Result<Vec<_>>>()?;
        // One pass over each gradient for its norm; the clipping is applied by the
        // updates as they read the gradients.
        let norms: Vec<Tensor> = muon_grads
            .iter()
            .chain(&adam_grads)
            .map(Tensor::norm)
            .collect();
        let norm_sq = Tensor::stack(&norms, 0)
            .square()
            .sum(Kind::Float)
            .reshape([1]);
        comm.all_reduce_sum(&norm_sq)?;
        let norm = norm_sq.sqrt().reshape([]);
        let grad_scale = match c.grad_clip > 0.0 {
            true => (c.grad_clip / (&norm + 1e-6)).clamp_max(1.0),
            false => norm.ones_like(),
        };
        // 0 makes the updates skip the step.
        let finite = norm.isfinite().logical_and(&loss.isfinite());
        let grad_scale = grad_scale
            .where_self(&finite, &grad_scale.zeros_like())
            .reshape([1]);

        let warm = (step as f64 / c.momentum_warmup_steps.max(1) as f64).min(1.0);
        let momentum = (1.0 - warm) * c.muon_momentum_start + warm * c.muon_momentum;
        for (group, g) in self.muon.iter_mut().zip(&muon_grads) {
            let nesterov = self
                .fused
                .muon_momentum_(g, &grad_scale, &group.momentum, momentum);
            let orthogonal = orthogonalize(self.fused, &nesterov, c.newton_schulz_steps);
            let scale = -c.matrix_lr * lr_scale * group.shape_scale;
            group.apply(&orthogonal, scale, self.fused, comm)?;
        }

        for (slot, g) in self.adam.iter_mut().zip(&adam_grads) {
            let part = slot.part();
            let mine = match &slot.held {
                Held::All(param) => {
                    flat_padded(param, self.world).narrow(0, self.rank as i64 * part, part)
                }
                Held::Part(shard) => shard.weights.shallow_clone(),
            };
            let settings = AdamwStep {
                lr: slot.lr * lr_scale,
                betas: c.betas,
                eps: c.eps,
                weight_decay: c.weight_decay,
                step: step as f64 + 1.0,
            };
            self.fused.adamw_(
                &mine,
                g,
                &grad_scale,
                &slot.exp_avg,
                &slot.exp_avg_sq,
                &settings,
            );
            if let (Held::All(param), true) = (&slot.held, self.world > 1) {
                let whole = comm.all_gather(&mine)?;
                param.view([-1]).copy_(&whole.narrow(0, 0, slot.numel));
            }
        }
        Ok(norm)
    }

    pub fn zero_grad(&mut self) {
        for g in &mut self.muon {
            let (Stack::Whole(shard) | Stack::Part(shard)) = &g.stack;
            let _ = shard.grad.shallow_clone().zero_();
        }
        for s in &mut self.adam {
            s.held.zero_grad();
        }
    }

    /// From now on keeps only this rank's part of every weight, copied out of the whole
    /// weights it was made with (full sharding): the matrices whose Muon state it keeps,
    /// and its part of each flattened AdamW weight. Their gradients are then expected in
    /// [`Optimizer::shard`]'s tensors, averaged over the ranks.
    pub fn shard_weights(&mut self) {
        let mut whole = Vec::new();
        for g in &self.muon {
            if let Stack::Whole(stack) = &g.stack {
                let matrices = (0..g.names.len()).map(|i| stack.weights.select(0, i as i64));
                whole.extend(g.names.iter().cloned().zip(matrices));
            }
        }
        for s in &self.adam {
            if let Held::All(param) = &s.held {
                whole.push((s.name.clone(), param.shallow_clone()));
            }
        }
        for g in &mut self.muon {
            g.stack = Stack::Part(Shard::zeros(&g.momentum.size(), g.momentum.device()));
        }
        for s in &mut self.adam {
            s.held = Held::Part(Shard::zeros(&[s.part()], s.exp_avg.device()));
        }
        self.load_weights(&whole)
            .expect("the weights it was made with fit it");
    }

    /// With full sharding: takes this rank's part of every weight from `weights`, whole
    /// and by name (a checkpoint's).
    pub fn load_weights(&mut self, weights: &[(String, Tensor)]) -> Result<(), String> {
        let _guard = tch::no_grad_guard();
        let flat = |name: &str, numel: i64, device| -> Result<Tensor, String> {
            let t = weights
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| format!("lacks {name}"))?;
            if t.numel() as i64 != numel {
                return Err(format!("{name} has {} elements, not {numel}", t.numel()));
            }
            Ok(t.reshape([-1]).to_device(device))
        };
        for g in &self.muon {
            let Stack::Part(shard) = &g.stack else {
                continue;
            };
            for (i, slot) in g.owned(self.rank) {
                let t = flat(&g.names[i], g.matrix_numel(), shard.weights.device())?;
                shard.weights.select(0, slot as i64).view([-1]).copy_(&t);
            }
        }
        for s in &self.adam {
            let Held::Part(shard) = &s.held else { continue };
            let t = flat(&s.name, s.numel, shard.weights.device())?;
            let part = s.part();
            let mine = flat_padded(&t, self.world).narrow(0, self.rank as i64 * part, part);
            shard.weights.shallow_clone().copy_(&mine);
        }
        Ok(())
    }

    /// Where full sharding keeps weight `name`; None: not one of this optimizer's.
    pub(crate) fn placement(&self, name: &str) -> Option<Placement> {
        for g in &self.muon {
            if let Some(i) = g.names.iter().position(|n| n == name) {
                return Some(Placement::Whole {
                    rank: i / g.per_rank,
                });
            }
        }
        let slot = self.adam.iter().find(|s| s.name == name)?;
        Some(Placement::Flat { part: slot.part() })
    }

    /// This rank's part of weight `name` and of its gradient, flattened: views of what
    /// the optimizer updates in place, with full sharding. None where it keeps no part.
    pub(crate) fn shard(&self, name: &str) -> Option<Shard> {
        for g in &self.muon {
            let (Some(i), Stack::Part(shard)) = (g.names.iter().position(|n| n == name), &g.stack)
            else {
                continue;
            };
            let (_, slot) = g.owned(self.rank).find(|&(j, _)| j == i)?;
            let view = |t: &Tensor| t.select(0, slot as i64).view([-1]);
            return Some(Shard {
                weights: view(&shard.weights),
                grad: view(&shard.grad),
            });
        }
        match &self.adam.iter().find(|s| s.name == name)?.held {
            Held::Part(shard) => Some(Shard {
                weights: shard.weights.shallow_clone(),
                grad: shard.grad.shallow_clone(),
            }),
            Held::All(_) => None,
        }
    }

    /// This rank's state tensors by name: `<param>.momentum` of the matrices it owns;
    /// `<param>.exp_avg` and `<param>.exp_avg_sq`, its part of the flattened state.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for g in &self.muon {
            for (i, part) in g.owned(self.rank) {
                out.push((
                    format!("{}.momentum", g.names[i]),
                    g.momentum.select(0, part as i64),
                ));
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
    /// Restores this rank's part from what [`Optimizer::state`] returned on every rank of
    /// a run (`ranks`, in rank order), whatever its number of ranks was.
    pub fn load_state(&mut self, ranks: &[Vec<(String, Tensor)>]) -> Result<(), String> {
        self.load(ranks, true).map(|_| ())
    }

    /// Starts from the moments of another run's optimizer (`ranks`, as for
    /// [`Optimizer::load_state`]) wherever it kept a state of the same name and shape;
    /// the others stay at zero. Returns how many of this optimizer's state tensors were
    /// carried over, and how many it has.
    pub fn warm_start(&mut self, ranks: &[Vec<(String, Tensor)>]) -> (usize, usize) {
        self.load(ranks, false)
            .expect("a lenient load fails on nothing")
    }

    /// Loads the states found in `ranks`; `strict`: every state must be there.
    fn load(
        &mut self,
        ranks: &[Vec<(String, Tensor)>],
        strict: bool,
    ) -> Result<(usize, usize), String> {
        let _guard = tch::no_grad_guard();
        let (mut loaded, mut all) = (0, 0);
        // A tensor's pieces from every rank, flattened and joined in rank order.
        let whole = |name: &str| -> Result<Tensor, String> {
            let pieces: Vec<Tensor> = ranks
                .iter()
                .flat_map(|r| r.iter().filter(|(n, _)| n == name))
                .map(|(_, t)| t.reshape([-1]))
                .collect();
            if pieces.is_empty() {
                return Err(format!("optimizer state lacks {name}"));
            }
            Ok(Tensor::cat(&pieces, 0))
        };
        // Missing or of another shape: an error when strict, else left at zero.
        let mut found = |name: &str, t: Result<Tensor, String>, fits: &dyn Fn(&Tensor) -> bool| {
            all += 1;
            match t {
                Ok(t) if fits(&t) => {
                    loaded += 1;
                    Ok(Some(t))
                }
                Ok(_) if strict => Err(format!("optimizer state {name} has another shape")),
                Err(e) if strict => Err(e),
                _ => Ok(None),
            }
        };
        for g in &mut self.muon {
            let numel = g.matrix_numel();
            for (i, part) in g.owned(self.rank).collect::<Vec<_>>() {
                let name = format!("{}.momentum", g.names[i]);
                if let Some(t) = found(&name, whole(&name), &|t| t.numel() as i64 == numel)? {
                    let mine = g.momentum.select(0, part as i64);
                    mine.shallow_clone().copy_(&t.view_as(&mine));
                }
            }
        }
        for s in &mut self.adam {
            let numel = s.numel;
            let part = s.part();
            for (suffix, state) in [
                ("exp_avg", &mut s.exp_avg),
                ("exp_avg_sq", &mut s.exp_avg_sq),
            ] {
                let name = format!("{}.{suffix}", s.name);
                // Written by `w` ranks, it holds the state padded to a multiple of `w`.
                let fits =
                    |t: &Tensor| t.size()[0] >= numel && t.size()[0] < numel + ranks.len() as i64;
                if let Some(t) = found(&name, whole(&name), &fits)? {
                    let mine = flat_padded(&t.narrow(0, 0, numel), self.world).narrow(
                        0,
                        self.rank as i64 * part,
                        part,
                    );
                    state.copy_(&mine);
                }
            }
        }
        Ok((loaded, all))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    const FLOAT_CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

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
            let x = orthogonalize(Fused::Reference, &g, 5).to_kind(Kind::Float);
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
        let together = orthogonalize(Fused::Reference, &stack, 5);
        let alone = orthogonalize(Fused::Reference, &stack.select(0, 1), 5);
        let diff = (together.select(0, 1) - alone)
            .abs()
            .max()
            .to_kind(Kind::Float);
        assert!(diff.double_value(&[]) < 1e-2);
    }

    #[test]
    fn gram_newton_schulz_is_the_standard_iteration() {
        tch::manual_seed(1);
        // Singular values from 1 down to 1e-3, where rounding would show first.
        let (u, _) = Tensor::linalg_qr(&Tensor::randn([2, 48, 48], FLOAT_CPU), "reduced");
        let (v, _) = Tensor::linalg_qr(&Tensor::randn([2, 192, 48], FLOAT_CPU), "reduced");
        let spectrum = Tensor::logspace(0.0, -3.0, 48, 10.0, FLOAT_CPU);
        let wide = (u * spectrum.unsqueeze(0)).matmul(&v.transpose(-2, -1));
        for g in [wide.shallow_clone(), wide.transpose(-2, -1)] {
            for steps in [1, 2, 3, 5, 7] {
                let standard = orthogonalize_as(
                    Fused::Reference,
                    &g,
                    steps,
                    NewtonSchulz::Standard,
                    Kind::Float,
                );
                let gram =
                    orthogonalize_as(Fused::Reference, &g, steps, NewtonSchulz::Gram, Kind::Float);
                assert_eq!(gram.size(), g.size());
                let error = (&gram - &standard).norm().double_value(&[])
                    / standard.norm().double_value(&[]);
                assert!(error < 1e-4, "{steps} steps of {:?}: {error}", g.size());
            }
        }
    }

    #[test]
    fn newton_schulz_takes_the_form_with_less_work_in_its_dtype() {
        assert_eq!(NewtonSchulz::cheaper(768, 768), NewtonSchulz::Standard);
        assert_eq!(NewtonSchulz::cheaper(768, 3072), NewtonSchulz::Gram);
        assert_eq!(NewtonSchulz::cheaper(3072, 768), NewtonSchulz::Gram);
        assert_eq!(NewtonSchulz::cheaper(2560, 3840), NewtonSchulz::Standard);
        let g = Tensor::randn([2, 32, 64], FLOAT_CPU);
        assert_eq!(orthogonalize(Fused::Reference, &g, 5).kind(), Kind::Float);
        assert_eq!(newton_schulz_kind(Device::Cuda(0)), Kind::Half);
    }

    #[test]
    fn schedule_warms_up_holds_and_decays() {
        let s = Schedule {
            warmup_frac: 0.1,
            warmdown_frac: 0.3,
            final_lr_frac: 0.1,
            ..Default::default()
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
        let mut opt = Optimizer::new(&params, 768, OptimConfig::default(), 0, 1);
        let norm = opt
            .step(0, 1.0, &Tensor::from(2.5), &Comm::single())
            .unwrap()
            .double_value(&[]);
        assert!((norm - (9.0f64 + 0.25).sqrt()).abs() < 1e-5);
        // First AdamW step moves each weight by lr against the gradient's sign.
        let moved: Vec<f32> = Vec::try_from(&p).unwrap();
        assert!(
            (moved[0] - 0.8).abs() < 1e-5 && (moved[1] + 1.8).abs() < 1e-5,
            "{moved:?}"
        );
    }

    #[test]
    fn adamw_can_update_the_matrices_instead_of_muon() {
        let params = toy_params();
        for (_, p) in &params {
            (p * p.ones_like()).sum(Kind::Float).backward();
        }
        let before: Vec<Tensor> = params.iter().map(|(_, p)| p.detach().copy()).collect();
        let config = OptimConfig {
            matrices: Matrices::Adamw,
            matrix_lr: 0.01,
            grad_clip: 0.0,
            ..Default::default()
        };
        let mut opt = Optimizer::new(&params, 768, config, 0, 1);
        let _norm = opt
            .step(0, 1.0, &Tensor::from(2.5), &Comm::single())
            .unwrap();
        assert!(opt.state().iter().all(|(n, _)| !n.ends_with(".momentum")));
        // A first AdamW step: every matrix weight moves by its LR against the gradient.
        let moved = (&params[2].1.detach() - &before[2]).abs();
        let off = (moved - 0.01).abs().max().double_value(&[]);
        assert!(off < 1e-6, "{off}");
    }

    #[test]
    fn clipping_scales_the_gradients_every_update_reads() {
        // First moments after one step from zero: (1 - beta) times the gradient the update
        // read, for Muon's matrices and AdamW's weights alike.
        let first_moments = |grad_clip: f64| {
            let params = toy_params();
            for (i, (_, p)) in params.iter().enumerate() {
                (p * toy_grad(p, i, 0, 0) * 3.0).sum(Kind::Float).backward();
            }
            let config = OptimConfig {
                grad_clip,
                ..Default::default()
            };
            let mut opt = Optimizer::new(&params, 64, config, 0, 1);
            let norm = opt
                .step(0, 1.0, &Tensor::from(2.5), &Comm::single())
                .unwrap()
                .double_value(&[]);
            let mut state: Vec<(String, Tensor)> = opt
                .state()
                .into_iter()
                .filter(|(n, _)| n.ends_with(".momentum") || n.ends_with(".exp_avg"))
                .collect();
            state.sort_by(|a, b| a.0.cmp(&b.0));
            (norm, state)
        };
        let (norm, unclipped) = first_moments(0.0);
        let (clipped_norm, clipped) = first_moments(1.0);
        assert!(norm > 2.0, "{norm}");
        assert!(
            (clipped_norm - norm).abs() < 1e-9,
            "the norm before clipping is reported"
        );
        assert_eq!(unclipped.len(), 6);
        for ((name, full), (_, scaled)) in unclipped.iter().zip(&clipped) {
            let off = (full / norm - scaled).abs().max().double_value(&[]);
            assert!(off < 1e-6, "{name}: {off}");
        }
    }

    /// Muon updates the model's own weights, from the gradients autograd accumulated in
    /// the model's own gradients, and zeroes those: one step gives its definition.
    #[test]
    fn muon_steps_the_models_weights_and_gradients() {
        let params = toy_params();
        let config = OptimConfig {
            grad_clip: 0.0,
            ..Default::default()
        };
        let mut opt = Optimizer::new(&params, 64, config.clone(), 0, 1);
        for (i, (_, p)) in params.iter().enumerate() {
            (p * toy_grad(p, i, 0, 0)).sum(Kind::Float).backward();
        }
        let before: Vec<Tensor> = params.iter().map(|(_, p)| p.detach().copy()).collect();
        let _norm = opt
            .step(0, 1.0, &Tensor::from(2.5), &Comm::single())
            .unwrap();
        for i in [2, 3, 5] {
            let (name, p) = &params[i];
            // From zero momentum, the Nesterov blend is the gradient scaled, which
            // Newton-Schulz's normalization takes out.
            let update = orthogonalize(
                Fused::Reference,
                &toy_grad(p, i, 0, 0),
                config.newton_schulz_steps,
            );
            let shape_scale = (p.size()[0] as f64 / p.size()[1] as f64).max(1.0).sqrt();
            let want = &before[i] - update * (config.matrix_lr * shape_scale);
            let error = (p.detach() - want).abs().max().double_value(&[]);
            assert!(error < 1e-5, "{name}: {error}");
        }
        opt.zero_grad();
        for (name, p) in &params {
            assert_eq!(
                p.grad().abs().sum(Kind::Float).double_value(&[]),
                0.0,
                "{name}"
            );
        }
    }

    /// A step whose gradient norm or loss is not finite leaves the weights and every
    /// state as they were: the run can be resumed from them.
    #[test]
    fn a_step_that_is_not_finite_changes_nothing() {
        let params = toy_params();
        let mut opt = Optimizer::new(&params, 64, OptimConfig::default(), 0, 1);
        let backward = |poison: f64| {
            for (i, (_, p)) in params.iter().enumerate() {
                (p * toy_grad(p, i, 0, 0) * poison)
                    .sum(Kind::Float)
                    .backward();
            }
        };
        backward(1.0);
        let _norm = opt
            .step(0, 1.0, &Tensor::from(2.5), &Comm::single())
            .unwrap();
        opt.zero_grad();
        let snapshot = |opt: &Optimizer| -> Vec<Tensor> {
            let state = opt.state().into_iter().map(|(_, t)| t.copy());
            params
                .iter()
                .map(|(_, p)| p.detach().copy())
                .chain(state)
                .collect()
        };
        let before = snapshot(&opt);
        for (poison, loss) in [(f64::NAN, 2.5), (1.0, f64::INFINITY), (1.0, f64::NAN)] {
            backward(poison);
            let norm = opt
                .step(1, 1.0, &Tensor::from(loss), &Comm::single())
                .unwrap();
            assert_eq!(norm.double_value(&[]).is_nan(), poison.is_nan());
            opt.zero_grad();
            for (a, b) in snapshot(&opt).iter().zip(&before) {
                assert!(a.equal(b), "a step at loss {loss}, gradient x {poison}");
            }
        }
        backward(1.0);
        let _norm = opt
            .step(1, 1.0, &Tensor::from(2.5), &Comm::single())
            .unwrap();
        assert!(
            !params[2].1.detach().equal(&before[2]),
            "a finite step updates"
        );
    }

    fn toy_params() -> Vec<(String, Tensor)> {
        let shapes: [(&str, [i64; 2]); 6] = [
            ("wte", [10, 4]),
            ("lm_head", [7, 4]),
            ("h.0.q", [4, 4]),
            ("h.1.q", [4, 4]),
            ("h.2.q", [4, 4]),
            ("h.0.fc", [8, 4]),
        ];
        shapes
            .iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let n = shape[0] * shape[1];
                let p = ((Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.37 + i as f64).cos()
                    * 0.5)
                    .view(*shape)
                    .set_requires_grad(true);
                (name.to_string(), p)
            })
            .collect()
    }

    /// A state tensor as plain values: name, elements, shape.
    type Named = (String, Vec<f32>, Vec<i64>);

    /// A different gradient for every parameter, rank and step.
    fn toy_grad(p: &Tensor, i: usize, rank: usize, step: u64) -> Tensor {
        ((Tensor::arange(p.numel() as i64, (Kind::Float, Device::Cpu)) * (1.7 + i as f64)
            + rank as f64 * 3.1
            + step as f64)
            .sin())
        .view_as(p)
    }

    /// Three steps on rank `rank` of `world`; `grads_of` gives each parameter's gradient.
    fn toy_run(
        comm: &Comm,
        grads_of: &dyn Fn(&Tensor, usize, u64) -> Tensor,
    ) -> (Vec<Vec<f32>>, Vec<(String, Tensor)>) {
        let params = toy_params();
        let config = OptimConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = Optimizer::new(&params, 64, config, comm.rank(), comm.size());
        for step in 0..3 {
            for (i, (_, p)) in params.iter().enumerate() {
                (p * grads_of(p, i, step)).sum(Kind::Float).backward();
            }
            let _norm = opt.step(step, 1.0, &Tensor::from(2.5), comm).unwrap();
            opt.zero_grad();
        }
        let values = params
            .iter()
            .map(|(_, p)| Vec::<f32>::try_from(&p.detach().reshape([-1])).unwrap())
            .collect();
        let state = opt
            .state()
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect();
        (values, state)
    }

    fn assert_close(a: &[Vec<f32>], b: &[Vec<f32>]) {
        for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
            assert!((x - y).abs() < 1e-3, "{x} vs {y}");
        }
    }

    /// The optimizer state of a run, merged from its ranks into one rank.
    fn merged(ranks: &[Vec<(String, Tensor)>]) -> Vec<Vec<f32>> {
        let mut one = Optimizer::new(&toy_params(), 64, OptimConfig::default(), 0, 1);
        one.load_state(ranks).unwrap();
        let mut state = one.state();
        state.sort_by(|a, b| a.0.cmp(&b.0));
        state
            .iter()
            .map(|(_, t)| Vec::<f32>::try_from(&t.reshape([-1])).unwrap())
            .collect()
    }

    #[test]
    fn sharded_over_ranks_it_equals_one_rank_on_the_mean_gradient() {
        let (single_params, single_state) = toy_run(&Comm::single(), &|p, i, step| {
            (toy_grad(p, i, 0, step) + toy_grad(p, i, 1, step)) / 2.0
        });
        let runs = crate::dist::with_ranks(2, |comm| {
            let out = toy_run(&comm, &|p, i, step| toy_grad(p, i, comm.rank(), step));
            comm.finish().unwrap();
            out
        });
        for (params, _) in &runs {
            assert_close(params, &single_params);
        }
        // Each rank holds part of the state; together they are the one-rank state, and
        // they load into any number of ranks.
        let two: Vec<Vec<(String, Tensor)>> = runs.into_iter().map(|(_, s)| s).collect();
        assert!(two[0].len() < single_state.len());
        let expected = merged(&[single_state]);
        assert_close(&merged(&two), &expected);
        // Tensors do not cross threads by reference: hand the values over.
        let two: Vec<Vec<Named>> = two
            .iter()
            .map(|r| {
                r.iter()
                    .map(|(n, t)| {
                        (
                            n.clone(),
                            Vec::<f32>::try_from(&t.reshape([-1])).unwrap(),
                            t.size(),
                        )
                    })
                    .collect()
            })
            .collect();
        let three = crate::dist::with_ranks(3, move |comm| {
            let two: Vec<Vec<(String, Tensor)>> = two
                .iter()
                .map(|r| {
                    r.iter()
                        .map(|(n, v, shape)| {
                            (n.clone(), Tensor::from_slice(v).view(shape.as_slice()))
                        })
                        .collect()
                })
                .collect();
            let mut opt = Optimizer::new(&toy_params(), 64, OptimConfig::default(), comm.rank(), 3);
            opt.load_state(&two).unwrap();
            comm.finish().unwrap();
            opt.state()
        });
        assert_close(&merged(&three), &expected);
    }
}
