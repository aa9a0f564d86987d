//! What answers the agent: a chat model, behind any OpenAI-compatible endpoint (through
//! the tasks' teacher client) or in this process (`cxxlm agent --checkpoint`).

use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use cxxlm_tasks::teacher::{Teacher, TeacherConfig};
use cxxlm_tokenizer::chat::Message;

/// A reply, and the tokens it cost (prompt and reply).
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub text: String,
    pub tokens: usize,
}

pub trait Model {
    /// The next assistant turn of `messages`.
    fn reply(&mut self, messages: &[Message]) -> Result<Reply, String>;
}

/// An OpenAI-compatible `/v1/chat/completions`; tool answers are sent as `tool` messages.
pub struct Endpoint {
    teacher: Teacher,
}

impl Endpoint {
    /// `base_url` up to and including `/v1`.
    pub fn new(
        base_url: &str,
        model: &str,
        api_key: Option<String>,
        max_tokens: usize,
        temperature: f64,
    ) -> Result<Endpoint, String> {
        let teacher = Teacher::new(TeacherConfig {
            base_url: base_url.to_string(),
            model: model.to_string(),
            api_key,
            concurrency: 1,
            retries: 3,
            backoff: Duration::from_millis(500),
            timeout: Duration::from_secs(600),
            temperature,
            max_tokens,
            cache: None,
        })
        .map_err(|e| e.to_string())?;
        Ok(Endpoint { teacher })
    }
}

impl Model for Endpoint {
    fn reply(&mut self, messages: &[Message]) -> Result<Reply, String> {
        let messages: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| serde_json::json!({"role": m.role.name(), "content": m.content}))
            .collect();
        let reply = self
            .teacher
            .chat(&messages, &AtomicUsize::new(0))
            .map_err(|e| e.to_string())?;
        // A server that counts no tokens: about four bytes a token.
        let estimate = || {
            messages.iter().map(|m| m.to_string().len()).sum::<usize>() / 4
                + reply.content.len() / 4
        };
        Ok(Reply {
            tokens: reply.tokens.map_or_else(estimate, |t| t as usize),
            text: reply.content,
        })
    }
}
