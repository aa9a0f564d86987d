//! The layout of a run directory, and its report card: `report.md`, `report.html` (the
//! same text with the plots inline) and PNG plots under `plots/`, drawn from whatever
//! the stages left there. A stage that has not run reads as "not run".

pub mod plot;

use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use plot::Series;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("plot {0}")]
    Plot(String),
}

pub type Result<T, E = ReportError> = std::result::Result<T, E>;

/// Where each stage of a run keeps its outputs.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Layout { root: root.into() }
    }
    /// The run's record: settings, host, and each stage's command, fingerprint and time.
    pub fn record(&self) -> PathBuf {
        self.root.join("speedrun.json")
    }
    pub fn data(&self) -> PathBuf {
        self.root.join("data")
    }
    pub fn dedup(&self) -> PathBuf {
        self.root.join("dedup")
    }
    pub fn tokenizer(&self) -> PathBuf {
        self.root.join("tokenizer.json")
    }
    pub fn pack(&self) -> PathBuf {
        self.root.join("pack")
    }
    pub fn train_config(&self) -> PathBuf {
        self.root.join("pretrain.toml")
    }
    pub fn train(&self) -> PathBuf {
        self.root.join("train")
    }
    /// Phase B's repository examples (`pack --repo-context`).
    pub fn pack_repo(&self) -> PathBuf {
        self.root.join("pack-repo")
    }
    pub fn long_config(&self) -> PathBuf {
        self.root.join("pretrain-long.toml")
    }
    /// Phase B: the pretrained model continued at a longer context.
    pub fn long(&self) -> PathBuf {
        self.root.join("long")
    }
    /// The newest finished checkpoint of the pretraining run.
    pub fn newest_checkpoint(&self) -> Option<PathBuf> {
        newest_checkpoint(&self.train())
    }
    pub fn sft_config(&self) -> PathBuf {
        self.root.join("sft.toml")
    }
    /// The fine-tuning run (with SFT data).
    pub fn sft(&self) -> PathBuf {
        self.root.join("sft")
    }
    pub fn rl_config(&self) -> PathBuf {
        self.root.join("rl.toml")
    }
    /// The RL run (with tasks).
    pub fn rl(&self) -> PathBuf {
        self.root.join("rl")
    }
    /// One JSON file per evaluation: `eval/<name>.json`.
    pub fn eval(&self, name: &str) -> PathBuf {
        self.root.join("eval").join(format!("{name}.json"))
    }
    pub fn mbpp_completions(&self) -> PathBuf {
        self.root.join("eval").join("mbpp-completions.jsonl")
    }
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }
    pub fn plots(&self) -> PathBuf {
        self.root.join("plots")
    }
}

/// The finished checkpoints under `root` with their steps, oldest first: directories
/// `step-N` (six digits or more) holding a `trainer.json`, which is written last; a
/// `step-N.tmp` is still being written. Ordered by step, not by name: past step
/// 999,999 the names no longer sort as their numbers do.
pub fn finished_checkpoints(root: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let step = e
                .file_name()
                .to_str()?
                .strip_prefix("step-")?
                .parse()
                .ok()?;
            let dir = e.path();
            dir.join("trainer.json").is_file().then_some((step, dir))
        })
        .collect();
    found.sort();
    found
}

/// The newest finished checkpoint of the training run in `run`.
pub fn newest_checkpoint(run: &Path) -> Option<PathBuf> {
    finished_checkpoints(&run.join("checkpoints"))
        .pop()
        .map(|(_, dir)| dir)
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ReportError::Io {
                path: path.into(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| ReportError::Parse {
            path: path.into(),
            message: e.to_string(),
        })
}

/// Every line of a JSON-lines file that parses (a line cut by a kill is left out, even
/// within a character).
fn read_json_lines(path: &Path) -> Vec<Value> {
    std::fs::read(path)
        .map(|bytes| json_lines(&bytes).collect())
        .unwrap_or_default()
}

fn json_lines(bytes: &[u8]) -> impl Iterator<Item = Value> + '_ {
    bytes
        .split(|&b| b == b'\n')
        .filter_map(|l| serde_json::from_slice(l).ok())
}

/// The completions of the last rollout batch in an RL run's `rollouts.jsonl`, read from
/// its last `tail_bytes` (the log of a long run is large; a batch larger than that is
/// seen in part).
fn last_rollout_batch(path: &Path, tail_bytes: u64) -> Vec<Value> {
    let Ok(mut file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let start = file
        .metadata()
        .map_or(0, |m| m.len().saturating_sub(tail_bytes));
    // From the byte before, to tell whether the first line read is whole.
    let from = start.saturating_sub(1);
    let mut tail = Vec::new();
    if file.seek(SeekFrom::Start(from)).is_err() || file.read_to_end(&mut tail).is_err() {
        return Vec::new();
    }
    let whole = match start {
        0 => &tail[..],
        _ => tail.splitn(2, |&b| b == b'\n').nth(1).unwrap_or_default(),
    };
    let records: Vec<Value> = json_lines(whole).collect();
    let last = records.iter().filter_map(|r| r["batch"].as_u64()).max();
    records
        .into_iter()
        .filter(|r| last.is_some() && r["batch"].as_u64() == last)
        .collect()
}

/// `v` at a dotted path.
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| &v[k])
}

fn num(v: &Value, path: &str) -> f64 {
    at(v, path).as_f64().unwrap_or(f64::NAN)
}

/// A figure to three places, with its standard error beside it where the eval gave one.
fn with_error(v: &Value, path: &str, error_path: &str) -> String {
    plus_minus(num(v, path), num(v, error_path), 3, "")
}

/// `value` (in `unit`) to `places`, then `± error` unless the error is missing or zero
/// (every problem scored alike: too few to tell, not certainty).
fn plus_minus(value: f64, error: f64, places: usize, unit: &str) -> String {
    if error > 0.0 {
        format!("{value:.places$}{unit} ± {error:.places$}")
    } else {
        format!("{value:.places$}{unit}")
    }
}

fn mb(bytes: f64) -> String {
    format!("{:.1}", bytes / 1e6)
}

fn seconds(s: f64) -> String {
    if s >= 120.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{s:.1} s")
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A markdown table; `|` in cells is escaped.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(header.len()));
    for r in rows {
        let cells: Vec<String> = r.iter().map(|c| cell(c)).collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out.push('\n');
}

fn code_block(out: &mut String, lang: &str, text: &str) {
    let fence = if text.contains("```") { "~~~~" } else { "```" };
    let _ = writeln!(out, "{fence}{lang}\n{}\n{fence}\n", text.trim_end());
}

/// What the report writer produced.
pub struct Written {
    pub markdown: PathBuf,
    pub html: PathBuf,
    pub plots: Vec<PathBuf>,
    /// Plots that could not be drawn, with the reason (the report says so too).
    pub plot_errors: Vec<String>,
}

/// The evaluations' JSON files under `eval/`, by name.
/// The kinds of span `cxxlm eval fim` hides, in report order.
const FIM_SPANS: [&str; 3] = ["line", "block", "function"];

const EVALS: [&str; 10] = [
    "bpb",
    "bpb-long",
    "bugfix",
    "bugfix-rl",
    "bugfix-sft",
    "compile",
    "fim",
    "mbpp",
    "mbpp-sft",
    "tokenizer",
];

