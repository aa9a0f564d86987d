//! `cxxlm tasks` and `cxxlm eval bugfix` end to end: real programs built and run with
//! sanitizers in the sandbox, a killed run resumed, tasks re-verified on their own, the
//! harness checked on its own benchmark, and benchmark problems planted in shards and
//! tasks removed.

mod common;

use common::{cxxlm, read_shards, run_ok, write};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const ALPHA: &str = r#"#include <cstdio>
#include <cassert>
int sum(const int* a, int n) {
    if (a == nullptr) return 0;
    int s = 0;
    for (int i = 0; i < n; ++i) {
        s += a[i];
    }
    return s;
}
int kind(int x) {
    int r = 0;
    switch (x) {
    case 1:
        r = 10;
        break;
    default:
        r = 20;
    }
    return r;
}
int main() {
    int* p = new int[3]{1, 2, 3};
    int t = sum(p, 3);
    delete[] p;
    assert(t == 6);
    printf("%d %d %d\n", t, kind(1), kind(2));
    return 0;
}
"#;

const BETA: &str = r#"#include <vector>
#include <string>
#include <iostream>
#include "util.h"
struct Stack {
    std::vector<int> items;
    void push(int v) { items.push_back(v); }
    int pop() {
        if (items.empty()) return -1;
        int v = items.back();
        items.pop_back();
        return v;
    }
};
int clamp_index(int i, int n) {
    if (i < 0) return 0;
    if (i >= n) return n - 1;
    return i;
}
int main() {
    Stack s;
    for (int i = 0; i < 5; ++i) {
        s.push(i * i);
    }
    std::vector<int> v = {4, 8, 15, 16, 23, 42};
    int total = 0;
    for (int i = 0; i < 6; i++) {
        total += v[i];
    }
    int last = s.pop();
    std::cout << total << " " << last << " " << clamp_index(9, 6) << " " << twice(3) << "\n";
    return total == 108 && last == 16 ? 0 : 1;
}
"#;

const UTIL: &str = "#pragma once\ninline int twice(int x) { return 2 * x; }\n";

fn fixture(dir: &Path) -> PathBuf {
    let progs = dir.join("progs");
    write(&progs.join("alpha/sum.cpp"), ALPHA);
    write(&progs.join("beta/stack.cpp"), BETA);
    write(&progs.join("beta/util.h"), UTIL);
    progs
}

fn bugs_args<'a>(progs: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "tasks",
        "bugs",
        "-i",
        progs,
        "-o",
        out,
        "--chunk",
        "1",
        "--test-projects",
        "progs/beta",
        "--threads",
        "2",
    ]
}

