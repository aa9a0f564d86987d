//! Evaluations that run a model: bits per byte here, the others through
//! [`cxxlm::eval::run`] with a checkpoint's model behind [`TextModel`].

use anyhow::{bail, Context, Result};
use cxxlm::eval::{BpbArgs, EvalCommand, Generation, TextModel};
use cxxlm::outln;
use cxxlm_model::{Gpt, ModelConfig, Sampling};
use cxxlm_pack::Manifest;
use cxxlm_serve::text::Layout;
use cxxlm_tokenizer::Bpe;
use serde_json::json;
use std::path::Path;

use crate::sample::load_checkpoint;

struct Checkpoint {
    model: Gpt,
    bpe: Bpe,
    layout: Layout,
}

impl TextModel for Checkpoint {
    fn tokenizer(&self) -> &Bpe {
        &self.bpe
    }

    fn layout(&self) -> Layout {
        self.layout
    }

    fn context(&self) -> usize {
        self.model.config.seq_len
    }

    fn generate(
        &self,
        prompts: &[Vec<u32>],
        g: &Generation,
        stop: &mut dyn FnMut(usize, &[u32]) -> bool,
    ) -> Vec<Vec<u32>> {
        let sampling = Sampling {
            temperature: g.temperature,
            top_k: g.top_k,
            top_p: g.top_p,
            max_new_tokens: g.max_new_tokens,
            seed: g.seed,
            repeat_penalty: g.repeat_penalty,
            repeat_last_n: g.repeat_last_n,
        };
        // Progress of long evaluations, each time as many rows as there are slots end.
        let every = match g.slots {
            0 => prompts.len(),
            s => s,
        };
        let mut ended = 0;
        let mut counted = |row: usize, t: &[u32]| {
            let stopped = stop(row, t);
            if stopped || t.len() >= g.max_new_tokens {
                ended += 1;
                if ended % every == 0 && ended < prompts.len() {
                    eprintln!("generated {ended} of {}", prompts.len());
                }
            }
            stopped
        };
        self.model
            .generate_healed(prompts, &g.first_tokens, &sampling, g.slots, &mut counted)
    }
}

fn load(path: &Path, tokenizer: Option<&Path>) -> Result<Box<dyn TextModel>> {
    let (model, bpe) = load_checkpoint(path, tokenizer)?;
    let layout = crate::serve::layout(path, "auto");
    Ok(Box::new(Checkpoint { model, bpe, layout }))
}

pub fn run(cmd: EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::Bpb(args) => bpb(args),
        other => cxxlm::eval::run(other, Some(&load)),
    }
}

fn bpb(args: BpbArgs) -> Result<()> {
    let (mut model, bpe) =
        load_checkpoint(&args.model.checkpoint, args.model.tokenizer.as_deref())?;
    let manifest = Manifest::load(&args.pack)?;
    manifest.check_tokenizer(&args.pack, &bpe)?;
    let data = manifest.open(&args.pack, &args.split)?;
    let mut seq_len = args.seq_len.unwrap_or(model.config.seq_len);
    // A window predicts its tokens from the one before: a split of n tokens fills one of n - 1.
    let tokens = data.total_tokens() as usize;
    if tokens < 2 {
        bail!(
            "{}: the {} split holds {tokens} tokens: nothing to score",
            args.pack.display(),
            args.split
        );
    }
    if tokens <= seq_len {
        eprintln!(
            "the {} split holds {tokens} tokens, fewer than one window of {} + 1: scored as one window of {}",
            args.split,
            seq_len,
            tokens - 1
        );
        seq_len = tokens - 1;
    }
    if seq_len != model.config.seq_len {
        let config = ModelConfig {
            seq_len,
            ..model.config.clone()
        };
        let mut resized = Gpt::new(config, model.device(), 0)?;
        resized.load(model.params())?;
        model = resized;
    }
    let max = if args.tokens == 0 {
        usize::MAX
    } else {
        args.tokens
    };
    let bytes = cxxlm_train::pretrain::token_bytes(&bpe, model.device());
    let single = cxxlm_train::dist::Comm::single();
    let bpb = cxxlm_train::pretrain::bits_per_byte(
        &model,
        &data,
        args.batch,
        max,
        &bytes,
        args.document_mask,
        &single,
    )?
    .with_context(|| format!("the {} split holds no text to score", args.split))?;
    outln!(
        "{}: {:.4} bits per byte over {} tokens, {} bytes of text",
        args.split,
        bpb.bits_per_byte,
        bpb.tokens,
        bpb.bytes
    )?;
    for b in &bpb.by_position {
        outln!(
            "  positions {:>6}-{:<6} {:.4} bits per byte over {} tokens",
            b.from,
            b.to,
            b.bits_per_byte,
            b.tokens
        )?;
    }
    if let Some(path) = &args.json {
        let by_position: Vec<_> = bpb
            .by_position
            .iter()
            .map(|b| json!({"from": b.from, "to": b.to, "bits_per_byte": b.bits_per_byte, "tokens": b.tokens}))
            .collect();
        let report = json!({"split": args.split, "bits_per_byte": bpb.bits_per_byte,
                            "tokens": bpb.tokens, "bytes": bpb.bytes,
                            "seq_len": model.config.seq_len, "document_mask": args.document_mask,
                            "by_position": by_position});
        std::fs::write(path, report.to_string())?;
    }
    Ok(())
}
