//! The `cxxlm` command line: its arguments ([`cli`]) and the commands that need no model:
//! data, tokenizer, pack, judging C++ ([`eval`]), the speedrun's driver, the launcher and
//! reports. Commands that run a model (`train`, `sample`, evaluations of a checkpoint)
//! are the `cxxlm-torch` binary's: `cxxlm` hands them over, so that everything else
//! starts without loading libtorch and its CUDA libraries.

pub mod cli;
pub mod data;
pub mod eval;
pub mod interrupt;
pub mod launch;
pub mod pack;
pub mod speedrun;
pub mod tasks;
pub mod tok;
