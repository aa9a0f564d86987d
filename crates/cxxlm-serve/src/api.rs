//! The dialects: requests parsed and checked (unknown fields, wrong types and values
//! out of range are a 400 naming the field), prompts built, generation driven through
//! the engine, and responses shaped as each client expects, whole or streamed.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cxxlm_tokenizer::chat::{self, Message, Role};
use cxxlm_tokenizer::Healing;
use serde_json::{json, Map, Value};

use crate::engine::{Engine, Event, Finish, Job, COMPLETE, GONE, GO_ON};
use crate::http::{Conn, Request};
use crate::text::{
    self, BodyEnd, CodeBlocks, ContextFile, Fit, Reindent, RestOfLine, Stops, Utf8Stream,
};
use crate::{ModelInfo, Sampling};
use cxxlm_eval::functions::BodyStop;

/// Completions drawn for one prompt at most (`n`).
const MAX_N: usize = 16;
/// How often a waiting connection checks whether its client is still there.
const POLL: Duration = Duration::from_millis(10);

/// The OpenAI error shape: `{"error": {"message", "type", "param", "code"}}`.
pub fn error_body(message: &str, kind: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
}

#[derive(Debug)]
pub struct ApiError {
    status: u16,
    message: String,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError {
        status: 400,
        message: message.into(),
    }
}

impl ApiError {
    fn body(&self, ollama: bool) -> Value {
        if ollama {
            return json!({"error": self.message});
        }
        let kind = match self.status {
            503 => "unavailable_error",
            404 => "not_found_error",
            500 => "server_error",
            _ => "invalid_request_error",
        };
        let mut body = error_body(&self.message, kind);
        body["error"]["code"] = json!(self.status);
        body
    }
}

/// A request's JSON object, read field by field with errors that name the field.
struct Fields {
    map: Map<String, Value>,
}

impl Fields {
    fn parse(body: &[u8], known: &[&str]) -> Result<Fields, ApiError> {
        let text = std::str::from_utf8(body).map_err(|e| {
            bad(format!(
                "the request body is not valid UTF-8 (byte {})",
                e.valid_up_to()
            ))
        })?;
        let value: Value = serde_json::from_str(text)
            .map_err(|e| bad(format!("the request body is not valid JSON: {e}")))?;
        let Value::Object(map) = value else {
            return Err(bad("the request body must be a JSON object"));
        };
        if let Some(unknown) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(bad(format!(
                "unknown field `{unknown}` (this endpoint takes: {})",
                known.join(", ")
            )));
        }
        Ok(Fields { map })
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn num(&self, key: &str, default: f64, min: f64, max: f64) -> Result<f64, ApiError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => {
                let x = v
                    .as_f64()
                    .ok_or_else(|| bad(format!("`{key}` must be a number")))?;
                if !(min..=max).contains(&x) {
                    return Err(bad(format!(
                        "`{key}` must be between {min} and {max}, not {x}"
                    )));
                }
                Ok(x)
            }
        }
    }

    fn int(&self, key: &str) -> Result<Option<i64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
                .map(Some)
                .ok_or_else(|| bad(format!("`{key}` must be an integer"))),
        }
    }

    fn count(&self, key: &str, default: usize, max: usize) -> Result<usize, ApiError> {
        match self.int(key)? {
            None => Ok(default),
            Some(x) if x < 0 => Err(bad(format!("`{key}` must not be negative, not {x}"))),
            Some(x) if x as u64 > max as u64 => {
                Err(bad(format!("`{key}` must be at most {max}, not {x}")))
            }
            Some(x) => Ok(x as usize),
        }
    }

    fn string(&self, key: &str) -> Result<Option<String>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(bad(format!("`{key}` must be a string"))),
        }
    }

    fn flag(&self, key: &str) -> Result<bool, ApiError> {
        match self.get(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(bad(format!("`{key}` must be true or false"))),
        }
    }

    /// A string or a list of strings.
    fn strings(&self, key: &str) -> Result<Vec<String>, ApiError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| bad(format!("`{key}` must hold strings")))
                })
                .collect(),
            Some(_) => Err(bad(format!(
                "`{key}` must be a string or a list of strings"
            ))),
        }
    }

    /// Fields we accept but do not implement must be at their neutral value.
    fn neutral(&self, key: &str, neutral: &[Value]) -> Result<(), ApiError> {
        match self.get(key) {
            Some(v) if !neutral.contains(v) => Err(bad(format!(
                "`{key}` = {v} is not supported by this server (leave it out)"
            ))),
            _ => Ok(()),
        }
    }
}

/// What to generate for one request.
struct Generation {
    prompt: Vec<u32>,
    sampling: Sampling,
    max_tokens: usize,
    n: usize,
    stops: Vec<String>,
    ignore_eos: bool,
    /// Re-indentation: of completions of code in an editor (and `n_indent`), or of a
    /// chat answer's code blocks.
    fit: Option<Fit>,
    /// Stop once a line is done after this long (llama.cpp's `t_max_predict_ms`).
    predict_limit: Option<Duration>,
    truncated: bool,
    /// For a plain prompt that opens a function body: stop where the body ends.
    body: Option<BodyStop>,
    /// Chat: the agent's markers (thoughts, tool calls) are written out, not stops.
    agent_markers: bool,
    /// A plain prompt's last token, taken off (see [`cxxlm_tokenizer::Bpe::heal`]).
    healing: Option<Healing>,
}

struct Choice {
    events: Receiver<Event>,
    cancel: Arc<AtomicU8>,
    /// What the first token repeats of the prompt, left out of the text.
    heal: Option<Healing>,
    utf8: Utf8Stream,
    fit: Option<Fit>,
    body: Option<BodyEnd>,
    stops: Stops,
    text: String,
    tokens: usize,
    finish: Option<&'static str>,
    /// llama.cpp's stop type: "eos", "limit" or "word".
    stop_type: &'static str,
}

