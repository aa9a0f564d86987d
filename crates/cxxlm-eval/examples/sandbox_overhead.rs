//! The sandbox's cost per run: a program that does nothing, run N times (default 200)
//! directly and in the sandbox, one after another; prints the wall and CPU time (this
//! process and its children, user and system) of both, and their ratios. CPU time is the
//! steadier figure on a busy machine.
//!
//!     cargo run --release -p cxxlm-eval --example sandbox_overhead -- 200

use cxxlm_eval::{Limits, Sandbox};
use std::process::Command;
use std::time::Instant;

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse().expect("the number of runs"))
        .unwrap_or(200);
    let scratch = tempfile::tempdir().expect("a temporary directory");
    let source = scratch.path().join("main.cpp");
    std::fs::write(&source, "int main() { return 0; }\n").expect("writing main.cpp");
    let prog = scratch.path().join("prog");
    let built = Command::new("g++")
        .arg("-o")
        .arg(&prog)
        .arg(&source)
        .status()
        .expect("g++ runs");
    assert!(built.success(), "g++ failed");
    let sandbox = Sandbox::new(Limits::default()).expect("bubblewrap works here");

    let (started, cpu) = (Instant::now(), cpu_seconds());
    for _ in 0..runs {
        let status = Command::new(&prog).status().expect("the program runs");
        assert!(status.success());
    }
    let direct = started.elapsed().as_secs_f64() / runs as f64;
    let direct_cpu = (cpu_seconds() - cpu) / runs as f64;

    let (started, cpu) = (Instant::now(), cpu_seconds());
    for _ in 0..runs {
        let outcome = sandbox
            .run(scratch.path(), &["/work/prog"], b"")
            .expect("the sandbox runs");
        assert!(outcome.success(), "{outcome:?}");
    }
    let sandboxed = started.elapsed().as_secs_f64() / runs as f64;
    let sandboxed_cpu = (cpu_seconds() - cpu) / runs as f64;
    println!(
        "{runs} runs of an empty program, per run: wall {:.2} ms directly, {:.2} ms sandboxed ({:.1}x); CPU {:.2} ms directly, {:.2} ms sandboxed ({:.1}x)",
        direct * 1e3,
        sandboxed * 1e3,
        sandboxed / direct,
        direct_cpu * 1e3,
        sandboxed_cpu * 1e3,
        sandboxed_cpu / direct_cpu
    );
}

/// User and system time of this process and its waited-for children.
fn cpu_seconds() -> f64 {
    [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN]
        .iter()
        .map(|&who| {
            // SAFETY: getrusage fills the struct it is given.
            let mut u: libc::rusage = unsafe { std::mem::zeroed() };
            unsafe { libc::getrusage(who, &mut u) };
            let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 * 1e-6;
            t(u.ru_utime) + t(u.ru_stime)
        })
        .sum()
}
