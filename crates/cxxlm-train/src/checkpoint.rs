//! Checkpoints: `step-NNNNNN/` with `model.safetensors`, `optimizer-rank<R>.safetensors`
//! (each rank's part of the optimizer state), `config.json` and `trainer.json` (step,
//! batch source's state, loss EMA, number of ranks, checksums of the other files and of itself).
//! Written under `step-NNNNNN.tmp/` and renamed by rank 0 once every rank has written
//! its part; the last K (by step) are kept.

use cxxlm_model::ModelConfig;
use cxxlm_tokenizer::layout::Layout;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

use crate::dist::Comm;
use crate::memory::gib;
use crate::{Result, TrainError};

const MODEL: &str = "model.safetensors";

fn optimizer_file(rank: usize) -> String {
    format!("optimizer-rank{rank}.safetensors")
}

/// Where rank `rank` > 0 keeps its batch source's state (rank 0's is `trainer.json`'s).
fn source_file(rank: usize) -> String {
    format!("source-rank{rank}.json")
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Steps finished.
    pub step: u64,
    pub total_steps: u64,
    pub tokens: u64,
    pub loss_ema: f64,
    /// Where the stage's batch source stands (for pretraining, the pack loader's state).
    pub loader: serde_json::Value,
    pub tokenizer_sha256: String,
    pub model: ModelConfig,
    /// Hyper-parameters that must not change on resume, as written in the config.
    pub run: serde_json::Value,
    /// Ranks of the run that wrote it (one optimizer file each).
    #[serde(default = "one")]
    pub world: usize,
    /// sha256 of every other file of the checkpoint.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// sha256 of this state's JSON with this field empty.
    #[serde(default)]
    pub checksum: String,
}

impl TrainerState {
    /// The checksum of everything but the checksum.
    fn own_checksum(&self) -> String {
        let unsigned = TrainerState {
            checksum: String::new(),
            ..self.clone()
        };
        hex::encode(Sha256::digest(serde_json::to_vec(&unsigned).expect("json")))
    }
}

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

