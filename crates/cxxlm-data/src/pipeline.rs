//! One task of `cxxlm data run`: read this task's units, run the steps over documents
//! in parallel, drop exact duplicates in input order, write shards, and checkpoint after
//! every shard so a killed task resumes where its last shard ended and produces the
//! same output an uninterrupted run would.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::config::PipelineConfig;
use crate::document::{Document, RawDocument};
use crate::error::{DataError, Result};
use crate::read::hub::HubClient;
use crate::read::{self, ReadItem, Unit, UnitReader};
use crate::shard::{write_atomic, ShardWriter};
use crate::stats::{RunStats, StepStats};
use crate::steps::{self, content_hash, Counters, ExactDedup, Step, Verdict};

const STATE_VERSION: u32 = 1;
const BATCH_ITEMS: usize = 1024;
const BATCH_BYTES: usize = 16 << 20;
const STOP_POLL: std::time::Duration = std::time::Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskSpec {
    pub tasks: usize,
    pub index: usize,
}

impl TaskSpec {
    pub fn validate(&self) -> Result<()> {
        if self.tasks == 0 || self.index >= self.tasks {
            return Err(DataError::Config(format!(
                "task index {} is not below task count {}",
                self.index, self.tasks
            )));
        }
        Ok(())
    }

    fn name(&self) -> String {
        format!("{:05}", self.index)
    }
}

/// Where reading stands: the next item of the `unit`-th unit of this task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub unit: u64,
    pub item: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Checkpoint {
    version: u32,
    fingerprint: String,
    next: Position,
    next_shard: u64,
    hashes: u64,
    stats: RunStats,
    #[serde(default)]
    shards: Vec<WrittenShard>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TaskDone {
    pub fingerprint: String,
    pub task: usize,
    pub tasks: usize,
    pub stats: RunStats,
    /// The shards the task wrote (absent in runs made before it was recorded).
    #[serde(default)]
    pub shards: Vec<WrittenShard>,
}

/// A finished shard of a task, under the output directory, and its size.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WrittenShard {
    pub path: PathBuf,
    pub bytes: u64,
}

impl WrittenShard {
    fn of(dir: &Path, path: &Path) -> Result<Self> {
        let bytes = std::fs::metadata(path)
            .map_err(|e| DataError::io(path, e))?
            .len();
        Ok(WrittenShard {
            path: path.strip_prefix(dir).unwrap_or(path).to_path_buf(),
            bytes,
        })
    }
}

/// Refuses to go on from (or count as done) a task whose finished shards are gone or
/// changed since it wrote them: their documents would be missing from the output.
fn check_written(layout: &Layout, task: &TaskSpec, shards: &[WrittenShard]) -> Result<()> {
    for shard in shards {
        let path = layout.dir.join(&shard.path);
        let found = std::fs::metadata(&path).map(|m| m.len());
        if found.as_ref().ok() != Some(&shard.bytes) {
            let what = match found {
                Ok(n) => format!(
                    "holds {n} bytes, not the {} it was written with",
                    shard.bytes
                ),
                Err(e) => e.to_string(),
            };
            return Err(DataError::Resume {
                dir: path,
                message: format!(
                    "{what}: task {} wrote it before; remove {} and this task's files under {} to redo the task",
                    task.index,
                    shard.path.display(),
                    layout.tasks_dir().display()
                ),
            });
        }
    }
    Ok(())
}

pub enum TaskOutcome {
    Completed(RunStats),
    /// The completion marker was already there: nothing was redone.
    AlreadyDone(RunStats),
}

/// Progress as a task runs, for display.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    pub units_done: u64,
    pub units_total: u64,
    pub bytes_read: u64,
    pub docs_written: u64,
}

pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    fn tasks_dir(&self) -> PathBuf {
        self.dir.join("tasks")
    }
    /// Held by the process running the task (`cxxlm data run`).
    pub fn lock(&self, task: &TaskSpec) -> PathBuf {
        self.tasks_dir().join(format!("task-{}.lock", task.name()))
    }
    fn run_fingerprint(&self) -> PathBuf {
        self.tasks_dir().join("run.json")
    }
    pub fn done_marker(&self, task: &TaskSpec) -> PathBuf {
        self.tasks_dir()
            .join(format!("task-{}.done.json", task.name()))
    }
    fn checkpoint(&self, task: &TaskSpec) -> PathBuf {
        self.tasks_dir()
            .join(format!("task-{}.state.json", task.name()))
    }
    fn hashes(&self, task: &TaskSpec) -> PathBuf {
        self.tasks_dir()
            .join(format!("task-{}.hashes", task.name()))
    }
    fn shard(&self, task: &TaskSpec, n: u64) -> PathBuf {
        self.dir
            .join(format!("part-{}-{n:05}.jsonl.zst", task.name()))
    }
    fn removed_shard(&self, task: &TaskSpec, n: u64) -> PathBuf {
        self.dir
            .join("removed")
            .join(format!("part-{}-{n:05}.jsonl.zst", task.name()))
    }
    pub fn stats(&self) -> PathBuf {
        self.dir.join("stats.json")
    }
}

