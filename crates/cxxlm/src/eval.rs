use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use cxxlm_eval::bench::{self, Problem, Report};
use cxxlm_eval::{Compiler, Limits, Sandbox};
use cxxlm_pack::{Manifest, Packer};
use cxxlm_serve::text::{self, Layout, Reindent};
use cxxlm_tokenizer::chat::{self, Message, Role};
use cxxlm_tokenizer::{Bpe, Healing};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

use crate::cli::{prompt_ids, special};

mod retrieval;
pub use retrieval::RetrievalArgs;

#[derive(Subcommand)]
pub enum EvalCommand {
    /// MultiPL-E MBPP-C++: build and run completions against the unit tests (sandboxed).
    Mbpp(BenchArgs),
    /// HumanEval-X C++ (task_id, prompt, declaration, canonical_solution, test).
    Humaneval(BenchArgs),
    /// Compile rate of completions: `g++ -fsyntax-only -Wall` on prompt + completion +
    /// tests against a precompiled standard header, with failure classes and checks/s.
    Compile(CompileArgs),
    /// Bits per byte of a checkpoint on a pack's validation split.
    Bpb(BpbArgs),
    /// Fill-in-the-middle: hide a line, a block and a function body of validation
    /// documents, let the model fill them; exact match, and whether the files compile again.
    Fim(FimArgs),
    /// Retrieval at length: a held-out function defined far back in the context, its
    /// head written again at the end; how much of its body the model writes back, by
    /// distance, against the same prompt without the definition.
    Retrieval(RetrievalArgs),
    /// Bug fixing on held-out tasks of `tasks bugs`: the model writes the fixed function
    /// after the task's debug state; scored in the sandbox (compiles, sanitizers silent,
    /// the oracle's output), pass@k overall and per mutation operator.
    Bugfix(BugfixArgs),
    /// Models judged on one benchmark against a baseline (`eval mbpp`, `humaneval` or
    /// `bugfix --json` reports): compile and pass rates, and each model's difference from
    /// the baseline paired over the problems both were judged on, with its standard error.
    Compare(CompareArgs),
}

#[derive(Args)]
pub struct CompareArgs {
    /// The baseline's report.
    baseline: PathBuf,
    /// The reports to compare with it.
    #[arg(required = true)]
    others: Vec<PathBuf>,
}

/// The compile checks' g++, sandboxed, with its precompiled header kept in `--cache`.
#[derive(Args)]
pub struct HeaderCache {
    /// Where the precompiled header is kept.
    #[arg(long = "cache", default_value = "runs/cache")]
    dir: PathBuf,
}

impl HeaderCache {
    fn compiler(&self) -> Result<Compiler> {
        Ok(Compiler::new(Sandbox::new(Limits::default())?, &self.dir)?)
    }
}

#[derive(Args)]
pub struct BugfixArgs {
    /// Outputs of `tasks bugs` (directories or part files).
    #[arg(long = "tasks", required = true)]
    tasks: Vec<PathBuf>,
    /// The split to evaluate on (by project; the training never saw its projects).
    #[arg(long, default_value = "test")]
    split: String,
    /// At most this many tasks, spread evenly over the split.
    #[arg(long)]
    limit: Option<usize>,
    /// Check the harness instead of a model: `fixed` answers with each task's fix (all
    /// must pass), `buggy` with its bug (none may).
    #[arg(long, value_parser = ["fixed", "buggy"], conflicts_with_all = ["checkpoint", "completions"])]
    answers: Option<String>,
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Answers made elsewhere: JSON lines with `id` and `completion`.
    #[arg(long)]
    completions: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    samples: usize,
    #[arg(long, default_value_t = 0.8, value_parser = crate::cli::temperature)]
    temperature: f64,
    #[arg(long, default_value_t = 768)]
    max_tokens: usize,
    #[arg(long, default_value_t = 8, value_parser = crate::cli::at_least_one)]
    batch: usize,
    #[arg(long, value_delimiter = ',', default_value = "1", value_parser = crate::cli::at_least_one)]
    k: Vec<usize>,
    /// Also write the generated answers here (JSON lines, as --completions reads).
    #[arg(long)]
    completions_out: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
pub struct ModelArgs {
    /// A checkpoint directory, or a run directory (its newest checkpoint).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Defaults to the tokenizer of the checkpoint's run.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

#[derive(Args)]
pub struct CompileArgs {
    /// Held-out functions: the model writes the bodies of functions hidden in the pack's
    /// validation files (those that compile as they are), and each file is checked again.
    #[arg(long, requires = "pack", required_unless_present = "completions")]
    checkpoint: Option<PathBuf>,
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// The output directory of `cxxlm pack` (held-out functions).
    #[arg(long)]
    pack: Option<PathBuf>,
    /// Functions to hide, one per file.
    #[arg(long, default_value_t = 64, value_parser = crate::cli::at_least_one)]
    functions: usize,
    /// Longest body written, in tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// The model sees at most this many tokens of the file before the body.
    #[arg(long, default_value_t = 1024)]
    context_tokens: usize,
    #[arg(long, default_value_t = 32, value_parser = crate::cli::at_least_one)]
    batch: usize,
    /// Or: completions of a benchmark, JSON lines with `name` and `completion` (as
    /// `eval mbpp --completions-out` writes), checked as the benchmark's programs.
    #[arg(long, conflicts_with = "checkpoint")]
    completions: Option<PathBuf>,
    /// The benchmark whose programs the completions complete (default: the built-in
    /// MBPP-C++).
    #[arg(long)]
    problems: Option<PathBuf>,
    /// Also check every program with plain g++ (no header cache) and print the speed ratio.
    #[arg(long)]
    baseline: bool,
    #[command(flatten)]
    cache: HeaderCache,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
pub struct BpbArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The output directory of `cxxlm pack`.
    #[arg(long)]
    pub pack: PathBuf,
    #[arg(long, default_value = "val")]
    pub split: String,
    /// Validation tokens to read (0 = all).
    #[arg(long, default_value_t = 0)]
    pub tokens: usize,
    #[arg(long, default_value_t = 8, value_parser = crate::cli::at_least_one)]
    pub batch: usize,
    /// Windows of this many tokens instead of the model's context (the rotary as the
    /// checkpoint has it: a 2k model read at 8k shows what it does beyond 2k). A split
    /// shorter than one window is read as one window of its length.
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Each document of a window attends only to itself, positions from 0, as
    /// `data.document_mask` trains.
    #[arg(long)]
    pub document_mask: bool,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args)]
pub struct FimArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    pack: PathBuf,
    /// Documents to try (each hides one span of each kind).
    #[arg(long, default_value_t = 200)]
    documents: usize,
    /// What is hidden: a non-blank line, a block inside a function, a function body.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "line,block,function"
    )]
    spans: Vec<Span>,
    /// Prefix and suffix are cut to this many characters around the hidden span.
    #[arg(long, default_value_t = 3000)]
    context_chars: usize,
    /// Longest block or body written, in tokens (a line gets 64).
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Documents filled at once (a waiting one takes the place of one that ended).
    #[arg(long, default_value_t = 32, value_parser = crate::cli::at_least_one)]
    batch: usize,
    #[command(flatten)]
    cache: HeaderCache,
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Span {
    Line,
    Block,
    Function,
}

