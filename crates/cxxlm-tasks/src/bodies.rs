//! Function-body tasks, made from verified bug tasks: the fixed program with the body of
//! the function the bug was in left empty, to be written again. An answer is the whole
//! function, spliced where the stub stands and judged by the bug task's oracle, so a task
//! is verified by construction: its own answer gives back the program that passed. A task
//! is kept only when its stub fails: many test functions pass with nothing in them, and an
//! empty answer must not earn a reward.

use cxxlm_data::journal::Journal;
use cxxlm_eval::functions::function_bodies;
use rayon::prelude::*;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use crate::bugs::score;
use crate::judge::Judge;
use crate::task::{Check, Task};
use crate::Result;

pub const KIND: &str = "function_body";

/// The function-body task of a runnable bug task (None for one without a check, or
/// whose function the lexer cannot find again in the fixed program).
pub fn body_task(bug: &Task) -> Option<Task> {
    let check = bug.check.as_ref()?;
    let fixed = &check.fixed;
    // The bug is inside the function: the texts before and after it are the same in both.
    let start = check.span.0;
    let end = fixed.len().checked_sub(check.buggy.len() - check.span.1)?;
    if start >= end || fixed.get(..start)? != &check.buggy[..start] {
        return None;
    }
    let body = function_bodies(fixed)
        .into_iter()
        .find(|b| start < b.open && b.close < end)?;
    let function = &fixed[start..end];
    let head = fixed[start..body.open - 1].trim();
    let stub = format!(
        "{}{{\n    // TODO: this function's body\n{}",
        &fixed[start..body.open - 1],
        &fixed[body.close..end]
    );
    let program = format!("{}{stub}{}", &fixed[..start], &fixed[end..]);
    let input = format!(
        "// TASK: Write the body of `{}` so that the program runs correctly\n{program}",
        head.lines().map(str::trim).collect::<Vec<_>>().join(" ")
    );
    Some(Task {
        id: format!("{}#{KIND}@{start}", source_of(&bug.id)),
        kind: KIND.into(),
        input,
        output: format!("{function}\n"),
        project: bug.project.clone(),
        split: bug.split.clone(),
        provenance: bug.provenance.clone(),
        check: Some(Check {
            buggy: program,
            span: (start, start + stub.len()),
            ..check.clone()
        }),
    })
}

/// The function-body tasks of `bugs`, one per function (bugs made in the same function
/// of the same program give one task).
pub fn body_tasks(bugs: &[Task]) -> Vec<Task> {
    let mut seen = BTreeSet::new();
    bugs.iter()
        .filter_map(body_task)
        .filter(|t| seen.insert(t.id.clone()))
        .collect()
}

/// The tasks whose stub, built and run in the sandbox, fails; and how many passed with
/// the body empty (left out). Verdicts are appended to `journal` (JSON lines of `id` and
/// `fails`) a chunk at a time, and those it already holds are not judged again: a killed
/// run goes on where it stopped (a line cut short by the kill is judged again).
pub fn failing_stubs(
    judge: &Judge,
    tasks: Vec<Task>,
    journal: &Path,
) -> Result<(Vec<Task>, usize)> {
    let (mut log, judged) = Journal::open::<Verdict>(journal)?;
    let mut known: HashMap<String, bool> = judged.into_iter().map(|v| (v.id, v.fails)).collect();
    let todo: Vec<&Task> = tasks
        .iter()
        .filter(|t| !known.contains_key(&t.id))
        .collect();
    for chunk in todo.chunks(JOURNAL_CHUNK) {
        let verdicts = chunk
            .par_iter()
            .map(|t| {
                let check = t.check.as_ref().expect("body tasks have a check");
                let fails = !score(judge, check, &check.buggy, false)?.passed;
                Ok(Verdict {
                    id: t.id.clone(),
                    fails,
                })
            })
            .collect::<Result<Vec<Verdict>>>()?;
        log.append(&verdicts)?;
        known.extend(verdicts.into_iter().map(|v| (v.id, v.fails)));
    }
    let all = tasks.len();
    let kept: Vec<Task> = tasks.into_iter().filter(|t| known[&t.id]).collect();
    let passing = all - kept.len();
    Ok((kept, passing))
}

