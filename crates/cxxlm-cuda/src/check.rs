//! Each fused kernel, and the attention through the shim, against its definition in
//! plain tch operations on fresh random inputs: the forward's outputs, and the gradients
//! that autograd derives from the definition against the kernels' backward. Shapes cover
//! the presets (head dim 128 and 80, GQA, widths with and without 8-element rows).

use tch::{Device, Kind, Reduction, Tensor};

use crate::{attention, Fused};

/// One compared output and its error relative to the definition.
pub struct Check {
    pub name: String,
    pub error: f64,
    pub tolerance: f64,
}

impl Check {
    pub fn ok(&self) -> bool {
        self.error <= self.tolerance
    }

    /// `error` of `name` (a NaN counts as infinitely wrong).
    fn new(name: String, error: f64, tolerance: f64) -> Check {
        let error = if error.is_finite() {
            error
        } else {
            f64::INFINITY
        };
        Check {
            name,
            error,
            tolerance,
        }
    }

    /// The norm of the difference relative to the definition's norm: for quantities that
    /// differ by rounding everywhere (bf16 against bf16 by another route).
    pub fn relative_l2(name: String, got: &Tensor, want: &Tensor, tolerance: f64) -> Check {
        let (got, want) = (got.to_kind(Kind::Float), want.to_kind(Kind::Float));
        let scale = want.norm().double_value(&[]).max(1e-30);
        Check::new(
            name,
            (got - want).norm().double_value(&[]) / scale,
            tolerance,
        )
    }
}

/// Outputs in bf16 against fp32 definitions: a few units of bf16's 2^-8.
const BF16_TOLERANCE: f64 = 3e-2;

/// The largest difference relative to the definition's largest magnitude.
fn compare(name: String, got: &Tensor, want: &Tensor, tolerance: f64) -> Check {
    let (got, want) = (got.to_kind(Kind::Float), want.to_kind(Kind::Float));
    let scale = want.abs().max().double_value(&[]).max(1e-30);
    Check::new(
        name,
        (got - want).abs().max().double_value(&[]) / scale,
        tolerance,
    )
}

/// A bf16 tensor of N(0, std^2) values, and the same values in fp32 as a leaf that
/// records gradients.
fn random(shape: &[i64], std: f64, device: Device) -> (Tensor, Tensor) {
    let x = (Tensor::randn(shape, (Kind::Float, device)) * std).to_kind(Kind::BFloat16);
    let leaf = x.to_kind(Kind::Float).set_requires_grad(true);
    (x, leaf)
}

fn rms_norm(x: &Tensor, eps: f64) -> Tensor {
    let d = *x.size().last().expect("dimensions");
    x.rms_norm([d], None::<Tensor>, eps)
}

/// Compares every kernel on CUDA device `device`; the kernels are compiled first.
pub fn kernels(device: usize) -> Result<Vec<Check>, String> {
    let dev = Device::Cuda(device);
    Ok(against_definitions(Fused::for_device(dev)?, dev))
}

