//! Killing, rerunning and splitting `cxxlm data run`; runs that cannot stop by
//! themselves (a stuck reader, a stalled download), and concurrent writers.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;
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

/// The files repeat one source eight times to fill shards: the repeated-lines filter keeps them.
const SMALL_SHARDS: &str = "[output]\nshard_bytes = 60000\nwrite_removed = true\n\
                            [quality]\nmax_repeated_line_fraction = 1.0\n";

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
    let k: Vec<&str> = k.iter().map(String::as_str).collect();
    // A shard written before the stop that is gone or cut short is named, not left out.
    let first = killed.join("part-00000-00000.jsonl.zst");
    let kept = std::fs::read(&first).unwrap();
    std::fs::write(&first, &kept[..kept.len() / 2]).unwrap();
    let err = run_fails(&k);
    assert!(
        err.contains("part-00000-00000.jsonl.zst") && err.contains("bytes"),
        "{err}"
    );
    std::fs::remove_file(&first).unwrap();
    assert!(run_fails(&k).contains("part-00000-00000.jsonl.zst"));
    std::fs::write(&first, &kept).unwrap();
    run_ok(&k);
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
    // So is one of a finished run's.
    let last = shard_paths(&whole).pop().unwrap();
    std::fs::remove_file(&last).unwrap();
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let name = last.file_name().unwrap().to_string_lossy().into_owned();
    assert!(run_fails(&a).contains(&name));
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

#[test]
fn a_second_writer_or_a_task_of_another_run_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("corpus");
    corpus(&src, 20);
    let out = tmp.path().join("out");
    let held = hold_lock(&out.join("tasks/task-00000.lock"));
    let args = [
        "data",
        "run",
        "-i",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    let err = run_fails(&args);
    assert!(
        err.contains("is being written by another process")
            && err.contains(&format!("process {}", std::process::id())),
        "{err}"
    );
    drop(held);

    // Task 0 of a run, then task 1 of a run with other settings: refused, however the
    // tasks are scheduled.
    let split = |index: &'static str, extra: &'static [&'static str]| {
        let mut a = vec!["--tasks", "2", "--task-index", index];
        a.extend(extra);
        a
    };
    data_run(&src, &out, &split("0", &[]));
    let mut other: Vec<&str> = args.to_vec();
    other.extend(split("1", &["--keep-indentation"]));
    let err = run_fails(&other);
    assert!(err.contains("other settings or other inputs"), "{err}");
    data_run(&src, &out, &split("1", &[]));
}

/// A `git` that answers `cat-file` by hanging (as on a stuck file system), and the
/// real one for the rest; `cat-file` leaves a mark when it starts.
fn hanging_git(dir: &Path) -> std::path::PathBuf {
    let real = Command::new("sh")
        .args(["-c", "command -v git"])
        .output()
        .unwrap();
    let real = String::from_utf8(real.stdout).unwrap();
    let bin = dir.join("bin");
    write(
        &bin.join("git"),
        format!(
            "#!/bin/sh\ncase \"$*\" in *cat-file*) touch {}; exec sleep 60 ;; esac\nexec {} \"$@\"\n",
            dir.join("hung").display(),
            real.trim()
        ),
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bin.join("git"), std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

#[test]
fn a_second_signal_ends_a_run_stuck_where_it_cannot_stop() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    write(&repo.join("a.cpp"), cpp_source(1));
    for args in [&["init", "-q"][..], &["add", "."], &["commit", "-qm", "x"]] {
        assert!(Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(args)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@t")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@t")
            .status()
            .unwrap()
            .success());
    }
    let bin = hanging_git(tmp.path());
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let child = cxxlm()
        .args(["data", "run", "-i", repo.to_str().unwrap(), "-o"])
        .arg(tmp.path().join("out"))
        .env("PATH", path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !tmp.path().join("hung").exists() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "git cat-file never ran"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    send_signal(&child, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    send_signal(&child, libc::SIGTERM);
    let out = wait_within(child, 20, "data run after two SIGTERMs");
    assert_eq!(out.status.code(), Some(128 + libc::SIGTERM));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("second interrupt: exiting now"), "{err}");
}

/// A Hub that lists one file and, asked for it, sends a tenth of it and then nothing.
fn stalling_hub() -> (String, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let downloading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = downloading.clone();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let flag = flag.clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8];
                while !head.ends_with(b"\r\n\r\n") && stream.read_exact(&mut byte).is_ok() {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head);
                if head.starts_with("GET /api/") {
                    let body = r#"[{"type":"file","oid":"0","size":1000,"path":"data/x.jsonl"}]"#;
                    let _ = write!(stream, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                } else {
                    let _ = write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n");
                    let _ = stream.write_all(&[b'{'; 100]);
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                    std::thread::sleep(Duration::from_secs(600));
                }
            });
        }
    });
    (url, downloading)
}

#[test]
fn a_stalled_hub_download_stops_at_the_first_signal() {
    let tmp = tempfile::tempdir().unwrap();
    let (url, downloading) = stalling_hub();
    let child = cxxlm()
        .args(["data", "run", "-i", "hf://datasets/org/set/data", "-o"])
        .arg(tmp.path().join("out"))
        .env("HF_ENDPOINT", &url)
        .env("HF_HOME", tmp.path().join("hf"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !downloading.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no download began"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    send_signal(&child, libc::SIGTERM);
    // The read timeout is 120 s, with five attempts: only the signal can end it soon.
    let out = wait_within(child, 30, "a stalled download after SIGTERM");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("interrupted; rerun the same command to resume"),
        "{err}"
    );
}
