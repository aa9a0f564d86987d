//! `cxxlm speedrun`: data -> dedup -> tokenizer -> pack -> pretrain -> (with
//! `long_context`: pack-repo -> pretrain-long, the model continued at that context on
//! repository examples) -> evaluations of the last pretrained model ->
//! (with SFT data: sft -> MBPP-C++ again) -> (with tasks: rl) -> report card, each stage a
//! `cxxlm` command run as its own process with its log kept. With tasks, each model (the
//! pretrained, the fine-tuned, the reinforced) also fixes the held-out bugs of their test
//! split (`eval bugfix`).
//! `speedrun.json` records each stage's command and a fingerprint of it and of the stages
//! before it: a rerun skips finished stages whose outputs are still there, and continues
//! an interrupted one (each stage resumes its own partial work).

use anyhow::{bail, Context, Result};
use clap::Args;
use cxxlm_report::Layout;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::interrupt;

const PRESETS: [(&str, &str); 5] = [
    ("cpu-tiny", include_str!("../presets/cpu-tiny.toml")),
    ("gpu-10min", include_str!("../presets/gpu-10min.toml")),
    ("gpu-long", include_str!("../presets/gpu-long.toml")),
    ("m0", include_str!("../presets/m0.toml")),
    ("m1", include_str!("../presets/m1.toml")),
];

