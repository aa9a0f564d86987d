//! `cxxlm index recall` on a small repository written here: the pairs it mines, written
//! as JSON lines, and BM25's recall at 10 on them; `cxxlm index embed` and
//! `query --semantic` with a tiny trained model: a function found by its doc comment,
//! one changed file embedded again and only it, another model's vectors refused or
//! made again, the embeddings' recall beside BM25's, and `index watch --checkpoint`
//! keeping them fresh as a file is saved.

mod common;

use common::*;
use serde_json::Value;
use std::io::BufRead;
use std::io::BufReader;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

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

/// The doc comments of the functions found by them: their text is most of the
/// function's, so that even a barely trained model's vectors of the two are nearest.
const FAHRENHEIT: &str = "/// Converts a temperature in degrees Fahrenheit to degrees Celsius:\n/// subtracts thirty-two, then multiplies by five ninths. Water freezes\n/// at 32 F (0 C) and boils at 212 F (100 C) at sea level.";
const VOWELS: &str = "/// Counts the vowels of an English word, in upper or lower case:\n/// a, e, i, o and u (y is not counted). The empty word has none,\n/// and \"Queue\" has four.";

/// A small repository of functions on different subjects, each with a doc comment.
fn library(root: &Path) {
    write(
        &root.join("src/units.cpp"),
        format!("#include \"units.h\"\n\n{FAHRENHEIT}\ndouble fahrenheit_to_celsius(double f) {{ return (f - 32.0) * 5.0 / 9.0; }}\n\n/// Metres in the given number of feet.\ndouble feet_to_metres(double feet) {{\n    return feet * 0.3048;\n}}\n"),
    );
    write(
        &root.join("src/text.cpp"),
        "#include <string>\n#include <cctype>\n\n/// Whether every character of the string is an ASCII digit.\nbool all_digits(const std::string& s) {\n    for (char c : s) {\n        if (!std::isdigit(static_cast<unsigned char>(c))) return false;\n    }\n    return true;\n}\n\n/// The string with its letters in upper case.\nstd::string shout(std::string s) {\n    for (auto& c : s) c = std::toupper(static_cast<unsigned char>(c));\n    return s;\n}\n",
    );
    write(
        &root.join("src/queue.cpp"),
        "#include <vector>\n\n/// Pops the smallest element of a binary min-heap stored in a vector.\nint heap_pop(std::vector<int>& heap) {\n    int top = heap.front();\n    heap.front() = heap.back();\n    heap.pop_back();\n    return top;\n}\n",
    );
    write(
        &root.join("src/units.h"),
        "#pragma once\ndouble fahrenheit_to_celsius(double f);\ndouble feet_to_metres(double feet);\n",
    );
}