/// Compares each of `fused`'s steps on `dev` with its definition.
pub fn against_definitions(fused: Fused, dev: Device) -> Vec<Check> {
    let eps = 0.0078125;
    let mut checks = Vec::new();
    tch::manual_seed(0);

    for (rows, cols) in [(4096, 768), (1000, 1280), (333, 300)] {
        let tag = format!("{rows}x{cols}");
        let (x, xf) = random(&[rows, cols], 1.5, dev);
        let want = rms_norm(&xf, eps);
        let (y, rstd) = fused.rmsnorm(&x, eps);
        checks.push(compare(
            format!("rmsnorm forward {tag}"),
            &y,
            &want,
            BF16_TOLERANCE,
        ));
        let rstd_want = (xf.square().mean_dim(-1, false, Kind::Float) + eps).rsqrt();
        checks.push(compare(
            format!("rmsnorm rstd {tag}"),
            &rstd,
            &rstd_want,
            1e-3,
        ));
        let (dy, dyf) = random(&[rows, cols], 1.0, dev);
        (&want * &dyf).sum(Kind::Float).backward();
        let dx = fused.rmsnorm_backward(&dy, &y, &rstd, None);
        checks.push(compare(
            format!("rmsnorm backward {tag}"),
            &dx,
            &xf.grad(),
            BF16_TOLERANCE,
        ));
        let (res, resf) = random(&[rows, cols], 1.0, dev);
        let dx = fused.rmsnorm_backward(&dy, &y, &rstd, Some(&res));
        let with_residual = xf.grad() + resf.detach();
        checks.push(compare(
            format!("rmsnorm backward + residual {tag}"),
            &dx,
            &with_residual,
            BF16_TOLERANCE,
        ));
    }

    // (batch, time, heads, kv heads, dim): d12 and the 3B preset's GQA with dim 80.
    for (b, t, heads, kv, dim) in [(4, 256, 6, 6, 128), (2, 128, 4, 2, 80)] {
        let tag = format!("B{b} T{t} H{heads}/{kv} D{dim}");
        let all = heads + 2 * kv;
        let half = dim / 2;
        let angles = Tensor::randn([t, half], (Kind::Float, dev)) * 3.0;
        let (cos, sin) = (
            angles.cos().to_kind(Kind::BFloat16),
            angles.sin().to_kind(Kind::BFloat16),
        );
        let (qkv, qkvf) = random(&[b, t, all, dim], 1.0, dev);
        let (c, s) = (
            cos.to_kind(Kind::Float).view([1, t, 1, half]),
            sin.to_kind(Kind::Float).view([1, t, 1, half]),
        );
        let x = qkvf.narrow(2, 0, heads + kv);
        let (x1, x2) = (x.narrow(3, 0, half), x.narrow(3, half, half));
        let rotated = Tensor::cat(&[&x1 * &c + &x2 * &s, &x2 * &c - &x1 * &s], 3);
        let want = Tensor::cat(
            &[rms_norm(&rotated, eps), qkvf.narrow(2, heads + kv, kv)],
            2,
        );
        let out = qkv.copy();
        let rstd = fused.rope_norm_(&out, &cos, &sin, heads, eps);
        checks.push(compare(
            format!("rotary+qk-norm forward {tag}"),
            &out,
            &want,
            BF16_TOLERANCE,
        ));
        // The attention's gradients arrive as (B, H, T, D) tensors viewed as (B, T, H, D).
        let grad = |h: i64| random(&[b, h, t, dim], 1.0, dev);
        let ((gq, gqf), (gk, gkf), (gv, gvf)) = (grad(heads), grad(kv), grad(kv));
        let upstream = Tensor::cat(
            &[
                gqf.transpose(1, 2),
                gkf.transpose(1, 2),
                gvf.transpose(1, 2),
            ],
            2,
        );
        (&want * upstream.detach()).sum(Kind::Float).backward();
        let dqkv = out.copy();
        fused.rope_norm_backward_(
            &gq.transpose(1, 2),
            &gk.transpose(1, 2),
            &gv.transpose(1, 2),
            &dqkv,
            &rstd,
            &cos,
            &sin,
        );
        checks.push(compare(
            format!("rotary+qk-norm backward {tag}"),
            &dqkv,
            &qkvf.grad(),
            BF16_TOLERANCE,
        ));

        let heads_first = |x: &Tensor, from: i64, n: i64| x.narrow(2, from, n).transpose(1, 2);
        let (q, k, v) = (
            heads_first(&out, 0, heads),
            heads_first(&out, heads, kv),
            heads_first(&out, heads + kv, kv),
        );
        let (y, saved) = attention::forward(&q, &k, &v);
        let leaf = |x: &Tensor| x.to_kind(Kind::Float).set_requires_grad(true);
        let (qf, kf, vf) = (leaf(&q), leaf(&k), leaf(&v));
        let (want, reference) = attention::reference(&qf, &kf, &vf, None);
        checks.push(compare(
            format!("attention forward {tag}"),
            &y,
            &want,
            BF16_TOLERANCE,
        ));
        let (dout, doutf) = random(&[b, t, heads, dim], 1.0, dev);
        let dout = dout.transpose(1, 2);
        let (dq, dk, dv) = attention::backward(&saved, &dout, &q, &k, &v, &y);
        let (wq, wk, wv) =
            attention::backward(&reference, &doutf.transpose(1, 2), &qf, &kf, &vf, &want);
        for (name, got, want) in [("q", dq, wq), ("k", dk, wk), ("v", dv, wv)] {
            checks.push(compare(
                format!("attention backward d{name} {tag}"),
                &got,
                &want,
                BF16_TOLERANCE,
            ));
        }

        // Examples packed side by side: attention within each, against each alone.
        let lengths: Vec<Vec<usize>> = (0..b as usize)
            .map(|r| {
                let t = t as usize;
                vec![t / 4 + r, t / 2, t - t / 4 - r - t / 2]
            })
            .collect();
        checks.extend(segments_against_each_alone(&out, heads, kv, &lengths));
    }

    // (rows, heads, kv heads, dim, capacity): d12's heads over several splits, the 3B
    // preset's GQA, and enough rows x heads for the kernel's widest splits.
    for (n, heads, kv, dim, capacity) in [
        (5, 6, 6, 128, 300),
        (3, 4, 2, 80, 700),
        (96, 6, 6, 128, 1100),
    ] {
        checks.push(decode_attention(fused, n, heads, kv, dim, capacity, dev));
    }

    for n in [1 << 20, 1000] {
        let (u, uf) = random(&[n], 1.0, dev);
        let want = uf.relu().square();
        fused.relu2_(&u);
        checks.push(compare(
            format!("relu^2 forward {n}"),
            &u,
            &want,
            BF16_TOLERANCE,
        ));
        let (da, daf) = random(&[n], 1.0, dev);
        (&want * &daf.detach()).sum(Kind::Float).backward();
        fused.relu2_backward_(&da, &u);
        checks.push(compare(
            format!("relu^2 backward {n}"),
            &da,
            &uf.grad(),
            BF16_TOLERANCE,
        ));
    }

    // The 3B preset's hidden width, and one that takes the unvectorized kernels.
    for (rows, hidden) in [(2048, 6912), (100, 300)] {
        let tag = format!("{rows}x{hidden}");
        let (fc, fcf) = random(&[rows, 2 * hidden], 2.0, dev);
        let parts = fcf.chunk(2, -1);
        let want = parts[0].silu() * &parts[1];
        checks.push(compare(
            format!("SwiGLU forward {tag}"),
            &fused.swiglu(&fc),
            &want,
            BF16_TOLERANCE,
        ));
        let (da, daf) = random(&[rows, hidden], 1.0, dev);
        (&want * &daf.detach()).sum(Kind::Float).backward();
        checks.push(compare(
            format!("SwiGLU backward {tag}"),
            &fused.swiglu_backward(&da, &fc),
            &fcf.grad(),
            BF16_TOLERANCE,
        ));
    }

    for (rows, vocab) in [(512, 32768), (100, 300)] {
        let tag = format!("{rows}x{vocab}");
        let cap = 15.0;
        let (logits, lf) = random(&[rows, vocab], 8.0, dev);
        let targets = Tensor::randint(vocab, [rows], (Kind::Int64, dev));
        let _ = targets.narrow(0, 0, rows / 10).fill_(-1);
        let z = (&lf / cap).tanh() * cap;
        let want = z.cross_entropy_loss::<Tensor>(&targets, None, Reduction::None, -1, 0.0);
        let scale = 1.0 / rows as f64;
        (want.sum(Kind::Float) * scale).backward();
        let losses = fused.softcap_cross_entropy_(&logits, &targets, cap, scale);
        checks.push(compare(
            format!("softcap cross-entropy loss {tag}"),
            &losses,
            &want,
            2e-3,
        ));
        checks.push(compare(
            format!("softcap cross-entropy gradient {tag}"),
            &logits,
            &lf.grad(),
            BF16_TOLERANCE,
        ));
    }
    checks.extend(optimizer_steps(fused, dev));
    checks
}

