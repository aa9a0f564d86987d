//! `cxxlm train pretrain`.

use anyhow::{bail, Context, Result};
use cxxlm::cli::{set, TrainCommand};
use cxxlm::{interrupt, lock, outln};

use crate::kernels;
use cxxlm_train::{pretrain, Event, TrainConfig};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

pub fn load_config(path: Option<&PathBuf>, overrides: &[String]) -> Result<TrainConfig> {
    let mut doc: toml::Table = match path {
        Some(p) => toml::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("parsing {}", p.display()))?,
        None => Default::default(),
    };
    for o in overrides {
        set(&mut doc, o)?;
    }
    Ok(TrainConfig::from_table(doc)?)
}

pub fn run(cmd: TrainCommand) -> Result<()> {
    let args = match cmd {
        TrainCommand::Pretrain(args) => args,
        TrainCommand::CheckKernels { device } => return kernels::check(device),
        TrainCommand::Profile(args) => return kernels::profile(args),
    };
    let mut overrides = args.overrides.clone();
    if let Some(p) = &args.pack {
        overrides.push(format!("data.pack={:?}", p.display().to_string()));
    }
    if let Some(o) = &args.out {
        overrides.push(format!("out={:?}", o.display().to_string()));
    }
    let config = load_config(args.config.as_ref(), &overrides)?;
    config.validate()?;
    if args.check {
        return Ok(());
    }
    if config.data.pack.as_os_str().is_empty() || config.out.as_os_str().is_empty() {
        bail!("say where the packed tokens are and where the run goes: --pack DIR --out DIR (or data.pack and out in --config)");
    }
    std::fs::create_dir_all(&config.out)
        .with_context(|| format!("creating {}", config.out.display()))?;
    let rank0 = cxxlm_train::dist::World::from_env()?.rank == 0;
    // Rank 0 writes for all ranks of its job; another job on this directory is refused.
    let _lock = match rank0 {
        true => Some(lock::hold(
            &config.out.join("train.lock"),
            &format!("the training run {}", config.out.display()),
        )?),
        false => None,
    };
    if rank0 {
        std::fs::write(
            config.out.join("config.toml"),
            toml::to_string_pretty(&config).context("config")?,
        )?;
    }
    interrupt::install();
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut samples = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(config.out.join("samples.jsonl"))?;
    let state = pretrain(
        &config,
        args.resume,
        &mut |event| match event {
            Event::Start {
                model,
                params,
                device,
                ranks,
                steps,
                grad_accum,
                resumed_from,
                backward,
            } => {
                eprintln!(
                    "model: depth {} width {} heads {}/{} seq {} vocab {}, {:.1}M parameters on {device}{}; {steps} steps, {grad_accum} micro-batches each{}; backward: {backward}",
                    model.depth, model.width, model.heads, model.kv_heads, model.seq_len, model.vocab_size,
                    params as f64 / 1e6,
                    if ranks > 1 { format!(" x {ranks} ranks") } else { String::new() },
                    resumed_from.map_or(String::new(), |s| format!(", resumed after step {s}"))
                );
            }
            Event::Step {
                step,
                steps,
                loss,
                loss_ema,
                lr_scale,
                tok_s,
                mfu,
                gpu_memory_gib,
            } => {
                let line = format!(
                    "step {step}/{steps} | loss {loss:.4} (ema {loss_ema:.4}) | lr x{lr_scale:.3} | {:.0} tok/s | MFU {:.1}% | GPU {gpu_memory_gib:.1} GiB | {:.0}s",
                    tok_s,
                    mfu * 100.0,
                    started.elapsed().as_secs_f64()
                );
                if tty {
                    eprint!("\r\x1b[2K{line}");
                } else if step % args.log_every == 0 || step == steps {
                    eprintln!("{line}");
                }
            }
            Event::Eval { step, val_bpb } => {
                eprintln!(
                    "{}step {step}: validation {val_bpb:.4} bits per byte",
                    if tty { "\n" } else { "" }
                );
            }
            Event::Sample {
                step,
                prompt,
                completion,
            } => {
                let record =
                    serde_json::json!({"step": step, "prompt": prompt, "completion": completion});
                let _ = writeln!(samples, "{record}");
                eprintln!("  sample: {:?}", format!("{prompt}{completion}"));
            }
            Event::StepsFitted {
                steps,
                step_seconds,
            } => eprintln!(
                "{}time budget: {steps} steps of {step_seconds:.3}s",
                if tty { "\n" } else { "" }
            ),
            Event::Warning(w) => eprintln!("{}warning: {w}", if tty { "\n" } else { "" }),
            Event::Checkpoint(dir) => {
                if !tty {
                    eprintln!("checkpoint {}", dir.display());
                }
            }
        },
        &|step| interrupt::requested() || args.stop_at.is_some_and(|s| step >= s),
    )?;
    if tty {
        eprintln!();
    }
    if !rank0 {
        return Ok(());
    }
    outln!(
        "{} of {} steps, {} tokens, {:.1}s: {}",
        state.step,
        state.total_steps,
        state.tokens,
        started.elapsed().as_secs_f64(),
        config.out.display()
    )?;
    Ok(())
}