fn json_of(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

fn first_function(repo: &str, text: &str) -> String {
    let q = json_of(&run_ok(&[
        "index",
        "query",
        repo,
        "--semantic",
        text,
        "--json",
    ]));
    q["definitions"][0]["name"].as_str().unwrap().to_string()
}

#[test]
fn embeddings_find_a_function_by_its_doc_comment_and_refresh_only_changed_files() {
    let p = pretrained();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    library(&repo);
    let (r, run) = (repo.to_str().unwrap(), p.run.to_str().unwrap());
    let first = json_of(&run_ok(&[
        "index",
        "embed",
        r,
        "--checkpoint",
        run,
        "--json",
    ]));
    assert_eq!(first["embedded_files"], 4, "{first}");
    assert_eq!(first["embedded_functions"], 5, "{first}");
    assert_eq!(
        (first["current_files"].as_u64(), first["dim"].as_u64()),
        (Some(0), Some(128))
    );
    assert!(repo.join(".cxxlm-index/vectors.bin").exists());
    assert_eq!(first_function(r, FAHRENHEIT), "fahrenheit_to_celsius");

    // One saved file: only it is embedded again, and what it now holds is found.
    let text = std::fs::read_to_string(repo.join("src/text.cpp")).unwrap();
    write(
        &repo.join("src/text.cpp"),
        format!("{text}\n{VOWELS}\nint count_vowels(const std::string& w) {{ return count_of(w, \"aeiouAEIOU\"); }}\n"),
    );
    let second = json_of(&run_ok(&[
        "index",
        "embed",
        r,
        "--checkpoint",
        run,
        "--json",
    ]));
    assert_eq!(second["embedded_files"], 1, "{second}");
    assert_eq!(second["embedded_functions"], 3, "{second}");
    assert_eq!(second["current_files"], 3, "{second}");
    assert_eq!(second["functions"], 6, "{second}");
    assert_eq!(second["remade"], false, "{second}");
    assert_eq!(first_function(r, VOWELS), "count_vowels");

    // Another model's vectors are not comparable: its query is refused, its embed
    // makes them all again.
    let other = p.f.root.join("other");
    let pack = p.f.root.join("pack");
    pretrain_tiny(&pack, &other, 1);
    let other = other.to_str().unwrap();
    let e = run_fails(&[
        "index",
        "query",
        r,
        "--semantic",
        "heap",
        "--checkpoint",
        other,
    ]);
    assert!(
        e.contains("were made by") && e.contains("cxxlm index embed"),
        "{e}"
    );
    let remade = json_of(&run_ok(&[
        "index",
        "embed",
        r,
        "--checkpoint",
        other,
        "--json",
    ]));
    assert_eq!(remade["remade"], true, "{remade}");
    assert_eq!(remade["embedded_files"], 4, "{remade}");

    // The embeddings are judged beside BM25 on the same held-out pairs.
    let summary = json_of(&run_ok(&[
        "index",
        "recall",
        r,
        "--held-out-percent",
        "100",
        "--checkpoint",
        run,
        "--json",
    ]));
    let (bm25, embeddings) = (&summary["recall"]["bm25"], &summary["recall"]["embeddings"]);
    assert!(bm25["pairs"].as_u64().unwrap() > 0, "{summary}");
    assert_eq!(embeddings["pairs"], bm25["pairs"], "{summary}");
    assert_eq!(embeddings["k"], 10, "{summary}");

    // Tuned contrastively on the pairs mined here (none held out), the model finds their
    // functions more often: recall@1 over the same pairs before and after.
    let pairs = p.f.root.join("pairs.jsonl");
    run_ok(&[
        "index",
        "recall",
        r,
        "--held-out-percent",
        "0",
        "--pairs-out",
        pairs.to_str().unwrap(),
    ]);
    let mined: Vec<Value> = std::fs::read_to_string(&pairs)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        mined.len() >= 4 && mined.iter().all(|m| m["target_text"].is_string()),
        "{mined:?}"
    );
    let tuned = p.f.root.join("tuned");
    let tune = [
        "train",
        "embed",
        "--init",
        run,
        "--pairs",
        pairs.to_str().unwrap(),
        "--out",
        tuned.to_str().unwrap(),
        "--set",
        "train.device=cpu",
        "--set",
        "train.device_batch=4",
        "--set",
        "train.steps=30",
        "--set",
        "eval.every=0",
        "--set",
        "optim.matrix_lr=1e-3",
        "--set",
        "optim.embedding_lr=1e-3",
    ];
    // Stopped part-way and resumed, as every stage.
    run_ok(&[&tune[..], &["--stop-at", "20"]].concat());
    assert!(tuned.join("checkpoints/step-000020").is_dir());
    run_ok(&[&tune[..], &["--resume"]].concat());
    assert!(tuned.join("checkpoints/step-000030").is_dir());
    let recall_at_1 = |checkpoint: &str| {
        let s = json_of(&run_ok(&[
            "index",
            "recall",
            r,
            "--held-out-percent",
            "100",
            "--k",
            "1",
            "--checkpoint",
            checkpoint,
            "--json",
        ]));
        s["recall"]["embeddings"]["rate"].as_f64().unwrap()
    };
    let (before, after) = (recall_at_1(run), recall_at_1(tuned.to_str().unwrap()));
    assert!(
        after > before,
        "recall@1 {before} before tuning, {after} after"
    );

    // Watching with the model keeps the vectors fresh: the other model's are made again
    // first, then a saved file's; the store then holds what a fresh embed makes.
    let mut watcher = cxxlm()
        .args(["index", "watch", r, "--checkpoint", run])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(watcher.stderr.take().unwrap()).lines();
    let said: Vec<String> = err
        .by_ref()
        .map(Result::unwrap)
        .take_while(|l| !l.starts_with("watching "))
        .collect();
    assert!(
        said.iter().any(|l| l.contains("all are made again"))
            && said.iter().any(|l| l.starts_with("embedded 4 files")),
        "{said:?}"
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let out = watcher.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let saved = format!(
        "{}\nint shout(const std::string& w) {{ return count_of(w, \"!\"); }}\n",
        std::fs::read_to_string(repo.join("src/text.cpp")).unwrap()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lines = Vec::new();
    while !lines.iter().any(|l: &String| l.starts_with("embedded ")) {
        write(&repo.join("src/text.cpp"), &saved);
        while let Ok(line) = rx.recv_timeout(Duration::from_millis(2000)) {
            lines.push(line);
            if lines.last().unwrap().starts_with("embedded ") {
                break;
            }
        }
        assert!(Instant::now() < deadline, "no refresh reported: {lines:?}");
    }
    let embedded = lines.iter().find(|l| l.starts_with("embedded ")).unwrap();
    assert!(
        embedded.starts_with("embedded 1 files (4 functions"),
        "{lines:?}"
    );
    assert!(embedded.contains(" ms;"), "{embedded}");
    send_signal(&watcher, libc::SIGINT);
    let status = wait_within(watcher, 30, "index watch after SIGINT").status;
    assert!(status.success(), "{status:?}");
    let fresh = p.f.root.join("fresh-index");
    run_ok(&[
        "index",
        "embed",
        r,
        "--checkpoint",
        run,
        "-o",
        fresh.to_str().unwrap(),
    ]);
    let load = |dir: &Path| cxxlm_index::Vectors::load(dir).unwrap().unwrap();
    let (kept, made) = (load(&repo.join(".cxxlm-index")), load(&fresh));
    assert_eq!(kept.fingerprint, made.fingerprint);
    assert_eq!(
        kept.files.keys().collect::<Vec<_>>(),
        made.files.keys().collect::<Vec<_>>()
    );
    for (path, k) in &kept.files {
        let m = &made.files[path];
        assert_eq!((k.hash, &k.functions), (m.hash, &m.functions), "{path}");
        // Batched with other files or alone, the same text gives the same vector up to
        // the sums' rounding.
        for (a, b) in [
            (&k.file, &m.file),
            (&k.function_vectors, &m.function_vectors),
        ] {
            assert_eq!(a.len(), b.len(), "{path}");
            let worst = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "{path}: {worst}");
        }
    }
}
