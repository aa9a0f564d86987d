//! `cxxlm tasks`: verifiable C++ tasks (injected bugs, fixes from history, a teacher's
//! answers), their re-verification, and decontamination against benchmarks.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use cxxlm_data::steps::decontaminate::{read_benchmark, BenchmarkIndex, DecontaminateConfig};
use cxxlm_tasks::bugs::{self, BugRun, BugSettings, BugStats};
use cxxlm_tasks::judge::Judge;
use cxxlm_tasks::mine::{self, MineSettings};
use cxxlm_tasks::teacher::{self, Teacher, TeacherConfig};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::interrupt;

#[derive(Subcommand)]
pub enum TasksCommand {
    /// Find runnable programs, inject bugs, keep the mutants a sandboxed run shows, and
    /// write them as SFT tasks with their debug state (resumable).
    Bugs(BugsArgs),
    /// Function-level bug-fix pairs from a git repository's fix commits.
    Mine(MineArgs),
    /// Ask an OpenAI-compatible teacher a prompt template over JSON lines records.
    Teacher(TeacherArgs),
    /// Remove tasks or shard documents that overlap a benchmark (MBPP-C++ and files given).
    Decontaminate(DecontaminateArgs),
    /// Build and run both versions of sampled tasks on their own, again.
    Verify(VerifyArgs),
    /// Function-body tasks from runnable bug tasks: the fixed program with the buggy
    /// function's body left empty, judged by the same oracle (one per function, kept when
    /// the empty body fails); a killed run resumes from the verdicts in OUT.judged.
    Bodies(BodiesArgs),
    /// Tool-use chat examples for `train sft`: each runnable task's fix replayed through
    /// the agent's tools (test, open, edit, test, submit), kept when it ends solved.
    Trajectories(TrajectoriesArgs),
}

#[derive(Args)]
pub struct BugsArgs {
    /// Directories, archives (a Debian corpus), git checkouts. Repeatable.
    #[arg(long = "input", short, required = true)]
    inputs: Vec<String>,
    #[arg(long, short)]
    out: PathBuf,
    /// Mutants of one operator per program.
    #[arg(long, default_value_t = 8)]
    per_operator: usize,
    /// Mutants per program in all.
    #[arg(long, default_value_t = 64)]
    per_program: usize,
    /// Mutants per program that need a build of their own (signed overflow).
    #[arg(long, default_value_t = 2)]
    standalone: usize,
    /// Candidates per package, in path order (0: all).
    #[arg(long, default_value_t = 0)]
    max_candidates: usize,
    /// Candidates per output part (the unit of resumption).
    #[arg(long, default_value_t = 8)]
    chunk: usize,
    #[arg(long, default_value_t = 12_000)]
    max_program_bytes: usize,
    /// Projects whose tasks form the test split (default: a hash of the name).
    #[arg(long, value_delimiter = ',')]
    test_projects: Vec<String>,
    /// Share of projects in the test split when none are named, in percent.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=100))]
    test_percent: u64,
    /// Programs built and run at once (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args)]
pub struct MineArgs {
    /// A git checkout or bare repository.
    #[arg(long)]
    repo: PathBuf,
    #[arg(long, short)]
    out: PathBuf,
    #[arg(long)]
    pattern: Option<String>,
    #[arg(long, default_value_t = 4)]
    max_files: usize,
    #[arg(long, default_value_t = 200)]
    max_diff_lines: usize,
    #[arg(long, default_value_t = 20)]
    max_changed_lines: usize,
    #[arg(long, default_value_t = 120)]
    max_function_lines: usize,
    #[arg(long, value_delimiter = ',')]
    test_projects: Vec<String>,
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=100))]
    test_percent: u64,
}

#[derive(Args)]
pub struct TeacherArgs {
    /// The prompt: a text file with `{{field}}` holes (see crates/cxxlm-tasks/prompts/).
    #[arg(long)]
    prompt: PathBuf,
    /// JSON lines records filling the holes (`id` names each).
    #[arg(long)]
    records: PathBuf,
    /// Answers as JSON lines `{"id","input","output","model"}`.
    #[arg(long, short)]
    out: PathBuf,
    /// The server's base URL, up to `/v1`.
    #[arg(long, default_value = "http://127.0.0.1:8012/v1")]
    base_url: String,
    #[arg(long, default_value = "cxxlm")]
    model: String,
    /// The environment variable holding the API key (sent as a bearer token if set).
    #[arg(long, default_value = "OPENAI_API_KEY")]
    api_key_env: String,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    #[arg(long, default_value_t = 5)]
    retries: u32,
    /// First retry after this many milliseconds, doubling.
    #[arg(long, default_value_t = 500)]
    backoff_ms: u64,
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    #[arg(long, default_value_t = 0.7, value_parser = crate::cli::temperature)]
    temperature: f64,
    #[arg(long, default_value_t = 1024)]
    max_tokens: usize,
    /// Responses kept here by request; a rerun asks only what is not.
    #[arg(long, default_value = "runs/cache/teacher")]
    cache: PathBuf,
}