/// The models that answer the held-out bug fixes, in the order they are made, with the
/// evaluation holding their answers.
const BUGFIX_MODELS: [(&str, &str); 3] = [
    ("pretrained", "bugfix"),
    ("fine-tuned (SFT)", "bugfix-sft"),
    ("reinforced (RL)", "bugfix-rl"),
];

struct Report<'a> {
    layout: &'a Layout,
    /// Each evaluation's results, read once; absent when it has not run.
    evals: BTreeMap<&'static str, Value>,
    md: String,
    plots: Vec<PathBuf>,
    plot_errors: Vec<String>,
}

impl Report<'_> {
    fn section(&mut self, title: &str) {
        let _ = writeln!(self.md, "## {title}\n");
    }

    fn not_run(&mut self, what: &str) {
        let _ = writeln!(self.md, "_{what}: not run._\n");
    }

    /// Draws a plot into `plots/<name>.png` and links it, or notes why it could not.
    fn plot(&mut self, name: &str, alt: &str, draw: impl FnOnce(&Path) -> Result<()>) {
        let dir = self.layout.plots();
        if let Err(source) = std::fs::create_dir_all(&dir) {
            self.plot_errors
                .push(format!("{}: {source}", dir.display()));
            return;
        }
        let path = dir.join(format!("{name}.png"));
        match draw(&path) {
            Ok(()) => {
                let _ = writeln!(self.md, "![{alt}](plots/{name}.png)\n");
                self.plots.push(path);
            }
            Err(e) => {
                let _ = writeln!(self.md, "_{alt}: plot not drawn ({e})._\n");
                self.plot_errors.push(e.to_string());
            }
        }
    }
}

/// Writes `report.md`, `report.html` and `plots/*.png` into the run directory.
pub fn write(layout: &Layout) -> Result<Written> {
    let record = read_json(&layout.record())?.unwrap_or(Value::Null);
    let mut evals = BTreeMap::new();
    for name in EVALS {
        if let Some(v) = read_json(&layout.eval(name))? {
            evals.insert(name, v);
        }
    }
    let mut r = Report {
        layout,
        evals,
        md: String::new(),
        plots: Vec::new(),
        plot_errors: Vec::new(),
    };
    let name = layout
        .root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| layout.root.display().to_string());
    let _ = writeln!(r.md, "# cxxlm report card: {name}\n");
    headline(&mut r, &record);
    stages(&mut r, &record);
    data(&mut r)?;
    dedup(&mut r)?;
    tokenizer(&mut r);
    training(&mut r)?;
    fine_tuning(&mut r)?;
    reinforcement(&mut r);
    bug_fixes(&mut r);
    evaluation(&mut r);
    samples(&mut r)?;
    host(&mut r, &record);

    let markdown = layout.root.join("report.md");
    let html = layout.root.join("report.html");
    let write = |path: &Path, text: &str| {
        std::fs::write(path, text).map_err(|source| ReportError::Io {
            path: path.into(),
            source,
        })
    };
    write(&markdown, &r.md)?;
    write(&html, &to_html(&name, &r.md))?;
    Ok(Written {
        markdown,
        html,
        plots: r.plots,
        plot_errors: r.plot_errors,
    })
}

fn headline(r: &mut Report, record: &Value) {
    let mut rows = Vec::new();
    let mut row = |k: &str, v: String| rows.push(vec![k.to_string(), v]);
    if let Some(p) = record["preset"].as_str() {
        row("preset", format!("`{p}`"));
    }
    if let Some(s) = record["sources"].as_array() {
        let s: Vec<String> = s
            .iter()
            .filter_map(Value::as_str)
            .map(|s| format!("`{s}`"))
            .collect();
        row("sources", s.join(", "));
    }
    let total: f64 = record["stages"]
        .as_object()
        .map(|s| {
            s.values()
                .map(|v| num(v, "seconds"))
                .filter(|x| x.is_finite())
                .sum()
        })
        .unwrap_or(0.0);
    if total > 0.0 {
        row("time (all stages)", seconds(total));
    }
    if let Some(bpb) = r.evals.get("bpb").cloned() {
        row(
            "validation bits per byte",
            format!("{:.4}", num(&bpb, "bits_per_byte")),
        );
    }
    if let Some(m) = r.evals.get("mbpp").cloned() {
        row(
            "MBPP-C++ pass@1",
            format!(
                "{:.3} ({} of {} problems)",
                num(&m, "pass_at_k.pass@1"),
                m["passed"],
                m["problems"]
            ),
        );
    }
    if let Some(m) = r.evals.get("mbpp-sft").cloned() {
        row(
            "MBPP-C++ pass@1 after SFT",
            format!(
                "{:.3} ({} of {} problems)",
                num(&m, "pass_at_k.pass@1"),
                m["passed"],
                m["problems"]
            ),
        );
    }
    let fixed: Vec<String> = BUGFIX_MODELS
        .iter()
        .filter_map(|(model, key)| {
            let b = r.evals.get(key)?;
            Some(format!("{:.3} {model}", num(b, "pass@1")))
        })
        .collect();
    if !fixed.is_empty() {
        row("bug-fix pass@1 (held-out projects)", fixed.join(", "));
    }
    if let Some(c) = r.evals.get("compile").cloned() {
        row(
            "compile rate (held-out function bodies)",
            format!("{:.3} of {}", num(&c, "compile_rate"), c["programs"]),
        );
    }
    if let Some(f) = r.evals.get("fim").cloned() {
        let rates: Vec<String> = FIM_SPANS
            .iter()
            .filter(|k| f["spans"].get(**k).is_some())
            .map(|k| format!("{:.3}", num(&f["spans"][*k], "exact_rate")))
            .collect();
        row(
            "FIM exact (line / block / function body)",
            format!("{} of {} documents", rates.join(" / "), f["documents"]),
        );
    }
    if let Some(t) = r.evals.get("tokenizer").cloned() {
        if let Some(o) = overall_tokenizer_row(&t) {
            row(
                "tokens vs cl100k (pipeline text)",
                format!(
                    "cl100k needs {:.3}x ours",
                    num(o, "cl100k_raw_over_ours_normalized")
                ),
            );
        }
    }
    if !rows.is_empty() {
        table(&mut r.md, &["", ""], &rows);
    }
}

fn stages(r: &mut Report, record: &Value) {
    let Some(stages) = record["stages"].as_object() else {
        return;
    };
    r.section("Stages");
    let mut rows: Vec<(u64, Vec<String>)> = stages
        .iter()
        .map(|(name, s)| {
            let status = match (s["finished"].as_bool(), s["ended"].as_str()) {
                (Some(true), _) => "done",
                (_, Some(why)) => why,
                _ => "started",
            };
            let secs = num(s, "seconds");
            (
                s["order"].as_u64().unwrap_or(u64::MAX),
                vec![
                    name.clone(),
                    status.into(),
                    if secs.is_finite() {
                        seconds(secs)
                    } else {
                        "-".into()
                    },
                    format!("`{}`", s["command"].as_str().unwrap_or("")),
                ],
            )
        })
        .collect();
    rows.sort_by_key(|(o, _)| *o);
    let rows: Vec<Vec<String>> = rows.into_iter().map(|(_, r)| r).collect();
    table(&mut r.md, &["stage", "status", "time", "command"], &rows);
}

