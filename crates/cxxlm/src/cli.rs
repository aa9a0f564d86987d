//! The command line: every command's arguments, and running those that need no model.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use cxxlm_tokenizer::Bpe;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "cxxlm",
    version,
    about = "Train C++-specialist code language models end to end"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Collect and clean C++ sources into jsonl.zst shards.
    #[command(subcommand)]
    Data(crate::data::DataCommand),
    /// Train and evaluate the C++ tokenizer.
    #[command(subcommand)]
    Tok(crate::tok::TokCommand),
    /// Tokenize shards with fill-in-the-middle into Megatron .bin/.idx files.
    Pack(crate::pack::PackArgs),
    /// Train the GPT.
    #[command(subcommand)]
    Train(TrainCommand),
    /// Continue a prompt, or fill in the middle, with a trained checkpoint.
    Sample(SampleArgs),
    /// Judge C++ in a sandbox: coding benchmarks with unit tests, bits per byte, FIM.
    #[command(subcommand)]
    Eval(crate::eval::EvalCommand),
    /// Serve a checkpoint over HTTP to editors: OpenAI completions (with suffix) and
    /// chat, llama.cpp /infill, Ollama /api/generate.
    Serve(ServeArgs),
    /// Write a checkpoint in another ecosystem's format.
    #[command(subcommand)]
    Export(ExportCommand),
    /// Verifiable C++ tasks: injected bugs with sanitizer debug states, fixes from git
    /// history, a teacher's answers, decontamination.
    #[command(subcommand)]
    Tasks(crate::tasks::TasksCommand),
    /// A C++ repository's index: definitions, references, includes, and what matters
    /// at a cursor.
    #[command(subcommand)]
    Index(crate::index::IndexCommand),
    /// A model fixes a C++ repository with tools (list, search, open, edit guarded by the
    /// compiler, build and test in the sandbox, the index, submit), in a loop with a
    /// budget, writing a transcript.
    Agent(crate::agent::AgentArgs),
    /// Every stage from raw C++ sources to an evaluated model and its report card.
    Speedrun(crate::speedrun::SpeedrunArgs),
    /// Run a command (`train pretrain`) as N data-parallel ranks on this host, one per GPU.
    Launch(crate::launch::LaunchArgs),
    /// Write the report card (report.md, report.html, plots/) of a run directory again.
    Report {
        /// A speedrun's directory.
        dir: std::path::PathBuf,
    },
}

impl Command {
    /// Whether the command runs a model, and so needs the `cxxlm-torch` binary.
    pub fn needs_torch(&self) -> bool {
        match self {
            Command::Train(_) | Command::Sample(_) | Command::Serve(_) | Command::Export(_) => true,
            Command::Eval(e) => e.needs_model(),
            Command::Agent(a) => a.model().checkpoint.is_some(),
            Command::Index(i) => i.needs_model(),
            _ => false,
        }
    }
}

/// Runs a command that needs no model.
pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Data(cmd) => crate::data::run(cmd),
        Command::Tok(cmd) => crate::tok::run(cmd),
        Command::Pack(args) => crate::pack::run(args),
        Command::Eval(cmd) => crate::eval::run(cmd, None),
        Command::Tasks(cmd) => crate::tasks::run(cmd),
        Command::Index(cmd) => crate::index::run(cmd),
        Command::Agent(args) if args.model().checkpoint.is_none() => {
            crate::agent::run_endpoint(args)
        }
        Command::Speedrun(args) => crate::speedrun::run(args),
        Command::Launch(args) => crate::launch::run(args),
        Command::Report { dir } => {
            let layout = cxxlm_report::Layout::new(dir);
            if !layout.record().is_file() {
                anyhow::bail!(
                    "{} is not a speedrun's output: it has no {}",
                    layout.root.display(),
                    layout.record().display()
                );
            }
            let w = cxxlm_report::write(&layout)?;
            for e in &w.plot_errors {
                eprintln!("warning: {e}");
            }
            outln!("{}\n{}", w.markdown.display(), w.html.display())?;
            Ok(())
        }
        Command::Train(_)
        | Command::Sample(_)
        | Command::Serve(_)
        | Command::Export(_)
        | Command::Agent(_) => {
            anyhow::bail!("this command runs a model: it is cxxlm-torch's")
        }
    }
}

