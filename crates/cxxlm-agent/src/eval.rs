//! The agent's success on runnable tasks of `cxxlm tasks` (bugs and function bodies),
//! with the index's tools and without them. Each task becomes a small repository
//! ([`task_repo`](crate::task_repo)); the loop works in it within its budget; then the
//! final `main.cpp` is judged by the task's own verifier in the sandbox (the judge of
//! `tasks verify` and `eval bugfix`: the oracle's output, sanitizers silent), whatever
//! the agent submitted or its own test said. One JSON line per judged run
//! (`results.jsonl`, so a stopped run goes on where it was), a transcript per run and a
//! summary.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use cxxlm_data::journal::Journal;
use cxxlm_tasks::judge::Judge;
use cxxlm_tasks::task::Task;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::agent::{Agent, Budget, Commands};
use crate::check::Checker;
use crate::model::Model;
use crate::workspace::{write_atomic, Workspace};
use crate::AgentError;

/// Whether the model has the index's tools (`index`, `search` by symbol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    Index,
    NoIndex,
}

impl Condition {
    pub fn name(self) -> &'static str {
        match self {
            Condition::Index => "index",
            Condition::NoIndex => "no_index",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Condition::Index => "with the index",
            Condition::NoIndex => "without the index",
        }
    }
}

/// What a run is: the same settings in the same folder, or a new folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// The model, as the command named it (a checkpoint, or an endpoint and a name),
    /// with its sampling.
    pub model: String,
    pub steps: usize,
    pub tokens: usize,
    pub conditions: Vec<Condition>,
}

/// One task run in one condition, judged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Judged {
    pub id: String,
    pub kind: String,
    pub condition: Condition,
    /// The final `main.cpp` passes the task's verifier.
    pub solved: bool,
    pub compiled: bool,
    /// Why it did not pass (`does_not_compile`, the run's failure kind).
    pub failure: Option<String>,
    /// How the loop ended: `solved`, `not solved` (submitted, its test failed) or
    /// `budget exhausted`.
    pub outcome: String,
    pub steps: usize,
    pub tokens: usize,
    /// Calls made, by tool.
    pub calls: BTreeMap<String, usize>,
    /// Turns whose call could not be read.
    pub call_errors: usize,
    pub seconds: f64,
    /// Relative to the output folder.
    pub transcript: String,
}

/// The totals of one condition.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub attempted: usize,
    pub solved: usize,
    pub compiled: usize,
    /// Runs that ended with a submission.
    pub submitted: usize,
    pub steps: usize,
    pub tokens: usize,
    pub calls: BTreeMap<String, usize>,
    pub call_errors: usize,
    pub seconds: f64,
    /// Attempted and solved, by task kind.
    pub by_kind: BTreeMap<String, (usize, usize)>,
}

impl Totals {
    fn add(&mut self, j: &Judged) {
        self.attempted += 1;
        self.solved += usize::from(j.solved);
        self.compiled += usize::from(j.compiled);
        self.submitted += usize::from(j.outcome != crate::Outcome::BudgetExhausted.name());
        self.steps += j.steps;
        self.tokens += j.tokens;
        for (tool, n) in &j.calls {
            *self.calls.entry(tool.clone()).or_default() += n;
        }
        self.call_errors += j.call_errors;
        self.seconds += j.seconds;
        let kind = self.by_kind.entry(j.kind.clone()).or_default();
        kind.0 += 1;
        kind.1 += usize::from(j.solved);
    }

    pub fn rate(&self) -> f64 {
        self.solved as f64 / self.attempted.max(1) as f64
    }

    pub fn to_json(&self) -> Value {
        let calls: usize = self.calls.values().sum();
        json!({
            "attempted": self.attempted,
            "solved": self.solved,
            "success_rate": self.rate(),
            "compiled": self.compiled,
            "submitted": self.submitted,
            "steps": self.steps,
            "steps_per_task": self.steps as f64 / self.attempted.max(1) as f64,
            "tokens": self.tokens,
            "tool_calls": self.calls,
            "call_parse_failures": self.call_errors,
            "call_parse_failure_rate": self.call_errors as f64 / (calls + self.call_errors).max(1) as f64,
            "seconds": self.seconds,
            "by_kind": self.by_kind.iter().map(|(k, (a, s))| (k.clone(), json!({"attempted": a, "solved": s}))).collect::<serde_json::Map<_, _>>(),
        })
    }
}

/// The totals of each condition over `tasks`.
pub struct Summary {
    pub tasks: usize,
    pub conditions: BTreeMap<Condition, Totals>,
}

impl Summary {
    pub fn to_json(&self, settings: &Settings) -> Value {
        let conditions: serde_json::Map<String, Value> = self
            .conditions
            .iter()
            .map(|(c, t)| (c.name().to_string(), t.to_json()))
            .collect();
        json!({"tasks": self.tasks, "settings": settings, "conditions": conditions})
    }
}

/// An evaluation's output folder: `settings.json`, `results.jsonl`, `transcripts/`,
/// `summary.json`.
pub struct Run {
    out: PathBuf,
    settings: Settings,
    results: Journal,
    done: Vec<Judged>,
}

