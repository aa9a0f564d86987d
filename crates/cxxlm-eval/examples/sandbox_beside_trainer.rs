//! What sandboxed runs cost a busy thread of a large process, as RL's judges cost the
//! trainer that samples beside them: this process fills GIB gibibytes (default 8), then
//! times one thread writing 64 MB 300 times, alone and again while WORKERS threads
//! (default 2) start sandboxed runs of a program that does nothing, back to back; prints
//! both times, their ratio and the runs started.
//!
//!     cargo run --release -p cxxlm-eval --example sandbox_beside_trainer -- 8 2

use cxxlm_eval::{Limits, Sandbox};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut arg = |default: usize| {
        args.next()
            .map_or(default, |n| n.parse().expect("a whole number"))
    };
    let (gib, workers) = (arg(8), arg(2));
    let held = vec![1u8; gib << 30];
    let sandbox = Sandbox::new(Limits::default()).expect("bubblewrap works here");
    let scratch = tempfile::tempdir().expect("a temporary directory");
    let busy = || {
        let mut buffer = vec![1u8; 64 << 20];
        let started = Instant::now();
        for i in 0..300 {
            buffer.fill(i as u8);
            std::hint::black_box(&buffer);
        }
        started.elapsed().as_secs_f64()
    };
    let alone = busy();
    let (done, runs) = (AtomicBool::new(false), AtomicUsize::new(0));
    let beside = std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    let out = sandbox
                        .run(scratch.path(), &["/usr/bin/true"], b"")
                        .expect("a sandboxed run");
                    assert!(out.success(), "{out:?}");
                    runs.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let seconds = busy();
        done.store(true, Ordering::Relaxed);
        seconds
    });
    std::hint::black_box(&held);
    println!(
        "RESULT held={gib}GiB workers={workers} busy_alone={alone:.3}s busy_beside_runs={beside:.3}s ratio={:.2} runs={}",
        beside / alone,
        runs.load(Ordering::Relaxed)
    );
}
