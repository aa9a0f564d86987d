//! Supervised fine-tuning data: JSON lines (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`) of
//! examples in three formats, each record naming its own:
//!
//! - `{"input", "output"}` (the seeds'): one user turn and its answer, in the chat
//!   template ([`cxxlm_tokenizer::chat`]); the answer and its end token are learned;
//! - `{"messages": [{"role", "content"}, ...]}`: a conversation in the chat template; the
//!   assistant turns and their end tokens are learned;
//! - `{"prefix", "suffix", "middle"}`: fill-in-the-middle as pretraining packs it (PSM:
//!   `<|bos|><|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>M<|eos|>`); the middle and
//!   `<|eos|>` are learned.
//!
//! Every text is laid out as the model's training text was (`cxxlm_tokenizer::layout`).
//! Other keys are ignored. A malformed record stops the load naming its file and line, or
//! is skipped and counted by reason. An example longer than a row of the context has its
//! input cut from the start (counted), or stops the load. Examples are split into
//! training and held-out by a hash of their record, and packed whole, best-fit, into rows
//! of `context + 1` tokens, in an order drawn per epoch from a seed ([`PackedRows`]).

use cxxlm_tokenizer::chat::{self, Message, Role};
use cxxlm_tokenizer::layout::{normalize_pieces, Layout as TextLayout};
use cxxlm_tokenizer::Bpe;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::fim::Specials;
use crate::rng::Rng;
use crate::{PackError, Result};

/// Examples longer than a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TooLong {
    /// Cut their input from the start (after the opening specials), counted; an example
    /// whose answer alone does not fit is skipped, counted.
    Truncate,
    /// Stop, naming the example.
    Refuse,
}

/// Malformed records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Invalid {
    /// Stop at the first, naming its file and line.
    Stop,
    /// Skip them, counted by reason (the first few lines of each named).
    Skip,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftDataConfig {
    /// Learn only the answers (outputs, assistant turns, FIM middles) and their end
    /// tokens; false: every token after `<|bos|>`.
    pub mask_input: bool,
    pub too_long: TooLong,
    pub invalid: Invalid,
    /// Share of the records held out for the held-out loss, chosen by a hash of each
    /// record (so a record keeps its side when a file grows), or of its source where it
    /// names one (tasks: the file their bugs were made in, so that no other bug of that
    /// file is trained on); unused when held-out files are given.
    pub val_fraction: f64,
}

impl Default for SftDataConfig {
    fn default() -> Self {
        SftDataConfig {
            mask_input: true,
            too_long: TooLong::Truncate,
            invalid: Invalid::Stop,
            val_fraction: 0.05,
        }
    }
}

/// One example: its tokens and which of them are learned (`learned[i]`: the loss of
/// predicting `tokens[i]` from the tokens before it counts).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub learned: Vec<bool>,
}

/// Skipped records of one reason.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    pub records: u64,
    /// `file:line` of the first few.
    pub first: Vec<String>,
}

const NAMED_SKIPS: usize = 5;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SftStats {
    /// Each file with its sha256 (what a resumed run must find again).
    pub files: Vec<(String, String)>,
    pub records: u64,
    /// Records read, by format (`input_output`, `chat`, `fim`).
    pub formats: BTreeMap<String, u64>,
    /// Records skipped, by reason.
    pub skipped: BTreeMap<String, Skipped>,
    /// Examples whose input was cut to fit a row, and the tokens cut.
    pub truncated: u64,
    pub truncated_tokens: u64,
    pub train_examples: u64,
    pub val_examples: u64,
    /// Tokens of the training examples, and how many of them are learned.
    pub train_tokens: u64,
    pub learned_tokens: u64,
}

impl SftStats {
    /// The share of the tokens read that truncation cut.
    pub fn truncated_share(&self) -> f64 {
        let all = self.train_tokens + self.truncated_tokens;
        if all == 0 {
            0.0
        } else {
            self.truncated_tokens as f64 / all as f64
        }
    }
}

pub struct SftData {
    pub train: Vec<Example>,
    pub val: Vec<Example>,
    pub stats: SftStats,
}