/// Compares the optimizer's steps (Muon's passes around Newton-Schulz, AdamW) on `dev`
/// with their definitions: before a run trusts the kernels with its weights.
pub fn optimizer_steps(fused: Fused, dev: Device) -> Vec<Check> {
    let mut checks = Vec::new();
    // Values spread like random ones without drawing from torch's generators, which the
    // run that calls this goes on to use.
    let mut seed = 0.0;
    let mut state = |scale: f64| {
        seed += 1.0;
        (Tensor::arange(1 << 20, (Kind::Float, dev)) * (seed * 12.9898)).sin() * (scale * 1.7)
    };
    let (g, m) = (state(1e-3), state(1e-3));
    let (beta, clip) = (0.95, 0.5);
    let grad_scale = Tensor::from_slice(&[clip as f32]).to_device(dev);
    let want_m = &m + (&g * clip - &m) * (1.0 - beta);
    let want_blend = &g * clip + (&want_m - &g * clip) * beta;
    let blend = fused.muon_momentum_(&g, &grad_scale, &m, beta);
    checks.push(compare("Muon momentum".into(), &m, &want_m, 1e-5));
    checks.push(compare(
        "Muon Nesterov blend".into(),
        &blend,
        &want_blend,
        BF16_TOLERANCE,
    ));
    // Where Newton-Schulz's Gram form starts: each matrix over its norm, in fp16.
    let stack = blend.view([4, 512, 512]);
    let want = Fused::Reference.normalize_matrices(&stack, Kind::Float);
    checks.push(compare(
        "Muon blend normalized into fp16".into(),
        &fused.normalize_matrices(&stack, Kind::Half),
        &want,
        1e-2,
    ));
    // The update as Newton-Schulz leaves a tall matrix's: transposed, not contiguous.
    let p = state(0.1).view([1024, 1024]);
    let update = state(1.0).to_kind(Kind::BFloat16).view([1024, 1024]).tr();
    let want = &p + update.to_kind(Kind::Float) * -0.02;
    fused.muon_update_(&p, &update, -0.02);
    checks.push(compare("Muon update".into(), &p, &want, 1e-5));
    let p = want.copy();
    let update = update.to_kind(Kind::Half);
    let want = &p + update.to_kind(Kind::Float) * -0.02;
    fused.muon_update_(&p, &update, -0.02);
    checks.push(compare("Muon update from fp16".into(), &p, &want, 1e-5));

    let (p, g, m, v) = (state(0.1), state(1e-3), state(1e-4), state(1e-4).square());
    let settings = crate::fused::AdamwStep {
        lr: 0.004,
        betas: [0.8, 0.95],
        eps: 1e-10,
        weight_decay: 0.1,
        step: 3.0,
    };
    let want = [p.copy(), m.copy(), v.copy()];
    let unscaled = Tensor::from_slice(&[1f32]).to_device(dev);
    Fused::Reference.adamw_(
        &want[0],
        &(&g * clip),
        &unscaled,
        &want[1],
        &want[2],
        &settings,
    );
    let got = [p.copy(), m.copy(), v.copy()];
    fused.adamw_(&got[0], &g, &grad_scale, &got[1], &got[2], &settings);
    for (name, got, want) in [
        ("weights", &got[0], &want[0]),
        ("exp_avg", &got[1], &want[1]),
        ("exp_avg_sq", &got[2], &want[2]),
    ] {
        checks.push(compare(format!("AdamW {name}"), got, want, 1e-5));
    }

    // A scale of 0 skips the step, whatever the gradient holds.
    let (skip, poisoned) = (grad_scale.zeros_like(), g.full_like(f64::NAN));
    let kept = got.each_ref().map(Tensor::copy);
    fused.adamw_(&got[0], &poisoned, &skip, &got[1], &got[2], &settings);
    let kept_m = m.copy();
    let blend = fused.muon_momentum_(&poisoned, &skip, &m, beta);
    for (name, got, want) in [
        ("AdamW weights", &got[0], &kept[0]),
        ("AdamW exp_avg", &got[1], &kept[1]),
        ("AdamW exp_avg_sq", &got[2], &kept[2]),
        ("Muon momentum", &m, &kept_m),
        ("Muon Nesterov blend (zeros)", &blend, &blend.zeros_like()),
    ] {
        checks.push(compare(format!("{name}, step skipped"), got, want, 0.0));
    }
    checks
}

