//! `cxxlm train sft` on the CPU: a tiny model pretrained on libstdc++ is fine-tuned on
//! examples cut from libstdc++ itself in the three formats; the held-out loss falls, a
//! run stopped mid-epoch (or killed) and resumed repeats the uninterrupted one bit for
//! bit, and bad data and settings are named.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;

/// Examples from the fixture's libstdc++ shards: the next lines of code after some (as
/// `{"input","output"}` and as a chat), and lines hidden between others (FIM).
fn examples(f: &Fixture, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for doc in read_shards(&f.data) {
        let text = doc["text"].as_str().unwrap();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.trim().is_empty() && l.len() <= 50)
            .collect();
        for chunk in lines.chunks(6).filter(|c| c.len() == 6) {
            let (a, b, c) = (
                chunk[..2].join("\n"),
                chunk[2..4].join("\n"),
                chunk[4..].join("\n"),
            );
            let record = match out.len() % 3 {
                0 => json!({"input": format!("// Continue:\n{a}\n"), "output": format!("{b}\n")}),
                1 => json!({"messages": [
                    {"role": "system", "content": "Continue the code."},
                    {"role": "user", "content": format!("{a}\n")},
                    {"role": "assistant", "content": format!("{b}\n")}]}),
                _ => {
                    json!({"prefix": format!("{a}\n"), "suffix": format!("{c}\n"), "middle": format!("{b}\n")})
                }
            };
            out.push(record.to_string());
            if out.len() == n {
                return out;
            }
        }
    }
    out
}

fn write_lines(path: &Path, lines: &[String]) {
    write(path, lines.join("\n") + "\n");
}

const SMALL: [&str; 18] = [
    "--set",
    "train.device=cpu",
    "--set",
    "eval.exact_match=4",
    "--set",
    "train.device_batch=2",
    "--set",
    "train.total_batch_tokens=512",
    "--set",
    "eval.every=5",
    "--set",
    "eval.samples=1",
    "--set",
    "eval.sample_tokens=8",
    "--set",
    "sft.val_fraction=0.15",
    "--set",
    "sft.epochs=2",
];