#[derive(Default)]
struct Timings {
    prompt_tokens: usize,
    cached: usize,
    queued_ms: f64,
    prompt_ms: f64,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    generated: usize,
}

impl Timings {
    fn predicted_ms(&self) -> f64 {
        match (self.first_token, self.last_token) {
            (Some(a), Some(b)) => (b - a).as_secs_f64() * 1e3,
            _ => 0.0,
        }
    }

    /// Tokens per second after the first.
    fn rate(&self) -> f64 {
        let ms = self.predicted_ms();
        if ms > 0.0 {
            (self.generated.saturating_sub(1)) as f64 / ms * 1e3
        } else {
            0.0
        }
    }
}

struct Outcome {
    choices: Vec<Choice>,
    timings: Timings,
    truncated: bool,
    started: Instant,
}

/// An answer to `/v1/completions` or `/v1/chat/completions`: what every chunk and the
/// whole body carry, and how the request asked for it.
struct OpenAiAnswer {
    id: String,
    created: u64,
    model: String,
    /// The whole body's `object`, and a streamed chunk's.
    object: &'static str,
    chunk_object: &'static str,
    stream: bool,
    /// A last chunk with the usage (`stream_options.include_usage`).
    usage_chunk: bool,
}

impl OpenAiAnswer {
    /// A streamed chunk of one choice.
    fn chunk(&self, choice: Value) -> Value {
        json!({"id": self.id, "object": self.chunk_object, "created": self.created,
               "model": self.model, "choices": [choice]})
    }

    /// Ends the answer once generation is `out`: streamed, each choice's `tail` chunks
    /// and the usage chunk when asked for; else the whole body, a `whole` choice each.
    fn finish(
        &self,
        conn: &mut Conn,
        out: &Outcome,
        tail: &dyn Fn(usize, &Choice) -> Vec<Value>,
        whole: &dyn Fn(usize, &Choice) -> Value,
    ) -> Result<(), ApiError> {
        let usage = usage(out);
        let (id, created, model) = (&self.id, self.created, &self.model);
        let gone = |_| bad("the client went away");
        if self.stream {
            let mut chunks: Vec<Value> = (out.choices.iter().enumerate())
                .flat_map(|(i, c)| tail(i, c))
                .collect();
            if self.usage_chunk {
                chunks.push(
                    json!({"id": id, "object": self.chunk_object, "created": created,
                                   "model": model, "choices": [], "usage": usage}),
                );
            }
            return finish_sse(conn, &chunks).map_err(gone);
        }
        let choices: Vec<Value> = (out.choices.iter().enumerate())
            .map(|(i, c)| whole(i, c))
            .collect();
        let body = json!({"id": id, "object": self.object, "created": created, "model": model,
                          "choices": choices, "usage": usage, "timings": timings(out)});
        conn.json(200, &body).map_err(gone)
    }
}

enum Abort {
    /// The client went away: nothing more to send.
    Gone,
    Failed(String),
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

const OPENAI_SAMPLING: [&str; 12] = [
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "user",
    "top_k",
    "repetition_penalty",
];
const OPENAI_NEUTRAL: [&str; 5] = [
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "logit_bias",
    "ignore_eos",
];
/// llama.cpp's own fields, as llama.vim and llama.vscode send them; of the sampler
/// chain fields (`samplers`, `min_p`, penalties...) only `repeat_penalty` and
/// `repeat_last_n` are applied, the others accepted and not applied.
const LLAMA_FIELDS: [&str; 38] = [
    "input_prefix",
    "input_suffix",
    "input_extra",
    "prompt",
    "n_predict",
    "t_max_predict_ms",
    "t_max_prompt_ms",
    "n_indent",
    "cache_prompt",
    "response_fields",
    "id_slot",
    "stream",
    "stop",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "model",
    "ignore_eos",
    "samplers",
    "min_p",
    "typical_p",
    "repeat_penalty",
    "repeat_last_n",
    "presence_penalty",
    "frequency_penalty",
    "dynatemp_range",
    "dynatemp_exponent",
    "xtc_probability",
    "xtc_threshold",
    "dry_multiplier",
    "dry_base",
    "dry_allowed_length",
    "dry_penalty_last_n",
    "n_probs",
    "timings_per_token",
    "lora",
    "n_keep",
];

pub struct Server {
    info: ModelInfo,
    engine: Engine,
    ready: Arc<AtomicBool>,
    ids: AtomicU64,
    stop_tokens: Vec<u32>,
    eos: u32,
    /// The ids of [`chat::AGENT_MARKERS`].
    markers: Vec<u32>,
}

impl Server {
    pub fn new(info: ModelInfo, engine: Engine, ready: Arc<AtomicBool>) -> Self {
        let base = info.tokenizer.special_base();
        let stop_tokens = (base..info.tokenizer.vocab_size() as u32).collect();
        let eos = info
            .tokenizer
            .special_id("<|eos|>")
            .expect("the tokenizer's specials");
        let markers = chat::AGENT_MARKERS
            .iter()
            .map(|m| {
                info.tokenizer
                    .special_id(m)
                    .expect("the tokenizer's specials")
            })
            .collect();
        Server {
            info,
            engine,
            ready,
            ids: AtomicU64::new(0),
            stop_tokens,
            eos,
            markers,
        }
    }

