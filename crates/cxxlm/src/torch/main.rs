//! `cxxlm-torch`: the commands of `cxxlm` that run a model (on libtorch), and all the
//! others too. `cxxlm` hands model commands to it.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod agent;
mod embed;
mod export;
mod fit;
mod kernels;
mod model;
mod sample;
mod serve;
mod train;

use clap::Parser;
use cxxlm::cli::{self, Cli, Command};

fn main() {
    cli::tune_allocator();
    cli::init_logging();
    let cli = Cli::parse();
    cli::exit_on_error(match cli.command {
        Command::Train(cmd) => train::run(cmd),
        Command::Sample(args) => sample::run(args),
        Command::Eval(cmd) => model::run(cmd),
        Command::Serve(args) => serve::run(args),
        Command::Export(cxxlm::cli::ExportCommand::Hf(args)) => export::hf(args),
        Command::Agent(args) if args.model().checkpoint.is_some() => agent::run(args),
        Command::Index(cmd) if cmd.needs_model() => embed::run(cmd),
        other => cli::run(other),
    });
}