fn data(r: &mut Report) -> Result<()> {
    r.section("Data");
    let Some(stats) = read_json(&r.layout.data().join("stats.json"))? else {
        r.not_run("data");
        return Ok(());
    };
    let s = &stats["stats"];
    let _ = writeln!(
        r.md,
        "{} documents ({} MB) read, {} kept ({} MB) in {} shards.\n",
        s["read"]["docs"]["docs"],
        mb(num(s, "read.docs.bytes")),
        s["written"]["docs"],
        mb(num(s, "written.bytes")),
        s["shards"]
    );
    let mut rows = Vec::new();
    for (reason, c) in s["read"]["skipped"].as_object().into_iter().flatten() {
        rows.push(vec![
            "read".into(),
            reason.clone(),
            c["docs"].to_string(),
            mb(num(c, "bytes")),
        ]);
    }
    for step in s["steps"].as_array().into_iter().flatten() {
        for (reason, c) in step["dropped"].as_object().into_iter().flatten() {
            rows.push(vec![
                step["name"].as_str().unwrap_or("").into(),
                reason.clone(),
                c["docs"].to_string(),
                mb(num(c, "bytes")),
            ]);
        }
    }
    if !rows.is_empty() {
        table(
            &mut r.md,
            &["step", "dropped for", "documents", "MB"],
            &rows,
        );
    }
    Ok(())
}

fn dedup(r: &mut Report) -> Result<()> {
    r.section("Near-deduplication");
    let Some(d) = read_json(&r.layout.dedup().join("near-dedup-report.json"))? else {
        r.not_run("near-deduplication");
        return Ok(());
    };
    let _ = writeln!(
        r.md,
        "{} documents; {} in {} clusters of near-duplicates; {} removed ({} MB).\n",
        d["documents"],
        d["documents_in_clusters"],
        d["clusters"],
        d["removed"]["documents"],
        mb(num(&d, "removed.bytes"))
    );
    // Sizes are `2`, `3-4`, `17-64`, ...: in the order of their first number.
    let mut sizes: Vec<(u64, &String, &Value)> = d["cluster_sizes"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(size, n)| {
            let first = size.split('-').next().unwrap_or(size);
            let from = first.trim().trim_end_matches('+').parse().ok();
            (from.unwrap_or(u64::MAX), size, n)
        })
        .collect();
    sizes.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let rows: Vec<Vec<String>> = sizes
        .into_iter()
        .map(|(_, size, n)| vec![size.clone(), n.to_string()])
        .collect();
    if !rows.is_empty() {
        table(&mut r.md, &["cluster size", "clusters"], &rows);
    }
    Ok(())
}

const ENCODINGS: [&str; 5] = ["ours", "gpt2", "p50k", "cl100k", "o200k"];

fn overall_tokenizer_row(t: &Value) -> Option<&Value> {
    t["projects"]
        .as_array()?
        .iter()
        .find(|p| p["project"] == "overall")
}

fn tokenizer(r: &mut Report) {
    r.section("Tokenizer");
    let Some(t) = r.evals.get("tokenizer").cloned() else {
        r.not_run("tokenizer evaluation");
        return;
    };
    let Some(o) = overall_tokenizer_row(&t) else {
        r.not_run("tokenizer evaluation (no overall row)");
        return;
    };
    let raw = num(o, "raw_bytes");
    let norm = num(o, "normalized_bytes");
    // Text the pipeline made already (the speedrun's shards) normalizes to itself: its raw
    // form is not kept, and one column says all.
    let raw_kept = raw != norm;
    let _ = writeln!(
        r.md,
        "Bytes per token on {} files ({} MB): {}.\n",
        o["files"],
        mb(raw),
        match raw_kept {
            true => "raw text, and the text as the pipeline feeds it to the model",
            false => "the text as the pipeline feeds it to the model (its raw form is not kept)",
        }
    );
    let mut rows = Vec::new();
    let mut bars = Vec::new();
    for e in ENCODINGS {
        let raw_tokens = num(o, &format!("tokens.{e}.raw_tokens"));
        let norm_tokens = num(o, &format!("tokens.{e}.normalized_tokens"));
        if raw_tokens.is_nan() || raw_tokens <= 0.0 {
            continue;
        }
        let pipeline = format!("{:.2}", norm / norm_tokens);
        rows.push(match raw_kept {
            true => vec![e.to_string(), format!("{:.2}", raw / raw_tokens), pipeline],
            false => vec![e.to_string(), pipeline],
        });
        bars.push((e.to_string(), (norm / norm_tokens * 100.0).round() / 100.0));
    }
    let header: &[&str] = match raw_kept {
        true => &["encoding", "bytes/token (raw)", "bytes/token (pipeline)"],
        false => &["encoding", "bytes/token (pipeline)"],
    };
    table(&mut r.md, header, &rows);
    let ratios = match raw_kept {
        true => format!(
            "{:.3}x our tokens on raw text, {:.3}x on pipeline text",
            num(o, "cl100k_raw_over_ours_raw"),
            num(o, "cl100k_raw_over_ours_normalized")
        ),
        false => format!(
            "{:.3}x our tokens",
            num(o, "cl100k_raw_over_ours_normalized")
        ),
    };
    let _ = writeln!(
        r.md,
        "cl100k needs {ratios}. Encoding: {:.1} MB/s.\n",
        num(&t, "encode_mb_per_s")
    );
    r.plot("tokenizer", "bytes per token, pipeline text", |p| {
        plot::bars(
            p,
            "Bytes per token (higher is better)",
            "bytes per token",
            &bars,
        )
    });
    judged_by_the_model(r);
}

/// A compile rate in percent of `n`, with the eval's standard error as [`with_error`].
fn percent_of(rate: f64, eval: &Value, n: &Value) -> String {
    let error = num(eval, "compile_rate_standard_error");
    format!("{} of {n}", plus_minus(100.0 * rate, 100.0 * error, 1, "%"))
}

/// Compression is a means: the model trained with the tokenizer is the judge. Its
/// compile rates and how often its completions ran to the length limit (models that
/// loop on repeated lines run there).
fn judged_by_the_model(r: &mut Report) {
    let mut rows = Vec::new();
    let limit = |v: &Value| match v["length_limited"].as_u64() {
        Some(n) => format!("{:.1}% ({n})", 100.0 * num(v, "length_limited_share")),
        None => "-".into(),
    };
    if let Some(c) = r
        .evals
        .get("compile")
        .filter(|c| c["programs"].as_u64() > Some(0))
    {
        rows.push(vec![
            "held-out function bodies".into(),
            percent_of(num(c, "compile_rate"), c, &c["programs"]),
            limit(c),
        ]);
    }
    if let Some(m) = r
        .evals
        .get("mbpp")
        .filter(|m| m["samples"].as_u64() > Some(0))
    {
        rows.push(vec![
            "MBPP-C++ completions".into(),
            percent_of(num(m, "compiled") / num(m, "samples"), m, &m["samples"]),
            limit(m),
        ]);
    }
    if rows.is_empty() {
        r.not_run("the model's compile rate (judging the tokenizer)");
        return;
    }
    let _ = writeln!(
        r.md,
        "Judged by the model trained with it: how often its code compiles, and how often it ran to the length limit instead of stopping.\n"
    );
    table(
        &mut r.md,
        &["completions", "compile rate", "ran to the length limit"],
        &rows,
    );
}