    pub fn handle(&self, request: Request, conn: &mut Conn) -> io::Result<()> {
        let started = Instant::now();
        let ollama = request.path.starts_with("/api/");
        let route = (request.method.as_str(), request.path.as_str());
        let result = match route {
            ("GET", "/health" | "/v1/health") => return self.health(conn),
            ("GET", "/v1/models" | "/models") => return conn.json(200, &self.models()),
            ("GET", "/api/tags") => return conn.json(200, &self.ollama_tags()),
            ("GET", "/api/version") => return conn.json(200, &json!({"version": "0.6.0"})),
            ("POST", "/api/show") => return conn.json(200, &self.ollama_show()),
            ("POST", path) if !self.ready.load(Ordering::SeqCst) && self.is_generation(path) => {
                Err(ApiError {
                    status: 503,
                    message: "Loading model".into(),
                })
            }
            ("POST", "/v1/completions" | "/completions") => {
                self.completions(&request, conn, started)
            }
            ("POST", "/v1/chat/completions" | "/chat/completions") => {
                self.chat(&request, conn, started)
            }
            ("POST", "/infill") => self.infill(&request, conn, started),
            ("POST", "/api/generate") => self.ollama_generate(&request, conn, started),
            (_, path) if self.is_generation(path) || path == "/health" || path == "/v1/models" => {
                Err(ApiError {
                    status: 405,
                    message: format!("{} is not allowed on {path}", request.method),
                })
            }
            (_, path) => Err(ApiError {
                status: 404,
                message: format!("no endpoint {path}"),
            }),
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                eprintln!(
                    "{} {} {}: {}",
                    request.method, request.path, e.status, e.message
                );
                conn.json(e.status, &e.body(ollama))
            }
        }
    }

    fn is_generation(&self, path: &str) -> bool {
        matches!(
            path,
            "/v1/completions"
                | "/completions"
                | "/v1/chat/completions"
                | "/chat/completions"
                | "/infill"
                | "/api/generate"
        )
    }

    fn health(&self, conn: &mut Conn) -> io::Result<()> {
        if !self.ready.load(Ordering::SeqCst) {
            return conn.json(
                503,
                &json!({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}),
            );
        }
        let c = &self.engine.counters;
        let active = c.active.load(Ordering::Relaxed);
        conn.json(
            200,
            &json!({
                "status": "ok",
                "slots_idle": self.engine.slots.saturating_sub(active),
                "slots_processing": active,
                "waiting": self.engine.waiting(),
                "requests": {
                    "finished": c.finished.load(Ordering::Relaxed),
                    "cancelled": c.cancelled.load(Ordering::Relaxed),
                    "rejected": c.rejected.load(Ordering::Relaxed),
                    "failed": c.failed.load(Ordering::Relaxed),
                },
                "tokens": {
                    "prompt": c.prompt_tokens.load(Ordering::Relaxed),
                    "cached": c.cached_tokens.load(Ordering::Relaxed),
                    "generated": c.generated_tokens.load(Ordering::Relaxed),
                },
            }),
        )
    }

    fn models(&self) -> Value {
        json!({"object": "list", "data": [{
            "id": self.info.name, "object": "model", "created": now_secs(), "owned_by": "cxxlm",
            "context_length": self.info.context,
        }]})
    }

    fn sampling(f: &Fields, temperature: f64) -> Result<Sampling, ApiError> {
        // llama.cpp's and Ollama's name, and vLLM's for OpenAI requests.
        let vllm = f.num("repetition_penalty", 1.0, 0.0, 10.0)?;
        let repeat_penalty = f.num("repeat_penalty", vllm, 0.0, 10.0)?;
        if repeat_penalty == 0.0 {
            return Err(bad("the repetition penalty must be above 0 (1 is off)"));
        }
        let repeat_last_n = match f.int("repeat_last_n")? {
            None => 64,
            // llama.cpp's -1: the whole context.
            Some(-1) => usize::MAX,
            Some(n) if n < 0 => {
                return Err(bad(format!("`repeat_last_n` must be -1 or more, not {n}")))
            }
            Some(n) => n as usize,
        };
        Ok(Sampling {
            repeat_penalty,
            repeat_last_n,
            temperature: f.num("temperature", temperature, 0.0, 2.0)?,
            top_k: f.count("top_k", 0, 1 << 20)? as i64,
            top_p: {
                let p = f.num("top_p", 1.0, 0.0, 1.0)?;
                if p == 0.0 {
                    return Err(bad("`top_p` must be above 0"));
                }
                p
            },
        })
    }

    /// Room for the completion: the prompt must leave some.
    fn check_length(&self, prompt: &[u32]) -> Result<(), ApiError> {
        if prompt.len() >= self.info.context {
            return Err(bad(format!(
                "the prompt is {} tokens; this model's context is {} tokens (prompt and completion)",
                prompt.len(),
                self.info.context
            )));
        }
        Ok(())
    }

    /// A FIM prompt of the user's text around the cursor, fitted into the context with
    /// room for `g.max_tokens` (at most half of it), and how to fit the completion back.
    /// A model that learned whole-line middles gets the cursor's line cut at its start
    /// ([`text::LineCut`]), the typed text healed at its last token, and writes the line
    /// to its end ([`RestOfLine`] when text follows the cursor).
    fn fim(
        &self,
        g: &mut Generation,
        files: &[ContextFile],
        prefix: &str,
        suffix: &str,
        min_indent: usize,
    ) {
        let (bpe, layout) = (&*self.info.tokenizer, self.info.layout);
        let budget = self.info.context - g.max_tokens.clamp(1, self.info.context / 2);
        let fit = Reindent::new(prefix, suffix, layout, min_indent);
        let cut = self
            .info
            .fim_line_aligned
            .then(|| text::line_cut(prefix, suffix, layout));
        let (ids, truncated, fit) = match cut {
            Some(cut) => {
                let typed = bpe.encode(&cut.typed);
                let room = budget.saturating_sub(typed.len());
                let (mut ids, truncated) =
                    text::fim_prompt(bpe, files, &cut.prefix, &cut.suffix, layout, room);
                ids.extend(typed);
                if !cut.typed.is_empty() {
                    g.healing = bpe.heal(&mut ids);
                }
                let fit = match cut.rest.is_empty() {
                    true => Fit::Cursor(fit.without_final_line_break()),
                    false => Fit::RestOfLine(RestOfLine::new(fit, &cut.rest)),
                };
                (ids, truncated, fit)
            }
            None => {
                let p = text::prefix(prefix, layout);
                let s = text::suffix(suffix, text::cursor_line(prefix), layout);
                let (ids, truncated) = text::fim_prompt(bpe, files, &p.text, &s, layout, budget);
                (ids, truncated, Fit::Cursor(fit))
            }
        };
        g.prompt = ids;
        g.truncated = truncated;
        g.fit = Some(fit);
    }

