//! `cxxlm`: train C++-specialist code language models end to end.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod data;
mod eval;
mod interrupt;
mod launch;
mod pack;
mod sample;
mod speedrun;
mod tok;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cxxlm",
    version,
    about = "Train C++-specialist code language models end to end"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Collect and clean C++ sources into jsonl.zst shards.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Train and evaluate the C++ tokenizer.
    #[command(subcommand)]
    Tok(tok::TokCommand),
    /// Tokenize shards with fill-in-the-middle into Megatron .bin/.idx files.
    Pack(pack::PackArgs),
    /// Train the GPT.
    #[command(subcommand)]
    Train(train::TrainCommand),
    /// Continue a prompt, or fill in the middle, with a trained checkpoint.
    Sample(sample::SampleArgs),
    /// Judge C++ in a sandbox: coding benchmarks with unit tests, bits per byte, FIM.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Every stage from raw C++ sources to an evaluated model and its report card.
    Speedrun(speedrun::SpeedrunArgs),
    /// Run a command (`train pretrain`) as N data-parallel ranks on this host, one per GPU.
    Launch(launch::LaunchArgs),
    /// Write the report card (report.md, report.html, plots/) of a run directory again.
    Report {
        /// A speedrun's directory.
        dir: std::path::PathBuf,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CXXLM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Data(cmd) => data::run(cmd),
        Command::Tok(cmd) => tok::run(cmd),
        Command::Pack(args) => pack::run(args),
        Command::Train(cmd) => train::run(cmd),
        Command::Eval(cmd) => eval::run(cmd),
        Command::Sample(args) => sample::run(args),
        Command::Speedrun(args) => speedrun::run(args),
        Command::Launch(args) => launch::run(args),
        Command::Report { dir } => cxxlm_report::write(&cxxlm_report::Layout::new(dir))
            .map(|w| {
                for e in &w.plot_errors {
                    eprintln!("warning: {e}");
                }
                println!("{}\n{}", w.markdown.display(), w.html.display());
            })
            .map_err(Into::into),
    };
    if let Err(e) = result {
        match std::env::var("RANK") {
            Ok(rank) if std::env::var_os("WORLD_SIZE").is_some() => {
                eprintln!("error (rank {rank}): {e:#}")
            }
            _ => eprintln!("error: {e:#}"),
        }
        std::process::exit(1);
    }
}
