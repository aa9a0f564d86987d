//! `cxxlm-torch`: the commands of `cxxlm` that run a model (on libtorch), and all the
//! others too. `cxxlm` hands model commands to it.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod kernels;
mod model;
mod sample;
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
        other => cli::run(other),
    });
}
