//! `cxxlm speedrun` end to end on a small slice of libstdc++: every stage, a kill in the
//! middle of pretraining, a rerun that continues, a changed setting refused, `--redo`, and
//! phase B added to the finished run.

mod common;

use common::{cxxlm, libstdcxx_bits, run_fails};
use serde_json::Value;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

/// A small but real configuration: 40 headers, a 1K vocabulary, a 2-layer model.
fn settings() -> Vec<String> {
    [
        "tokenizer.vocab=1024",
        "pack.val_fraction=0.3",
        "pretrain.model.preset=\"tiny\"",
        "pretrain.model.seq_len=64",
        "pretrain.train.device=\"cpu\"",
        "pretrain.train.device_batch=4",
        "pretrain.train.total_batch_tokens=256",
        "pretrain.train.steps=300",
        "pretrain.train.time_budget=0",
        "pretrain.eval.every=100",
        "pretrain.eval.tokens=2048",
        "pretrain.eval.samples=1",
        "pretrain.eval.sample_tokens=8",
        "pretrain.checkpoint.every=20",
        "eval.tokenizer_mb=1",
        "eval.bpb_tokens=4096",
        "eval.fim_documents=4",
        "eval.compile_functions=3",
        "eval.compile_max_tokens=16",
        "eval.mbpp_problems=2",
        "eval.mbpp_max_tokens=16",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn speedrun_args(sources: &Path, out: &Path, extra: &[String]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "speedrun".into(),
        "--sources".into(),
        sources.display().to_string(),
        "-o".into(),
        out.display().to_string(),
    ];
    for s in settings().iter().chain(extra) {
        args.extend(["--set".into(), s.clone()]);
    }
    args
}

fn speedrun(sources: &Path, out: &Path, extra: &[String]) -> Output {
    cxxlm()
        .args(speedrun_args(sources, out, extra))
        .output()
        .unwrap()
}

/// Runs the speedrun with `--redo stage`, which must succeed without pretraining again;
/// its stderr.
fn redo(sources: &Path, out: &Path, extra: &[String], stage: &str) -> String {
    let args: Vec<String> = speedrun_args(sources, out, extra)
        .into_iter()
        .chain(["--redo".into(), stage.into()])
        .collect();
    let redone = cxxlm().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&redone.stderr).into_owned();
    assert!(redone.status.success(), "{stderr}");
    assert!(
        stderr.contains("== pretrain: done earlier, skipped"),
        "{stderr}"
    );
    stderr
}

fn record(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("speedrun.json")).unwrap()).unwrap()
}

fn sources() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut headers: Vec<PathBuf> = std::fs::read_dir(libstdcxx_bits())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "h"))
        .collect();
    headers.sort();
    // Each in a folder of its own: phase B's repository examples hold out whole folders
    // (chosen by a hash of their paths, under a fresh temporary folder), and with 40 of them
    // some are held out and some are not.
    for (i, h) in headers.iter().take(40).enumerate() {
        let folder = src.join(format!("part{i:02}"));
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::copy(h, folder.join(h.file_name().unwrap())).unwrap();
    }
    (dir, src)
}

