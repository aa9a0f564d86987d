use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use cxxlm_eval::bench::{self, Report};
use cxxlm_eval::{Compiler, Limits, Sandbox};
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum EvalCommand {
    /// MultiPL-E MBPP-C++: build and run completions against the unit tests (sandboxed).
    Mbpp(BenchArgs),
    /// HumanEval-X C++ (task_id, prompt, declaration, canonical_solution, test).
    Humaneval(BenchArgs),
}

#[derive(Args)]
pub struct BenchArgs {
    /// The benchmark (JSON lines); MBPP defaults to the copy under evals/.
    #[arg(long)]
    problems: Option<PathBuf>,
    /// Completions made elsewhere: JSON lines with the problem's `name` (or `task_id`)
    /// and `completion`; several lines per problem for pass@k.
    #[arg(long, required_unless_present = "canonical")]
    completions: Option<PathBuf>,
    /// Run the benchmark's reference solutions, to check the harness itself.
    #[arg(long)]
    canonical: bool,
    /// pass@k for each of these k.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    k: Vec<usize>,
    /// Write the report (with every verdict) here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(cmd: EvalCommand) -> Result<()> {
    let (args, default) = match cmd {
        EvalCommand::Mbpp(a) => (a, Some("evals/multipl-e_mbpp-cpp-keep.jsonl")),
        EvalCommand::Humaneval(a) => (a, None),
    };
    let problems_path = args
        .problems
        .clone()
        .or_else(|| default.map(PathBuf::from))
        .context("--problems: the benchmark's JSON lines")?;
    let problems = bench::load(&problems_path)?;
    let completions = if args.canonical {
        let refs: Vec<(String, String)> = problems
            .iter()
            .filter_map(|p| p.canonical.clone().map(|c| (p.name.clone(), c)))
            .collect();
        if refs.is_empty() {
            bail!("{} has no reference solutions", problems_path.display());
        }
        refs
    } else {
        read_completions(args.completions.as_deref().expect("clap requires it"))?
    };
    let compiler = Compiler::plain(Sandbox::new(Limits::default())?);
    let report = bench::score(&compiler, &problems, &completions, &args.k)?;
    print_report(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn read_completions(path: &Path) -> Result<Vec<(String, String)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            let v: Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}", path.display(), i + 1))?;
            let name = v
                .get("name")
                .or_else(|| v.get("task_id"))
                .and_then(Value::as_str);
            let completion = v.get("completion").and_then(Value::as_str);
            match (name, completion) {
                (Some(n), Some(c)) => Ok((n.to_string(), c.to_string())),
                _ => bail!(
                    "{}:{}: needs `name` (or `task_id`) and `completion`",
                    path.display(),
                    i + 1
                ),
            }
        })
        .collect()
}

fn print_report(r: &Report) {
    println!(
        "{} problems, {} samples: {} compiled, {} passed",
        r.problems, r.samples, r.compiled, r.passed
    );
    for (k, v) in &r.pass_at_k {
        println!("{k}: {:.4}", v);
    }
    let mut failures: std::collections::BTreeMap<String, usize> = Default::default();
    for v in r.verdicts.iter().filter(|v| !v.passed) {
        let why = match (&v.category, v.ending) {
            (Some(c), _) => format!("compile: {c}"),
            (None, Some(e)) => format!("run: {e:?}"),
            (None, None) => "run: wrong answer".into(),
        };
        *failures.entry(why).or_default() += 1;
    }
    for (why, n) in failures {
        println!("  {n:>5}  {why}");
    }
}
