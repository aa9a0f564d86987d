//! `cxxlm agent`: a model works on a task in a C++ repository with tools, until it
//! submits or its budget runs out (`cxxlm-agent`). The model is an OpenAI-compatible
//! endpoint (here) or a checkpoint run in process (`cxxlm-torch`).

use anyhow::{Context, Result};
use clap::{ArgGroup, Args};
use cxxlm_agent::{Agent, Budget, Checker, Commands, Endpoint, Model, Outcome, Workspace};
use std::path::PathBuf;

#[derive(Args)]
#[command(group(ArgGroup::new("the_model").required(true).args(["checkpoint", "endpoint"])))]
pub struct AgentArgs {
    /// The repository to work in.
    #[arg(long)]
    pub repo: PathBuf,
    /// What to do, as the user would say it.
    #[arg(long)]
    pub task: String,
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
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
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

/// Runs the loop with `model`, prints the outcome's line and exits with its status
/// (0 solved, 2 not solved, 3 budget exhausted).
pub fn run(args: AgentArgs, model: &mut dyn Model) -> Result<()> {
    let workspace = Workspace::new(&args.repo)?;
    let checker = Checker::new(workspace.root()).context("starting the sandbox")?;
    let commands = Commands::for_repo(workspace.root(), args.build, args.test)?;
    let mut agent = Agent {
        workspace,
        checker,
        commands,
        model,
        budget: Budget {
            steps: args.steps,
            tokens: args.tokens,
        },
    };
    let report = agent.run(&args.task, &args.transcript)?;
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

/// `cxxlm agent --endpoint URL`.
pub fn run_endpoint(args: AgentArgs) -> Result<()> {
    let url = args
        .endpoint
        .clone()
        .context("--endpoint or --checkpoint")?;
    let mut model = Endpoint::new(
        &url,
        &args.model,
        args.api_key.clone(),
        args.max_tokens,
        args.temperature,
    )
    .map_err(anyhow::Error::msg)?;
    run(args, &mut model)
}
