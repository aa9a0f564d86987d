//! `cxxlm agent`: a model works on a task in a C++ repository with tools, until it
//! submits or its budget runs out (`cxxlm-agent`); `cxxlm agent eval` measures how often
//! it solves runnable tasks of `cxxlm tasks`, with the index and without. The model is
//! an OpenAI-compatible endpoint (here) or a checkpoint run in process (`cxxlm-torch`).

use anyhow::{bail, Context, Result};
use clap::{ArgGroup, Args, Subcommand};
use cxxlm_agent::eval::{Condition, Run, Settings};
use cxxlm_agent::{Agent, Budget, Checker, Commands, Endpoint, Model, Outcome, Workspace};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct AgentArgs {
    #[command(subcommand)]
    pub command: Option<AgentCommand>,
    /// The repository to work in.
    #[arg(long, required = true)]
    pub repo: Option<PathBuf>,
    /// What to do, as the user would say it.
    #[arg(long, required = true)]
    pub task: Option<String>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// The build command, run in the sandbox (default: `make` where there is a Makefile).
    #[arg(long)]
    pub build: Option<String>,
    /// The test command, run in the sandbox (default: `make test`).
    #[arg(long)]
    pub test: Option<String>,
    /// One JSON line per step (default: agent-transcript.jsonl here).
    #[arg(long, default_value = "agent-transcript.jsonl")]
    pub transcript: PathBuf,
}

#[derive(Subcommand)]
pub enum AgentCommand {
    /// The agent's success on runnable tasks of `tasks bugs` and `tasks bodies`: each
    /// task a small repository, the loop within its budget, the final program judged by
    /// the task's own verifier; with the index's tools and without them. Resumes.
    Eval(Box<AgentEvalArgs>),
}

#[derive(Args)]
pub struct AgentEvalArgs {
    /// Outputs of `tasks bugs` or `tasks bodies` (directories or JSON lines).
    #[arg(long, required = true, num_args = 1..)]
    pub tasks: Vec<PathBuf>,
    /// The split to evaluate on (by project; training never saw its projects).
    #[arg(long, default_value = "test")]
    pub split: String,
    /// At most this many tasks, spread evenly over the split.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Only without the index's tools (default: each task with them and without).
    #[arg(long, conflicts_with = "index_only")]
    pub no_index: bool,
    /// Only with the index's tools.
    #[arg(long)]
    pub index_only: bool,
    /// The output folder: settings.json, results.jsonl, transcripts/, summary.json. A
    /// run of the same settings there goes on where it stopped.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Tasks worked on at once (each its own conversation with the model: `--checkpoint`
    /// decodes them together, an endpoint gets as many requests at once).
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// The model behind the loop, and its budget.
#[derive(Args)]
#[command(group(ArgGroup::new("the_model").required(true).args(["checkpoint", "endpoint"])))]
pub struct ModelArgs {
    /// Our own model, in process: a checkpoint directory or a run directory (its newest).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// The tokenizer the checkpoint was trained with (default: its run's).
    #[arg(long, requires = "checkpoint")]
    pub tokenizer: Option<PathBuf>,
    /// An OpenAI-compatible API, up to and including `/v1` (`cxxlm serve`'s is
    /// http://127.0.0.1:8012/v1).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// The model's name at the endpoint.
    #[arg(long, default_value = "cxxlm", requires = "endpoint")]
    pub model: String,
    /// Sent as `Authorization: Bearer ...` to the endpoint.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Model turns at most.
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Tokens at most over all turns, prompts and replies.
    #[arg(long, default_value_t = 200_000)]
    pub tokens: usize,
    /// Tokens of one reply at most.
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0.0, value_parser = crate::cli::temperature)]
    pub temperature: f64,
}

impl AgentArgs {
    /// The model options of the command given.
    pub fn model(&self) -> &ModelArgs {
        match &self.command {
            Some(AgentCommand::Eval(e)) => &e.model,
            None => &self.model,
        }
    }

    /// Conversations with the model at once.
    pub fn conversations(&self) -> usize {
        match &self.command {
            Some(AgentCommand::Eval(e)) => e.jobs.max(1),
            None => 1,
        }
    }
}

/// A model for each conversation held at once.
pub type Models = Vec<Box<dyn Model + Send>>;

impl ModelArgs {
    /// The model and its sampling, as a run's settings record it (an endpoint by the
    /// model's name: a server may move to another port between a run and its resumption).
    fn describe(&self) -> String {
        let sampling = format!(
            "max_tokens {}, temperature {}",
            self.max_tokens, self.temperature
        );
        match (&self.checkpoint, &self.endpoint) {
            (Some(c), _) => format!("checkpoint {}; {sampling}", c.display()),
            (None, Some(_)) => format!("{} (endpoint); {sampling}", self.model),
            (None, None) => sampling,
        }
    }
}

/// Runs the command with `models` (as many as [`AgentArgs::conversations`]).
pub fn run(args: AgentArgs, mut models: Models) -> Result<()> {
    match args.command {
        Some(AgentCommand::Eval(e)) => eval(*e, models),
        None => {
            let model = models.first_mut().context("a model")?;
            run_one(args, model.as_mut())
        }
    }
}

