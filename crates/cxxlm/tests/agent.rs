//! `cxxlm agent` on a small repository with a planted bug: driven by a real endpoint on
//! loopback replaying a trajectory, and by a tiny trained checkpoint in process.

mod common;
#[path = "../../cxxlm-agent/tests/common/mod.rs"]
mod planted;

use common::{cxxlm, pretrained};
use planted::{fixing_trajectory, planted_repo, scripted, STATS_CPP};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `cxxlm agent` with `model` (and budget) options on the planted bug's repository, made
/// in `root`: the repository, the transcript and the run's output.
fn agent_on_planted_bug(root: &Path, model: &[&str]) -> (PathBuf, PathBuf, Output) {
    let repo = root.join("repo");
    planted_repo(&repo);
    let transcript = root.join("t.jsonl");
    let out = cxxlm()
        .args(["agent", "--repo", repo.to_str().unwrap()])
        .args(["--task", "mean() is wrong: fix it"])
        .args(model)
        .args(["--transcript", transcript.to_str().unwrap()])
        .output()
        .unwrap();
    (repo, transcript, out)
}

#[test]
fn an_endpoint_replaying_a_fix_solves_the_planted_bug() {
    let tmp = tempfile::tempdir().unwrap();
    let server = scripted(fixing_trajectory());
    let (repo, transcript, out) = agent_on_planted_bug(tmp.path(), &["--endpoint", &server.url]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout
            .trim_end()
            .lines()
            .last()
            .unwrap()
            .starts_with("solved after 7 steps"),
        "{stdout}"
    );
    assert_eq!(records(&transcript).len(), 8);
    assert_ne!(
        std::fs::read_to_string(repo.join("src/stats.cpp")).unwrap(),
        STATS_CPP
    );
}

#[test]
fn a_tiny_checkpoint_attempts_the_task_within_its_budget() {
    let p = pretrained();
    let model = ["--checkpoint", p.run.to_str().unwrap()];
    let budget = ["--steps", "3", "--max-tokens", "24"];
    let (_, transcript, out) = agent_on_planted_bug(&p.f.root, &[&model[..], &budget].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // A model this small writes no valid call: it runs out of steps (or submits).
    assert!(
        matches!(out.status.code(), Some(2 | 3)),
        "{stdout}\n{stderr}"
    );
    let records = records(&transcript);
    let steps = records.len() - 1;
    assert!((1..=3).contains(&steps), "{records:#?}");
    for r in &records[..steps] {
        assert!(
            r["output"].is_string() && r["result"].is_string() && r["tokens"].is_u64(),
            "{r}"
        );
        assert!(r["call"].is_object() || r["call_error"].is_string(), "{r}");
    }
    let last = stdout.trim_end().lines().last().unwrap();
    assert_eq!(
        records[steps]["outcome"],
        if out.status.code() == Some(3) {
            "budget exhausted"
        } else {
            "not solved"
        }
    );
    assert!(
        last.starts_with(records[steps]["outcome"].as_str().unwrap()),
        "{last}"
    );
}

#[test]
fn a_missing_repository_or_model_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no-such-repo");
    let out = cxxlm()
        .args(["agent", "--repo", missing.to_str().unwrap(), "--task", "x"])
        .args(["--endpoint", "http://127.0.0.1:9/v1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no-such-repo"), "{stderr}");
    let out = cxxlm()
        .args(["agent", "--repo", ".", "--task", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--endpoint"));
}
