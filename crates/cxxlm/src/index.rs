//! `cxxlm index`: build, query and watch a C++ repository's index; its commands that run
//! a model (embeddings) are `cxxlm-torch`'s.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use cxxlm_index::retrieval::{recall_at, Recall};
use cxxlm_index::watch::{default_dir, open_or_build, watch, Refresh};
use cxxlm_index::{
    mine, Bm25, Change, Chunk, Cursor, Graph, Index, MineSettings, Mined, Pair, RankedDef,
    RankedFile, Settings, Store,
};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Subcommand)]
pub enum IndexCommand {
    /// Index a repository: definitions, references and includes of its C/C++ files.
    Build(BuildArgs),
    /// The definitions and files that matter at a cursor, and their text.
    Query(QueryArgs),
    /// Keep a repository's index fresh: every saved file is read again.
    Watch(WatchArgs),
    /// Retrieval pairs mined from the repository (a doc comment, a call site or a header
    /// declaration, with the function definition it names) and recall at k of BM25 over
    /// every function definition, on the held-out pairs.
    Recall(RecallArgs),
    /// Embedding vectors of every function and file of the repository, by a checkpoint's
    /// model (its final hidden states, averaged), stored beside the index with the
    /// model's fingerprint; only files changed since their vectors were made are
    /// embedded again. The index is brought up to date first.
    Embed(EmbedArgs),
}

impl IndexCommand {
    /// Whether the command runs a model, and so is `cxxlm-torch`'s.
    pub fn needs_model(&self) -> bool {
        match self {
            IndexCommand::Embed(_) => true,
            IndexCommand::Query(a) => a.semantic.is_some(),
            IndexCommand::Recall(a) => a.checkpoint.is_some(),
            IndexCommand::Watch(a) => a.checkpoint.is_some(),
            IndexCommand::Build(_) => false,
        }
    }
}

#[derive(Args)]
pub struct Limits {
    /// Larger files are skipped (counted as `too_large`), in KiB.
    #[arg(long, default_value_t = 1024)]
    pub max_file_kib: u64,
    /// Threads parsing (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl Limits {
    pub fn settings(&self) -> Settings {
        Settings {
            max_bytes: self.max_file_kib << 10,
            ..Settings::default()
        }
    }
}