#[derive(Args)]
pub struct DecontaminateArgs {
    /// JSON lines files or directories of them (.jsonl, .jsonl.zst): tasks (`input`,
    /// `output`) or shard documents (`text`).
    #[arg(long = "input", short, required = true)]
    inputs: Vec<PathBuf>,
    /// Kept lines under the same file names; removed ones under removed/ with the item
    /// they match; report.json.
    #[arg(long, short)]
    out: PathBuf,
    /// More benchmarks (JSON lines; every string field is text). Repeatable.
    #[arg(long = "benchmark")]
    benchmarks: Vec<PathBuf>,
    /// Leave out the built-in MBPP-C++.
    #[arg(long)]
    no_mbpp: bool,
    #[arg(long, default_value_t = 10)]
    word_ngram: usize,
    #[arg(long, default_value_t = 50)]
    char_ngram: usize,
    #[arg(long, default_value_t = 3)]
    min_matches: usize,
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args)]
pub struct TrajectoriesArgs {
    /// Outputs of `tasks bugs` (directories or part files).
    #[arg(long = "input", short, required = true)]
    inputs: Vec<PathBuf>,
    /// The examples, JSON lines (`{"id", "split", "project", "messages"}`).
    #[arg(long, short)]
    out: PathBuf,
    /// Runnable tasks used (spread evenly over the input); 0: all.
    #[arg(long, default_value_t = 0)]
    limit: usize,
}

#[derive(Args)]
pub struct BodiesArgs {
    /// Outputs of `tasks bugs` (directories or part files).
    #[arg(long = "input", short, required = true)]
    inputs: Vec<PathBuf>,
    /// The tasks, JSON lines (`train rl --tasks`, `train sft --data`, `eval bugfix --tasks`
    /// read them).
    #[arg(long, short)]
    out: PathBuf,
}