/// Every numeric field of `metrics.jsonl` as (step, value) points.
fn metric_series(rows: &[Value]) -> BTreeMap<String, Vec<(f64, f64)>> {
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for row in rows {
        let Some(step) = row["step"].as_f64() else {
            continue;
        };
        for (k, v) in row.as_object().into_iter().flatten() {
            if let Some(x) = v.as_f64().filter(|x| x.is_finite() && k != "step") {
                series.entry(k.clone()).or_default().push((step, x));
            }
        }
    }
    series
}

fn training(r: &mut Report) -> Result<()> {
    r.section("Pretraining");
    let l = r.layout.clone();
    let metrics = read_json_lines(&l.train().join("metrics.jsonl"));
    if metrics.is_empty() {
        r.not_run("pretraining");
        return Ok(());
    }
    let s = metric_series(&metrics);
    let get = |k: &str| s.get(k).cloned().unwrap_or_default();
    let last = |k: &str| get(k).last().map_or(f64::NAN, |p| p.1);
    let steps = get("loss").last().map_or(0.0, |p| p.0);
    let tok_s = median(get("tok_s").iter().map(|p| p.1).collect());
    let mfu = median(get("mfu").iter().map(|p| p.1).collect());
    let model = match l.newest_checkpoint() {
        Some(dir) => read_json(&dir.join("config.json"))?,
        None => None,
    };
    let mut rows = vec![
        vec!["steps".into(), format!("{steps}")],
        vec!["tokens".into(), format!("{:.0}", last("tokens"))],
        vec![
            "final loss (moving average)".into(),
            format!("{:.4}", last("loss_ema")),
        ],
        vec![
            "final validation bits per byte".into(),
            format!("{:.4}", last("val_bpb")),
        ],
        vec!["median tokens/s".into(), format!("{tok_s:.0}")],
    ];
    if mfu > 0.0 {
        rows.push(vec!["median MFU".into(), format!("{:.1}%", mfu * 100.0)]);
        rows.push(vec![
            "peak GPU memory".into(),
            format!("{:.1} GiB", last("gpu_memory_gib")),
        ]);
    }
    if let Some(m) = model {
        rows.push(vec![
            "model".into(),
            format!(
                "depth {}, width {}, heads {}/{} (query/key-value), context {}, vocabulary {}, {}",
                m["depth"],
                m["width"],
                m["heads"],
                m["kv_heads"],
                m["seq_len"],
                m["vocab_size"],
                m["activation"].as_str().unwrap_or("")
            ),
        ]);
    }
    table(&mut r.md, &["", ""], &rows);
    let loss = vec![
        Series {
            name: "loss".into(),
            points: get("loss"),
        },
        Series {
            name: "moving average".into(),
            points: get("loss_ema"),
        },
    ];
    r.plot("loss", "training loss", |p| {
        plot::lines(p, "Training loss", "step", "nats/token", &loss)
    });
    let bpb = vec![Series {
        name: "validation".into(),
        points: get("val_bpb"),
    }];
    if !bpb[0].points.is_empty() {
        r.plot("bpb", "validation bits per byte", |p| {
            plot::lines(p, "Validation bits per byte", "step", "bits/byte", &bpb)
        });
    }
    let lr = vec![Series {
        name: "lr".into(),
        points: get("lr_scale"),
    }];
    r.plot("lr", "learning rate", |p| {
        plot::lines(p, "Learning rate (x base)", "step", "scale", &lr)
    });
    let speed = vec![Series {
        name: "tok/s".into(),
        points: get("tok_s"),
    }];
    r.plot("tok_s", "throughput", |p| {
        plot::lines(p, "Throughput", "step", "tokens/s", &speed)
    });
    if mfu > 0.0 {
        let mfu: Vec<(f64, f64)> = get("mfu").iter().map(|&(x, y)| (x, y * 100.0)).collect();
        let mfu = vec![Series {
            name: "MFU".into(),
            points: mfu,
        }];
        r.plot("mfu", "model FLOPs utilization", |p| {
            plot::lines(p, "Model FLOPs utilization", "step", "%", &mfu)
        });
    }
    Ok(())
}

fn evaluation(r: &mut Report) {
    r.section("Evaluation");
    match r.evals.get("bpb").cloned() {
        Some(b) => {
            let _ = writeln!(
                r.md,
                "**Bits per byte** on the packed validation split: {:.4}.\n",
                num(&b, "bits_per_byte")
            );
        }
        None => r.not_run("bits per byte"),
    }
    if let Some(b) = r.evals.get("bpb-long").cloned() {
        let by_position: Vec<String> = b["by_position"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| format!("{}-{}: {:.4}", p["from"], p["to"], num(p, "bits_per_byte")))
            .collect();
        let _ = writeln!(
            r.md,
            "**Long context** (phase B, {} tokens): bits per byte on the held-out repository examples {:.4}; by the position a token is predicted from: {}.\n",
            b["seq_len"],
            num(&b, "bits_per_byte"),
            by_position.join(", ")
        );
    }
    match r.evals.get("compile").cloned() {
        Some(c) if c["programs"] == 0 => {
            let _ = writeln!(
                r.md,
                "**Compile rate**: none of the {} held-out files with a function compiles as it is, so there is nothing to measure.\n",
                c["files_tried"]
            );
        }
        Some(c) => {
            let _ = writeln!(
                r.md,
                "**Compile rate**: the model writes the bodies of {} functions of held-out files that compile; the file is checked again (`g++ -std=c++20 -fsyntax-only -Wall`). Compile rate {:.3}, warning-free {:.3}; {:.1} checks/s.\n",
                c["programs"],
                num(&c, "compile_rate"),
                num(&c, "warning_free_rate"),
                num(&c, "checks_per_second")
            );
            let mut bars: Vec<(String, f64)> = c["failures"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_f64().unwrap_or(0.0)))
                .collect();
            bars.sort_by(|a, b| b.1.total_cmp(&a.1));
            if !bars.is_empty() {
                let rows: Vec<Vec<String>> = bars
                    .iter()
                    .map(|(k, v)| vec![k.clone(), v.to_string()])
                    .collect();
                table(&mut r.md, &["failure", "programs"], &rows);
                r.plot("compile_failures", "compile failures by category", |p| {
                    plot::bars(p, "Compile failures", "programs", &bars)
                });
            }
        }
        None => r.not_run("compile rate"),
    }
    match r.evals.get("fim").cloned() {
        Some(f) => {
            let _ = writeln!(
                r.md,
                "**Fill-in-the-middle** on {} validation documents: in each, a line, a block inside a function and a function body hidden in turn; exact after whitespace normalization, and whether files that compiled as they were compile again with the model's fill.\n",
                f["documents"]
            );
            let rows: Vec<Vec<String>> = FIM_SPANS
                .iter()
                .filter_map(|k| f["spans"].get(*k).map(|s| (k, s)))
                .map(|(k, s)| {
                    let compiled = if *k == "line" {
                        "-".to_string()
                    } else {
                        format!("{} of {}", s["compiled"], s["self_contained"])
                    };
                    vec![
                        k.to_string(),
                        format!(
                            "{} of {} ({:.1}%)",
                            s["exact"],
                            s["tried"],
                            num(s, "exact_rate") * 100.0
                        ),
                        compiled,
                    ]
                })
                .collect();
            table(
                &mut r.md,
                &["span", "exact", "refilled file compiles"],
                &rows,
            );
            let rows: Vec<Vec<String>> = f["examples"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| e["span"] == "line")
                .take(5)
                .map(|e| {
                    vec![
                        format!("`{}`", e["expected"].as_str().unwrap_or("")),
                        format!("`{}`", e["filled"].as_str().unwrap_or("")),
                    ]
                })
                .collect();
            table(&mut r.md, &["hidden line", "model's line"], &rows);
        }
        None => r.not_run("fill-in-the-middle"),
    }
    match r.evals.get("mbpp").cloned() {
        Some(m) => {
            let _ = writeln!(
                r.md,
                "**MultiPL-E MBPP-C++**: {} problems, {} samples; {} compiled, {} passed their tests (sandboxed). pass@1 {}.\n",
                m["problems"],
                m["samples"],
                m["compiled"],
                m["passed"],
                with_error(&m, "pass_at_k.pass@1", "pass_at_k_standard_error.pass@1")
            );
            if let Some(broken) = m["unbuildable"].as_array().filter(|b| !b.is_empty()) {
                let others = match m["buildable_samples"].as_u64() {
                    Some(0) | None => "there are no others".to_string(),
                    Some(n) => format!(
                        "{:.1}% of the other problems' {n} samples compiled",
                        100.0 * num(&m, "buildable_compiled") / n as f64
                    ),
                };
                let _ = writeln!(
                    r.md,
                    "{} of the problems cannot compile with any body (their prompt or tests are broken); {others}.\n",
                    broken.len()
                );
            }
            let mut why: BTreeMap<String, usize> = BTreeMap::new();
            for v in m["verdicts"].as_array().into_iter().flatten() {
                if v["passed"].as_bool() == Some(true) {
                    continue;
                }
                let reason = match (v["category"].as_str(), v["ending"].as_str()) {
                    (Some(c), _) => format!("compile: {c}"),
                    (None, Some(e)) => format!("run: {e}"),
                    (None, None) => "run: wrong answer".into(),
                };
                *why.entry(reason).or_default() += 1;
            }
            let rows: Vec<Vec<String>> = why
                .iter()
                .map(|(k, v)| vec![k.clone(), v.to_string()])
                .collect();
            if !rows.is_empty() {
                table(&mut r.md, &["failed because", "samples"], &rows);
            }
        }
        None => r.not_run("MBPP-C++"),
    }
}

