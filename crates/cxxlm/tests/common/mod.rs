#![allow(dead_code)]

use serde_json::Value;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn cxxlm() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cxxlm"));
    cmd.env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("SLURM_ARRAY_TASK_COUNT");
    cmd
}

/// Run `cxxlm` and insist that it succeeds.
pub fn run_ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> Output {
    let out = cxxlm().args(args).output().expect("cxxlm runs");
    assert!(
        out.status.success(),
        "cxxlm {args:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run `cxxlm`, insist that it fails, and return what it said on stderr.
pub fn run_fails<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let out = cxxlm().args(args).output().expect("cxxlm runs");
    assert!(!out.status.success(), "cxxlm {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `cxxlm data run -i <input> -o <out> <extra...>`, which must succeed.
pub fn data_run(input: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "data",
        "run",
        "-i",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    run_ok(&args)
}

pub fn write(path: &Path, bytes: impl AsRef<[u8]>) {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(path, bytes).unwrap();
}

/// The JSON lines of every `part-*.jsonl.zst` in `dir`, in file-name order.
pub fn read_shards(dir: &Path) -> Vec<Value> {
    let mut docs = Vec::new();
    for path in shard_paths(dir) {
        let file = std::fs::File::open(&path).unwrap();
        let reader = std::io::BufReader::new(zstd::Decoder::new(file).unwrap());
        for line in reader.lines() {
            docs.push(serde_json::from_str(&line.unwrap()).unwrap());
        }
    }
    docs
}

pub fn shard_paths(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    paths.retain(|p| {
        let name = p.file_name().unwrap().to_string_lossy();
        name.starts_with("part-") && name.ends_with(".jsonl.zst")
    });
    paths.sort();
    paths
}

pub fn stats(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("stats.json")).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["stats"].clone()
}

pub fn step<'a>(stats: &'a Value, name: &str) -> &'a Value {
    stats["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {stats}"))
}

pub fn dropped(stats: &Value, step_name: &str, reason: &str) -> u64 {
    step(stats, step_name)["dropped"][reason]["docs"]
        .as_u64()
        .unwrap_or(0)
}

pub fn skipped(stats: &Value, reason: &str) -> u64 {
    stats["read"]["skipped"][reason]["docs"]
        .as_u64()
        .unwrap_or(0)
}

pub fn ids(docs: &[Value]) -> Vec<String> {
    docs.iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect()
}

/// A plausible, unique C++ source file.
pub fn cpp_source(n: usize) -> String {
    format!(
        "// Widget {n}\n#include <vector>\n\nnamespace demo{n} {{\n\nint sum_{n}(const std::vector<int>& values) {{\n    int total = {n};\n    for (int v : values) {{\n        total += v * {m};\n    }}\n    return total;\n}}\n\n}}  // namespace demo{n}\n",
        m = n % 7 + 1
    )
}

/// libstdc++'s `bits/` headers: real C++ on every machine with g++.
pub fn libstdcxx_bits() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/include/c++")
        .expect("/usr/include/c++ (install g++: scripts/setup.sh)")
        .flatten()
        .map(|e| e.path().join("bits"))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs.pop()
        .expect("a libstdc++ version under /usr/include/c++")
}

pub struct Fixture {
    pub _tmp: tempfile::TempDir,
    pub root: PathBuf,
    pub data: PathBuf,
    pub tokenizer: PathBuf,
}

/// Shards of libstdc++ (`shard_kb` per shard) and a tokenizer of `vocab` trained on them.
pub fn fixture(shard_kb: usize, vocab: usize) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let config = root.join("data.toml");
    write(
        &config,
        format!("[output]\nshard_bytes = {}\n", shard_kb * 1000),
    );
    let data = root.join("data");
    data_run(
        &libstdcxx_bits(),
        &data,
        &["--config", config.to_str().unwrap()],
    );
    let tokenizer = root.join("tokenizer.json");
    let vocab = vocab.to_string();
    run_ok(&[
        "tok",
        "train",
        "-i",
        data.to_str().unwrap(),
        "--vocab",
        &vocab,
        "-o",
        tokenizer.to_str().unwrap(),
    ]);
    Fixture {
        _tmp: tmp,
        root,
        data,
        tokenizer,
    }
}

/// `cxxlm pack` of a fixture's shards with its tokenizer into `out`.
pub fn pack_args<'a>(f: &'a Fixture, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "pack",
        "--tokenizer",
        f.tokenizer.to_str().unwrap(),
        "-i",
        f.data.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    args
}

/// Waits for `child`, killing it and failing the test if it runs past `seconds`.
pub fn wait_within(mut child: std::process::Child, seconds: u64, what: &str) -> Output {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what}: still running after {seconds}s; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Holds an exclusive lock on `path` as another writer would (released when dropped).
pub fn hold_lock(path: &Path) -> std::fs::File {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut file = std::fs::File::create(path).unwrap();
    // SAFETY: flock on a descriptor we own.
    assert_eq!(
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    write!(file, "{}", std::process::id()).unwrap();
    file
}

/// Sends `signal` to `child`.
pub fn send_signal(child: &std::process::Child, signal: i32) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, signal) };
}

/// A command line: `head` (a command and its paths), then each of `rest` in turn.
pub fn command_line(head: &[&str], rest: &[&[&str]]) -> Vec<String> {
    head.iter()
        .chain(rest.iter().flat_map(|r| r.iter()))
        .map(|s| s.to_string())
        .collect()
}

/// The records of a run's `metrics.jsonl`.
pub fn metrics_records(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Records without the figures of time.
pub fn timeless(records: Vec<Value>) -> Vec<Value> {
    const TIMES: [&str; 12] = [
        "tok_s",
        "mfu",
        "step_seconds",
        "forward_backward_seconds",
        "rollouts_s",
        "generation_seconds",
        "prefill_seconds",
        "decode_seconds",
        "sampled_logprob_seconds",
        "reward_wait_seconds",
        "reward_wait_share",
        "update_seconds",
    ];
    records
        .into_iter()
        .map(|mut r| {
            for k in TIMES {
                r.as_object_mut().unwrap().remove(k);
            }
            r
        })
        .collect()
}

/// A tiny model pretrained on the CPU for 30 steps on a fixture of libstdc++ (the
/// starting point of fine-tuning).
pub struct Pretrained {
    pub f: Fixture,
    pub run: PathBuf,
}

pub fn pretrained() -> Pretrained {
    let f = fixture(400, 2048);
    let pack = f.root.join("pack");
    run_ok(&pack_args(&f, &pack, &["--val-fraction", "0.1"]));
    let run = f.root.join("pre");
    pretrain_tiny(&pack, &run, 30);
    Pretrained { f, run }
}

/// The tiny model pretrained on the CPU on `pack` into `out` for `steps` steps.
pub fn pretrain_tiny(pack: &Path, out: &Path, steps: u64) {
    run_ok(&pretrain_tiny_args(pack, out, steps));
}

/// The command line of [`pretrain_tiny`].
pub fn pretrain_tiny_args(pack: &Path, out: &Path, steps: u64) -> Vec<String> {
    let steps = format!("train.steps={steps}");
    [
        "train",
        "pretrain",
        "--pack",
        pack.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--set",
        "model.preset=tiny",
        "--set",
        "train.device_batch=4",
        "--set",
        "train.total_batch_tokens=1024",
        "--set",
        &steps,
        "--set",
        "eval.every=0",
        "--set",
        "train.device=cpu",
    ]
    .map(String::from)
    .to_vec()
}
