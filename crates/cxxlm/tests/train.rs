//! `cxxlm train pretrain` on the CPU with the tiny preset, on libstdc++ tokens: the loss
//! falls, an interrupted and resumed run repeats the uninterrupted one exactly, and bad
//! input (another tokenizer, a corrupt or foreign checkpoint, a diverging loss) is named.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

struct Packed {
    f: Fixture,
    pack: PathBuf,
}

fn packed() -> Packed {
    let f = fixture(400, 2048);
    let pack = f.root.join("pack");
    run_ok(&pack_args(&f, &pack, &["--val-fraction", "0.1"]));
    Packed { f, pack }
}

const TINY: [&str; 12] = [
    "--set",
    "model.preset=tiny",
    "--set",
    "train.device_batch=4",
    "--set",
    "train.total_batch_tokens=1024",
    "--set",
    "eval.every=10",
    "--set",
    "eval.tokens=2048",
    "--set",
    "eval.sample_tokens=8",
];

fn train(p: &Packed, out: &Path, extra: &[&str]) -> std::process::Output {
    run_ok(&train_args(p, out, extra))
}

fn train_args(p: &Packed, out: &Path, extra: &[&str]) -> Vec<String> {
    let head = [
        "train",
        "pretrain",
        "--pack",
        p.pack.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    command_line(&head, &[&TINY, extra, &["--set", "train.device=cpu"]])
}

fn fails(p: &Packed, out: &Path, extra: &[&str]) -> String {
    run_fails(&train_args(p, out, extra))
}

/// `(step, loss)` of every training record, and the validation bits per byte.
fn metrics(out: &Path) -> (Vec<(u64, String)>, Vec<f64>) {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let mut losses = Vec::new();
    let mut bpb = Vec::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        if let Some(l) = v.get("loss") {
            losses.push((v["step"].as_u64().unwrap(), l.to_string()));
        }
        if let Some(b) = v.get("val_bpb") {
            bpb.push(b.as_f64().unwrap());
        }
    }
    (losses, bpb)
}

#[test]
fn the_loss_falls_and_a_resumed_run_repeats_the_uninterrupted_one() {
    let p = packed();
    let whole = p.f.root.join("whole");
    train(&p, &whole, &["--set", "train.steps=40"]);
    let (losses, bpb) = metrics(&whole);
    assert_eq!(losses.len(), 40);
    let first: f64 = losses[0].1.parse().unwrap();
    let last: f64 = losses[39].1.parse().unwrap();
    assert!(first > 7.0 && last < first - 2.0, "loss {first} -> {last}");
    assert!(bpb.len() == 5 && bpb[4] < bpb[0] * 0.7, "{bpb:?}");
    assert!(whole
        .join("checkpoints/step-000040/model.safetensors")
        .exists());
    let tb = std::fs::read_dir(whole.join("tensorboard"))
        .unwrap()
        .count();
    assert_eq!(tb, 1);
    let samples = std::fs::read_to_string(whole.join("samples.jsonl")).unwrap();
    let steps: Vec<u64> = samples
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    // At each evaluation but the untrained model's at step 0.
    assert!(
        steps.len() >= 4 && steps.iter().all(|&s| s > 0),
        "{steps:?}"
    );
    bits_per_byte_of_a_split_shorter_than_one_window(&p, &whole);

    let split = p.f.root.join("split");
    let said = train(&p, &split, &["--set", "train.steps=40", "--stop-at", "17"]);
    assert!(String::from_utf8_lossy(&said.stdout).contains("17 of 40 steps"));
    train(&p, &split, &["--set", "train.steps=40", "--resume"]);
    assert_eq!(
        metrics(&split),
        metrics(&whole),
        "losses and bpb repeat bit for bit"
    );
    // Rows chosen from one document at a time crop every one that does not fit (here most
    // are row-long pieces of longer documents, which fit only a row of their own).
    let one = p.f.root.join("one-candidate");
    train(
        &p,
        &one,
        &["--set", "train.steps=12", "--set", "data.buffer=1"],
    );
    let cropped: Vec<f64> = metrics_records(&one)
        .iter()
        .filter_map(|r| r["cropped_share"].as_f64())
        .collect();
    assert!(
        cropped.len() == 12
            && cropped.iter().all(|&c| (0.0..1.0).contains(&c))
            && cropped[11] > 0.0,
        "{cropped:?}"
    );
}

