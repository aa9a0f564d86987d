//! A runnable task of `cxxlm tasks` (a bug, or a function body to write) as a small
//! repository the agent works in: `main.cpp` as the task has it, the headers it carries,
//! `expected.txt` (the oracle's output), a Makefile whose test compares the program's
//! output with it under the task's flags (the sanitizers), and a compile_commands.json
//! for the edit guard.

use std::path::Path;

use cxxlm_tasks::task::{Check, Task};
use serde_json::json;

use crate::AgentError;

/// Writes the task's program as a repository in `dir`.
pub fn write(check: &Check, dir: &Path) -> Result<(), AgentError> {
    let put = |rel: &str, text: &str| -> Result<(), AgentError> {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| AgentError::io(parent, e))?;
        }
        std::fs::write(&path, text).map_err(|e| AgentError::io(&path, e))
    };
    for (rel, text) in &check.support {
        put(rel, text)?;
    }
    put("main.cpp", &check.buggy)?;
    put("expected.txt", &check.oracle.stdout)?;
    let flags = check.flags.join(" ");
    put(
        "Makefile",
        &format!(
            "build:\n\tg++ {flags} main.cpp -o prog\n\ntest: build\n\t./prog > out.txt; status=$$?; diff expected.txt out.txt && test $$status -eq {}\n",
            check.oracle.exit_code
        ),
    )?;
    let root = dir.canonicalize().map_err(|e| AgentError::io(dir, e))?;
    let mut arguments = vec!["g++".to_string()];
    arguments.extend(check.flags.iter().cloned());
    arguments.extend(["-c".to_string(), "main.cpp".to_string()]);
    let commands = json!([{"directory": root, "file": "main.cpp", "arguments": arguments}]);
    put("compile_commands.json", &commands.to_string())
}

/// What the user asks of the agent for `task`: for a bug, how the test fails and where;
/// for a function body, the task's own line (which function to write).
pub fn statement(task: &Task, check: &Check) -> String {
    if task.kind == cxxlm_tasks::bodies::KIND {
        let line = task.input.lines().next().unwrap_or_default();
        let what = line.trim_start_matches("// TASK:").trim();
        return format!(
            "{what}: its body in main.cpp is empty. `make test` checks the program's output."
        );
    }
    let f = &check.failure;
    let at = f
        .location
        .as_deref()
        .map_or(String::new(), |l| format!(" at {l}"));
    format!(
        "The test of main.cpp fails: {} ({}){at}. Find the bug and fix it.",
        f.kind, f.detector
    )
}
