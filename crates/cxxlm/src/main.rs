//! `cxxlm`: train C++-specialist code language models end to end.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, Result};
use clap::Parser;
use cxxlm::cli::{self, Cli};
use std::os::unix::process::CommandExt;

/// Runs this command line as `cxxlm-torch` (the binary beside this one), in this process.
fn hand_to_torch() -> Result<()> {
    let exe = std::env::current_exe().context("locating the cxxlm binary")?;
    let torch = exe.with_file_name("cxxlm-torch");
    let error = std::process::Command::new(&torch)
        .args(std::env::args_os().skip(1))
        .exec();
    Err(error).with_context(|| {
        format!(
            "this command runs a model, which is {}'s job (build it with `cargo build --release -p cxxlm`, which builds both)",
            torch.display()
        )
    })
}

fn main() {
    cli::tune_allocator();
    cli::init_logging();
    let cli = Cli::parse();
    cli::exit_on_error(if cli.command.needs_torch() {
        hand_to_torch()
    } else {
        cli::run(cli.command)
    });
}