/// Memory the allocator (mimalloc, both binaries') has freed goes back to the system
/// after 10 ms unused, the delay mimalloc's documentation gives, instead of its build's
/// default of one second: phases that free a lot before allocating more (the
/// tokenizer's stages) then peak lower, at no measured cost in time.
/// `MIMALLOC_PURGE_DELAY` still decides when set.
pub fn tune_allocator() {
    // `mi_option_purge_delay` in mimalloc.h (v2 and v3).
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets an option; mimalloc reads options atomically.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, 10) };
    }
}

/// Logs to stderr at `CXXLM_LOG` (default: warnings).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CXXLM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// A failed write to standard output (see [`crate::outln!`]).
#[derive(Debug)]
pub struct Stdout(pub std::io::Error);

impl std::fmt::Display for Stdout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "writing to standard output: {}", self.0)
    }
}

impl std::error::Error for Stdout {}

/// Prints the error (naming the rank in a data-parallel run) and exits with status 1;
/// output that nobody reads any more (`| head` has exited) ends the run quietly, with
/// success, as it does for other Unix tools.
pub fn exit_on_error(result: Result<()>) {
    if let Err(e) = result {
        let closed = e.chain().any(|c| {
            c.downcast_ref::<Stdout>()
                .is_some_and(|Stdout(io)| io.kind() == std::io::ErrorKind::BrokenPipe)
        });
        if closed {
            std::process::exit(0);
        }
        let e = error_chain(&e);
        match std::env::var("RANK") {
            Ok(rank) if std::env::var_os("WORLD_SIZE").is_some() => {
                eprintln!("error (rank {rank}): {e}")
            }
            _ => eprintln!("error: {e}"),
        }
        std::process::exit(1);
    }
}

/// A count that must not be 0 (a batch, say).
pub fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>().map_err(|e| e.to_string())? {
        0 => Err("must be at least 1".into()),
        n => Ok(n),
    }
}

fn number(text: &str) -> Result<f64, String> {
    text.parse().map_err(|e| format!("{e}"))
}

/// `--temperature`: 0 (greedy) or more.
pub fn temperature(text: &str) -> Result<f64, String> {
    match number(text)? {
        t if t.is_finite() && t >= 0.0 => Ok(t),
        t => Err(format!("a temperature is 0 (greedy) or more, not {t}")),
    }
}

/// `--top-p`: above 0, at most 1.
pub fn top_p(text: &str) -> Result<f64, String> {
    match number(text)? {
        p if p > 0.0 && p <= 1.0 => Ok(p),
        p => Err(format!("top-p is above 0 and at most 1, not {p}")),
    }
}

/// `--repeat-penalty`: above 0 (1 is off).
pub fn repeat_penalty(text: &str) -> Result<f64, String> {
    match number(text)? {
        r if r.is_finite() && r > 0.0 => Ok(r),
        r => Err(format!("the repeat penalty is above 0 (1 is off), not {r}")),
    }
}

/// An error and its causes, `: `-separated, leaving out a cause whose text the message
/// before it already ends with (errors that name a file print their I/O cause too).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let cause = cause.to_string();
        if out.is_empty() {
            out = cause;
        } else if !out.ends_with(&cause) {
            out = format!("{out}: {cause}");
        }
    }
    out
}