#[derive(Args)]
pub struct VerifyArgs {
    /// Outputs of `tasks bugs` (directories or part files).
    #[arg(long = "input", short, required = true)]
    inputs: Vec<PathBuf>,
    /// Tasks sampled (spread evenly over the input); 0: all.
    #[arg(long, default_value_t = 50)]
    sample: usize,
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(cmd: TasksCommand) -> Result<()> {
    match cmd {
        TasksCommand::Bugs(a) => run_bugs(a),
        TasksCommand::Mine(a) => run_mine(a),
        TasksCommand::Teacher(a) => run_teacher(a),
        TasksCommand::Decontaminate(a) => run_decontaminate(a),
        TasksCommand::Verify(a) => run_verify(a),
        TasksCommand::Bodies(a) => run_bodies(a),
        TasksCommand::Trajectories(a) => run_trajectories(a),
    }
}

fn rate(n: u64, d: u64) -> f64 {
    n as f64 / d.max(1) as f64
}

pub fn print_bug_stats(s: &BugStats) -> Result<()> {
    outln!(
        "{} candidates -> {} programs with an oracle -> {} verified tasks ({} builds, {} runs)",
        s.candidates,
        s.programs,
        s.tasks(),
        s.builds,
        s.runs
    )?;
    outln!(
        "throughput: {:.2} tasks/s over {:.0} s of wall time; {:.0}% of the work's time in g++",
        s.tasks() as f64 / s.wall_seconds.max(1e-9),
        s.wall_seconds,
        100.0 * s.gxx_seconds / s.busy_seconds.max(1e-9)
    )?;
    outln!("candidates not used: {:?}", s.rejected)?;
    outln!(
        "{:<24} {:>7} {:>7} {:>8} {:>6}",
        "operator",
        "sites",
        "tried",
        "verified",
        "yield"
    )?;
    for op in cxxlm_tasks::mutate::Operator::ALL {
        let n = op.name();
        let g = |m: &std::collections::BTreeMap<String, u64>| m.get(n).copied().unwrap_or(0);
        outln!(
            "{n:<24} {:>7} {:>7} {:>8} {:>5.0}%",
            g(&s.sites),
            g(&s.tried),
            g(&s.verified),
            100.0 * rate(g(&s.verified), g(&s.tried))
        )?;
    }
    outln!("failures shown: {:?}", s.failures)?;
    outln!("splits: {:?}", s.splits)?;
    Ok(())
}

fn run_bugs(a: BugsArgs) -> Result<()> {
    interrupt::install();
    for input in &a.inputs {
        cxxlm_data::read::refuse_overlap(Path::new(input), &a.out)?;
    }
    let settings = BugSettings {
        inputs: a.inputs,
        per_operator: a.per_operator,
        per_program: a.per_program,
        standalone: a.standalone,
        max_candidates: a.max_candidates,
        chunk: a.chunk,
        max_program_bytes: a.max_program_bytes,
        test_projects: a.test_projects,
        test_percent: a.test_percent,
    };
    let run = BugRun {
        out: a.out,
        settings,
    };
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut total = BugStats::default();
    let stats = run.run(threads, &interrupt::STOP, &mut |project, s| {
        total.merge(s);
        eprintln!(
            "{project}: {} candidates, {} programs, {} tasks so far ({:.2} tasks/s)",
            total.candidates,
            total.programs,
            total.tasks(),
            total.tasks() as f64 / total.wall_seconds.max(1e-9)
        );
    })?;
    print_bug_stats(&stats)
}

fn run_mine(a: MineArgs) -> Result<()> {
    let mut settings = MineSettings {
        max_files: a.max_files,
        max_diff_lines: a.max_diff_lines,
        max_changed_lines: a.max_changed_lines,
        max_function_lines: a.max_function_lines,
        test_projects: a.test_projects,
        test_percent: a.test_percent,
        ..Default::default()
    };
    if let Some(p) = a.pattern {
        settings.pattern = p;
    }
    let s = mine::mine_to(&a.repo, &a.out, &settings)?;
    outln!(
        "{} commits, {} with a fix message, {} of those change C/C++ files; {} function pairs from {} commits ({:.1}% of fix commits with C/C++ changes) in {:.1} s",
        s.commits,
        s.fix_messages,
        s.with_cxx_changes,
        s.pairs,
        s.commits_with_pairs,
        100.0 * rate(s.commits_with_pairs, s.with_cxx_changes),
        s.seconds
    )?;
    outln!("skipped: {:?}", s.skipped)?;
    Ok(())
}

fn run_teacher(a: TeacherArgs) -> Result<()> {
    let requests = teacher::requests(&a.prompt, &a.records)?;
    let t = Teacher::new(TeacherConfig {
        base_url: a.base_url,
        model: a.model,
        api_key: std::env::var(&a.api_key_env).ok().filter(|k| !k.is_empty()),
        concurrency: a.concurrency,
        retries: a.retries,
        backoff: Duration::from_millis(a.backoff_ms),
        timeout: Duration::from_secs(a.timeout_s),
        temperature: a.temperature,
        max_tokens: a.max_tokens,
        cache: Some(a.cache),
    })?;
    let (answers, errors, stats) = t.answer_all(&requests);
    let lines: Vec<String> = answers
        .iter()
        .map(|x| serde_json::to_string(x).map_err(Into::into))
        .collect::<Result<_>>()?;
    let mut text = lines.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    cxxlm_data::shard::write_atomic(&a.out, text.as_bytes())?;
    outln!(
        "{} requests: {} from the cache, {} asked ({} retries), {} failed",
        stats.requests,
        stats.cached,
        stats.asked,
        stats.retries,
        stats.failed
    )?;
    for (id, e) in errors.iter().take(5) {
        eprintln!("  {id}: {e}");
    }
    if !errors.is_empty() {
        bail!(
            "{} requests failed; rerun to ask them again (answers so far are cached)",
            errors.len()
        );
    }
    Ok(())
}

/// JSON lines files under `inputs`, with their names relative to their input.
fn jsonl_files(inputs: &[PathBuf]) -> Result<Vec<(PathBuf, String)>> {
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(input)
                .with_context(|| format!("reading {}", input.display()))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let n = p
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    n.ends_with(".jsonl") || n.ends_with(".jsonl.zst")
                })
                .collect();
            files.sort();
            for f in files {
                let name = f
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                out.push((f, name));
            }
        } else {
            let name = input
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            out.push((input.clone(), name));
        }
    }
    Ok(out)
}

