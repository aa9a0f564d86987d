//! `cxxlm train pretrain` and `cxxlm train sft`.

use anyhow::{bail, Context, Result};
use cxxlm::cli::{
    set, EmbedArgs, MemoryArgs, PretrainArgs, RlArgs, SftArgs, StageArgs, TrainCommand,
};
use cxxlm::{interrupt, lock, outln};

use crate::sample::run_tokenizer;
use crate::{fit, kernels};
use cxxlm_train::checkpoint::TrainerState;
use cxxlm_train::memory::{gib, MemoryPlan};
use cxxlm_train::trainer::Common;
use cxxlm_train::{EmbedConfig, Event, RlConfig, SftConfig, TrainConfig};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
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
    match cmd {
        TrainCommand::Pretrain(args) => pretrain_command(args),
        TrainCommand::Sft(args) => sft_command(args),
        TrainCommand::Rl(args) => rl_command(args),
        TrainCommand::Embed(args) => embed_command(args),
        TrainCommand::CheckKernels { device } => kernels::check(device),
        TrainCommand::Profile(args) => kernels::profile(args),
    }
}

/// A stage's config as TOML: `--config`, then the shorthand flags (`(key, value)`,
/// dotted keys), then the `--set`s.
fn config_doc(args: &StageArgs, shorthands: Vec<(&str, toml::Value)>) -> Result<toml::Table> {
    let mut doc: toml::Table = match &args.config {
        Some(p) => toml::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("parsing {}", p.display()))?,
        None => Default::default(),
    };
    let out = args.out.as_ref().map(|o| ("out", path_value(o)));
    for (key, value) in shorthands.into_iter().chain(out) {
        let (section, name) = key.split_once('.').unwrap_or(("", key));
        let table = match section {
            "" => &mut doc,
            s => doc
                .entry(s)
                .or_insert_with(|| toml::Value::Table(Default::default()))
                .as_table_mut()
                .with_context(|| format!("{s} is not a table"))?,
        };
        table.insert(name.to_string(), value);
    }
    for o in &args.overrides {
        set(&mut doc, o)?;
    }
    Ok(doc)
}

fn path_value(p: &Path) -> toml::Value {
    toml::Value::String(p.display().to_string())
}

fn paths_value(ps: &[PathBuf]) -> toml::Value {
    toml::Value::Array(ps.iter().map(|p| path_value(p)).collect())
}

/// The shorthand flag `key` = `path`, when given.
fn given<'k>(key: &'k str, path: &Option<PathBuf>) -> Option<(&'k str, toml::Value)> {
    path.as_deref().map(|p| (key, path_value(p)))
}

/// The shorthand flag `key` = `paths`, when any are given.
fn given_all<'k>(key: &'k str, paths: &[PathBuf]) -> Option<(&'k str, toml::Value)> {
    (!paths.is_empty()).then(|| (key, paths_value(paths)))
}

fn pretrain_command(args: PretrainArgs) -> Result<()> {
    let shorthands = [given("data.pack", &args.pack), given("init", &args.init)];
    let doc = config_doc(&args.stage, shorthands.into_iter().flatten().collect())?;
    let mut config = TrainConfig::from_table(doc)?;
    config.validate()?;
    if args.stage.check {
        let plan = |ranks| cxxlm_train::memory_plan(&config, ranks);
        return check_memory(
            &args.memory,
            plan,
            config.common(),
            "the pack (and so the vocabulary)",
        );
    }
    if config.data.pack.as_os_str().is_empty() || config.out.as_os_str().is_empty() {
        bail!("say where the packed tokens are and where the run goes: --pack DIR --out DIR (or data.pack and out in --config)");
    }
    let text = toml::to_string_pretty(&config).context("config")?;
    let out = config.out.clone();
    Progress::of(&args.stage, &out).run(&text, |report, stop| {
        if let Some(fit) = fit::fit_batch(&mut config, args.stage.resume)? {
            eprintln!("batch: {}", fit.reason);
            std::fs::write(
                config.out.join("config.toml"),
                toml::to_string_pretty(&config).context("config")?,
            )?;
        }
        Ok(cxxlm_train::pretrain(
            &config,
            args.stage.resume,
            report,
            stop,
        )?)
    })
}

