//! `cxxlm train check-kernels` and `cxxlm train profile`: the fused training kernels
//! against their definitions, and their speed and memory against autograd.

use anyhow::{bail, Result};
use cxxlm::cli::ProfileArgs;
use cxxlm::outln;
use cxxlm_model::{Gpt, ModelConfig, Phases};
use cxxlm_train::memory::gib;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn require_cuda(device: usize) -> Result<()> {
    if !tch::Cuda::is_available() || device >= tch::Cuda::device_count() as usize {
        bail!("this command needs CUDA device {device}");
    }
    Ok(())
}

/// Prints each comparison; fails if any is out of tolerance.
pub fn check(device: usize) -> Result<()> {
    require_cuda(device)?;
    let mut checks = cxxlm_cuda::check::kernels(device).map_err(anyhow::Error::msg)?;
    checks.extend(cxxlm_train::optim::newton_schulz_checks(Device::Cuda(
        device,
    )));
    // The step of d12 (heads of 128) and of the 3B preset (heads of 80, GQA), on rows
    // and on examples packed into rows (SFT's batches).
    for preset in ["d12", "3b"] {
        let like = ModelConfig::preset(preset, 32_768)?;
        for packed in [false, true] {
            let step = cxxlm_model::check_explicit_pass(device, &like, packed)
                .map_err(anyhow::Error::msg)?;
            for mut c in step {
                c.name = format!("{preset}: {}", c.name);
                checks.push(c);
            }
        }
    }
    outln!("| check | error | tolerance | |\n|---|---:|---:|---|")?;
    for c in &checks {
        let verdict = if c.ok() { "ok" } else { "FAILED" };
        outln!(
            "| {} | {:.2e} | {:.0e} | {verdict} |",
            c.name,
            c.error,
            c.tolerance
        )?;
    }
    let failed = checks.iter().filter(|c| !c.ok()).count();
    if failed > 0 {
        bail!("{failed} of {} checks out of tolerance", checks.len());
    }
    outln!("all {} checks within tolerance", checks.len())?;
    Ok(())
}

/// Autograd, then the explicit pass, on the same model and tokens: median milliseconds
/// per forward and backward pass, tokens per second, MFU of those passes and the
/// allocator's peak; then the explicit pass's phases.
pub fn profile(args: ProfileArgs) -> Result<()> {
    require_cuda(args.device)?;
    let config = ModelConfig::preset(&args.preset, args.vocab)?;
    let dev = Device::Cuda(args.device);
    let mut model = Gpt::new(config.clone(), dev, 0)?;
    let t = config.seq_len as i64;
    let tokens = Tensor::randint(args.vocab as i64, [args.batch, t + 1], (Kind::Int64, dev));
    let (inputs, targets) = (
        tokens.narrow(1, 0, t).contiguous(),
        tokens.narrow(1, 1, t).contiguous(),
    );
    let sync = || tch::Cuda::synchronize(args.device as i64);
    let zero_grads = |m: &Gpt| {
        for (_, p) in m.params() {
            p.shallow_clone().zero_grad();
        }
    };
    for path in ["autograd", "explicit"] {
        if path == "explicit" {
            model.use_fused_kernels(false).map_err(anyhow::Error::msg)?;
        }
        let mut times = Vec::new();
        let mut loss = 0.0;
        for step in 0..args.steps + 2 {
            if step == 2 {
                cxxlm_cuda::reset_peak_memory(args.device);
            }
            sync();
            let started = Instant::now();
            let n = inputs.numel() as f64;
            let l = model.forward_backward(&inputs, &targets, None, 1.0 / n) / n;
            sync();
            times.push(started.elapsed().as_secs_f64());
            loss = l.double_value(&[]);
            zero_grads(&model);
        }
        let mut timed = times[2..].to_vec();
        timed.sort_by(f64::total_cmp);
        let seconds = timed[timed.len() / 2];
        let tok_s = (args.batch * t) as f64 / seconds;
        let peak = gib(cxxlm_cuda::peak_memory(args.device)
            .unwrap_or_default()
            .allocated);
        outln!(
            "RESULT impl=cxxlm-{path} preset={} B={} T={t} fwd_bwd_ms={:.2} tok_s={tok_s:.0} mfu={:.4} peak_alloc_gib={peak:.2} loss={loss:.4}",
            args.preset,
            args.batch,
            seconds * 1e3,
            config.flops_per_token() * tok_s / 989e12,
        )?;
    }
    let mut phases = Phases::default();
    let rounds = 3;
    for _ in 0..rounds {
        let _ = model
            .forward_backward_profiled(&inputs, &targets, &mut phases)
            .map_err(anyhow::Error::msg)?;
        zero_grads(&model);
    }
    let total: f64 = phases.seconds.iter().map(|(_, s)| s).sum();
    outln!("| explicit pass, synchronized per phase | ms | share |\n|---|---:|---:|")?;
    for (name, s) in &phases.seconds {
        outln!(
            "| {name} | {:.2} | {:.1}% |",
            s * 1e3 / rounds as f64,
            100.0 * s / total
        )?;
    }
    outln!("| total | {:.2} | |", total * 1e3 / rounds as f64)?;
    Ok(())
}