/// Runs the loop with `model`, prints the outcome's line and exits with its status
/// (0 solved, 2 not solved, 3 budget exhausted).
fn run_one(args: AgentArgs, model: &mut dyn Model) -> Result<()> {
    let (Some(repo), Some(task)) = (&args.repo, &args.task) else {
        bail!("--repo and --task");
    };
    let workspace = Workspace::new(repo)?;
    let checker = Checker::new(workspace.root()).context("starting the sandbox")?;
    let commands = Commands::for_repo(workspace.root(), args.build, args.test)?;
    let mut agent = Agent {
        workspace,
        checker,
        commands,
        model,
        budget: Budget {
            steps: args.model.steps,
            tokens: args.model.tokens,
        },
    };
    let report = agent.run(task, &args.transcript)?;
    outln!(
        "{} after {} steps, {} tokens (transcript: {})",
        report.outcome.name(),
        report.steps,
        report.tokens,
        args.transcript.display()
    )?;
    std::process::exit(match report.outcome {
        Outcome::Solved => 0,
        Outcome::NotSolved => 2,
        Outcome::BudgetExhausted => 3,
    })
}

/// `cxxlm agent eval`: every selected task in every condition, one per model at a time;
/// prints a line per judged run and the success rate of each condition.
fn eval(args: AgentEvalArgs, mut models: Models) -> Result<()> {
    let all = cxxlm_tasks::bugs::read_tasks(&args.tasks)?;
    let tasks = cxxlm_tasks::bugs::runnable(all, &args.split, args.limit);
    if tasks.is_empty() {
        bail!(
            "no runnable tasks of split {:?} in {}",
            args.split,
            args.tasks
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let conditions = match (args.no_index, args.index_only) {
        (true, _) => vec![Condition::NoIndex],
        (_, true) => vec![Condition::Index],
        _ => vec![Condition::Index, Condition::NoIndex],
    };
    let settings = Settings {
        model: args.model.describe(),
        steps: args.model.steps,
        tokens: args.model.tokens,
        conditions: conditions.clone(),
    };
    let run = Run::open(&args.out, settings.clone())?;
    let judge = cxxlm_tasks::judge::Judge::new().context("starting the sandbox")?;
    crate::interrupt::install();
    let todo: Vec<(&cxxlm_tasks::task::Task, Condition)> = tasks
        .iter()
        .flat_map(|t| conditions.iter().map(move |&c| (t, c)))
        .filter(|(t, c)| !run.judged(&t.id, *c))
        .collect();
    let skipped = tasks.len() * conditions.len() - todo.len();
    let attempt = run.attempt();
    let run = Mutex::new(run);
    let (next, finished) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let failed: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for model in models.iter_mut() {
            let (run, next, finished, failed, todo, attempt, judge) =
                (&run, &next, &finished, &failed, &todo, &attempt, &judge);
            scope.spawn(move || loop {
                let stop = crate::interrupt::requested() || lock(failed).is_some();
                let i = next.fetch_add(1, Ordering::SeqCst);
                if stop || i >= todo.len() {
                    break;
                }
                let (task, condition) = todo[i];
                let result = attempt
                    .run(task, condition, model.as_mut(), judge)
                    .map_err(anyhow::Error::from)
                    .and_then(|j| {
                        let mut run = lock(run);
                        let j = run.record(j)?;
                        eprintln!(
                            "[{}/{}] {} ({}): {}, {} steps, {:.1} s",
                            finished.fetch_add(1, Ordering::SeqCst) + 1,
                            todo.len(),
                            j.id,
                            condition.name(),
                            if j.solved {
                                "solved"
                            } else if j.compiled {
                                "not solved"
                            } else {
                                "not solved (does not compile)"
                            },
                            j.steps,
                            j.seconds
                        );
                        Ok(())
                    });
                if let Err(e) = result {
                    lock(failed).get_or_insert(e);
                    break;
                }
            });
        }
    });
    let run = run
        .into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        run.summary(&tasks)?;
        return Err(e.context("rerun the same command to go on from the runs judged so far"));
    }
    if crate::interrupt::requested() {
        run.summary(&tasks)?;
        bail!("interrupted; rerun the same command to resume");
    }
    if skipped > 0 {
        eprintln!("{skipped} runs judged before were kept");
    }
    let summary = run.summary(&tasks)?;
    for (condition, t) in &summary.conditions {
        let calls: usize = t.calls.values().sum();
        outln!(
            "{}: {}/{} solved ({:.1}%), {} compiled, {} submitted; {:.1} steps a task, {} tool calls, {} unreadable",
            condition.describe(),
            t.solved,
            t.attempted,
            100.0 * t.rate(),
            t.compiled,
            t.submitted,
            t.steps as f64 / t.attempted.max(1) as f64,
            calls,
            t.call_errors
        )?;
    }
    outln!("{}", args.out.join("summary.json").display())?;
    Ok(())
}

/// `cxxlm agent [eval] --endpoint URL`.
pub fn run_endpoint(args: AgentArgs) -> Result<()> {
    let m = args.model();
    let url = m.endpoint.clone().context("--endpoint or --checkpoint")?;
    let models = (0..args.conversations())
        .map(|_| {
            Endpoint::new(
                &url,
                &m.model,
                m.api_key.clone(),
                m.max_tokens,
                m.temperature,
            )
            .map(|e| Box::new(e) as Box<dyn Model + Send>)
            .map_err(anyhow::Error::msg)
        })
        .collect::<Result<Models>>()?;
    run(args, models)
}

/// The value behind `m`, even when a thread panicked holding it.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
