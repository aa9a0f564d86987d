//! `cxxlm train rl` on the CPU: a tiny model pretrained on libstdc++ and fine-tuned on
//! the answers of a few bug-fix tasks (small real programs, built and run in the sandbox
//! by real g++) is trained with GRPO on them; the rewards and their parts are recorded,
//! a run stopped and resumed repeats the uninterrupted one bit for bit, and bad settings
//! are named.

mod common;

use common::*;
use cxxlm_tasks::report::{Failure, Oracle};
use cxxlm_tasks::task::{Check, Provenance, Task};
use serde_json::{json, Value};
use std::path::Path;

/// `(name, buggy function, fixed function, main's call, expected output, split)`.
const PROGRAMS: [(&str, &str, &str, &str, &str, &str); 4] = [
    (
        "add",
        "int add(int a, int b) { return a - b; }",
        "int add(int a, int b) { return a + b; }",
        "add(2, 3)",
        "5",
        "train",
    ),
    (
        "mul",
        "int mul(int a, int b) { return a + b; }",
        "int mul(int a, int b) { return a * b; }",
        "mul(3, 4)",
        "12",
        "train",
    ),
    (
        "neg",
        "int neg(int a) { return a; }",
        "int neg(int a) { return -a; }",
        "neg(7)",
        "-7",
        "train",
    ),
    (
        "sub",
        "int sub(int a, int b) { return b - a; }",
        "int sub(int a, int b) { return a - b; }",
        "sub(9, 4)",
        "5",
        "test",
    ),
];

fn program(function: &str, call: &str) -> String {
    format!("#include <cstdio>\n{function}\nint main() {{ std::printf(\"%d\\n\", {call}); }}\n")
}

fn fixture_tasks() -> Vec<Task> {
    PROGRAMS
        .iter()
        .map(|&(name, buggy_fn, fixed_fn, call, expected, split)| {
            let buggy = program(buggy_fn, call);
            let start = buggy.find(buggy_fn).unwrap();
            Task {
                id: format!("fixture-{name}"),
                kind: "injected_bug".into(),
                input: format!("Fix {name}: it must print {expected}.\n{buggy_fn}\n"),
                output: format!("{fixed_fn}\n"),
                project: format!("fixture/{name}"),
                split: split.into(),
                provenance: Provenance {
                    source: "tests/rl.rs".into(),
                    path: format!("{name}.cpp"),
                    commit: None,
                    operator: None,
                    line: Some(2),
                    change: "the operator".into(),
                },
                check: Some(Check {
                    flags: Vec::new(),
                    support: Default::default(),
                    fixed: program(fixed_fn, call),
                    span: (start, start + buggy_fn.len()),
                    buggy,
                    oracle: Oracle {
                        stdout: format!("{expected}\n"),
                        exit_code: 0,
                    },
                    failure: Failure {
                        kind: "wrong-output".into(),
                        detector: "oracle".into(),
                        signal: None,
                        location: None,
                        line: None,
                        function: None,
                        message: String::new(),
                        values: Vec::new(),
                        stack: Vec::new(),
                        exit_code: Some(0),
                        expected: Some(expected.into()),
                        printed: None,
                    },
                    verified_by: "standalone".into(),
                }),
            }
        })
        .collect()
}

/// The pretrained tiny model fine-tuned on the train tasks' answers (so that some of
/// its samples fix the bug and some do not), and the task file.
struct Tuned {
    p: Pretrained,
    sft: std::path::PathBuf,
    tasks: std::path::PathBuf,
}

fn tuned() -> Tuned {
    let p = pretrained();
    let tasks = p.f.root.join("tasks.jsonl");
    let all = fixture_tasks();
    let lines: Vec<String> = all
        .iter()
        .map(|t| serde_json::to_string(t).unwrap())
        .collect();
    write(&tasks, lines.join("\n") + "\n");
    let examples: Vec<String> = all
        .iter()
        .filter(|t| t.split == "train")
        .map(|t| json!({"input": t.input, "output": t.output}).to_string())
        .collect();
    let data = p.f.root.join("sft.jsonl");
    let repeated: Vec<&str> = (0..8)
        .flat_map(|_| examples.iter().map(String::as_str))
        .collect();
    write(&data, repeated.join("\n") + "\n");
    let sft = p.f.root.join("sft");
    run_ok(&[
        "train",
        "sft",
        "--init",
        p.run.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "-o",
        sft.to_str().unwrap(),
        "--set",
        "train.device=cpu",
        "--set",
        "sft.recipe=nanochat",
        "--set",
        "train.device_batch=4",
        "--set",
        "train.total_batch_tokens=512",
        "--set",
        "sft.val_fraction=0",
        "--set",
        "sft.epochs=8",
        "--set",
        "eval.every=0",
    ]);
    Tuned { p, sft, tasks }
}