impl Span {
    fn name(self) -> &'static str {
        match self {
            Span::Line => "line",
            Span::Block => "block",
            Span::Function => "function",
        }
    }
}

#[derive(Args)]
pub struct BenchArgs {
    /// The benchmark (JSON lines); MBPP defaults to its built-in copy (MultiPL-E's
    /// MBPP-C++, also under evals/).
    #[arg(long)]
    problems: Option<PathBuf>,
    /// Completions made elsewhere: JSON lines with the problem's `name` (or `task_id`)
    /// and `completion`; several lines per problem for pass@k.
    #[arg(long, required_unless_present_any = ["canonical", "checkpoint"])]
    completions: Option<PathBuf>,
    /// Generate the completions with this checkpoint (or run directory) instead.
    #[arg(long, conflicts_with = "completions")]
    checkpoint: Option<PathBuf>,
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Completions per problem (greedy when 1, else sampled at --temperature).
    #[arg(long, default_value_t = 1)]
    samples: usize,
    #[arg(long, default_value_t = 0.8, value_parser = crate::cli::temperature)]
    temperature: f64,
    #[arg(long, default_value_t = 384)]
    max_tokens: usize,
    /// The sampler's repetition guard: logits of the last --repeat-last-n tokens divided
    /// by this (1: off, so figures stay comparable).
    #[arg(long, default_value_t = 1.0, value_parser = crate::cli::repeat_penalty)]
    repeat_penalty: f64,
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    /// Sequences decoded at once (prompts of any problems; a waiting one takes the
    /// place of one that ended).
    #[arg(long, default_value_t = 32, value_parser = crate::cli::at_least_one)]
    batch: usize,
    /// Only the first N problems.
    #[arg(long)]
    limit: Option<usize>,
    /// Also write the generated completions here (JSON lines, as --completions reads).
    #[arg(long)]
    completions_out: Option<PathBuf>,
    /// Only generate and write the completions (to --completions-out), without judging
    /// them: for machines without bubblewrap, judged elsewhere with --completions.
    #[arg(long, requires_all = ["checkpoint", "completions_out"])]
    generate_only: bool,
    /// Run the benchmark's reference solutions, to check the harness itself.
    #[arg(long)]
    canonical: bool,
    /// pass@k for each of these k.
    #[arg(long, value_delimiter = ',', default_value = "1", value_parser = crate::cli::at_least_one)]
    k: Vec<usize>,
    #[command(flatten)]
    cache: HeaderCache,
    /// Write the report (with every verdict) here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

impl EvalCommand {
    /// Whether it runs a model (a checkpoint's).
    pub fn needs_model(&self) -> bool {
        match self {
            EvalCommand::Mbpp(a) | EvalCommand::Humaneval(a) => a.checkpoint.is_some(),
            EvalCommand::Compile(a) => a.checkpoint.is_some(),
            EvalCommand::Bugfix(a) => a.checkpoint.is_some(),
            EvalCommand::Bpb(_) | EvalCommand::Fim(_) | EvalCommand::Retrieval(_) => true,
            EvalCommand::Compare(_) => false,
        }
    }
}

/// Generation settings: greedy at temperature 0, the repetition guard off.
pub struct Generation {
    pub temperature: f64,
    pub top_k: i64,
    pub top_p: f64,
    pub max_new_tokens: usize,
    pub seed: u64,
    /// The sampler's repetition guard (1: off, as every benchmark runs by default).
    pub repeat_penalty: f64,
    pub repeat_last_n: usize,
    /// Per prompt, the ids its first generated token must be one of (token healing,
    /// see [`Healed`]); empty: no constraint.
    pub first_tokens: Vec<Option<Vec<u32>>>,
    /// Sequences decoded at once (a waiting prompt takes the place of one that ended);
    /// 0: every prompt at once.
    pub slots: usize,
}

impl Generation {
    /// For `samples` completions of each prompt: greedy for one, else sampled at
    /// `temperature` within the nucleus of 0.95; `slots` decoded at once.
    fn samples(samples: usize, temperature: f64, max_new_tokens: usize, slots: usize) -> Self {
        Generation {
            temperature: if samples > 1 { temperature } else { 0.0 },
            top_p: 0.95,
            max_new_tokens,
            slots: slots.max(1),
            ..Default::default()
        }
    }
}

impl Default for Generation {
    fn default() -> Self {
        Generation {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 256,
            seed: 0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            first_tokens: Vec::new(),
            slots: 0,
        }
    }
}

/// Prompts of plain text healed at their last token ([`Bpe::heal`]): a prompt that
/// ends with a line break after `{` would otherwise tell a model trained on indented
/// text that the next line starts at column 0. The model gets `prompts` with
/// `first_tokens`; each row's text is then its tokens without the healed prefix.
struct Healed {
    prompts: Vec<Vec<u32>>,
    healings: Vec<Option<Healing>>,
}

impl Healed {
    fn new(bpe: &Bpe, mut prompts: Vec<Vec<u32>>) -> Healed {
        let healings = prompts.iter_mut().map(|p| bpe.heal(p)).collect();
        Healed { prompts, healings }
    }

    fn first_tokens(&self) -> Vec<Option<Vec<u32>>> {
        self.healings
            .iter()
            .map(|h| h.as_ref().map(|h| h.allowed.clone()))
            .collect()
    }