#[derive(Args)]
pub struct BuildArgs {
    repo: PathBuf,
    /// Where the index is written (default: REPO/.cxxlm-index).
    #[arg(long, short)]
    out: Option<PathBuf>,
    #[command(flatten)]
    limits: Limits,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct QueryArgs {
    /// The index folder (`cxxlm index build`'s output), or a repository holding one.
    pub index: PathBuf,
    /// The file edited, as a path in the repository (or a path to it).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// The cursor's line (1-based).
    #[arg(long)]
    pub line: Option<u32>,
    /// A name to look for. Repeatable.
    #[arg(long = "symbol")]
    pub symbols: Vec<String>,
    /// Text to search for by meaning instead: the functions and files whose stored
    /// vectors (`cxxlm index embed`) are nearest the text's, by cosine similarity.
    #[arg(long, conflicts_with_all = ["file", "line", "symbols"])]
    pub semantic: Option<String>,
    /// The model that embeds the --semantic text (default: the one that made the stored
    /// vectors; another model's vectors are refused).
    #[arg(long, requires = "semantic")]
    pub checkpoint: Option<PathBuf>,
    #[arg(long, requires = "semantic")]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Lines shown of each definition.
    #[arg(long, default_value_t = 40)]
    pub chunk_lines: u32,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct WatchArgs {
    pub repo: PathBuf,
    /// Where the index is kept (default: REPO/.cxxlm-index); built first if missing.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub limits: Limits,
    /// Keep the embedding vectors (`cxxlm index embed`) fresh too, with this model: they
    /// are brought up to date first, then every saved file's are made again.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    #[arg(long, requires = "checkpoint")]
    pub tokenizer: Option<PathBuf>,
}

impl WatchArgs {
    /// The index's folder.
    pub fn dir(&self) -> PathBuf {
        self.out.clone().unwrap_or_else(|| default_dir(&self.repo))
    }
}

#[derive(Args)]
pub struct MiningArgs {
    /// Percent of files held out (by content hash): pairs touching them are judged,
    /// the others may train.
    #[arg(long, default_value_t = 20)]
    pub held_out_percent: u64,
    /// Lines of a definition that make its candidate text.
    #[arg(long, default_value_t = 40)]
    pub definition_lines: u32,
}

impl MiningArgs {
    pub fn settings(&self) -> MineSettings {
        MineSettings {
            held_out_percent: self.held_out_percent,
            definition_lines: self.definition_lines.max(1),
            ..MineSettings::default()
        }
    }
}

#[derive(Args)]
pub struct RecallArgs {
    /// The index folder (`cxxlm index build`'s output), or a repository holding one.
    pub index: PathBuf,
    #[command(flatten)]
    pub mining: MiningArgs,
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// Also write every pair as JSON lines (kind, held_out, file, line, query, and the
    /// target's file, line and name).
    #[arg(long)]
    pub pairs_out: Option<PathBuf>,
    /// Also judge this checkpoint's embeddings (cosine similarity of a query's vector to
    /// each candidate's) on the same pairs.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    #[arg(long, requires = "checkpoint")]
    pub tokenizer: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct EmbedArgs {
    pub repo: PathBuf,
    /// A checkpoint directory, or a run directory (its newest checkpoint).
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Where the index is kept (default: REPO/.cxxlm-index); built first if missing.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub limits: Limits,
    #[arg(long)]
    pub json: bool,
}

pub fn run(cmd: IndexCommand) -> Result<()> {
    match cmd {
        IndexCommand::Build(a) => build(a),
        IndexCommand::Query(a) => query(a),
        IndexCommand::Watch(a) if a.checkpoint.is_none() => watch_repo(a, |_, _| Ok(None)),
        IndexCommand::Recall(a) if a.checkpoint.is_none() => recall(&a, &[]),
        IndexCommand::Recall(_) | IndexCommand::Embed(_) | IndexCommand::Watch(_) => {
            anyhow::bail!("this command runs a model: it is cxxlm-torch's")
        }
    }
}

pub fn threads(limits: &Limits) -> Result<()> {
    if let Some(n) = limits.threads {
        // Only the first call sets the pool; a second (in tests) keeps the first.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build_global();
    }
    Ok(())
}

pub fn progress(label: &'static str) -> impl FnMut(usize, usize) {
    let bar = indicatif::ProgressBar::new(0).with_message(label);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} files, {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    move |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        if done == total {
            bar.finish_and_clear();
        }
    }
}

fn summary(index: &Index, dir: &Path, seconds: f64) -> serde_json::Value {
    json!({
        "index": dir.display().to_string(),
        "files": index.files().len(),
        "definitions": index.definitions(),
        "names": index.names().len(),
        "skipped": index.skip_counts(),
        "include_dirs": index.include_dirs().len(),
        "seconds": seconds,
    })
}

fn build(a: BuildArgs) -> Result<()> {
    threads(&a.limits)?;
    let dir = a.out.clone().unwrap_or_else(|| default_dir(&a.repo));
    let started = Instant::now();
    let index = Index::build(
        &a.repo,
        Some(&dir),
        &a.limits.settings(),
        None,
        progress("indexing"),
    )?;
    Store::save(&dir, &index)?;
    if let Some(e) = index.include_dirs_error() {
        eprintln!("warning: include directories unused: {e}");
    }
    let s = summary(&index, &dir, started.elapsed().as_secs_f64());
    if a.json {
        outln!("{s}")?;
    } else {
        outln!(
            "indexed {} files ({} definitions, {} names) in {:.1} s into {}; skipped: {}",
            s["files"],
            s["definitions"],
            s["names"],
            s["seconds"].as_f64().unwrap_or(0.0),
            dir.display(),
            skipped_line(&index)
        )?;
    }
    Ok(())
}

fn skipped_line(index: &Index) -> String {
    let counts = index.skip_counts();
    match counts.is_empty() {
        true => "none".into(),
        false => counts
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// The index folder a query names: the folder itself, or a repository holding one.
pub fn index_dir(path: &Path) -> PathBuf {
    match path.join("snapshot.bin").exists() {
        true => path.to_path_buf(),
        false => default_dir(path),
    }
}

fn query(a: QueryArgs) -> Result<()> {
    if a.semantic.is_some() {
        anyhow::bail!("--semantic runs a model: it is cxxlm-torch's");
    }
    let started = Instant::now();
    let dir = index_dir(&a.index);
    let (index, _) = Store::load(&dir)?;
    let loaded = started.elapsed();
    let file = match &a.file {
        None => None,
        Some(f) => Some(repository_path(&index, f)?),
    };
    let graph = Graph::new(&index);
    let built = started.elapsed();
    let cursor = Cursor {
        file: file.clone(),
        text: None,
        line: a.line,
        symbols: a.symbols.clone(),
    };
    let ranking = graph.rank(&cursor, a.top);
    let ranked = started.elapsed();
    let chunks = cxxlm_index::chunks(
        index.root(),
        &ranking.definitions,
        a.chunk_lines,
        usize::MAX,
        |d, _| {
            // The definition the cursor is in is already in front of the editor.
            Some(d.file.as_str()) == file.as_deref()
                && a.line.is_some_and(|l| d.line <= l && l <= d.end_line)
        },
    );
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let timing = json!({
        "load_ms": ms(loaded),
        "graph_ms": ms(built - loaded),
        "rank_ms": ms(ranked - built),
        "total_ms": ms(started.elapsed()),
        "edges_visited": ranking.work,
    });
    print_ranking(
        &ranking.definitions,
        &ranking.files,
        &chunks,
        a.json,
        &timing,
    )?;
    eprintln!(
        "query: {:.1} ms (load {:.1}, graph {:.1}, rank {:.1})",
        timing["total_ms"].as_f64().unwrap_or(0.0),
        timing["load_ms"].as_f64().unwrap_or(0.0),
        timing["graph_ms"].as_f64().unwrap_or(0.0),
        timing["rank_ms"].as_f64().unwrap_or(0.0),
    );
    Ok(())
}

/// A query's answer: definitions and files best first, and the definitions' text;
/// as JSON (with `timing`) or as text.
pub fn print_ranking(
    definitions: &[RankedDef],
    files: &[RankedFile],
    chunks: &[Chunk],
    json: bool,
    timing: &serde_json::Value,
) -> Result<()> {
    if json {
        outln!(
            "{}",
            json!({
                "definitions": definitions,
                "files": files,
                "chunks": chunks,
                "timing": timing,
            })
        )?;
        return Ok(());
    }
    outln!("definitions:")?;
    for d in definitions {
        outln!(
            "  {:.5}  {}:{}-{}  {} {}",
            d.score,
            d.file,
            d.line,
            d.end_line,
            d.kind.name(),
            d.name
        )?;
    }
    outln!("files:")?;
    for f in files {
        outln!("  {:.5}  {}", f.score, f.file)?;
    }
    for c in chunks {
        outln!(
            "\n// {}:{}-{}\n{}",
            c.file,
            c.line,
            c.end_line,
            c.text.trim_end()
        )?;
    }
    Ok(())
}

/// A path given on the command line as the index names it (relative to the root).
fn repository_path(index: &Index, file: &Path) -> Result<String> {
    let text = file.to_string_lossy();
    if index.files().contains_key(text.as_ref()) {
        return Ok(text.into_owned());
    }
    let absolute = std::fs::canonicalize(file).with_context(|| {
        format!(
            "{} is neither a file of the index nor a path to one",
            file.display()
        )
    })?;
    let rel = absolute.strip_prefix(index.root()).with_context(|| {
        format!(
            "{} is outside the indexed repository {}",
            file.display(),
            index.root().display()
        )
    })?;
    Ok(rel.to_string_lossy().replace('\\', "/"))
}

/// Watches `a.repo`, printing each refresh. `follow` keeps something else in step with
/// the index: called once it is open and up to date (no refresh), then after each
/// refresh; what it returns is printed after the refresh's line. Its error stops the
/// watch when opening, and is printed (the watch goes on) after a refresh.
pub fn watch_repo(
    a: WatchArgs,
    mut follow: impl FnMut(&Index, Option<&Refresh>) -> Result<Option<String>>,
) -> Result<()> {
    threads(&a.limits)?;
    crate::interrupt::install();
    let dir = a.dir();
    let settings = a.limits.settings();
    let started = Instant::now();
    let (mut index, mut store) = open_current(&a.repo, &dir, &settings)?;
    if let Some(said) = follow(&index, None)? {
        eprintln!("{said}");
    }
    let (root, files, definitions) = (
        index.root().display().to_string(),
        index.files().len(),
        index.definitions(),
    );
    let skipped = skipped_line(&index);
    let ready = || {
        eprintln!(
            "watching {root} ({files} files, {definitions} definitions; ready in {:.1} s; skipped: {skipped}), index in {}",
            started.elapsed().as_secs_f64(),
            dir.display()
        )
    };
    watch(
        &mut index,
        &mut store,
        &settings,
        &crate::interrupt::STOP,
        ready,
        |index, r| {
            let what: Vec<String> = r
                .changes
                .iter()
                .map(|(path, change)| match change {
                    Change::Parsed { defs, refs } => {
                        format!("{path} ({defs} definitions, {refs} names)")
                    }
                    Change::Removed => format!("{path} (removed)"),
                    Change::Skipped(why) => format!("{path} (skipped: {})", why.name()),
                    Change::Unchanged | Change::Ignored => path.clone(),
                })
                .collect();
            let what = match r.rescan {
                true => "the whole repository (events were lost)".to_string(),
                false => what.join(", "),
            };
            let _ = outln!(
                "refreshed {what} in {:.2} ms{}",
                r.elapsed.as_secs_f64() * 1e3,
                if r.compacted {
                    "; new snapshot written"
                } else {
                    ""
                }
            );
            match follow(index, Some(r)) {
                Ok(Some(said)) => {
                    let _ = outln!("{said}");
                }
                Ok(None) => {}
                Err(e) => eprintln!("error: {e:#}"),
            }
        },
    )?;
    Ok(())
}

/// The index of `repo` stored in `dir`, built there if missing, and brought up to date
/// with what changed since it was stored.
pub fn open_current(repo: &Path, dir: &Path, settings: &Settings) -> Result<(Index, Store)> {
    let (index, store, built) = open_or_build(repo, dir, settings, progress("indexing"))?;
    if built {
        return Ok((index, store));
    }
    let index = Index::build(
        repo,
        Some(dir),
        settings,
        Some(&index),
        progress("rescanning"),
    )?;
    let store = Store::save(dir, &index)?;
    Ok((index, store))
}

/// Ranks the candidates of some held-out pairs: the first k of each, best first.
pub type Ranker<'a> = &'a dyn Fn(&Mined, &[&Pair], usize) -> Result<Vec<Vec<usize>>>;

/// Mines the pairs of an index's repository, writes them when asked, and prints recall
/// at k on the held-out pairs of BM25 and of each named ranker of `others`.
pub fn recall(a: &RecallArgs, others: &[(&str, Ranker)]) -> Result<()> {
    let (index, _) = Store::load(&index_dir(&a.index))?;
    let started = Instant::now();
    let mined = mine(&index, &a.mining.settings());
    let mined_s = started.elapsed().as_secs_f64();
    if let Some(path) = &a.pairs_out {
        let mut text = String::new();
        for p in &mined.pairs {
            let t = &mined.candidates[p.target];
            text += &json!({"kind": p.kind, "held_out": p.held_out, "file": p.file, "line": p.line,
                "query": p.query, "target_file": t.file, "target_line": t.line, "target_name": t.name,
                "target_text": t.text})
            .to_string();
            text.push('\n');
        }
        cxxlm_data::shard::write_atomic(path, text.as_bytes())?;
    }
    let held_out: Vec<&Pair> = mined.held_out().collect();
    let mut results: Vec<(String, Recall, f64)> = Vec::new();
    let started = Instant::now();
    let bm25 = Bm25::new(mined.candidates.iter().map(|c| c.text.as_str()));
    let queries: Vec<&str> = held_out.iter().map(|p| p.query.as_str()).collect();
    let r = recall_at(&held_out, a.k, &bm25.rank(&queries, a.k));
    results.push(("bm25".into(), r, started.elapsed().as_secs_f64()));
    for (name, ranker) in others {
        let started = Instant::now();
        let r = recall_at(&held_out, a.k, &ranker(&mined, &held_out, a.k)?);
        results.push((name.to_string(), r, started.elapsed().as_secs_f64()));
    }
    let summary = json!({
        "candidates": mined.candidates.len(),
        "training_pairs": mined.training().count(),
        "held_out_pairs": mined.held_out().count(),
        "dropped": mined.dropped,
        "mine_seconds": mined_s,
        "recall": results.iter().map(|(n, r, s)| (n.clone(), json!({"k": r.k, "rate": r.rate(),
            "found": r.found, "pairs": r.pairs, "by_kind": r.by_kind, "seconds": s})))
            .collect::<serde_json::Map<_, _>>(),
    });
    if a.json {
        outln!("{summary}")?;
        return Ok(());
    }
    outln!(
        "{} candidate definitions; {} training pairs, {} held out (mined in {:.1} s); dropped: {}",
        mined.candidates.len(),
        summary["training_pairs"],
        summary["held_out_pairs"],
        mined_s,
        serde_json::to_string(&mined.dropped)?
    )?;
    for (name, r, s) in &results {
        let kinds: Vec<String> = r
            .by_kind
            .iter()
            .map(|(k, (f, n))| format!("{k} {f}/{n}"))
            .collect();
        outln!(
            "{name}: recall@{} {:.3} ({}/{}; {}) in {:.1} s",
            r.k,
            r.rate(),
            r.found,
            r.pairs,
            kinds.join(", "),
            s
        )?;
    }
    Ok(())
}