/// A record that is not an example, and why; an example too long to keep; or one of an
/// evaluation split.
enum Reject {
    Invalid(&'static str, String),
    Evaluation,
    TooLong(String),
}

/// Reads `train` (and `val`, the held-out examples; empty: a share of `train` by
/// `config.val_fraction`) into examples of at most `context + 1` tokens.
pub fn load(
    train: &[PathBuf],
    val: &[PathBuf],
    bpe: &Bpe,
    context: usize,
    config: &SftDataConfig,
    layout: TextLayout,
) -> Result<SftData> {
    if !(0.0..1.0).contains(&config.val_fraction) {
        return Err(PackError::Config(format!(
            "sft.val_fraction = {} must be in [0, 1)",
            config.val_fraction
        )));
    }
    let renderer = Renderer {
        bpe,
        specials: Specials::of(bpe),
        row: context + 1,
        config,
        layout,
    };
    let mut stats = SftStats::default();
    let mut data = SftData {
        train: Vec::new(),
        val: Vec::new(),
        stats: SftStats::default(),
    };
    let (train, val) = (&files(train)?, &files(val)?);
    for (paths, held_out) in [(train, false), (val, true)] {
        for path in paths {
            let (text, sha) = read_text(path)?;
            stats
                .files
                .push((path.display().to_string(), hex::encode(sha)));
            for (n, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                stats.records += 1;
                let at = format!("{}:{}", path.display(), n + 1);
                match renderer.record(line, &mut stats) {
                    Ok(example) => {
                        let to_val = held_out
                            || (val.is_empty()
                                && hash_share(source_of(line)) < config.val_fraction);
                        if to_val {
                            data.val.push(example);
                        } else {
                            stats.train_tokens += example.tokens.len() as u64;
                            stats.learned_tokens +=
                                example.learned.iter().filter(|&&l| l).count() as u64;
                            data.train.push(example);
                        }
                    }
                    Err(Reject::Invalid(reason, message)) => match config.invalid {
                        Invalid::Skip => skip(&mut stats, reason, at),
                        Invalid::Stop => {
                            return Err(PackError::Format {
                                path: PathBuf::from(at),
                                message: format!(
                                    "{message} (sft.invalid = \"skip\" skips such records, counted)"
                                ),
                            })
                        }
                    },
                    Err(Reject::Evaluation) => skip(&mut stats, EVALUATION, at),
                    Err(Reject::TooLong(message)) => match config.too_long {
                        TooLong::Truncate => skip(&mut stats, "too long to cut to the context", at),
                        TooLong::Refuse => {
                            return Err(PackError::Format {
                                path: PathBuf::from(at),
                                message: format!(
                                    "{message} (sft.too_long = \"truncate\" cuts its input instead)"
                                ),
                            })
                        }
                    },
                }
            }
        }
    }
    stats.train_examples = data.train.len() as u64;
    stats.val_examples = data.val.len() as u64;
    if data.train.is_empty() {
        return Err(PackError::Config(format!(
            "no training example in {}: {} records read, {} skipped ({})",
            train
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            stats.records,
            stats.skipped.values().map(|s| s.records).sum::<u64>(),
            stats
                .skipped
                .iter()
                .map(|(reason, s)| format!("{} {reason}, the first at {}", s.records, s.first[0]))
                .collect::<Vec<_>>()
                .join("; ")
        )));
    }
    data.stats = stats;
    Ok(data)
}

/// The reason of records skipped as evaluation tasks.
const EVALUATION: &str = "a split other than train, kept for evaluation";

/// The files of `paths`, a directory standing for its `.jsonl`, `.jsonl.gz` and
/// `.jsonl.zst` files in name order (as `cxxlm tasks` writes them).
fn files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if !p.is_dir() {
            out.push(p.clone());
            continue;
        }
        let mut inside: Vec<PathBuf> = std::fs::read_dir(p)
            .map_err(|e| PackError::io(p, e))?
            .flatten()
            .map(|e| e.path())
            .filter(|f| {
                let name = f.file_name().unwrap_or_default().to_string_lossy();
                [".jsonl", ".jsonl.gz", ".jsonl.zst"]
                    .iter()
                    .any(|ext| name.ends_with(ext))
            })
            .collect();
        if inside.is_empty() {
            return Err(PackError::Config(format!(
                "{} holds no .jsonl, .jsonl.gz or .jsonl.zst file",
                p.display()
            )));
        }
        inside.sort();
        out.extend(inside);
    }
    Ok(out)
}

fn skip(stats: &mut SftStats, reason: &str, at: String) {
    let s = stats.skipped.entry(reason.to_string()).or_default();
    s.records += 1;
    if s.first.len() < NAMED_SKIPS {
        s.first.push(at);
    }
}

/// A file's text (decompressed by its extension) and the sha256 of its bytes.
fn read_text(path: &Path) -> Result<(String, [u8; 32])> {
    let io = |e| PackError::io(path, e);
    let bytes = std::fs::read(path).map_err(io)?;
    let sha: [u8; 32] = Sha256::digest(&bytes).into();
    let name = path.to_string_lossy();
    let mut text = String::new();
    let decoded = if name.ends_with(".gz") {
        flate2::read::GzDecoder::new(&bytes[..]).read_to_string(&mut text)
    } else if name.ends_with(".zst") {
        zstd::Decoder::new(&bytes[..]).and_then(|mut d| d.read_to_string(&mut text))
    } else {
        (&bytes[..]).read_to_string(&mut text)
    };
    decoded.map_err(|e| PackError::Format {
        path: path.to_path_buf(),
        message: format!("not UTF-8 JSON lines: {e}"),
    })?;
    Ok((text, sha))
}

/// A record's place in [0, 1), from a hash of its text.
/// What a record is held out by: the source a task's id names before its `#` (the file
/// each of its bugs was made in), or else the whole record.
fn source_of(line: &str) -> &str {
    #[derive(serde::Deserialize)]
    struct Id<'a> {
        #[serde(borrow)]
        id: Option<&'a str>,
    }
    let line = line.trim();
    match serde_json::from_str::<Id>(line) {
        Ok(Id { id: Some(id) }) => id.split_once('#').map_or(line, |(source, _)| source),
        _ => line,
    }
}