    /// Submits the request's jobs; their events arrive on the returned choices.
    fn submit(&self, g: &mut Generation) -> Result<Vec<Choice>, ApiError> {
        let max_tokens = g
            .max_tokens
            .min(self.info.context.saturating_sub(g.prompt.len()));
        let mut stop_tokens = self.stop_tokens.clone();
        if g.ignore_eos {
            stop_tokens.retain(|&t| t != self.eos);
        }
        if g.agent_markers {
            stop_tokens.retain(|t| !self.markers.contains(t));
        }
        let mut choices = Vec::new();
        for _ in 0..g.n {
            let (tx, rx) = mpsc::channel();
            let cancel = Arc::new(AtomicU8::new(GO_ON));
            let job = Job {
                prompt: g.prompt.clone(),
                sampling: g.sampling.clone(),
                max_tokens,
                stop_tokens: stop_tokens.clone(),
                first_tokens: g.healing.as_ref().map(|h| h.allowed.clone()),
                cancel: cancel.clone(),
                events: tx,
            };
            if let Err(e) = self.engine.submit(job) {
                for c in &choices {
                    let c: &Choice = c;
                    c.cancel.store(GONE, Ordering::SeqCst);
                }
                return Err(ApiError {
                    status: 503,
                    message: e.to_string(),
                });
            }
            choices.push(Choice {
                events: rx,
                cancel,
                heal: g.healing.clone(),
                utf8: Utf8Stream::default(),
                fit: g.fit.clone(),
                body: g.body.map(BodyEnd::new),
                stops: Stops::new(g.stops.clone()),
                text: String::new(),
                tokens: 0,
                finish: None,
                stop_type: "limit",
            });
        }
        Ok(choices)
    }