/// Stubs judged between two writes of the journal.
const JOURNAL_CHUNK: usize = 64;

/// A line of the journal: whether the stub of task `id` fails.
#[derive(serde::Serialize, serde::Deserialize)]
struct Verdict {
    id: String,
    fails: bool,
}

/// A task id's source: the program it was made from (before the `#`).
fn source_of(id: &str) -> &str {
    id.split_once('#').map_or(id, |(source, _)| source)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::splice;

    const FIXED: &str = "#include <cassert>\n\nint twice(int x)\n{\n  int y = x;\n  return x + y;\n}\n\nint main()\n{\n  assert(twice(2) == 4);\n}\n";

    fn bug() -> Task {
        let buggy = FIXED.replace("return x + y;", "return x - y;");
        let start = FIXED.find("int twice").unwrap();
        let end = buggy.find("}\n\nint main").unwrap() + 1;
        let mut check: Check = serde_json::from_value(serde_json::json!({
            "flags": [], "support": {}, "fixed": FIXED, "buggy": buggy, "span": [start, end],
            "oracle": {"stdout": "", "exit_code": 0},
            "failure": {"kind":"assertion","detector":"assert","signal":null,"location":null,"line":null,"function":null,"message":"","values":[],"stack":[],"exit_code":null,"expected":null,"printed":null},
            "verified_by": "standalone"
        }))
        .unwrap();
        check.span = (start, end);
        serde_json::from_value(serde_json::json!({
            "id": "pkg/twice.cc#flip_sign@6.0", "kind": "injected_bug", "input": "", "output": "",
            "project": "pkg", "split": "test",
            "provenance": {"source": "pkg.tar.xz", "path": "twice.cc", "change": "+ to -"},
            "check": check,
        }))
        .unwrap()
    }

    #[test]
    fn the_task_hides_the_body_and_its_answer_gives_back_the_fixed_program() {
        let t = body_task(&bug()).unwrap();
        assert_eq!(t.kind, KIND);
        assert_eq!((t.split.as_str(), t.project.as_str()), ("test", "pkg"));
        assert!(t
            .input
            .starts_with("// TASK: Write the body of `int twice(int x)`"));
        assert!(!t.input.contains("return x + y;") && !t.input.contains("return x - y;"));
        assert!(t.input.contains("int main()\n{\n  assert(twice(2) == 4);"));
        let check = t.check.as_ref().unwrap();
        assert_eq!(splice(check, &t.output), FIXED);
        assert!(check.buggy.contains("int twice(int x)\n{\n    // TODO"));
        // Two bugs in one function give one task.
        let mut other = bug();
        other.id = "pkg/twice.cc#off_by_one@5.0".into();
        assert_eq!(body_tasks(&[bug(), other]).len(), 1);
    }

    #[test]
    fn stubs_are_judged_in_the_sandbox_and_a_journal_resumes_the_judging() {
        let judge = Judge::new().unwrap();
        let task = body_task(&bug()).unwrap();
        // A stub that does nothing fails the assertion: the task is kept.
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("bodies.jsonl.judged");
        let (kept, passing) = failing_stubs(&judge, vec![task.clone()], &journal).unwrap();
        assert_eq!((kept.len(), passing), (1, 0));
        let written = std::fs::read_to_string(&journal).unwrap();
        assert_eq!(written.lines().count(), 1, "{written}");
        // A verdict in the journal is not judged again (this one says the stub passes,
        // which the sandbox would not), and a line cut short by a kill is left aside.
        let resumed = dir.path().join("resumed.judged");
        let line = serde_json::json!({"id": task.id, "fails": false}).to_string();
        std::fs::write(&resumed, format!("{line}\n{{\"id\": \"other\", \"fa")).unwrap();
        let mut other = task.clone();
        other.id = "other".into();
        let (kept, passing) = failing_stubs(&judge, vec![task, other], &resumed).unwrap();
        assert_eq!((kept.len(), passing), (1, 1));
        assert_eq!(kept[0].id, "other");
        // The verdict judged now is on a line of its own.
        let (_, verdicts) = Journal::open::<Verdict>(&resumed).unwrap();
        assert_eq!(verdicts.len(), 2);
    }
}