/// Prints the memory each rank needs (`plan` of the data-parallel ranks: `--ranks`, else
/// `WORLD_SIZE`, else 1; `None` until `missing` exists), and refuses a run that cannot fit
/// its GPUs or write its checkpoints in `out`.
fn check_memory(
    args: &MemoryArgs,
    plan: impl FnOnce(usize) -> cxxlm_train::Result<Option<MemoryPlan>>,
    config: Common,
    missing: &str,
) -> Result<()> {
    let (out, keep) = (config.out, config.checkpoint.keep);
    let world = std::env::var("WORLD_SIZE")
        .ok()
        .and_then(|w| w.parse().ok());
    let ranks = args.ranks.or(world).map_or(1, std::num::NonZeroUsize::get);
    let Some(plan) = plan(ranks)? else {
        eprintln!("memory: not planned until {missing} exists");
        return Ok(());
    };
    let capacity = match args.gpu_memory {
        Some(gib) => Some((gib * (1u64 << 30) as f64) as u64),
        None if config.train.device != "cpu" && tch::Cuda::is_available() => {
            cxxlm_train::cuda::total_bytes()
        }
        None => None,
    };
    let mut text = plan.describe(capacity);
    // The out directory, or where it will be made.
    let made = out
        .ancestors()
        .find(|d| d.is_dir())
        .unwrap_or(Path::new("."));
    // The rule the run applies at its start: refused when one checkpoint cannot be written.
    let mut room = Ok(None);
    if let Some(free) = cxxlm_train::checkpoint::free_bytes(made) {
        text += &format!(
            ", with {:.2} GiB free in {} ({} kept: checkpoint.keep)",
            gib(free),
            out.display(),
            keep.max(1)
        );
        room = cxxlm_train::checkpoint::check_room(out, plan.checkpoint_bytes, free, keep);
    }
    let shape = format!(
        "{ranks} rank(s), {} row{} of {} tokens per pass",
        plan.rows,
        if plan.rows == 1 { "" } else { "s" },
        plan.seq_len
    );
    if let Some(capacity) = capacity.filter(|&c| plan.total() > c) {
        bail!(
            "this run needs more memory per GPU than the {:.2} GiB it has ({shape}):\n{text}\n\
             lower train.device_batch (gradient accumulation keeps train.total_batch_tokens), or use more ranks",
            gib(capacity)
        );
    }
    match room {
        Err(e) => bail!("{e}:\n{text}"),
        Ok(Some(warning)) => eprintln!("warning: {warning}"),
        Ok(None) => {}
    }
    eprintln!("memory per GPU ({shape}):\n{text}");
    Ok(())
}

/// An SFT config from `--config`, the shorthand flags and `--set`s; the tokenizer, when
/// not given, is the one the init model's run names.
fn sft_config(args: &SftArgs) -> Result<SftConfig> {
    let shorthands = [
        given("init", &args.init),
        given_all("sft.data", &args.data),
        given_all("sft.val", &args.val),
        given("sft.tokenizer", &args.tokenizer),
    ];
    let doc = config_doc(&args.stage, shorthands.into_iter().flatten().collect())?;
    let mut config = SftConfig::from_table(doc)?;
    if config.init.as_os_str().is_empty() || config.out.as_os_str().is_empty() {
        bail!("say which model to fine-tune and where the run goes: --init RUN --out DIR (or init and out in --config)");
    }
    if config.sft.tokenizer.is_none() {
        config.sft.tokenizer = Some(run_tokenizer(&config.init)?);
    }
    Ok(config)
}

fn sft_command(args: SftArgs) -> Result<()> {
    let config = sft_config(&args)?;
    config.validate()?;
    if args.stage.check {
        let plan = |ranks| cxxlm_train::sft::memory_plan(&config, ranks);
        return check_memory(
            &args.memory,
            plan,
            config.common(),
            "a checkpoint of the model to fine-tune",
        );
    }
    let text = toml::to_string_pretty(&config).context("config")?;
    Progress::of(&args.stage, &config.out).run(&text, |report, stop| {
        Ok(cxxlm_train::sft(&config, args.stage.resume, report, stop)?)
    })
}

/// An RL config from `--config`, the shorthand flags and `--set`s; the tokenizer, when
/// not given, is the one the init model's run names.
fn rl_config(args: &RlArgs) -> Result<RlConfig> {
    let shorthands = [
        given("init", &args.init),
        given_all("rl.tasks", &args.tasks),
        given("rl.tokenizer", &args.tokenizer),
    ];
    let doc = config_doc(&args.stage, shorthands.into_iter().flatten().collect())?;
    let mut config = RlConfig::from_table(doc)?;
    if config.init.as_os_str().is_empty() || config.out.as_os_str().is_empty() {
        bail!("say which model to train and where the run goes: --init RUN --out DIR (or init and out in --config)");
    }
    if config.rl.tokenizer.is_none() {
        config.rl.tokenizer = Some(run_tokenizer(&config.init)?);
    }
    Ok(config)
}

fn rl_command(args: RlArgs) -> Result<()> {
    let config = rl_config(&args)?;
    config.validate()?;
    if args.stage.check {
        let plan = |ranks| cxxlm_train::rl::memory_plan(&config, ranks);
        return check_memory(
            &args.memory,
            plan,
            config.common(),
            "a checkpoint of the model to train",
        );
    }
    let text = toml::to_string_pretty(&config).context("config")?;
    Progress::of(&args.stage, &config.out).run(&text, |report, stop| {
        Ok(cxxlm_train::rl(&config, args.stage.resume, report, stop)?)
    })
}