#[test]
fn a_killed_speedrun_continues_from_its_last_finished_stage() {
    let (dir, src) = sources();
    let out = dir.path().join("run");

    // Killed (with every process of the run) once pretraining has its first checkpoint.
    let mut child = cxxlm()
        .args(speedrun_args(&src, &out, &[]))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let checkpoints = out.join("train/checkpoints");
    let started = Instant::now();
    loop {
        // A finished checkpoint: renamed from its temporary name.
        let saved = std::fs::read_dir(&checkpoints).is_ok_and(|mut d| {
            d.any(|e| {
                e.is_ok_and(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    !name.ends_with(".tmp") && e.path().join("trainer.json").exists()
                })
            })
        });
        if saved {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the speedrun ended before its first checkpoint"
        );
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "no checkpoint"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: killpg on the process group the child leads.
    unsafe { libc::killpg(child.id() as libc::pid_t, libc::SIGKILL) };
    child.wait().unwrap();
    let killed = record(&out);
    for stage in ["data", "dedup", "tokenizer", "pack"] {
        assert_eq!(killed["stages"][stage]["finished"], true, "{stage}");
    }
    assert_eq!(killed["stages"]["pretrain"]["finished"], false);

    let again = speedrun(&src, &out, &[]);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    for stage in ["data", "dedup", "tokenizer", "pack"] {
        assert!(
            stderr.contains(&format!("== {stage}: done earlier, skipped")),
            "{stage}: {stderr}"
        );
    }
    assert!(stderr.contains("resumed after step"), "{stderr}");
    let done = record(&out);
    for (stage, s) in done["stages"].as_object().unwrap() {
        assert_eq!(s["finished"], true, "{stage}");
    }
    let metrics = std::fs::read_to_string(out.join("train/metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?["loss"].as_f64())
        .collect();
    assert!(
        losses.len() >= 300,
        "every step logged once it resumed: {}",
        losses.len()
    );
    let head: f64 = losses[..10].iter().sum::<f64>() / 10.0;
    let tail: f64 = losses[losses.len() - 10..].iter().sum::<f64>() / 10.0;
    assert!(tail < head - 1.0, "loss falls: {head} -> {tail}");

    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for expected in [
        "## Pretraining",
        "| steps | 300 |",
        "![training loss](plots/loss.png)",
        "**Compile rate**",
        "**MultiPL-E MBPP-C++**: 2 problems",
        "| ours |",
        "| MBPP-C++ completions |",
    ] {
        assert!(report.contains(expected), "{expected}\n{report}");
    }
    assert!(out.join("report.html").exists() && out.join("plots/loss.png").exists());
    for name in ["bpb", "fim", "compile", "mbpp", "tokenizer"] {
        assert!(out.join(format!("eval/{name}.json")).exists(), "{name}");
    }
    let eval = |name: &str| -> Value {
        serde_json::from_str(
            &std::fs::read_to_string(out.join(format!("eval/{name}.json"))).unwrap(),
        )
        .unwrap()
    };
    // Bits per byte says what it scored; generation, how often it ran to the limit.
    let bpb = eval("bpb");
    assert!(
        bpb["tokens"].as_u64().unwrap() > 0
            && bpb["bytes"].as_u64().unwrap() >= bpb["tokens"].as_u64().unwrap(),
        "{bpb}"
    );
    let mbpp = eval("mbpp");
    assert!(
        mbpp["length_limited"].as_u64().unwrap() <= mbpp["samples"].as_u64().unwrap(),
        "{mbpp}"
    );

    // Another FIM setting is refused, then redone with --redo (and only from there on).
    let changed = ["eval.fim_documents=5".to_string()];
    let refused = speedrun(&src, &out, &changed);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--redo eval-fim"));
    let stderr = redo(&src, &out, &changed, "eval-fim");
    assert!(stderr.contains("== eval-fim: cxxlm eval fim"), "{stderr}");
    let fim: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval/fim.json")).unwrap()).unwrap();
    assert_eq!(fim["documents"], 5);

    // Phase B added to the finished run: the pretrained model continued at 128 tokens on
    // repository examples, then evaluated in its place.
    let long: Vec<String> = changed
        .iter()
        .cloned()
        .chain(
            [
                "long_context=128",
                "long.model.rope_scaling.factor=2",
                "long.model.rope_scaling.original_seq_len=64",
                "long.train.device_batch=2",
                "long.train.total_batch_tokens=256",
                "long.train.steps=20",
                "long.eval.every=0",
                "long.checkpoint.every=10",
            ]
            .map(String::from),
        )
        .collect();
    let stderr = redo(&src, &out, &long, "pack-repo");
    assert!(
        stderr.contains("== pretrain-long: cxxlm train pretrain"),
        "{stderr}"
    );
    let phase_b = record(&out);
    let mbpp_command = phase_b["stages"]["eval-mbpp"]["command"].as_str().unwrap();
    assert!(mbpp_command.contains(&format!("--checkpoint {}", out.join("long").display())));
    let bpb_long = eval("bpb-long");
    assert_eq!(bpb_long["seq_len"], 128);
    assert_eq!(bpb_long["document_mask"], true);
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        report.contains("**Long context** (phase B, 128 tokens)"),
        "{report}"
    );
}

#[test]
fn a_fresh_run_with_phase_b_passes_its_settings_check() {
    // Phase B continues a model that does not exist yet; its settings are checked before
    // any stage runs all the same. The sources do not exist, so the data stage stops it.
    let dir = tempfile::tempdir().unwrap();
    let said = cxxlm()
        .args(["speedrun", "--preset", "gpu-long", "--sources"])
        .arg(dir.path().join("absent"))
        .arg("-o")
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&said.stderr);
    assert!(!said.status.success());
    assert!(!stderr.contains("settings"), "{stderr}");
    assert!(stderr.contains("== data: cxxlm data run"), "{stderr}");
    let written = std::fs::read_to_string(dir.path().join("run/speedrun.json")).unwrap();
    assert!(written.contains("long_context = 8192"), "{written}");
}

#[test]
fn a_failed_stage_is_named_on_the_report_card_of_the_stages_before_it() {
    let (dir, src) = sources();
    let out = dir.path().join("run");
    // Fine-tuning data that is not: the SFT stage fails after the base model's stages.
    let tasks = dir.path().join("tasks");
    std::fs::create_dir_all(&tasks).unwrap();
    std::fs::write(tasks.join("part-0.jsonl"), "{\"x\": 1}\n").unwrap();
    let quick: Vec<String> = [
        "pretrain.train.steps=5",
        "pretrain.eval.every=0",
        "pretrain.checkpoint.every=0",
        "eval.compile_functions=1",
        "eval.mbpp_problems=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let said = cxxlm()
        .args(speedrun_args(&src, &out, &quick))
        .arg("--sft-data")
        .arg(&tasks)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&said.stderr);
    assert!(!said.status.success(), "{stderr}");
    assert!(
        stderr.contains("stage sft: failed (exit status: 1)") && stderr.contains("no known format"),
        "{stderr}"
    );
    let stages = &record(&out)["stages"];
    assert_eq!(stages["pretrain"]["finished"], true);
    assert_eq!(stages["sft"]["finished"], false);
    assert_eq!(stages["sft"]["ended"], "failed (exit status: 1)");
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for row in ["| pretrain | done |", "| sft | failed (exit status: 1) |"] {
        assert!(report.contains(row), "{row}\n{report}");
    }
}

#[test]
fn a_report_of_a_directory_that_no_speedrun_wrote_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let e = run_fails(&["report", tmp.path().to_str().unwrap()]);
    assert!(
        e.contains("is not a speedrun's output") && e.contains("speedrun.json"),
        "{e}"
    );
    assert!(!tmp.path().join("report.md").exists());
}
