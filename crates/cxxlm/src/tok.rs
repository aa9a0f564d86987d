use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use cxxlm_data::config::{InputConfig, NormalizeConfig};
use cxxlm_data::read::{self, ReadItem, UnitReader};
use cxxlm_data::steps::Normalize;
use cxxlm_tokenizer::{to_hf_json, PieceCache, Trainer, DEFAULT_VOCAB};
use rayon::prelude::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Subcommand)]
pub enum TokCommand {
    /// Train the C++ byte-level BPE on shards (or any input `data run` reads).
    Train(TrainArgs),
    /// Bytes per token of ours and tiktoken's encodings, raw and normalized, per project.
    Eval(EvalArgs),
    /// Print the token ids of a file (special tokens are never produced from text).
    Encode {
        #[arg(long)]
        tokenizer: PathBuf,
        file: PathBuf,
    },
}

#[derive(Args)]
pub struct TrainArgs {
    /// Shards of `cxxlm data run` (normalized text), or any input it reads. Repeatable.
    #[arg(long = "input", short, required = true)]
    inputs: Vec<String>,
    #[arg(long, default_value_t = DEFAULT_VOCAB)]
    vocab: usize,
    /// Use at most this many bytes of text.
    #[arg(long)]
    max_bytes: Option<u64>,
    /// Also learn superword (second-stage) merges, from the lines of this many MiB of
    /// text (512 was the former default). They compress better but cost the model half
    /// its compile rate (BENCHMARKS.md); 0 gives the whole vocabulary to the first stage.
    #[arg(long, default_value_t = 0)]
    second_stage_mib: usize,
    /// Never learn a token longer than this many bytes, in either stage (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_token_bytes: usize,
    /// Keep superwords within a line: no second-stage merge takes in a line break.
    #[arg(long)]
    superwords_within_lines: bool,
    /// First-stage pieces keep a line's indentation apart from the punctuation and line
    /// break before it (`;\n`, then `    `, as GPT-4's pattern splits), where by default
    /// `;\n    ` is one piece: 7% more tokens, and a model of raw text that scores worse
    /// (BENCHMARKS.md).
    #[arg(long)]
    indentation_apart: bool,
    #[arg(long, short)]
    out: PathBuf,
}

#[derive(Args)]
pub struct EvalArgs {
    #[arg(long)]
    tokenizer: PathBuf,
    /// Files, directories, archives or shards; each input (or archive) is a project.
    #[arg(required = true)]
    inputs: Vec<String>,
    /// Also write the table as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Skip the tiktoken encodings (only ours and the round-trip check).
    #[arg(long)]
    no_baselines: bool,
    /// Read at most this many bytes of text.
    #[arg(long)]
    max_bytes: Option<u64>,
}

pub fn run(cmd: TokCommand) -> Result<()> {
    match cmd {
        TokCommand::Train(a) => train(a),
        TokCommand::Eval(a) => eval(a),
        TokCommand::Encode { tokenizer, file } => {
            let bpe = cxxlm_tokenizer::load(&tokenizer)?;
            // A FIFO or device would block or never end.
            if !std::fs::metadata(&file).is_ok_and(|m| m.is_file()) {
                bail!("{}: not a regular file", file.display());
            }
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let ids: Vec<String> = bpe.encode(&text).iter().map(u32::to_string).collect();
            outln!("{}", ids.join(" "))?;
            Ok(())
        }
    }
}

/// Every document of the inputs as (project, text), in input order; inputs that are not
/// text are counted and the first of them named, not returned. No text at all is an error.
fn read_texts(
    inputs: &[String],
    max_bytes: Option<u64>,
    mut sink: impl FnMut(String, String) -> bool,
) -> Result<u64> {
    let config = InputConfig {
        paths: read::shard_inputs(inputs),
        ..Default::default()
    };
    let plan = read::plan(&config, None, &crate::interrupt::STOP)?;
    let mut reader = UnitReader::new(config.clone(), None);
    let mut total = 0u64;
    let mut skipped: Vec<String> = Vec::new();
    for unit in &plan.units {
        let mut go = true;
        reader.read(
            unit,
            &mut |item| {
                match item {
                    ReadItem::Doc(doc) => {
                        let project = project_of(&doc.meta, inputs);
                        match String::from_utf8(doc.bytes) {
                            Ok(text) => {
                                total += text.len() as u64;
                                go = sink(project, text) && max_bytes.is_none_or(|m| total < m);
                            }
                            Err(_) => skipped.push(format!("{}: not UTF-8", doc.id)),
                        }
                    }
                    ReadItem::Skip { skipped: s, .. } => {
                        skipped.push(format!("{}: {} ({})", s.input, s.reason, s.detail))
                    }
                    ReadItem::Ignored => {}
                }
                go
            },
            &crate::interrupt::STOP,
        )?;
        if !go {
            break;
        }
    }
    if !skipped.is_empty() {
        eprintln!(
            "{} inputs skipped, not UTF-8 text or unreadable:",
            skipped.len()
        );
        for s in skipped.iter().take(5) {
            eprintln!("  {s}");
        }
        if skipped.len() > 5 {
            eprintln!("  ... and {} more", skipped.len() - 5);
        }
    }
    if total == 0 {
        bail!("no text in {}", inputs.join(", "));
    }
    Ok(total)
}