const SMALL: [&str; 22] = [
    "--set",
    "train.device=cpu",
    "--set",
    "rl.prompts=2",
    "--set",
    "rl.samples=4",
    "--set",
    "rl.max_new_tokens=24",
    "--set",
    "rl.temperature=1.0",
    "--set",
    "train.device_batch=4",
    "--set",
    "optim.matrix_lr=0.0003",
    "--set",
    "optim.embedding_lr=0.0003",
    "--set",
    "optim.unembedding_lr=0.0003",
    "--set",
    "eval.every=3",
    "--set",
    "rl.reward_workers=2",
];

fn rl_args(t: &Tuned, out: &Path, extra: &[&str]) -> Vec<String> {
    let head = [
        "train",
        "rl",
        "--init",
        t.sft.to_str().unwrap(),
        "--tasks",
        t.tasks.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    command_line(&head, &[&SMALL, extra])
}

/// Records without time, nor what the reward cache of one process happened to hold.
fn comparable(records: Vec<Value>) -> Vec<Value> {
    timeless(records)
        .into_iter()
        .map(|mut r| {
            for k in ["reward_cache_share", "programs_judged"] {
                r.as_object_mut().unwrap().remove(k);
            }
            r
        })
        .collect()
}

/// The completions rank `rank` of a run logged, without whether a verdict was the
/// cache's (what one process happened to hold).
fn rollouts(run: &Path, rank: usize) -> Vec<Value> {
    let file = match rank {
        0 => "rollouts.jsonl".to_string(),
        r => format!("rollouts-rank{r}.jsonl"),
    };
    let text = std::fs::read_to_string(run.join(file)).unwrap();
    text.lines()
        .map(|l| {
            let mut r: Value = serde_json::from_str(l).unwrap();
            r["verdict"].as_object_mut().unwrap().remove("cached");
            r
        })
        .collect()
}

/// `cxxlm train rl` with `settings` into `out`, on `ranks` ranks (`cxxlm launch`); what
/// it said.
fn rl_run(t: &Tuned, ranks: usize, out: &Path, settings: &[&str]) -> String {
    let mut args: Vec<String> = match ranks {
        1 => Vec::new(),
        n => vec!["launch".into(), "--gpus".into(), n.to_string(), "--".into()],
    };
    args.extend(rl_args(t, out, settings));
    String::from_utf8_lossy(&run_ok(&args).stderr).into_owned()
}

/// Sampling ahead, varied completions and rewards that fall with length: groups of equal
/// rewards are rare, so the batches drawn are learned from (one with nothing to learn is
/// replaced at once, by a batch the same policy sampled).
const AHEAD: [&str; 10] = [
    "--set",
    "rl.sample_ahead=true",
    "--set",
    "eval.every=0",
    "--set",
    "rl.temperature=1.5",
    "--set",
    "rl.overlong=\"penalty\"",
    "--set",
    "rl.overlong_buffer=22",
];

/// The metrics records of the steps that drew a rollout batch.
fn batch_records(all: &[Value]) -> Vec<&Value> {
    all.iter()
        .filter(|r| r.get("reward_mean").is_some())
        .collect()
}

/// Runs `settings` on `ranks` ranks stopped at step `stop_at` and then resumed, into
/// `name`: its metrics and every rank's logged completions must repeat `whole`'s (the
/// uninterrupted run's) bit for bit. `gives_up`: whether the stop finds the rollouts of
/// step `stop_at` asked for (the last step's prefetch), and gives them up unsampled.
fn stopped_and_resumed(
    t: &Tuned,
    ranks: usize,
    name: &str,
    settings: &[&str],
    (stop_at, gives_up): (&str, bool),
    whole: &Path,
) {
    let split = t.p.f.root.join(name);
    let said = rl_run(
        t,
        ranks,
        &split,
        &[settings, &["--stop-at", stop_at]].concat(),
    );
    assert!(
        said.contains(&format!("stopping at step {stop_at}")),
        "{said}"
    );
    assert_eq!(said.contains("its batch given up"), gives_up, "{said}");
    rl_run(t, ranks, &split, &[settings, &["--resume"]].concat());
    assert_eq!(
        comparable(metrics_records(&split)),
        comparable(metrics_records(whole)),
        "metrics repeat bit for bit"
    );
    for rank in 0..ranks {
        assert_eq!(
            rollouts(&split, rank),
            rollouts(whole, rank),
            "rank {rank}'s logged completions too"
        );
    }
}

#[test]
fn rl_rewards_completions_in_the_sandbox_and_resumes_bit_exactly() {
    let t = tuned();
    let whole = t.p.f.root.join("whole");
    let steps = ["--set", "train.steps=6", "--set", "rl.updates=2"];
    let said = run_ok(&rl_args(&t, &whole, &steps));
    let stderr = String::from_utf8_lossy(&said.stderr);
    assert!(
        stderr.contains("RL tasks: 3 to train on, 1 held out"),
        "{stderr}"
    );
    // The fine-tuned model's layout is its pretraining text's.
    assert!(
        stderr.contains("indentation: stripped (as in the training text, from the pack"),
        "{stderr}"
    );
    let all = metrics_records(&whole);
    let steps_done: Vec<&Value> = all.iter().filter(|r| r.get("loss").is_some()).collect();
    assert_eq!(steps_done.len(), 6, "{all:?}");

    // --check plans the update, the reference (with a KL term) and the sampler's cache,
    // which grows with the rollouts.
    let plan = |extra: &[&str]| {
        let args = rl_args(
            &t,
            &t.p.f.root.join("plan"),
            &[&["--check"][..], extra].concat(),
        );
        let said = run_ok(&args);
        let stderr = String::from_utf8_lossy(&said.stderr).into_owned();
        let gib = |part: &str| -> Option<f64> {
            let line = stderr.lines().find(|l| l.trim_start().starts_with(part))?;
            line.split_whitespace().nth(1)?.parse().ok()
        };
        let (sampler, reference) = (gib("sampler"), gib("reference"));
        (stderr, sampler, reference)
    };
    let (stderr, sampler, reference) = plan(&["--set", "rl.kl_coef=0.01"]);
    // 2 prompts x 4 samples over passes of 4 rows: 2 micro-batches, each the row of one
    // prompt and its samples.
    assert!(stderr.contains("1 rank(s), 1 row of"), "{stderr}");
    assert!(
        stderr.contains("attention mask") && stderr.contains("log-softmax"),
        "{stderr}"
    );
    assert!(sampler.is_some() && reference.is_some(), "{stderr}");
    let (stderr, more, none) = plan(&["--set", "rl.kl_coef=0", "--set", "rl.samples=4000"]);
    assert!(none.is_none() && more > sampler, "{stderr}");
    // Refused, as the run would be, where the rollout batch does not divide over the ranks.
    let e = run_fails(&rl_args(
        &t,
        &t.p.f.root.join("plan"),
        &["--check", "--ranks", "3"],
    ));
    assert!(
        e.contains("rl.prompts = 2 must be a multiple of the 3 ranks"),
        "{e}"
    );
    // A rollout batch every second step (two updates each), its figures on its first.
    let batches = batch_records(&all);
    assert_eq!(batches.len(), 3, "{all:?}");
    for b in &batches {
        assert_eq!(b["rollouts"], 8, "{b}");
        let parts: f64 = ["compile", "warnings", "tests", "reasoning"]
            .iter()
            .map(|p| b[format!("reward_{p}")].as_f64().unwrap())
            .sum();
        assert!(
            (parts - b["reward_mean"].as_f64().unwrap()).abs() < 1e-9,
            "{b}"
        );
        for k in [
            "compile_rate",
            "test_pass_rate",
            "zero_std_groups",
            "truncated_share",
            "rollouts_s",
            "reward_wait_share",
            "entropy",
            "clip_low_share",
            "kl",
        ] {
            assert!(b[k].as_f64().is_some(), "{k} missing: {b}");
        }
        // Sampling's time, split: the parts make the whole; the steps are the longest
        // completion's tokens in each round sampled.
        let part = |k: &str| b[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {b}"));
        let split =
            part("prefill_seconds") + part("decode_seconds") + part("sampled_logprob_seconds");
        assert!((split - part("generation_seconds")).abs() < 1e-9, "{b}");
        let steps = b["decode_steps"].as_u64().unwrap();
        assert!(steps > 0, "{b}");
    }
    // Samples of the fine-tuned model compile and pass at times, fail at others.
    let compiled: f64 = batches
        .iter()
        .map(|b| b["compile_rate"].as_f64().unwrap())
        .sum();
    assert!(compiled > 0.0, "{batches:?}");
    // The first update of a batch is on-policy: the ratio is exactly 1.
    assert_eq!(batches[0]["ratio_max_distance"].as_f64(), Some(0.0));
    let held_out: Vec<&Value> = all
        .iter()
        .filter(|r| r.get("val_pass_at_1").is_some())
        .collect();
    assert_eq!(held_out.len(), 3, "at the start, step 3 and the end");

    // The policy's KL to the reference above rl.max_kl refuses the update: here the
    // second (the first's KL is 0, the policy being the reference).
    let kl = steps_done[1]["kl"].as_f64().unwrap();
    assert!(
        steps_done[0]["kl"].as_f64() == Some(0.0) && kl > 0.0,
        "{all:?}"
    );
    let runaway = t.p.f.root.join("runaway");
    let max_kl = format!("rl.max_kl={}", kl / 2.0);
    let e = run_fails(&rl_args(
        &t,
        &runaway,
        &[&steps[..], &["--set", &max_kl]].concat(),
    ));
    assert!(
        e.contains("the KL estimate to the reference reached"),
        "{e}"
    );
    let steps_taken = metrics_records(&runaway)
        .iter()
        .filter(|r| r.get("loss").is_some())
        .count();
    assert_eq!(steps_taken, 1);

    // Every completion is logged with its reward, task and verdict. A batch with nothing
    // to learn is drawn again: the one learned from is the next whose mean reward is the
    // metrics' figure.
    let logged = rollouts(&whole, 0);
    let tasks: Vec<String> = fixture_tasks().into_iter().map(|t| t.id).collect();
    for r in &logged {
        assert!(
            tasks.contains(&r["task"].as_str().unwrap().to_string()),
            "{r}"
        );
        assert_eq!(r["verdict"]["reward"], r["reward"], "{r}");
        assert!(r["verdict"]["judged"]["compiled"].is_boolean(), "{r}");
        assert!(
            r["completion"].is_string() && r["tokens"].as_u64() > Some(0),
            "{r}"
        );
    }
    let drawn = logged.last().unwrap()["batch"].as_u64().unwrap() + 1;
    let mut next = 0;
    for b in &batches {
        loop {
            let batch: Vec<&Value> = logged.iter().filter(|r| r["batch"] == next).collect();
            assert_eq!(batch.len(), 8, "batch {next}: {logged:?}");
            next += 1;
            let mean = batch
                .iter()
                .map(|r| r["reward"].as_f64().unwrap())
                .sum::<f64>()
                / 8.0;
            if (mean - b["reward_mean"].as_f64().unwrap()).abs() < 1e-9 {
                break;
            }
            assert!(batch.iter().all(|r| r["advantage"].is_null()), "{batch:?}");
            assert!(next < drawn, "no logged batch has the mean of {b}");
        }
    }

    // Stopped in the middle of a rollout batch's updates, then resumed.
    stopped_and_resumed(&t, 1, "split", &steps, ("3", false), &whole);

    // Bad settings and inputs are named.
    let bad = t.p.f.root.join("bad");
    let e = run_fails(&rl_args(&t, &bad, &["--set", "rl.samples=1"]));
    assert!(e.contains("rl.samples = 1 must be at least 2"), "{e}");
    let e = run_fails(&rl_args(&t, &bad, &["--set", "rl.max_new_tokens=120"]));
    assert!(
        e.contains("no runnable train-split task") && e.contains("tokens: rl.max_new_tokens = "),
        "{e}"
    );
    let e = run_fails(&rl_args(&t, &bad, &["--set", "rl.prompt=3"]));
    assert!(e.contains("unknown field `prompt`"), "{e}");
}

#[test]
fn sampling_ahead_learns_from_the_batch_drawn_an_update_earlier_and_resumes_bit_exactly() {
    let t = tuned();
    let whole = t.p.f.root.join("ahead");
    let steps = [&AHEAD[..], &["--set", "train.steps=4"]].concat();
    rl_run(&t, 1, &whole, &steps);
    let all = metrics_records(&whole);
    let batches = batch_records(&all);
    assert_eq!(batches.len(), 4, "{all:?}");
    // The first batch was sampled by the policy it updates; every later one by the
    // policy before the last update, which the ratio now sees moved.
    let distance = |b: &Value| b["ratio_max_distance"].as_f64().unwrap();
    assert!(distance(batches[0]) < 1e-3, "{:?}", batches[0]);
    for b in &batches[1..] {
        assert!(distance(b) > distance(batches[0]), "{b}");
        assert_eq!(b["rollouts"], 8, "{b}");
    }

    // Stopped with a batch sampled and not yet learned from, then resumed: the batch
    // comes back from the checkpoint and is judged again. The next batch, which the stop
    // found asked for, is not sampled until the resumed run asks again.
    stopped_and_resumed(&t, 1, "ahead-split", &steps, ("2", true), &whole);
}

/// Two ranks share out a rollout batch's prompts (each samples K completions of its
/// half), learn from the batch together, and report it whole: its figures are those of
/// both ranks' logged completions. Stopped with a batch in flight and resumed, each rank
/// goes on from its own share, bit for bit.
#[test]
fn two_ranks_sample_half_the_prompts_each_report_the_whole_batch_and_resume_exactly() {
    let t = tuned();
    let run = t.p.f.root.join("two");
    let settings = [&AHEAD[..], &["--set", "train.steps=3"]].concat();
    rl_run(&t, 2, &run, &settings);
    let all = metrics_records(&run);
    let batches = batch_records(&all);
    assert_eq!(batches.len(), 3, "{all:?}");
    let ranks = [rollouts(&run, 0), rollouts(&run, 1)];
    // A batch with nothing to learn on either rank is drawn again by both.
    let mut next = 0;
    for b in &batches {
        assert_eq!(b["rollouts"], 8, "{b}");
        loop {
            let of = |rank: usize| -> Vec<&Value> {
                ranks[rank].iter().filter(|r| r["batch"] == next).collect()
            };
            let (first, second) = (of(0), of(1));
            assert_eq!(
                (first.len(), second.len()),
                (4, 4),
                "batch {next}: {ranks:?}"
            );
            assert_ne!(
                first[0]["task"], second[0]["task"],
                "each rank its own prompt"
            );
            next += 1;
            let both: Vec<&Value> = first.into_iter().chain(second).collect();
            if both.iter().all(|r| r["advantage"].is_null()) {
                continue;
            }
            let mean = |f: &dyn Fn(&Value) -> f64| both.iter().map(|r| f(r)).sum::<f64>() / 8.0;
            let reward = mean(&|r| r["reward"].as_f64().unwrap());
            let compiled =
                mean(&|r| f64::from(u8::from(r["verdict"]["judged"]["compiled"] == true)));
            let length = mean(&|r| r["tokens"].as_f64().unwrap());
            for (figure, want) in [
                ("reward_mean", reward),
                ("compile_rate", compiled),
                ("completion_tokens_mean", length),
            ] {
                let got = b[figure].as_f64().unwrap();
                assert!(
                    (got - want).abs() < 1e-9,
                    "{figure}: {got} against {want}: {b}"
                );
            }
            break;
        }
    }

    // Stopped with the batch sampled ahead in flight on each rank, then resumed.
    stopped_and_resumed(&t, 2, "two-split", &settings, ("2", true), &run);
}
