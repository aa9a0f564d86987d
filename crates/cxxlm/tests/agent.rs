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

/// A bug task as `tasks bugs` writes it, planted: `sum` reads one past the end of its
/// vector (libstdc++'s assertions stop it) until line 6 of main.cpp is fixed.
const BUGGY_MAIN: &str = "#include <cstdio>\n#include <vector>\n\nlong sum(const std::vector<int>& v) {\n    long total = 0;\n    for (std::size_t i = 0; i <= v.size(); ++i) {\n        total += v[i];\n    }\n    return total;\n}\n\nint main() {\n    std::vector<int> v = {1, 2, 3, 6};\n    std::printf(\"%ld\\n\", sum(v));\n}\n";
const FIXED_LINE: &str = "    for (std::size_t i = 0; i < v.size(); ++i) {\n";

fn planted_task(dir: &Path) -> PathBuf {
    let fixed = BUGGY_MAIN.replace("i <= v.size()", "i < v.size()");
    let start = BUGGY_MAIN.find("long sum").unwrap();
    let end = BUGGY_MAIN.find("\n}\n").unwrap() + 2;
    let task = serde_json::json!({
        "id": "planted/sum.cpp#off_by_one@6.0",
        "kind": "injected_bug",
        "input": format!("// TASK: Fix the bug\n{BUGGY_MAIN}"),
        "output": "/* REASONING: the loop reads one past the end */",
        "project": "planted",
        "split": "test",
        "provenance": {"source": "planted", "path": "sum.cpp", "change": "< to <="},
        "check": {
            "flags": ["-std=c++20", "-O0", "-g1", "-fsanitize=address,undefined",
                "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
                "-D_GLIBCXX_ASSERTIONS", "-w", "-Iinclude", "-pthread"],
            "support": {},
            "fixed": fixed,
            "buggy": BUGGY_MAIN,
            "span": [start, end],
            "oracle": {"stdout": "12\n", "exit_code": 0},
            "failure": {"kind": "assertion", "detector": "libstdc++", "signal": "SIGABRT",
                "location": "main.cpp:7", "line": 7, "function": "sum", "message": "__n < this->size()",
                "values": [], "stack": ["sum at main.cpp:7"], "exit_code": null,
                "expected": null, "printed": null},
            "verified_by": "standalone",
        },
    });
    let path = dir.join("tasks.jsonl");
    std::fs::write(&path, format!("{task}\n")).unwrap();
    path
}

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

/// `cxxlm agent eval` on the planted task with `extra` options: its output.
fn agent_eval(tasks: &Path, out: &Path, extra: &[&str]) -> Output {
    cxxlm()
        .args(["agent", "eval", "--tasks", tasks.to_str().unwrap()])
        .args(["-o", out.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn agent_eval_judges_a_replayed_fix_with_and_without_the_index_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let tasks = planted_task(tmp.path());
    let out = tmp.path().join("eval");
    // The same trajectory in both conditions: a turn without a call, the test, the
    // index at the loop (refused without it), the fix, the submission.
    let trajectory = vec![
        "The loop looks wrong.".to_string(),
        planted::call(r#"{"tool": "test"}"#),
        planted::call(r#"{"tool": "index", "path": "main.cpp", "line": 7}"#),
        planted::call(
            &serde_json::json!({"tool": "edit", "path": "main.cpp", "start": 6, "end": 6, "text": FIXED_LINE})
                .to_string(),
        ),
        planted::call(r#"{"tool": "submit"}"#),
    ];
    let server = scripted([trajectory.clone(), trajectory].concat());
    let run = agent_eval(&tasks, &out, &["--endpoint", &server.url, "--steps", "8"]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("with the index: 1/1 solved (100.0%), 1 compiled, 1 submitted; 5.0 steps a task, 4 tool calls, 1 unreadable"),
        "{stdout}"
    );
    assert!(stdout.contains("without the index: 1/1 solved"), "{stdout}");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    for condition in ["index", "no_index"] {
        let c = &summary["conditions"][condition];
        assert_eq!(c["attempted"], 1, "{summary:#}");
        assert_eq!(c["tool_calls"]["index"], 1, "{summary:#}");
        assert_eq!(c["tool_calls"]["edit"], 1, "{summary:#}");
        assert_eq!(c["call_parse_failures"], 1, "{summary:#}");
    }
    let results: Vec<Value> = records(&out.join("results.jsonl"));
    assert_eq!(results.len(), 2);
    // The index answers in one condition and is refused in the other.
    let index_step = |r: &Value| records(&out.join(r["transcript"].as_str().unwrap()))[2].clone();
    assert_eq!(
        index_step(&results[0])["ok"],
        true,
        "{}",
        index_step(&results[0])
    );
    assert!(
        index_step(&results[1])["result"]
            .as_str()
            .unwrap()
            .starts_with("error: the index is not available"),
        "{}",
        index_step(&results[1])
    );

    // Judged runs are not run again: a server with nothing to say is never asked.
    let silent = scripted(Vec::new());
    let again = agent_eval(&tasks, &out, &["--endpoint", &silent.url, "--steps", "8"]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(String::from_utf8_lossy(&again.stderr).contains("2 runs judged before were kept"));
    assert_eq!(String::from_utf8_lossy(&again.stdout), stdout);
    assert!(silent.requests.lock().unwrap().is_empty());
    // Other settings in the same folder are refused.
    let other = agent_eval(&tasks, &out, &["--endpoint", &silent.url, "--steps", "3"]);
    assert_eq!(other.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&other.stderr).contains("other settings"));
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

    // The same model on a bug task, judged: attempted in both conditions at once (two
    // conversations decoded together), not solved.
    let tasks = planted_task(&p.f.root);
    let out = p.f.root.join("eval");
    let run = agent_eval(
        &tasks,
        &out,
        &[&model[..], &budget, &["--jobs", "2"]].concat(),
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for line in [
        "with the index: 0/1 solved",
        "without the index: 0/1 solved",
    ] {
        assert!(stdout.contains(line), "{stdout}");
    }
    let results = self::records(&out.join("results.jsonl"));
    assert_eq!(results.len(), 2);
    for r in &results {
        assert!((1..=3).contains(&r["steps"].as_u64().unwrap()), "{r}");
        assert_eq!(r["solved"], false, "{r}");
    }
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
