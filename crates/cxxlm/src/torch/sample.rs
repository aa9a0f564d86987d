//! `cxxlm sample`, and loading a checkpoint with its tokenizer.

use anyhow::{bail, Context, Result};
use cxxlm::cli::{prompt_ids, special, SampleArgs};
use cxxlm::outln;
use cxxlm_eval::functions::BodyStop;
use cxxlm_model::{Gpt, Sampling};
use cxxlm_pack::{tokenizer_sha256, Manifest};
use cxxlm_serve::text::{self, Reindent};
use cxxlm_tokenizer::Bpe;
use std::path::{Path, PathBuf};

use crate::train::load_config;

/// A checkpoint's model on the best device, and the tokenizer it was trained with
/// (`--tokenizer`, else the one its run's pack records), checked against its hash.
pub fn load_checkpoint(path: &Path, tokenizer: Option<&Path>) -> Result<(Gpt, Bpe)> {
    let device = tch::Device::cuda_if_available();
    let (model, state) = cxxlm_train::checkpoint::load_model(path, device)?;
    let tok_path = match tokenizer {
        Some(t) => t.to_path_buf(),
        None => run_tokenizer(path)?,
    };
    let bpe = cxxlm_tokenizer::load(&tok_path)?;
    if tokenizer_sha256(&bpe) != state.tokenizer_sha256 {
        bail!(
            "{} is not the tokenizer this checkpoint was trained with",
            tok_path.display()
        );
    }
    Ok((model, bpe))
}

/// The tokenizer the run of a checkpoint (or run directory) `path` trained with, as the
/// run's `config.toml` above it says: an SFT or RL run's own `tokenizer`, a pretraining run's
/// `data.tokenizer`, else the one its pack records.
pub fn run_tokenizer(path: &Path) -> Result<PathBuf> {
    let run = path
        .ancestors()
        .find(|a| a.join("config.toml").exists())
        .with_context(|| {
            format!(
                "{}: no run config.toml above it; pass --tokenizer",
                path.display()
            )
        })?;
    let file = run.join("config.toml");
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    // Fine-tuning stages name the tokenizer in their own section.
    if let Some(t) = ["sft", "rl", "embed"].iter().find_map(|stage| {
        table
            .get(*stage)
            .and_then(|s| s.get("tokenizer"))
            .and_then(|t| t.as_str())
    }) {
        return Ok(PathBuf::from(t));
    }
    let config = load_config(Some(&file), &[])?;
    Ok(match config.data.tokenizer {
        Some(t) => t,
        None => PathBuf::from(Manifest::load(&config.data.pack)?.tokenizer_path),
    })
}

/// Tokens per second of batched greedy generation, after a warm-up; on CUDA with the
/// decoding step replayed as a CUDA graph and without, checking that both write the
/// same tokens.
fn benchmark(model: &Gpt, bpe: &Bpe, batch: usize, prompt: usize, new: usize) -> Result<()> {
    let vocab = bpe.special_base() as usize;
    let ids: Vec<u32> = (0..prompt).map(|i| ((i * 7919) % vocab) as u32).collect();
    let prompts = vec![ids; batch];
    let run = |n| {
        let sampling = Sampling {
            max_new_tokens: n,
            ..Default::default()
        };
        model.generate(&prompts, &sampling, &mut |_, _| false)
    };
    // (CUDA graphs, the decoding attention kernel): eager and graphs with the kernel,
    // then graphs with attention through a mask over the whole cache.
    let modes: &[(&str, &str)] = if model.device().is_cuda() {
        &[("0", "1"), ("1", "1"), ("1", "0")]
    } else {
        &[("0", "0")]
    };
    let mut outputs = Vec::new();
    for (graphs, kernel) in modes {
        std::env::set_var("CXXLM_CUDA_GRAPHS", graphs);
        std::env::set_var("CXXLM_DECODE_KERNEL", kernel);
        run(8);
        let started = std::time::Instant::now();
        let out = run(new);
        let seconds = started.elapsed().as_secs_f64();
        let tokens: usize = out.iter().map(Vec::len).sum();
        outln!(
            "RESULT impl=cxxlm cuda_graphs={graphs} decode_kernel={kernel} batch={batch} prompt={prompt} new={new} seconds={seconds:.3} tok_s={:.0}",
            tokens as f64 / seconds
        )?;
        outputs.push(out);
    }
    if let [eager, graphs, masked] = &outputs[..] {
        outln!(
            "same tokens with and without CUDA graphs: {}",
            eager == graphs
        )?;
        outln!(
            "same tokens with the attention kernel and through a mask: {}",
            graphs == masked
        )?;
    }
    Ok(())
}

pub fn run(args: SampleArgs) -> Result<()> {
    let (model, bpe) = load_checkpoint(&args.checkpoint, args.tokenizer.as_deref())?;
    if let Some(batch) = args.benchmark_batch {
        benchmark(&model, &bpe, batch, args.benchmark_prompt, args.max_tokens)?;
        return Ok(());
    }
    let fim = match (&args.fim_prefix, &args.fim_suffix) {
        (Some(p), Some(s)) => Some((p.as_str(), s.as_str())),
        (None, None) => None,
        _ => bail!("--fim-prefix and --fim-suffix go together"),
    };
    let text = args.prompt.clone().unwrap_or_default();
    if fim.is_none() && args.prompt.is_none() {
        bail!("give --prompt, or --fim-prefix and --fim-suffix");
    }
    // A plain prompt is taken as `serve` takes one: laid out as the training text was,
    // healed at its last token (`Bpe::heal`), its completion re-indented into its layout.
    let layout = crate::serve::layout(&args.checkpoint, "auto");
    let (ids, healing) = match fim {
        None => text::healed_prompt(&bpe, &text, layout),
        Some(_) => (prompt_ids(&bpe, &text, fim), None),
    };
    let eos = special(&bpe, "<|eos|>");
    let sampling = Sampling {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        max_new_tokens: args.max_tokens,
        seed: args.seed,
        repeat_penalty: args.repeat_penalty,
        repeat_last_n: args.repeat_last_n,
    };
    // A prompt that opens a function body is done when the body is.
    let body = match (fim, args.past_body) {
        (None, false) => BodyStop::after(&text),
        _ => None,
    };
    let written = |t: &[u32]| {
        let body: Vec<u32> = t.iter().copied().filter(|&t| t != eos).collect();
        let bytes = bpe.decode(&body);
        let bytes = healing.as_ref().map_or(&bytes[..], |h| h.strip(&bytes));
        let raw = String::from_utf8_lossy(bytes).into_owned();
        match fim {
            None => Reindent::new(&text, "", layout, 0).push(&raw),
            Some(_) => raw,
        }
    };
    let first = vec![healing.as_ref().map(|h| h.allowed.clone()); args.n];
    let outs = model.generate_healed(&vec![ids; args.n], &first, &sampling, 0, &mut |_, t| {
        t.last() == Some(&eos) || body.is_some_and(|b| b.end(&written(t)).is_some())
    });
    for (i, out) in outs.iter().enumerate() {
        let mut completion = written(out);
        if let Some(end) = body.and_then(|b| b.end(&completion)) {
            completion.truncate(end);
        }
        if args.n > 1 {
            outln!("--- sample {} ---", i + 1)?;
        }
        match fim {
            Some((p, s)) => outln!("{p}{completion}{s}")?,
            None => outln!("{text}{completion}")?,
        }
    }
    Ok(())
}