fn write_tensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.detach().to_device(Device::Cpu).contiguous()))
        .collect();
    Tensor::write_safetensors(&cpu, path).map_err(|e| TrainError::Checkpoint {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Finished checkpoints, oldest first (by step).
fn checkpoint_dirs(root: &Path) -> Vec<PathBuf> {
    cxxlm_report::finished_checkpoints(root)
        .into_iter()
        .map(|(_, dir)| dir)
        .collect()
}

pub fn latest(root: &Path) -> Option<PathBuf> {
    checkpoint_dirs(root).pop()
}

/// Bytes a checkpoint takes: the model's fp32 weights and every rank's part of the
/// optimizer state (this rank's, `ranks` times).
pub fn bytes(model: &ModelConfig, optimizer: &[(String, Tensor)], ranks: usize) -> u64 {
    let state: u64 = optimizer
        .iter()
        .map(|(_, t)| t.numel() as u64 * t.kind().elt_size_in_bytes() as u64)
        .sum();
    model.params() as u64 * 4 + state * ranks as u64
}

/// Bytes an unprivileged writer may still use on the file system that holds `dir`.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: all-zero bytes are a valid `statvfs`, which the call fills in.
    let mut fs: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `fs` is a valid place to write.
    let ok = unsafe { libc::statvfs(path.as_ptr(), &mut fs) } == 0;
    ok.then(|| fs.f_bavail as u64 * fs.f_frsize as u64)
}

/// Whether the checkpoints of `each` bytes of the run writing to `out` fit in the `free`
/// bytes there, counting those it already holds: an error when the next one does not (the
/// run could never save its work), a warning when the `keep` kept and the one being
/// written would not.
pub fn check_room(out: &Path, each: u64, free: u64, keep: usize) -> Result<Option<String>> {
    let held = checkpoint_dirs(&out.join("checkpoints")).len();
    if free < each {
        return Err(TrainError::Config(format!(
            "a checkpoint of this run takes {:.2} GiB and {} has {:.2} GiB free: make room or choose another out directory",
            gib(each),
            out.display(),
            gib(free)
        )));
    }
    let more = (keep.max(1) + 1).saturating_sub(held).max(1) as u64;
    Ok((free < each * more).then(|| {
        format!(
            "{} has {:.2} GiB free; keeping {} checkpoints of {:.2} GiB (checkpoint.keep) takes {:.2} GiB more while the next is written",
            out.display(),
            gib(free),
            keep.max(1),
            gib(each),
            gib(each * more)
        )
    }))
}

/// Writes a checkpoint of `state.step` and removes all but the newest `keep`. Every rank
/// calls it, with its part of the optimizer state and its source's state (`state.loader`);
/// rank 0 writes the rest.
pub fn save(
    root: &Path,
    mut state: TrainerState,
    model: &[(String, Tensor)],
    optimizer: &[(String, Tensor)],
    keep: usize,
    comm: &Comm,
) -> Result<PathBuf> {
    let dir = root.join(format!("step-{:06}", state.step));
    let tmp = root.join(format!("step-{:06}.tmp", state.step));
    let io = |p: &Path, e| TrainError::io(p, e);
    let synced = |p: &Path| {
        std::fs::File::open(p)
            .and_then(|f| f.sync_all())
            .map_err(|e| io(p, e))
    };
    if comm.rank() == 0 {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    comm.barrier()?;
    // A write that fails (a full disk) leaves nothing half-written behind to fill it.
    let unwritten = |e: TrainError| {
        let _ = std::fs::remove_dir_all(&tmp);
        e
    };
    let mine = tmp.join(optimizer_file(comm.rank()));
    write_tensors(&mine, optimizer)
        .and_then(|_| synced(&mine))
        .map_err(unwritten)?;
    if comm.rank() > 0 {
        let source = tmp.join(source_file(comm.rank()));
        std::fs::write(&source, serde_json::to_vec(&state.loader).expect("json"))
            .map_err(|e| io(&source, e))
            .and_then(|_| synced(&source))
            .map_err(unwritten)?;
    }
    // A rank that could not write its part fails this barrier on the others: none keeps the
    // partial checkpoint.
    comm.barrier().map_err(unwritten)?;
    if comm.rank() == 0 {
        let mut write = || -> Result<()> {
            write_tensors(&tmp.join(MODEL), model)?;
            let config = tmp.join("config.json");
            std::fs::write(
                &config,
                serde_json::to_vec_pretty(&state.model).expect("json"),
            )
            .map_err(|e| io(&config, e))?;
            state.world = comm.size();
            let files: Vec<String> = [MODEL.to_string(), "config.json".into()]
                .into_iter()
                .chain((0..comm.size()).map(optimizer_file))
                .chain((1..comm.size()).map(source_file))
                .collect();
            for name in &files {
                state
                    .files
                    .insert(name.clone(), sha256_file(&tmp.join(name))?);
            }
            state.checksum = state.own_checksum();
            let trainer = tmp.join("trainer.json");
            std::fs::write(&trainer, serde_json::to_vec_pretty(&state).expect("json"))
                .map_err(|e| io(&trainer, e))?;
            for name in [MODEL, "config.json", "trainer.json"] {
                synced(&tmp.join(name))?;
            }
            Ok(())
        };
        write().map_err(unwritten)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| io(&dir, e))?;
        }
        std::fs::rename(&tmp, &dir).map_err(|e| io(&dir, e))?;
        let all = checkpoint_dirs(root);
        for old in &all[..all.len().saturating_sub(keep.max(1))] {
            std::fs::remove_dir_all(old).map_err(|e| io(old, e))?;
        }
    }
    comm.barrier()?;
    Ok(dir)
}

pub struct Loaded {
    pub state: TrainerState,
    pub model: Vec<(String, Tensor)>,
    /// Every rank's part of the optimizer state, in rank order.
    pub optimizer: Vec<Vec<(String, Tensor)>>,
    /// Every rank's batch source state, in rank order, where the checkpoint holds it
    /// (rank 0's is `state.loader`).
    pub sources: Vec<Option<serde_json::Value>>,
}