#[derive(Subcommand)]
pub enum TrainCommand {
    /// Pretrain the GPT on packed tokens (Muon + AdamW), with evaluation, checkpoints and
    /// metrics; `--resume` continues bit-exactly from the newest checkpoint.
    Pretrain(PretrainArgs),
    /// Fine-tune a pretrained model on JSON lines of examples (`{"input","output"}`,
    /// chat `{"messages"}` or FIM `{"prefix","suffix","middle"}`), packed whole into rows
    /// that keep them apart; the loss on their answers only. `--resume` continues
    /// bit-exactly from the newest checkpoint.
    Sft(SftArgs),
    /// Reinforcement learning with the compiler as judge (GRPO): completions to runnable
    /// tasks sampled by the model, rewarded in the sandbox (compiles, no warnings, the
    /// task's test, reasoning), learned from relative to their group, with a KL term to
    /// the starting model. `--resume` continues bit-exactly from the newest checkpoint.
    Rl(RlArgs),
    /// Tune a model's embeddings contrastively (InfoNCE, in-batch negatives) on retrieval
    /// pairs mined from a repository (`index recall --pairs-out`): a query's pooled
    /// hidden states drawn to those of the function it names, away from the batch's
    /// others. `--resume` continues from the newest checkpoint.
    Embed(EmbedArgs),
    /// Check the fused training kernels on a GPU against their definitions (forward and
    /// gradients, fresh random inputs), and the explicit training step against autograd.
    CheckKernels {
        /// The CUDA device.
        #[arg(long, default_value_t = 0)]
        device: usize,
    },
    /// Time forward and backward passes of a preset on random tokens, by autograd and by
    /// the explicit pass with fused kernels, with their peak memory and where the explicit
    /// pass's time goes.
    Profile(ProfileArgs),
}

#[derive(Args)]
pub struct ProfileArgs {
    #[arg(long, default_value = "d12")]
    pub preset: String,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch: i64,
    #[arg(long, default_value_t = 32_768)]
    pub vocab: usize,
    /// Timed passes per path (after two warm-up passes).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// The CUDA device.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
}

/// What every training command takes besides its inputs.
#[derive(Args)]
pub struct StageArgs {
    /// TOML with the command's sections (out, [train], [optim], [schedule], [eval],
    /// [checkpoint], [log] and its own; README.md lists them); every key optional but
    /// the inputs.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override one key, e.g. `--set train.steps=200`. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// The run directory (`out`).
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub resume: bool,
    /// Only check the config (settings and their types), print the memory each GPU
    /// needs where the command plans it, and exit.
    #[arg(long)]
    pub check: bool,
    /// Stop (with a checkpoint) once this many steps are done; `--resume` continues.
    #[arg(long)]
    pub stop_at: Option<u64>,
    /// Print a progress line every this many steps when not on a terminal.
    #[arg(long, default_value_t = 10)]
    pub log_every: u64,
}

#[derive(Args)]
pub struct PretrainArgs {
    /// The output of `cxxlm pack` (`data.pack`).
    #[arg(long)]
    pub pack: Option<PathBuf>,
    /// A trained model to continue, perhaps at a longer context (`init`: a run directory,
    /// its newest checkpoint, or a checkpoint directory).
    #[arg(long)]
    pub init: Option<PathBuf>,
    #[command(flatten)]
    pub memory: MemoryArgs,
    #[command(flatten)]
    pub stage: StageArgs,
}

/// How `--check` plans the memory of a training command's GPUs.
#[derive(Args)]
pub struct MemoryArgs {
    /// With --check: plan the memory of each of this many data-parallel ranks (default:
    /// `WORLD_SIZE`, else 1).
    #[arg(long)]
    pub ranks: Option<std::num::NonZeroUsize>,
    /// With --check: the memory of each GPU to plan against, in GiB (default: this
    /// machine's GPU, when training would run on it).
    #[arg(long, value_name = "GIB")]
    pub gpu_memory: Option<f64>,
}