    /// Drives the choices to their end, calling `delta(conn, choice, new text)` as text
    /// arrives; cancels everything when the client goes away.
    fn drive(
        &self,
        conn: &mut Conn,
        g: &Generation,
        mut choices: Vec<Choice>,
        started: Instant,
        delta: &mut dyn FnMut(&mut Conn, usize, &str) -> io::Result<()>,
    ) -> Result<Outcome, Abort> {
        let bpe = &self.info.tokenizer;
        let base = bpe.special_base();
        let mut t = Timings {
            prompt_tokens: g.prompt.len(),
            ..Default::default()
        };
        let cancel_all = |choices: &[Choice]| {
            for c in choices {
                c.cancel.store(GONE, Ordering::SeqCst);
            }
        };
        let mut first_line_at: Option<Instant> = None;
        let mut checked = Instant::now();
        loop {
            let open: Vec<usize> = (0..choices.len())
                .filter(|&i| choices[i].finish.is_none())
                .collect();
            if open.is_empty() {
                break;
            }
            let mut got = false;
            for &i in &open {
                let event = if open.len() == 1 {
                    match choices[i].events.recv_timeout(POLL) {
                        Ok(e) => Some(e),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => {
                            Some(Event::Failed("the engine stopped".into()))
                        }
                    }
                } else {
                    choices[i].events.try_recv().ok()
                };
                let Some(event) = event else { continue };
                got = true;
                let c = &mut choices[i];
                let mut new = String::new();
                match event {
                    Event::Prefilled {
                        cached,
                        queued_ms,
                        prompt_ms,
                        ..
                    } => {
                        t.cached = cached;
                        t.queued_ms = queued_ms;
                        t.prompt_ms = prompt_ms;
                    }
                    Event::Token(token) => {
                        let now = Instant::now();
                        t.first_token.get_or_insert(now);
                        t.last_token = Some(now);
                        t.generated += 1;
                        c.tokens += 1;
                        if token < base || (g.agent_markers && self.markers.contains(&token)) {
                            let bytes = bpe.decode(&[token]);
                            let piece = match c.heal.take() {
                                Some(h) => c.utf8.push(h.strip(&bytes)),
                                None => c.utf8.push(&bytes),
                            };
                            new = fitted(c, &piece);
                        }
                    }
                    Event::Finished(how) => {
                        if c.stops.matched.is_none()
                            && !c.fit.as_ref().is_some_and(|f| f.stopped())
                            && !c.body.as_ref().is_some_and(|b| b.ended)
                        {
                            let rest = c.utf8.finish();
                            new = fitted(c, &rest);
                            if let Some(fit) = &mut c.fit {
                                new += &c.stops.push(&fit.finish());
                            }
                            new += &c.stops.finish();
                        }
                        c.finish.get_or_insert(match how {
                            Finish::Stop => {
                                c.stop_type = "eos";
                                "stop"
                            }
                            Finish::Length | Finish::Cancelled => "length",
                        });
                    }
                    Event::Failed(e) => {
                        cancel_all(&choices);
                        return Err(Abort::Failed(e));
                    }
                }
                if c.finish.is_none()
                    && (c.stops.matched.is_some()
                        || c.fit.as_ref().is_some_and(|f| f.stopped())
                        || c.body.as_ref().is_some_and(|b| b.ended))
                {
                    c.finish = Some("stop");
                    c.stop_type = if c.stops.matched.is_some() {
                        "word"
                    } else {
                        "limit"
                    };
                    c.cancel.store(COMPLETE, Ordering::SeqCst);
                }
                if !new.is_empty() {
                    if new.contains('\n') {
                        first_line_at.get_or_insert_with(Instant::now);
                    }
                    c.text.push_str(&new);
                    if delta(conn, i, &new).is_err() {
                        cancel_all(&choices);
                        return Err(Abort::Gone);
                    }
                }
            }
            if let (Some(limit), Some(_)) = (g.predict_limit, first_line_at) {
                if t.first_token.is_some_and(|f| f.elapsed() > limit) {
                    for c in &mut choices {
                        if c.finish.is_none() {
                            c.finish = Some("length");
                            c.stop_type = "limit";
                            c.cancel.store(COMPLETE, Ordering::SeqCst);
                        }
                    }
                }
            }
            if !got || checked.elapsed() > POLL {
                checked = Instant::now();
                if conn.closed() {
                    cancel_all(&choices);
                    return Err(Abort::Gone);
                }
            }
            if !got && open.len() > 1 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(Outcome {
            choices,
            timings: t,
            truncated: g.truncated,
            started,
        })
    }

    /// Submits, streams or not, logs the request's timings, and maps failures.
    fn run(
        &self,
        conn: &mut Conn,
        what: &str,
        mut g: Generation,
        started: Instant,
        stream: Option<&str>,
        delta: &mut dyn FnMut(&mut Conn, usize, &str) -> io::Result<()>,
    ) -> Result<Option<Outcome>, ApiError> {
        let choices = self.submit(&mut g)?;
        if let Some(content_type) = stream {
            if conn.start_stream(content_type).is_err() {
                for c in &choices {
                    c.cancel.store(GONE, Ordering::SeqCst);
                }
                return Ok(None);
            }
        }
        match self.drive(conn, &g, choices, started, delta) {
            Ok(outcome) => {
                log(what, &outcome, "done");
                Ok(Some(outcome))
            }
            Err(Abort::Gone) => {
                eprintln!("{what}: the client went away; cancelled");
                Ok(None)
            }
            Err(Abort::Failed(e)) => Err(ApiError {
                status: 500,
                message: format!("the model failed: {e}"),
            }),
        }
    }

    /// A plain prompt (no suffix): laid out as the training text was, healed at its last
    /// token, its completion re-indented into the prompt's layout and ended where a
    /// function body it opens ends.
    fn plain(&self, g: &mut Generation, prompt: &str) -> Result<(), ApiError> {
        let (bpe, layout) = (&self.info.tokenizer, self.info.layout);
        let (ids, healing) = text::healed_prompt(bpe, prompt, layout);
        self.check_length(&ids)?;
        g.healing = healing;
        g.prompt = ids;
        g.fit = Some(Fit::Cursor(Reindent::new(prompt, "", layout, 0)));
        g.body = BodyStop::after(prompt);
        Ok(())
    }

    fn completions(&self, r: &Request, conn: &mut Conn, started: Instant) -> Result<(), ApiError> {
        let mut known = OPENAI_SAMPLING.to_vec();
        known.extend(OPENAI_NEUTRAL);
        known.extend(["prompt", "suffix", "echo", "best_of"]);
        let f = Fields::parse(&r.body, &known)?;
        self.openai_neutral(&f)?;
        f.neutral("best_of", &[json!(1)])?;
        let prompt = match f.get("prompt") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                a[0].as_str().unwrap_or_default().to_string()
            }
            Some(Value::Array(_)) => return Err(bad(
                "`prompt` must be one string (lists of prompts and token ids are not supported)",
            )),
            None => return Err(bad("`prompt` is required")),
            Some(_) => return Err(bad("`prompt` must be a string")),
        };
        let suffix = f.string("suffix")?;
        let echo = f.flag("echo")?;
        if echo && suffix.is_some() {
            return Err(bad("`echo` cannot be used with `suffix`"));
        }
        let max_tokens = f.count("max_tokens", 16, usize::MAX)?;
        let stops = self.openai_stops(&f)?;
        let mut g = self.generation(&f, max_tokens, 1.0, stops)?;
        match &suffix {
            Some(s) => self.fim(&mut g, &[], &prompt, s, 0),
            None => self.plain(&mut g, &prompt)?,
        }
        let answer = self.openai_answer(&f, "cmpl", "text_completion", "text_completion")?;
        let stream = answer.stream;
        let chunk = |index: usize, text: &str, finish: Value| {
            answer.chunk(
                json!({"text": text, "index": index, "logprobs": null, "finish_reason": finish}),
            )
        };
        let mut echoed = vec![false; g.n];
        let mut delta = |conn: &mut Conn, i: usize, text: &str| {
            if !stream {
                return Ok(());
            }
            let text = if echo && !std::mem::replace(&mut echoed[i], true) {
                format!("{prompt}{text}")
            } else {
                text.to_string()
            };
            sse(conn, &chunk(i, &text, Value::Null))
        };
        let what = format!("POST {}", r.path);
        let Some(out) = self.run(
            conn,
            &what,
            g,
            started,
            stream.then_some("text/event-stream"),
            &mut delta,
        )?
        else {
            return Ok(());
        };
        let tail = |i: usize, c: &Choice| vec![chunk(i, "", json!(c.finish.unwrap_or("stop")))];
        let whole = |i: usize, c: &Choice| {
            let text = if echo {
                format!("{prompt}{}", c.text)
            } else {
                c.text.clone()
            };
            json!({"text": text, "index": i, "logprobs": null, "finish_reason": c.finish.unwrap_or("stop")})
        };
        answer.finish(conn, &out, &tail, &whole)
    }

    /// An OpenAI answer's identity (a new id with `prefix`, the time, the model) and how
    /// the request asked for it (streamed, with a usage chunk).
    fn openai_answer(
        &self,
        f: &Fields,
        prefix: &str,
        object: &'static str,
        chunk_object: &'static str,
    ) -> Result<OpenAiAnswer, ApiError> {
        let stream = f.flag("stream")?;
        Ok(OpenAiAnswer {
            id: format!("{prefix}-{}", self.ids.fetch_add(1, Ordering::Relaxed)),
            created: now_secs(),
            model: self.info.name.clone(),
            object,
            chunk_object,
            stream,
            usage_chunk: stream
                && f.get("stream_options")
                    .and_then(|o| o.get("include_usage"))
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
        })
    }

    fn openai_neutral(&self, f: &Fields) -> Result<(), ApiError> {
        f.neutral("presence_penalty", &[json!(0), json!(0.0)])?;
        f.neutral("frequency_penalty", &[json!(0), json!(0.0)])?;
        f.neutral("logprobs", &[json!(false), json!(0)])?;
        f.neutral("logit_bias", &[json!({})])?;
        Ok(())
    }

    fn openai_stops(&self, f: &Fields) -> Result<Vec<String>, ApiError> {
        let stops = f.strings("stop")?;
        if stops.len() > 4 {
            return Err(bad("`stop` takes at most 4 strings"));
        }
        Ok(stops)
    }

    fn generation(
        &self,
        f: &Fields,
        max_tokens: usize,
        temperature: f64,
        stops: Vec<String>,
    ) -> Result<Generation, ApiError> {
        let n = f.count("n", 1, MAX_N)?;
        if n == 0 {
            return Err(bad("`n` must be at least 1"));
        }
        Ok(Generation {
            prompt: Vec::new(),
            sampling: Self::sampling(f, temperature)?,
            max_tokens,
            n,
            stops,
            ignore_eos: f.flag("ignore_eos")?,
            fit: None,
            predict_limit: None,
            truncated: false,
            body: None,
            agent_markers: false,
            healing: None,
        })
    }

    fn chat(&self, r: &Request, conn: &mut Conn, started: Instant) -> Result<(), ApiError> {
        let mut known = OPENAI_SAMPLING.to_vec();
        known.extend(OPENAI_NEUTRAL);
        known.extend([
            "messages",
            "max_completion_tokens",
            "top_logprobs",
            "response_format",
            "tools",
            "tool_choice",
            // llama.cpp's, as llama.vim's instruction mode sends them.
            "n_predict",
            "samplers",
            "cache_prompt",
            "id_slot",
            "min_p",
            "response_fields",
        ]);
        let f = Fields::parse(&r.body, &known)?;
        self.openai_neutral(&f)?;
        f.neutral("tools", &[json!([])])?;
        f.neutral("tool_choice", &[json!("none"), json!("auto")])?;
        f.neutral("response_format", &[json!({"type": "text"})])?;
        let Some(Value::Array(list)) = f.get("messages") else {
            return Err(bad("`messages` must be a list of {role, content}"));
        };
        let mut messages = Vec::new();
        for (i, m) in list.iter().enumerate() {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("messages[{i}] has no `role`")))?;
            let role = match role {
                "developer" => Role::System,
                other => Role::parse(other)
                    .ok_or_else(|| bad(format!("messages[{i}]: role {role:?} is not supported")))?,
            };
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(
                        |p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                            (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                            _ => Err(bad(format!("messages[{i}]: only text parts are supported"))),
                        },
                    )
                    .collect::<Result<Vec<_>, _>>()?
                    .concat(),
                _ => return Err(bad(format!("messages[{i}] has no text `content`"))),
            };
            messages.push(Message::new(role, content));
        }
        if messages.is_empty() {
            return Err(bad("`messages` is empty"));
        }
        let prompt = chat::prompt(&self.info.tokenizer, &messages, self.info.layout);
        self.check_length(&prompt)?;
        let limit = match f.int("n_predict")? {
            Some(n) if n >= 0 => Some(n as usize),
            _ => None,
        };
        let max_tokens = match (f.get("max_completion_tokens"), limit) {
            (Some(_), _) => f.count("max_completion_tokens", 0, usize::MAX)?,
            (None, Some(n)) => n,
            (None, None) => f.count("max_tokens", usize::MAX, usize::MAX)?,
        };
        let stops = self.openai_stops(&f)?;
        let mut g = self.generation(&f, max_tokens, 1.0, stops)?;
        g.prompt = prompt;
        g.agent_markers = true;
        g.fit = Some(Fit::Chat(CodeBlocks::new(self.info.layout)));
        let answer =
            self.openai_answer(&f, "chatcmpl", "chat.completion", "chat.completion.chunk")?;
        let stream = answer.stream;
        let chunk = |index: usize, delta: Value, finish: Value| {
            answer.chunk(
                json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": finish}),
            )
        };
        let mut started_choice = vec![false; g.n];
        let mut delta = |conn: &mut Conn, i: usize, text: &str| {
            if !stream {
                return Ok(());
            }
            if !std::mem::replace(&mut started_choice[i], true) {
                sse(
                    conn,
                    &chunk(i, json!({"role": "assistant", "content": ""}), Value::Null),
                )?;
            }
            sse(conn, &chunk(i, json!({"content": text}), Value::Null))
        };
        let what = format!("POST {}", r.path);
        let Some(out) = self.run(
            conn,
            &what,
            g,
            started,
            stream.then_some("text/event-stream"),
            &mut delta,
        )?
        else {
            return Ok(());
        };
        // A choice that streamed no text still opens with its role.
        let tail = |i: usize, c: &Choice| {
            let opening = (!started_choice[i])
                .then(|| chunk(i, json!({"role": "assistant", "content": ""}), Value::Null));
            let end = chunk(i, json!({}), json!(c.finish.unwrap_or("stop")));
            opening.into_iter().chain([end]).collect()
        };
        let whole = |i: usize, c: &Choice| {
            json!({"index": i, "message": {"role": "assistant", "content": c.text},
                   "logprobs": null, "finish_reason": c.finish.unwrap_or("stop")})
        };
        answer.finish(conn, &out, &tail, &whole)
    }

    fn infill(&self, r: &Request, conn: &mut Conn, started: Instant) -> Result<(), ApiError> {
        let f = Fields::parse(&r.body, &LLAMA_FIELDS)?;
        let prefix = f.string("input_prefix")?.unwrap_or_default();
        let suffix = f.string("input_suffix")?.unwrap_or_default();
        // llama.cpp's `prompt` is the cursor line's text before the cursor, after the
        // prefix (llama.vim sends the lines above as the prefix).
        let middle = f.string("prompt")?.unwrap_or_default();
        let mut files = Vec::new();
        match f.get("input_extra") {
            None => {}
            Some(Value::Array(chunks)) => {
                for (i, c) in chunks.iter().enumerate() {
                    let text = c
                        .get("text")
                        .and_then(Value::as_str)
                        .ok_or_else(|| bad(format!("input_extra[{i}] needs a string `text`")))?;
                    let name = c.get("filename").and_then(Value::as_str).unwrap_or("tmp");
                    files.push(ContextFile {
                        name: name.to_string(),
                        text: text.to_string(),
                    });
                }
            }
            Some(_) => {
                return Err(bad(
                    "`input_extra` must be a list of {\"filename\", \"text\"}",
                ))
            }
        }
        let mut chosen = None;
        if let (true, Some(index)) = (files.is_empty(), &self.info.index) {
            let (context, from) = index.context(&format!("{prefix}{middle}"), &suffix);
            files = context;
            chosen = Some(from);
        }
        let max_tokens = match f.int("n_predict")? {
            None | Some(-1) => self.info.context,
            Some(n) if n < -1 => {
                return Err(bad(format!(
                    "`n_predict` must be -1 (no limit) or more, not {n}"
                )))
            }
            Some(n) => n as usize,
        };
        let min_indent = f.count("n_indent", 0, 1 << 16)?;
        let mut g = self.generation(&f, max_tokens, 0.8, f.strings("stop")?)?;
        let cursor_prefix = format!("{prefix}{middle}");
        self.fim(&mut g, &files, &cursor_prefix, &suffix, min_indent);
        g.predict_limit = match f.int("t_max_predict_ms")? {
            Some(ms) if ms > 0 => Some(Duration::from_millis(ms as u64)),
            _ => None,
        };
        let fields = f.strings("response_fields")?;
        let stream = f.flag("stream")?;
        let model = self.info.name.clone();
        let mut delta = |conn: &mut Conn, _: usize, text: &str| {
            if !stream {
                return Ok(());
            }
            sse(
                conn,
                &json!({"index": 0, "content": text, "stop": false, "id_slot": 0,
                              "tokens_predicted": 0, "tokens_evaluated": 0}),
            )
        };
        let Some(out) = self.run(
            conn,
            "POST /infill",
            g,
            started,
            stream.then_some("text/event-stream"),
            &mut delta,
        )?
        else {
            return Ok(());
        };
        let c = &out.choices[0];
        let t = &out.timings;
        let prompt_n = t.prompt_tokens - t.cached;
        let predicted_ms = t.predicted_ms();
        let per = |ms: f64, n: usize| if n > 0 { ms / n as f64 } else { 0.0 };
        let rate = |ms: f64, n: usize| if ms > 0.0 { n as f64 / ms * 1e3 } else { 0.0 };
        let mut body = json!({
            "index": 0,
            "content": if stream { String::new() } else { c.text.clone() },
            "tokens": [],
            "id_slot": 0,
            "stop": true,
            "model": model,
            "tokens_predicted": c.tokens,
            "tokens_evaluated": t.prompt_tokens,
            "prompt": "",
            "has_new_line": c.text.contains('\n'),
            "truncated": out.truncated,
            "stop_type": c.stop_type,
            "stopping_word": c.stops.matched.clone().unwrap_or_default(),
            // As llama.cpp counts it: what the slot's cache holds now.
            "tokens_cached": t.prompt_tokens + c.tokens,
            "timings": {
                "cache_n": t.cached,
                "prompt_n": prompt_n,
                "prompt_ms": t.prompt_ms,
                "prompt_per_token_ms": per(t.prompt_ms, prompt_n),
                "prompt_per_second": rate(t.prompt_ms, prompt_n),
                "predicted_n": c.tokens,
                "predicted_ms": predicted_ms,
                "predicted_per_token_ms": per(predicted_ms, c.tokens),
                "predicted_per_second": t.rate(),
            },
        });
        if let Some(chosen) = chosen {
            // Not llama.cpp's: which definitions the index sent as context.
            body["index_context"] = json!(chosen);
        }
        // llama.cpp's `response_fields`: only these (nested ones as "a/b"), flattened.
        if !fields.is_empty() {
            let mut picked = Map::new();
            for path in &fields {
                let mut v = Some(&body);
                for key in path.split('/') {
                    v = v.and_then(|v| v.get(key));
                }
                if let Some(v) = v {
                    picked.insert(path.clone(), v.clone());
                }
            }
            body = Value::Object(picked);
        }
        if stream {
            return finish_sse_plain(conn, &body).map_err(|_| bad("the client went away"));
        }
        conn.json(200, &body)
            .map_err(|_| bad("the client went away"))
    }

    fn ollama_tags(&self) -> Value {
        json!({"models": [{"name": self.info.name, "model": self.info.name,
                           "details": {"family": "cxxlm", "format": "safetensors"}}]})
    }

    /// What Continue reads to decide that the model does FIM: a template with `.Suffix`.
    fn ollama_show(&self) -> Value {
        json!({
            "template": "{{ if .Suffix }}<|fim_prefix|>{{ .Prompt }}<|fim_suffix|>{{ .Suffix }}<|fim_middle|>{{ else }}{{ .Prompt }}{{ end }}",
            "parameters": format!("num_ctx {}", self.info.context),
            "details": {"family": "cxxlm", "format": "safetensors"},
            "model_info": {"general.architecture": "cxxlm", "cxxlm.context_length": self.info.context},
            "capabilities": ["completion", "insert"],
        })
    }

    fn ollama_generate(
        &self,
        r: &Request,
        conn: &mut Conn,
        started: Instant,
    ) -> Result<(), ApiError> {
        let f = Fields::parse(
            &r.body,
            &[
                "model",
                "prompt",
                "suffix",
                "raw",
                "stream",
                "options",
                "keep_alive",
                "system",
                "template",
                "context",
                "format",
                "images",
            ],
        )?;
        f.neutral("images", &[json!([])])?;
        f.neutral("format", &[json!("")])?;
        f.neutral("context", &[json!([])])?;
        let options = match f.get("options") {
            None => Map::new(),
            Some(Value::Object(o)) => o.clone(),
            Some(_) => return Err(bad("`options` must be an object")),
        };
        let opts = Fields { map: options };
        let known = [
            "temperature",
            "top_p",
            "top_k",
            "num_predict",
            "stop",
            "num_ctx",
            "seed",
            "min_p",
            "mirostat",
            "mirostat_eta",
            "mirostat_tau",
            "num_thread",
            "use_mmap",
            "repeat_penalty",
            "repeat_last_n",
            "num_keep",
            "typical_p",
            "presence_penalty",
            "frequency_penalty",
            "num_batch",
            "num_gpu",
            "main_gpu",
            "use_mlock",
            "tfs_z",
            "penalize_newline",
            "numa",
            "low_vram",
            "vocab_only",
            "num_gqa",
        ];
        if let Some(k) = opts.map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(bad(format!("unknown option `{k}`")));
        }
        let prompt = f.string("prompt")?.unwrap_or_default();
        let suffix = f.string("suffix")?;
        let max_tokens = match opts.int("num_predict")? {
            None | Some(-1) | Some(-2) => 128,
            Some(n) if n < 0 => {
                return Err(bad(format!("`num_predict` must be -1 or more, not {n}")))
            }
            Some(n) => n as usize,
        };
        let mut g = self.generation(&opts, max_tokens, 0.8, opts.strings("stop")?)?;
        g.n = 1;
        match &suffix {
            Some(s) => self.fim(&mut g, &[], &prompt, s, 0),
            None => self.plain(&mut g, &prompt)?,
        }
        // Ollama streams unless told not to.
        let stream = f.get("stream").and_then(Value::as_bool).unwrap_or(true);
        let model = self.info.name.clone();
        let stamp = || iso_now();
        let mut delta = |conn: &mut Conn, _: usize, text: &str| {
            if !stream {
                return Ok(());
            }
            let line =
                json!({"model": model, "created_at": stamp(), "response": text, "done": false});
            conn.chunk(format!("{line}\n").as_bytes())
        };
        let Some(out) = self.run(
            conn,
            "POST /api/generate",
            g,
            started,
            stream.then_some("application/x-ndjson"),
            &mut delta,
        )?
        else {
            return Ok(());
        };
        let c = &out.choices[0];
        let t = &out.timings;
        let ns = |ms: f64| (ms * 1e6) as u64;
        let last = json!({
            "model": model,
            "created_at": stamp(),
            "response": if stream { String::new() } else { c.text.clone() },
            "done": true,
            "done_reason": c.finish.unwrap_or("stop"),
            "total_duration": out.started.elapsed().as_nanos() as u64,
            "load_duration": 0,
            "prompt_eval_count": t.prompt_tokens,
            "prompt_eval_duration": ns(t.prompt_ms),
            "eval_count": c.tokens,
            "eval_duration": ns(t.predicted_ms()),
        });
        if stream {
            let done = conn
                .chunk(format!("{last}\n").as_bytes())
                .and_then(|_| conn.end_stream());
            return done.map_err(|_| bad("the client went away"));
        }
        conn.json(200, &last)
            .map_err(|_| bad("the client went away"))
    }
}