/// Reads a checkpoint, verifying every file against the checksums in `trainer.json`.
pub fn load(dir: &Path) -> Result<Loaded> {
    read(dir, true)
}

/// The tokenizer a stage names in its `key` setting (`sft.tokenizer`, ...), refused unless
/// the model of the checkpoint `init_dir` (its trainer state `state`) was trained with it.
pub fn trained_tokenizer(
    path: Option<&Path>,
    key: &str,
    init_dir: &Path,
    state: &TrainerState,
) -> Result<cxxlm_tokenizer::Bpe> {
    let path = path.ok_or_else(|| {
        TrainError::Config(format!("{key}: the tokenizer the model was trained with"))
    })?;
    let bpe = cxxlm_tokenizer::load(path).map_err(|e| TrainError::Config(e.to_string()))?;
    if cxxlm_pack::tokenizer_sha256(&bpe) != state.tokenizer_sha256 {
        return Err(TrainError::Config(format!(
            "{} is not the tokenizer {} was trained with",
            path.display(),
            init_dir.display()
        )));
    }
    Ok(bpe)
}

/// A checkpoint's `trainer.json`, checked against its own checksum.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let trainer = dir.join("trainer.json");
    let bad = |message: String| TrainError::Checkpoint {
        path: trainer.clone(),
        message,
    };
    let bytes = std::fs::read(&trainer).map_err(|e| TrainError::io(&trainer, e))?;
    let state: TrainerState =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("unreadable: {e}")))?;
    if state.checksum != state.own_checksum() {
        return Err(bad(if state.checksum.is_empty() {
            "carries no checksum of its own (an older cxxlm wrote it): retrain, or resume from a newer checkpoint".into()
        } else {
            "checksum mismatch: it was edited or is corrupt; resume from an older checkpoint (move this one away)".into()
        }));
    }
    if state.step > state.total_steps {
        return Err(bad(format!(
            "step {} is beyond the run's {} steps",
            state.step, state.total_steps
        )));
    }
    Ok(state)
}

/// The checkpoint; with `optimizer`, every rank's optimizer state as well (resuming needs
/// it, using the model does not). The files read are checked against their checksums.
fn read(dir: &Path, optimizer: bool) -> Result<Loaded> {
    let bad = |path: &Path, message: String| TrainError::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    let trainer = dir.join("trainer.json");
    let state = read_state(dir)?;
    let optimizer_files: Vec<String> = match optimizer {
        true => (0..state.world).map(optimizer_file).collect(),
        false => Vec::new(),
    };
    // Checkpoints of several ranks written before sources were kept per rank lack them.
    let source_files: Vec<Option<String>> = match optimizer {
        true => (1..state.world)
            .map(|r| Some(source_file(r)).filter(|name| state.files.contains_key(name)))
            .collect(),
        false => Vec::new(),
    };
    for name in optimizer_files
        .iter()
        .chain(source_files.iter().flatten())
        .map(String::as_str)
        .chain([MODEL, "config.json"])
    {
        let path = dir.join(name);
        let expected = state
            .files
            .get(name)
            .ok_or_else(|| bad(&trainer, format!("no checksum for {name}")))?;
        if &sha256_file(&path)? != expected {
            return Err(bad(
                &path,
                "checksum mismatch: the file is corrupt; resume from an older checkpoint (move this one away)".into(),
            ));
        }
    }
    let read = |name: &str| {
        let path = dir.join(name);
        Tensor::read_safetensors(&path).map_err(|e| bad(&path, e.to_string()))
    };
    let read_source = |name: &String| {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).map_err(|e| TrainError::io(&path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| bad(&path, e.to_string()))
    };
    let others: Vec<Option<serde_json::Value>> = source_files
        .iter()
        .map(|name| name.as_ref().map(read_source).transpose())
        .collect::<Result<_>>()?;
    Ok(Loaded {
        model: read(MODEL)?,
        optimizer: optimizer_files
            .iter()
            .map(|name| read(name))
            .collect::<Result<_>>()?,
        sources: std::iter::once(Some(state.loader.clone()))
            .chain(others)
            .collect(),
        state,
    })
}

