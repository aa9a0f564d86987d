use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use cxxlm_data::config::SecretAction;
use cxxlm_data::near_dedup::{
    DedupConfig, MinHashConfig, NearDedup, Stage, StageOutcome, Survivor,
};
use cxxlm_data::pipeline::{self, Progress, TaskOutcome, TaskSpec};
use cxxlm_data::stats::RunStats;
use cxxlm_data::PipelineConfig;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::{interrupt, lock};

#[derive(Subcommand)]
pub enum DataCommand {
    /// Read, filter, redact and deduplicate C++ sources into jsonl.zst shards.
    Run(RunArgs),
    /// Remove near-duplicates (MinHash LSH) from the shards of `data run`.
    Dedup(DedupArgs),
    /// A fixed sample of `data run` shards, chosen by a hash of each document's id;
    /// `--spread` takes from each project all of it or an equal share, whichever is smaller.
    Sample(SampleArgs),
    /// Merge the stats of the finished tasks of an output directory into stats.json.
    Stats {
        /// The output directory of `cxxlm data run`.
        dir: PathBuf,
    },
}

#[derive(Args)]
pub struct RunArgs {
    /// TOML configuration (every key optional; flags below override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Inputs: directories, archives, git checkouts, .jsonl[.gz|.zst], .parquet,
    /// hf://datasets/<owner>/<name>[@rev]/<path>. Repeatable; replaces [input] paths.
    #[arg(long = "input", short)]
    inputs: Vec<String>,
    /// Output directory for shards, stats.json and resume state.
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Split the inputs into this many tasks (a Slurm array's size).
    #[arg(long, env = "SLURM_ARRAY_TASK_COUNT", value_parser = crate::cli::at_least_one)]
    tasks: Option<usize>,
    /// Run only this task (0-based); without it every task runs here, one after another.
    #[arg(long, env = "SLURM_ARRAY_TASK_ID")]
    task_index: Option<usize>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Keep indentation (it is stripped by default).
    #[arg(long)]
    keep_indentation: bool,
    /// Also write removed documents, with the step and reason, under removed/.
    #[arg(long)]
    write_removed: bool,
    /// Drop files whose detected license is not permissive.
    #[arg(long)]
    permissive_only: bool,
    /// What to do with files holding secrets.
    #[arg(long, value_parser = ["redact", "drop"])]
    secrets: Option<String>,
    /// Close a shard after this many MiB of JSON lines.
    #[arg(long)]
    shard_mib: Option<u64>,
    /// Skip files larger than this many bytes.
    #[arg(long)]
    max_bytes: Option<u64>,
}

#[derive(Args)]
pub struct SampleArgs {
    /// `data run` output directories or shard files. Repeatable.
    #[arg(long = "input", short, required = true)]
    inputs: Vec<PathBuf>,
    /// An empty directory for the sample's shard and sample.json.
    #[arg(long, short)]
    out: PathBuf,
    /// MiB of JSON lines wanted in all.
    #[arg(long)]
    mib: f64,
    /// Spread over projects: the package of a document's archive, else a component of
    /// its id (`--id-component`).
    #[arg(long)]
    spread: bool,
    /// For documents of no archive: the component of the id (0: the first; a leading `/`
    /// aside) that names the project, e.g. 2 for `/data/repos/PROJECT/...`.
    #[arg(long, default_value_t = 0)]
    id_component: usize,
    /// Leave out documents whose id contains this. Repeatable.
    #[arg(long)]
    exclude: Vec<String>,
}

#[derive(Args)]
pub struct DedupArgs {
    /// The output directory of `cxxlm data run` (its part-*.jsonl.zst shards).
    #[arg(long, short)]
    input: PathBuf,
    /// Where the deduplicated shards, the report and the stages' work go.
    #[arg(long, short)]
    out: PathBuf,
    /// One stage, or all of them in order.
    #[arg(long, default_value = "all", value_parser = ["all", "signatures", "buckets", "clusters", "filter"])]
    stage: String,
    /// Split each stage into this many tasks (a Slurm array's size).
    #[arg(long, env = "SLURM_ARRAY_TASK_COUNT", value_parser = crate::cli::at_least_one)]
    tasks: Option<usize>,
    /// Run only this task; without it every task runs here.
    #[arg(long, env = "SLURM_ARRAY_TASK_ID")]
    task_index: Option<usize>,
    /// Which document of a cluster is kept.
    #[arg(long, default_value = "first", value_parser = ["first", "stack-v2"])]
    survivor: String,
    /// Also write the removed documents under removed/.
    #[arg(long)]
    write_removed: bool,
    /// Check every candidate pair's exact Jaccard similarity against this threshold
    /// and report how many clusters would split (the output is not changed).
    #[arg(long, num_args = 0..=1, default_missing_value = "0.7")]
    verify: Option<f64>,
    #[arg(long, default_value_t = 5)]
    ngram: usize,
    #[arg(long, default_value_t = 256)]
    perms: usize,
    #[arg(long, default_value_t = 25)]
    bands: usize,
    #[arg(long, default_value_t = 10)]
    rows: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

fn run_dedup(args: DedupArgs) -> Result<()> {
    if let Some(threads) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .ok();
    }
    let config = DedupConfig {
        input: args.input.clone(),
        output: args.out.clone(),
        minhash: MinHashConfig {
            ngram: args.ngram,
            perms: args.perms,
            bands: args.bands,
            rows: args.rows,
            ..Default::default()
        },
        survivor: if args.survivor == "stack-v2" {
            Survivor::StackV2
        } else {
            Survivor::First
        },
        write_removed: args.write_removed,
        zstd_level: 3,
        verify_threshold: args.verify,
    };
    let dedup = NearDedup::new(config)?;
    let stages: Vec<Stage> = match args.stage.as_str() {
        "all" => Stage::ALL.to_vec(),
        one => Stage::ALL.into_iter().filter(|s| s.name() == one).collect(),
    };
    let tasks = args.tasks.unwrap_or(1);
    let indices: Vec<usize> = match args.task_index {
        Some(i) if i >= tasks => bail!("--task-index {i} is not below --tasks {tasks}"),
        Some(i) => vec![i],
        None => (0..tasks).collect(),
    };
    for stage in stages {
        for &index in &indices {
            let _lock = lock::hold(
                &dedup.lock_path(stage, index),
                &format!(
                    "stage {} task {index} of {}",
                    stage.name(),
                    args.out.display()
                ),
            )?;
            let outcome = dedup
                .run(stage, TaskSpec { tasks, index })
                .with_context(|| format!("{} task {index} of {tasks}", stage.name()))?;
            match outcome {
                StageOutcome::Done { seconds } => {
                    eprintln!("{} {index}/{tasks}: done in {seconds:.2}s", stage.name())
                }
                StageOutcome::AlreadyDone => eprintln!(
                    "{} {index}/{tasks}: already complete, skipped",
                    stage.name()
                ),
                StageOutcome::NothingToDo => {}
            }
        }
    }
    if let Ok(text) = std::fs::read_to_string(dedup.report_path()) {
        let r: serde_json::Value = serde_json::from_str(&text)?;
        outln!(
            "{} documents, {} in {} clusters; {} removed ({:.1} MB); report: {}",
            r["documents"],
            r["documents_in_clusters"],
            r["clusters"],
            r["removed"]["documents"],
            r["removed"]["bytes"].as_f64().unwrap_or(0.0) / 1e6,
            dedup.report_path().display()
        )?;
    }
    Ok(())
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Run(args) => run_pipeline(args),
        DataCommand::Dedup(args) => run_dedup(args),
        DataCommand::Sample(args) => run_sample(args),
        DataCommand::Stats { dir } => {
            let merged = pipeline::write_merged_stats(&dir)?;
            outln!("{}", serde_json::to_string_pretty(&merged)?)?;
            Ok(())
        }
    }
}