    /// Row `row`'s completion so far, as text, from its generated `ids`.
    fn text(&self, bpe: &Bpe, row: usize, ids: &[u32]) -> String {
        let bytes = bpe.decode(ids);
        let bytes = match &self.healings[row] {
            Some(h) => h.strip(&bytes),
            None => &bytes,
        };
        String::from_utf8_lossy(bytes).into_owned()
    }
}

/// A trained model, as the evaluations use it (`cxxlm-torch` provides it).
pub trait TextModel {
    fn tokenizer(&self) -> &Bpe;
    /// How its training text was laid out (indentation stripped or kept).
    fn layout(&self) -> Layout;
    /// Tokens it attends to.
    fn context(&self) -> usize;
    /// Continues each prompt until `stop(row, generated so far)` says so or
    /// `max_new_tokens` are written, `slots` at a time; prompts of different lengths
    /// share the batch.
    fn generate(
        &self,
        prompts: &[Vec<u32>],
        generation: &Generation,
        stop: &mut dyn FnMut(usize, &[u32]) -> bool,
    ) -> Vec<Vec<u32>>;
}

/// Loads a checkpoint (or a run's newest) with its tokenizer, or `--tokenizer`'s.
pub type LoadModel<'a> = &'a dyn Fn(&Path, Option<&Path>) -> Result<Box<dyn TextModel>>;

/// The benchmark at `path`, or the built-in MBPP-C++.
fn problems_or_mbpp(path: Option<&std::path::Path>) -> Result<Vec<bench::Problem>> {
    Ok(match path {
        Some(p) => bench::load(p)?,
        None => bench::mbpp_cpp()?,
    })
}

fn needed(load: Option<LoadModel>) -> Result<LoadModel> {
    load.context("this evaluation runs a model: it is cxxlm-torch's")
}

/// Runs an evaluation; those that need a model load it with `load` (`None` in `cxxlm`,
/// which hands them to `cxxlm-torch`). Bits per byte is `cxxlm-torch`'s alone.
pub fn run(cmd: EvalCommand, load: Option<LoadModel>) -> Result<()> {
    let (args, mbpp) = match cmd {
        EvalCommand::Mbpp(a) => (a, true),
        EvalCommand::Humaneval(a) => (a, false),
        EvalCommand::Compile(a) => return compile(a, load),
        EvalCommand::Bpb(_) => bail!("bits per byte runs a model: it is cxxlm-torch's"),
        EvalCommand::Fim(a) => {
            let model = needed(load)?(&a.model.checkpoint, a.model.tokenizer.as_deref())?;
            return fim(a, model.as_ref());
        }
        EvalCommand::Retrieval(a) => {
            let model = needed(load)?(&a.model.checkpoint, a.model.tokenizer.as_deref())?;
            return retrieval::run(a, model.as_ref());
        }
        EvalCommand::Bugfix(a) => return bugfix(a, load),
        EvalCommand::Compare(a) => return compare(a),
    };
    let mut problems = match (&args.problems, mbpp) {
        (None, false) => bail!("--problems: the benchmark's JSON lines"),
        (path, _) => problems_or_mbpp(path.as_deref())?,
    };
    if let Some(n) = args.limit {
        problems.truncate(n);
    }
    let (completions, limited) = if let Some(checkpoint) = &args.checkpoint {
        let model = needed(load)?(checkpoint, args.tokenizer.as_deref())?;
        let (generated, limited) = generate_completions(&args, model.as_ref(), &problems);
        if let Some(out) = &args.completions_out {
            let lines: Vec<String> = generated
                .iter()
                .zip(&limited)
                .map(|((n, c), l)| {
                    json!({"name": n, "completion": c, "length_limited": l}).to_string()
                })
                .collect();
            cxxlm_data::shard::write_atomic(out, (lines.join("\n") + "\n").as_bytes())?;
            if args.generate_only {
                eprintln!(
                    "wrote {} completions to {}; judge them with --completions {0}",
                    generated.len(),
                    out.display()
                );
                return Ok(());
            }
        }
        let limited = limited.iter().filter(|&&l| l).count();
        (generated, Some(limited))
    } else if args.canonical {
        let refs: Vec<(String, String)> = problems
            .iter()
            .filter_map(|p| p.canonical.clone().map(|c| (p.name.clone(), c)))
            .collect();
        if refs.is_empty() {
            bail!("the benchmark has no reference solutions (HumanEval-X has)");
        }
        (refs, None)
    } else {
        read_completions(args.completions.as_deref().expect("clap requires it"))?
    };
    let compiler = args.cache.compiler()?;
    let report = bench::score(&compiler, &problems, &completions, &args.k)?;
    print_report(&report, &args.k)?;
    let mut json = serde_json::to_value(&report)?;
    if let Some(n) = limited {
        outln!(
            "{n} of {} completions ran to the length limit ({:.1}%)",
            completions.len(),
            100.0 * share(n, completions.len())
        )?;
        json["length_limited"] = n.into();
        json["length_limited_share"] = share(n, completions.len()).into();
    }
    if let Some(path) = &args.json {
        cxxlm_data::shard::write_atomic(path, &serde_json::to_vec_pretty(&json)?)?;
    }
    Ok(())
}

fn share(n: usize, of: usize) -> f64 {
    n as f64 / of.max(1) as f64
}

/// `samples` completions of every problem's prompt, each cut at its stop tokens, and
/// whether each ran to the length limit instead; `batch` sequences (of any problems)
/// are generated together. The model sees each prompt as its training text was laid out
/// and its completion is re-indented into the prompt's layout, as `serve` does for an
/// editor: a model trained without indentation writes every `}` at the start of a line,
/// which the benchmarks' `\n}` stop would otherwise take for the end of the function.
fn generate_completions(
    args: &BenchArgs,
    model: &dyn TextModel,
    problems: &[Problem],
) -> (Vec<(String, String)>, Vec<bool>) {
    let bpe = model.tokenizer();
    let eos = special(bpe, "<|eos|>");
    let layout = model.layout();
    let completion = |p: &Problem, raw: String| Reindent::new(&p.prompt, "", layout, 0).push(&raw);
    let rows: Vec<&Problem> = problems
        .iter()
        .flat_map(|p| std::iter::repeat_n(p, args.samples))
        .collect();
    let healed = Healed::new(
        bpe,
        rows.iter()
            .map(|p| text::plain_prompt(bpe, &p.prompt, layout))
            .collect(),
    );
    let generation = Generation {
        repeat_penalty: args.repeat_penalty,
        repeat_last_n: args.repeat_last_n,
        first_tokens: healed.first_tokens(),
        ..Generation::samples(args.samples, args.temperature, args.max_tokens, args.batch)
    };
    let mut stopped = vec![false; rows.len()];
    let generated = model.generate(&healed.prompts, &generation, &mut |row, t| {
        stopped[row] = t.last() == Some(&eos) || {
            let text = completion(rows[row], healed.text(bpe, row, t));
            rows[row]
                .stop_tokens
                .iter()
                .any(|s| text.contains(s.as_str()))
        };
        stopped[row]
    });
    let limited = stopped.iter().map(|s| !s).collect();
    let mut out = Vec::with_capacity(rows.len());
    for (i, (p, row)) in rows.iter().zip(generated).enumerate() {
        let body: Vec<u32> = row.into_iter().filter(|&t| t != eos).collect();
        let text = completion(p, healed.text(bpe, i, &body));
        out.push((p.name.clone(), p.truncate(&text).to_string()));
    }
    (out, limited)
}

/// Syntax-checks every program in parallel; returns the diagnoses and checks per second.
fn check_all(
    compiler: &Compiler,
    programs: &[String],
) -> Result<(Vec<cxxlm_eval::Diagnosis>, f64)> {
    use rayon::prelude::*;
    let started = std::time::Instant::now();
    let diagnoses = programs
        .par_iter()
        .map(|p| compiler.check(p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((
        diagnoses,
        programs.len() as f64 / started.elapsed().as_secs_f64(),
    ))
}

/// A held-out file with a span (a function body, a block, a line) hidden.
struct Hidden {
    prefix: String,
    body: String,
    suffix: String,
    /// Warnings of the file as it was.
    warnings: usize,
}

impl Hidden {
    fn cut(text: &str, start: usize, end: usize) -> Hidden {
        Hidden {
            prefix: text[..start].to_string(),
            body: text[start..end].to_string(),
            suffix: text[end..].to_string(),
            warnings: 0,
        }
    }
}

/// For each file with a hidden span: its warnings when it compiles as it is and stops
/// compiling with the span replaced by `@`. The second test keeps out spans the compiler
/// never sees (in a branch the preprocessor drops, like `#ifdef _WIN32`), which would
/// pass whatever the model wrote.
fn live_spans(compiler: &Compiler, hidden: &[&Hidden]) -> Result<Vec<Option<usize>>> {
    use rayon::prelude::*;
    Ok(hidden
        .par_iter()
        .map(|h| {
            let original = compiler.check(&format!("{}{}{}", h.prefix, h.body, h.suffix))?;
            if !original.ok {
                return Ok(None);
            }
            let broken = compiler.check(&format!("{}@{}", h.prefix, h.suffix))?;
            Ok((!broken.ok).then_some(original.warnings))
        })
        .collect::<Result<Vec<_>, cxxlm_eval::EvalError>>()?)
}

/// Up to `n` functions from the validation files that compile as they are, one per file;
/// files are tried in order, checked in parallel rounds. Returns them and the files tried.
fn held_out_functions(
    compiler: &Compiler,
    pack: &Path,
    bpe: &Bpe,
    n: usize,
) -> Result<(Vec<Hidden>, usize)> {
    let manifest = Manifest::load(pack)?;
    manifest.check_tokenizer(pack, bpe)?;
    let val = manifest.open(pack, "val")?;
    let packer = Packer::new(bpe, manifest.settings.fim);
    let mut candidates = Vec::new();
    for doc in 0..val.len() {
        let Ok(text) = String::from_utf8(packer.restore(&val.doc(doc))?) else {
            continue;
        };
        if let Some((start, end)) = pick_span(&text, Span::Function, doc) {
            candidates.push(Hidden::cut(&text, start, end));
        }
    }
    let mut keep = vec![false; candidates.len()];
    let (mut kept, mut tried) = (0, 0);
    while kept < n && tried < candidates.len() {
        let round = (2 * (n - kept)).max(8).min(candidates.len() - tried);
        let batch: Vec<&Hidden> = candidates[tried..tried + round].iter().collect();
        let checked = live_spans(compiler, &batch)?;
        for (i, warnings) in checked.into_iter().enumerate() {
            if let (Some(warnings), true) = (warnings, kept < n) {
                candidates[tried + i].warnings = warnings;
                keep[tried + i] = true;
                kept += 1;
            }
        }
        tried += round;
    }
    let kept = candidates
        .into_iter()
        .zip(keep)
        .filter_map(|(h, k)| k.then_some(h))
        .collect();
    Ok((kept, tried))
}

/// The model's body for each hidden function, generated until its braces close, and
/// how many ran to the length limit instead.
fn write_bodies(
    args: &CompileArgs,
    model: &dyn TextModel,
    hidden: &[Hidden],
) -> (Vec<String>, usize) {
    use cxxlm_eval::functions::body_end;
    let bpe = model.tokenizer();
    let eos = special(bpe, "<|eos|>");
    // Leave the body its room in the model's context.
    let context = args
        .context_tokens
        .min(model.context().saturating_sub(args.max_tokens))
        .max(1);
    let healed = Healed::new(
        bpe,
        hidden
            .iter()
            .map(|h| {
                let ids = bpe.encode(&h.prefix);
                ids[ids.len().saturating_sub(context)..].to_vec()
            })
            .collect(),
    );
    let generation = Generation {
        max_new_tokens: args.max_tokens,
        first_tokens: healed.first_tokens(),
        slots: args.batch.max(1),
        ..Default::default()
    };
    let mut stopped = vec![false; hidden.len()];
    let generated = model.generate(&healed.prompts, &generation, &mut |row, t| {
        stopped[row] = t.last() == Some(&eos) || body_end(&healed.text(bpe, row, t)).is_some();
        stopped[row]
    });
    let limited = stopped.iter().filter(|s| !**s).count();
    let mut bodies = Vec::with_capacity(hidden.len());
    for (i, row) in generated.into_iter().enumerate() {
        let ids: Vec<u32> = row.into_iter().filter(|&t| t != eos).collect();
        let text = healed.text(bpe, i, &ids);
        // Up to the brace that closes the body, without it (the file's own follows).
        let body = match body_end(&text) {
            Some(end) => text[..end - 1].to_string(),
            None => text,
        };
        bodies.push(body);
    }
    (bodies, limited)
}

fn compile(args: CompileArgs, load: Option<LoadModel>) -> Result<()> {
    let fast = args.cache.compiler()?;
    let mut baseline_warnings = None;
    let mut held_out = None;
    let length_limited: Option<usize>;
    // Each program's problem (samples of one problem pass or fail together); a held-out
    // function is a problem of its own.
    let mut problem_of: Vec<String> = Vec::new();
    let programs = match (&args.checkpoint, &args.completions) {
        (Some(checkpoint), _) => {
            let pack = args.pack.as_deref().expect("clap requires --pack");
            let model = needed(load)?(checkpoint, args.tokenizer.as_deref())?;
            let (hidden, tried) =
                held_out_functions(&fast, pack, model.tokenizer(), args.functions)?;
            if hidden.is_empty() {
                eprintln!(
                    "warning: none of the {tried} validation files with a function compiles as it is (g++ -fsyntax-only): no compile rate"
                );
            } else {
                eprintln!(
                    "{} functions hidden in validation files that compile ({tried} files tried)",
                    hidden.len()
                );
            }
            let (bodies, limited) = write_bodies(&args, model.as_ref(), &hidden);
            length_limited = Some(limited);
            baseline_warnings = Some(hidden.iter().map(|h| h.warnings).collect::<Vec<_>>());
            let programs: Vec<String> = hidden
                .iter()
                .zip(&bodies)
                .map(|(h, b)| format!("{}{b}{}", h.prefix, h.suffix))
                .collect();
            held_out = Some((hidden, bodies, tried));
            programs
        }
        (None, Some(completions)) => {
            let problems = problems_or_mbpp(args.problems.as_deref())?;
            let by_name: std::collections::HashMap<&str, &Problem> =
                problems.iter().map(|p| (p.name.as_str(), p)).collect();
            let (completions, limited) = read_completions(completions)?;
            length_limited = limited;
            problem_of = completions.iter().map(|(name, _)| name.clone()).collect();
            completions
                .iter()
                .map(|(name, completion)| {
                    by_name
                        .get(name.as_str())
                        .map(|p| p.program(completion))
                        .with_context(|| format!("completion for unknown problem {name:?}"))
                })
                .collect::<Result<Vec<_>>>()?
        }
        (None, None) => bail!("--checkpoint (with --pack) or --completions"),
    };
    let (diagnoses, rate) = check_all(&fast, &programs)?;
    let n = diagnoses.len().max(1) as f64;
    let ok = diagnoses.iter().filter(|d| d.ok).count();
    // Warning-free: no warnings beyond those the file had with its own body.
    let clean = diagnoses
        .iter()
        .enumerate()
        .filter(|(i, d)| {
            d.ok && d.warnings <= baseline_warnings.as_ref().map_or(0, |w: &Vec<usize>| w[*i])
        })
        .count();
    let mut categories: std::collections::BTreeMap<String, usize> = Default::default();
    for d in &diagnoses {
        if let Some(c) = &d.category {
            *categories.entry(c.clone()).or_default() += 1;
        }
    }
    let mut per_problem = PerProblem::new();
    for (i, d) in diagnoses.iter().enumerate() {
        let problem = problem_of.get(i).cloned().unwrap_or_else(|| i.to_string());
        tally(&mut per_problem, problem, d.ok);
    }
    let error = bench::standard_error_over_problems(&per_problem.into_values().collect::<Vec<_>>());
    outln!(
        "{} programs: compile rate {:.4} ± {error:.4} (standard error over problems), warning-free {:.4}; {rate:.1} checks/s",
        diagnoses.len(),
        ok as f64 / n,
        clean as f64 / n
    )?;
    for (c, k) in &categories {
        outln!("  {k:>5}  {c}")?;
    }
    let mut report = json!({
        "programs": diagnoses.len(), "compile_rate": ok as f64 / n,
        "compile_rate_standard_error": error, "warning_free_rate": clean as f64 / n,
        "checks_per_second": rate, "failures": categories,
    });
    if let Some(l) = length_limited {
        outln!(
            "{l} of {} ran to the length limit ({:.1}%)",
            diagnoses.len(),
            100.0 * share(l, diagnoses.len())
        )?;
        report["length_limited"] = l.into();
        report["length_limited_share"] = share(l, diagnoses.len()).into();
    }
    if let Some((hidden, bodies, tried)) = &held_out {
        report["files_tried"] = (*tried).into();
        report["examples"] = hidden
            .iter()
            .zip(bodies)
            .zip(&diagnoses)
            .take(20)
            .map(|((h, b), d)| {
                let head = h.prefix.trim_end().lines().last().unwrap_or("");
                json!({"head": head, "original": h.body, "written": b, "ok": d.ok, "first_error": d.first_error})
            })
            .collect();
    }
    if args.baseline {
        let plain = Compiler::plain(Sandbox::new(Limits::default())?);
        let (base, base_rate) = check_all(&plain, &programs)?;
        let agree = base
            .iter()
            .zip(&diagnoses)
            .filter(|(a, b)| a.ok == b.ok)
            .count();
        outln!(
            "plain g++: {base_rate:.1} checks/s; the header cache is {:.2}x; verdicts agree on {agree} of {}",
            rate / base_rate,
            base.len()
        )?;
        report["baseline_checks_per_second"] = base_rate.into();
        report["verdicts_agree"] = agree.into();
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}

fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The span of `kind` that document number `doc` hides, if it has one. Spans are cut
/// where line-aligned FIM training cuts (`pack --fim-line-aligned`, the speedrun's): a
/// line with its line break, and a block's inside from the line after its `{` to the
/// line of its `}` when the braces end and start their lines. Such a model has never
/// seen a suffix that starts with the hidden line's own line break.
fn pick_span(text: &str, kind: Span, doc: usize) -> Option<(usize, usize)> {
    use cxxlm_eval::functions::{function_bodies, inner_blocks};
    let spans: Vec<(usize, usize)> = match kind {
        Span::Line => text
            .match_indices('\n')
            .scan(0, |start, (end, _)| {
                let line = (*start, end + 1);
                *start = end + 1;
                Some(line)
            })
            .filter(|&(a, b)| text[a..b].trim().len() > 3)
            .collect(),
        Span::Block | Span::Function => {
            let found = if kind == Span::Block {
                inner_blocks(text)
            } else {
                function_bodies(text)
            };
            let shortest = if kind == Span::Block { 8 } else { 16 };
            found
                .into_iter()
                .map(|b| whole_lines(text, b.open, b.close))
                .filter(|&(a, b)| {
                    let inside = &text[a..b];
                    inside.trim().len() >= shortest && inside.lines().count() <= 30
                })
                .collect()
        }
    };
    // A line needs context: documents with fewer than three are skipped.
    let enough = if kind == Span::Line { 3 } else { 1 };
    (spans.len() >= enough).then(|| spans[(doc * 7919) % spans.len()])
}

/// A block's inside `open..close` moved to whole lines: past the line break after `{`
/// when nothing but blanks follow it, back to the start of the line of `}` when nothing
/// but blanks precede it.
fn whole_lines(text: &str, open: usize, close: usize) -> (usize, usize) {
    let start = match text[open..close].find('\n') {
        Some(i) if text[open..open + i].trim().is_empty() => open + i + 1,
        _ => open,
    };
    let end = match text[..close].rfind('\n') {
        Some(i) if i + 1 >= start && text[i + 1..close].trim().is_empty() => i + 1,
        _ => close,
    };
    (start, end.max(start))
}

struct FimCase {
    span: Span,
    hidden: Hidden,
    /// The file compiles as it is, and the span is code the compiler sees.
    self_contained: bool,
}

fn fim(args: FimArgs, model: &dyn TextModel) -> Result<()> {
    use cxxlm_eval::functions::body_end;
    let bpe = model.tokenizer();
    let manifest = Manifest::load(&args.pack)?;
    manifest.check_tokenizer(&args.pack, bpe)?;
    let val = manifest.open(&args.pack, "val")?;
    let packer = Packer::new(bpe, manifest.settings.fim);
    let eos = special(bpe, "<|eos|>");
    let mut cases: Vec<FimCase> = Vec::new();
    let mut documents = 0;
    for doc in 0..val.len() {
        if documents == args.documents {
            break;
        }
        let Ok(text) = String::from_utf8(packer.restore(&val.doc(doc))?) else {
            continue;
        };
        let before = cases.len();
        for &span in &args.spans {
            if let Some((start, end)) = pick_span(&text, span, doc) {
                cases.push(FimCase {
                    span,
                    hidden: Hidden::cut(&text, start, end),
                    self_contained: false,
                });
            }
        }
        documents += usize::from(cases.len() > before);
    }
    if cases.is_empty() {
        bail!("no validation document has a span to hide");
    }
    let compiler = args.cache.compiler()?;
    let code_spans: Vec<&Hidden> = cases
        .iter()
        .filter(|c| c.span != Span::Line)
        .map(|c| &c.hidden)
        .collect();
    let mut live = live_spans(&compiler, &code_spans)?.into_iter();
    for c in cases.iter_mut().filter(|c| c.span != Span::Line) {
        c.self_contained = live.next().flatten().is_some();
    }

    let prompts: Vec<Vec<u32>> = cases
        .iter()
        .map(|c| {
            let (p, s) = (&c.hidden.prefix, &c.hidden.suffix);
            let from = p.floor_char_boundary(p.len().saturating_sub(args.context_chars));
            let to = s.ceil_char_boundary(args.context_chars.min(s.len()));
            prompt_ids(bpe, "", Some((&p[from..], &s[..to])))
        })
        .collect();
    let generation = Generation {
        max_new_tokens: args.max_tokens,
        slots: args.batch.max(1),
        ..Default::default()
    };
    let out = model.generate(&prompts, &generation, &mut |row, t| {
        t.last() == Some(&eos)
            || match cases[row].span {
                Span::Line => {
                    t.len() >= LINE_TOKENS || bpe.decode(&t[t.len() - 1..]).contains(&b'\n')
                }
                // Past the span: the text closes a brace it did not open.
                _ => body_end(&String::from_utf8_lossy(&bpe.decode(t))).is_some(),
            }
    });
    let filled: Vec<String> = cases
        .iter()
        .zip(out)
        .map(|(c, row)| {
            let ids: Vec<u32> = row.into_iter().filter(|&t| t != eos).collect();
            let text = String::from_utf8_lossy(&bpe.decode(&ids)).into_owned();
            match c.span {
                Span::Line => text.split('\n').next().unwrap_or("").to_string(),
                _ => match body_end(&text) {
                    Some(end) => text[..end - 1].to_string(),
                    None => text,
                },
            }
        })
        .collect();
    let refilled: Vec<String> = cases
        .iter()
        .zip(&filled)
        .filter(|(c, _)| c.self_contained)
        .map(|(c, f)| format!("{}{f}{}", c.hidden.prefix, c.hidden.suffix))
        .collect();
    let (diagnoses, _) = check_all(&compiler, &refilled)?;
    let mut compiles = diagnoses.iter().map(|d| d.ok);

    let mut spans = serde_json::Map::new();
    let mut examples = Vec::new();
    outln!("FIM on {documents} validation documents (exact after whitespace normalization):")?;
    for &kind in &args.spans {
        let (mut tried, mut exact, mut contained, mut compiled) = (0, 0, 0, 0);
        for (c, f) in cases.iter().zip(&filled).filter(|(c, _)| c.span == kind) {
            let hit = squash(f) == squash(&c.hidden.body);
            tried += 1;
            exact += usize::from(hit);
            let compiles = c.self_contained.then(|| compiles.next().unwrap_or(false));
            contained += usize::from(compiles.is_some());
            compiled += usize::from(compiles == Some(true));
            if examples
                .iter()
                .filter(|e: &&Value| e["span"] == kind.name())
                .count()
                < 4
            {
                // A hidden line's own line break is not shown (the fill stops before it).
                let expected = match kind {
                    Span::Line => c.hidden.body.trim_end_matches('\n'),
                    _ => &c.hidden.body,
                };
                examples.push(
                    json!({"span": kind.name(), "expected": expected, "filled": f,
                    "exact": hit, "compiles": compiles}),
                );
            }
        }
        let rate = |a: usize, b: usize| a as f64 / b.max(1) as f64;
        let compile_note = if kind == Span::Line {
            String::new()
        } else {
            format!(
                "; refilled files that compile: {compiled} of {contained} ({:.1}%)",
                rate(compiled, contained) * 100.0
            )
        };
        outln!(
            "  {:<8} {exact} of {tried} exact ({:.1}%){compile_note}",
            kind.name(),
            rate(exact, tried) * 100.0
        )?;
        spans.insert(
            kind.name().into(),
            json!({"tried": tried, "exact": exact, "exact_rate": rate(exact, tried),
                "self_contained": contained, "compiled": compiled,
                "compile_rate": rate(compiled, contained)}),
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(
            path,
            serde_json::to_vec_pretty(
                &json!({"documents": documents, "spans": spans, "examples": examples}),
            )?,
        )?;
    }
    Ok(())
}

/// `(problem name, completion)` pairs.
type Completions = Vec<(String, String)>;

/// `(name, completion)` of every line, and how many ran to the length limit when every
/// line says (`length_limited`, as `--completions-out` writes it).
fn read_completions(path: &Path) -> Result<(Completions, Option<usize>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut limited = Some(0);
    let completions = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            let v: Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}", path.display(), i + 1))?;
            let name = v
                .get("name")
                .or_else(|| v.get("task_id"))
                .and_then(Value::as_str);
            let completion = v.get("completion").and_then(Value::as_str);
            limited = match v.get("length_limited").and_then(Value::as_bool) {
                Some(l) => limited.map(|n| n + usize::from(l)),
                None => None,
            };
            match (name, completion) {
                (Some(n), Some(c)) => Ok((n.to_string(), c.to_string())),
                _ => bail!(
                    "{}:{}: needs `name` (or `task_id`) and `completion`",
                    path.display(),
                    i + 1
                ),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    if completions.is_empty() {
        bail!("{}: no completions to judge", path.display());
    }
    Ok((completions, limited))
}

/// Per problem of a benchmark report's verdicts: `(compiled, samples)` and `(passed,
/// samples)`.
type PerProblem = std::collections::BTreeMap<String, (f64, f64)>;

fn per_problem(path: &Path) -> Result<(PerProblem, PerProblem)> {
    let report: Value = serde_json::from_slice(
        &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{}: not JSON", path.display()))?;
    let verdicts = report["verdicts"]
        .as_array()
        .filter(|v| !v.is_empty())
        .with_context(|| {
            format!(
                "{}: no verdicts (an `eval mbpp`, `humaneval` or `bugfix` --json report)",
                path.display()
            )
        })?;
    let (mut compiled, mut passed) = (PerProblem::new(), PerProblem::new());
    for (i, v) in verdicts.iter().enumerate() {
        let (Some(name), Some(c), Some(p)) = (
            v["name"].as_str(),
            v["compiled"].as_bool(),
            v["passed"].as_bool(),
        ) else {
            bail!(
                "{}: verdict {i} needs `name`, `compiled` and `passed`",
                path.display()
            );
        };
        tally(&mut compiled, name.to_string(), c);
        tally(&mut passed, name.to_string(), p);
    }
    Ok((compiled, passed))
}

/// One more sample of `problem`, a success or not.
fn tally(per: &mut PerProblem, problem: String, success: bool) {
    let e = per.entry(problem).or_default();
    e.0 += f64::from(u8::from(success));
    e.1 += 1.0;
}

fn compare(args: CompareArgs) -> Result<()> {
    let rate = |per: &PerProblem| {
        let (k, n) = per
            .values()
            .fold((0.0, 0.0), |(k, n), &(a, b)| (k + a, n + b));
        let each: Vec<(f64, f64)> = per.values().copied().collect();
        format!(
            "{:.1}% ± {:.1}",
            100.0 * k / n,
            100.0 * bench::standard_error_over_problems(&each)
        )
    };
    let (base_compiled, base_passed) = per_problem(&args.baseline)?;
    // Every report read before any is shown: a bad one names itself alone.
    let others = args
        .others
        .iter()
        .map(|path| per_problem(path).map(|counts| (path, counts)))
        .collect::<Result<Vec<_>>>()?;
    outln!(
        "{} (baseline): {} problems; compiled {}, passed {}",
        args.baseline.display(),
        base_compiled.len(),
        rate(&base_compiled),
        rate(&base_passed)
    )?;
    for (path, (compiled, passed)) in &others {
        let dc = bench::paired_difference(&base_compiled, compiled);
        let dp = bench::paired_difference(&base_passed, passed);
        if dc.problems == 0 {
            bail!("{}: no problem in common with the baseline", path.display());
        }
        outln!(
            "{}: {} problems; compiled {}, passed {}; against the baseline on the {} both have: compiled {:+.1} ± {:.1} points, passed {:+.1} ± {:.1}",
            path.display(),
            compiled.len(),
            rate(compiled),
            rate(passed),
            dc.problems,
            100.0 * dc.difference,
            100.0 * dc.standard_error,
            100.0 * dp.difference,
            100.0 * dp.standard_error
        )?;
    }
    Ok(())
}

fn print_report(r: &Report, ks: &[usize]) -> Result<()> {
    outln!(
        "{} problems, {} samples: {} compiled, {} passed",
        r.problems,
        r.samples,
        r.compiled,
        r.passed
    )?;
    outln!(
        "compile rate: {:.4} ± {:.4} (standard error over problems)",
        share(r.compiled, r.samples),
        r.compile_rate_standard_error
    )?;
    if !r.unbuildable.is_empty() {
        outln!(
            "{} of {} problems cannot compile with any body (their prompt or tests are broken: {}); over the others' {} samples the compile rate is {:.4}",
            r.unbuildable.len(),
            r.problems,
            r.unbuildable.join(", "),
            r.buildable_samples,
            share(r.buildable_compiled, r.buildable_samples)
        )?;
    }
    for (k, v) in &r.pass_at_k {
        match r.pass_at_k_standard_error[k] {
            e if e.is_finite() => outln!("{k}: {v:.4} ± {e:.4}")?,
            _ => outln!("{k}: {v:.4} (fewer than two problems: no standard error)")?,
        }
    }
    for k in ks
        .iter()
        .filter(|k| !r.pass_at_k.contains_key(&format!("pass@{k}")))
    {
        outln!("pass@{k}: no estimate, no problem has {k} samples (--samples)")?;
    }
    let mut failures: std::collections::BTreeMap<String, usize> = Default::default();
    for v in r.verdicts.iter().filter(|v| !v.passed) {
        let why = match (&v.category, v.ending) {
            (Some(c), _) => format!("compile: {c}"),
            (None, Some(e)) => format!("run: {e:?}"),
            (None, None) => "run: wrong answer".into(),
        };
        *failures.entry(why).or_default() += 1;
    }
    for (why, n) in failures {
        outln!("  {n:>5}  {why}")?;
    }
    let unbuilt: Vec<&bench::Verdict> = r.verdicts.iter().filter(|v| !v.compiled).collect();
    if !unbuilt.is_empty() {
        outln!("first compile failures (the start of g++'s message):")?;
    }
    for v in unbuilt.iter().take(SHOWN_COMPILE_FAILURES) {
        let message = v.compiler_message.as_deref().unwrap_or("");
        outln!("  {}:", v.name)?;
        for line in message.lines() {
            outln!("    {line}")?;
        }
    }
    if unbuilt.len() > SHOWN_COMPILE_FAILURES {
        outln!(
            "  ... and {} more (every message is in the --json report)",
            unbuilt.len() - SHOWN_COMPILE_FAILURES
        )?;
    }
    Ok(())
}

fn bugfix(args: BugfixArgs, load: Option<LoadModel>) -> Result<()> {
    use cxxlm_tasks::bugs;
    use rayon::prelude::*;
    let tasks = bugs::runnable(bugs::read_tasks(&args.tasks)?, &args.split, args.limit);
    if tasks.is_empty() {
        bail!("no runnable tasks of split {:?} in the input", args.split);
    }
    let answers: Vec<(usize, String)> = match (&args.answers, &args.checkpoint, &args.completions) {
        (Some(which), _, _) => tasks
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let check = t.check.as_ref().expect("filtered");
                let answer = if which == "fixed" {
                    t.output.clone()
                } else {
                    check.buggy[check.span.0..check.span.1].to_string()
                };
                (i, answer)
            })
            .collect(),
        (None, Some(checkpoint), _) => {
            let model = needed(load)?(checkpoint, args.tokenizer.as_deref())?;
            let generated = bugfix_answers(&args, model.as_ref(), &tasks);
            if let Some(out) = &args.completions_out {
                let lines: Vec<String> = generated
                    .iter()
                    .map(|(i, c)| json!({"id": tasks[*i].id, "completion": c}).to_string())
                    .collect();
                std::fs::write(out, lines.join("\n") + "\n")
                    .with_context(|| format!("writing {}", out.display()))?;
            }
            generated
        }
        (None, None, Some(path)) => {
            let by_id: std::collections::HashMap<&str, usize> = tasks
                .iter()
                .enumerate()
                .map(|(i, t)| (t.id.as_str(), i))
                .collect();
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let mut out = Vec::new();
            for (n, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                let v: Value = serde_json::from_str(line)
                    .with_context(|| format!("{}:{}", path.display(), n + 1))?;
                let (Some(id), Some(c)) = (v["id"].as_str(), v["completion"].as_str()) else {
                    bail!("{}:{}: needs `id` and `completion`", path.display(), n + 1);
                };
                if let Some(&i) = by_id.get(id) {
                    out.push((i, c.to_string()));
                }
            }
            out
        }
        (None, None, None) => bail!("--answers fixed|buggy, --checkpoint or --completions"),
    };
    let judge = cxxlm_tasks::judge::Judge::new()?;
    let verdicts = answers
        .par_iter()
        .map(|(i, answer)| {
            let check = tasks[*i].check.as_ref().expect("filtered");
            bugs::score(&judge, check, answer, true).map(|v| (*i, v))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Per task: (samples, passed); then pass@k overall and per operator.
    let mut per_task: Vec<(usize, usize)> = vec![(0, 0); tasks.len()];
    let mut compiled = 0;
    let mut failures: std::collections::BTreeMap<String, usize> = Default::default();
    for (i, v) in &verdicts {
        per_task[*i].0 += 1;
        per_task[*i].1 += usize::from(v.passed);
        compiled += usize::from(v.compiled);
        if let Some(f) = &v.failure {
            *failures.entry(f.clone()).or_default() += 1;
        }
    }
    let pass = |filter: &dyn Fn(&cxxlm_tasks::task::Task) -> bool, k: usize| -> Vec<f64> {
        per_task
            .iter()
            .zip(&tasks)
            .filter(|((n, _), t)| *n >= k && filter(t))
            .map(|(&(n, c), _)| bench::pass_at_k(n, c, k))
            .collect()
    };
    outln!(
        "{} tasks of split {}, {} answers: {} compiled",
        tasks.len(),
        args.split,
        verdicts.len(),
        compiled
    )?;
    let answers: Vec<Value> = verdicts
        .iter()
        .map(|(i, v)| json!({"name": tasks[*i].id, "compiled": v.compiled, "passed": v.passed}))
        .collect();
    let mut report = json!({"tasks": tasks.len(), "answers": verdicts.len(), "compiled": compiled,
                            "failures": failures, "verdicts": answers});
    for &k in &args.k {
        let scores = pass(&|_| true, k);
        let (n, p) = (scores.len(), bench::mean_score(&scores));
        let error = bench::standard_error_of_scores(&scores);
        outln!("pass@{k}: {p:.4} ± {error:.4} ({n} tasks; standard error over tasks)")?;
        report[format!("pass@{k}")] = p.into();
        report[format!("pass@{k}_standard_error")] = error.into();
        let mut per_op = serde_json::Map::new();
        for op in cxxlm_tasks::mutate::Operator::ALL {
            let scores = pass(&|t| t.provenance.operator == Some(op), k);
            let (n, p) = (scores.len(), bench::mean_score(&scores));
            if n > 0 {
                outln!("  {:<24} {p:.4} ({n} tasks)", op.name())?;
                per_op.insert(op.name().into(), json!({"tasks": n, "pass": p}));
            }
        }
        report[format!("pass@{k}_by_operator")] = per_op.into();
    }
    for (f, n) in &failures {
        outln!("  {n:>5}  {f}")?;
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}

/// `samples` answers per task from the model: the task's input as the prompt, cut where
/// the fixed function closes. Tasks whose prompt leaves no room to answer are skipped.
fn bugfix_answers(
    args: &BugfixArgs,
    model: &dyn TextModel,
    tasks: &[cxxlm_tasks::task::Task],
) -> Vec<(usize, String)> {
    let bpe = model.tokenizer();
    let eos = special(bpe, "<|eos|>");
    let room = model.context().saturating_sub(args.max_tokens);
    let mut rows: Vec<(usize, Vec<u32>)> = Vec::new();
    let mut skipped = 0;
    for (i, t) in tasks.iter().enumerate() {
        // As `train sft` shows an `{input, output}` pair: a user turn, then the answer.
        let ids = chat::prompt(
            bpe,
            &[Message::new(Role::User, t.input.as_str())],
            model.layout(),
        );
        if ids.len() > room {
            skipped += 1;
            continue;
        }
        rows.extend(std::iter::repeat_n((i, ids), args.samples));
    }
    if skipped > 0 {
        eprintln!("{skipped} tasks skipped: their prompt leaves fewer than --max-tokens of the model's context");
    }
    let prompts: Vec<Vec<u32>> = rows.iter().map(|(_, p)| p.clone()).collect();
    let generation =
        Generation::samples(args.samples, args.temperature, args.max_tokens, args.batch);
    let generated = model.generate(&prompts, &generation, &mut |_, t| {
        cxxlm_tasks::task::answer_ends(t, eos, |ids| bpe.decode(ids))
    });
    rows.iter()
        .zip(generated)
        .map(|((i, _), row)| {
            let ids: Vec<u32> = row.into_iter().filter(|&t| t != eos).collect();
            let answer = bpe.decode(&ids);
            (
                *i,
                cxxlm_tasks::task::cut_answer(&String::from_utf8_lossy(&answer)),
            )
        })
        .collect()
}
/// Tokens a line span may take: a line not ended by then is not the line.
const LINE_TOKENS: usize = 64;

/// Compile failures whose message the printed report shows.
const SHOWN_COMPILE_FAILURES: usize = 5;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_spans_are_cut_where_line_aligned_fim_cuts() {
        let text = "int f(int x) {\nint y = x + 1;\nreturn y;\n}\nint g() { return 2; }\n";
        let cut = |kind, doc| {
            let (a, b) = pick_span(text, kind, doc).unwrap();
            (&text[..a], &text[a..b], &text[b..])
        };
        // Whole lines: the prefix ends and the suffix starts a line, as in training.
        for doc in 0..5 {
            let (prefix, line, suffix) = cut(Span::Line, doc);
            assert!(prefix.is_empty() || prefix.ends_with('\n'), "{prefix:?}");
            assert!(
                line.ends_with('\n') && !suffix.starts_with('\n'),
                "{line:?}"
            );
        }
        let (prefix, body, suffix) = cut(Span::Function, 0);
        assert_eq!(
            (prefix, body, suffix),
            (
                "int f(int x) {\n",
                "int y = x + 1;\nreturn y;\n",
                "}\nint g() { return 2; }\n"
            )
        );
        // Indented: the closing brace's line, indentation and all, stays in the suffix.
        let raw = "void h() {\n    if (a) {\n        b();\n    }\n}\n";
        let (a, b) = whole_lines(raw, 10, raw.rfind('}').unwrap());
        assert_eq!(
            (&raw[a..b], &raw[b..]),
            ("    if (a) {\n        b();\n    }\n", "}\n")
        );
        // A body on one line keeps its cut inside the line.
        let one = text.rfind("{ return").unwrap() + 1;
        assert_eq!(
            whole_lines(text, one, text.rfind('}').unwrap()),
            (one, text.len() - 2)
        );
    }

    /// Writes `text` token by token, as a model trained on `layout` would, until told to stop.
    struct Scripted {
        bpe: Bpe,
        layout: Layout,
        text: String,
    }

    impl TextModel for Scripted {
        fn tokenizer(&self) -> &Bpe {
            &self.bpe
        }

        fn layout(&self) -> Layout {
            self.layout
        }

        fn context(&self) -> usize {
            1024
        }

        fn generate(
            &self,
            prompts: &[Vec<u32>],
            g: &Generation,
            stop: &mut dyn FnMut(usize, &[u32]) -> bool,
        ) -> Vec<Vec<u32>> {
            let ids = self.bpe.encode(&self.text);
            (0..prompts.len())
                .map(|row| {
                    let mut out = Vec::new();
                    for &id in ids.iter().take(g.max_new_tokens) {
                        out.push(id);
                        if stop(row, &out) {
                            break;
                        }
                    }
                    out
                })
                .collect()
        }
    }

    fn bench_args() -> BenchArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        Cli::parse_from(["eval", "--checkpoint", "unused"]).bench
    }

    #[test]
    fn a_model_trained_without_indentation_is_cut_where_its_function_ends() {
        let written = "if (x > 0) {\nreturn 1;\n}\nreturn 0;\n}\nint main() {\n";
        let problem = Problem {
            name: "sign".into(),
            prompt: "#include <cassert>\n// 1 when x is positive.\nint sign(int x) {\n".into(),
            tests: "}\nint main() {\n    assert(sign(2) == 1);\n}\n".into(),
            stop_tokens: vec!["\n}".into()],
            canonical: None,
        };
        let model = |strip_indentation| Scripted {
            bpe: tokenizer(written),
            layout: Layout { strip_indentation },
            text: written.into(),
        };
        let (stripped, limited) =
            generate_completions(&bench_args(), &model(true), std::slice::from_ref(&problem));
        assert_eq!(
            stripped[0].1,
            "    if (x > 0) {\n        return 1;\n    }\n    return 0;"
        );
        assert_eq!(limited, vec![false]);
        // The same text from a model that kept indentation ends at the first `\n}`.
        let (kept, _) =
            generate_completions(&bench_args(), &model(false), std::slice::from_ref(&problem));
        assert_eq!(kept[0].1, "if (x > 0) {\nreturn 1;");
    }

    pub(super) fn tokenizer(text: &str) -> Bpe {
        let mut trainer = cxxlm_tokenizer::Trainer::new(400).unwrap();
        trainer.feed(&[text.to_string()]);
        trainer.train().unwrap()
    }
}