/// The SFT stage, when it ran: its data, losses, speed and MBPP-C++ before and after.
fn fine_tuning(r: &mut Report) -> Result<()> {
    let l = r.layout.clone();
    let metrics = read_json_lines(&l.sft().join("metrics.jsonl"));
    if metrics.is_empty() {
        return Ok(());
    }
    r.section("Supervised fine-tuning");
    let s = metric_series(&metrics);
    let get = |k: &str| s.get(k).cloned().unwrap_or_default();
    let first = |k: &str| get(k).first().map_or(f64::NAN, |p| p.1);
    let last = |k: &str| get(k).last().map_or(f64::NAN, |p| p.1);
    let median_of = |k: &str| median(get(k).iter().map(|p| p.1).collect());
    let mut rows = vec![
        vec![
            "steps".into(),
            format!("{}", get("loss").last().map_or(0.0, |p| p.0)),
        ],
        vec![
            "held-out loss (first, last)".into(),
            format!("{:.4}, {:.4}", first("val_loss"), last("val_loss")),
        ],
        vec![
            "final training loss (moving average)".into(),
            format!("{:.4}", last("loss_ema")),
        ],
        vec![
            "median tokens/s (padding included)".into(),
            format!("{:.0}", median_of("tok_s")),
        ],
        vec![
            "median share of tokens learned / padding".into(),
            format!(
                "{:.1}% / {:.1}%",
                100.0 * median_of("supervised_share"),
                100.0 * median_of("padding_share")
            ),
        ],
    ];
    if let Some(data) = read_json(&l.sft().join("sft-data.json"))? {
        let st = &data["stats"];
        rows.push(vec![
            "examples (training / held out)".into(),
            format!("{} / {}", st["train_examples"], st["val_examples"]),
        ]);
        let skipped: u64 = st["skipped"].as_object().map_or(0, |m| {
            m.values().filter_map(|v| v["records"].as_u64()).sum()
        });
        rows.push(vec![
            "records skipped / examples cut to fit".into(),
            format!("{skipped} / {}", st["truncated"]),
        ]);
    }
    for (name, key) in [("before", "mbpp"), ("after", "mbpp-sft")] {
        if let Some(m) = r.evals.get(key) {
            rows.push(vec![
                format!("MBPP-C++ pass@1 {name}"),
                format!(
                    "{:.3} ({} of {} compiled)",
                    num(m, "pass_at_k.pass@1"),
                    m["compiled"],
                    m["problems"]
                ),
            ]);
        }
    }
    table(&mut r.md, &["", ""], &rows);
    let loss = vec![
        Series {
            name: "training".into(),
            points: get("loss_ema"),
        },
        Series {
            name: "held out".into(),
            points: get("val_loss"),
        },
    ];
    r.plot("sft-loss", "SFT loss", |p| {
        plot::lines(p, "SFT loss on the answers", "step", "nats/token", &loss)
    });
    Ok(())
}

/// The least-squares slope of `v` against its index and the slope's standard error
/// (None under three points): a trend told apart from the batches' spread.
fn trend(v: &[f64]) -> Option<(f64, f64)> {
    let n = v.len() as f64;
    if v.len() < 3 {
        return None;
    }
    let x_mean = (n - 1.0) / 2.0;
    let y_mean = v.iter().sum::<f64>() / n;
    let sxx: f64 = (0..v.len()).map(|i| (i as f64 - x_mean).powi(2)).sum();
    let sxy: f64 = v
        .iter()
        .enumerate()
        .map(|(i, y)| (i as f64 - x_mean) * (y - y_mean))
        .sum();
    let slope = sxy / sxx;
    let residuals: f64 = v
        .iter()
        .enumerate()
        .map(|(i, y)| (y - y_mean - slope * (i as f64 - x_mean)).powi(2))
        .sum();
    Some((slope, (residuals / (n - 2.0) / sxx).sqrt()))
}