fn run_sample(args: SampleArgs) -> Result<()> {
    if !(args.mib > 0.0 && args.mib.is_finite()) {
        bail!("--mib must be a positive number of MiB, not {}", args.mib);
    }
    let config = cxxlm_data::sample::SampleConfig {
        bytes: (args.mib * (1 << 20) as f64) as u64,
        spread: args.spread,
        exclude: args.exclude,
        id_component: args.id_component,
    };
    let report = cxxlm_data::sample::sample(&args.inputs, &args.out, &config)?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    for p in &report.projects {
        outln!(
            "  {}: {:.1} of {:.1} MiB",
            p.project,
            mib(p.kept_bytes),
            mib(p.bytes)
        )?;
    }
    outln!(
        "sample: {} documents, {:.1} MiB of JSON lines from {:.1} MiB of {} projects: {}",
        report.kept_docs,
        mib(report.kept_bytes),
        mib(report.bytes),
        report.projects.len(),
        args.out.display()
    )?;
    Ok(())
}

fn config_from(args: &RunArgs) -> Result<PipelineConfig> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            PipelineConfig::from_toml(&text).with_context(|| format!("in {}", path.display()))?
        }
        None => PipelineConfig::default(),
    };
    if !args.inputs.is_empty() {
        config.input.paths = args.inputs.clone();
    }
    if let Some(out) = &args.out {
        config.output.dir = out.clone();
    }
    if args.keep_indentation {
        config.normalize.strip_indentation = false;
    }
    if args.write_removed {
        config.output.write_removed = true;
    }
    if args.permissive_only {
        config.license.permissive_only = true;
    }
    if let Some(action) = &args.secrets {
        config.secrets.action = if action == "drop" {
            SecretAction::Drop
        } else {
            SecretAction::Redact
        };
    }
    if let Some(mib) = args.shard_mib {
        config.output.shard_bytes = mib << 20;
    }
    if let Some(max) = args.max_bytes {
        config.input.max_bytes = max;
    }
    config.validate()?;
    Ok(config)
}

