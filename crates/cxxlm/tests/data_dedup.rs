//! `cxxlm data dedup` end to end over the shards of `cxxlm data run`.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A realistic C++ file of about 60 lines; `name` changes its identifiers.
fn module(name: &str, comment: &str) -> String {
    let mut s = format!("// {comment}\n#include <map>\n#include <string>\n\nnamespace app {{\n\n");
    for i in 0..12 {
        s.push_str(&format!(
            "int {name}_step{i}(std::map<std::string, int>& table, const std::string& key) {{\n    auto it = table.find(key);\n    if (it == table.end()) return {i};\n    return it->second * {i} + {name}_base;\n}}\n\n"
        ));
    }
    s.push_str("}  // namespace app\n");
    s
}

fn unrelated(seed: u64) -> String {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut s = String::new();
    for _ in 0..80 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(&format!(
            "double f{:x}(double v{:x}) {{ return v{:x} * {}; }}\n",
            x >> 40,
            x >> 48,
            x >> 48,
            x % 97
        ));
    }
    s
}

struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    shards: PathBuf,
}

fn setup(files: &[(&str, String)], shard_bytes: Option<u64>) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    for (name, text) in files {
        write(&root.join("corpus").join(name), text);
    }
    let shards = root.join("shards");
    let mut extra = vec!["--keep-indentation"];
    let config = root.join("data.toml");
    if let Some(bytes) = shard_bytes {
        write(&config, format!("[output]\nshard_bytes = {bytes}\n"));
        extra.extend(["--config", config.to_str().unwrap()]);
    }
    data_run(&root.join("corpus"), &shards, &extra);
    Setup {
        _tmp: tmp,
        root,
        shards,
    }
}

/// `cxxlm data dedup -i <input> -o <out> --write-removed <extra...>`.
fn dedup_args<'a>(input: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "data",
        "dedup",
        "-i",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--write-removed",
    ];
    args.extend(extra);
    args
}

fn dedup(input: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    run_ok(&dedup_args(input, out, extra))
}

/// A dedup run that must fail; returns its stderr.
fn dedup_fails(input: &Path, out: &Path, extra: &[&str]) -> String {
    run_fails(&dedup_args(input, out, extra))
}

fn file_id(setup: &Setup, name: &str) -> String {
    setup.root.join("corpus").join(name).display().to_string()
}

#[test]
fn near_duplicates_cluster_and_unrelated_files_do_not() {
    let base = module("parse", "Parser helpers.");
    let s = setup(
        &[
            ("a/base.cpp", base.clone()),
            (
                "b/renamed.cpp",
                base.replacen("parse_step3", "read_step3", 2),
            ),
            (
                "c/comment.cpp",
                base.replace("Parser helpers.", "Helpers for the parser, v2."),
            ),
            ("d/other.cpp", unrelated(1)),
            ("e/another.cpp", unrelated(2)),
            ("f/tiny.h", "int x;\n".into()),
            ("g/same_shape.cpp", module("render", "Renderer helpers.")),
        ],
        None,
    );
    let out = s.root.join("dedup");
    dedup(&s.shards, &out, &["--verify"]);
    let mut kept = ids(&read_shards(&out));
    kept.sort();
    let mut expected = vec![
        file_id(&s, "a/base.cpp"),
        file_id(&s, "d/other.cpp"),
        file_id(&s, "e/another.cpp"),
        file_id(&s, "f/tiny.h"),
        file_id(&s, "g/same_shape.cpp"),
    ];
    expected.sort();
    assert_eq!(kept, expected);
    let removed = read_shards(&out.join("removed"));
    assert_eq!(removed.len(), 2);
    for d in &removed {
        assert_eq!(d["meta"]["removed"]["reason"], "near_duplicate");
        assert!(
            d["meta"]["removed"]["survivor"]
                .as_str()
                .unwrap()
                .ends_with(":1"),
            "{d}"
        );
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("near-dedup-report.json")).unwrap())
            .unwrap();
    assert_eq!(report["clusters"], 1);
    assert_eq!(report["removed"]["documents"], 2);
    assert_eq!(
        report["largest_clusters"][0]["survivor"],
        file_id(&s, "a/base.cpp")
    );
}

#[test]
fn the_stack_v2_survivor_prefers_permissive_licenses() {
    let base = module("parse", "Parser helpers.");
    let s = setup(
        &[
            (
                "a/gpl.cpp",
                base.replace(
                    "// Parser helpers.",
                    "// SPDX-License-Identifier: GPL-2.0-only",
                ),
            ),
            (
                "b/mit.cpp",
                base.replace("// Parser helpers.", "// SPDX-License-Identifier: MIT"),
            ),
        ],
        None,
    );
    let first = s.root.join("first");
    dedup(&s.shards, &first, &[]);
    assert_eq!(ids(&read_shards(&first)), [file_id(&s, "a/gpl.cpp")]);
    let ranked = s.root.join("ranked");
    dedup(&s.shards, &ranked, &["--survivor", "stack-v2"]);
    assert_eq!(ids(&read_shards(&ranked)), [file_id(&s, "b/mit.cpp")]);
}

fn corpus_with_clusters() -> Vec<(String, String)> {
    let mut files = Vec::new();
    for c in 0..30 {
        let base = module(&format!("m{c}"), "Module.");
        files.push((format!("x{c}/a.cpp"), base.clone()));
        files.push((
            format!("y{c}/b.cpp"),
            base.replacen(&format!("m{c}_step1"), "changed_step1", 2),
        ));
        files.push((format!("z{c}/c.cpp"), unrelated(c)));
    }
    files
}

