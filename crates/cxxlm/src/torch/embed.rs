//! `cxxlm index` commands that run a model: `embed` (vectors of a repository's functions
//! and files, stored beside its index), `query --semantic` (the stored vectors nearest
//! a text's) and `recall --checkpoint` (the model's embeddings judged beside BM25).

use anyhow::{bail, Context, Result};
use cxxlm::index::{
    index_dir, open_current, print_ranking, progress, recall, threads, EmbedArgs, IndexCommand,
    QueryArgs, Ranker, RecallArgs, WatchArgs,
};
use cxxlm::outln;
use cxxlm_index::parse::Kind;
use cxxlm_index::retrieval::top_k;
use cxxlm_index::vectors::{dot, file_texts, FileVectors, StoredFunction, VECTORS};
use cxxlm_index::watch::default_dir;
use cxxlm_index::{Index, Mined, Pair, RankedDef, RankedFile, Store, Vectors};
use cxxlm_model::Gpt;
use cxxlm_serve::text::{normalize, Layout};
use cxxlm_tokenizer::Bpe;
use rayon::prelude::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use tch::{Device, Kind as DType, Tensor};

use crate::sample::load_checkpoint;

/// Tokens of one embedded window at most (a function's first, a file's each).
const WINDOW: usize = 512;
/// Windows of a file embedded at most (its vector is their mean).
const FILE_WINDOWS: usize = 8;
/// Lines of a function definition embedded at most (after its doc comment).
const FUNCTION_LINES: u32 = 40;
/// Padded tokens of one forward pass at most.
const BATCH_TOKENS: usize = 16_384;
/// Files embedded together (their functions batched across them).
const FILES_PER_ROUND: usize = 64;
/// How often a long run stores what it has, so that a stopped one resumes.
const SAVE_EVERY: Duration = Duration::from_secs(120);

pub fn run(cmd: IndexCommand) -> Result<()> {
    match cmd {
        IndexCommand::Embed(a) => embed(a),
        IndexCommand::Query(a) => semantic_query(a),
        IndexCommand::Recall(a) => embedding_recall(a),
        IndexCommand::Watch(a) => watch(a),
        other => cxxlm::index::run(other),
    }
}

/// A checkpoint's model as an embedder of text: the mean of its final hidden states
/// over a text's tokens (after `<|bos|>`), normalized, in windows of [`WINDOW`].
pub struct Embedder {
    model: Gpt,
    bpe: Bpe,
    layout: Layout,
    window: usize,
    /// The checkpoint as resolved.
    pub name: String,
    /// Its weights, tokenizer and how texts become vectors: equal fingerprints, comparable vectors.
    pub fingerprint: String,
    /// Tokens embedded so far.
    pub tokens: usize,
}

impl Embedder {
    pub fn load(checkpoint: &Path, tokenizer: Option<&Path>) -> Result<Embedder> {
        let (model, bpe) = load_checkpoint(checkpoint, tokenizer)?;
        let dir = cxxlm_train::checkpoint::resolve(checkpoint)?;
        let state = cxxlm_train::checkpoint::read_state(&dir)?;
        let weights = state
            .files
            .get("model.safetensors")
            .with_context(|| format!("{}: no checksum of model.safetensors", dir.display()))?;
        let layout = crate::serve::layout(checkpoint, "auto");
        let window = WINDOW.min(model.config.seq_len);
        let fingerprint = format!(
            "weights sha256 {weights}; tokenizer sha256 {}; indentation {}; mean of final hidden states over windows of {window} tokens, {FILE_WINDOWS} per file; functions' first {FUNCTION_LINES} lines",
            state.tokenizer_sha256,
            if layout.strip_indentation { "stripped" } else { "kept" },
        );
        Ok(Embedder {
            model,
            bpe,
            layout,
            window,
            name: dir.display().to_string(),
            fingerprint,
            tokens: 0,
        })
    }

    pub fn dim(&self) -> usize {
        self.model.config.width
    }

