//! The loop (ReAct): the model answers with a thought and a call, the call runs, its
//! answer goes back as a tool turn, until the model submits or a budget (steps, tokens)
//! runs out. Every step is a JSON line of the transcript: what the model wrote, the call
//! read from it (or why none could be), the tool's answer, and the time each took.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use cxxlm_tokenizer::chat::{Message, Role};
use serde_json::json;

use crate::call::{self, Call};
use crate::check::Checker;
use crate::model::Model;
use crate::workspace::{Answer, Workspace};
use crate::AgentError;

pub struct Budget {
    pub steps: usize,
    /// Tokens over all the model's calls, prompts and replies.
    pub tokens: usize,
}

/// How the repository is built and tested (shell commands, run in the sandbox).
pub struct Commands {
    pub build: String,
    pub test: String,
}

impl Commands {
    /// `make` and `make test` when the repository has a Makefile.
    pub fn for_repo(
        root: &Path,
        build: Option<String>,
        test: Option<String>,
    ) -> Result<Commands, AgentError> {
        let make = root.join("Makefile").is_file();
        let missing = |what: &str, flag: &str| {
            AgentError::Input(format!(
                "{} has no Makefile: pass the {what} command with {flag}",
                root.display()
            ))
        };
        Ok(Commands {
            build: build
                .or(make.then(|| "make".to_string()))
                .ok_or_else(|| missing("build", "--build"))?,
            test: test
                .or(make.then(|| "make test".to_string()))
                .ok_or_else(|| missing("test", "--test"))?,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Submitted, and the tests pass.
    Solved,
    /// Submitted, and the tests fail.
    NotSolved,
    /// Steps or tokens ran out before a submission.
    BudgetExhausted,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Solved => "solved",
            Outcome::NotSolved => "not solved",
            Outcome::BudgetExhausted => "budget exhausted",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Report {
    pub outcome: Outcome,
    pub steps: usize,
    pub tokens: usize,
    /// The conversation: instructions, task, then each turn and its tool's answer.
    pub messages: Vec<Message>,
    /// Calls made, by tool.
    pub calls: BTreeMap<String, usize>,
    /// Turns whose call could not be read (no call, not JSON, unknown tool or field).
    pub call_errors: usize,
}

/// The tools and the format, for the system turn (without the index's when `index` is
/// false).
pub fn instructions(index: bool) -> String {
    let (search_symbol, index_tool) = if index {
        (
            "; or {\"tool\": \"search\", \"symbol\": \"mean\"}: its definitions".to_string(),
            format!("{q}{{\"tool\": \"index\", \"path\": \"src/a.cpp\", \"line\": 12}}  the definitions that matter there\n", q = call::QUERY_TOOL),
        )
    } else {
        (String::new(), String::new())
    };
    format!(
        "You fix C++ repositories with tools. Each turn: optionally {ts}your reasoning{te}, then {q} and one JSON object, the call; the tool's answer comes back in the next turn.\n\
Tools:\n\
{q}{{\"tool\": \"list\", \"path\": \"src\"}}  files under a folder (path optional)\n\
{q}{{\"tool\": \"search\", \"text\": \"mean(\"}}  lines holding a text{search_symbol}\n\
{q}{{\"tool\": \"open\", \"path\": \"src/a.cpp\", \"line\": 1, \"lines\": 60}}  numbered lines\n\
{q}{{\"tool\": \"edit\", \"path\": \"src/a.cpp\", \"start\": 3, \"end\": 4, \"text\": \"new lines\\n\"}}  replace lines start-end (refused if the file would no longer compile)\n\
{q}{{\"tool\": \"build\"}}  {q}{{\"tool\": \"test\"}}  build or test in a sandbox: compiler and sanitizer output\n\
{index_tool}{q}{{\"tool\": \"submit\"}}  when the tests pass",
        ts = call::THOUGHT_START,
        te = call::THOUGHT_END,
        q = call::QUERY_TOOL,
    )
}

pub struct Agent<'a> {
    pub workspace: Workspace,
    pub checker: Checker,
    pub commands: Commands,
    pub model: &'a mut dyn Model,
    pub budget: Budget,
}

impl Agent<'_> {
    /// Works on `task` until a submission or the end of the budget, writing the
    /// transcript to `transcript` (under a temporary name until the end).
    pub fn run(&mut self, task: &str, transcript: &Path) -> Result<Report, AgentError> {
        let partial = PathBuf::from(format!("{}.partial", transcript.display()));
        let mut out = std::fs::File::create(&partial).map_err(|e| AgentError::io(&partial, e))?;
        let mut messages = vec![
            Message::new(Role::System, instructions(self.workspace.index_tools())),
            Message::new(Role::User, task),
        ];
        let mut tokens = 0;
        let mut outcome = Outcome::BudgetExhausted;
        let mut steps = 0;
        let mut calls = BTreeMap::new();
        let mut call_errors = 0;
        while steps < self.budget.steps && tokens < self.budget.tokens {
            steps += 1;
            let started = Instant::now();
            let reply = self.model.reply(&messages).map_err(AgentError::Model)?;
            let model_ms = ms(started);
            tokens += reply.tokens;
            let turn = call::parse(&reply.text);
            match &turn.call {
                Ok(c) => *calls.entry(c.name().to_string()).or_insert(0) += 1,
                Err(_) => call_errors += 1,
            }
            let started = Instant::now();
            let (answer, submitted) = match &turn.call {
                Ok(c) => self.execute(c)?,
                Err(e) => (Answer::refused(e.clone()), None),
            };
            let record = json!({
                "step": steps,
                "output": reply.text,
                "thought": turn.thought,
                "call": turn.call.as_ref().ok(),
                "call_error": turn.call.as_ref().err(),
                "ok": answer.ok,
                "result": answer.text,
                "model_ms": model_ms,
                "tool_ms": ms(started),
                "tokens": tokens,
            });
            writeln!(out, "{record}").map_err(|e| AgentError::io(&partial, e))?;
            messages.push(Message::new(Role::Assistant, reply.text));
            messages.push(Message::new(Role::Tool, answer.text));
            if let Some(passed) = submitted {
                outcome = if passed {
                    Outcome::Solved
                } else {
                    Outcome::NotSolved
                };
                break;
            }
        }
        let end = json!({"outcome": outcome.name(), "steps": steps, "tokens": tokens});
        writeln!(out, "{end}").map_err(|e| AgentError::io(&partial, e))?;
        drop(out);
        std::fs::rename(&partial, transcript).map_err(|e| AgentError::io(transcript, e))?;
        Ok(Report {
            outcome,
            steps,
            tokens,
            messages,
            calls,
            call_errors,
        })
    }

    /// Runs a call: its answer, and for a submission whether the tests passed.
    fn execute(&mut self, call: &Call) -> Result<(Answer, Option<bool>), AgentError> {
        let w = &mut self.workspace;
        let answer = match call {
            Call::List { path } => w.list(path.as_deref()),
            Call::Search { text, symbol } => w.search(text.as_deref(), symbol.as_deref()),
            Call::Open { path, line, lines } => w.open(path, *line, *lines),
            Call::Edit {
                path,
                start,
                end,
                text,
            } => w.edit(path, *start, *end, text)?,
            Call::Index { path, line } => w.index(path, *line),
            Call::Build {} | Call::Test {} => {
                let command = match call {
                    Call::Build {} => &self.commands.build,
                    _ => &self.commands.test,
                };
                let checked = self.checker.run(command)?;
                Answer {
                    ok: checked.passed,
                    text: checked.summary,
                }
            }
            Call::Submit {} => {
                let checked = self.checker.run(&self.commands.test)?;
                let verdict = if checked.passed {
                    "the tests pass"
                } else {
                    "the tests fail"
                };
                let text = format!("submitted: {verdict}\n{}", checked.summary);
                return Ok((
                    Answer {
                        ok: checked.passed,
                        text,
                    },
                    Some(checked.passed),
                ));
            }
        };
        Ok((answer, None))
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}