/// New text through a choice's re-indentation, the end of its function body and its
/// stop strings.
fn fitted(c: &mut Choice, piece: &str) -> String {
    let piece = match &mut c.fit {
        Some(fit) => fit.push(piece),
        None => piece.to_string(),
    };
    let piece = match &mut c.body {
        Some(body) => body.push(&piece),
        None => piece,
    };
    c.stops.push(&piece)
}

fn usage(out: &Outcome) -> Value {
    let completion: usize = out.choices.iter().map(|c| c.tokens).sum();
    let t = &out.timings;
    json!({"prompt_tokens": t.prompt_tokens, "completion_tokens": completion,
           "total_tokens": t.prompt_tokens + completion,
           "prompt_tokens_details": {"cached_tokens": t.cached}})
}

/// Per-request timings (llama.cpp adds the same to its OpenAI responses).
fn timings(out: &Outcome) -> Value {
    let t = &out.timings;
    let ttft = t
        .first_token
        .map_or(0.0, |f| (f - out.started).as_secs_f64() * 1e3);
    json!({"prompt_n": t.prompt_tokens, "cache_n": t.cached, "queued_ms": t.queued_ms,
           "prompt_ms": t.prompt_ms, "first_token_ms": ttft, "predicted_n": t.generated,
           "predicted_ms": t.predicted_ms(), "predicted_per_second": t.rate()})
}