pub fn hub_client(config: &PipelineConfig) -> Option<HubClient> {
    config
        .input
        .paths
        .iter()
        .any(|p| p.starts_with("hf://"))
        .then(|| {
            HubClient::from_env(
                config.input.hub_endpoint.as_deref(),
                config.input.hub_cache.clone(),
            )
        })
}

/// What identifies a run's output: the settings that shape it and the units it reads.
fn fingerprint(config: &PipelineConfig, task: &TaskSpec, units: &[Unit]) -> String {
    let mut shaping = config.clone();
    shaping.output.dir = PathBuf::new();
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(
        serde_json::to_string(&shaping)
            .unwrap_or_default()
            .as_bytes(),
    );
    h.update(format!("tasks={}", task.tasks).as_bytes());
    for u in units {
        h.update(u.describe().as_bytes());
        h.update(b"\n");
    }
    format!("{:032x}", h.digest128())
}

pub fn run_task(
    config: &PipelineConfig,
    task: TaskSpec,
    stop: &AtomicBool,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<TaskOutcome> {
    config.validate()?;
    task.validate()?;
    let layout = Layout {
        dir: config.output.dir.clone(),
    };
    let tasks_dir = layout.tasks_dir();
    std::fs::create_dir_all(&tasks_dir).map_err(|e| DataError::io(&tasks_dir, e))?;

    let hub = hub_client(config);
    let plan = read::plan(&config.input, hub.as_ref(), stop)?;
    let mine: Vec<Unit> = plan
        .units
        .iter()
        .skip(task.index)
        .step_by(task.tasks)
        .cloned()
        .collect();
    let fingerprint = fingerprint(config, &task, &plan.units);

    claim_run(&layout, &fingerprint)?;
    let marker = layout.done_marker(&task);
    if let Some(done) = read_json_if_present::<TaskDone>(&marker)? {
        if done.fingerprint != fingerprint {
            return Err(mismatch(&layout.dir));
        }
        check_written(&layout, &task, &done.shards)?;
        return Ok(TaskOutcome::AlreadyDone(done.stats));
    }

    let started = Instant::now();
    let steps = steps::build_steps(config)?;
    let mut run = TaskRun::resume_or_start(config, &layout, task, &fingerprint, &steps)?;
    if run.next == Position::default() {
        // Listing problems are the same for every task: task 0 counts them.
        if task.index == 0 {
            for s in &plan.skipped {
                run.stats
                    .read
                    .skipped
                    .entry(s.reason.clone())
                    .or_default()
                    .add(0);
                run.stats.read.skipped_inputs.push(s.clone());
            }
            run.stats.read.ignored_files += plan.ignored_files;
        }
    }
    let previous_seconds = run.stats.seconds;

    let (tx, rx) = crossbeam_channel::bounded::<Result<Vec<(Position, ReadItem)>>>(4);
    let reader_stop = Arc::new(AtomicBool::new(false));
    let units_total = mine.len() as u64;
    let start_at = run.next;
    let reader = {
        let input = config.input.clone();
        let reader_stop = reader_stop.clone();
        std::thread::spawn(move || {
            produce(
                mine,
                start_at,
                UnitReader::new(input, hub),
                tx,
                &reader_stop,
            )
        })
    };

    let result = (|| -> Result<()> {
        let mut pending: Option<Vec<(Position, Outcome)>> = None;
        let mut bytes_read = 0u64;
        loop {
            // Waiting on the reader must not stop us from hearing `stop`: it may be
            // blocked on a stalled download, which it abandons once told.
            let batch = match rx.recv_timeout(STOP_POLL) {
                Ok(batch) => batch,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if stop.load(Ordering::Relaxed) {
                        return Err(DataError::Interrupted);
                    }
                    continue;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            };
            if stop.load(Ordering::Relaxed) {
                return Err(DataError::Interrupted);
            }
            let batch = batch?;
            bytes_read += batch.iter().map(|(_, i)| item_bytes(i)).sum::<u64>();
            let last_unit = batch.last().map_or(0, |(p, _)| p.unit);
            let previous = pending.take();
            let (processed, written) = rayon::join(
                || process(&steps, batch),
                || previous.map_or(Ok(()), |p| run.absorb(p)),
            );
            written?;
            pending = Some(processed);
            progress(Progress {
                units_done: last_unit,
                units_total,
                bytes_read,
                docs_written: run.stats.written.docs,
            });
        }
        if let Some(p) = pending {
            run.absorb(p)?;
        }
        Ok(())
    })();
    reader_stop.store(true, Ordering::Relaxed);
    drop(rx);
    let _ = reader.join();
    result?;

    run.stats.seconds = previous_seconds + started.elapsed().as_secs_f64();
    run.stats.read.units = units_total;
    run.next = Position {
        unit: units_total,
        item: 0,
    };
    run.checkpoint()?;
    let stats = run.stats.clone();
    let done = TaskDone {
        fingerprint,
        task: task.index,
        tasks: task.tasks,
        stats: stats.clone(),
        shards: run.shards.clone(),
    };
    write_atomic(
        &marker,
        &serde_json::to_vec_pretty(&done).unwrap_or_default(),
    )?;
    let _ = std::fs::remove_file(layout.checkpoint(&task));
    let _ = std::fs::remove_file(layout.hashes(&task));
    progress(Progress {
        units_done: units_total,
        units_total,
        bytes_read: stats.read.docs.bytes,
        docs_written: stats.written.docs,
    });
    Ok(TaskOutcome::Completed(stats))
}

#[derive(Serialize, Deserialize)]
struct RunClaim {
    fingerprint: String,
}

/// The tasks of one output directory belong to one run: the first to start records
/// the run's fingerprint, and a task of a run with other settings, inputs or task count
/// is refused, however the tasks are scheduled.
fn claim_run(layout: &Layout, fingerprint: &str) -> Result<()> {
    let path = layout.run_fingerprint();
    if read_json_if_present::<RunClaim>(&path)?.is_none() {
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        let claim = RunClaim {
            fingerprint: fingerprint.to_string(),
        };
        write_atomic(&tmp, &serde_json::to_vec(&claim).unwrap_or_default())?;
        // Fails when another task recorded its run first; that one is checked below.
        let _ = std::fs::hard_link(&tmp, &path);
        std::fs::remove_file(&tmp).map_err(|e| DataError::io(&tmp, e))?;
    }
    match read_json_if_present::<RunClaim>(&path)? {
        Some(claim) if claim.fingerprint == fingerprint => Ok(()),
        _ => Err(mismatch(&layout.dir)),
    }
}

pub(crate) fn mismatch(dir: &Path) -> DataError {
    DataError::Resume {
        dir: dir.to_path_buf(),
        message: "holds a run with other settings or other inputs; use another output directory or remove this one".into(),
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    read_json_if_present(path)?
        .ok_or_else(|| DataError::io(path, std::io::ErrorKind::NotFound.into()))
}

/// A state or marker file, or `None` when there is none yet.
pub fn read_json_if_present<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(DataError::io(path, e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| DataError::Resume {
            dir: path.to_path_buf(),
            message: format!("unreadable ({e}); remove it to redo this task"),
        })
}

/// The bytes an item holds: a skip's size (a header's word, for a member too large to
/// read) was never read.
fn item_bytes(item: &ReadItem) -> u64 {
    match item {
        ReadItem::Doc(d) => d.bytes.len() as u64,
        ReadItem::Skip { .. } | ReadItem::Ignored => 0,
    }
}

/// The reader thread: this task's units from `start`, in batches.
fn produce(
    units: Vec<Unit>,
    start: Position,
    mut reader: UnitReader,
    tx: crossbeam_channel::Sender<Result<Vec<(Position, ReadItem)>>>,
    stop: &AtomicBool,
) {
    let mut batch = Vec::new();
    let mut batch_bytes = 0usize;
    for (u, unit) in units.iter().enumerate().skip(start.unit as usize) {
        let unit_index = u as u64;
        let mut item = 0u64;
        let first = if unit_index == start.unit {
            start.item
        } else {
            0
        };
        let mut hung_up = false;
        let res = reader.read(
            unit,
            &mut |it: ReadItem| {
                let pos = Position {
                    unit: unit_index,
                    item,
                };
                item += 1;
                if pos.item < first {
                    return true;
                }
                batch_bytes += item_bytes(&it) as usize;
                batch.push((pos, it));
                if batch.len() >= BATCH_ITEMS || batch_bytes >= BATCH_BYTES {
                    batch_bytes = 0;
                    if tx.send(Ok(std::mem::take(&mut batch))).is_err()
                        || stop.load(Ordering::Relaxed)
                    {
                        hung_up = true;
                        return false;
                    }
                }
                true
            },
            stop,
        );
        if let Err(e) = res {
            let _ = tx.send(Err(e));
            return;
        }
        if hung_up {
            return;
        }
    }
    if !batch.is_empty() {
        let _ = tx.send(Ok(batch));
    }
}

/// What one step did to one document.
struct StepRecord {
    bytes_in: u64,
    bytes_out: u64,
    nanos: u64,
    counters: Counters,
}

enum Outcome {
    Kept {
        doc: Document,
        hash: u128,
        records: Vec<StepRecord>,
    },
    Dropped {
        doc: Document,
        step: usize,
        reason: &'static str,
        records: Vec<StepRecord>,
    },
    Skipped {
        skipped: crate::stats::Skipped,
        bytes: u64,
    },
    Ignored,
}

/// Run decode and the steps over a batch, in parallel, keeping input order.
fn process(steps: &[Box<dyn Step>], batch: Vec<(Position, ReadItem)>) -> Vec<(Position, Outcome)> {
    batch
        .into_par_iter()
        .map(|(pos, item)| {
            let outcome = match item {
                ReadItem::Doc(raw) => run_steps(steps, raw),
                ReadItem::Skip { skipped, bytes } => Outcome::Skipped { skipped, bytes },
                ReadItem::Ignored => Outcome::Ignored,
            };
            (pos, outcome)
        })
        .collect()
}

fn run_steps(steps: &[Box<dyn Step>], raw: RawDocument) -> Outcome {
    let mut records = Vec::with_capacity(steps.len() + 1);
    let t = Instant::now();
    let bytes_in = raw.bytes.len() as u64;
    let (mut doc, verdict) = steps::decode(raw);
    records.push(StepRecord {
        bytes_in,
        bytes_out: doc.text.len() as u64,
        nanos: t.elapsed().as_nanos() as u64,
        counters: Counters::default(),
    });
    if let Verdict::Drop(reason) = verdict {
        return Outcome::Dropped {
            doc,
            step: 0,
            reason,
            records,
        };
    }
    for (i, step) in steps.iter().enumerate() {
        let t = Instant::now();
        let bytes_in = doc.text.len() as u64;
        let mut counters = Counters::default();
        let verdict = step.apply(&mut doc, &mut counters);
        records.push(StepRecord {
            bytes_in,
            bytes_out: doc.text.len() as u64,
            nanos: t.elapsed().as_nanos() as u64,
            counters,
        });
        if let Verdict::Drop(reason) = verdict {
            return Outcome::Dropped {
                doc,
                step: i + 1,
                reason,
                records,
            };
        }
    }
    let hash = content_hash(&doc.text);
    Outcome::Kept { doc, hash, records }
}

/// The sequential side of a task: stats, exact dedup, shards, checkpoints.
struct TaskRun<'a> {
    config: &'a PipelineConfig,
    layout: &'a Layout,
    task: TaskSpec,
    fingerprint: String,
    step_names: Vec<&'static str>,
    stats: RunStats,
    next: Position,
    next_shard: u64,
    dedup: ExactDedup,
    hashes: BufWriter<File>,
    hash_count: u64,
    shard: Option<ShardWriter>,
    removed: Option<ShardWriter>,
    /// The shards finished so far.
    shards: Vec<WrittenShard>,
}

impl<'a> TaskRun<'a> {
    fn resume_or_start(
        config: &'a PipelineConfig,
        layout: &'a Layout,
        task: TaskSpec,
        fingerprint: &str,
        steps: &[Box<dyn Step>],
    ) -> Result<Self> {
        let mut step_names = vec!["decode"];
        step_names.extend(steps.iter().map(|s| s.name()));
        if config.dedup.enabled {
            step_names.push("exact_dedup");
        }
        let state_path = layout.checkpoint(&task);
        let hashes_path = layout.hashes(&task);
        let checkpoint: Option<Checkpoint> = read_json_if_present(&state_path)?;
        if let Some(c) = &checkpoint {
            if c.version != STATE_VERSION || c.fingerprint != fingerprint {
                return Err(mismatch(&layout.dir));
            }
        }
        remove_stale_tmp(&layout.dir, &task)?;
        let mut seen = Vec::new();
        let hash_count = checkpoint.as_ref().map_or(0, |c| c.hashes);
        if hash_count > 0 {
            let mut buf = vec![0u8; hash_count as usize * 16];
            File::open(&hashes_path)
                .and_then(|mut f| f.read_exact(&mut buf))
                .map_err(|e| DataError::Resume {
                    dir: hashes_path.clone(),
                    message: format!(
                        "dedup state unreadable ({e}); remove {} to start this task over",
                        state_path.display()
                    ),
                })?;
            seen = buf
                .chunks_exact(16)
                .map(|c| u128::from_le_bytes(c.try_into().unwrap_or([0; 16])))
                .collect();
        }
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&hashes_path)
            .map_err(|e| DataError::io(&hashes_path, e))?;
        file.set_len(hash_count * 16)
            .map_err(|e| DataError::io(&hashes_path, e))?;
        let mut hashes = BufWriter::new(file);
        std::io::Seek::seek(&mut hashes, std::io::SeekFrom::End(0))
            .map_err(|e| DataError::io(&hashes_path, e))?;

        let shards = checkpoint.as_ref().map_or(Vec::new(), |c| c.shards.clone());
        check_written(layout, &task, &shards)?;
        let (stats, next, next_shard) = match checkpoint {
            Some(c) => {
                tracing::info!(
                    "task {}: resuming at unit {} item {} (shard {})",
                    task.index,
                    c.next.unit,
                    c.next.item,
                    c.next_shard
                );
                (c.stats, c.next, c.next_shard)
            }
            None => {
                let stats = RunStats {
                    steps: step_names.iter().map(|n| StepStats::new(n)).collect(),
                    ..Default::default()
                };
                (stats, Position::default(), 0)
            }
        };
        Ok(TaskRun {
            config,
            layout,
            task,
            fingerprint: fingerprint.to_string(),
            step_names,
            stats,
            next,
            next_shard,
            dedup: ExactDedup::with_seen(seen),
            hashes,
            hash_count,
            shard: None,
            removed: None,
            shards,
        })
    }

    fn absorb(&mut self, batch: Vec<(Position, Outcome)>) -> Result<()> {
        for (pos, outcome) in batch {
            match outcome {
                Outcome::Ignored => {}
                Outcome::Skipped { skipped, bytes } => {
                    self.stats
                        .read
                        .skipped
                        .entry(skipped.reason.clone())
                        .or_default()
                        .add(bytes);
                    tracing::info!(
                        "skipped {}: {} ({})",
                        skipped.input,
                        skipped.reason,
                        skipped.detail
                    );
                    self.stats.read.skipped_inputs.push(skipped);
                }
                Outcome::Dropped {
                    doc,
                    step,
                    reason,
                    records,
                } => {
                    self.record(&records, Some(reason));
                    self.write_removed(doc, self.step_names[step], reason)?;
                }
                Outcome::Kept { doc, hash, records } => {
                    self.record(&records, None);
                    if self.config.dedup.enabled {
                        let dedup = self.stats.steps.len() - 1;
                        let bytes = doc.text.len() as u64;
                        let s = &mut self.stats.steps[dedup];
                        s.input.add(bytes);
                        if !self.dedup.first(hash) {
                            s.dropped.entry("duplicate".into()).or_default().add(bytes);
                            self.write_removed(doc, "exact_dedup", "duplicate")?;
                            self.advance(pos)?;
                            continue;
                        }
                        s.output.add(bytes);
                        self.hashes
                            .write_all(&hash.to_le_bytes())
                            .map_err(|e| DataError::io(self.layout.hashes(&self.task), e))?;
                        self.hash_count += 1;
                    }
                    self.write_kept(&doc)?;
                }
            }
            self.advance(pos)?;
        }
        Ok(())
    }

    fn record(&mut self, records: &[StepRecord], dropped: Option<&'static str>) {
        self.stats
            .read
            .docs
            .add(records.first().map_or(0, |r| r.bytes_in));
        let last = records.len() - 1;
        for (i, r) in records.iter().enumerate() {
            let s = &mut self.stats.steps[i];
            s.input.add(r.bytes_in);
            s.seconds += r.nanos as f64 * 1e-9;
            for (k, v) in &r.counters.0 {
                *s.counters.entry(k.clone()).or_default() += v;
            }
            match dropped {
                Some(reason) if i == last => s
                    .dropped
                    .entry(reason.to_string())
                    .or_default()
                    .add(r.bytes_in),
                _ => s.output.add(r.bytes_out),
            }
        }
    }

    fn write_kept(&mut self, doc: &Document) -> Result<()> {
        if self.shard.is_none() {
            self.shard = Some(ShardWriter::create(
                self.layout.shard(&self.task, self.next_shard),
                self.config.output.zstd_level,
            )?);
        }
        if let Some(w) = self.shard.as_mut() {
            w.write(doc)?;
            self.stats.written.add(doc.text.len() as u64);
        }
        Ok(())
    }

    fn write_removed(&mut self, mut doc: Document, step: &str, reason: &str) -> Result<()> {
        if !self.config.output.write_removed {
            return Ok(());
        }
        if self.removed.is_none() {
            self.removed = Some(ShardWriter::create(
                self.layout.removed_shard(&self.task, self.next_shard),
                self.config.output.zstd_level,
            )?);
        }
        doc.meta
            .insert("removed".into(), json!({ "step": step, "reason": reason }));
        if let Some(w) = self.removed.as_mut() {
            w.write(&doc)?;
            self.stats.removed_written.add(doc.text.len() as u64);
        }
        Ok(())
    }

    /// The item at `pos` is fully accounted for; close the shard if it is full.
    fn advance(&mut self, pos: Position) -> Result<()> {
        self.next = Position {
            unit: pos.unit,
            item: pos.item + 1,
        };
        if self
            .shard
            .as_ref()
            .is_some_and(|w| w.bytes >= self.config.output.shard_bytes)
        {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Close the open shards and record where to resume. The shards are renamed into
    /// place before the checkpoint names them, so a kill in between redoes (and
    /// rewrites identically) at most the shard being closed.
    fn checkpoint(&mut self) -> Result<()> {
        let mut wrote = false;
        // The kept documents' shard counts among the run's shards; the removed ones' not.
        for (writer, counted) in [(self.shard.take(), 1), (self.removed.take(), 0)] {
            if let Some(w) = writer {
                let path = w.finish()?;
                self.shards.push(WrittenShard::of(&self.layout.dir, &path)?);
                self.stats.shards += counted;
                wrote = true;
            }
        }
        if wrote {
            self.next_shard += 1;
        }
        let hashes_path = self.layout.hashes(&self.task);
        self.hashes
            .flush()
            .and_then(|_| self.hashes.get_ref().sync_data())
            .map_err(|e| DataError::io(&hashes_path, e))?;
        let c = Checkpoint {
            version: STATE_VERSION,
            fingerprint: self.fingerprint.clone(),
            next: self.next,
            next_shard: self.next_shard,
            hashes: self.hash_count,
            stats: self.stats.clone(),
            shards: self.shards.clone(),
        };
        write_atomic(
            &self.layout.checkpoint(&self.task),
            &serde_json::to_vec(&c).unwrap_or_default(),
        )
    }
}

fn remove_stale_tmp(dir: &Path, task: &TaskSpec) -> Result<()> {
    let prefix = format!("part-{}-", task.name());
    for d in [dir.to_path_buf(), dir.join("removed")] {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && name.ends_with(".tmp") {
                std::fs::remove_file(e.path()).map_err(|err| DataError::io(e.path(), err))?;
            }
        }
    }
    Ok(())
}

/// Merge the stats of every finished task into `stats.json`.
pub fn write_merged_stats(dir: &Path) -> Result<serde_json::Value> {
    let layout = Layout {
        dir: dir.to_path_buf(),
    };
    let mut merged = RunStats::default();
    let mut done = 0usize;
    let mut total = 0usize;
    let tasks_dir = layout.tasks_dir();
    let mut markers: Vec<PathBuf> = std::fs::read_dir(&tasks_dir)
        .map_err(|e| DataError::io(&tasks_dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".done.json"))
        .collect();
    markers.sort();
    for m in markers {
        let d: TaskDone = read_json(&m)?;
        merged.merge(&d.stats);
        total = d.tasks;
        done += 1;
    }
    let value = json!({ "tasks": { "total": total, "done": done }, "stats": merged });
    write_atomic(
        &layout.stats(),
        &serde_json::to_vec_pretty(&value).unwrap_or_default(),
    )?;
    Ok(value)
}