/// The checkpoint `path` names: itself, or a run directory's newest.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join("trainer.json").exists() {
        return Ok(path.to_path_buf());
    }
    latest(&path.join("checkpoints"))
        .or_else(|| latest(path))
        .ok_or_else(|| TrainError::Checkpoint {
            path: path.to_path_buf(),
            message: "holds no checkpoint (step-NNNNNN/trainer.json)".into(),
        })
}

/// How the text of the model at `checkpoint` was laid out, and where that was read: its
/// run's pack, or for a fine-tuned model (SFT, RL, embeddings) the model it started from.
/// When none can be read: stripped, the data stage's default, and why.
pub fn layout(checkpoint: &Path) -> (Layout, String) {
    let (strip_indentation, said) = match trained_layout(checkpoint) {
        Ok((strip, from)) => (
            strip,
            format!(
                "indentation: {} (as in the training text, from {from})",
                if strip { "stripped" } else { "kept" }
            ),
        ),
        Err(e) => (
            true,
            format!("indentation: stripped (the data pipeline's default; the training text's layout could not be read: {e})"),
        ),
    };
    (Layout { strip_indentation }, said)
}

fn trained_layout(checkpoint: &Path) -> Result<(bool, String)> {
    let pack = trained_pack(checkpoint)?;
    Ok(cxxlm_pack::Manifest::load(&pack)?.indentation_in(&pack)?)
}

/// Whether the model at `checkpoint` learned fill-in-the-middle from cuts at line starts
/// only (`pack --fim-line-aligned`: every middle whole lines); false when its pack cannot
/// be read.
pub fn fim_line_aligned(checkpoint: &Path) -> bool {
    trained_pack(checkpoint)
        .and_then(|pack| Ok(cxxlm_pack::Manifest::load(&pack)?))
        .is_ok_and(|m| m.settings.fim.line_aligned)
}

/// The pack the model at `checkpoint` was pretrained on: its run's, or for a fine-tuned
/// model (SFT, RL, embeddings) that of the model it started from.
fn trained_pack(checkpoint: &Path) -> Result<PathBuf> {
    let config_error = TrainError::Config;
    let run = checkpoint
        .ancestors()
        .find(|a| a.join("config.toml").exists())
        .ok_or_else(|| config_error("no run config.toml above the checkpoint".into()))?;
    let file = run.join("config.toml");
    let text = std::fs::read_to_string(&file).map_err(|e| TrainError::io(&file, e))?;
    let table: toml::Table = toml::from_str(&text)
        .map_err(|e| config_error(format!("parsing {}: {e}", file.display())))?;
    if ["sft", "rl", "embed"]
        .iter()
        .any(|s| table.contains_key(*s))
    {
        let init = table
            .get("init")
            .and_then(|i| i.as_str())
            .ok_or_else(|| config_error(format!("{} names no init model", file.display())))?;
        if Path::new(init).starts_with(run) {
            return Err(config_error(format!(
                "{} starts from itself",
                file.display()
            )));
        }
        return trained_pack(Path::new(init));
    }
    Ok(crate::TrainConfig::from_table(table)?.data.pack)
}

/// A checkpoint's weights and state, without its optimizer's, checked against their
/// checksums.
pub fn load_weights(dir: &Path) -> Result<Loaded> {
    read(dir, false)
}