fn project_of(meta: &serde_json::Map<String, Value>, inputs: &[String]) -> String {
    if let Some(archive) = meta.get("archive").and_then(Value::as_str) {
        let name = archive.rsplit('/').next().unwrap_or(archive);
        return name.split('_').next().unwrap_or(name).to_string();
    }
    let path = meta.get("path").and_then(Value::as_str).unwrap_or("");
    inputs
        .iter()
        .find(|i| path.starts_with(i.as_str()))
        .cloned()
        .unwrap_or_else(|| "other".into())
}

fn train(args: TrainArgs) -> Result<()> {
    let started = Instant::now();
    let mut trainer = Trainer::new(args.vocab)?
        .with_second_stage_bytes(args.second_stage_mib << 20)
        .with_max_token_bytes(args.max_token_bytes)
        .with_superword_line_breaks(!args.superwords_within_lines)
        .with_indentation_apart(args.indentation_apart);
    let mut batch: Vec<String> = Vec::new();
    let mut batch_bytes = 0usize;
    let total = read_texts(&args.inputs, args.max_bytes, |_, text| {
        batch_bytes += text.len();
        batch.push(text);
        if batch_bytes >= 16 << 20 {
            trainer.feed(&batch);
            batch.clear();
            batch_bytes = 0;
        }
        true
    })?;
    trainer.feed(&batch);
    drop(batch);
    let counted = started.elapsed().as_secs_f64();
    eprintln!(
        "{:.1} MB of text, {} distinct pieces, counted in {counted:.1}s",
        total as f64 / 1e6,
        trainer.distinct_pieces()
    );
    let bpe = trainer.train()?;
    let unused = bpe.special_base() as usize - bpe.tokens().len();
    if unused > 0 {
        eprintln!(
            "warning: the text fills only {} of the {} learned ids (no pair of tokens left that occurs twice); {unused} stay unused: train on more text, or with a smaller --vocab",
            bpe.tokens().len(),
            bpe.special_base()
        );
    }
    let json = serde_json::to_string(&to_hf_json(&bpe))?;
    let tmp = args.out.with_extension("json.tmp");
    std::fs::write(&tmp, json).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &args.out).with_context(|| format!("writing {}", args.out.display()))?;
    outln!(
        "{} tokens ({} merges) + {} special ids in {:.1}s: {}",
        bpe.tokens().len(),
        bpe.merges().len(),
        bpe.vocab_size() - bpe.tokens().len(),
        started.elapsed().as_secs_f64(),
        args.out.display()
    )?;
    Ok(())
}

const BASELINES: [&str; 4] = ["gpt2", "p50k", "cl100k", "o200k"];

#[derive(Default, Clone)]
struct Tally {
    docs: u64,
    bytes_raw: u64,
    bytes_norm: u64,
    /// ours raw, ours normalized, then each baseline raw and normalized.
    tokens: [u64; 2 + 2 * BASELINES.len()],
    round_trip_failures: u64,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.docs += o.docs;
        self.bytes_raw += o.bytes_raw;
        self.bytes_norm += o.bytes_norm;
        for (a, b) in self.tokens.iter_mut().zip(o.tokens) {
            *a += b;
        }
        self.round_trip_failures += o.round_trip_failures;
    }
}

