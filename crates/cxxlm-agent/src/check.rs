//! Building and testing in the sandbox: the repository (mounted read-only) is copied into
//! the run's own memory-backed `/work`, the command runs there, and what it printed is
//! summarized: compiler errors and warnings, sanitizer reports with the frames that lie in
//! the repository, failed assertions, bounded in length.

use std::path::Path;
use std::time::Duration;

use cxxlm_eval::sandbox::{Ending, Limits, Sandbox};

use crate::AgentError;

/// Where the repository is mounted, and where its copy is built.
const REPO: &str = "/repo";
const COPY: &str = "/tmp/repo";
/// Characters of a summary at most.
pub const SUMMARY_CHARS: usize = 2000;

pub struct Checker {
    sandbox: Sandbox,
}

/// What a command did.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub passed: bool,
    pub summary: String,
}

impl Checker {
    pub fn new(root: &Path) -> Result<Checker, AgentError> {
        // The sanitizers reserve terabytes of address space: memory is bounded by the
        // run's wall and CPU time and its tmpfs instead of RLIMIT_AS.
        let sandbox = Sandbox::new(Limits {
            cpu_seconds: 120,
            wall: Duration::from_secs(180),
            memory_bytes: u64::MAX,
            processes: 64,
            tmp_bytes: 1 << 30,
            output_bytes: 1 << 20,
            ..Limits::default()
        })?
        .with_read_only(root, REPO);
        Ok(Checker { sandbox })
    }

    /// Runs the shell command `command` in a fresh copy of the repository.
    pub fn run(&self, command: &str) -> Result<Checked, AgentError> {
        let scratch = tempfile::tempdir().map_err(|e| AgentError::io("a scratch folder", e))?;
        // LeakSanitizer needs ptrace, which the sandbox denies.
        let script = format!(
            "export ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1; cp -R {REPO} {COPY} && cd {COPY} && {command}"
        );
        let out = self
            .sandbox
            .run(scratch.path(), &["/bin/sh", "-c", &script], b"")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let status = match (out.ending, out.code, out.signal) {
            (Ending::Exited, Some(0), _) => "passed".to_string(),
            (Ending::Exited, Some(code), _) => format!("failed (exit status {code})"),
            (_, _, Some(signal)) => format!("failed (signal {signal}, {:?})", out.ending),
            (ending, _, _) => format!("failed ({ending:?})"),
        };
        Ok(Checked {
            passed: out.success(),
            summary: format!("`{command}` {status}\n{}", summarize(&text)),
        })
    }
}

/// The lines that say what went wrong, paths relative to the repository, at most
/// [`SUMMARY_CHARS`]; the output's last lines when none stands out.
pub fn summarize(output: &str) -> String {
    let output = output
        .replace(&format!("{COPY}/"), "")
        .replace("/work/.tmp/repo/", "");
    let lines: Vec<&str> = output.lines().collect();
    let telling = |l: &str| {
        let frame = l.trim_start().starts_with('#') && l.contains(" in ");
        // Frames of the repository's code: not the runtime's or the library's.
        let own_frame = frame
            && l.contains(':')
            && !["/usr/", "libc", "libsanitizer"]
                .iter()
                .any(|lib| l.contains(lib));
        own_frame
            || l.contains("error:")
            || l.contains("warning:")
            || l.contains("runtime error")
            || l.contains("Sanitizer")
            || l.contains("SUMMARY:")
            || l.contains("Assertion")
            || l.contains("FAIL")
            || l.contains("undefined reference")
    };
    let mut picked: Vec<&str> = lines.iter().copied().filter(|l| telling(l)).collect();
    if picked.is_empty() {
        picked = lines[lines.len().saturating_sub(15)..].to_vec();
    }
    let mut out = String::new();
    for (i, l) in picked.iter().enumerate() {
        if out.len() + l.len() + 1 > SUMMARY_CHARS {
            out.push_str(&format!("... {} more lines\n", picked.len() - i));
            break;
        }
        out.push_str(l);
        out.push('\n');
    }
    out
}
