//! Latencies of the agent's tools on a repository: opening it (the index built, or
//! caught up with a stored one), a symbol search, a window of lines, a ranked index query
//! and the edit guard (`g++ -fsyntax-only` in the sandbox) against the same g++ run
//! directly.
//!
//! cargo run --release -p cxxlm-agent --example tool_latency -- REPO FILE LINE SYMBOL

use std::time::Instant;

use cxxlm_agent::guard::Guard;
use cxxlm_agent::Workspace;

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [repo, file, line, symbol] = args.as_slice() else {
        return Err("usage: tool_latency REPO FILE LINE SYMBOL".into());
    };
    let line: usize = line.parse()?;
    let t = Instant::now();
    let w = Workspace::new(repo.as_ref())?;
    println!("open (index): {:.0} ms", ms(t));
    let runs = 10;
    let time = |f: &dyn Fn() -> bool| -> Result<f64, Box<dyn std::error::Error>> {
        let mut v = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            if !f() {
                return Err("a tool failed".into());
            }
            v.push(ms(t));
        }
        Ok(median(v))
    };
    println!(
        "search symbol {symbol}: {:.2} ms",
        time(&|| w.search(None, Some(symbol)).ok)?
    );
    println!(
        "open {file}:{line}: {:.2} ms",
        time(&|| w.open(file, Some(line), None).ok)?
    );
    println!(
        "index {file}:{line}: {:.2} ms",
        time(&|| w.index(file, line).ok)?
    );
    let text = std::fs::read_to_string(w.root().join(file))?;
    let guard = Guard::new(w.root())?;
    let sandboxed = time(&|| guard.check(file, &text).is_ok())?;
    let path = w.root().join(file);
    let direct = time(&|| {
        std::process::Command::new("g++")
            .args(["-fsyntax-only", "-x", "c++"])
            .arg(&path)
            .output()
            .is_ok()
    })?;
    println!(
        "edit guard {file}: {sandboxed:.0} ms sandboxed, g++ -fsyntax-only directly {direct:.0} ms: {:.2}x",
        sandboxed / direct
    );
    Ok(())
}