    /// A unit vector for each text, from its first `windows` windows (their mean,
    /// weighted by their tokens).
    pub fn embed(&mut self, texts: &[&str], windows: usize) -> Vec<Vec<f32>> {
        let bos = cxxlm::cli::special(&self.bpe, "<|bos|>") as i64;
        let normalized: Vec<String> = texts.iter().map(|t| normalize(t, self.layout)).collect();
        let refs: Vec<&str> = normalized.iter().map(String::as_str).collect();
        let body = self.window - 1;
        // (text, tokens) of each window, each window after its own <|bos|>.
        let mut segments: Vec<(usize, Vec<i64>)> = Vec::new();
        for (i, ids) in self.bpe.encode_batch(&refs).into_iter().enumerate() {
            let chunks: Vec<&[u32]> = match ids.is_empty() {
                true => vec![&ids[..]],
                false => ids.chunks(body).take(windows.max(1)).collect(),
            };
            for c in chunks {
                let mut row = vec![bos];
                row.extend(c.iter().map(|&t| t as i64));
                segments.push((i, row));
            }
        }
        let mut order: Vec<usize> = (0..segments.len()).collect();
        order.sort_by_key(|&s| std::cmp::Reverse(segments[s].1.len()));
        let dim = self.dim();
        let mut sums = vec![vec![0f32; dim]; texts.len()];
        let _guard = tch::no_grad_guard();
        let mut at = 0;
        while at < order.len() {
            let longest = segments[order[at]].1.len();
            let rows = (BATCH_TOKENS / longest).clamp(1, order.len() - at);
            let batch = &order[at..at + rows];
            let mut ids = vec![0i64; rows * longest];
            let mut mask = vec![0f32; rows * longest];
            for (r, &s) in batch.iter().enumerate() {
                let row = &segments[s].1;
                ids[r * longest..r * longest + row.len()].copy_from_slice(row);
                // <|bos|> is the same at every row's start: it is left out of the mean.
                mask[r * longest + 1..r * longest + row.len()].fill(1.0);
                self.tokens += row.len() - 1;
            }
            let device = self.model.device();
            let shape = [rows as i64, longest as i64];
            let e = self.model.embeddings(
                &Tensor::from_slice(&ids).view(shape).to_device(device),
                &Tensor::from_slice(&mask).view(shape).to_device(device),
            );
            let e: Vec<f32> =
                Vec::try_from(e.to_device(Device::Cpu).to_kind(DType::Float).view([-1]))
                    .expect("fp32 embeddings");
            for (r, &s) in batch.iter().enumerate() {
                let (text, row) = (&segments[s].0, &segments[s].1);
                let weight = (row.len() - 1) as f32;
                for (acc, x) in sums[*text].iter_mut().zip(&e[r * dim..(r + 1) * dim]) {
                    *acc += weight * x;
                }
            }
            at += rows;
        }
        for v in &mut sums {
            let norm = dot(v, v).sqrt().max(1e-12);
            v.iter_mut().for_each(|x| *x /= norm);
        }
        sums
    }
}

/// What an embedding pass made, and what it skipped by reason.
#[derive(Default)]
struct Embedded {
    files: usize,
    functions: usize,
    skipped: BTreeMap<&'static str, usize>,
}

/// The vectors stored in `dir` if `embedder` made them, else new ones; and whether
/// stored vectors of another model (or made another way) were set aside.
fn stored_vectors(dir: &Path, embedder: &Embedder) -> Result<(Vectors, bool)> {
    let fresh = || {
        Vectors::new(
            embedder.fingerprint.clone(),
            embedder.name.clone(),
            embedder.dim(),
        )
    };
    let (mut vectors, remade) = match Vectors::load(dir)? {
        Some(v) if v.fingerprint == embedder.fingerprint => (v, false),
        Some(v) => {
            eprintln!(
                "the vectors in {} were made by another model or another way ({}: {}): all are made again",
                dir.join(VECTORS).display(),
                v.model,
                v.fingerprint
            );
            (fresh(), true)
        }
        None => (fresh(), false),
    };
    vectors.model = embedder.name.clone();
    Ok((vectors, remade))
}

/// Embeds the files `paths` of `index` (their functions batched across them) into
/// `vectors`.
fn embed_files(
    index: &Index,
    vectors: &mut Vectors,
    embedder: &mut Embedder,
    paths: &[String],
    done: &mut Embedded,
) -> Result<()> {
    let texts: Vec<_> = paths
        .par_iter()
        .map(|path| file_texts(index, path, FUNCTION_LINES))
        .collect();
    let mut ok = Vec::new();
    for t in texts {
        match t {
            Ok(t) => ok.push(t),
            Err(why) => *done.skipped.entry(why).or_default() += 1,
        }
    }
    let whole: Vec<&str> = ok.iter().map(|t| t.text.as_str()).collect();
    let mut file_vectors = embedder.embed(&whole, FILE_WINDOWS).into_iter();
    let parts: Vec<&str> = ok
        .iter()
        .flat_map(|t| t.functions.iter().map(|f| f.text.as_str()))
        .collect();
    let mut function_vectors = embedder.embed(&parts, 1).into_iter();
    for t in ok {
        let n = t.functions.len();
        let v = FileVectors {
            hash: t.hash,
            file: file_vectors.next().context("a vector per file")?,
            function_vectors: function_vectors.by_ref().take(n).flatten().collect(),
            functions: t
                .functions
                .into_iter()
                .map(|f| StoredFunction {
                    name: f.name,
                    line: f.line,
                    end_line: f.end_line,
                })
                .collect(),
        };
        vectors.insert(t.path, v).map_err(anyhow::Error::msg)?;
        done.files += 1;
        done.functions += n;
    }
    Ok(())
}