impl Run {
    /// Opens `out` for `settings`: a new folder, or one holding a run of the same
    /// settings, whose judged runs are kept ([`Journal`]).
    pub fn open(out: &Path, settings: Settings) -> Result<Run, AgentError> {
        std::fs::create_dir_all(out).map_err(|e| AgentError::io(out, e))?;
        let stored = out.join("settings.json");
        match std::fs::read_to_string(&stored) {
            Ok(text) => {
                let before: Settings = serde_json::from_str(&text).map_err(|e| {
                    AgentError::Input(format!(
                        "{}: {e}; remove the folder or choose another -o",
                        stored.display()
                    ))
                })?;
                if before != settings {
                    return Err(AgentError::Input(format!(
                        "{} holds a run with other settings ({}); choose another -o, or remove it to start again",
                        out.display(),
                        text.trim()
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let json = serde_json::to_string_pretty(&settings).unwrap_or_default();
                write_atomic(&stored, &json)?;
            }
            Err(e) => return Err(AgentError::io(&stored, e)),
        }
        let (results, done) = Journal::open::<Judged>(&out.join("results.jsonl"))?;
        Ok(Run {
            out: out.to_path_buf(),
            settings,
            results,
            done,
        })
    }

    /// Runs of `task` in `condition` already judged.
    pub fn judged(&self, task: &str, condition: Condition) -> bool {
        self.done
            .iter()
            .any(|j| j.id == task && j.condition == condition)
    }

    /// Records a judged run: its line appended to `results.jsonl`.
    pub fn record(&mut self, judged: Judged) -> Result<&Judged, AgentError> {
        self.results.append(std::slice::from_ref(&judged))?;
        self.done.push(judged);
        Ok(&self.done[self.done.len() - 1])
    }

    /// What a run of this evaluation needs besides its task and model.
    pub fn attempt(&self) -> Attempt {
        Attempt {
            out: self.out.clone(),
            budget: (self.settings.steps, self.settings.tokens),
        }
    }

    /// The totals over `tasks` of what is judged, written to `summary.json`.
    pub fn summary(&self, tasks: &[Task]) -> Result<Summary, AgentError> {
        let ids: BTreeSet<&str> = tasks.iter().map(|t| t.id.as_str()).collect();
        let mut conditions: BTreeMap<Condition, Totals> = self
            .settings
            .conditions
            .iter()
            .map(|&c| (c, Totals::default()))
            .collect();
        for j in self.done.iter().filter(|j| ids.contains(j.id.as_str())) {
            conditions.entry(j.condition).or_default().add(j);
        }
        let summary = Summary {
            tasks: tasks.len(),
            conditions,
        };
        let json =
            serde_json::to_string_pretty(&summary.to_json(&self.settings)).unwrap_or_default();
        write_atomic(&self.out.join("summary.json"), &json)?;
        Ok(summary)
    }
}

/// Runs tasks of an evaluation (any number at once: it holds no state of the run).
pub struct Attempt {
    out: PathBuf,
    /// Steps and tokens.
    budget: (usize, usize),
}

impl Attempt {
    /// Runs `task` in `condition` with `model` (its transcript in the run's folder) and
    /// judges the final program with `judge`.
    pub fn run(
        &self,
        task: &Task,
        condition: Condition,
        model: &mut dyn Model,
        judge: &Judge,
    ) -> Result<Judged, AgentError> {
        let check = task.check.as_ref().ok_or_else(|| {
            AgentError::Input(format!("task {} is not runnable (no check)", task.id))
        })?;
        let started = Instant::now();
        let scratch = tempfile::tempdir().map_err(|e| AgentError::io("a temporary folder", e))?;
        let dir = scratch.path().join("repo");
        crate::task_repo::write(check, &dir)?;
        let mut workspace = Workspace::new(&dir)?;
        if condition == Condition::NoIndex {
            workspace = workspace.without_index_tools();
        }
        let checker = Checker::new(workspace.root())?;
        let commands = Commands::for_repo(workspace.root(), None, None)?;
        let rel = format!(
            "transcripts/{}/{}.jsonl",
            condition.name(),
            file_name(&task.id)
        );
        let transcript = self.out.join(&rel);
        if let Some(parent) = transcript.parent() {
            std::fs::create_dir_all(parent).map_err(|e| AgentError::io(parent, e))?;
        }
        let mut agent = Agent {
            workspace,
            checker,
            commands,
            model,
            budget: Budget {
                steps: self.budget.0,
                tokens: self.budget.1,
            },
        };
        let report = agent.run(&crate::task_repo::statement(task, check), &transcript)?;
        // The agent may have emptied it: what is there is judged.
        let program = std::fs::read_to_string(dir.join("main.cpp")).unwrap_or_default();
        let verdict = cxxlm_tasks::bugs::score(judge, check, &program, false)
            .map_err(|e| AgentError::Input(format!("judging task {}: {e}", task.id)))?;
        Ok(Judged {
            id: task.id.clone(),
            kind: task.kind.clone(),
            condition,
            solved: verdict.passed,
            compiled: verdict.compiled,
            failure: verdict.failure,
            outcome: report.outcome.name().to_string(),
            steps: report.steps,
            tokens: report.tokens,
            calls: report.calls,
            call_errors: report.call_errors,
            seconds: started.elapsed().as_secs_f64(),
            transcript: rel,
        })
    }
}

/// A task id as a file name: its letters, digits, `.`, `-` and `_`, others as `_`, and
/// a hash of the whole id (FNV-1a: stable across builds; ids may differ only in the
/// characters replaced).
fn file_name(id: &str) -> String {
    let tail: String = id
        .chars()
        .rev()
        .take(80)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => c,
            _ => '_',
        })
        .collect();
    format!("{:016x}-{tail}", fnv1a(id))
}

fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_keep_ids_apart_and_stay_plain() {
        let a = file_name("gcc/testsuite/a b.cc#flip@15.0");
        let b = file_name("gcc/testsuite/a_b.cc#flip@15.0");
        assert_ne!(a, b);
        assert!(a.ends_with("gcc_testsuite_a_b.cc_flip_15.0"), "{a}");
        assert!(file_name(&"x/".repeat(100)).len() < 100);
    }
}