fn hash_share(text: &str) -> f64 {
    let h = xxhash_rust::xxh3::xxh3_64_with_seed(text.as_bytes(), 0x5f7);
    (h >> 11) as f64 / (1u64 << 53) as f64
}

struct Renderer<'a> {
    bpe: &'a Bpe,
    specials: Specials,
    /// Tokens of a row.
    row: usize,
    config: &'a SftDataConfig,
    /// As the model's training text was laid out.
    layout: TextLayout,
}

impl Renderer<'_> {
    fn record(&self, line: &str, stats: &mut SftStats) -> std::result::Result<Example, Reject> {
        let invalid = |reason: &'static str, message: String| Reject::Invalid(reason, message);
        let v: Value = serde_json::from_str(line)
            .map_err(|e| invalid("not JSON", format!("not JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| invalid("not an object", "not a JSON object".into()))?;
        // Tasks of another split than `train` (`cxxlm tasks` writes `test`) are for
        // evaluation only.
        if obj
            .get("split")
            .and_then(Value::as_str)
            .is_some_and(|s| s != "train")
        {
            return Err(Reject::Evaluation);
        }
        let has = |k: &str| obj.contains_key(k);
        let families = [
            ("input/output", has("input") || has("output")),
            ("messages", has("messages")),
            (
                "prefix/suffix/middle",
                has("prefix") || has("suffix") || has("middle"),
            ),
        ];
        let present: Vec<&str> = families.iter().filter(|f| f.1).map(|f| f.0).collect();
        let text = |k: &str| -> std::result::Result<&str, Reject> {
            obj.get(k).and_then(Value::as_str).ok_or_else(|| {
                invalid(
                    "missing or non-string field",
                    format!("\"{k}\" is missing or not a string"),
                )
            })
        };
        let (format, example) = match present[..] {
            ["input/output"] => {
                let (input, output) = (text("input")?, text("output")?);
                if output.trim().is_empty() {
                    return Err(invalid("empty output", "\"output\" is empty".into()));
                }
                let conversation = [
                    Message::new(Role::User, input),
                    Message::new(Role::Assistant, output),
                ];
                ("input_output", self.chat(&conversation)?)
            }
            ["messages"] => ("chat", self.chat(&messages(obj)?)?),
            ["prefix/suffix/middle"] => {
                let (p, s, m) = (text("prefix")?, text("suffix")?, text("middle")?);
                ("fim", self.fim(p, s, m))
            }
            [] => {
                return Err(invalid(
                    "unknown format",
                    "no known format: expected {\"input\", \"output\"}, {\"messages\"} or {\"prefix\", \"suffix\", \"middle\"}".into(),
                ))
            }
            _ => {
                return Err(invalid(
                    "mixed formats",
                    format!("mixes the keys of two formats ({})", present.join(" and ")),
                ))
            }
        };
        *stats.formats.entry(format.into()).or_default() += 1;
        let (mut example, head, answer_start) = example;
        let excess = example.tokens.len().saturating_sub(self.row);
        if excess > 0 {
            // Cut right after the opening (`<|bos|>user\n` or `<|bos|><|fim_prefix|>`):
            // the start of the input goes first.
            let cut = head..head + excess;
            let base = self.bpe.special_id("<|bos|>").unwrap_or(u32::MAX);
            let special = |t: &u32| *t >= base;
            let too_long = format!(
                "holds {} tokens, a row of the context {}",
                example.tokens.len(),
                self.row
            );
            if self.config.too_long == TooLong::Refuse
                || cut.end > answer_start
                || example.tokens[cut.clone()].iter().any(special)
            {
                return Err(Reject::TooLong(too_long));
            }
            example.tokens.drain(cut.clone());
            example.learned.drain(cut);
            stats.truncated += 1;
            stats.truncated_tokens += excess as u64;
        }
        if !self.config.mask_input {
            example.learned = (0..example.tokens.len()).map(|i| i > 0).collect();
        }
        Ok(example)
    }

    /// The chat template's example, where its first message's content starts, and where
    /// its first answer (with its `assistant\n`) starts.
    fn chat(
        &self,
        conversation: &[Message],
    ) -> std::result::Result<(Example, usize, usize), Reject> {
        if conversation
            .iter()
            .any(|m| m.role == Role::Assistant && m.content.trim().is_empty())
        {
            return Err(Reject::Invalid(
                "empty output",
                "an assistant turn is empty".into(),
            ));
        }
        let (tokens, learned) = chat::render(self.bpe, conversation, self.layout)
            .map_err(|e| Reject::Invalid("not a conversation", e.to_string()))?;
        let head = 1 + chat::header(self.bpe, conversation[0].role).len();
        let answer_header = chat::header(self.bpe, Role::Assistant).len();
        let answer_start = learned.iter().position(|&l| l).unwrap_or(tokens.len()) - answer_header;
        Ok((Example { tokens, learned }, head, answer_start))
    }

    fn fim(&self, prefix: &str, suffix: &str, middle: &str) -> (Example, usize, usize) {
        // Laid out as the whole text would be: pretraining cut its FIM examples from
        // normalized documents.
        let laid = normalize_pieces(&[prefix, middle, suffix], self.layout);
        let (prefix, middle, suffix) = (&laid[0], &laid[1], &laid[2]);
        let s = &self.specials;
        let mut tokens = vec![s.bos, s.prefix];
        tokens.extend(self.bpe.encode(prefix));
        tokens.push(s.suffix);
        tokens.extend(self.bpe.encode(suffix));
        tokens.push(s.middle);
        let answer_start = tokens.len();
        tokens.extend(self.bpe.encode(middle));
        tokens.push(s.eos);
        let learned = (0..tokens.len()).map(|i| i >= answer_start).collect();
        // The suffix and its markers stay whole: only the prefix may be cut.
        let prefix_end = tokens.iter().position(|&t| t == s.suffix).unwrap_or(0);
        (Example { tokens, learned }, 2, prefix_end)
    }
}

fn messages(obj: &serde_json::Map<String, Value>) -> std::result::Result<Vec<Message>, Reject> {
    let bad = |message: String| Reject::Invalid("not a conversation", message);
    let list = obj
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("\"messages\" is not an array".into()))?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(Value::as_str);
            let content = m.get("content").and_then(Value::as_str);
            match (role.map(|r| (r, Role::parse(r))), content) {
                (Some((_, Some(role))), Some(content)) => Ok(Message::new(role, content)),
                (Some((r, None)), _) => Err(bad(format!(
                    "messages[{i}]: role {r:?} is not system, user or assistant"
                ))),
                _ => Err(bad(format!(
                    "messages[{i}] needs a string \"role\" and a string \"content\""
                ))),
            }
        })
        .collect()
}