#[derive(Args)]
pub struct SpeedrunArgs {
    /// cpu-tiny (minutes on a CPU), gpu-10min (one H100), m0 or m1 (the seeds' milestones).
    #[arg(long, default_value = "cpu-tiny", value_parser = PRESETS.map(|p| p.0))]
    preset: String,
    /// Inputs of the data stage (any input `cxxlm data run` reads); replace the preset's.
    #[arg(long, num_args = 1..)]
    sources: Vec<String>,
    /// The run directory (default runs/<preset>).
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Override a setting of the preset, e.g. `--set pretrain.train.steps=20`. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// JSON lines of SFT examples (replace the preset's `sft_data`): an `sft` stage then
    /// fine-tunes the pretrained model on them, and MBPP-C++ evaluates it again.
    #[arg(long, num_args = 1..)]
    sft_data: Vec<String>,
    /// Tasks of `tasks bugs` (replace the preset's `rl_tasks`): an `rl` stage then trains
    /// the fine-tuned (or pretrained) model on them with the compiler as judge.
    #[arg(long, num_args = 1..)]
    rl_tasks: Vec<String>,
    /// Discard the outputs of this stage and of every later one, and run them again.
    #[arg(long, value_name = "STAGE")]
    redo: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    sources: Vec<String>,
    #[serde(default)]
    data: DataSettings,
    #[serde(default)]
    tokenizer: TokenizerSettings,
    #[serde(default)]
    pack: PackSettings,
    /// A `train pretrain` config; `out` and `data.pack` are set by the speedrun.
    #[serde(default)]
    pretrain: toml::Table,
    /// GPUs (data-parallel ranks) of the pretraining stage, started by `cxxlm launch`.
    #[serde(default = "one_gpu")]
    gpus: usize,
    /// Phase B: the pretrained model continued at this many tokens on repository examples
    /// (`pack --repo-context`); 0: no phase B.
    #[serde(default)]
    long_context: usize,
    /// The share of phase B's examples that are single files (`pack --repo-file-share`).
    #[serde(default = "long_file_share")]
    long_file_share: f64,
    /// Phase B's `train pretrain` config; `init`, `out` and `data.pack` are set by the
    /// speedrun, `model.seq_len` (to `long_context`), `data.document_mask` (true) and
    /// `train.device` (pretraining's) when absent.
    #[serde(default)]
    long: toml::Table,
    #[serde(default)]
    eval: EvalSettings,
    /// SFT examples; none: no fine-tuning stage.
    #[serde(default)]
    sft_data: Vec<String>,
    /// A `train sft` config; `init`, `out`, `sft.data` and `sft.tokenizer` are set by the
    /// speedrun.
    #[serde(default)]
    sft: toml::Table,
    /// SFT replays the run's pack: `sft.sft.replay_share` of its rows are pretraining
    /// windows.
    #[serde(default)]
    sft_replay: bool,
    /// Task files of `tasks bugs` for RL; none: no RL stage.
    #[serde(default)]
    rl_tasks: Vec<String>,
    /// A `train rl` config; `init`, `out`, `rl.tasks` and `rl.tokenizer` are set by the
    /// speedrun.
    #[serde(default)]
    rl: toml::Table,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct DataSettings {
    /// Skip files larger than this (0 = the data stage's default).
    max_file_bytes: u64,
    keep_indentation: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct TokenizerSettings {
    vocab: usize,
    /// Train on at most this many MB of text (0 = all).
    max_mb: u64,
    /// Superword merges from the lines of this many MiB (0 = first stage only).
    second_stage_mib: usize,
    /// The longest token learned, in bytes (0 = no limit).
    max_token_bytes: usize,
    /// Superwords kept within a line (no second-stage merge takes in a line break).
    superwords_within_lines: bool,
    /// A line's indentation kept apart from the punctuation and line break before it.
    indentation_apart: bool,
}

impl Default for TokenizerSettings {
    fn default() -> Self {
        TokenizerSettings {
            vocab: 32768,
            max_mb: 0,
            second_stage_mib: 0,
            max_token_bytes: 0,
            superwords_within_lines: false,
            indentation_apart: false,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct PackSettings {
    fim_rate: f64,
    fim_spm_rate: f64,
    line_aligned: bool,
    val_fraction: f64,
}

impl Default for PackSettings {
    fn default() -> Self {
        PackSettings {
            fim_rate: 0.5,
            fim_spm_rate: 0.5,
            line_aligned: true,
            val_fraction: 0.01,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct EvalSettings {
    /// MB of the shards the tokenizer is compared with tiktoken's encodings on.
    tokenizer_mb: u64,
    /// Validation tokens for bits per byte (0 = the whole split).
    bpb_tokens: usize,
    fim_documents: usize,
    compile_functions: usize,
    compile_max_tokens: usize,
    /// MBPP-C++ problems (0 = all 398).
    mbpp_problems: usize,
    mbpp_max_tokens: usize,
    /// Another MultiPL-E-format benchmark instead of the built-in MBPP-C++.
    mbpp_file: Option<PathBuf>,
    /// Held-out bug-fix tasks (the test split of the RL tasks) each model answers
    /// (0 = all).
    bugfix_tasks: usize,
    bugfix_max_tokens: usize,
    /// Sequences generated together.
    batch: usize,
}

impl Default for EvalSettings {
    fn default() -> Self {
        EvalSettings {
            tokenizer_mb: 64,
            bpb_tokens: 0,
            fim_documents: 200,
            compile_functions: 64,
            compile_max_tokens: 256,
            mbpp_problems: 0,
            mbpp_max_tokens: 384,
            mbpp_file: None,
            bugfix_tasks: 100,
            bugfix_max_tokens: 256,
            batch: 32,
        }
    }
}

/// One stage: the `cxxlm` arguments that run it, the files it writes, and whether what
/// is there now is a complete output.
struct Stage {
    name: &'static str,
    args: Vec<String>,
    /// Also fingerprinted: inputs that the arguments only name (a config file's text).
    content: String,
    outputs: Vec<PathBuf>,
    complete: Box<dyn Fn() -> bool>,
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn exists(p: PathBuf) -> Box<dyn Fn() -> bool> {
    Box::new(move || p.exists())
}

fn one_gpu() -> usize {
    1
}

fn long_file_share() -> f64 {
    0.3
}

/// The configs written for the training stages.
struct Configs {
    pretrain: String,
    long: String,
    sft: String,
    rl: String,
}

fn stages(config: &Config, l: &Layout, tomls: &Configs) -> Vec<Stage> {
    let mut data_args = vec!["data".into(), "run".into(), "-o".into(), s(&l.data())];
    for src in &config.sources {
        data_args.extend(["-i".into(), src.clone()]);
    }
    if config.data.max_file_bytes > 0 {
        data_args.extend(["--max-bytes".into(), config.data.max_file_bytes.to_string()]);
    }
    if config.data.keep_indentation {
        data_args.push("--keep-indentation".into());
    }
    let mut tok_args = vec![
        "tok".into(),
        "train".into(),
        "-i".into(),
        s(&l.dedup()),
        "--vocab".into(),
        config.tokenizer.vocab.to_string(),
        "-o".into(),
        s(&l.tokenizer()),
    ];
    if config.tokenizer.max_mb > 0 {
        tok_args.extend([
            "--max-bytes".into(),
            (config.tokenizer.max_mb * 1_000_000).to_string(),
        ]);
    }
    if config.tokenizer.second_stage_mib > 0 {
        tok_args.extend([
            "--second-stage-mib".into(),
            config.tokenizer.second_stage_mib.to_string(),
        ]);
    }
    if config.tokenizer.max_token_bytes > 0 {
        tok_args.extend([
            "--max-token-bytes".into(),
            config.tokenizer.max_token_bytes.to_string(),
        ]);
    }
    if config.tokenizer.superwords_within_lines {
        tok_args.push("--superwords-within-lines".into());
    }
    if config.tokenizer.indentation_apart {
        tok_args.push("--indentation-apart".into());
    }
    let p = &config.pack;
    // `cxxlm pack` of the deduplicated shards into `out`, with the run's settings.
    let pack_args = |out: &Path| {
        let mut args = vec![
            "pack".into(),
            "--tokenizer".into(),
            s(&l.tokenizer()),
            "-i".into(),
            s(&l.dedup()),
            "-o".into(),
            s(out),
            "--fim-rate".into(),
            p.fim_rate.to_string(),
            "--fim-spm-rate".into(),
            p.fim_spm_rate.to_string(),
            "--val-fraction".into(),
            p.val_fraction.to_string(),
        ];
        if p.line_aligned {
            args.push("--fim-line-aligned".to_string());
        }
        args
    };
    let e = &config.eval;
    // Stage `name`: `cxxlm eval <cmd>` of the model in `checkpoint`, its JSON at
    // `eval/<file>.json`.
    let eval_of =
        |name: &'static str, cmd: &str, file: &str, checkpoint: &Path, more: &[String]| {
            let mut args: Vec<String> = vec![
                "eval".into(),
                cmd.into(),
                "--checkpoint".into(),
                s(checkpoint),
                "--json".into(),
                s(&l.eval(file)),
            ];
            args.extend_from_slice(more);
            Stage {
                name,
                args,
                content: String::new(),
                outputs: vec![l.eval(file)],
                complete: exists(l.eval(file)),
            }
        };
    let base = base_model(config, l);
    let model_eval = |name, cmd: &str, more: &[String]| eval_of(name, cmd, cmd, &base, more);
    // The held-out bug fixes of the tasks' test split, answered by the model in `checkpoint`.
    let mut bugfix_args = vec![
        "--split".into(),
        "test".into(),
        "--max-tokens".into(),
        e.bugfix_max_tokens.to_string(),
        "--batch".into(),
        e.batch.to_string(),
    ];
    for t in &config.rl_tasks {
        bugfix_args.extend(["--tasks".into(), t.clone()]);
    }
    if e.bugfix_tasks > 0 {
        bugfix_args.extend(["--limit".into(), e.bugfix_tasks.to_string()]);
    }
    let bugfix = |name, file: &str, checkpoint: &Path| {
        eval_of(name, "bugfix", file, checkpoint, &bugfix_args)
    };
    let pack = l.pack();
    let tokenizer = l.tokenizer();
    let mut list = vec![
        Stage {
            name: "data",
            args: data_args,
            content: String::new(),
            outputs: vec![l.data()],
            complete: exists(l.data().join("stats.json")),
        },
        Stage {
            name: "dedup",
            args: vec![
                "data".into(),
                "dedup".into(),
                "-i".into(),
                s(&l.data()),
                "-o".into(),
                s(&l.dedup()),
            ],
            content: String::new(),
            outputs: vec![l.dedup()],
            complete: exists(l.dedup().join("near-dedup-report.json")),
        },
        Stage {
            name: "tokenizer",
            args: tok_args,
            content: String::new(),
            outputs: vec![l.tokenizer()],
            complete: Box::new({
                let t = tokenizer.clone();
                move || cxxlm_tokenizer::load(&t).is_ok()
            }),
        },
        Stage {
            name: "pack",
            args: pack_args(&l.pack()),
            content: String::new(),
            outputs: vec![l.pack()],
            complete: Box::new(move || packed_with(&pack, &tokenizer).is_some()),
        },
        training(
            "pretrain",
            "pretrain",
            config.gpus,
            l.train_config(),
            &tomls.pretrain,
            l.train(),
        ),
    ];
    if config.long_context > 0 {
        let mut repo_args = pack_args(&l.pack_repo());
        repo_args.extend([
            "--repo-context".into(),
            config.long_context.to_string(),
            "--repo-file-share".into(),
            config.long_file_share.to_string(),
        ]);
        let (pack_repo, tokenizer) = (l.pack_repo(), l.tokenizer());
        list.push(Stage {
            name: "pack-repo",
            args: repo_args,
            content: String::new(),
            outputs: vec![l.pack_repo()],
            // Without held-out repositories there is nothing to score phase B on: stopped
            // here, before it trains (the stage's log says to raise the fraction).
            complete: Box::new(move || {
                packed_with(&pack_repo, &tokenizer)
                    .is_some_and(|m| m.splits.get("val").is_some_and(|v| v.documents > 0))
            }),
        });
        list.push(training(
            "pretrain-long",
            "pretrain",
            config.gpus,
            l.long_config(),
            &tomls.long,
            l.long(),
        ));
        list.push(eval_of(
            "eval-bpb-long",
            "bpb",
            "bpb-long",
            &base,
            &[
                "--pack".into(),
                s(&l.pack_repo()),
                "--document-mask".into(),
                "--tokens".into(),
                e.bpb_tokens.to_string(),
            ],
        ));
    }
    list.extend([
        Stage {
            name: "eval-tokenizer",
            args: vec![
                "tok".into(),
                "eval".into(),
                "--tokenizer".into(),
                s(&l.tokenizer()),
                "--max-bytes".into(),
                (e.tokenizer_mb * 1_000_000).to_string(),
                "--json".into(),
                s(&l.eval("tokenizer")),
                s(&l.dedup()),
            ],
            content: String::new(),
            outputs: vec![l.eval("tokenizer")],
            complete: exists(l.eval("tokenizer")),
        },
        model_eval(
            "eval-bpb",
            "bpb",
            &[
                "--pack".into(),
                s(&l.pack()),
                "--tokens".into(),
                e.bpb_tokens.to_string(),
            ],
        ),
        model_eval(
            "eval-fim",
            "fim",
            &[
                "--pack".into(),
                s(&l.pack()),
                "--documents".into(),
                e.fim_documents.to_string(),
                "--batch".into(),
                e.batch.to_string(),
                "--cache".into(),
                s(&l.root.join("cache")),
            ],
        ),
        model_eval(
            "eval-compile",
            "compile",
            &[
                "--pack".into(),
                s(&l.pack()),
                "--functions".into(),
                e.compile_functions.to_string(),
                "--max-tokens".into(),
                e.compile_max_tokens.to_string(),
                "--batch".into(),
                e.batch.to_string(),
                "--cache".into(),
                s(&l.root.join("cache")),
            ],
        ),
    ]);
    let mut more = vec![
        "--max-tokens".into(),
        e.mbpp_max_tokens.to_string(),
        "--batch".into(),
        e.batch.to_string(),
        "--completions-out".into(),
        s(&l.mbpp_completions()),
        "--cache".into(),
        s(&l.root.join("cache")),
    ];
    if let Some(file) = &e.mbpp_file {
        more.extend(["--problems".into(), s(file)]);
    }
    if e.mbpp_problems > 0 {
        more.extend(["--limit".into(), e.mbpp_problems.to_string()]);
    }
    let mut mbpp = model_eval("eval-mbpp", "mbpp", &more);
    mbpp.outputs.push(l.mbpp_completions());
    list.push(mbpp);
    let tasks = !config.rl_tasks.is_empty();
    if tasks {
        list.push(bugfix("eval-bugfix", "bugfix", &base));
    }
    if !config.sft_data.is_empty() {
        list.push(training(
            "sft",
            "sft",
            config.gpus,
            l.sft_config(),
            &tomls.sft,
            l.sft(),
        ));
        // The same benchmark, of the fine-tuned model.
        let completions = l.root.join("eval").join("mbpp-sft-completions.jsonl");
        let more: Vec<String> = more
            .iter()
            .map(|a| match *a == s(&l.mbpp_completions()) {
                true => s(&completions),
                false => a.clone(),
            })
            .collect();
        let mut mbpp = eval_of("eval-mbpp-sft", "mbpp", "mbpp-sft", &l.sft(), &more);
        mbpp.outputs.push(completions);
        list.push(mbpp);
        if tasks {
            list.push(bugfix("eval-bugfix-sft", "bugfix-sft", &l.sft()));
        }
    }
    if tasks {
        list.push(training(
            "rl",
            "rl",
            config.gpus,
            l.rl_config(),
            &tomls.rl,
            l.rl(),
        ));
        list.push(bugfix("eval-bugfix-rl", "bugfix-rl", &l.rl()));
    }
    list
}

/// The manifest of `pack` when it is a complete pack made with `tokenizer`.
fn packed_with(pack: &Path, tokenizer: &Path) -> Option<cxxlm_pack::Manifest> {
    let (Ok(m), Ok(bpe)) = (
        cxxlm_pack::Manifest::load(pack),
        cxxlm_tokenizer::load(tokenizer),
    ) else {
        return None;
    };
    m.check_tokenizer(pack, &bpe).is_ok().then_some(m)
}

/// The last pretrained model: phase B's when there is one.
fn base_model(config: &Config, l: &Layout) -> PathBuf {
    match config.long_context {
        0 => l.train(),
        _ => l.long(),
    }
}

/// Stage `name`: `cxxlm train COMMAND --config CONFIG --resume` (through the launcher on
/// several GPUs), complete once the run in `run` has taken its last step.
fn training(
    name: &'static str,
    command: &str,
    gpus: usize,
    config: PathBuf,
    content: &str,
    run: PathBuf,
) -> Stage {
    Stage {
        name,
        args: launch_prefix(gpus)
            .into_iter()
            .chain([
                "train".into(),
                command.into(),
                "--config".into(),
                s(&config),
                "--resume".into(),
            ])
            .collect(),
        content: content.to_string(),
        outputs: vec![run.clone(), config],
        complete: Box::new(move || finished_training(&run)),
    }
}

/// `cxxlm launch --gpus N --` for several GPUs, nothing for one.
fn launch_prefix(gpus: usize) -> Vec<String> {
    match gpus {
        0 | 1 => Vec::new(),
        n => vec!["launch".into(), "--gpus".into(), n.to_string(), "--".into()],
    }
}

/// Whether the newest checkpoint of the training run in `run` is its last step.
fn finished_training(run: &Path) -> bool {
    let Some(dir) = cxxlm_report::newest_checkpoint(run) else {
        return false;
    };
    let state: Option<Value> = std::fs::read_to_string(dir.join("trainer.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    state.is_some_and(|s| s["step"].is_u64() && s["step"] == s["total_steps"])
}

/// The settings of preset `name`; one that `extends` another is that one's with its own
/// keys laid over it, table by table.
fn preset_table(name: &str) -> Result<toml::Table> {
    let text = PRESETS
        .iter()
        .find(|p| p.0 == name)
        .map(|p| p.1)
        .with_context(|| format!("unknown preset {name}"))?;
    let mut doc: toml::Table = toml::from_str(text).with_context(|| format!("preset {name}"))?;
    match doc.remove("extends") {
        None => Ok(doc),
        Some(toml::Value::String(base)) => {
            let mut merged = preset_table(&base)?;
            lay_over(&mut merged, doc);
            Ok(merged)
        }
        Some(_) => bail!("preset {name}: `extends` names a preset"),
    }
}

fn lay_over(base: &mut toml::Table, top: toml::Table) {
    for (key, value) in top {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(under)), toml::Value::Table(over)) => lay_over(under, over),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

fn load_config(args: &SpeedrunArgs) -> Result<(Config, String)> {
    let mut doc = preset_table(&args.preset)?;
    for o in &args.overrides {
        crate::cli::set(&mut doc, o)?;
    }
    for (key, given) in [("sft_data", &args.sft_data), ("rl_tasks", &args.rl_tasks)] {
        if !given.is_empty() {
            let values = given.iter().cloned().map(toml::Value::String);
            doc.insert(key.into(), toml::Value::Array(values.collect()));
        }
    }
    if !args.sources.is_empty() {
        doc.insert(
            "sources".into(),
            toml::Value::Array(
                args.sources
                    .iter()
                    .cloned()
                    .map(toml::Value::String)
                    .collect(),
            ),
        );
    }
    let text = toml::to_string_pretty(&doc)?;
    let config: Config = toml::Value::Table(doc)
        .try_into()
        .context("speedrun settings")?;
    if config.sources.is_empty() {
        bail!("no sources: pass --sources");
    }
    Ok((config, text))
}

/// The table `key` of the stage config `table` (`<stage>.<key>` in the speedrun's),
/// made when absent.
fn section<'t>(table: &'t mut toml::Table, stage: &str, key: &str) -> Result<&'t mut toml::Table> {
    table
        .entry(key)
        .or_insert_with(|| toml::Value::Table(Default::default()))
        .as_table_mut()
        .with_context(|| format!("{stage}.{key} is not a table"))
}

/// The `train pretrain` config of the run, checked (by `train pretrain --check`) before
/// anything runs.
fn pretrain_config(config: &Config, l: &Layout) -> Result<String> {
    let mut table = config.pretrain.clone();
    table.insert("out".into(), toml::Value::String(s(&l.train())));
    let data = section(&mut table, "pretrain", "data")?;
    data.insert("pack".into(), toml::Value::String(s(&l.pack())));
    data.insert("tokenizer".into(), toml::Value::String(s(&l.tokenizer())));
    checked_config("pretrain", "pretrain", &table, l)
}

/// Phase B's `train pretrain` config (empty without `long_context`), checked before
/// anything runs: the model it continues does not exist yet, so what is checked is a
/// model of pretraining's shape with phase B's context, rotary, batch and memory.
fn long_config(config: &Config, l: &Layout) -> Result<String> {
    if config.long_context == 0 {
        return Ok(String::new());
    }
    let table = long_table(config, l)?;
    let mut fresh = table.clone();
    fresh.remove("init");
    let pretrained = config.pretrain.get("model").and_then(|m| m.as_table());
    let model = section(&mut fresh, "long", "model")?;
    for (k, v) in pretrained.into_iter().flatten() {
        model.entry(k.clone()).or_insert_with(|| v.clone());
    }
    checked_config("pretrain", "long", &fresh, l)?;
    Ok(toml::to_string_pretty(&table)?)
}

fn long_table(config: &Config, l: &Layout) -> Result<toml::Table> {
    let mut table = config.long.clone();
    table.insert("out".into(), toml::Value::String(s(&l.long())));
    table.insert("init".into(), toml::Value::String(s(&l.train())));
    // The model is the pretrained one; only its context and rotary may change.
    section(&mut table, "long", "model")?
        .entry("seq_len")
        .or_insert_with(|| toml::Value::Integer(config.long_context as i64));
    let device = config
        .pretrain
        .get("train")
        .and_then(|t| t.get("device"))
        .cloned();
    if let Some(device) = device {
        section(&mut table, "long", "train")?
            .entry("device")
            .or_insert(device);
    }
    let data = section(&mut table, "long", "data")?;
    data.insert("pack".into(), toml::Value::String(s(&l.pack_repo())));
    data.insert("tokenizer".into(), toml::Value::String(s(&l.tokenizer())));
    data.entry("document_mask")
        .or_insert(toml::Value::Boolean(true));
    Ok(table)
}

/// `table` as TOML, once `cxxlm train <command> --check` accepts it (`stage` names the
/// speedrun's settings in the error).
fn checked_config(command: &str, stage: &str, table: &toml::Table, l: &Layout) -> Result<String> {
    let text = toml::to_string_pretty(table)?;
    let check = l.root.join(format!("{stage}.check.toml"));
    std::fs::write(&check, &text).with_context(|| format!("writing {}", check.display()))?;
    let checked = Command::new(std::env::current_exe()?)
        .args(["train", command, "--check", "--config"])
        .arg(&check)
        .output()
        .with_context(|| format!("checking the {stage} settings"))?;
    let _ = std::fs::remove_file(&check);
    if !checked.status.success() {
        bail!(
            "{stage} settings: {}",
            String::from_utf8_lossy(&checked.stderr).trim()
        );
    }
    Ok(text)
}

/// The `train sft` config of the run (empty without SFT data), checked (by `train sft
/// --check`) before anything runs.
fn sft_config(config: &Config, l: &Layout) -> Result<String> {
    let mut table = config.sft.clone();
    if config.sft_replay {
        let own = section(&mut table, "sft", "sft")?;
        own.insert("replay_pack".into(), toml::Value::String(s(&l.pack())));
    }
    tuning_config(
        "sft",
        &table,
        "data",
        &config.sft_data,
        &base_model(config, l),
        &l.sft(),
        l,
    )
}

/// The `train rl` config of the run (empty without tasks), from the fine-tuned model
/// when there is one, else the pretrained one; checked before anything runs.
fn rl_config(config: &Config, l: &Layout) -> Result<String> {
    let init = match config.sft_data.is_empty() {
        true => base_model(config, l),
        false => l.sft(),
    };
    tuning_config(
        "rl",
        &config.rl,
        "tasks",
        &config.rl_tasks,
        &init,
        &l.rl(),
        l,
    )
}

/// The config of a stage that trains an earlier stage's model further (`train sft`,
/// `train rl`): the preset's `table` with `out`, `init`, its inputs (`<stage>.<key>`)
/// and the tokenizer set, checked by `train <stage> --check`. Empty without inputs.
fn tuning_config(
    stage: &str,
    table: &toml::Table,
    key: &str,
    inputs: &[String],
    init: &Path,
    out: &Path,
    l: &Layout,
) -> Result<String> {
    if inputs.is_empty() {
        return Ok(String::new());
    }
    let mut table = table.clone();
    table.insert("out".into(), toml::Value::String(s(out)));
    table.insert("init".into(), toml::Value::String(s(init)));
    let own = section(&mut table, stage, stage)?;
    let inputs = inputs.iter().cloned().map(toml::Value::String);
    own.insert(key.into(), toml::Value::Array(inputs.collect()));
    own.insert("tokenizer".into(), toml::Value::String(s(&l.tokenizer())));
    checked_config(stage, stage, &table, l)
}

fn fingerprint(before: &str, stage: &Stage) -> String {
    let text = format!("{before}\n{}\n{}", stage.args.join("\u{0}"), stage.content);
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes()))
}

fn command_line(args: &[String]) -> String {
    let quote = |a: &String| {
        if !a.is_empty()
            && a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+".contains(c))
        {
            a.clone()
        } else {
            format!("'{}'", a.replace('\'', "'\\''"))
        }
    };
    std::iter::once("cxxlm".to_string())
        .chain(args.iter().map(quote))
        .collect::<Vec<_>>()
        .join(" ")
}

fn first_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .next()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
}

/// Hardware and versions, for the report card.
fn host() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let field = |text: &str, key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_once([':', '=']))
            .map(|(_, v)| v.trim().trim_matches('"').to_string())
    };
    let cpuinfo = read("/proc/cpuinfo");
    let mem_kb: f64 = field(&read("/proc/meminfo"), "MemTotal")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let gpus = first_line(
        "nvidia-smi",
        &["--query-gpu=name,memory.total", "--format=csv,noheader"],
    );
    json!({
        "cxxlm": env!("CARGO_PKG_VERSION"),
        "libtorch": option_env!("CXXLM_LIBTORCH_VERSION").unwrap_or("unknown"),
        "GPU": gpus.unwrap_or_else(|| "none".into()),
        "CPU": field(&cpuinfo, "model name").unwrap_or_else(|| "unknown".into()),
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "memory": format!("{:.1} GiB", mem_kb / (1u64 << 20) as f64),
        "OS": field(&read("/etc/os-release"), "PRETTY_NAME").unwrap_or_else(|| std::env::consts::OS.into()),
        "g++": first_line("g++", &["--version"]).unwrap_or_else(|| "not found".into()),
    })
}

fn save(path: &Path, record: &Value) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(record)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// How a stage's process ended.
enum StageEnd {
    Succeeded,
    /// With its exit status.
    Failed(String),
    Interrupted,
}

/// Runs `cxxlm <args>`, its output shown and kept in `log`. Ctrl-C or SIGTERM reach it
/// (it stops at a safe point), and then the speedrun stops too.
fn run_stage(args: &[String], log: &Path) -> Result<StageEnd> {
    let exe = std::env::current_exe().context("finding the cxxlm binary")?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let file = Arc::new(Mutex::new(file));
    let mut child = Command::new(exe)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting a stage")?;
    let tee = |mut from: Box<dyn Read + Send>, to_stdout: bool| {
        let file = Arc::clone(&file);
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut f) = file.lock() {
                    let _ = f.write_all(&buf[..n]);
                }
                let _ = if to_stdout {
                    std::io::stdout().write_all(&buf[..n])
                } else {
                    std::io::stderr().write_all(&buf[..n])
                };
            }
        })
    };
    let out = tee(Box::new(child.stdout.take().expect("piped")), true);
    let err = tee(Box::new(child.stderr.take().expect("piped")), false);
    let mut forwarded = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if interrupt::requested() && !forwarded {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            forwarded = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = (out.join(), err.join());
    Ok(if interrupt::requested() {
        StageEnd::Interrupted
    } else if status.success() {
        StageEnd::Succeeded
    } else {
        StageEnd::Failed(status.to_string())
    })
}