/// The RL stage, when it ran: the reward and what the sandbox saw over the rollout
/// batches, the speed, and how a step's time splits between sampling, waiting for the
/// last rewards and the update.
fn reinforcement(r: &mut Report) {
    let metrics = read_json_lines(&r.layout.rl().join("metrics.jsonl"));
    let batches: Vec<&Value> = metrics
        .iter()
        .filter(|m| m["reward_mean"].as_f64().is_some())
        .collect();
    if batches.is_empty() {
        return;
    }
    r.section("Reinforcement learning with the compiler as judge");
    let values = |k: &str| -> Vec<f64> { batches.iter().map(|m| num(m, k)).collect() };
    // The first two batches warm up the sampler's graphs and the compile cache.
    let warm = if batches.len() > 2 { 2 } else { 0 };
    let steady = |k: &str| median(values(k).split_off(warm));
    let third = (batches.len() / 3).max(1);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let first_last = |k: &str| {
        let v = values(k);
        (mean(&v[..third]), mean(&v[v.len() - third..]))
    };
    let share = |k: &str| {
        let (a, b) = first_last(k);
        format!("{:.1}% -> {:.1}%", 100.0 * a, 100.0 * b)
    };
    let (reward_first, reward_last) = first_last("reward_mean");
    let per_batch = steady("step_seconds");
    let (generation, wait) = (steady("generation_seconds"), steady("reward_wait_seconds"));
    let rows = vec![
        vec!["rollout batches".into(), batches.len().to_string()],
        vec![
            "mean reward, first third -> last third of the batches".into(),
            format!("{reward_first:+.3} -> {reward_last:+.3}"),
        ],
        vec![
            "mean reward's trend: least-squares slope per batch, with its standard error".into(),
            match trend(&values("reward_mean")) {
                Some((slope, error)) => format!("{slope:+.4} ± {error:.4}"),
                None => "–".into(),
            },
        ],
        vec![
            "compile rate, first third -> last third".into(),
            share("compile_rate"),
        ],
        vec![
            "test pass rate, first third -> last third".into(),
            share("test_pass_rate"),
        ],
        vec![
            "median rollouts/s (sampling, rewards and the update)".into(),
            format!("{:.1}", steady("rollouts_s")),
        ],
        vec![
            "median batch: sampling + waiting for rewards + update".into(),
            format!(
                "{} = {} + {} + {}",
                seconds(per_batch),
                seconds(generation),
                seconds(wait),
                seconds(per_batch - generation - wait)
            ),
        ],
        vec![
            "median sampling: prefill + decoding (ms a step) + sampled log-probabilities".into(),
            match steady("decode_seconds") {
                d if d.is_nan() => "–".into(),
                d => format!(
                    "{:.2} s + {d:.2} s ({:.1} ms) + {:.2} s",
                    steady("prefill_seconds"),
                    1000.0 * d / steady("decode_steps").max(1.0),
                    steady("sampled_logprob_seconds")
                ),
            },
        ],
        vec![
            "median share of a batch spent waiting for rewards".into(),
            format!("{:.1}%", 100.0 * steady("reward_wait_share")),
        ],
        vec![
            "median share of completions cut at the length limit".into(),
            format!("{:.1}%", 100.0 * steady("truncated_share")),
        ],
        vec![
            "median share of groups whose rewards are all equal".into(),
            format!("{:.1}%", 100.0 * steady("zero_std_groups")),
        ],
        vec![
            "KL to the start, last batch".into(),
            format!("{:.5}", values("kl").last().copied().unwrap_or(f64::NAN)),
        ],
    ];
    table(&mut r.md, &["", ""], &rows);
    let series = |name: &str, key: &str| Series {
        name: name.into(),
        points: batches
            .iter()
            .map(|m| (num(m, "step"), num(m, key)))
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .collect(),
    };
    let reward = vec![series("mean reward", "reward_mean")];
    r.plot("rl-reward", "RL mean reward", |p| {
        plot::lines(
            p,
            "Mean reward of each rollout batch",
            "step",
            "reward",
            &reward,
        )
    });
    let rates = vec![
        series("compiled", "compile_rate"),
        series("tests passed", "test_pass_rate"),
        series("cut at the limit", "truncated_share"),
    ];
    r.plot("rl-rates", "RL completions judged", |p| {
        plot::lines(
            p,
            "Completions judged in the sandbox",
            "step",
            "share",
            &rates,
        )
    });
    rollout_examples(r);
}

/// The highest and the lowest rewarded completion of the last rollout batch, with what
/// the judge said of them (every completion is in `rl/rollouts.jsonl`).
fn rollout_examples(r: &mut Report) {
    let last = last_rollout_batch(&r.layout.rl().join("rollouts.jsonl"), 16 << 20);
    let reward = |c: &&Value| num(c, "reward");
    let best = last.iter().max_by(|a, b| reward(a).total_cmp(&reward(b)));
    let worst = last.iter().min_by(|a, b| reward(a).total_cmp(&reward(b)));
    let (Some(best), Some(worst)) = (best, worst) else {
        return;
    };
    let _ = writeln!(
        r.md,
        "The last rollout batch ({}, {} completions): its highest and lowest rewarded.\n",
        best["batch"],
        last.len()
    );
    const LINES: usize = 60;
    for (which, c) in [("highest", best), ("lowest", worst)] {
        let judged = &c["verdict"]["judged"];
        let yes = |k: &str| if judged[k] == true { "yes" } else { "no" };
        let failure = match (judged["failure"].as_str(), judged["detector"].as_str()) {
            (Some(f), Some(d)) => format!(", failure `{f}` ({d})"),
            (Some(f), None) => format!(", failure `{f}`"),
            _ => String::new(),
        };
        let _ = writeln!(
            r.md,
            "**{which}**: reward {:+.2}, task `{}`, compiled {}, warnings {}, test passed {}{failure}, {} tokens{}:\n",
            num(c, "reward"),
            c["task"].as_str().unwrap_or(""),
            yes("compiled"),
            judged["warnings"],
            yes("passed"),
            c["tokens"],
            if c["truncated"] == true { ", cut at the limit" } else { "" },
        );
        let text = c["completion"].as_str().unwrap_or("");
        let shown: Vec<&str> = text.lines().take(LINES).collect();
        let more = text.lines().count().saturating_sub(LINES);
        let mut block = shown.join("\n");
        if more > 0 {
            let _ = write!(block, "\n// ... {more} more lines");
        }
        code_block(&mut r.md, "cpp", &block);
    }
}