fn embed(a: EmbedArgs) -> Result<()> {
    threads(&a.limits)?;
    cxxlm::interrupt::install();
    let dir = a.out.clone().unwrap_or_else(|| default_dir(&a.repo));
    let started = Instant::now();
    let (index, _) = open_current(&a.repo, &dir, &a.limits.settings())?;
    let mut embedder = Embedder::load(&a.checkpoint, a.tokenizer.as_deref())?;
    let (mut vectors, remade) = stored_vectors(&dir, &embedder)?;
    let plan = vectors.plan(&index);
    for path in &plan.gone {
        vectors.files.remove(path);
    }
    let mut done = Embedded::default();
    let mut bar = progress("embedding");
    let mut saved = Instant::now();
    let embedding = Instant::now();
    for round in plan.embed.chunks(FILES_PER_ROUND) {
        if cxxlm::interrupt::requested() {
            vectors.save(&dir)?;
            bail!(
                "interrupted after {} of {} files; their vectors are stored, and the same command goes on from there",
                done.files,
                plan.embed.len()
            );
        }
        embed_files(&index, &mut vectors, &mut embedder, round, &mut done)?;
        bar(
            done.files + done.skipped.values().sum::<usize>(),
            plan.embed.len(),
        );
        if saved.elapsed() > SAVE_EVERY {
            vectors.save(&dir)?;
            saved = Instant::now();
        }
    }
    let seconds = embedding.elapsed().as_secs_f64();
    vectors.save(&dir)?;
    let Embedded {
        files,
        functions,
        skipped,
    } = done;
    let summary = json!({
        "vectors": dir.join(VECTORS).display().to_string(),
        "model": embedder.name,
        "remade": remade,
        "embedded_files": files,
        "embedded_functions": functions,
        "current_files": plan.current,
        "removed_files": plan.gone.len(),
        "skipped": skipped,
        "files": vectors.files.len(),
        "functions": vectors.functions(),
        "dim": vectors.dim,
        "tokens": embedder.tokens,
        "tokens_per_second": embedder.tokens as f64 / seconds.max(1e-9),
        "seconds": started.elapsed().as_secs_f64(),
    });
    if a.json {
        outln!("{summary}")?;
    } else {
        outln!(
            "embedded {files} files ({functions} functions, {} tokens at {:.0} tokens/s); {} files current, {} removed; skipped: {}; {} files and {} functions in {}",
            embedder.tokens,
            summary["tokens_per_second"].as_f64().unwrap_or(0.0),
            plan.current,
            plan.gone.len(),
            serde_json::to_string(&skipped)?,
            vectors.files.len(),
            vectors.functions(),
            dir.join(VECTORS).display()
        )?;
    }
    Ok(())
}

/// `index watch --checkpoint`: the index and the vectors beside it kept fresh together;
/// after each refresh the files whose content changed are embedded again (and vectors
/// of removed files dropped), and the store written.
fn watch(a: WatchArgs) -> Result<()> {
    let checkpoint = a.checkpoint.clone().context("--checkpoint")?;
    let mut embedder = Embedder::load(&checkpoint, a.tokenizer.as_deref())?;
    let dir = a.dir();
    let (mut vectors, _) = stored_vectors(&dir, &embedder)?;
    cxxlm::index::watch_repo(a, |index, refresh| {
        let started = Instant::now();
        let tokens = embedder.tokens;
        let plan = vectors.plan(index);
        if plan.embed.is_empty() && plan.gone.is_empty() && refresh.is_some() {
            return Ok(None);
        }
        for path in &plan.gone {
            vectors.files.remove(path);
        }
        let mut done = Embedded::default();
        for round in plan.embed.chunks(FILES_PER_ROUND) {
            embed_files(index, &mut vectors, &mut embedder, round, &mut done)?;
        }
        vectors.save(&dir)?;
        Ok(Some(format!(
            "embedded {} files ({} functions, {} tokens) in {:.1} ms; {} removed, {} skipped; {} files and {} functions in {}",
            done.files,
            done.functions,
            embedder.tokens - tokens,
            started.elapsed().as_secs_f64() * 1e3,
            plan.gone.len(),
            done.skipped.values().sum::<usize>(),
            vectors.files.len(),
            vectors.functions(),
            dir.join(VECTORS).display()
        )))
    })
}