fn run_pipeline(args: RunArgs) -> Result<()> {
    let config = config_from(&args)?;
    if let Some(threads) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .ok();
    }
    interrupt::install();
    let tasks = args.tasks.unwrap_or(1);
    let indices: Vec<usize> = match args.task_index {
        Some(i) if i >= tasks => bail!("--task-index {i} is not below --tasks {tasks}"),
        Some(i) => vec![i],
        None => (0..tasks).collect(),
    };
    let started = Instant::now();
    for index in indices {
        let task = TaskSpec { tasks, index };
        let _lock = lock::hold(
            &pipeline::Layout {
                dir: config.output.dir.clone(),
            }
            .lock(&task),
            &format!("task {index} of {}", config.output.dir.display()),
        )?;
        let display = ProgressDisplay::new(task);
        let outcome = pipeline::run_task(&config, task, &interrupt::STOP, &|p| display.update(p))
            .with_context(|| {
            format!("task {index} of {tasks} ({})", config.output.dir.display())
        })?;
        display.finish();
        match outcome {
            TaskOutcome::AlreadyDone(_) => {
                eprintln!("task {index}/{tasks}: already complete, skipped")
            }
            TaskOutcome::Completed(stats) => print_summary(index, tasks, &stats)?,
        }
    }
    let merged = pipeline::write_merged_stats(&config.output.dir)?;
    eprintln!(
        "{} of {} tasks done in this directory; {:.1}s here; stats: {}",
        merged["tasks"]["done"],
        merged["tasks"]["total"],
        started.elapsed().as_secs_f64(),
        config.output.dir.join("stats.json").display()
    );
    Ok(())
}

fn print_summary(index: usize, tasks: usize, s: &RunStats) -> Result<()> {
    let mb = |b: u64| b as f64 / 1e6;
    outln!(
        "task {index}/{tasks}: {} units, {} documents ({:.1} MB) read in {:.1}s ({:.1} MB/s); {} kept ({:.1} MB) in {} shards",
        s.read.units,
        s.read.docs.docs,
        mb(s.read.docs.bytes),
        s.seconds,
        mb(s.read.docs.bytes) / s.seconds.max(1e-9),
        s.written.docs,
        mb(s.written.bytes),
        s.shards
    )?;
    for (reason, c) in &s.read.skipped {
        outln!("  {:<14} skipped {:>8} {reason}", "read", c.docs)?;
    }
    for step in &s.steps {
        outln!(
            "  {:<14} {:>8} in {:>8} out",
            step.name,
            step.input.docs,
            step.output.docs
        )?;
        for (reason, c) in &step.dropped {
            outln!("  {:<14} dropped {:>8} {reason}", "", c.docs)?;
        }
    }
    Ok(())
}

struct ProgressDisplay {
    bar: Option<ProgressBar>,
    task: TaskSpec,
    last_log: std::sync::Mutex<Instant>,
}

impl ProgressDisplay {
    fn new(task: TaskSpec) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} units {msg} ({elapsed})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_prefix(format!("task {}/{}", task.index, task.tasks));
            bar
        });
        ProgressDisplay {
            bar,
            task,
            last_log: std::sync::Mutex::new(Instant::now()),
        }
    }

    fn update(&self, p: Progress) {
        let msg = format!(
            "{:.0} MB read, {} docs kept",
            p.bytes_read as f64 / 1e6,
            p.docs_written
        );
        match &self.bar {
            Some(bar) => {
                bar.set_length(p.units_total);
                bar.set_position(p.units_done);
                bar.set_message(msg);
            }
            None => {
                let Ok(mut last) = self.last_log.lock() else {
                    return;
                };
                if last.elapsed() >= Duration::from_secs(30) {
                    *last = Instant::now();
                    tracing::info!(
                        "task {}/{}: {}/{} units, {msg}",
                        self.task.index,
                        self.task.tasks,
                        p.units_done,
                        p.units_total
                    );
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
