//! A teacher for the seeds' synthetic sources (textbook Q&A, code review, bugs a teacher
//! injects): an OpenAI-compatible `/v1/chat/completions` client with a concurrency
//! limit, retries with backoff, and a response cache, so that a rerun (or a killed run
//! started again) asks only what it has no answer to. Prompts are template files with
//! `{{field}}` holes filled from JSON lines records.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::{Result, TaskError};

#[derive(Debug, Clone)]
pub struct TeacherConfig {
    /// Up to and including `/v1`, e.g. `http://127.0.0.1:8012/v1`.
    pub base_url: String,
    pub model: String,
    /// Sent as `Authorization: Bearer ...` when set.
    pub api_key: Option<String>,
    pub concurrency: usize,
    pub retries: u32,
    /// First backoff; doubled after each failed attempt.
    pub backoff: Duration,
    pub timeout: Duration,
    pub temperature: f64,
    pub max_tokens: usize,
    /// Answers kept by request (none: every request is asked).
    pub cache: Option<PathBuf>,
}

/// One request: a record's id and the rendered user message.
#[derive(Debug, Clone)]
pub struct Request {
    pub id: String,
    pub prompt: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Answer {
    pub id: String,
    pub input: String,
    pub output: String,
    pub model: String,
    /// Whether it came from the cache.
    #[serde(skip)]
    pub cached: bool,
}

/// Fills `{{name}}` holes of `template` from `record`'s fields (strings as they are,
/// other values as JSON). A hole with no field is an error naming it.
pub fn render(template: &str, record: &Value) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let Some(close) = rest[open..].find("}}") else {
            out.push_str(&rest[open..]);
            return Ok(out);
        };
        let name = rest[open + 2..open + close].trim();
        match record.get(name) {
            Some(Value::String(s)) => out.push_str(s),
            Some(v) => out.push_str(&v.to_string()),
            None => {
                return Err(format!(
                    "the prompt asks for {{{{{name}}}}}, which the record lacks"
                ))
            }
        }
        rest = &rest[open + close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// An assistant message, and the tokens the server counted for it (prompt and answer).
#[derive(Debug, Clone)]
pub struct Reply {
    pub content: String,
    pub tokens: Option<u64>,
    pub cached: bool,
}

pub struct Teacher {
    config: TeacherConfig,
    agent: ureq::Agent,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct TeacherStats {
    pub requests: usize,
    pub cached: usize,
    pub asked: usize,
    pub retries: usize,
    pub failed: usize,
}

impl Teacher {
    pub fn new(config: TeacherConfig) -> Result<Self> {
        if !["http://", "https://"]
            .iter()
            .any(|scheme| config.base_url.starts_with(scheme))
        {
            return Err(TaskError::Teacher(format!(
                "{}: not an http:// or https:// URL",
                config.base_url
            )));
        }
        if let Some(cache) = &config.cache {
            std::fs::create_dir_all(cache).map_err(|e| TaskError::io(cache, e))?;
        }
        let agent = ureq::AgentBuilder::new().timeout(config.timeout).build();
        Ok(Teacher { config, agent })
    }

    fn body(&self, messages: &[Value]) -> Value {
        json!({
            "model": self.config.model,
            "messages": messages,
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        })
    }

    fn cache_path(&self, body: &Value) -> Option<PathBuf> {
        let key = xxhash_rust::xxh3::xxh3_128(body.to_string().as_bytes());
        let dir = self.config.cache.as_ref()?;
        Some(dir.join(format!("{key:032x}.json")))
    }

    /// One completion of a user message (see [`Teacher::chat`]): its text, and whether
    /// it came from the cache.
    pub fn ask(&self, prompt: &str, retries: &AtomicUsize) -> Result<(String, bool)> {
        let reply = self.chat(&[json!({"role": "user", "content": prompt})], retries)?;
        Ok((reply.content, reply.cached))
    }

    /// The next assistant message of a conversation (`{"role", "content"}` objects): from
    /// the cache, or asked with retries (429, 5xx and transport errors are retried after
    /// a doubling backoff; other statuses are not).
    pub fn chat(&self, messages: &[Value], retries: &AtomicUsize) -> Result<Reply> {
        let body = self.body(messages);
        let cache = self.cache_path(&body);
        if let Some(text) = cache.as_ref().and_then(|c| std::fs::read_to_string(c).ok()) {
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                if let Some(content) = v.get("content").and_then(Value::as_str) {
                    return Ok(Reply {
                        content: content.to_string(),
                        tokens: v.get("tokens").and_then(Value::as_u64),
                        cached: true,
                    });
                }
            }
        }
        let url = format!(
            "{}/chat/completions",
            self.config.base_url.trim_end_matches('/')
        );
        let mut wait = self.config.backoff;
        let mut attempt = 0;
        let response: Value = loop {
            let mut req = self
                .agent
                .post(&url)
                .set("Content-Type", "application/json");
            if let Some(key) = &self.config.api_key {
                req = req.set("Authorization", &format!("Bearer {key}"));
            }
            let error = match req.send_json(body.clone()) {
                Ok(r) => match r.into_json::<Value>() {
                    Ok(v) => break v,
                    Err(e) => format!("unreadable response: {e}"),
                },
                Err(ureq::Error::Status(code, r)) if code == 429 || code >= 500 => {
                    format!("status {code}: {}", r.into_string().unwrap_or_default())
                }
                Err(ureq::Error::Status(code, r)) => {
                    return Err(TaskError::Teacher(format!(
                        "{url}: status {code}: {}",
                        r.into_string()
                            .unwrap_or_default()
                            .chars()
                            .take(500)
                            .collect::<String>()
                    )))
                }
                // A URL that cannot be asked (a space in the host, say) stays so.
                Err(ureq::Error::Transport(t))
                    if matches!(
                        t.kind(),
                        ureq::ErrorKind::InvalidUrl | ureq::ErrorKind::UnknownScheme
                    ) =>
                {
                    return Err(TaskError::Teacher(t.to_string()))
                }
                // ureq's transport errors already start with the URL.
                Err(e) => e
                    .to_string()
                    .trim_start_matches(&format!("{url}: "))
                    .to_string(),
            };
            attempt += 1;
            if attempt > self.config.retries {
                return Err(TaskError::Teacher(format!(
                    "{url}: {error} (after {attempt} attempts)"
                )));
            }
            retries.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(wait);
            wait *= 2;
        };
        let content = response
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                TaskError::Teacher(format!(
                    "{url}: no choices[0].message.content in {response}"
                ))
            })?
            .to_string();
        let tokens = response
            .pointer("/usage/total_tokens")
            .and_then(Value::as_u64);
        if let Some(cache) = cache {
            let record = json!({"request": body, "content": content, "tokens": tokens});
            cxxlm_data::shard::write_atomic(&cache, record.to_string().as_bytes())
                .map_err(|e| TaskError::Input(e.to_string()))?;
        }
        Ok(Reply {
            content,
            tokens,
            cached: false,
        })
    }