/// An embedding config from `--config`, the shorthand flags and `--set`s; the tokenizer,
/// when not given, is the one the init model's run names.
fn embed_command(args: EmbedArgs) -> Result<()> {
    let shorthands = [
        given("init", &args.init),
        given_all("embed.pairs", &args.pairs),
        given("embed.tokenizer", &args.tokenizer),
    ];
    let doc = config_doc(&args.stage, shorthands.into_iter().flatten().collect())?;
    let mut config = EmbedConfig::from_table(doc)?;
    if config.init.as_os_str().is_empty() || config.out.as_os_str().is_empty() {
        bail!("say which model to tune and where the run goes: --init RUN --out DIR (or init and out in --config)");
    }
    if config.embed.pairs.is_empty() {
        bail!("no pairs: give --pairs PAIRS.jsonl (`cxxlm index recall REPO --pairs-out PAIRS.jsonl`)");
    }
    if config.embed.tokenizer.is_none() {
        config.embed.tokenizer = Some(run_tokenizer(&config.init)?);
    }
    config.validate()?;
    if args.stage.check {
        return Ok(());
    }
    let text = toml::to_string_pretty(&config).context("config")?;
    Progress::of(&args.stage, &config.out).run(&text, |report, stop| {
        Ok(cxxlm_train::embed(
            &config,
            args.stage.resume,
            report,
            stop,
        )?)
    })
}

/// How a training command shows and stores its progress.
struct Progress<'a> {
    out: &'a Path,
    log_every: u64,
    stop_at: Option<u64>,
    resume: bool,
}

impl<'a> Progress<'a> {
    fn of(args: &StageArgs, out: &'a Path) -> Self {
        Progress {
            out,
            log_every: args.log_every,
            stop_at: args.stop_at,
            resume: args.resume,
        }
    }

    /// Runs a stage in `out` (its config written there as `config_toml` by rank 0):
    /// progress lines on stderr, samples into `samples.jsonl`, a summary on stdout; Ctrl-C
    /// or `--stop-at` stop it with a checkpoint.
    fn run(
        &self,
        config_toml: &str,
        stage: impl FnOnce(&mut dyn FnMut(Event), &dyn Fn(u64) -> bool) -> Result<TrainerState>,
    ) -> Result<()> {
        let out = self.out;
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let rank0 = cxxlm_train::dist::World::from_env()?.rank == 0;
        // Rank 0 writes for all ranks of its job; another job on this directory is refused.
        let _lock = match rank0 {
            true => Some(lock::hold(
                &out.join("train.lock"),
                &format!("the training run {}", out.display()),
            )?),
            false => None,
        };
        if rank0 {
            std::fs::write(out.join("config.toml"), config_toml)?;
        }
        interrupt::install();
        let tty = std::io::stderr().is_terminal();
        let started = Instant::now();
        let mut samples = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out.join("samples.jsonl"))?;
        let log_every = self.log_every;
        let stop_at = self.stop_at;
        let resume = self.resume;
        let state = stage(
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
                    match (resumed_from, resume) {
                        (Some(s), _) => format!(", resumed after step {s}"),
                        (None, true) => ", from step 0: no checkpoint to resume".to_string(),
                        (None, false) => String::new(),
                    }
                );
                }
                Event::Step {
                    step,
                    steps,
                    loss,
                    loss_ema,
                    lr_scale,
                    tok_s,
                    gpu,
                } => {
                    let gpu = match gpu {
                        Some(g) => {
                            format!(" | MFU {:.1}% | GPU {:.1} GiB", g.mfu * 100.0, g.memory_gib)
                        }
                        None => String::new(),
                    };
                    let line = format!(
                    "step {step}/{steps} | loss {loss:.4} (ema {loss_ema:.4}) | lr x{lr_scale:.3} | {tok_s:.0} tok/s{gpu} | {:.0}s",
                    started.elapsed().as_secs_f64()
                );
                    if tty {
                        eprint!("\r\x1b[2K{line}");
                    } else if step % log_every == 0 || step == steps {
                        eprintln!("{line}");
                    }
                }
                Event::Eval { step, figures } => {
                    let said: Vec<String> = figures
                        .iter()
                        .map(|(name, value)| match name.as_str() {
                            "val_bpb" => format!("validation {value:.4} bits per byte"),
                            "val_loss" => format!("held-out loss {value:.4}"),
                            _ => format!("{name} {value:.4}"),
                        })
                        .collect();
                    eprintln!(
                        "{}step {step}: {}",
                        if tty { "\n" } else { "" },
                        said.join(", ")
                    );
                }
                Event::Sample {
                    step,
                    prompt,
                    completion,
                } => {
                    let record = serde_json::json!({"step": step, "prompt": prompt, "completion": completion});
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
                Event::Info(text) => eprintln!("{}{text}", if tty { "\n" } else { "" }),
                Event::Warning(w) => eprintln!("{}warning: {w}", if tty { "\n" } else { "" }),
                Event::Checkpoint(dir) => {
                    if !tty {
                        eprintln!("checkpoint {}", dir.display());
                    }
                }
            },
            &|step| interrupt::requested() || stop_at.is_some_and(|s| step >= s),
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
            out.display()
        )?;
        Ok(())
    }
}