/// A held-out set of one small file, shorter than the tiny model's window of 128 tokens,
/// is scored as one window of its length.
fn bits_per_byte_of_a_split_shorter_than_one_window(p: &Packed, checkpoint: &Path) {
    let root = &p.f.root;
    write(
        &root.join("small/add.cpp"),
        "// Adds two numbers.\nint add(int a, int b) {\n    return a + b;\n}\n\nint twice(int a) {\n    return add(a, a);\n}\n",
    );
    data_run(&root.join("small"), &root.join("small-data"), &[]);
    let pack = root.join("small-pack");
    run_ok(&[
        "pack",
        "--tokenizer",
        p.f.tokenizer.to_str().unwrap(),
        "-i",
        root.join("small-data").to_str().unwrap(),
        "-o",
        pack.to_str().unwrap(),
        "--fim-rate",
        "0",
        "--val-fraction",
        "1",
    ]);
    let json = root.join("small-bpb.json");
    let out = run_ok(&[
        "eval",
        "bpb",
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--pack",
        pack.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("fewer than one window of 128 + 1"), "{said}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let (bpb, seq_len) = (r["bits_per_byte"].as_f64().unwrap(), r["seq_len"].as_u64());
    assert!(bpb > 0.0 && bpb.is_finite(), "{r}");
    assert!(seq_len < Some(128) && seq_len > Some(10), "{r}");
    assert!(r["bytes"].as_u64() > Some(60), "{r}");
}

/// `log.phases` times each phase of a step (the device synchronized between them) and
/// changes nothing else: the losses are those of a run without it.
#[test]
fn phases_are_timed_without_changing_the_run() {
    let p = packed();
    let plain = p.f.root.join("plain");
    let timed = p.f.root.join("timed");
    train(&p, &plain, &["--set", "train.steps=3"]);
    train(
        &p,
        &timed,
        &["--set", "train.steps=3", "--set", "log.phases=true"],
    );
    assert_eq!(metrics(&timed).0, metrics(&plain).0);
    let records: Vec<Value> = metrics_records(&timed)
        .into_iter()
        .filter(|v| v.get("loss").is_some())
        .collect();
    for (i, r) in records.iter().enumerate() {
        let phases = r["phase_ms"].as_object().expect("phase_ms");
        let mut names = vec![
            "batch",
            "forward_backward",
            "loss_figures",
            "optimizer",
            "next_batch",
            "zero_grad",
        ];
        // The first step has no step before it.
        if i > 0 {
            names.insert(0, "between_steps");
        }
        let mut got: Vec<&str> = phases.keys().map(String::as_str).collect();
        got.sort();
        names.sort();
        assert_eq!(got, names);
        assert!(phases.values().all(|ms| ms.as_f64().unwrap() >= 0.0));
    }
    assert!(std::fs::read_to_string(plain.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .all(|l| !l.contains("phase_ms")));
}

/// A trained model continued at twice its context, with YaRN and document masking: the
/// run starts from its weights, records the new rotary in its checkpoints, and a run
/// stopped and resumed after the switch repeats the uninterrupted one bit for bit.
#[test]
fn a_model_continued_at_a_longer_context_resumes_bit_for_bit() {
    let p = packed();
    let short = p.f.root.join("short");
    train(&p, &short, &["--set", "train.steps=20"]);
    let init = short.to_str().unwrap();
    let longer = [
        "--init",
        init,
        "--set",
        "model.seq_len=256",
        "--set",
        "model.rope_scaling.factor=2",
        "--set",
        "model.rope_scaling.original_seq_len=128",
        "--set",
        "data.document_mask=true",
        "--set",
        "train.steps=8",
    ];
    let whole = p.f.root.join("long");
    train(&p, &whole, &longer);
    let (_, short_bpb) = metrics(&short);
    let (losses, bpb) = metrics(&whole);
    assert_eq!(losses.len(), 8);
    assert!(
        bpb[0] < short_bpb[0] * 0.9,
        "starts from the trained model: {bpb:?} after {short_bpb:?}"
    );
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(whole.join("checkpoints/step-000008/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["seq_len"], 256, "{config}");
    assert_eq!(config["rope_scaling"]["factor"], 2.0, "{config}");

    let split = p.f.root.join("long-split");
    train(&p, &split, &[&longer[..], &["--stop-at", "3"]].concat());
    train(&p, &split, &[&longer[..], &["--resume"]].concat());
    assert_eq!(metrics(&split), metrics(&whole), "repeats bit for bit");
    // Only the context and the rotary may change.
    let e = fails(
        &p,
        &p.f.root.join("wider"),
        &["--init", init, "--set", "model.width=256"],
    );
    assert!(e.contains("model.width is the initial model's"), "{e}");
}

#[test]
fn bad_input_is_named() {
    let p = packed();
    let out = p.f.root.join("run");
    train(&p, &out, &["--set", "train.steps=3"]);

    // Without --resume an existing run is not overwritten.
    let e = fails(&p, &out, &["--set", "train.steps=3"]);
    assert!(e.contains("--resume"), "{e}");
    // Another model, or other settings, cannot resume this run.
    let e = fails(
        &p,
        &out,
        &[
            "--set",
            "train.steps=6",
            "--resume",
            "--set",
            "model.depth=3",
        ],
    );
    assert!(e.contains("another model"), "{e}");
    let e = fails(&p, &out, &["--set", "train.steps=6", "--resume"]);
    assert!(e.contains("other training settings"), "{e}");
    // A Muon learning rate given to AdamW.
    let e = fails(
        &p,
        &p.f.root.join("adamw"),
        &["--set", "optim.matrices=adamw"],
    );
    assert!(e.contains("is a Muon rate"), "{e}");
    // A corrupt checkpoint is caught by its checksum.
    let weights = out.join("checkpoints/step-000003/model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 0x55;
    std::fs::write(&weights, bytes).unwrap();
    let e = fails(&p, &out, &["--set", "train.steps=3", "--resume"]);
    assert!(
        e.contains("checksum mismatch") && e.contains("model.safetensors"),
        "{e}"
    );
    // So is an edited trainer.json (a step changed by hand).
    let trainer = out.join("checkpoints/step-000003/trainer.json");
    let text = std::fs::read_to_string(&trainer).unwrap();
    std::fs::write(&trainer, text.replace("\"step\": 3", "\"step\": 2")).unwrap();
    let e = fails(&p, &out, &["--set", "train.steps=3", "--resume"]);
    assert!(e.contains("trainer.json: checksum mismatch"), "{e}");
    // A second process on a run directory that one is writing is refused.
    let held = hold_lock(&out.join("train.lock"));
    let e = fails(&p, &out, &["--set", "train.steps=3", "--resume"]);
    assert!(e.contains("is being written by another process"), "{e}");
    drop(held);
    // Settings out of range are named, by --check too.
    let e = fails(
        &p,
        &out,
        &[
            "--check",
            "--set",
            "train.device_batch=0",
            "--set",
            "optim.betas=[0.9, 1.5]",
        ],
    );
    assert!(
        e.contains("train.device_batch = 0") && e.contains("optim.betas[1] = 1.5"),
        "{e}"
    );
    // And a batch the run would refuse.
    let e = fails(
        &p,
        &out,
        &["--check", "--set", "train.total_batch_tokens=100"],
    );
    assert!(e.contains("must be a multiple of device_batch"), "{e}");
    // --check plans the memory of each GPU, and refuses a run that cannot fit.
    let plan = |extra: &[&str]| {
        let head = [
            "--check",
            "--set",
            "model.preset=d12",
            "--set",
            "train.device_batch=32",
            "--set",
            "train.total_batch_tokens=0",
        ];
        train_args(&p, &out, &[&head[..], extra].concat())
    };
    let said = run_ok(&plan(&["--gpu-memory", "80", "--ranks", "8"]));
    let stderr = String::from_utf8_lossy(&said.stderr);
    assert!(
        stderr.contains("8 rank(s), 32 rows of 2048 tokens") && stderr.contains("of 80.00 GiB"),
        "{stderr}"
    );
    // And the disk its checkpoints take, beside the room where they go.
    assert!(
        stderr.contains("a checkpoint takes") && stderr.contains("GiB free in"),
        "{stderr}"
    );
    let e = run_fails(&plan(&["--gpu-memory", "8"]));
    assert!(
        e.contains("more memory per GPU than the 8.00 GiB") && e.contains("activations"),
        "{e}"
    );
    // Kept checkpoints that would not fit are warned of, as the run's start does.
    let said = run_ok(&plan(&[
        "--gpu-memory",
        "80",
        "--set",
        "checkpoint.keep=1000000",
    ]));
    let stderr = String::from_utf8_lossy(&said.stderr);
    assert!(
        stderr.contains("warning: ") && stderr.contains("keeping 1000000 checkpoints"),
        "{stderr}"
    );

    // Tokens packed with another tokenizer.
    let other = p.f.root.join("other.json");
    run_ok(&[
        "tok",
        "train",
        "-i",
        p.f.data.to_str().unwrap(),
        "--vocab",
        "1024",
        "-o",
        other.to_str().unwrap(),
    ]);
    let fresh = p.f.root.join("fresh");
    let e = fails(
        &p,
        &fresh,
        &[
            "--set",
            &format!("data.tokenizer={:?}", other.to_str().unwrap()),
        ],
    );
    assert!(e.contains("packed with tokenizer"), "{e}");

    // A validation split shorter than one window of the model's context: refused before
    // a step is spent, not found out when the first evaluation has nothing to score.
    let long = p.f.root.join("long");
    let e = fails(
        &p,
        &long,
        &[
            "--set",
            "model.seq_len=262144",
            "--set",
            "train.total_batch_tokens=1048576",
        ],
    );
    assert!(
        e.contains("the val split holds") && e.contains("fewer than one window"),
        "{e}"
    );
    assert!(!long.join("checkpoints").exists(), "{e}");

    // A diverging loss stops the run with the step and saves the state before it.
    let diverge = p.f.root.join("diverge");
    let e = fails(
        &p,
        &diverge,
        &[
            "--set",
            "train.steps=10",
            "--set",
            "optim.embedding_lr=1e39",
        ],
    );
    assert!(e.contains("the loss became NaN at step"), "{e}");
    assert!(
        std::fs::read_dir(diverge.join("checkpoints"))
            .unwrap()
            .count()
            == 1,
        "{e}"
    );
}

/// `(step, loss)` as numbers.
fn losses(out: &Path) -> Vec<(u64, f64)> {
    metrics(out)
        .0
        .into_iter()
        .map(|(s, l)| (s, l.parse().unwrap()))
        .collect()
}

/// The same steps, each with the loss of `one` (one rank) within reordering's error.
fn assert_same_losses(one: &[(u64, f64)], other: &[(u64, f64)], what: &str) {
    assert_eq!(
        one.iter().map(|x| x.0).collect::<Vec<_>>(),
        other.iter().map(|x| x.0).collect::<Vec<_>>()
    );
    for ((step, x), (_, y)) in one.iter().zip(other) {
        assert!(
            (x - y).abs() < 2e-3,
            "step {step}: one rank {x}, {what} {y}"
        );
    }
}

fn launch(ranks: usize, args: &[String]) -> std::process::Output {
    let mut all: Vec<String> = vec![
        "launch".into(),
        "--gpus".into(),
        ranks.to_string(),
        "--".into(),
    ];
    all.extend_from_slice(args);
    run_ok(&all)
}

#[test]
fn two_and_four_ranks_train_as_one_rank_with_micro_batches_and_resume_on_one() {
    let p = packed();
    // One rank: 2 micro-batches of 4 rows per step; two ranks: 4 rows each.
    let one = p.f.root.join("one");
    let said = train(&p, &one, &["--set", "train.steps=8"]);
    assert!(String::from_utf8_lossy(&said.stderr).contains("2 micro-batches each"));
    // The batch left to the device count (0: 2 ranks x 4 rows, the same 8 rows).
    let two = p.f.root.join("two");
    let by_ranks = [
        "--set",
        "train.total_batch_tokens=0",
        "--set",
        "train.steps=8",
    ];
    let said = launch(
        2,
        &train_args(&p, &two, &[&by_ranks[..], &["--stop-at", "5"]].concat()),
    );
    let stderr = String::from_utf8_lossy(&said.stderr);
    assert!(
        stderr.contains("x 2 ranks; 8 steps, 1 micro-batches each"),
        "{stderr}"
    );
    let ckpt = two.join("checkpoints/step-000005");
    for f in ["optimizer-rank0.safetensors", "optimizer-rank1.safetensors"] {
        assert!(ckpt.join(f).exists(), "{f}");
    }
    let trainer: Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("trainer.json")).unwrap()).unwrap();
    assert_eq!(trainer["world"], 2);
    // The two-rank run continues on one rank (with two micro-batches: the batch it
    // started with) to the end.
    let said = train(&p, &two, &[&by_ranks[..], &["--resume"]].concat());
    let stderr = String::from_utf8_lossy(&said.stderr);
    assert!(
        stderr.contains("2 micro-batches each, resumed after step 5"),
        "{stderr}"
    );

    let a = losses(&one);
    assert_eq!(a.len(), 8);
    // Four ranks of 2 rows each: the same 8 rows per step.
    let four = p.f.root.join("four");
    launch(
        4,
        &train_args(
            &p,
            &four,
            &["--set", "train.steps=8", "--set", "train.device_batch=2"],
        ),
    );
    for (ranks, run) in [(2, &two), (4, &four)] {
        assert_same_losses(&a, &losses(run), &format!("{ranks} ranks"));
    }
    assert!(a[7].1 < a[0].1 - 0.5, "{a:?}");
    let (_, bpb_one) = metrics(&one);
    let (_, bpb_two) = metrics(&two);
    assert!(
        (bpb_one[0] - bpb_two[0]).abs() < 1e-4,
        "{bpb_one:?} {bpb_two:?}"
    );
}

/// Two fully sharded ranks (`train.sharding = "full"`, the explicit pass gathering each
/// layer's weights) train as one rank does, and their checkpoint resumes on one rank with
/// every weight replicated.
#[test]
fn fully_sharded_ranks_train_as_one_rank_and_resume_replicated() {
    let p = packed();
    let one = p.f.root.join("one");
    // --resume with nothing to resume starts at step 0, and says so.
    let said = train(&p, &one, &["--set", "train.steps=6", "--resume"]);
    let stderr = String::from_utf8_lossy(&said.stderr);
    assert!(
        stderr.contains("from step 0: no checkpoint to resume"),
        "{stderr}"
    );
    let full = p.f.root.join("full");
    let sharded = ["--set", "train.steps=6", "--set", "train.sharding=full"];
    let said = launch(
        2,
        &train_args(&p, &full, &[&sharded[..], &["--stop-at", "3"]].concat()),
    );
    let stderr = String::from_utf8_lossy(&said.stderr);
    assert!(
        stderr.contains("backward: explicit with reference steps (full sharding"),
        "{stderr}"
    );
    let said = train(&p, &full, &["--set", "train.steps=6", "--resume"]);
    let stderr = String::from_utf8_lossy(&said.stderr);
    assert!(stderr.contains("resumed after step 3"), "{stderr}");
    let a = losses(&one);
    assert_eq!(a.len(), 6);
    assert_same_losses(&a, &losses(&full), "fully sharded");
}

#[test]
fn a_rank_that_dies_stops_the_others_with_its_name() {
    let p = packed();
    let out = p.f.root.join("run");
    let args = train_args(&p, &out, &["--set", "train.steps=100000"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Started the way torchrun starts them, without `cxxlm launch`.
    let start = |rank: usize| {
        cxxlm()
            .args(&args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", "2")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("CXXLM_RENDEZVOUS_SECRET", "this job's secret")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let rank0 = start(0);
    let mut rank1 = start(1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !out.join("metrics.jsonl").exists()
        || std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count()
            < 3
    {
        assert!(
            std::time::Instant::now() < deadline,
            "training did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    rank1.kill().unwrap();
    rank1.wait().unwrap();
    let said = rank0.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&said.stderr);
    assert!(!said.status.success());
    assert!(
        stderr.contains("rank 1 exited before the run ended; rank 0 stops too"),
        "{stderr}"
    );
}

/// The explicit backward pass (here with its plain-tch steps, `CXXLM_FUSED=reference`)
/// trains as autograd does: the same losses step by step, through the optimizer.
#[test]
fn the_explicit_backward_pass_trains_as_autograd_does() {
    let p = packed();
    let autograd = p.f.root.join("autograd");
    let said = train(&p, &autograd, &["--set", "train.steps=6"]);
    assert!(String::from_utf8_lossy(&said.stderr).contains("backward: autograd"));
    // Six steps on the explicit pass in plain tch: its start line, and its losses.
    let explicit = |name: &str, extra: &[&str]| {
        let out = p.f.root.join(name);
        let args = train_args(&p, &out, &[&["--set", "train.steps=6"], extra].concat());
        let said = cxxlm()
            .env("CXXLM_FUSED", "reference")
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&said.stderr).into_owned();
        assert!(said.status.success(), "{stderr}");
        (stderr, losses(&out))
    };
    let (stderr, e) = explicit("explicit", &[]);
    assert!(
        stderr.contains("backward: explicit with reference steps"),
        "{stderr}"
    );
    let a = losses(&autograd);
    assert_eq!(a.len(), 6);
    for ((step, x), (_, y)) in a.iter().zip(&e) {
        assert!(
            (x - y).abs() < 1e-3,
            "step {step}: autograd {x}, explicit {y}"
        );
    }
    assert!(e[5].1 < e[0].1, "the loss falls: {e:?}");
    // Layers checkpointed (their forward run again in the backward pass) train the same.
    let (stderr, c) = explicit(
        "checkpointed",
        &["--set", "train.activation_checkpointing=1"],
    );
    assert!(
        stderr.contains("checkpointed layers: 1 in every 1"),
        "{stderr}"
    );
    assert_eq!(c, e);
}

/// On a machine with a GPU: training on it prints no torch warnings (token ids are
/// pinned without the deprecated device argument, which warned twice a step).
#[test]
fn training_on_a_gpu_prints_no_torch_deprecation_warnings() {
    let has_gpu = std::process::Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_gpu {
        eprintln!("no GPU here: nothing to check");
        return;
    }
    let p = packed();
    let out = p.f.root.join("gpu-run");
    let mut args: Vec<String> = [
        "train",
        "pretrain",
        "--pack",
        p.pack.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .chain(TINY.iter())
    .map(|s| s.to_string())
    .collect();
    args.extend([
        "--set".into(),
        "train.device=cuda".into(),
        "--set".into(),
        "train.steps=3".into(),
    ]);
    let said = run_ok(&args);
    let stderr = String::from_utf8_lossy(&said.stderr);
    assert!(!stderr.contains("deprecated"), "{stderr}");
}

#[test]
fn a_batch_too_slow_for_min_steps_is_cut_and_a_resumed_run_keeps_the_cut() {
    let p = packed();
    let out = p.f.root.join("fitted");
    // No step of 4 x 4 rows fits a thousand times in one second: the batch goes to its least.
    let fit = [
        "--set",
        "train.time_budget=1",
        "--set",
        "train.min_steps=1000",
        "--set",
        "train.steps=12",
        "--set",
        "eval.every=0",
    ];
    let said = train(&p, &out, &[&fit[..], &["--stop-at", "4"]].concat());
    let start = String::from_utf8_lossy(&said.stderr);
    assert!(
        start.contains("batch cut to its least, 1 row of"),
        "{start}"
    );
    assert!(!out.join("batch-probe").exists());
    let record: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("batch_fit.json")).unwrap())
            .unwrap();
    assert_eq!(record["device_batch"], 1);
    let resumed = train(&p, &out, &[&fit[..], &["--resume"]].concat());
    let start = String::from_utf8_lossy(&resumed.stderr);
    assert!(start.contains("(fitted when the run began)"), "{start}");
    assert!(start.contains("resumed after step 4"), "{start}");
}