#[derive(Args)]
pub struct SftArgs {
    /// The pretrained model: a run directory (its newest checkpoint) or a checkpoint
    /// directory (`init`).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// JSON lines of examples (`sft.data`).
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Held-out examples (`sft.val`; default: a share of --data, `sft.val_fraction`).
    #[arg(long, num_args = 1..)]
    pub val: Vec<PathBuf>,
    /// The tokenizer the model was trained with (`sft.tokenizer`; default: the one its
    /// run's config names).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[command(flatten)]
    pub memory: MemoryArgs,
    #[command(flatten)]
    pub stage: StageArgs,
}

#[derive(Args)]
pub struct RlArgs {
    /// The model to start from, also the KL reference: an SFT run directory (its newest
    /// checkpoint) or a checkpoint directory (`init`).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Outputs of `tasks bugs` (directories or JSON lines; `rl.tasks`): their runnable
    /// tasks of the train split are the prompts, of the test split the held-out check.
    #[arg(long, num_args = 1..)]
    pub tasks: Vec<PathBuf>,
    /// The tokenizer the model was trained with (`rl.tokenizer`; default: the one its
    /// run's config names).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[command(flatten)]
    pub memory: MemoryArgs,
    #[command(flatten)]
    pub stage: StageArgs,
}

#[derive(Args)]
pub struct EmbedArgs {
    /// The model to tune: a run directory (its newest checkpoint) or a checkpoint
    /// directory (`init`).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// JSON lines of pairs, `cxxlm index recall --pairs-out`'s (`embed.pairs`): those not
    /// held out are trained on, the held-out ones measured.
    #[arg(long, num_args = 1..)]
    pub pairs: Vec<PathBuf>,
    /// The tokenizer the model was trained with (`embed.tokenizer`; default: the one its
    /// run's config names).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[command(flatten)]
    pub stage: StageArgs,
}

/// Applies `a.b.c=value` to a TOML document; the value is read as TOML, or as a string.
pub fn set(doc: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, raw) = assignment
        .split_once('=')
        .with_context(|| format!("--set {assignment}: expected KEY=VALUE"))?;
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut parts: Vec<&str> = key.trim().split('.').collect();
    let last = parts.pop().context("empty key")?;
    let mut table = doc;
    for p in parts {
        table = table
            .entry(p)
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .with_context(|| format!("--set {key}: {p} is not a table"))?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

#[derive(Args)]
pub struct SampleArgs {
    /// A checkpoint directory, or a run directory (its newest checkpoint).
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Text to continue.
    #[arg(long, conflicts_with_all = ["fim_prefix", "fim_suffix"])]
    pub prompt: Option<String>,
    /// Fill in the middle between this prefix...
    #[arg(long)]
    pub fim_prefix: Option<String>,
    /// ...and this suffix.
    #[arg(long)]
    pub fim_suffix: Option<String>,
    /// Completions to draw.
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    #[arg(long, default_value_t = 0.8, value_parser = temperature)]
    pub temperature: f64,
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(0..))]
    pub top_k: i64,
    #[arg(long, default_value_t = 0.95, value_parser = top_p)]
    pub top_p: f64,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The repetition guard: logits of the last --repeat-last-n tokens are divided by
    /// this (multiplied when negative); 1 is off.
    #[arg(long, default_value_t = 1.0, value_parser = repeat_penalty)]
    pub repeat_penalty: f64,
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Go on past the end of the function body that --prompt opens (by default the
    /// completion ends with that body's closing brace).
    #[arg(long)]
    pub past_body: bool,
    /// Instead of sampling a prompt: time greedy generation of --max-tokens for this many
    /// sequences of --benchmark-prompt tokens each, never stopping early.
    #[arg(long, conflicts_with_all = ["prompt", "fim_prefix"])]
    pub benchmark_batch: Option<usize>,
    #[arg(long, default_value_t = 128)]
    pub benchmark_prompt: usize,
}