/// The held-out bug fixes (the tasks' test split: projects no stage trained on), as each
/// model answered them.
fn bug_fixes(r: &mut Report) {
    let rows: Vec<Vec<String>> = BUGFIX_MODELS
        .iter()
        .filter_map(|(model, key)| {
            let b = r.evals.get(key)?;
            Some(vec![
                model.to_string(),
                with_error(b, "pass@1", "pass@1_standard_error"),
                format!("{} of {}", b["compiled"], b["answers"]),
                b["tasks"].to_string(),
            ])
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    r.section("Bug fixes on held-out projects");
    table(
        &mut r.md,
        &["model", "pass@1", "answers compiled", "tasks"],
        &rows,
    );
}

fn samples(r: &mut Report) -> Result<()> {
    r.section("Samples");
    let l = r.layout.clone();
    let progress = read_json_lines(&l.train().join("samples.jsonl"));
    if let Some(step) = progress.iter().filter_map(|s| s["step"].as_u64()).max() {
        let _ = writeln!(r.md, "Greedy continuations at step {step}:\n");
        for s in progress.iter().filter(|s| s["step"].as_u64() == Some(step)) {
            let text = format!(
                "{}{}",
                s["prompt"].as_str().unwrap_or(""),
                s["completion"].as_str().unwrap_or("")
            );
            code_block(&mut r.md, "cpp", &text);
        }
    }
    let mbpp = read_json_lines(&l.mbpp_completions());
    if !mbpp.is_empty() {
        let _ = writeln!(r.md, "MBPP-C++ completions (the first three):\n");
        for c in mbpp.iter().take(3) {
            let _ = writeln!(r.md, "`{}`:\n", c["name"].as_str().unwrap_or(""));
            code_block(&mut r.md, "cpp", c["completion"].as_str().unwrap_or(""));
        }
    }
    if progress.is_empty() && mbpp.is_empty() {
        r.not_run("samples");
    }
    Ok(())
}

fn host(r: &mut Report, record: &Value) {
    r.section("Hardware, versions and configuration");
    if let Some(h) = record["host"].as_object() {
        let rows: Vec<Vec<String>> = h
            .iter()
            .map(|(k, v)| {
                vec![
                    k.clone(),
                    v.as_str().map_or_else(|| v.to_string(), str::to_string),
                ]
            })
            .collect();
        table(&mut r.md, &["", ""], &rows);
    }
    if let Some(config) = record["config"].as_str() {
        code_block(&mut r.md, "toml", config);
    }
}

fn to_html(title: &str, markdown: &str) -> String {
    use pulldown_cmark::{html, Options, Parser};
    let mut body = String::new();
    html::push_html(&mut body, Parser::new_ext(markdown, Options::ENABLE_TABLES));
    let title = title.replace('&', "&amp;").replace('<', "&lt;");
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cxxlm report card: {title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5rem 0 1rem; }}
td, th {{ border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }}
pre {{ background: #f6f6f6; padding: 0.6rem; overflow-x: auto; }}
img {{ max-width: 100%; }}
</style></head>
<body>
{body}</body></html>
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_empty_run_directory_reads_as_not_run() {
        let dir = tempfile::tempdir().unwrap();
        let written = write(&Layout::new(dir.path())).unwrap();
        let md = std::fs::read_to_string(&written.markdown).unwrap();
        for section in ["data", "pretraining", "compile rate", "MBPP-C++"] {
            assert!(md.contains(&format!("_{section}: not run._")), "{section}");
        }
        let html = std::fs::read_to_string(&written.html).unwrap();
        assert!(html.contains("<h2>Pretraining</h2>"));
        assert!(written.plots.is_empty());
    }

    #[test]
    fn checkpoints_are_ordered_by_step_past_a_million() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let root = layout.train().join("checkpoints");
        for name in [
            "step-999999",
            "step-1000000",
            "step-000005",
            "step-2000000.tmp",
        ] {
            std::fs::create_dir_all(root.join(name)).unwrap();
            std::fs::write(root.join(name).join("trainer.json"), "{}").unwrap();
        }
        std::fs::create_dir_all(root.join("step-3000000")).unwrap(); // still empty
        let steps: Vec<u64> = finished_checkpoints(&root).iter().map(|c| c.0).collect();
        assert_eq!(steps, [5, 999_999, 1_000_000]);
        assert_eq!(layout.newest_checkpoint(), Some(root.join("step-1000000")));
    }

    #[test]
    fn cluster_sizes_are_listed_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        std::fs::create_dir_all(layout.dedup()).unwrap();
        std::fs::write(
            layout.dedup().join("near-dedup-report.json"),
            r#"{"documents":100,"documents_in_clusters":40,"clusters":9,"removed":{"documents":31,"bytes":1000},
               "cluster_sizes":{"17-64":1,"2":4,"3-4":2,"5-8":1,"65+":1}}"#,
        )
        .unwrap();
        let md = std::fs::read_to_string(write(&layout).unwrap().markdown).unwrap();
        let order: Vec<usize> = [
            "\n| 2 |",
            "\n| 3-4 |",
            "\n| 5-8 |",
            "\n| 17-64 |",
            "\n| 65+ |",
        ]
        .iter()
        .map(|row| md.find(row).unwrap_or_else(|| panic!("{row} in {md}")))
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{md}");
    }

    #[test]
    fn metrics_become_tables_and_plots() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        std::fs::create_dir_all(layout.train()).unwrap();
        let mut lines = vec![r#"{"step":0,"val_bpb":3.0}"#.to_string()];
        for step in 1..=40 {
            let loss = 9.0 - step as f64 * 0.1;
            lines.push(format!(
                r#"{{"step":{step},"loss":{loss},"loss_ema":{loss},"lr_scale":1.0,"tok_s":1000.0,"mfu":0.0,"tokens":{}}}"#,
                step * 512
            ));
        }
        lines.push(r#"{"step":40,"val_bpb":2.5}"#.into());
        lines.push(r#"{"step":41,"loss":"#.into()); // cut by a kill
        std::fs::write(layout.train().join("metrics.jsonl"), lines.join("\n")).unwrap();
        std::fs::create_dir_all(layout.root.join("eval")).unwrap();
        std::fs::write(
            layout.eval("compile"),
            r#"{"programs":8,"compile_rate":0.25,"warning_free_rate":0.125,"checks_per_second":3.0,"failures":{"undeclared":4,"syntax":2}}"#,
        )
        .unwrap();
        let written = write(&layout).unwrap();
        let md = std::fs::read_to_string(&written.markdown).unwrap();
        assert!(
            md.contains("| final validation bits per byte | 2.5000 |"),
            "{md}"
        );
        assert!(md.contains("| tokens | 20480 |"), "{md}");
        assert!(md.contains("| undeclared | 4 |"));
        {
            let names: Vec<String> = written
                .plots
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect();
            assert_eq!(
                names,
                [
                    "loss.png",
                    "bpb.png",
                    "lr.png",
                    "tok_s.png",
                    "compile_failures.png"
                ]
            );
            for p in &written.plots {
                let bytes = std::fs::read(p).unwrap();
                assert_eq!(&bytes[1..4], b"PNG", "{}", p.display());
            }
            assert!(md.contains("![training loss](plots/loss.png)"));
        }
    }

    #[test]
    fn trend_is_the_least_squares_slope_and_its_standard_error() {
        let (slope, error) = trend(&[1.0, 3.0, 2.0, 4.0]).unwrap();
        assert!((slope - 0.8).abs() < 1e-12, "{slope}");
        assert!((error - 0.18f64.sqrt()).abs() < 1e-12, "{error}");
        assert_eq!(trend(&[1.0, 2.0]), None);
    }

    #[test]
    fn the_last_rollout_batch_is_read_from_the_end_of_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rollouts.jsonl");
        let lines: Vec<String> = (0..40)
            .map(|i| json!({"batch": i / 10, "completion": "x".repeat(30)}).to_string())
            .collect();
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let whole = std::fs::metadata(&path).unwrap().len();
        // 58 bytes a line: the last 5 lines whole, then 5 and part of one.
        for (tail, seen) in [(whole, 10), (whole / 8, 5), (whole / 8 + 20, 5), (0, 0)] {
            let last = last_rollout_batch(&path, tail);
            assert_eq!(last.len(), seen, "last {tail} bytes");
            assert!(last.iter().all(|r| r["batch"] == 3), "{last:?}");
        }
    }

    #[test]
    fn rl_batches_and_each_models_bug_fixes_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        std::fs::create_dir_all(layout.rl()).unwrap();
        let mut lines = Vec::new();
        for step in 1..=9u32 {
            let reward = f64::from(step) * 0.25 - 1.0;
            lines.push(format!(
                r#"{{"step":{step},"loss":0.1,"rollouts":256,"rollouts_s":16.0,"step_seconds":16.0,"generation_seconds":10.0,"prefill_seconds":1.0,"decode_seconds":8.0,"sampled_logprob_seconds":1.0,"decode_steps":256,"reward_wait_seconds":2.0,"reward_wait_share":0.125,"reward_mean":{reward},"compile_rate":0.5,"test_pass_rate":0.25,"truncated_share":0.1,"zero_std_groups":0.2,"kl":0.001}}"#
            ));
            lines.push(format!(r#"{{"step":{step},"lr_scale":1.0}}"#));
        }
        std::fs::write(layout.rl().join("metrics.jsonl"), lines.join("\n")).unwrap();
        // Two batches of completions; the last line cut by a kill within a character.
        let mut rollouts = String::new();
        for (batch, reward, text) in [
            (0, 9.0, "int old_best() {}"),
            (1, 6.5, "int add(int a, int b) { return a + b; }"),
            (1, -1.0, "int add(int a, int b) { return a -"),
            (1, 1.5, "int add(int a, int b) { return b; }"),
        ] {
            let compiled = reward > 0.0;
            let judged = json!({"compiled": compiled, "warnings": 0, "passed": reward > 6.0,
                "failure": if compiled { Value::Null } else { json!("compile") }, "detector": null});
            rollouts += &json!({"batch": batch, "task": "fixture-add", "group": 0, "tokens": 12,
                "truncated": false, "reward": reward, "advantage": 0.5,
                "verdict": {"reward": reward, "judged": judged, "reasoning": false, "cached": false},
                "completion": text})
            .to_string();
            rollouts.push('\n');
        }
        let mut log = rollouts.into_bytes();
        log.extend_from_slice(b"{\"batch\": 1, \"completion\": \"\xc3");
        std::fs::write(layout.rl().join("rollouts.jsonl"), log).unwrap();
        std::fs::create_dir_all(layout.root.join("eval")).unwrap();
        // The pretrained model's report predates standard errors.
        for (file, pass, compiled, error) in [
            ("bugfix", 0.0, 3, ""),
            ("bugfix-rl", 0.05, 40, r#","pass@1_standard_error":0.021"#),
        ] {
            std::fs::write(
                layout.eval(file),
                format!(
                    r#"{{"tasks":100,"answers":100,"compiled":{compiled},"pass@1":{pass}{error}}}"#
                ),
            )
            .unwrap();
        }
        let written = write(&layout).unwrap();
        let md = std::fs::read_to_string(&written.markdown).unwrap();
        // Thirds of the nine batches: -0.75, -0.5, -0.25 then 0.75, 1.0, 1.25.
        assert!(
            md.contains(
                "| mean reward, first third -> last third of the batches | -0.500 -> +1.000 |"
            ),
            "{md}"
        );
        assert!(
            md.contains("with its standard error | +0.2500 ± 0.0000 |"),
            "{md}"
        );
        assert!(md.contains("| rollout batches | 9 |"), "{md}");
        assert!(md.contains("16.0 s = 10.0 s + 2.0 s + 4.0 s"), "{md}");
        assert!(
            md.contains("| 1.00 s + 8.00 s (31.2 ms) + 1.00 s |"),
            "{md}"
        );
        assert!(md.contains("| 12.5% |"), "{md}");
        assert!(
            md.contains("| pretrained | 0.000 | 3 of 100 | 100 |"),
            "{md}"
        );
        assert!(
            md.contains("| reinforced (RL) | 0.050 ± 0.021 | 40 of 100 | 100 |"),
            "{md}"
        );
        assert!(!md.contains("fine-tuned (SFT) |"), "{md}");
        assert!(
            md.contains(
                "| bug-fix pass@1 (held-out projects) | 0.000 pretrained, 0.050 reinforced (RL) |"
            ),
            "{md}"
        );
        assert!(
            md.contains("![RL mean reward](plots/rl-reward.png)"),
            "{md}"
        );
        assert!(
            md.contains("The last rollout batch (1, 3 completions)"),
            "{md}"
        );
        assert!(
            md.contains("**highest**: reward +6.50, task `fixture-add`, compiled yes, warnings 0, test passed yes, 12 tokens:"),
            "{md}"
        );
        assert!(
            md.contains("**lowest**: reward -1.00, task `fixture-add`, compiled no, warnings 0, test passed no, failure `compile`, 12 tokens:"),
            "{md}"
        );
        assert!(md.contains("{ return a + b; }"), "{md}");
        assert!(!md.contains("old_best"), "{md}");
    }

    #[test]
    fn the_tokenizer_is_judged_by_the_models_compile_rate_and_length_limit() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        std::fs::create_dir_all(layout.root.join("eval")).unwrap();
        let files = [
            (
                "tokenizer",
                r#"{"projects":[{"project":"overall","files":3,"raw_bytes":4000,"normalized_bytes":3600,"tokens":{"ours":{"raw_tokens":1000,"normalized_tokens":1000}},"cl100k_raw_over_ours_raw":1.0,"cl100k_raw_over_ours_normalized":1.1}],"encode_mb_per_s":20.0}"#,
            ),
            (
                "compile",
                r#"{"programs":8,"compile_rate":0.25,"compile_rate_standard_error":0.1637,"warning_free_rate":0.125,"checks_per_second":3.0,"failures":{},"length_limited":2,"length_limited_share":0.25}"#,
            ),
            (
                "mbpp",
                r#"{"problems":2,"samples":4,"compiled":2,"passed":1,"unbuildable":["b"],"buildable_samples":2,"buildable_compiled":2,"pass_at_k":{"pass@1":0.25},"verdicts":[]}"#,
            ),
        ];
        for (name, json) in files {
            std::fs::write(layout.eval(name), json).unwrap();
        }
        let md = std::fs::read_to_string(write(&layout).unwrap().markdown).unwrap();
        assert!(md.contains("| ours | 4.00 | 3.60 |"), "{md}");
        assert!(
            md.contains("cl100k needs 1.000x our tokens on raw text, 1.100x on pipeline text")
                && md.contains("| tokens vs cl100k (pipeline text) | cl100k needs 1.100x ours |"),
            "{md}"
        );
        assert!(
            md.contains("| held-out function bodies | 25.0% ± 16.4 of 8 | 25.0% (2) |"),
            "{md}"
        );
        assert!(
            md.contains("1 of the problems cannot compile with any body (their prompt or tests are broken); 100.0% of the other problems' 2 samples compiled."),
            "{md}"
        );
        // Completions judged elsewhere, with no record of their length: shown as unknown.
        assert!(
            md.contains("| MBPP-C++ completions | 50.0% of 4 | - |"),
            "{md}"
        );
        // Every problem broken: no rate over the others to give.
        std::fs::write(
            layout.eval("mbpp"),
            r#"{"problems":1,"samples":2,"compiled":0,"passed":0,"unbuildable":["b"],"buildable_samples":0,"buildable_compiled":0,"pass_at_k":{"pass@1":0.0},"verdicts":[]}"#,
        )
        .unwrap();
        let md = std::fs::read_to_string(write(&layout).unwrap().markdown).unwrap();
        assert!(
            md.contains("1 of the problems cannot compile with any body (their prompt or tests are broken); there are no others."),
            "{md}"
        );
        assert!(!md.contains("NaN"), "{md}");

        // Text that the pipeline made (a speedrun's shards) normalizes to itself: no raw
        // column, which would repeat the pipeline's.
        std::fs::write(
            layout.eval("tokenizer"),
            r#"{"projects":[{"project":"overall","files":3,"raw_bytes":3600,"normalized_bytes":3600,"tokens":{"ours":{"raw_tokens":1000,"normalized_tokens":1000}},"cl100k_raw_over_ours_raw":1.1,"cl100k_raw_over_ours_normalized":1.1}],"encode_mb_per_s":20.0}"#,
        )
        .unwrap();
        let md = std::fs::read_to_string(write(&layout).unwrap().markdown).unwrap();
        assert!(
            md.contains("| encoding | bytes/token (pipeline) |")
                && md.contains("| ours | 3.60 |")
                && md.contains("its raw form is not kept")
                && md.contains("cl100k needs 1.100x our tokens. "),
            "{md}"
        );
        assert!(!md.contains("raw text"), "{md}");
    }
}