fn parts(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".jsonl.zst"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                zstd::decode_all(&std::fs::read(&p).unwrap()[..]).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

fn tasks_in(dir: &Path) -> Vec<Value> {
    parts(dir)
        .iter()
        .flat_map(|(_, b)| {
            String::from_utf8(b.clone())
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn injected_bugs_are_verified_resumed_and_judged() {
    let dir = tempfile::tempdir().unwrap();
    let progs = fixture(dir.path());
    let progs_s = progs.to_str().unwrap();
    let out1 = dir.path().join("out1");
    let out = run_ok(&bugs_args(progs_s, out1.to_str().unwrap()));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("2 candidates -> 2 programs"), "{printed}");
    let tasks = tasks_in(&out1);
    let operators: std::collections::BTreeSet<&str> = tasks
        .iter()
        .map(|t| t["provenance"]["operator"].as_str().unwrap())
        .collect();
    assert!(
        tasks.len() >= 8 && operators.len() >= 5,
        "{} tasks, {operators:?}",
        tasks.len()
    );
    for t in &tasks {
        let input = t["input"].as_str().unwrap();
        assert!(input.starts_with("// TASK: "), "{input}");
        assert!(input.contains("\nstruct DebugState {\n"), "{input}");
        assert!(t["output"].as_str().unwrap().starts_with("/* REASONING:\n"));
        let project = t["project"].as_str().unwrap();
        let split = if project == "progs/beta" {
            "test"
        } else {
            "train"
        };
        assert_eq!(t["split"], split, "{project}");
    }
    // The use-after-free is reported by AddressSanitizer, with the free's location.
    let uaf = tasks
        .iter()
        .find(|t| t["provenance"]["operator"] == "use_after_free")
        .expect("a use-after-free task");
    assert_eq!(uaf["check"]["failure"]["kind"], "heap-use-after-free");
    assert!(
        uaf["input"].as_str().unwrap().contains("freed_at"),
        "{}",
        uaf["input"]
    );

    // A run killed part-way, started again, ends with the same files.
    let out2 = dir.path().join("out2");
    let mut child = cxxlm()
        .args(bugs_args(progs_s, out2.to_str().unwrap()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first = out2.join("stats/part-0000-00000.json");
    let started = Instant::now();
    while !first.exists() && started.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // If the run got to its end before the kill, make it redo its last part.
    let last = out2.join("stats/part-0000-00001.json");
    if last.exists() {
        std::fs::remove_file(&last).unwrap();
        std::fs::write(out2.join("part-0000-00001.jsonl.zst.tmp"), b"half").unwrap();
    }
    run_ok(&bugs_args(progs_s, out2.to_str().unwrap()));
    assert_eq!(parts(&out1), parts(&out2));
    // Other settings in the same directory are refused.
    let mut other = bugs_args(progs_s, out2.to_str().unwrap());
    other.extend(["--per-operator", "1"]);
    let e = common::run_fails(&other);
    assert!(e.contains("other settings"), "{e}");

    // Both versions of sampled tasks, built on their own, behave as recorded.
    let verify = |tasks: &Path| {
        let args = [
            "tasks",
            "verify",
            "-i",
            tasks.to_str().unwrap(),
            "--sample",
            "4",
        ];
        String::from_utf8_lossy(&run_ok(&args).stdout).into_owned()
    };
    let printed = verify(&out1);
    assert!(
        printed.contains("fix matches the oracle 4/4, bug fails 4/4")
            && printed.contains("output as an answer passes 4/4"),
        "{printed}"
    );
    // A task whose output (what a model learns) is wrong is named.
    let spoiled = dir.path().join("spoiled");
    let lines: String = read_shards(&out1)
        .into_iter()
        .map(|mut task| {
            task["output"] = "garbage".into();
            format!("{task}\n")
        })
        .collect();
    write(
        &spoiled.join("part-0000-00000.jsonl.zst"),
        zstd::encode_all(lines.as_bytes(), 3).unwrap(),
    );
    std::fs::copy(out1.join("settings.json"), spoiled.join("settings.json")).unwrap();
    let printed = verify(&spoiled);
    assert!(
        printed.contains("output as an answer passes 0/4"),
        "{printed}"
    );

    // The harness on its own benchmark: the fix passes every task, the bug none; the
    // two reports compared task by task.
    let report = |answers: &str| dir.path().join(format!("bugfix-{answers}.json"));
    for (answers, expected) in [("fixed", "pass@1: 1.0000"), ("buggy", "pass@1: 0.0000")] {
        let out = run_ok(&[
            "eval",
            "bugfix",
            "--tasks",
            out1.to_str().unwrap(),
            "--split",
            "test",
            "--limit",
            "4",
            "--answers",
            answers,
            "--json",
            report(answers).to_str().unwrap(),
        ]);
        let printed = String::from_utf8_lossy(&out.stdout);
        assert!(printed.contains(expected), "{answers}: {printed}");
    }
    let out = run_ok(&[
        "eval",
        "compare",
        report("buggy").to_str().unwrap(),
        report("fixed").to_str().unwrap(),
    ]);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("on the 4 both have: compiled +0.0 ± 0.0 points, passed +100.0 ± 0.0"),
        "{printed}"
    );

    // Function bodies to write again in the same programs: one task per function, whose
    // own answer passes and whose stub does not.
    let bodies = dir.path().join("bodies.jsonl");
    let out = run_ok(&[
        "tasks",
        "bodies",
        "-i",
        out1.to_str().unwrap(),
        "-o",
        bodies.to_str().unwrap(),
    ]);
    let printed = String::from_utf8_lossy(&out.stdout);
    let made: Vec<Value> = std::fs::read_to_string(&bodies)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let functions: std::collections::BTreeSet<(String, u64)> = tasks
        .iter()
        .map(|t| {
            let source = t["id"].as_str().unwrap().split('#').next().unwrap();
            (source.to_string(), t["check"]["span"][0].as_u64().unwrap())
        })
        .collect();
    assert_eq!(made.len(), functions.len(), "{printed}");
    // The verdicts a killed run would resume from go once the tasks are written.
    assert!(!dir.path().join("bodies.jsonl.judged").exists());
    assert!(made.iter().all(|t| t["kind"] == "function_body"
        && t["input"]
            .as_str()
            .unwrap()
            .contains("// TODO: this function's body")));
    let out = run_ok(&[
        "tasks",
        "verify",
        "-i",
        bodies.to_str().unwrap(),
        "--sample",
        "0",
    ]);
    let printed = String::from_utf8_lossy(&out.stdout);
    let n = made.len();
    assert!(
        printed.contains(&format!(
            "fix matches the oracle {n}/{n}, bug fails {n}/{n}"
        )) && printed.contains(&format!("output as an answer passes {n}/{n}")),
        "{printed}"
    );
}

fn mbpp_prompt(n: usize) -> (String, String) {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../evals/multipl-e_mbpp-cpp-keep.jsonl");
    let line = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .nth(n)
        .unwrap()
        .to_string();
    let v: Value = serde_json::from_str(&line).unwrap();
    (
        v["name"].as_str().unwrap().into(),
        v["prompt"].as_str().unwrap().into(),
    )
}

#[test]
fn planted_benchmark_problems_are_removed_from_shards_and_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let (name, prompt) = mbpp_prompt(42);
    let src = dir.path().join("src");
    write(
        &src.join("planted.cpp"),
        format!("// copied\n{prompt}    return {{}};\n}}\n"),
    );
    write(&src.join("clean.cpp"), ALPHA);
    let shards = dir.path().join("shards");
    run_ok(&[
        "data",
        "run",
        "-i",
        src.to_str().unwrap(),
        "-o",
        shards.to_str().unwrap(),
        "--write-removed",
    ]);
    let kept = read_shards(&shards);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(kept[0]["id"].as_str().unwrap().ends_with("clean.cpp"));
    let removed = read_shards(&shards.join("removed"));
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0]["meta"]["decontaminate"]["item"], name.as_str());
    assert_eq!(removed[0]["meta"]["removed"]["reason"], "benchmark_overlap");

    let tasks = dir.path().join("tasks.jsonl");
    let lines = [
        serde_json::json!({"id": "a", "input": format!("// TASK: fix\n{prompt}"), "output": "x"}),
        serde_json::json!({"id": "b", "input": format!("// TASK: fix\n{ALPHA}"), "output": "y"}),
    ];
    write(
        &tasks,
        lines
            .iter()
            .map(|l| l.to_string() + "\n")
            .collect::<String>(),
    );
    let out = dir.path().join("clean");
    let printed = run_ok(&[
        "tasks",
        "decontaminate",
        "-i",
        tasks.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    let printed = String::from_utf8_lossy(&printed.stdout);
    assert!(
        printed.contains("2 records") && printed.contains("1 removed"),
        "{printed}"
    );
    let kept = std::fs::read_to_string(out.join("tasks.jsonl")).unwrap();
    assert!(
        kept.contains("\"id\":\"b\"") && !kept.contains("\"id\":\"a\""),
        "{kept}"
    );
    let removed = std::fs::read_to_string(out.join("removed/tasks.jsonl")).unwrap();
    assert!(
        removed.contains(&format!("\"item\":\"{name}\"")),
        "{removed}"
    );
}