/// The attention of a decoding step over a cache of `n + 2` slots, rows in shuffled slots at
/// positions from 0 to the last, against each row's attention alone over its filled
/// positions (the logits scaled by 0.7 / sqrt(dim) instead of the default).
pub fn decode_attention(
    fused: Fused,
    n: i64,
    heads: i64,
    kv: i64,
    dim: i64,
    capacity: i64,
    dev: Device,
) -> Check {
    let tag = format!("{n} rows H{heads}/{kv} D{dim}, capacity {capacity}");
    let slots = n + 2;
    let (keys, _) = random(&[slots, kv, capacity, dim], 1.0, dev);
    let (values, _) = random(&[slots, kv, capacity, dim], 1.0, dev);
    let (q, _) = random(&[n, heads, dim], 1.0, dev);
    let order: Vec<i64> = (0..n).map(|i| (i * 7 + 3) % slots).collect();
    let positions: Vec<i64> = (0..n)
        .map(|i| match i {
            0 => 0,
            1 => capacity - 1,
            _ => (i * 389 + 17) % capacity,
        })
        .collect();
    let on = |v: &[i64]| Tensor::from_slice(v).to_device(dev);
    let scale = 0.7 / (dim as f64).sqrt();
    let got = fused.decode_attention(&q, &keys, &values, &on(&order), &on(&positions), scale);
    let rows: Vec<Tensor> = (0..n as usize)
        .map(|i| {
            let filled = |x: &Tensor| {
                x.select(0, order[i])
                    .narrow(1, 0, positions[i] + 1)
                    .unsqueeze(0)
            };
            let query = q.narrow(0, i as i64, 1).unsqueeze(2).to_kind(Kind::Float) * 0.7;
            let all = Tensor::ones([1, 1, 1, positions[i] + 1], (Kind::Bool, dev));
            let (y, _) = attention::reference(&query, &filled(&keys), &filled(&values), Some(all));
            y.squeeze_dim(2)
        })
        .collect();
    compare(
        format!("decoding attention {tag}"),
        &got,
        &Tensor::cat(&rows, 0),
        BF16_TOLERANCE,
    )
}