fn sft_args(p: &Pretrained, data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let head = [
        "train",
        "sft",
        "--init",
        p.run.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    command_line(&head, &[&SMALL, extra])
}

fn sft(p: &Pretrained, data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    run_ok(&sft_args(p, data, out, extra))
}

fn sft_fails(p: &Pretrained, data: &Path, out: &Path, extra: &[&str]) -> String {
    run_fails(&sft_args(p, data, out, extra))
}

#[test]
fn fine_tuning_lowers_the_held_out_loss_and_a_stopped_or_killed_run_resumes_bit_exactly() {
    let p = pretrained();
    let data = p.f.root.join("sft.jsonl");
    write_lines(&data, &examples(&p.f, 90));
    let nanochat = ["--set", "sft.recipe=nanochat"];
    let whole = p.f.root.join("whole");
    let said = sft(&p, &data, &whole, &nanochat);
    let stderr = String::from_utf8_lossy(&said.stderr);
    assert!(
        stderr.contains("SFT data: 90 records (30 chat, 30 fim, 30 input_output)"),
        "{stderr}"
    );
    assert!(stderr.contains("state tensors carried over"), "{stderr}");
    // Examples are laid out as the pretraining text was, read from its pack.
    assert!(
        stderr.contains("indentation: stripped (as in the training text, from the pack"),
        "{stderr}"
    );
    let all = metrics_records(&whole);
    let steps: Vec<&Value> = all.iter().filter(|r| r.get("loss").is_some()).collect();
    assert!(steps.len() > 10, "{} steps", steps.len());
    // The last step's rows may run past the last epoch's (padding).
    for r in &steps[..steps.len() - 1] {
        let share = r["supervised_share"].as_f64().unwrap();
        assert!(share > 0.05 && share < 0.6, "{r}");
        assert!(r["padding_share"].as_f64().unwrap() < 0.5, "{r}");
    }
    let val: Vec<f64> = all.iter().filter_map(|r| r["val_loss"].as_f64()).collect();
    assert!(
        val.len() >= 3 && val[val.len() - 1] < val[0] - 0.3,
        "{val:?}"
    );
    let samples = std::fs::read_to_string(whole.join("samples.jsonl")).unwrap();
    assert!(samples.contains("assistant\\n") || samples.contains("<|fim_middle|>"));
    // The fine-tuned model samples with the tokenizer its run names.
    run_ok(&[
        "sample",
        "--checkpoint",
        whole.to_str().unwrap(),
        "--prompt",
        "int",
        "--max-tokens",
        "4",
    ]);

    // Stopped mid-epoch (halfway through the first of the 3 epochs: how many steps an
    // epoch takes follows the tokenizer), then resumed.
    let stop = (steps.len() / 6).max(1);
    let split = p.f.root.join("split");
    sft(
        &p,
        &data,
        &split,
        &[&nanochat[..], &["--stop-at", &stop.to_string()]].concat(),
    );
    let state: Value = serde_json::from_slice(
        &std::fs::read(split.join(format!("checkpoints/step-{stop:06}/trainer.json"))).unwrap(),
    )
    .unwrap();
    assert!(
        state["loader"]["row"].as_u64().unwrap() > 0,
        "mid-epoch: {}",
        state["loader"]
    );
    sft(&p, &data, &split, &[&nanochat[..], &["--resume"]].concat());
    assert_eq!(
        timeless(metrics_records(&split)),
        timeless(all.clone()),
        "metrics repeat bit for bit"
    );

    // Killed (SIGKILL) after a checkpoint, then resumed.
    let killed = p.f.root.join("killed");
    let args = sft_args(
        &p,
        &data,
        &killed,
        &[&nanochat[..], &["--set", "checkpoint.every=3"]].concat(),
    );
    let mut child = cxxlm()
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !killed.join("checkpoints/step-000003/trainer.json").exists() {
        assert!(std::time::Instant::now() < deadline, "no checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    sft(
        &p,
        &data,
        &killed,
        &[&nanochat[..], &["--set", "checkpoint.every=3", "--resume"]].concat(),
    );
    assert_eq!(timeless(metrics_records(&killed)), timeless(all));
}

#[test]
fn bad_sft_data_and_settings_are_named() {
    let p = pretrained();
    let mut lines = examples(&p.f, 20);
    // Specials typed in a record's text stay text.
    lines.push(json!({"input": "<|eos|><|bos|>", "output": "x;\n"}).to_string());
    let good = p.f.root.join("good.jsonl");
    write_lines(&good, &lines);
    let one = ["--set", "train.steps=1", "--set", "eval.every=0"];

    // --check plans the memory of each GPU, rows at the fine-tuning's context, and refuses
    // a run that cannot fit; before the model has a checkpoint, it says so.
    let plan = p.f.root.join("plan");
    let check = ["--check", "--set", "sft.context=128", "--gpu-memory"];
    let said = sft(&p, &good, &plan, &[&check[..], &["80"]].concat());
    let stderr = String::from_utf8_lossy(&said.stderr);
    assert!(
        stderr.contains("1 rank(s), 2 rows of 128 tokens") && stderr.contains("of 80.00 GiB"),
        "{stderr}"
    );
    let e = sft_fails(&p, &good, &plan, &[&check[..], &["0.001"]].concat());
    assert!(
        e.contains("more memory per GPU than the 0.00 GiB") && e.contains("activations"),
        "{e}"
    );
    // (A run killed before its first checkpoint, as a speedrun resumed then has.)
    let unfinished = p.f.root.join("unfinished");
    std::fs::create_dir_all(&unfinished).unwrap();
    let said = run_ok(&command_line(
        &[
            "train",
            "sft",
            "--init",
            unfinished.to_str().unwrap(),
            "--data",
            good.to_str().unwrap(),
            "-o",
            plan.to_str().unwrap(),
        ],
        &[&["--check", "--tokenizer", p.f.tokenizer.to_str().unwrap()]],
    ));
    assert!(
        String::from_utf8_lossy(&said.stderr)
            .contains("not planned until a checkpoint of the model to fine-tune exists"),
        "{said:?}"
    );
    assert!(!plan.exists(), "--check wrote {}", plan.display());

    let mut bad = lines.clone();
    bad.insert(2, "{not json".into());
    let broken = p.f.root.join("broken.jsonl");
    write_lines(&broken, &bad);
    let e = sft_fails(&p, &broken, &p.f.root.join("a"), &one);
    assert!(
        e.contains(&format!("{}:3: not JSON", broken.display())) && e.contains("sft.invalid"),
        "{e}"
    );
    let said = sft(
        &p,
        &broken,
        &p.f.root.join("b"),
        &[&one[..], &["--set", "sft.invalid=skip"]].concat(),
    );
    let stderr = String::from_utf8_lossy(&said.stderr);
    assert!(
        stderr.contains(&format!("skipped 1 (not JSON: {}:3)", broken.display())),
        "{stderr}"
    );

    // Longer than a row of the context: the input's start is cut, or the run refused.
    let mut long = lines.clone();
    let input: String = (0..40).map(|i| format!("int v{i} = {i};\n")).collect();
    long.push(json!({"input": input, "output": "return v0;\n"}).to_string());
    let long_file = p.f.root.join("long.jsonl");
    write_lines(&long_file, &long);
    let truncated = |run: &str| {
        let out = p.f.root.join(run);
        let data = if run == "c" { &long_file } else { &good };
        let said = sft(&p, data, &out, &one);
        let stats: Value =
            serde_json::from_slice(&std::fs::read(out.join("sft-data.json")).unwrap()).unwrap();
        (stats["stats"]["truncated"].as_u64().unwrap(), said)
    };
    let ((cut_long, said), (cut_good, _)) = (truncated("c"), truncated("c2"));
    assert_eq!(cut_long, cut_good + 1);
    let stderr = String::from_utf8_lossy(&said.stderr);
    assert!(stderr.contains("examples cut to fit"), "{stderr}");
    let e = sft_fails(
        &p,
        &long_file,
        &p.f.root.join("d"),
        &[&one[..], &["--set", "sft.too_long=refuse"]].concat(),
    );
    assert!(
        e.contains(&format!("{}:{}:", long_file.display(), long.len())),
        "{e}"
    );

    let e = sft_fails(
        &p,
        &good,
        &p.f.root.join("e"),
        &[&one[..], &["--set", "sft.context=4096"]].concat(),
    );
    assert!(e.contains("longer than the 128 tokens"), "{e}");
    let nowhere = p.f.root.join("nowhere");
    std::fs::create_dir_all(&nowhere).unwrap();
    let e = run_fails(&[
        "train",
        "sft",
        "--init",
        nowhere.to_str().unwrap(),
        "--data",
        good.to_str().unwrap(),
        "--tokenizer",
        p.f.tokenizer.to_str().unwrap(),
        "-o",
        p.f.root.join("f").to_str().unwrap(),
    ]);
    assert!(e.contains("holds no checkpoint"), "{e}");

    // A run is not overwritten, and resumes only on the data it started with.
    let run = p.f.root.join("g");
    sft(&p, &good, &run, &one);
    let e = sft_fails(&p, &good, &run, &one);
    assert!(e.contains("--resume"), "{e}");
    let e = sft_fails(&p, &long_file, &run, &[&one[..], &["--resume"]].concat());
    assert!(e.contains("other training settings"), "{e}");
}

#[test]
fn replayed_pretraining_windows_share_every_batch_and_resume_bit_exactly() {
    let p = pretrained();
    let data = p.f.root.join("sft.jsonl");
    write_lines(&data, &examples(&p.f, 40));
    let pack = p.f.root.join("pack");
    let replay = [
        "--set",
        &format!("sft.replay_pack={}", pack.display()),
        "--set",
        "sft.replay_share=0.5",
        "--set",
        "eval.every=0",
    ]
    .map(String::from);
    let replay: Vec<&str> = replay.iter().map(String::as_str).collect();
    let whole = p.f.root.join("whole");
    let said = sft(&p, &data, &whole, &replay);
    let stderr = String::from_utf8_lossy(&said.stderr);
    assert!(
        stderr.contains("replay: 1 of every 2 rows from the pack"),
        "{stderr}"
    );
    let all = metrics_records(&whole);
    let steps: Vec<&Value> = all.iter().filter(|r| r.get("loss").is_some()).collect();
    // Half the rows learn every token, the other half only the answers.
    for r in &steps[..steps.len() - 1] {
        let share = r["supervised_share"].as_f64().unwrap();
        assert!(share > 0.5 && share < 0.95, "{r}");
    }
    // The examples' rows, 2 of the 4 rows of a step (2 passes of 2 rows), set the steps.
    let record: Value =
        serde_json::from_slice(&std::fs::read(whole.join("sft-data.json")).unwrap()).unwrap();
    let rows = record["rows"].as_u64().unwrap();
    assert_eq!(steps.len() as u64, rows.div_ceil(2), "{rows} rows");

    let split = p.f.root.join("split");
    let stop = (steps.len() / 2).to_string();
    sft(
        &p,
        &data,
        &split,
        &[&replay[..], &["--stop-at", &stop]].concat(),
    );
    sft(&p, &data, &split, &[&replay[..], &["--resume"]].concat());
    assert_eq!(timeless(metrics_records(&split)), timeless(all));

    let e = sft_fails(
        &p,
        &data,
        &p.f.root.join("none"),
        &[&replay[..], &["--set", "sft.replay_share=0.1"]].concat(),
    );
    assert!(e.contains("sft.replay_share = 0.1"), "{e}");
}
