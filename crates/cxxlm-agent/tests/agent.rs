//! The tools and the loop on a small repository with a planted bug: real g++, the real
//! sandbox, a real HTTP endpoint on loopback replaying a trajectory.

mod common;

use common::*;
use cxxlm_agent::{Agent, Budget, Checker, Commands, Endpoint, Outcome, Workspace};
use serde_json::Value;

fn transcript(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn run(
    repo: &std::path::Path,
    replies: Vec<String>,
    steps: usize,
) -> (cxxlm_agent::Report, Vec<Value>, Scripted) {
    let server = scripted(replies);
    let mut model = Endpoint::new(&server.url, "scripted", None, 512, 0.0).unwrap();
    let mut agent = Agent {
        workspace: Workspace::new(repo).unwrap(),
        checker: Checker::new(&repo.canonicalize().unwrap()).unwrap(),
        commands: Commands::for_repo(repo, None, None).unwrap(),
        model: &mut model,
        budget: Budget {
            steps,
            tokens: 100_000,
        },
    };
    let out = repo.parent().unwrap().join("transcript.jsonl");
    let report = agent
        .run("mean() of {1, 2, 3, 6} is not 3: fix it.", &out)
        .unwrap();
    (report, transcript(&out), server)
}

#[test]
fn the_loop_fixes_the_planted_bug_through_a_real_endpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    planted_repo(&repo);
    let (report, records, server) = run(&repo, fixing_trajectory(), 20);
    assert_eq!(report.outcome, Outcome::Solved, "{records:#?}");
    assert_eq!(report.steps, 7);
    assert_eq!(report.tokens, 700);
    // One record per step, then the outcome.
    assert_eq!(records.len(), 8);
    let r = |i: usize| &records[i];
    assert_eq!(r(0)["thought"], "Run the tests first.");
    assert_eq!(r(0)["call"]["tool"], "test");
    assert_eq!(r(0)["ok"], false);
    let trace = r(0)["result"].as_str().unwrap();
    assert!(
        trace.contains("AddressSanitizer") && trace.contains("src/stats.cpp:6"),
        "{trace}"
    );
    assert!(r(1)["result"].as_str().unwrap().contains("    5  "));
    // The malformed call: a tool error, a step spent.
    assert_eq!(r(2)["call"], Value::Null);
    assert!(r(2)["call_error"].as_str().unwrap().contains("not JSON"));
    assert!(r(2)["result"].as_str().unwrap().starts_with("error: "));
    // The edit that breaks the parse is refused, the file left as it was.
    assert_eq!(r(3)["ok"], false);
    assert!(
        r(3)["result"]
            .as_str()
            .unwrap()
            .contains("would no longer parse"),
        "{}",
        r(3)["result"]
    );
    assert_eq!(r(4)["ok"], true, "{}", r(4)["result"]);
    assert_eq!(r(5)["ok"], true, "{}", r(5)["result"]);
    assert_eq!(r(6)["call"]["tool"], "submit");
    for rec in &records[..7] {
        assert!(rec["model_ms"].as_f64().unwrap() >= 0.0 && rec["tool_ms"].as_f64().is_some());
    }
    assert_eq!(r(7)["outcome"], "solved");
    let fixed = std::fs::read_to_string(repo.join("src/stats.cpp")).unwrap();
    assert_eq!(
        fixed,
        STATS_CPP.replace("i <= values.size()", "i < values.size()")
    );
    // Each tool answer went back to the model as a tool turn after its call.
    let requests = server.requests.lock().unwrap();
    let last = requests.last().unwrap().as_array().unwrap();
    assert_eq!(last[0]["role"], "system");
    assert_eq!(last[1]["role"], "user");
    assert_eq!(last[2]["role"], "assistant");
    assert_eq!(last[3]["role"], "tool");
    assert_eq!(last[3]["content"], r(0)["result"]);
}

#[test]
fn the_step_budget_ends_a_run_that_never_submits() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    planted_repo(&repo);
    let replies = vec!["I think the bug is in mean.".to_string(); 5];
    let (report, records, _) = run(&repo, replies, 3);
    assert_eq!(report.outcome, Outcome::BudgetExhausted);
    assert_eq!(records.len(), 4);
    assert!(records[0]["call_error"]
        .as_str()
        .unwrap()
        .contains("no tool call"));
    assert_eq!(records[3]["outcome"], "budget exhausted");
    assert_eq!(
        std::fs::read_to_string(repo.join("src/stats.cpp")).unwrap(),
        STATS_CPP
    );
}