/// Where a [`PackedRows`] stands: the epoch and the next row in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackState {
    pub epoch: u64,
    pub row: u64,
}

/// Rows of one micro-batch: row-major `(rows, cols)` tokens, which targets `(rows, cols -
/// 1)` are learned, and the lengths of the examples in each row (the rest is padding).
#[derive(Debug, Clone, PartialEq)]
pub struct SftBatch {
    pub rows: usize,
    pub cols: usize,
    pub tokens: Vec<u32>,
    pub learned: Vec<bool>,
    pub examples: Vec<Vec<usize>>,
}

/// Examples packed whole into rows of `cols` tokens, epoch after epoch: each epoch's
/// examples in an order drawn from the seed, placed longest first each into the fullest
/// row it fits (best-fit decreasing), the rows then shuffled. Every rank reads its share
/// of one global stream of rows; past the last epoch, rows are padding.
pub struct PackedRows {
    examples: Arc<Vec<Example>>,
    cols: usize,
    seed: u64,
    epochs: u64,
    pad: u32,
    /// The rows of each epoch.
    epoch_rows: Vec<u64>,
    /// The current epoch's rows (example indices).
    rows: Vec<Vec<u32>>,
    state: PackState,
}

impl PackedRows {
    /// Rows of `cols` tokens over `epochs` epochs of `examples` (each at most `cols`
    /// tokens long); `pad` fills what is left of a row.
    pub fn new(
        examples: Arc<Vec<Example>>,
        cols: usize,
        epochs: u64,
        seed: u64,
        pad: u32,
    ) -> Result<PackedRows> {
        if let Some(e) = examples.iter().find(|e| e.tokens.len() > cols) {
            return Err(PackError::Config(format!(
                "an example of {} tokens does not fit rows of {cols}",
                e.tokens.len()
            )));
        }
        let epoch_rows = (0..epochs)
            .map(|e| pack_epoch(&examples, cols, seed, e).len() as u64)
            .collect();
        let rows = pack_epoch(&examples, cols, seed, 0);
        Ok(PackedRows {
            examples,
            cols,
            seed,
            epochs,
            pad,
            epoch_rows,
            rows,
            state: PackState { epoch: 0, row: 0 },
        })
    }

    /// Rows over every epoch.
    pub fn total_rows(&self) -> u64 {
        self.epoch_rows.iter().sum()
    }

    /// The share of the rows' tokens that is padding, over every epoch.
    pub fn padding_share(&self) -> f64 {
        let tokens: u64 = self.examples.iter().map(|e| e.tokens.len() as u64).sum();
        let slots = self.total_rows() * self.cols as u64;
        if slots == 0 {
            0.0
        } else {
            1.0 - (tokens * self.epochs) as f64 / slots as f64
        }
    }

    pub fn state(&self) -> PackState {
        self.state
    }

    /// Continues from a saved position.
    pub fn restore(&mut self, state: PackState) -> Result<()> {
        let fits = state.epoch < self.epochs && state.row < self.epoch_rows[state.epoch as usize]
            || state.epoch == self.epochs && state.row == 0;
        if !fits {
            return Err(PackError::Config(format!(
                "SFT position (epoch {}, row {}) lies outside these examples' {} epochs of {:?} rows (did the data change?)",
                state.epoch, state.row, self.epochs, self.epoch_rows
            )));
        }
        if state.epoch < self.epochs {
            self.rows = pack_epoch(&self.examples, self.cols, self.seed, state.epoch);
        }
        self.state = state;
        Ok(())
    }