/// Attention within segments of the rotated q|k|v `(B, T, heads + 2 kv, D)` against the
/// attention of each segment alone: outputs, and the gradients of q, k and v.
fn segments_against_each_alone(
    qkv: &Tensor,
    heads: i64,
    kv: i64,
    lengths: &[Vec<usize>],
) -> Vec<Check> {
    let [b, t, _, dim] = qkv.size()[..] else {
        unreachable!("4 dimensions")
    };
    let tag = format!("B{b} T{t} H{heads}/{kv} D{dim}, segments {lengths:?}");
    let segments = attention::Segments::new(lengths, t as usize, qkv.device());
    let (q, k, v) = (
        qkv.narrow(2, 0, heads),
        qkv.narrow(2, heads, kv),
        qkv.narrow(2, heads + kv, kv),
    );
    let (y, saved) = attention::forward_segments(&q, &k, &v, &segments);
    let leaf = |x: &Tensor| x.to_kind(Kind::Float).set_requires_grad(true);
    let (qf, kf, vf) = (leaf(&q), leaf(&k), leaf(&v));
    let rows: Vec<Tensor> = lengths
        .iter()
        .enumerate()
        .map(|(r, row)| {
            let mut start = 0;
            let pieces: Vec<Tensor> = row
                .iter()
                .map(|&n| {
                    let piece = |x: &Tensor| {
                        x.narrow(0, r as i64, 1)
                            .narrow(1, start, n as i64)
                            .transpose(1, 2)
                    };
                    let (o, _) = attention::reference(&piece(&qf), &piece(&kf), &piece(&vf), None);
                    start += n as i64;
                    o.transpose(1, 2)
                })
                .collect();
            Tensor::cat(&pieces, 1)
        })
        .collect();
    let want = Tensor::cat(&rows, 0);
    let mut checks = vec![compare(
        format!("attention within segments, forward {tag}"),
        &y,
        &want,
        BF16_TOLERANCE,
    )];
    let (dout, doutf) = random(&[b, t, heads, dim], 1.0, qkv.device());
    (&want * &doutf).sum(Kind::Float).backward();
    let (dq, dk, dv) = attention::backward_segments(&saved, &dout, &q, &k, &v, &y);
    for (name, got, leaf) in [("q", dq, &qf), ("k", dk, &kf), ("v", dv, &vf)] {
        checks.push(compare(
            format!("attention within segments, backward d{name} {tag}"),
            &got,
            &leaf.grad(),
            BF16_TOLERANCE,
        ));
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU path's steps (the kernels' reference) against the same definitions.
    #[test]
    fn reference_steps_match_their_definitions() {
        let checks = against_definitions(Fused::Reference, Device::Cpu);
        assert!(checks.len() > 30);
        for c in &checks {
            assert!(c.ok(), "{}: {} > {}", c.name, c.error, c.tolerance);
        }
    }
}
