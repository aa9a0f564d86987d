//! `cxxlm serve`: a model served over HTTP to editors and tools, in the dialects they
//! speak: OpenAI's `/v1/completions` (with `suffix` for fill-in-the-middle),
//! `/v1/chat/completions` and `/v1/models`; llama.cpp's `/infill` and `/health` (as
//! llama.vim and llama.vscode send them); Ollama's `/api/generate` with `suffix` (as
//! Continue sends it). The FIM template is the server's business, so no client needs
//! one. Requests are batched continuously on the model's sampler ([`engine`]); text is
//! normalized and re-indented ([`text`]); repository context for `/infill` comes from a
//! `cxxlm index` when the client sends none ([`context`]); HTTP is handled here ([`http`]) so that a
//! client that goes away is noticed while its request generates.
//!
//! The model is reached through [`Model`], which the `cxxlm-torch` binary implements
//! over `cxxlm-model`'s sampler: this crate needs no libtorch.

pub mod api;
pub mod context;
pub mod engine;
pub mod http;
pub mod text;

use std::net::TcpListener;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use cxxlm_tokenizer::Bpe;

/// How a token is drawn from the model's distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0: the most likely token.
    pub temperature: f64,
    /// 0: no limit.
    pub top_k: i64,
    pub top_p: f64,
    /// The repetition guard (llama.cpp's `repeat_penalty` over the last `repeat_last_n`
    /// tokens, prompt included); 1: off.
    pub repeat_penalty: f64,
    pub repeat_last_n: usize,
}

impl Sampling {
    /// The tokens the repetition guard looks back on, of a sequence so far.
    pub fn recent<'a>(&self, tokens: &'a [u32]) -> &'a [u32] {
        match self.repeat_penalty != 1.0 {
            true => &tokens[tokens.len().saturating_sub(self.repeat_last_n)..],
            false => &[],
        }
    }
}

/// One active sequence of a decoding step.
#[derive(Debug, Clone)]
pub struct StepRow {
    pub slot: usize,
    /// The token to feed (the last one sampled).
    pub token: u32,
    /// Where it goes: the slot holds the positions before it.
    pub position: usize,
    pub sampling: Sampling,
    /// The tokens the repetition guard looks back on, `token` last (empty when off).
    pub recent: Vec<u32>,
}

/// A prompt to compute into a slot: `prompt[from..]` from position `from` on (the slot's
/// first `from` positions hold the rest, kept from its previous sequence); the next token
/// is sampled after it, one of `first` when given.
#[derive(Debug, Clone, Copy)]
pub struct Prefill<'a> {
    pub slot: usize,
    pub from: usize,
    pub prompt: &'a [u32],
    pub sampling: &'a Sampling,
    pub first: Option<&'a [u32]>,
}

/// A model with a cache of `slots` sequences: what the engine drives.
pub trait Model {
    fn slots(&self) -> usize;
    /// Tokens one sequence holds, prompt and completion.
    fn context(&self) -> usize;
    /// Computes each prompt into its slot (together, where the model can) and samples
    /// each one's next token: one result per prompt, in their order.
    fn prefill(&mut self, prompts: &[Prefill]) -> Vec<Result<u32, String>>;
    /// Feeds each row's token at its position and samples the next one of each.
    fn step(&mut self, rows: &[StepRow]) -> Result<Vec<u32>, String>;
}

/// What the server tells clients about the model, and how it treats their text.
#[derive(Clone)]
pub struct ModelInfo {
    /// The name clients see (`/v1/models`, responses).
    pub name: String,
    pub tokenizer: Arc<Bpe>,
    pub context: usize,
    pub layout: text::Layout,
    /// The model learned fill-in-the-middle from cuts at line starts only: the cursor's
    /// line is cut at its start ([`text::LineCut`]).
    pub fim_line_aligned: bool,
    /// Where `/infill` finds repository context when a client sends none.
    pub index: Option<Arc<context::RepoIndex>>,
}

pub struct Options {
    pub slots: usize,
    /// Requests waiting for a slot beyond which new ones get 503.
    pub max_waiting: usize,
    /// Largest request body accepted.
    pub max_body: usize,
}

/// Serves on `listener` until the process ends: the model is made by `load` on the
/// engine's thread while `/health` already answers (503 until it is ready).
pub fn serve<M: Model + 'static>(
    listener: TcpListener,
    info: ModelInfo,
    options: Options,
    load: impl FnOnce() -> Result<M, String> + Send + 'static,
) -> Result<(), String> {
    let ready = Arc::new(AtomicBool::new(false));
    let engine = engine::Engine::start(load, options.slots, options.max_waiting, ready.clone())?;
    let server = Arc::new(api::Server::new(info, engine, ready));
    http::listen(listener, options.max_body, move |request, conn| {
        server.handle(request, conn)
    })
}