    /// Answers every request with at most `concurrency` in flight; answers come back in
    /// the requests' order. A request that fails after its retries is counted and left
    /// out (its error is returned with the answers).
    pub fn answer_all(
        &self,
        requests: &[Request],
    ) -> (Vec<Answer>, Vec<(String, String)>, TeacherStats) {
        let next = AtomicUsize::new(0);
        let retries = AtomicUsize::new(0);
        let slots: Mutex<Vec<Option<std::result::Result<Answer, String>>>> =
            Mutex::new(vec![None; requests.len()]);
        std::thread::scope(|scope| {
            for _ in 0..self.config.concurrency.max(1) {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(r) = requests.get(i) else { break };
                    let result = self
                        .ask(&r.prompt, &retries)
                        .map(|(output, cached)| Answer {
                            id: r.id.clone(),
                            input: r.prompt.clone(),
                            output,
                            model: self.config.model.clone(),
                            cached,
                        })
                        .map_err(|e| e.to_string());
                    if let Ok(mut s) = slots.lock() {
                        s[i] = Some(result);
                    }
                });
            }
        });
        let mut stats = TeacherStats {
            requests: requests.len(),
            retries: retries.load(Ordering::Relaxed),
            ..Default::default()
        };
        let mut answers = Vec::new();
        let mut errors = Vec::new();
        for (r, slot) in requests.iter().zip(slots.into_inner().unwrap_or_default()) {
            match slot {
                Some(Ok(a)) => {
                    if a.cached {
                        stats.cached += 1;
                    } else {
                        stats.asked += 1;
                    }
                    answers.push(a);
                }
                Some(Err(e)) => {
                    stats.failed += 1;
                    errors.push((r.id.clone(), e));
                }
                None => {
                    stats.failed += 1;
                    errors.push((r.id.clone(), "not answered".into()));
                }
            }
        }
        (answers, errors, stats)
    }
}

/// Requests from a prompt template and JSON lines records (`id` field, or the line number).
pub fn requests(template: &Path, records: &Path) -> Result<Vec<Request>> {
    let template_text =
        std::fs::read_to_string(template).map_err(|e| TaskError::io(template, e))?;
    let text = crate::bugs::read_text(records)?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            let bad = |message: String| TaskError::Format {
                path: records.to_path_buf(),
                line: i + 1,
                message,
            };
            let v: Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
            let id = match v.get("id") {
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => format!("{}", i + 1),
            };
            Ok(Request {
                id,
                prompt: render(&template_text, &v).map_err(bad)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_that_cannot_be_asked_is_refused_without_retries() {
        let config = |base_url: &str| TeacherConfig {
            base_url: base_url.into(),
            model: "m".into(),
            api_key: None,
            concurrency: 1,
            retries: 3,
            backoff: std::time::Duration::from_secs(60),
            timeout: std::time::Duration::from_secs(5),
            temperature: 0.0,
            max_tokens: 8,
            cache: None,
        };
        let e = Teacher::new(config("not a url")).err().unwrap().to_string();
        assert!(e.contains("not an http:// or https:// URL"), "{e}");
        // A retry would sleep a minute first.
        let teacher = Teacher::new(config("http://bad host/v1")).unwrap();
        let retries = AtomicUsize::new(0);
        let e = teacher.ask("hi", &retries).unwrap_err().to_string();
        assert_eq!(retries.load(Ordering::Relaxed), 0, "{e}");
    }

    #[test]
    fn templates_fill_holes_and_name_missing_fields() {
        let r = json!({"code": "int f();", "n": 3});
        assert_eq!(
            render("Review:\n{{code}}\n({{ n }})", &r).unwrap(),
            "Review:\nint f();\n(3)"
        );
        let e = render("{{missing}}", &r).unwrap_err();
        assert!(e.contains("{{missing}}"), "{e}");
    }
}
