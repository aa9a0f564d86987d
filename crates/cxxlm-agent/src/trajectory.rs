//! Tool-use examples for fine-tuning from verified bug tasks (`cxxlm tasks bugs`): the
//! task's program becomes a repository (main.cpp with the bug, a Makefile whose test
//! compares the output with the oracle's, under the sanitizers), and the loop replays the
//! trajectory that fixes it: test (the sanitizer's report), open the reported lines, edit
//! them into the fix (through the edit guard), test again, submit. The tools' answers are
//! the real ones; only trajectories that end solved are kept, as chat examples that
//! `train sft` reads.

use std::collections::VecDeque;

use cxxlm_tasks::task::Task;
use cxxlm_tokenizer::chat::Role;
use serde_json::{json, Value};

use crate::agent::{Agent, Budget, Commands, Outcome};
use crate::call::{self, Call};
use crate::check::Checker;
use crate::model::{Model, Reply};
use crate::workspace::Workspace;
use crate::AgentError;

/// A model that says what it was given to say, turn by turn.
pub struct Replay {
    turns: VecDeque<String>,
}

impl Model for Replay {
    fn reply(&mut self, _: &[cxxlm_tokenizer::chat::Message]) -> Result<Reply, String> {
        let text = self
            .turns
            .pop_front()
            .ok_or("the trajectory has no more turns")?;
        Ok(Reply { text, tokens: 0 })
    }
}

/// The lines that differ: `(first, last)` of `buggy` (1-based, inclusive; `last =
/// first - 1` for none) and the lines of `fixed` that take their place.
fn hunk(buggy: &str, fixed: &str) -> Option<(usize, usize, String)> {
    let b: Vec<&str> = buggy.lines().collect();
    let f: Vec<&str> = fixed.lines().collect();
    let prefix = b.iter().zip(&f).take_while(|(x, y)| x == y).count();
    if prefix == b.len() && prefix == f.len() {
        return None;
    }
    let suffix = b[prefix..]
        .iter()
        .rev()
        .zip(f[prefix..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let text: String = f[prefix..f.len() - suffix]
        .iter()
        .map(|l| format!("{l}\n"))
        .collect();
    Some((prefix + 1, b.len() - suffix, text))
}

/// The reasoning of a task's answer (`/* REASONING: ... */`), on one line.
fn reasoning(output: &str) -> Option<String> {
    let start = output.find("/* REASONING:")? + "/* REASONING:".len();
    let end = output[start..].find("*/")? + start;
    Some(
        output[start..end]
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// The chat example of a solved trajectory for `task`, or why there is none.
pub fn example(task: &Task) -> Result<Result<Value, String>, AgentError> {
    let Some(check) = &task.check else {
        return Ok(Err("not runnable (no check)".into()));
    };
    let Some((first, last, text)) = hunk(&check.buggy, &check.fixed) else {
        return Ok(Err("the bug and the fix are the same text".into()));
    };
    let tmp = tempfile::tempdir().map_err(|e| AgentError::io("a temporary folder", e))?;
    let dir = tmp.path().join("repo");
    crate::task_repo::write(check, &dir)?;
    let prompt = crate::task_repo::statement(task, check);
    let at = check
        .failure
        .location
        .as_deref()
        .map_or(String::new(), |l| format!(" at {l}"));
    let open_from = first.saturating_sub(8).max(1);
    let turn = |thought: &str, c: Call| call::render(Some(thought), &c);
    let turns = VecDeque::from([
        turn("Run the test to see how it fails.", Call::Test {}),
        turn(
            &format!("The report points into main.cpp{at}. Read the code around it."),
            Call::Open {
                path: "main.cpp".into(),
                line: Some(open_from),
                lines: Some(last.max(first) + 8 - open_from + 1),
            },
        ),
        turn(
            &reasoning(&task.output).unwrap_or_else(|| "This is the bug.".into()),
            Call::Edit {
                path: "main.cpp".into(),
                start: first,
                end: last,
                text,
            },
        ),
        turn("Test the fix.", Call::Test {}),
        turn("The test passes.", Call::Submit {}),
    ]);
    let steps = turns.len();
    let mut model = Replay { turns };
    let workspace = Workspace::new(&dir)?;
    let checker = Checker::new(workspace.root())?;
    let commands = Commands::for_repo(workspace.root(), None, None)?;
    let mut agent = Agent {
        workspace,
        checker,
        commands,
        model: &mut model,
        budget: Budget {
            steps,
            tokens: usize::MAX,
        },
    };
    let report = agent.run(&prompt, &tmp.path().join("transcript.jsonl"))?;
    if report.outcome != Outcome::Solved {
        return Ok(Err(format!(
            "the replayed fix ended {}",
            report.outcome.name()
        )));
    }
    let mut messages = report.messages;
    // The example ends with the submission: what follows is the verdict.
    if messages.last().is_some_and(|m| m.role == Role::Tool) {
        messages.pop();
    }
    let messages: Vec<Value> = messages
        .iter()
        .map(|m| json!({"role": m.role.name(), "content": m.content}))
        .collect();
    Ok(Ok(
        json!({"id": task.id, "split": task.split, "project": task.project, "messages": messages}),
    ))
}
