//! Killing, rerunning and splitting `cxxlm data run`.

mod common;

use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// Enough files for many small shards; some dropped, some duplicated.
fn corpus(root: &Path, files: usize) {
    for n in 0..files {
        let text = match n % 50 {
            7 => "// auto-generated file\nint x;\n".to_string(),
            13 => cpp_source(n - 1),
            _ => cpp_source(n).repeat(8),
        };
        write(&root.join(format!("d{}/f{n:05}.cpp", n % 17)), text);
    }
}

const SMALL_SHARDS: &str = "[output]\nshard_bytes = 60000\nwrite_removed = true\n";

fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for sub in [dir.to_path_buf(), dir.join("removed")] {
        for path in shard_paths(&sub) {
            let name = path.strip_prefix(dir).unwrap().display().to_string();
            let bytes = zstd::decode_all(std::fs::File::open(&path).unwrap()).unwrap();
            files.push((name, bytes));
        }
    }
    files
}

fn without_timings(mut stats: serde_json::Value) -> serde_json::Value {
    stats["seconds"] = 0.into();
    for step in stats["steps"].as_array_mut().unwrap() {
        step["seconds"] = 0.into();
    }
    stats
}

/// Start a run, wait for its first checkpoint, send `signal`, then rerun it to the end:
/// the output must equal an uninterrupted run's.
fn interrupt_and_resume(signal: i32) -> std::process::Output {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("corpus");
    corpus(&src, 3000);
    let config = tmp.path().join("data.toml");
    write(&config, SMALL_SHARDS);
    let args = |out: &Path| -> Vec<String> {
        [
            "data",
            "run",
            "--threads",
            "1",
            "--config",
            config.to_str().unwrap(),
            "-i",
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };

    let whole = tmp.path().join("whole");
    let a: Vec<String> = args(&whole);
    run_ok(&a.iter().map(String::as_str).collect::<Vec<_>>());

    let killed = tmp.path().join("killed");
    let mut child = cxxlm()
        .args(args(&killed))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let checkpoint = killed.join("tasks/task-00000.state.json");
    let started = Instant::now();
    while !checkpoint.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before a checkpoint"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, signal) };
    let interrupted = child.wait_with_output().unwrap();
    assert!(!interrupted.status.success());
    assert!(
        !killed.join("tasks/task-00000.done.json").exists(),
        "stopped too late to test resume"
    );
    let partial = tree(&killed).len();
    assert!(
        partial > 0 && partial < tree(&whole).len(),
        "stopped midway: {partial} shards"
    );

    let k: Vec<String> = args(&killed);
    run_ok(&k.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(tree(&killed), tree(&whole));
    assert_eq!(
        without_timings(stats(&killed)),
        without_timings(stats(&whole))
    );
    assert!(std::fs::read_dir(&killed).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".tmp")));
    interrupted
}

#[test]
fn sigkill_midway_then_rerun_gives_the_uninterrupted_output() {
    interrupt_and_resume(libc::SIGKILL);
}

#[test]
fn ctrl_c_stops_with_a_message_and_the_rerun_resumes() {
    let out = interrupt_and_resume(libc::SIGINT);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("interrupted; rerun the same command to resume"),
        "{err}"
    );
}

#[test]
fn tasks_split_the_inputs_and_finished_tasks_are_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("corpus");
    corpus(&src, 300);
    let one = tmp.path().join("one");
    data_run(&src, &one, &[]);

    let three = tmp.path().join("three");
    for i in ["0", "1", "2"] {
        // As a Slurm job array would run them.
        let out = cxxlm()
            .args([
                "data",
                "run",
                "-i",
                src.to_str().unwrap(),
                "-o",
                three.to_str().unwrap(),
            ])
            .env("SLURM_ARRAY_TASK_COUNT", "3")
            .env("SLURM_ARRAY_TASK_ID", i)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut a = ids(&read_shards(&one));
    let mut b = ids(&read_shards(&three));
    a.sort();
    b.sort();
    // Exact dedup runs within a task: a duplicate whose original went to another task
    // is kept there, so the three tasks keep a superset.
    assert!(a.iter().all(|id| b.contains(id)));
    let s = stats(&three);
    assert_eq!(s["read"]["units"], 300);
    assert_eq!(s["written"]["docs"].as_u64().unwrap() as usize, b.len());

    let again = run_ok(&[
        "data",
        "run",
        "--tasks",
        "3",
        "-i",
        src.to_str().unwrap(),
        "-o",
        three.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert_eq!(err.matches("already complete").count(), 3, "{err}");
}

#[test]
fn other_settings_or_inputs_are_refused_in_the_same_output() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("corpus");
    corpus(&src, 20);
    let out = tmp.path().join("out");
    data_run(&src, &out, &[]);
    let err = run_fails(&[
        "data",
        "run",
        "--keep-indentation",
        "-i",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("other settings or other inputs"), "{err}");
    // A grown corpus must not be mistaken for the finished one.
    write(&src.join("new.cpp"), cpp_source(999));
    run_fails(&[
        "data",
        "run",
        "-i",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
}

#[test]
fn config_errors_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("bad.toml");
    write(&config, "[quality]\nmax_line_lenght = 3\n");
    let err = run_fails(&[
        "data",
        "run",
        "--config",
        config.to_str().unwrap(),
        "-i",
        "/nonexistent",
    ]);
    assert!(
        err.contains("max_line_lenght") && err.contains("bad.toml"),
        "{err}"
    );
    let out = tmp.path().join("o");
    let err = run_fails(&[
        "data",
        "run",
        "-i",
        "/nonexistent/dir",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("/nonexistent/dir"), "{err}");
}
