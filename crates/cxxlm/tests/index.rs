//! `cxxlm index build|query|watch` on a small repository written here: the ranking at a
//! call site, a save picked up by the watcher, bad files counted, a damaged index refused.

mod common;

use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn repository(root: &Path) {
    write(
        &root.join("include/shapes/area.h"),
        "#pragma once\nstruct Rect { double w, h; };\ndouble rect_area(const Rect& r);\n",
    );
    write(
        &root.join("src/area.cpp"),
        "#include \"shapes/area.h\"\ndouble rect_area(const Rect& r) {\n    return r.w * r.h;\n}\n",
    );
    write(
        &root.join("src/trace.h"),
        "#pragma once\nvoid trace_event(const char* what);\n",
    );
    write(
        &root.join("src/trace.cpp"),
        "#include \"trace.h\"\n#include <cstdio>\nvoid trace_event(const char* what) { std::puts(what); }\n",
    );
    for name in ["src/io.cpp", "src/net.cpp"] {
        write(
            &root.join(name),
            format!(
                "#include \"trace.h\"\nvoid work() {{\n{}}}\n",
                "    trace_event(\"tick\");\n".repeat(6)
            ),
        );
    }
    write(
        &root.join("src/main.cpp"),
        format!(
            "#include \"shapes/area.h\"\n#include \"trace.h\"\nvoid setup() {{ trace_event(\"up\"); }}\n{}int main() {{\n    Rect r{{2, 3}};\n    return rect_area(r) > 5 ? 0 : 1;\n}}\n",
            "// ...\n".repeat(40)
        ),
    );
    write(&root.join("src/blob.cpp"), b"\x00\x01\x02 not source");
    let fifo = std::ffi::CString::new(root.join("src/pipe.cpp").to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a valid C string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
}

fn json(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

#[test]
fn build_query_watch_and_refuse_a_damaged_index() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    repository(&repo);
    let r = repo.to_str().unwrap();

    let built = json(&run_ok(&["index", "build", r, "--json"]));
    assert_eq!(built["files"], 7, "{built}");
    assert_eq!(built["skipped"]["binary"], 1, "{built}");
    assert_eq!(built["skipped"]["not_a_file"], 1, "{built}");

    let main = std::fs::read_to_string(repo.join("src/main.cpp")).unwrap();
    let line = main
        .lines()
        .position(|l| l.contains("rect_area(r)"))
        .unwrap()
        + 1;
    let line = line.to_string();
    let q = json(&run_ok(&[
        "index",
        "query",
        r,
        "--file",
        "src/main.cpp",
        "--line",
        &line,
        "--top",
        "5",
        "--json",
    ]));
    let defs = q["definitions"].as_array().unwrap();
    assert_eq!(defs[0]["name"], "rect_area", "{q:#}");
    let trace = defs.iter().position(|d| d["name"] == "trace_event");
    assert!(trace.is_none_or(|t| t > 1), "{q:#}");
    let chunks = q["chunks"].as_array().unwrap();
    assert!(
        chunks
            .iter()
            .any(|c| c["text"].as_str().unwrap().contains("return r.w * r.h;")),
        "{q:#}"
    );
    // The path may also be given as a path to the file.
    let by_path = json(&run_ok(&[
        "index",
        "query",
        r,
        "--file",
        repo.join("src/main.cpp").to_str().unwrap(),
        "--line",
        &line,
        "--json",
    ]));
    assert_eq!(by_path["definitions"][0]["name"], "rect_area");

    // A save while watching: the new function can be queried at once.
    let mut watcher = cxxlm()
        .args(["index", "watch", r])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(watcher.stderr.take().unwrap()).lines();
    let ready = err.next().unwrap().unwrap();
    assert!(ready.starts_with("watching "), "{ready}");
    let (tx, rx) = std::sync::mpsc::channel();
    let out = watcher.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let refreshed = loop {
        write(
            &repo.join("src/io.cpp"),
            "#include \"trace.h\"\nint queue_depth() { return 4; }\n",
        );
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
            break line;
        }
        assert!(Instant::now() < deadline, "no refresh reported");
    };
    assert!(
        refreshed.starts_with("refreshed src/io.cpp (1 definitions"),
        "{refreshed}"
    );
    assert!(refreshed.contains(" ms"), "{refreshed}");
    while rx.recv_timeout(Duration::from_millis(300)).is_ok() {}
    send_signal(&watcher, libc::SIGINT);
    let status = wait_within(watcher, 20, "index watch after SIGINT").status;
    assert!(status.success(), "{status:?}");
    let asked = json(&run_ok(&[
        "index",
        "query",
        r,
        "--symbol",
        "queue_depth",
        "--json",
    ]));
    assert_eq!(asked["definitions"][0]["file"], "src/io.cpp", "{asked:#}");

    // A damaged snapshot is refused, saying what to do.
    let snapshot = repo.join(".cxxlm-index/snapshot.bin");
    let mut bytes = std::fs::read(&snapshot).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&snapshot, bytes).unwrap();
    let said = run_fails(&["index", "query", r, "--symbol", "queue_depth"]);
    assert!(
        said.contains("corrupt") && said.contains("cxxlm index build"),
        "{said}"
    );
}