#[derive(Args)]
pub struct ServeArgs {
    /// A checkpoint directory, or a run directory (its newest checkpoint).
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// llama.vim's and llama.vscode's default port.
    #[arg(long, default_value_t = 8012)]
    pub port: u16,
    /// Sequences decoded together (each holds a cached prompt for reuse).
    #[arg(long, default_value_t = 8)]
    pub slots: usize,
    /// Requests waiting for a slot beyond which new ones are answered 503.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// The model's name in responses and `/v1/models` (default: the run's directory name).
    #[arg(long)]
    pub name: Option<String>,
    /// Whether the model was trained without indentation (then prompts lose theirs and
    /// completions are re-indented): `auto` reads it from the training shards.
    #[arg(long, default_value = "auto", value_parser = ["auto", "strip", "keep"])]
    pub indentation: String,
    /// Largest request body, in MiB.
    #[arg(long, default_value_t = 16)]
    pub max_body_mib: usize,
    /// A `cxxlm index` (its folder, or a repository holding one in .cxxlm-index): `/infill`
    /// requests without `input_extra` get the definitions that rank highest at their
    /// cursor as context.
    #[arg(long)]
    pub index: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum ExportCommand {
    /// A transformers model (`NanoChatForCausalLM`, transformers >= 5, no remote code):
    /// safetensors, config, generation config and tokenizer files, checked for logit
    /// parity through transformers.
    Hf(ExportHfArgs),
}

#[derive(Args)]
pub struct ExportHfArgs {
    /// A checkpoint directory, or a run directory (its newest checkpoint).
    pub checkpoint: PathBuf,
    #[arg(long, short)]
    pub out: PathBuf,
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The Python with transformers >= 5 that runs the parity check.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Write the files without checking them through transformers (the result says so).
    #[arg(long)]
    pub no_parity: bool,
}

pub fn special(bpe: &Bpe, name: &str) -> u32 {
    bpe.special_id(name).expect("the design's special tokens")
}

/// `<|bos|>` prompt, or the PSM layout `pack` trains on, up to `<|fim_middle|>`.
pub fn prompt_ids(bpe: &Bpe, prompt: &str, fim: Option<(&str, &str)>) -> Vec<u32> {
    let mut ids = vec![special(bpe, "<|bos|>")];
    match fim {
        Some((prefix, suffix)) => {
            ids.push(special(bpe, "<|fim_prefix|>"));
            ids.extend(bpe.encode(prefix));
            ids.push(special(bpe, "<|fim_suffix|>"));
            ids.extend(bpe.encode(suffix));
            ids.push(special(bpe, "<|fim_middle|>"));
        }
        None => ids.extend(bpe.encode(prompt)),
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_already_stated_is_not_repeated() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let named = anyhow::Error::new(cxxlm_data::DataError::io("a/b.zst", io()))
            .context("reading the shards");
        assert_eq!(
            error_chain(&named),
            "reading the shards: a/b.zst: No such file"
        );
        let bare = anyhow::Error::new(io()).context("opening a/b.zst");
        assert_eq!(error_chain(&bare), "opening a/b.zst: No such file");
    }

    #[test]
    fn sampling_flags_without_a_distribution_are_refused() {
        for bad in ["nan", "-1", "inf", "x"] {
            assert!(temperature(bad).is_err(), "{bad}");
        }
        for bad in ["0", "-0.5", "1.5", "nan"] {
            assert!(top_p(bad).is_err(), "{bad}");
        }
        for bad in ["0", "-1", "nan", "inf"] {
            assert!(repeat_penalty(bad).is_err(), "{bad}");
        }
        assert_eq!(
            (temperature("0"), top_p("1"), repeat_penalty("1.1")),
            (Ok(0.0), Ok(1.0), Ok(1.1))
        );
        assert_eq!(
            (at_least_one("0").is_err(), at_least_one("3")),
            (true, Ok(3))
        );
    }
}