fn eval(args: EvalArgs) -> Result<()> {
    let bpe = cxxlm_tokenizer::load(&args.tokenizer)?;
    let baselines = [
        tiktoken_rs::r50k_base()?,
        tiktoken_rs::p50k_base()?,
        tiktoken_rs::cl100k_base()?,
        tiktoken_rs::o200k_base()?,
    ];
    let normalize = Normalize::new(NormalizeConfig::default());
    let mut docs: Vec<(String, String)> = Vec::new();
    read_texts(&args.inputs, args.max_bytes, |p, t| {
        docs.push((p, t));
        true
    })?;

    let started = Instant::now();
    let texts: Vec<&str> = docs.iter().map(|(_, t)| t.as_str()).collect();
    let ours_raw = bpe.encode_batch(&texts);
    let encode_seconds = started.elapsed().as_secs_f64();
    let raw_bytes: u64 = docs.iter().map(|(_, t)| t.len() as u64).sum();

    let tallies: Vec<(String, Tally)> = docs
        .par_iter()
        .zip(ours_raw.par_iter())
        .map_init(PieceCache::default, |cache, ((project, raw), ours)| {
            let norm = normalize.normalize(raw);
            let mut t = Tally {
                docs: 1,
                bytes_raw: raw.len() as u64,
                bytes_norm: norm.len() as u64,
                ..Default::default()
            };
            t.tokens[0] = ours.len() as u64;
            t.tokens[1] = bpe.encode_cached(&norm, cache).len() as u64;
            for (i, b) in baselines.iter().enumerate().filter(|_| !args.no_baselines) {
                t.tokens[2 + 2 * i] = b.encode_ordinary(raw).len() as u64;
                t.tokens[3 + 2 * i] = b.encode_ordinary(&norm).len() as u64;
            }
            if bpe.decode(ours) != raw.as_bytes() {
                t.round_trip_failures = 1;
            }
            (project.clone(), t)
        })
        .collect();
    let mut projects: BTreeMap<String, Tally> = BTreeMap::new();
    let mut overall = Tally::default();
    for (p, t) in &tallies {
        projects.entry(p.clone()).or_default().add(t);
        overall.add(t);
    }
    let mut rows: Vec<(String, Tally)> = projects.into_iter().collect();
    rows.push(("overall".into(), overall.clone()));

    let bpt = |bytes: u64, tokens: u64| match tokens {
        0 => "-".to_string(),
        n => format!("{:.2}", bytes as f64 / n as f64),
    };
    outln!("bytes per token (raw text | normalized text); ratio = cl100k tokens on raw / ours")?;
    out!("{:<28}{:>7}{:>10}", "project", "files", "MB")?;
    out!("{:>15}", "ours")?;
    for b in BASELINES {
        out!("{:>15}", b)?;
    }
    outln!("{:>9}{:>11}", "raw x", "pipeline x")?;
    let mut json_rows = Vec::new();
    for (name, t) in &rows {
        out!(
            "{:<28}{:>7}{:>10.1}",
            name,
            t.docs,
            t.bytes_raw as f64 / 1e6
        )?;
        for i in 0..1 + BASELINES.len() {
            out!(
                "{:>7} |{:>6}",
                bpt(t.bytes_raw, t.tokens[2 * i]),
                bpt(t.bytes_norm, t.tokens[2 * i + 1])
            )?;
        }
        let cl100k_raw = t.tokens[2 + 2 * 2] as f64;
        let like_for_like = cl100k_raw / t.tokens[0].max(1) as f64;
        let pipeline = cl100k_raw / t.tokens[1].max(1) as f64;
        outln!("{like_for_like:>9.3}{pipeline:>11.3}")?;
        let mut enc = serde_json::Map::new();
        enc.insert(
            "ours".into(),
            json!({ "raw_tokens": t.tokens[0], "normalized_tokens": t.tokens[1] }),
        );
        for (i, b) in BASELINES.iter().enumerate() {
            enc.insert(b.to_string(), json!({ "raw_tokens": t.tokens[2 + 2 * i], "normalized_tokens": t.tokens[3 + 2 * i] }));
        }
        json_rows.push(json!({
            "project": name, "files": t.docs, "raw_bytes": t.bytes_raw, "normalized_bytes": t.bytes_norm,
            "tokens": enc, "cl100k_raw_over_ours_raw": like_for_like, "cl100k_raw_over_ours_normalized": pipeline,
            "round_trip_failures": t.round_trip_failures,
        }));
    }
    let throughput = raw_bytes as f64 / 1e6 / encode_seconds;
    outln!(
        "encode: {:.1} MB/s on {} threads; round trip: {} of {} files differ",
        throughput,
        rayon::current_num_threads(),
        overall.round_trip_failures,
        overall.docs
    )?;
    if let Some(path) = args.json {
        let out = json!({ "projects": json_rows, "encode_mb_per_s": throughput, "threads": rayon::current_num_threads() });
        std::fs::write(&path, serde_json::to_vec_pretty(&out)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if overall.round_trip_failures > 0 {
        bail!(
            "{} files did not decode to their exact bytes",
            overall.round_trip_failures
        );
    }
    Ok(())
}