    /// The next row's examples (empty past the last epoch).
    fn next_row(&mut self) -> Vec<u32> {
        if self.state.epoch == self.epochs {
            return Vec::new();
        }
        let row = self.rows[self.state.row as usize].clone();
        self.state.row += 1;
        if self.state.row == self.epoch_rows[self.state.epoch as usize] {
            self.state.epoch += 1;
            self.state.row = 0;
            if self.state.epoch < self.epochs {
                self.rows = pack_epoch(&self.examples, self.cols, self.seed, self.state.epoch);
            }
        }
        row
    }

    /// Rank `rank`'s `batch` rows of the next `world x batch` rows of the stream.
    pub fn next_batch(&mut self, batch: usize, rank: usize, world: usize) -> SftBatch {
        let mine = rank * batch..(rank + 1) * batch;
        let mut rows = Vec::with_capacity(batch);
        for r in 0..world * batch {
            let row = self.next_row();
            if mine.contains(&r) {
                rows.push(row);
            }
        }
        batch_of(&self.examples, &rows, self.cols, self.pad)
    }
}

/// The examples in rows of `cols` tokens, as a batch.
pub fn batch_of(examples: &[Example], rows: &[Vec<u32>], cols: usize, pad: u32) -> SftBatch {
    let mut tokens = Vec::with_capacity(rows.len() * cols);
    let mut learned = Vec::with_capacity(rows.len() * (cols - 1));
    let mut lengths = Vec::with_capacity(rows.len());
    for row in rows {
        let start = tokens.len();
        let mut row_learned = Vec::with_capacity(cols);
        for &i in row {
            let e = &examples[i as usize];
            tokens.extend(&e.tokens);
            // A target is learned where the example says so; the first token of the next
            // example is no target of this one.
            row_learned.push(false);
            row_learned.extend(&e.learned[1..]);
        }
        tokens.resize(start + cols, pad);
        row_learned.resize(cols, false);
        learned.extend(&row_learned[1..]);
        lengths.push(
            row.iter()
                .map(|&i| examples[i as usize].tokens.len())
                .collect(),
        );
    }
    SftBatch {
        rows: rows.len(),
        cols,
        tokens,
        learned,
        examples: lengths,
    }
}

/// Every held-out example once, packed best-fit (in their order), as rows.
pub fn eval_rows(examples: &[Example], cols: usize) -> Vec<Vec<u32>> {
    let order: Vec<u32> = (0..examples.len() as u32).collect();
    best_fit(examples, order, cols)
}

/// Epoch `epoch`'s rows: the examples in the epoch's order, best-fit decreasing, the rows
/// shuffled.
fn pack_epoch(examples: &[Example], cols: usize, seed: u64, epoch: u64) -> Vec<Vec<u32>> {
    let mut order: Vec<u32> = (0..examples.len() as u32).collect();
    let mut rng = Rng::keyed(seed, &epoch.to_le_bytes());
    rng.shuffle(&mut order);
    let mut rows = best_fit(examples, order, cols);
    rng.shuffle(&mut rows);
    rows
}