fn outputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut all = Vec::new();
    for sub in [dir.to_path_buf(), dir.join("removed")] {
        for p in shard_paths(&sub) {
            all.push((
                p.strip_prefix(dir).unwrap().display().to_string(),
                std::fs::read(&p).unwrap(),
            ));
        }
    }
    all.push((
        "removed.bin".into(),
        std::fs::read(dir.join("near-dedup/clusters/removed.bin")).unwrap(),
    ));
    all
}

#[test]
fn results_do_not_depend_on_the_number_of_tasks() {
    let files = corpus_with_clusters();
    let refs: Vec<(&str, String)> = files.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let s = setup(&refs, Some(20_000));
    assert!(shard_paths(&s.shards).len() > 3);
    let one = s.root.join("one");
    dedup(&s.shards, &one, &[]);
    let three = s.root.join("three");
    for stage in ["signatures", "buckets", "clusters", "filter"] {
        for i in ["0", "1", "2"] {
            dedup(
                &s.shards,
                &three,
                &["--stage", stage, "--tasks", "3", "--task-index", i],
            );
        }
    }
    assert_eq!(outputs(&one), outputs(&three));
    let err = dedup_fails(
        &s.shards,
        &three,
        &["--stage", "filter", "--tasks", "2", "--task-index", "1"],
    );
    assert!(err.contains("ran as 3 tasks"), "{err}");
    assert_eq!(read_shards(&one.join("removed")).len(), 30);
}

#[test]
fn corrupt_or_truncated_intermediate_files_stop_the_stage_with_their_name() {
    let files = corpus_with_clusters();
    let refs: Vec<(&str, String)> = files.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let s = setup(&refs, None);
    let out = s.root.join("out");
    dedup(&s.shards, &out, &["--stage", "signatures"]);
    dedup(&s.shards, &out, &["--stage", "buckets"]);
    let band = out.join("near-dedup/buckets/band-003.bin");
    let mut bytes = std::fs::read(&band).unwrap();
    let n = bytes.len();
    bytes[n - 12] ^= 0x40;
    std::fs::write(&band, &bytes).unwrap();
    let err = dedup_fails(&s.shards, &out, &["--stage", "clusters"]);
    assert!(
        err.contains("band-003.bin") && err.contains("checksum"),
        "{err}"
    );

    let sig = out.join("near-dedup/signatures/task-00000/band-007.bin");
    let bytes = std::fs::read(&sig).unwrap();
    std::fs::write(&sig, &bytes[..bytes.len() - 9]).unwrap();
    std::fs::remove_file(out.join("near-dedup/buckets/task-00000.done.json")).unwrap();
    let err = dedup_fails(&s.shards, &out, &["--stage", "buckets"]);
    assert!(
        err.contains("band-007.bin") && err.contains("truncated"),
        "{err}"
    );

    // Later stages refuse to run before earlier ones.
    let fresh = s.root.join("fresh");
    let err = dedup_fails(&s.shards, &fresh, &["--stage", "filter"]);
    assert!(err.contains("stage clusters has not finished"), "{err}");
}

#[test]
fn killing_and_rerunning_gives_the_uninterrupted_output() {
    let files = corpus_with_clusters();
    let refs: Vec<(&str, String)> = files.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let s = setup(&refs, Some(20_000));
    let whole = s.root.join("whole");
    dedup(&s.shards, &whole, &[]);
    // Kill at several points of the run; each rerun must end where the whole run did.
    for (k, marker) in [
        "signatures/task-00000.done.json",
        "buckets/task-00000.done.json",
        "clusters/task-00000.done.json",
    ]
    .iter()
    .enumerate()
    {
        let out = s.root.join(format!("killed{k}"));
        let mut child = cxxlm()
            .args([
                "data",
                "dedup",
                "-i",
                s.shards.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--write-removed",
                "--tasks",
                "4",
            ])
            .spawn()
            .unwrap();
        let started = Instant::now();
        while !out.join("near-dedup").join(marker).exists() && child.try_wait().unwrap().is_none() {
            assert!(started.elapsed() < Duration::from_secs(60));
            std::thread::sleep(Duration::from_micros(200));
        }
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        child.wait().unwrap();
        dedup(&s.shards, &out, &["--tasks", "4"]);
        assert_eq!(outputs(&out), outputs(&whole), "killed after {marker}");
    }
}

#[test]
fn overlapping_directories_and_a_second_writer_are_refused() {
    let files = corpus_with_clusters();
    let refs: Vec<(&str, String)> = files.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let s = setup(&refs, None);
    let before = read_shards(&s.shards);
    for out in [s.shards.clone(), s.shards.join("dedup")] {
        let err = dedup_fails(&s.shards, &out, &[]);
        assert!(err.contains("would read its own output"), "{err}");
    }
    assert_eq!(read_shards(&s.shards), before, "the input is untouched");
    assert!(!s.shards.join("dedup").exists());

    let out = s.root.join("out");
    let held = hold_lock(&out.join("near-dedup/signatures/task-00000.lock"));
    let err = dedup_fails(&s.shards, &out, &[]);
    assert!(
        err.contains("is being written by another process")
            && err.contains(&format!("process {}", std::process::id())),
        "{err}"
    );
    drop(held);
    dedup(&s.shards, &out, &[]);
}
