//! `cxxlm serve`: a checkpoint's model behind [`cxxlm_serve::Model`], on the sampler's
//! [`Decoder`] (slots of a KV cache, CUDA graphs on a GPU).

use anyhow::{Context, Result};
use cxxlm::cli::ServeArgs;
use cxxlm_model::{allow_only, sample, Decoder, Gpt, Rows};
use cxxlm_serve::text::Layout;
use cxxlm_serve::{ModelInfo, Options, Prefill, StepRow};
use std::path::Path;
use std::sync::Arc;

use crate::sample::load_checkpoint;

pub(crate) struct Served {
    model: Gpt,
    decoder: Decoder,
}

impl Served {
    /// `model` with a cache of `slots` sequences of `context` tokens, its decoding steps
    /// captured before the first request.
    pub(crate) fn new(model: Gpt, slots: usize, context: usize) -> Result<Served, String> {
        let mut decoder = model.decoder(slots, context);
        guarded("capturing the decoding steps", || {
            decoder.capture_steps(&model)
        })?;
        Ok(Served { model, decoder })
    }
}

fn sampling(s: &cxxlm_serve::Sampling) -> cxxlm_model::Sampling {
    cxxlm_model::Sampling {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        repeat_penalty: s.repeat_penalty,
        repeat_last_n: s.repeat_last_n,
        ..Default::default()
    }
}

/// libtorch reports errors by panicking: a failed request must not stop the server.
fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|p| format!("{what}: {}", cxxlm_model::panic_message(&*p)))
}

impl cxxlm_serve::Model for Served {
    fn slots(&self) -> usize {
        self.decoder.slots()
    }

    fn context(&self) -> usize {
        self.decoder.capacity()
    }

    fn prefill(&mut self, prompts: &[Prefill]) -> Vec<Result<u32, String>> {
        // Prompts from position 0 are computed in one batch; one continued after a
        // cached prefix, alone (each from its own position).
        let (fresh, continued): (Vec<usize>, Vec<usize>) =
            (0..prompts.len()).partition(|&i| prompts[i].from == 0);
        let mut out = vec![Err(String::new()); prompts.len()];
        for group in std::iter::once(fresh).chain(continued.into_iter().map(|i| vec![i])) {
            if group.is_empty() {
                continue;
            }
            let Served { model, decoder } = self;
            let sampled = guarded("prefill", || {
                let from = prompts[group[0]].from;
                let slots: Vec<usize> = group.iter().map(|&i| prompts[i].slot).collect();
                let texts: Vec<&[u32]> =
                    group.iter().map(|&i| &prompts[i].prompt[from..]).collect();
                let first: Vec<Option<Vec<u32>>> = group
                    .iter()
                    .map(|&i| prompts[i].first.map(<[u32]>::to_vec))
                    .collect();
                let logits = allow_only(&decoder.prefill(model, &slots, from, &texts), &first);
                let each: Vec<_> = group
                    .iter()
                    .map(|&i| sampling(prompts[i].sampling))
                    .collect();
                let recent: Vec<&[u32]> = group
                    .iter()
                    .map(|&i| prompts[i].sampling.recent(prompts[i].prompt))
                    .collect();
                sample(&logits, &each, &recent)
            });
            for (k, &i) in group.iter().enumerate() {
                out[i] = sampled.as_ref().map(|t| t[k]).map_err(Clone::clone);
            }
        }
        out
    }

    fn step(&mut self, rows: &[StepRow]) -> Result<Vec<u32>, String> {
        let Served { model, decoder } = self;
        let slots: Vec<usize> = rows.iter().map(|r| r.slot).collect();
        let tokens: Vec<u32> = rows.iter().map(|r| r.token).collect();
        let positions: Vec<usize> = rows.iter().map(|r| r.position).collect();
        let each: Vec<cxxlm_model::Sampling> = rows.iter().map(|r| sampling(&r.sampling)).collect();
        let recent: Vec<&[u32]> = rows.iter().map(|r| r.recent.as_slice()).collect();
        guarded("decoding step", || {
            let logits = decoder.step(model, Rows::List(&slots), &tokens, &positions);
            sample(&logits, &each, &recent)
        })
    }
}

/// How text is laid out for the model of `checkpoint`: `indentation` is `strip`, `keep`
/// or `auto` (as its training text was, else the data pipeline's default, stripped);
/// the choice is said on stderr. Serving strips prompts and re-indents completions.
pub(crate) fn layout(checkpoint: &Path, indentation: &str) -> Layout {
    match indentation {
        "strip" | "keep" => Layout {
            strip_indentation: indentation == "strip",
        },
        _ => {
            let (layout, said) = cxxlm_train::checkpoint::layout(checkpoint);
            eprintln!("{said}");
            layout
        }
    }
}

pub fn run(args: ServeArgs) -> Result<()> {
    let (model, bpe) = load_checkpoint(&args.checkpoint, args.tokenizer.as_deref())?;
    let layout = layout(&args.checkpoint, &args.indentation);
    let context = model.config.seq_len;
    let name = args.name.clone().unwrap_or_else(|| {
        let run = args
            .checkpoint
            .ancestors()
            .find(|a| a.join("config.toml").exists())
            .unwrap_or(&args.checkpoint);
        run.file_name()
            .map_or("cxxlm".into(), |n| n.to_string_lossy().into_owned())
    });
    let index = match &args.index {
        None => None,
        Some(path) => {
            let dir = match path.join("snapshot.bin").exists() {
                true => path.clone(),
                false => cxxlm_index::watch::default_dir(path),
            };
            let index = cxxlm_serve::context::RepoIndex::open(&dir)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("opening the index {} (--index)", dir.display()))?;
            eprintln!(
                "repository context for /infill: {} files indexed in {}",
                index.files(),
                dir.display()
            );
            Some(Arc::new(index))
        }
    };
    let fim_line_aligned = cxxlm_train::checkpoint::fim_line_aligned(&args.checkpoint);
    if fim_line_aligned {
        eprintln!("fill in the middle: cut at the cursor line's start (the model learned whole-line middles)");
    }
    let info = ModelInfo {
        name,
        tokenizer: Arc::new(bpe),
        context,
        layout,
        fim_line_aligned,
        index,
    };
    let address = format!("{}:{}", args.host, args.port);
    let listener = std::net::TcpListener::bind(&address)
        .with_context(|| format!("listening on {address} (is another server there? --port)"))?;
    let bound = listener.local_addr()?;
    eprintln!(
        "serving {} (d{}, {:?}, context {context}, {} slots) at http://{bound}",
        info.name,
        model.config.depth,
        model.device(),
        args.slots
    );
    let slots = args.slots.max(1);
    let options = Options {
        slots,
        max_waiting: args.queue,
        max_body: args.max_body_mib << 20,
    };
    cxxlm_serve::serve(listener, info, options, move || {
        Served::new(model, slots, context)
    })
    .map_err(anyhow::Error::msg)
}