#[test]
fn the_edit_guard_refuses_a_broken_parse_and_takes_a_good_edit() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    planted_repo(&repo);
    let mut w = Workspace::new(&repo).unwrap();
    let broken = w
        .edit(
            "src/stats.cpp",
            8,
            8,
            "    return static_cast<double>(total) / values.size()\n",
        )
        .unwrap();
    assert!(
        !broken.ok && broken.text.contains("expected"),
        "{}",
        broken.text
    );
    assert_eq!(
        std::fs::read_to_string(repo.join("src/stats.cpp")).unwrap(),
        STATS_CPP
    );
    // The header is checked too, with the project's flags.
    let header = w
        .edit(
            "src/stats.h",
            4,
            4,
            "double mean(const std::vector<int>& values)\n",
        )
        .unwrap();
    assert!(!header.ok, "{}", header.text);
    let good = w.edit("src/stats.cpp", 5, 5, FIXED_LOOP).unwrap();
    assert!(good.ok, "{}", good.text);
    assert!(std::fs::read_to_string(repo.join("src/stats.cpp"))
        .unwrap()
        .contains("i < values.size()"));
    // The index follows the edit: a new function is found by symbol.
    let added = w
        .edit(
            "src/stats.cpp",
            10,
            9,
            "\nint median_index(int n) { return n / 2; }\n",
        )
        .unwrap();
    assert!(added.ok, "{}", added.text);
    let found = w.search(None, Some("median_index"));
    assert!(found.text.contains("src/stats.cpp:11"), "{}", found.text);
    let ranked = w.index("tests/test_stats.cpp", 6);
    assert!(
        ranked.text.contains("src/stats.h") || ranked.text.contains("src/stats.cpp"),
        "{}",
        ranked.text
    );
}

#[test]
fn paths_stay_inside_the_repository() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    planted_repo(&repo);
    let outside = tmp.path().join("secret.cpp");
    std::fs::write(&outside, "int secret = 1;\n").unwrap();
    std::os::unix::fs::symlink(&outside, repo.join("src/link.cpp")).unwrap();
    let mut w = Workspace::new(&repo).unwrap();
    for path in [
        "../secret.cpp",
        "src/../../secret.cpp",
        outside.to_str().unwrap(),
        "src/link.cpp",
    ] {
        let e = w.edit(path, 1, 1, "int secret = 2;\n").unwrap();
        assert!(!e.ok, "{path}: {}", e.text);
        assert!(!w.open(path, None, None).ok, "{path}");
    }
    assert_eq!(
        std::fs::read_to_string(&outside).unwrap(),
        "int secret = 1;\n"
    );
    assert!(!w.list(Some("..")).ok);
    assert!(!w.edit("src/missing.cpp", 1, 0, "x\n").unwrap().ok);
    assert!(!w.edit("src/stats.cpp", 5, 99, "x\n").unwrap().ok);
    assert!(Workspace::new(&tmp.path().join("nowhere"))
        .err()
        .unwrap()
        .to_string()
        .contains("nowhere"));
}

#[test]
fn a_bug_task_becomes_a_solved_tool_use_example() {
    let buggy = "#include <cstdio>\n#include <vector>\n\nint sum(const std::vector<int>& v) {\n    int total = 0;\n    for (std::size_t i = 0; i <= v.size(); ++i) total += v[i];\n    return total;\n}\n\nint main() {\n    std::vector<int> v = {1, 2, 3};\n    std::printf(\"%d\\n\", sum(v));\n}\n";
    let fixed = buggy.replace("i <= v.size()", "i < v.size()");
    let task: cxxlm_tasks::task::Task = serde_json::from_value(serde_json::json!({
        "id": "demo-1", "kind": "injected_bug", "input": "", "project": "demo", "split": "train",
        "output": "/* REASONING:\n   The bound is off by one.\n*/\n",
        "provenance": {"source": "demo", "path": "main.cpp", "change": "< became <="},
        "check": {
            "flags": cxxlm_tasks::judge::FLAGS, "support": {}, "fixed": fixed, "buggy": buggy,
            "span": [37, 160], "oracle": {"stdout": "6\n", "exit_code": 0}, "verified_by": "standalone",
            "failure": {"kind": "heap-buffer-overflow", "detector": "AddressSanitizer", "signal": null,
                "location": "main.cpp:6", "line": 6, "function": "sum", "message": "", "values": [],
                "stack": [], "exit_code": null, "expected": null, "printed": null},
        },
    }))
    .unwrap();
    let example = cxxlm_agent::trajectory::example(&task).unwrap().unwrap();
    let messages = example["messages"].as_array().unwrap();
    let roles: Vec<&str> = messages
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles,
        [
            "system",
            "user",
            "assistant",
            "tool",
            "assistant",
            "tool",
            "assistant",
            "tool",
            "assistant",
            "tool",
            "assistant"
        ]
    );
    let content = |i: usize| messages[i]["content"].as_str().unwrap();
    assert!(content(1).contains("heap-buffer-overflow"));
    // libstdc++'s assertions (the tasks' flags) or the address sanitizer stop it.
    let report = content(3);
    assert!(
        report.contains("failed") && (report.contains("Assertion") || report.contains("Sanitizer")),
        "{report}"
    );
    assert!(
        content(6).contains("The bound is off by one.") && content(6).contains("\"tool\":\"edit\"")
    );
    assert!(
        content(9).starts_with("`make test` passed"),
        "{}",
        content(9)
    );
    assert!(content(10).ends_with("{\"tool\":\"submit\"}"));
    assert_eq!(example["split"], "train");
    // A task without a check is not runnable.
    let mut plain = task.clone();
    plain.check = None;
    assert!(cxxlm_agent::trajectory::example(&plain).unwrap().is_err());
}