/// A trained model from a checkpoint directory, or from a run directory's newest
/// checkpoint.
pub fn load_model(path: &Path, device: Device) -> Result<(cxxlm_model::Gpt, TrainerState)> {
    let dir = resolve(path)?;
    let loaded = read(&dir, false)?;
    let mut model = cxxlm_model::Gpt::new(loaded.state.model.clone(), device, 0)?;
    model.load(&loaded.model)?;
    Ok((model, loaded.state))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn state(step: u64) -> TrainerState {
        TrainerState {
            step,
            total_steps: 2_000_000,
            tokens: 0,
            loss_ema: 0.25,
            loader: serde_json::json!({"epoch": 0, "next": 0, "buffer": [3, 1]}),
            tokenizer_sha256: String::new(),
            model: cxxlm_model::ModelConfig::preset("tiny", 512).unwrap(),
            run: serde_json::json!({"steps": 2_000_000, "optim": {"betas": [0.8, 0.95]}}),
            world: 1,
            files: BTreeMap::new(),
            checksum: String::new(),
        }
    }

    fn save_at(root: &Path, step: u64, keep: usize) -> PathBuf {
        let w = vec![(
            "w".to_string(),
            Tensor::ones([2], (Kind::Float, Device::Cpu)),
        )];
        save(root, state(step), &w, &w, keep, &Comm::single()).unwrap()
    }

    #[test]
    fn past_a_million_steps_the_newest_checkpoint_is_kept_and_resumed() {
        let root = tempfile::tempdir().unwrap();
        save_at(root.path(), 999_999, 1);
        let newest = save_at(root.path(), 1_000_000, 1);
        assert_eq!(latest(root.path()), Some(newest.clone()));
        assert_eq!(checkpoint_dirs(root.path()), std::slice::from_ref(&newest));
        assert_eq!(load(&newest).unwrap().state.step, 1_000_000);
    }

    #[test]
    fn an_edited_trainer_json_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = save_at(root.path(), 7, 3);
        let trainer = dir.join("trainer.json");
        let text = std::fs::read_to_string(&trainer).unwrap();
        std::fs::write(&trainer, text.replace("\"step\": 7", "\"step\": 3")).unwrap();
        let e = read_state(&dir).unwrap_err().to_string();
        assert!(e.contains("trainer.json: checksum mismatch"), "{e}");

        // Even one whose checksum was recomputed cannot claim a step beyond the run.
        let mut beyond = state(2_000_001);
        beyond.checksum = beyond.own_checksum();
        std::fs::write(&trainer, serde_json::to_vec_pretty(&beyond).unwrap()).unwrap();
        let e = read_state(&dir).unwrap_err().to_string();
        assert!(e.contains("beyond the run's 2000000 steps"), "{e}");
    }

    #[test]
    fn a_checkpoint_that_cannot_be_written_leaves_nothing_behind() {
        let root = tempfile::tempdir().unwrap();
        let kept = save_at(root.path(), 5, 3);
        // safetensors holds no complex numbers: the model's file cannot be written.
        let complex = vec![(
            "w".to_string(),
            Tensor::ones([2], (Kind::ComplexFloat, Device::Cpu)),
        )];
        let real = vec![(
            "w".to_string(),
            Tensor::ones([2], (Kind::Float, Device::Cpu)),
        )];
        save(root.path(), state(6), &complex, &real, 3, &Comm::single()).unwrap_err();
        assert!(!root.path().join("step-000006.tmp").exists());
        assert_eq!(checkpoint_dirs(root.path()), vec![kept]);
    }

    #[test]
    fn a_run_without_room_for_its_checkpoints_is_refused_or_warned() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        let gib = 1u64 << 30;
        let e = check_room(out, 30 * gib, 12 * gib, 3).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("takes 30.00 GiB") && e.contains("12.00 GiB free"),
            "{e}"
        );
        // Three kept and a fourth being written.
        let w = check_room(out, 30 * gib, 100 * gib, 3).unwrap().unwrap();
        assert!(w.contains("120.00 GiB more"), "{w}");
        assert_eq!(check_room(out, 30 * gib, 120 * gib, 3).unwrap(), None);
        // A resumed run holding two needs room for two more.
        save_at(&out.join("checkpoints"), 1, 3);
        save_at(&out.join("checkpoints"), 2, 3);
        assert_eq!(check_room(out, 30 * gib, 60 * gib, 3).unwrap(), None);

        assert!(free_bytes(dir.path()).unwrap() > 0);
        assert_eq!(free_bytes(&dir.path().join("missing")), None);
        let model = ModelConfig::preset("tiny", 512).unwrap();
        let state = vec![(
            "m".to_string(),
            Tensor::ones([10], (Kind::BFloat16, Device::Cpu)),
        )];
        assert_eq!(bytes(&model, &state, 4), model.params() as u64 * 4 + 4 * 20);
    }
}