fn write_lines(path: &Path, lines: &[String]) -> Result<()> {
    let mut bytes = Vec::new();
    for l in lines {
        bytes.extend_from_slice(l.as_bytes());
        bytes.push(b'\n');
    }
    let name = path.to_string_lossy();
    let bytes = if name.ends_with(".zst") {
        zstd::encode_all(&bytes[..], 3)?
    } else {
        bytes
    };
    cxxlm_data::shard::write_atomic(path, &bytes)?;
    Ok(())
}

fn run_decontaminate(a: DecontaminateArgs) -> Result<()> {
    use rayon::prelude::*;
    if let Some(t) = a.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .ok();
    }
    let config = DecontaminateConfig {
        enabled: true,
        mbpp: !a.no_mbpp,
        benchmarks: a.benchmarks.clone(),
        word_ngram: a.word_ngram,
        char_ngram: a.char_ngram,
        min_matches: a.min_matches,
        ..Default::default()
    };
    for b in &a.benchmarks {
        read_benchmark(b).with_context(|| format!("benchmark {}", b.display()))?;
    }
    for input in &a.inputs {
        cxxlm_data::read::refuse_overlap(input, &a.out)?;
    }
    let started = Instant::now();
    let index = BenchmarkIndex::from_config(&config)?;
    let index_seconds = started.elapsed().as_secs_f64();
    std::fs::create_dir_all(a.out.join("removed"))?;
    let (mut records, mut removed, mut bytes) = (0u64, 0u64, 0u64);
    let mut by_item: std::collections::BTreeMap<String, u64> = Default::default();
    let scan = Instant::now();
    for (path, name) in jsonl_files(&a.inputs)? {
        let text = bugs::read_text(&path)?;
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let verdicts: Vec<Result<Option<Value>>> = lines
            .par_iter()
            .enumerate()
            .map(|(i, line)| {
                let v: Value = serde_json::from_str(line)
                    .with_context(|| format!("{}:{}", path.display(), i + 1))?;
                let body = match (v.get("text"), v.get("input"), v.get("output")) {
                    (Some(Value::String(t)), _, _) => t.clone(),
                    (_, Some(Value::String(i)), o) => {
                        format!("{i}\n{}", o.and_then(Value::as_str).unwrap_or(""))
                    }
                    _ => bail!("{}:{}: neither `text` nor `input`", path.display(), i + 1),
                };
                Ok(index.find(&body).map(|m| {
                    let mut v = v;
                    v["decontaminate"] =
                        json!({"benchmark": m.benchmark, "item": m.item, "matches": m.matches});
                    v
                }))
            })
            .collect();
        let mut kept = Vec::new();
        let mut gone = Vec::new();
        for (line, verdict) in lines.iter().zip(verdicts) {
            records += 1;
            bytes += line.len() as u64;
            match verdict? {
                None => kept.push(line.to_string()),
                Some(v) => {
                    removed += 1;
                    *by_item
                        .entry(format!(
                            "{}:{}",
                            v["decontaminate"]["benchmark"].as_str().unwrap_or(""),
                            v["decontaminate"]["item"].as_str().unwrap_or("")
                        ))
                        .or_default() += 1;
                    gone.push(v.to_string());
                }
            }
        }
        write_lines(&a.out.join(&name), &kept)?;
        if !gone.is_empty() {
            write_lines(&a.out.join("removed").join(&name), &gone)?;
        }
    }
    let seconds = scan.elapsed().as_secs_f64();
    let report = json!({
        "records": records, "removed": removed, "bytes": bytes,
        "benchmark_items": index.items(), "ngrams": index.ngrams(),
        "index_seconds": index_seconds, "scan_seconds": seconds,
        "mb_per_second": bytes as f64 / 1e6 / seconds.max(1e-9),
        "removed_by_item": by_item,
    });
    cxxlm_data::shard::write_atomic(
        &a.out.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    outln!(
        "{records} records ({:.1} MB) against {} benchmark items ({} n-grams): {removed} removed; {:.1} MB/s",
        bytes as f64 / 1e6,
        index.items(),
        index.ngrams(),
        bytes as f64 / 1e6 / seconds.max(1e-9)
    )?;
    for (item, n) in by_item.iter().take(20) {
        outln!("  {n:>5}  {item}")?;
    }
    Ok(())
}

