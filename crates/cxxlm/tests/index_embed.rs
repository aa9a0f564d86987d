//! `cxxlm index recall` on a small repository written here: the pairs it mines, written
//! as JSON lines, and BM25's recall at 10 on them.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;

fn repository(root: &Path) {
    write(
        &root.join("include/area.h"),
        "#pragma once\n/// The area of a rectangle of the given sides.\ndouble rect_area(double w, double h);\n",
    );
    write(
        &root.join("src/area.cpp"),
        "#include \"area.h\"\ndouble rect_area(double w, double h) {\n    return w * h;\n}\n",
    );
    write(
        &root.join("src/main.cpp"),
        "#include \"area.h\"\nint main() {\n    double a = rect_area(2, 3);\n    return a > 5 ? 0 : 1;\n}\n",
    );
}

#[test]
fn recall_mines_pairs_and_ranks_them_with_bm25() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    repository(&repo);
    let r = repo.to_str().unwrap();
    run_ok(&["index", "build", r]);
    let pairs = dir.path().join("pairs.jsonl");
    let out = run_ok(&[
        "index",
        "recall",
        r,
        "--held-out-percent",
        "100",
        "--pairs-out",
        pairs.to_str().unwrap(),
        "--json",
    ]);
    let summary: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    // rect_area and main are the candidates; a doc comment, a declaration and a call
    // name rect_area.
    assert_eq!(summary["candidates"], 2, "{summary}");
    assert_eq!(summary["held_out_pairs"], 3, "{summary}");
    assert_eq!(summary["training_pairs"], 0, "{summary}");
    let bm25 = &summary["recall"]["bm25"];
    assert_eq!(bm25["k"], 10, "{summary}");
    assert_eq!(bm25["found"], 3, "{summary}");
    let lines: Vec<Value> = std::fs::read_to_string(&pairs)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    let call = lines.iter().find(|l| l["kind"] == "call_site").unwrap();
    assert_eq!(call["file"], "src/main.cpp");
    assert_eq!(call["target_file"], "src/area.cpp");
    assert_eq!(call["target_name"], "rect_area");
    assert!(call["query"]
        .as_str()
        .unwrap()
        .contains("double a = rect_area(2, 3);"));
}