pub fn run(args: SpeedrunArgs) -> Result<()> {
    let (config, config_text) = load_config(&args)?;
    let root = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(&args.preset));
    let l = Layout::new(root);
    std::fs::create_dir_all(l.logs())
        .with_context(|| format!("creating {}", l.logs().display()))?;
    std::fs::create_dir_all(l.root.join("eval"))?;
    let tomls = Configs {
        pretrain: pretrain_config(&config, &l)?,
        long: long_config(&config, &l)?,
        sft: sft_config(&config, &l)?,
        rl: rl_config(&config, &l)?,
    };
    let list = stages(&config, &l, &tomls);
    let mut record: Value = match std::fs::read_to_string(l.record()) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{} is not a speedrun record", l.record().display()))?,
        Err(_) => json!({ "stages": {} }),
    };
    if let Some(redo) = &args.redo {
        let from = list
            .iter()
            .position(|st| st.name == redo)
            .with_context(|| {
                let names: Vec<&str> = list.iter().map(|st| st.name).collect();
                format!("--redo {redo}: the stages are {}", names.join(", "))
            })?;
        for st in &list[from..] {
            for out in &st.outputs {
                let _ = std::fs::remove_dir_all(out).or_else(|_| std::fs::remove_file(out));
            }
            record["stages"].as_object_mut().map(|m| m.remove(st.name));
        }
    }
    record["preset"] = args.preset.clone().into();
    record["sources"] = json!(config.sources);
    record["config"] = config_text.into();
    record["host"] = host();
    save(&l.record(), &record)?;
    interrupt::install();

    let started = Instant::now();
    let mut before = String::new();
    for (order, st) in list.iter().enumerate() {
        let fp = fingerprint(&before, st);
        before.clone_from(&fp);
        let done = &record["stages"][st.name];
        if done.is_object() && done["fingerprint"] != fp.as_str() {
            bail!(
                "{} holds a {} stage run with other settings (or after other earlier stages); \
                 use another --out, or --redo {} to discard its outputs and those of the later stages",
                l.root.display(),
                st.name,
                st.name
            );
        }
        if done["finished"] == true && (st.complete)() {
            eprintln!("== {}: done earlier, skipped", st.name);
            continue;
        }
        for (name, path, text) in [
            ("pretrain", l.train_config(), &tomls.pretrain),
            ("pretrain-long", l.long_config(), &tomls.long),
            ("sft", l.sft_config(), &tomls.sft),
            ("rl", l.rl_config(), &tomls.rl),
        ] {
            if st.name == name {
                std::fs::write(path, text)?;
            }
        }
        let command = command_line(&st.args);
        eprintln!("== {}: {command}", st.name);
        let earlier = done["seconds"].as_f64().unwrap_or(0.0);
        record["stages"][st.name] = json!({
            "order": order, "command": command, "fingerprint": fp, "finished": false,
        });
        save(&l.record(), &record)?;
        let t = Instant::now();
        let log = l.logs().join(format!("{}.log", st.name));
        let ended = run_stage(&st.args, &log);
        let stage = &mut record["stages"][st.name];
        stage["seconds"] = (earlier + t.elapsed().as_secs_f64()).into();
        // The report card names a stage that failed, and why.
        let failed = match &ended {
            Ok(StageEnd::Succeeded) if !(st.complete)() => {
                Some("ended without complete outputs".to_string())
            }
            Ok(StageEnd::Succeeded) => None,
            Ok(StageEnd::Failed(status)) => Some(format!("failed ({status})")),
            Ok(StageEnd::Interrupted) => Some("interrupted".to_string()),
            Err(e) => Some(format!("could not run: {e:#}")),
        };
        stage["finished"] = failed.is_none().into();
        if let Some(why) = &failed {
            stage["ended"] = why.as_str().into();
        }
        save(&l.record(), &record)?;
        let Some(why) = failed else {
            continue;
        };
        // The stages done so far are worth their report card.
        match cxxlm_report::write(&l) {
            Ok(w) => eprintln!(
                "the report card of the stages so far: {}",
                w.markdown.display()
            ),
            Err(e) => eprintln!("warning: no report card: {e:#}"),
        }
        match ended.with_context(|| format!("stage {}", st.name))? {
            StageEnd::Interrupted => {
                bail!(
                    "stage {}: interrupted; run the same command again to continue",
                    st.name
                )
            }
            _ => bail!("stage {}: {why}; its log: {}", st.name, log.display()),
        }
    }
    let written = cxxlm_report::write(&l)?;
    for e in &written.plot_errors {
        eprintln!("warning: {e}");
    }
    outln!(
        "speedrun {} finished ({:.0}s here): {} and {}",
        args.preset,
        started.elapsed().as_secs_f64(),
        written.markdown.display(),
        written.html.display()
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The settings of `preset` with `overrides`, SFT data and RL tasks, and the stages
    /// they plan in `run/` (before any config is written).
    fn planned(
        preset: &str,
        overrides: &[&str],
        sft_data: Vec<String>,
        rl_tasks: Vec<String>,
    ) -> (Config, Vec<Stage>) {
        let args = SpeedrunArgs {
            preset: preset.into(),
            sources: vec!["src".into()],
            out: None,
            overrides: overrides.iter().map(|s| s.to_string()).collect(),
            sft_data,
            rl_tasks,
            redo: None,
        };
        let (config, _) = load_config(&args).unwrap();
        let none = Configs {
            pretrain: String::new(),
            long: String::new(),
            sft: String::new(),
            rl: String::new(),
        };
        let list = stages(&config, &Layout::new(PathBuf::from("run")), &none);
        (config, list)
    }

    #[test]
    fn rl_comes_last_when_tasks_are_given_and_each_model_fixes_the_held_out_bugs() {
        let names = |sft_data, rl_tasks| {
            let (_, list) = planned("cpu-tiny", &[], sft_data, rl_tasks);
            list.iter().map(|s| s.name).collect::<Vec<_>>()
        };
        let without = names(Vec::new(), Vec::new());
        assert!(!without
            .iter()
            .any(|n| n.contains("rl") || n.contains("bugfix")));
        let tasks = || vec!["tasks/bugs".to_string()];
        let with = names(Vec::new(), tasks());
        assert_eq!(
            with[with.len() - 4..],
            ["eval-mbpp", "eval-bugfix", "rl", "eval-bugfix-rl"]
        );
        let tuned = names(tasks(), tasks());
        assert_eq!(
            tuned[tuned.len() - 6..],
            [
                "eval-bugfix",
                "sft",
                "eval-mbpp-sft",
                "eval-bugfix-sft",
                "rl",
                "eval-bugfix-rl"
            ]
        );
    }

    #[test]
    fn gpu_long_continues_gpu_10min_pretraining_at_8k_and_evaluates_the_continued_model() {
        let (config, list) = planned("gpu-long", &[], Vec::new(), Vec::new());
        // gpu-10min's settings, with its own laid over them.
        assert_eq!(config.eval.fim_documents, 128);
        assert_eq!(
            config.pretrain["train"]["time_budget"].as_integer(),
            Some(300)
        );
        assert_eq!(
            config.pretrain["train"]["device_batch"].as_integer(),
            Some(32)
        );
        let l = Layout::new(PathBuf::from("run"));
        let long = long_table(&config, &l).unwrap();
        let model = long["model"].as_table().unwrap();
        assert_eq!(model.len(), 2);
        assert_eq!(model["seq_len"].as_integer(), Some(8192));
        assert_eq!(model["rope_scaling"]["factor"].as_integer(), Some(4));
        assert_eq!(long["init"].as_str(), Some("run/train"));
        assert_eq!(long["data"]["pack"].as_str(), Some("run/pack-repo"));
        assert_eq!(long["data"]["document_mask"].as_bool(), Some(true));
        assert_eq!(long["train"]["device"].as_str(), Some("cuda"));

        let names: Vec<&str> = list.iter().map(|s| s.name).collect();
        assert_eq!(
            names[3..8],
            [
                "pack",
                "pretrain",
                "pack-repo",
                "pretrain-long",
                "eval-bpb-long"
            ]
        );
        let args_of = |name: &str| list.iter().find(|s| s.name == name).unwrap().args.join(" ");
        assert!(args_of("pack-repo").contains("-o run/pack-repo"));
        assert!(args_of("pack-repo").contains("--repo-context 8192 --repo-file-share 0.3"));
        assert!(args_of("eval-bpb-long").contains("--pack run/pack-repo --document-mask"));
        assert!(args_of("eval-mbpp").contains("--checkpoint run/long"));
    }

    #[test]
    fn pretraining_on_several_gpus_goes_through_the_launcher() {
        let pretrain_args = |overrides: &[&str]| {
            let (_, stages) = planned("cpu-tiny", overrides, Vec::new(), Vec::new());
            let pretrain = stages.iter().find(|s| s.name == "pretrain").unwrap();
            pretrain.args[..3].join(" ")
        };
        assert_eq!(pretrain_args(&[]), "train pretrain --config");
        assert_eq!(pretrain_args(&["gpus=4"]), "launch --gpus 4");
    }
}