/// The examples of `order`, longest first (ties in `order`), each into the open row
/// with the least room that holds it, or a new one.
fn best_fit(examples: &[Example], mut order: Vec<u32>, cols: usize) -> Vec<Vec<u32>> {
    order.sort_by_key(|&i| std::cmp::Reverse(examples[i as usize].tokens.len()));
    let mut rows: Vec<Vec<u32>> = Vec::new();
    // (room left, row) of every row that still has room.
    let mut open: BTreeSet<(usize, usize)> = BTreeSet::new();
    for i in order {
        let len = examples[i as usize].tokens.len();
        match open.range((len, 0)..).next().copied() {
            Some((room, r)) => {
                open.remove(&(room, r));
                rows[r].push(i);
                if room > len {
                    open.insert((room - len, r));
                }
            }
            None => {
                rows.push(vec![i]);
                if cols > len {
                    open.insert((cols - len, rows.len() - 1));
                }
            }
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEEP: TextLayout = TextLayout {
        strip_indentation: false,
    };

    fn bpe() -> Bpe {
        let texts: Vec<String> = (0..40)
            .map(|i| format!("int f{i}(int x) {{\n    return x * {i};\n}}\n"))
            .collect();
        let mut t = cxxlm_tokenizer::Trainer::new(600).unwrap();
        t.feed(&texts);
        t.train().unwrap()
    }

    fn write(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        path
    }

    fn config() -> SftDataConfig {
        SftDataConfig {
            val_fraction: 0.0,
            ..Default::default()
        }
    }

    fn learned_text(bpe: &Bpe, e: &Example) -> String {
        let ids: Vec<u32> = e
            .tokens
            .iter()
            .zip(&e.learned)
            .filter(|(_, &l)| l)
            .map(|(&t, _)| t)
            .collect();
        String::from_utf8(bpe.decode(&ids)).unwrap()
    }

    #[test]
    fn examples_are_laid_out_as_the_models_training_text_was() {
        let dir = tempfile::tempdir().unwrap();
        let bpe = bpe();
        let lines = [
            r#"{"input": "int f(int x) {\r\n    return x  \n}", "output": "int f(int x) {\n    return x;\n}"}"#,
            r#"{"prefix": "int f(int x) {\n    int y = ", "middle": "x  +\n        1;", "suffix": "\n    return y;\n}\n"}"#,
        ]
        .map(String::from);
        let path = write(dir.path(), "a.jsonl", &lines);
        let strip = TextLayout {
            strip_indentation: true,
        };
        let data = load(&[path], &[], &bpe, 64, &config(), strip).unwrap();
        let [io, fim] = &data.train[..] else {
            panic!("two examples")
        };
        assert_eq!(
            String::from_utf8(bpe.decode(&io.tokens)).unwrap(),
            "<|bos|>user\nint f(int x) {\nreturn x\n}<|eos|>assistant\nint f(int x) {\nreturn x;\n}<|eos|>"
        );
        // The middle keeps the spaces inside its first line and loses the indentation
        // of the next, as the whole normalized text had them.
        assert_eq!(
            String::from_utf8(bpe.decode(&fim.tokens)).unwrap(),
            "<|bos|><|fim_prefix|>int f(int x) {\nint y = <|fim_suffix|>\nreturn y;\n}\n<|fim_middle|>x  +\n1;<|eos|>"
        );
    }

    #[test]
    fn each_format_learns_its_answer_and_specials_in_text_stay_text() {
        let dir = tempfile::tempdir().unwrap();
        let bpe = bpe();
        let lines = [
            r#"{"input": "int f(int x) { return x }", "output": "int f(int x) { return x; }", "id": 7}"#,
            r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<|eos|>?"}, {"role": "assistant", "content": "no"}]}"#,
            r#"{"prefix": "int f(int x) {\n", "suffix": "}\n", "middle": "    return x;\n"}"#,
        ]
        .map(String::from);
        let path = write(dir.path(), "a.jsonl", &lines);
        let data = load(&[path], &[], &bpe, 64, &config(), KEEP).unwrap();
        assert_eq!(data.train.len(), 3);
        assert_eq!(
            data.stats.formats,
            BTreeMap::from([
                ("chat".into(), 1),
                ("fim".into(), 1),
                ("input_output".into(), 1)
            ])
        );
        let [io, chat, fim] = &data.train[..] else {
            panic!("three examples")
        };
        assert_eq!(learned_text(&bpe, io), "int f(int x) { return x; }<|eos|>");
        assert_eq!(learned_text(&bpe, chat), "no<|eos|>");
        assert_eq!(learned_text(&bpe, fim), "    return x;\n<|eos|>");
        // The `<|eos|>` the user typed is text: the special ends the three turns only.
        let eos = bpe.special_id("<|eos|>").unwrap();
        assert_eq!(chat.tokens.iter().filter(|&&t| t == eos).count(), 3);
        let text = String::from_utf8(bpe.decode(&io.tokens)).unwrap();
        assert_eq!(
            text,
            "<|bos|>user\nint f(int x) { return x }<|eos|>assistant\nint f(int x) { return x; }<|eos|>"
        );
        let text = String::from_utf8(bpe.decode(&fim.tokens)).unwrap();
        assert_eq!(
            text,
            "<|bos|><|fim_prefix|>int f(int x) {\n<|fim_suffix|>}\n<|fim_middle|>    return x;\n<|eos|>"
        );

        let all = SftDataConfig {
            mask_input: false,
            ..config()
        };
        let data = load(&[dir.path().join("a.jsonl")], &[], &bpe, 64, &all, KEEP).unwrap();
        for e in &data.train {
            assert!(!e.learned[0] && e.learned[1..].iter().all(|&l| l));
        }
    }

    #[test]
    fn malformed_records_stop_with_their_line_or_are_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let bpe = bpe();
        let good = r#"{"input": "a", "output": "b"}"#.to_string();
        let bad = [
            ("not json", "not JSON"),
            ("[1, 2]", "not an object"),
            (r#"{"text": "x"}"#, "unknown format"),
            (
                r#"{"input": "a", "output": "b", "messages": []}"#,
                "mixed formats",
            ),
            (r#"{"input": "a", "output": "  "}"#, "empty output"),
            (r#"{"input": "a"}"#, "missing or non-string field"),
            (
                r#"{"messages": [{"role": "user", "content": "x"}]}"#,
                "not a conversation",
            ),
            (
                r#"{"messages": [{"role": "bot", "content": "x"}]}"#,
                "not a conversation",
            ),
        ];
        for (i, (line, reason)) in bad.iter().enumerate() {
            let path = write(
                dir.path(),
                "b.jsonl",
                &[good.clone(), String::new(), line.to_string()],
            );
            let e = match load(std::slice::from_ref(&path), &[], &bpe, 64, &config(), KEEP) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{line} was accepted"),
            };
            assert!(e.contains(&format!("{}:3:", path.display())), "{e}");
            let skip = SftDataConfig {
                invalid: Invalid::Skip,
                ..config()
            };
            let data = load(std::slice::from_ref(&path), &[], &bpe, 64, &skip, KEEP).unwrap();
            assert_eq!(data.train.len(), 1, "case {i}");
            assert_eq!(
                data.stats.skipped[*reason].first,
                vec![format!("{}:3", path.display())],
                "case {i}: {:?}",
                data.stats.skipped
            );
        }
        let empty = write(dir.path(), "c.jsonl", &[r#"{"text": "x"}"#.to_string()]);
        let skip = SftDataConfig {
            invalid: Invalid::Skip,
            ..config()
        };
        let e = load(&[empty], &[], &bpe, 64, &skip, KEEP)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("no training example") && e.contains("1 skipped (1 "),
            "{e}"
        );
        assert!(
            e.contains("the first at ") && e.contains("c.jsonl:1"),
            "{e}"
        );
    }

    #[test]
    fn long_examples_lose_the_start_of_their_input_or_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let bpe = bpe();
        let input: String = (0..30).map(|i| format!("int v{i} = {i};\n")).collect();
        let lines = [
            serde_json::json!({"input": input, "output": "return 1;"}).to_string(),
            serde_json::json!({"input": "x", "output": input}).to_string(),
        ];
        let path = write(dir.path(), "long.jsonl", &lines);
        let data = load(std::slice::from_ref(&path), &[], &bpe, 40, &config(), KEEP).unwrap();
        assert_eq!(data.train.len(), 1);
        let e = &data.train[0];
        assert_eq!(e.tokens.len(), 41);
        assert_eq!(learned_text(&bpe, e), "return 1;<|eos|>");
        let text = String::from_utf8(bpe.decode(&e.tokens)).unwrap();
        assert!(
            text.starts_with("<|bos|>user\n") && text.contains("int v29 = 29;\n<|eos|>"),
            "{text}"
        );
        assert!(!text.contains("int v0 = 0;"), "{text}");
        assert_eq!(data.stats.truncated, 1);
        assert!(data.stats.truncated_tokens > 0);
        assert_eq!(
            data.stats.skipped["too long to cut to the context"].records,
            1
        );

        let refuse = SftDataConfig {
            too_long: TooLong::Refuse,
            ..config()
        };
        let e = load(std::slice::from_ref(&path), &[], &bpe, 40, &refuse, KEEP)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(&format!("{}:1:", path.display())) && e.contains("holds"),
            "{e}"
        );
    }

    /// `cxxlm tasks` output: a directory of `.jsonl.zst` parts of tasks with more keys than
    /// the pair; those of the test split are never trained on.
    #[test]
    fn task_directories_are_read_and_their_test_split_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let bpe = bpe();
        let task = |i: usize, split: &str| {
            serde_json::json!({
                "id": format!("t{i}"), "kind": "injected_bug", "split": split,
                "input": format!("// TASK: fix f{i}\nint f{i}(int x) {{ return x * {i} }}"),
                "output": format!("/* REASONING: the semicolon */\nint f{i}(int x) {{ return x * {i}; }}"),
                "provenance": {"source": "x", "path": "y.cpp", "change": "z"},
            })
            .to_string()
        };
        let tasks = dir.path().join("bugs");
        std::fs::create_dir_all(&tasks).unwrap();
        for (part, range) in [("part-000.jsonl.zst", 0..6), ("part-001.jsonl.zst", 6..10)] {
            let lines: Vec<String> = range
                .map(|i| task(i, if i % 4 == 3 { "test" } else { "train" }))
                .collect();
            let packed = zstd::encode_all((lines.join("\n") + "\n").as_bytes(), 3).unwrap();
            std::fs::write(tasks.join(part), packed).unwrap();
        }
        std::fs::write(tasks.join("stats.json"), "{}").unwrap();
        let data = load(std::slice::from_ref(&tasks), &[], &bpe, 64, &config(), KEEP).unwrap();
        assert_eq!(data.stats.files.len(), 2);
        assert_eq!((data.stats.records, data.train.len()), (10, 8));
        let left_out = &data.stats.skipped[EVALUATION];
        assert_eq!(left_out.records, 2);
        assert_eq!(
            left_out.first,
            [
                format!("{}:4", tasks.join("part-000.jsonl.zst").display()),
                format!("{}:2", tasks.join("part-001.jsonl.zst").display())
            ]
        );
        let answers: Vec<String> = data.train.iter().map(|e| learned_text(&bpe, e)).collect();
        assert!(answers
            .iter()
            .all(|a| !a.contains("f3(") && !a.contains("f7(")));
        let empty = dir.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let e = load(&[empty], &[], &bpe, 64, &config(), KEEP)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("holds no .jsonl"), "{e}");
    }

    #[test]
    fn held_out_records_are_chosen_by_their_text() {
        let dir = tempfile::tempdir().unwrap();
        let bpe = bpe();
        let lines: Vec<String> = (0..200)
            .map(|i| {
                serde_json::json!({"input": format!("q{i}"), "output": format!("a{i}")}).to_string()
            })
            .collect();
        let split = SftDataConfig {
            val_fraction: 0.2,
            ..config()
        };
        let a = load(
            &[write(dir.path(), "a.jsonl", &lines)],
            &[],
            &bpe,
            64,
            &split,
            KEEP,
        )
        .unwrap();
        assert!((20..60).contains(&a.val.len()), "{}", a.val.len());
        let mut reversed = lines.clone();
        reversed.reverse();
        let b = load(
            &[write(dir.path(), "b.jsonl", &reversed)],
            &[],
            &bpe,
            64,
            &split,
            KEEP,
        )
        .unwrap();
        let set = |v: &[Example]| v.iter().map(|e| e.tokens.clone()).collect::<BTreeSet<_>>();
        assert_eq!(
            set(&a.val),
            set(&b.val),
            "the split does not depend on order"
        );
        let given = load(
            &[dir.path().join("a.jsonl")],
            &[dir.path().join("b.jsonl")],
            &bpe,
            64,
            &split,
            KEEP,
        )
        .unwrap();
        assert_eq!((given.train.len(), given.val.len()), (200, 200));
    }

    #[test]
    fn bugs_made_in_one_file_fall_on_one_side() {
        let dir = tempfile::tempdir().unwrap();
        let lines: Vec<String> = (0..400)
            .map(|i| {
                let id = format!("pkg/src/file{}.cc#flip_comparison@{i}.0", i / 8);
                serde_json::json!({"id": id, "input": format!("q{i}"), "output": format!("a{i}")})
                    .to_string()
            })
            .collect();
        let split = SftDataConfig {
            val_fraction: 0.2,
            ..config()
        };
        let data = load(
            &[write(dir.path(), "t.jsonl", &lines)],
            &[],
            &bpe(),
            64,
            &split,
            KEEP,
        )
        .unwrap();
        assert!((16..150).contains(&data.val.len()), "{}", data.val.len());
        assert_eq!(
            data.val.len() % 8,
            0,
            "a file's 8 bugs are held out together"
        );
    }

    fn examples(lengths: &[usize]) -> Arc<Vec<Example>> {
        Arc::new(
            lengths
                .iter()
                .enumerate()
                .map(|(i, &n)| Example {
                    tokens: (0..n as u32).map(|t| t + 1000 * i as u32).collect(),
                    learned: (0..n).map(|t| t > n / 2).collect(),
                })
                .collect(),
        )
    }

    #[test]
    fn epochs_pack_every_example_once_whole_and_best_fit() {
        const PAD: u32 = u32::MAX;
        let lengths: Vec<usize> = (0..100).map(|i| 3 + (i * 37) % 60).collect();
        let mut rows = PackedRows::new(examples(&lengths), 64, 2, 7, PAD).unwrap();
        let total = rows.total_rows();
        let tokens: usize = lengths.iter().sum();
        assert!(
            (total as usize * 64) < tokens * 2 * 110 / 100,
            "best fit wastes little: {total} rows"
        );
        assert!(rows.padding_share() < 0.1, "{}", rows.padding_share());
        let mut seen = vec![0; lengths.len()];
        for _ in 0..total {
            let b = rows.next_batch(1, 0, 1);
            let used: usize = b.examples[0].iter().sum();
            assert!(used <= 64 && b.tokens[used..].iter().all(|&t| t == PAD));
            assert!(!b.learned[used.saturating_sub(1)..].iter().any(|&l| l));
            let mut start = 0;
            for &n in &b.examples[0] {
                let id = (b.tokens[start] / 1000) as usize;
                assert_eq!(lengths[id], n, "whole examples");
                seen[id] += 1;
                // The first token of an example is no target of the one before.
                if start > 0 {
                    assert!(!b.learned[start - 1]);
                }
                start += n;
            }
        }
        assert!(seen.iter().all(|&n| n == 2), "every example once per epoch");
        let b = rows.next_batch(2, 0, 1);
        assert!(
            b.examples.iter().all(Vec::is_empty) && !b.learned.iter().any(|&l| l),
            "past the last epoch, rows are padding"
        );
    }

    #[test]
    fn a_restored_position_gives_the_same_rows_on_any_number_of_ranks() {
        let lengths: Vec<usize> = (0..50).map(|i| 2 + (i * 13) % 30).collect();
        let ex = examples(&lengths);
        let fresh = || PackedRows::new(ex.clone(), 32, 3, 1, 0).unwrap();
        let mut whole = fresh();
        let all: Vec<SftBatch> = (0..20).map(|_| whole.next_batch(4, 0, 1)).collect();
        let mut first = fresh();
        for _ in 0..7 {
            first.next_batch(4, 0, 1);
        }
        let mut resumed = fresh();
        resumed.restore(first.state()).unwrap();
        for b in &all[7..] {
            // Two ranks of two rows each read the same rows as one rank of four.
            let (r0, r1) = (resumed.state(), resumed.state());
            let mut rank0 = fresh();
            rank0.restore(r0).unwrap();
            let mut rank1 = fresh();
            rank1.restore(r1).unwrap();
            let (a, c) = (rank0.next_batch(2, 0, 2), rank1.next_batch(2, 1, 2));
            assert_eq!([a.tokens, c.tokens].concat(), b.tokens);
            assert_eq!(&resumed.next_batch(4, 0, 1), b);
        }
        assert!(fresh()
            .restore(PackState { epoch: 9, row: 0 })
            .unwrap_err()
            .to_string()
            .contains("did the data change"));
    }
}