fn log(what: &str, out: &Outcome, how: &str) {
    let t = &out.timings;
    let ttft = t
        .first_token
        .map_or(0.0, |f| (f - out.started).as_secs_f64() * 1e3);
    let finish: Vec<&str> = out
        .choices
        .iter()
        .map(|c| c.finish.unwrap_or("stop"))
        .collect();
    eprintln!(
        "{what}: prompt {} tokens ({} cached{}), queued {:.1} ms, first token {ttft:.1} ms, {} tokens at {:.1} tok/s, {how} ({})",
        t.prompt_tokens,
        t.cached,
        if out.truncated { ", truncated" } else { "" },
        t.queued_ms,
        t.generated,
        t.rate(),
        finish.join(",")
    );
}

fn sse(conn: &mut Conn, value: &Value) -> io::Result<()> {
    conn.chunk(format!("data: {value}\n\n").as_bytes())
}

fn finish_sse(conn: &mut Conn, tail: &[Value]) -> io::Result<()> {
    for v in tail {
        sse(conn, v)?;
    }
    conn.chunk(b"data: [DONE]\n\n")?;
    conn.end_stream()
}

/// llama.cpp's native streams end with the final object and no `[DONE]`.
fn finish_sse_plain(conn: &mut Conn, last: &Value) -> io::Result<()> {
    sse(conn, last)?;
    conn.end_stream()
}

/// UTC now as RFC 3339 (Ollama's `created_at`).
fn iso_now() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}