fn semantic_query(a: QueryArgs) -> Result<()> {
    let started = Instant::now();
    let text = a.semantic.as_deref().context("--semantic")?;
    let dir = index_dir(&a.index);
    let (index, _) = Store::load(&dir)?;
    let vectors = Vectors::load(&dir)?.with_context(|| {
        format!(
            "{} holds no vectors: make them with `cxxlm index embed {} --checkpoint RUN`",
            dir.display(),
            index.root().display()
        )
    })?;
    let loaded = started.elapsed();
    let checkpoint = a
        .checkpoint
        .clone()
        .unwrap_or_else(|| vectors.model.clone().into());
    let mut embedder = Embedder::load(&checkpoint, a.tokenizer.as_deref())?;
    if embedder.fingerprint != vectors.fingerprint {
        bail!(
            "the vectors in {} were made by {} ({}), not by {} ({}): make them again with `cxxlm index embed {} --checkpoint {}`",
            dir.display(),
            vectors.model,
            vectors.fingerprint,
            embedder.name,
            embedder.fingerprint,
            index.root().display(),
            checkpoint.display()
        );
    }
    let plan = vectors.plan(&index);
    if !plan.embed.is_empty() || !plan.gone.is_empty() {
        eprintln!(
            "warning: {} files changed since their vectors were made ({} gone): `cxxlm index embed` brings them up to date",
            plan.embed.len(),
            plan.gone.len()
        );
    }
    let model_loaded = started.elapsed();
    let query = embedder.embed(&[text], 1).remove(0);
    let embedded = started.elapsed();
    let (functions, files) = vectors.search(&query, a.top);
    let searched = started.elapsed();
    let definitions: Vec<RankedDef> = functions
        .into_iter()
        .map(|h| RankedDef {
            file: h.file,
            name: h.name,
            kind: Kind::Function,
            line: h.line,
            end_line: h.end_line,
            score: h.score as f64,
        })
        .collect();
    let files: Vec<RankedFile> = files
        .into_iter()
        .map(|h| RankedFile {
            file: h.file,
            score: h.score as f64,
        })
        .collect();
    let chunks = cxxlm_index::chunks(
        index.root(),
        &definitions,
        a.chunk_lines,
        usize::MAX,
        |_, _| false,
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let timing = json!({
        "load_ms": ms(loaded),
        "model_ms": ms(model_loaded - loaded),
        "embed_ms": ms(embedded - model_loaded),
        "search_ms": ms(searched - embedded),
        "total_ms": ms(started.elapsed()),
    });
    print_ranking(&definitions, &files, &chunks, a.json, &timing)?;
    eprintln!(
        "query: {:.1} ms (load {:.1}, model {:.1}, embed {:.1}, search {:.1} over {} functions)",
        ms(started.elapsed()),
        ms(loaded),
        ms(model_loaded - loaded),
        ms(embedded - model_loaded),
        ms(searched - embedded),
        vectors.functions()
    );
    Ok(())
}

fn embedding_recall(a: RecallArgs) -> Result<()> {
    let checkpoint = a.checkpoint.clone().context("--checkpoint")?;
    let embedder = std::cell::RefCell::new(Embedder::load(&checkpoint, a.tokenizer.as_deref())?);
    let rank = |mined: &Mined, pairs: &[&Pair], k: usize| -> Result<Vec<Vec<usize>>> {
        let mut e = embedder.borrow_mut();
        let texts: Vec<&str> = mined.candidates.iter().map(|c| c.text.as_str()).collect();
        let candidates = e.embed(&texts, 1);
        let texts: Vec<&str> = pairs.iter().map(|p| p.query.as_str()).collect();
        let queries = e.embed(&texts, 1);
        Ok(queries
            .par_iter()
            .map(|q| {
                let scores: Vec<f32> = candidates.iter().map(|c| dot(q, c)).collect();
                top_k(&scores, k)
            })
            .collect())
    };
    let rankers: [(&str, Ranker); 1] = [("embeddings", &rank)];
    recall(&a, &rankers)
}