fn run_trajectories(a: TrajectoriesArgs) -> Result<()> {
    use rayon::prelude::*;
    let tasks = bugs::read_tasks(&a.inputs)?;
    let runnable: Vec<_> = tasks.iter().filter(|t| t.check.is_some()).collect();
    let n = match a.limit {
        0 => runnable.len(),
        l => l.min(runnable.len()),
    };
    let picked: Vec<_> = (0..n).map(|i| runnable[i * runnable.len() / n]).collect();
    let results = picked
        .par_iter()
        .map(|t| cxxlm_agent::trajectory::example(t))
        .collect::<Result<Vec<_>, _>>()?;
    let mut text = String::new();
    let mut failed = Vec::new();
    for (t, r) in picked.iter().zip(results) {
        match r {
            Ok(example) => text += &format!("{example}\n"),
            Err(why) => failed.push((&t.id, why)),
        }
    }
    cxxlm_data::shard::write_atomic(&a.out, text.as_bytes())?;
    outln!(
        "{} examples from {n} runnable tasks ({} of {} tasks not runnable) -> {}; {} trajectories did not end solved",
        n - failed.len(),
        tasks.len() - runnable.len(),
        tasks.len(),
        a.out.display(),
        failed.len()
    )?;
    for (id, why) in failed.iter().take(10) {
        outln!("  {id}: {why}")?;
    }
    Ok(())
}

fn run_bodies(a: BodiesArgs) -> Result<()> {
    let bugs = bugs::read_tasks(&a.inputs)?;
    let made = cxxlm_tasks::bodies::body_tasks(&bugs);
    // The stubs' verdicts so far, beside the output until it is written.
    let mut journal = a.out.clone().into_os_string();
    journal.push(".judged");
    let journal = PathBuf::from(journal);
    let (bodies, passing) = cxxlm_tasks::bodies::failing_stubs(&Judge::new()?, made, &journal)?;
    let mut text = String::new();
    for t in &bodies {
        text += &serde_json::to_string(t)?;
        text.push('\n');
    }
    cxxlm_data::shard::write_atomic(&a.out, text.as_bytes())?;
    std::fs::remove_file(&journal)?;
    let runnable = bugs.iter().filter(|t| t.check.is_some()).count();
    let test = bodies.iter().filter(|t| t.split == "test").count();
    outln!(
        "{} function-body tasks ({test} of the test split) from {runnable} runnable bug tasks -> {}; \
         {passing} left out: their program passes with the body empty",
        bodies.len(),
        a.out.display()
    )?;
    Ok(())
}

fn run_verify(a: VerifyArgs) -> Result<()> {
    use rayon::prelude::*;
    let tasks = bugs::read_tasks(&a.inputs)?;
    let tasks: Vec<_> = tasks.into_iter().filter(|t| t.check.is_some()).collect();
    if tasks.is_empty() {
        bail!("no runnable tasks in the input");
    }
    let n = if a.sample == 0 {
        tasks.len()
    } else {
        a.sample.min(tasks.len())
    };
    let picked: Vec<_> = (0..n).map(|i| &tasks[i * tasks.len() / n]).collect();
    let judge = Judge::new()?;
    let results = picked
        .par_iter()
        .map(|t| bugs::reverify(&judge, t))
        .collect::<Result<Vec<_>, _>>()?;
    let fixed = results.iter().filter(|r| r.fixed_matches_oracle).count();
    let buggy = results.iter().filter(|r| r.buggy_fails).count();
    let same = results.iter().filter(|r| r.same_failure_kind).count();
    let output = results.iter().filter(|r| r.output_passes).count();
    outln!(
        "{n} tasks built on their own: fix matches the oracle {fixed}/{n}, bug fails {buggy}/{n}, with the recorded failure kind {same}/{n}, the task's output as an answer passes {output}/{n}"
    )?;
    for r in results
        .iter()
        .filter(|r| !r.fixed_matches_oracle || !r.buggy_fails || !r.output_passes)
        .take(10)
    {
        outln!(
            "  {}: fix ok {}, bug fails {}, output passes {}",
            r.id,
            r.fixed_matches_oracle,
            r.buggy_fails,
            r.output_passes
        )?;
    }
    if let Some(path) = &a.json {
        let mut f = std::fs::File::create(path)?;
        f.write_all(serde_json::to_string_pretty(&json!({"sampled": n, "fixed_matches_oracle": fixed, "buggy_fails": buggy, "same_failure_kind": same, "output_passes": output, "results": results}))?.as_bytes())?;
    }
    Ok(())
}
