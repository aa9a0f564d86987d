//! `cxxlm agent [eval] --checkpoint`: the checkpoint's model answers in this process, on the
//! engine and sampler that `cxxlm serve` runs, with the chat template's tokens (the
//! agent's markers are special tokens, written out in its replies).

use anyhow::{Context, Result};
use cxxlm::agent::AgentArgs;
use cxxlm_agent::{call, Model, Reply};
use cxxlm_serve::engine::{Engine, Event, Job, COMPLETE, GO_ON};
use cxxlm_serve::Sampling;
use cxxlm_tokenizer::chat::{self, Message};
use cxxlm_tokenizer::layout::Layout;
use cxxlm_tokenizer::Bpe;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{mpsc, Arc};

use crate::sample::load_checkpoint;
use crate::serve::Served;

struct InProcess {
    engine: Arc<Engine>,
    bpe: Bpe,
    layout: Layout,
    context: usize,
    max_tokens: usize,
    sampling: Sampling,
}

impl Model for InProcess {
    fn reply(&mut self, messages: &[Message]) -> Result<Reply, String> {
        let mut prompt = chat::prompt(&self.bpe, messages, self.layout);
        // The context holds the reply and the end of the conversation.
        let max_tokens = self.max_tokens.min(self.context / 2);
        let keep = self.context - max_tokens;
        if prompt.len() > keep {
            prompt.drain(..prompt.len() - keep);
        }
        let (events, rx) = mpsc::channel();
        let cancel = Arc::new(AtomicU8::new(GO_ON));
        let job = Job {
            prompt: prompt.clone(),
            sampling: self.sampling.clone(),
            max_tokens,
            stop_tokens: vec![chat::end_of_turn(&self.bpe)],
            first_tokens: None,
            cancel: cancel.clone(),
            events,
        };
        self.engine.submit(job).map_err(|e| e.to_string())?;
        let mut reply = Vec::new();
        for event in rx {
            match event {
                // The turn ends with its call, as an endpoint's tool call does.
                Event::Token(_) if cancel.load(Ordering::SeqCst) == COMPLETE => {}
                Event::Token(t) => {
                    reply.push(t);
                    // Only a token that writes `}` can close the call's object.
                    let closes = self.bpe.decode(&[t]).contains(&b'}');
                    if closes
                        && call::holds_a_call(&String::from_utf8_lossy(&self.bpe.decode(&reply)))
                    {
                        cancel.store(COMPLETE, Ordering::SeqCst);
                    }
                }
                Event::Finished(_) => break,
                Event::Failed(e) => return Err(e),
                Event::Prefilled { .. } => {}
            }
        }
        Ok(Reply {
            text: String::from_utf8_lossy(&self.bpe.decode(&reply)).into_owned(),
            tokens: prompt.len() + reply.len(),
        })
    }
}

pub fn run(args: AgentArgs) -> Result<()> {
    let m = args.model();
    let checkpoint = m.checkpoint.clone().context("--checkpoint")?;
    let (model, bpe) = load_checkpoint(&checkpoint, m.tokenizer.as_deref())?;
    let layout = crate::serve::layout(&checkpoint, "auto");
    let context = model.config.seq_len;
    // One slot per conversation held at once: their turns are decoded together.
    let slots = args.conversations();
    let engine = Arc::new(
        Engine::start(
            move || Served::new(model, slots, context),
            slots,
            slots,
            Arc::new(AtomicBool::new(false)),
        )
        .map_err(anyhow::Error::msg)?,
    );
    let sampling = Sampling {
        temperature: m.temperature,
        top_k: 0,
        top_p: 1.0,
        repeat_penalty: 1.0,
        repeat_last_n: 64,
    };
    let models = (0..slots)
        .map(|_| {
            Box::new(InProcess {
                engine: engine.clone(),
                bpe: bpe.clone(),
                layout,
                context,
                max_tokens: m.max_tokens,
                sampling: sampling.clone(),
            }) as Box<dyn Model + Send>
        })
        .collect();
    cxxlm::agent::run(args, models)
}
