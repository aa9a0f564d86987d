//! The `cxxlm` command line: its arguments ([`cli`]) and the commands that need no model:
//! data, tokenizer, pack, judging C++ ([`eval`]), the speedrun's driver, the launcher and
//! reports. Commands that run a model (`train`, `sample`, evaluations of a checkpoint)
//! are the `cxxlm-torch` binary's: `cxxlm` hands them over, so that everything else
//! starts without loading libtorch and its CUDA libraries.

/// `println!` that returns an error ([`cli::Stdout`]) where `println!` panics: when
/// standard output was closed early (`cxxlm pack inspect | head`).
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*).map_err($crate::cli::Stdout)
    }};
}

/// `print!` as [`outln!`] is `println!`.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout(), $($arg)*).map_err($crate::cli::Stdout)
    }};
}

pub mod agent;
pub mod cli;
pub mod data;
pub mod eval;
pub mod index;
pub mod interrupt;
pub mod launch;
pub mod lock;
pub mod pack;
pub mod speedrun;
pub mod tasks;
pub mod tok;
