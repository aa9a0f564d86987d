//! A task as written to disk: the seeds' `{"input","output"}` SFT pair, with where it
//! came from, how it is checked, and its split.

use cxxlm_eval::functions::{code_only, function_bodies};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::mutate::{Operator, Site};
use crate::report::{Failure, Oracle};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    /// `injected_bug` or `commit_fix`.
    pub kind: String,
    /// Task line, debug state and the buggy code.
    pub input: String,
    /// `/* REASONING: ... */` and the fixed function.
    pub output: String,
    pub project: String,
    pub split: String,
    pub provenance: Provenance,
    /// How to check an answer: absent for fixes mined from history (not runnable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<Check>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// The archive, directory or repository read.
    pub source: String,
    /// The file inside it.
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<Operator>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// What the mutation changed, or the commit's subject.
    pub change: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// g++ flags of both builds.
    pub flags: Vec<String>,
    /// Headers placed beside `main.cpp`.
    pub support: BTreeMap<String, String>,
    /// The original `main.cpp` (the fix), and the mutant (the bug).
    pub fixed: String,
    pub buggy: String,
    /// The byte span of the function an answer replaces in `buggy`.
    pub span: (usize, usize),
    pub oracle: Oracle,
    /// What the buggy program's run showed.
    pub failure: Failure,
    /// How the mutant's behaviour was established: `schema` (one build holding every
    /// mutant of the program behind a switch) or `standalone`.
    pub verified_by: String,
}

/// The span (head through closing brace) of the function whose body holds `pos`.
pub fn function_span(text: &str, pos: usize) -> Option<(usize, usize)> {
    let body = function_bodies(text)
        .into_iter()
        .find(|b| b.open <= pos && pos <= b.close)?;
    let code = code_only(text);
    let open = body.open - 1;
    let mut start = open;
    while start > 0 && !b";{}".contains(&code[start - 1]) {
        start -= 1;
    }
    while start < open && code[start].is_ascii_whitespace() {
        start += 1;
    }
    // Whole lines: from the start of the head's line.
    let line_start = text[..start].rfind('\n').map_or(0, |p| p + 1);
    if text[line_start..start].trim().is_empty() {
        start = line_start;
    }
    Some((start, body.close + 1))
}

fn line_text(text: &str, line: usize) -> &str {
    text.lines()
        .nth(line.saturating_sub(1))
        .unwrap_or("")
        .trim()
}

/// Why the operator's change breaks the program, as a developer would put it.
fn why(op: Operator) -> &'static str {
    match op {
        Operator::OffByOne => "The bound is off by one: the comparison lets the loop or check go one step too far, or stop one short.",
        Operator::OffByOneIndex => "The index is one past the element meant.",
        Operator::FlipComparison => "The comparison is inverted.",
        Operator::FlipLogical => "The conditions are joined with the wrong logical operator.",
        Operator::RemoveNullCheck => "Nothing guards against a null pointer here any more.",
        Operator::RemoveBoundsCheck => "The guard that keeps this code within its bounds is missing.",
        Operator::UseAfterFree => "The memory is freed while it is still used.",
        Operator::DoubleFree => "The same memory is freed twice.",
        Operator::UninitializedVariable => "A variable is read before it is given a value.",
        Operator::SignedOverflow => "The arithmetic is done in a type too narrow for its values.",
        Operator::SwapArguments => "The arguments are passed in the wrong order.",
        Operator::MissingReturn => "A value that should be returned is not.",
        Operator::MissingBreak => "The case falls through into the next one.",
        Operator::DeleteStatement => "A statement the code needs is missing.",
    }
}

/// The fix, in the words of the mutation undone.
fn fix(site: &Site) -> String {
    let undo = site
        .change
        .replace("became", "must be restored from")
        .replace(" was ", " must not be ");
    match site.operator {
        Operator::UseAfterFree => format!(
            "Free it only after its last use ({}).",
            site.change.replace(" was moved", " must stay")
        ),
        _ => format!("Undo it: {undo}."),
    }
}

/// The seeds' SFT pair for a verified mutant.
pub fn injected_bug_text(
    site: &Site,
    failure: &Failure,
    buggy: &str,
    fixed_function: &str,
) -> (String, String) {
    let input = format!(
        "{}\n{}{}",
        failure.task_line(),
        failure.debug_state(),
        buggy
    );
    let reasoning = format!(
        "/* REASONING:\n   {}\n   Line {}: `{}`.\n   {}\n   {}\n*/\n",
        failure.summary(),
        site.line,
        line_text(buggy, site.line),
        why(site.operator),
        fix(site)
    );
    (input, format!("{reasoning}{fixed_function}\n"))
}

/// The code of an answer: what follows the reasoning block, if there is one.
pub fn answer_code(answer: &str) -> &str {
    let code = match answer.find("/* REASONING:") {
        Some(p) => answer[p..]
            .find("*/")
            .map_or(answer, |e| &answer[p + e + 2..]),
        None => answer,
    };
    code.trim_matches('\n')
}

/// Whether an answer that was not complete can be once `last` (the newest token's bytes)
/// is added: only a token that closes a brace or a comment can complete it.
fn may_complete(last: &[u8]) -> bool {
    last.iter().any(|&c| c == b'}' || c == b'/')
}

/// Whether sampling a bug-fix answer ends at `ids`, its tokens so far: at `stop`, or once
/// the answer is complete. The whole answer is decoded and scanned only after a token
/// that can complete it, not at every token of every row.
pub fn answer_ends(ids: &[u32], stop: u32, decode: impl Fn(&[u32]) -> Vec<u8>) -> bool {
    match ids.last() {
        None => false,
        Some(&last) if last == stop => true,
        Some(&last) => {
            may_complete(&decode(&[last]))
                && answer_complete(&String::from_utf8_lossy(&decode(ids)))
        }
    }
}

/// Where the body of the function `code` writes ends: the index of the brace that closes
/// the first one opened (braces in comments and literals do not count).
fn function_end(code: &str) -> Option<usize> {
    let mut depth = 0i64;
    let mut opened = false;
    for (i, &c) in code_only(code).iter().enumerate() {
        match c {
            b'{' => {
                depth += 1;
                opened = true;
            }
            b'}' => {
                depth -= 1;
                if opened && depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Whether a bug-fix answer is complete: past its reasoning, the function's braces
/// opened and closed again.
pub fn answer_complete(text: &str) -> bool {
    let code = answer_code(text);
    if text.contains("/* REASONING:") && !text.contains("*/") {
        return false;
    }
    function_end(code).is_some()
}

/// The answer up to the end of the function it writes.
pub fn cut_answer(text: &str) -> String {
    let start = text.len() - answer_code(text).len();
    let start = text[..start].rfind("*/").map_or(0, |p| p + 2).min(start);
    let head = &text[..start];
    let code = &text[start..];
    match function_end(code) {
        Some(end) => format!("{head}{}", &code[..=end]),
        None => text.to_string(),
    }
}

/// The program an answer makes: the task's buggy file with the function replaced.
pub fn splice(check: &Check, answer: &str) -> String {
    let (start, end) = check.span;
    format!(
        "{}{}{}",
        &check.buggy[..start],
        answer_code(answer),
        &check.buggy[end..]
    )
}

/// A project's split: the named test projects, else a hash of the name below `test_percent`.
pub fn split_of(project: &str, test_projects: &[String], test_percent: u64) -> &'static str {
    if !test_projects.is_empty() {
        return if test_projects.iter().any(|p| p == project) {
            "test"
        } else {
            "train"
        };
    }
    let h = xxhash_rust::xxh3::xxh3_64(project.as_bytes());
    if h % 100 < test_percent {
        "test"
    } else {
        "train"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_span_takes_the_head_and_the_body() {
        let text = "#include <x>\n// doc\ntemplate <class T>\nT f(T a) {\n  return a;\n}\nint main() { return f(1); }\n";
        let pos = text.find("return a").unwrap();
        let (s, e) = function_span(text, pos).unwrap();
        assert_eq!(
            &text[s..e],
            "template <class T>\nT f(T a) {\n  return a;\n}"
        );
        let pos = text.find("f(1)").unwrap();
        let (s, e) = function_span(text, pos).unwrap();
        assert_eq!(&text[s..e], "int main() { return f(1); }");
    }

    #[test]
    fn an_answer_completes_only_on_a_closing_brace_or_comment() {
        let answer = "/* REASONING: the loop ran one past the end {i <= n}; stop at n. */\n\
                      int sum(const int* a, int n) {\n  int s = 0;\n  for (int i = 0; i < n; ++i) { s += a[i]; }\n  return s;\n}\nint unused;";
        let first = (1..=answer.len())
            .find(|&end| answer_complete(&answer[..end]))
            .expect("the answer completes");
        assert_eq!(&answer[..first], &answer[..answer.find("\n}").unwrap() + 2]);
        for end in 1..=answer.len() {
            if !answer_complete(&answer[..end - 1]) && answer_complete(&answer[..end]) {
                assert!(may_complete(&answer.as_bytes()[end - 1..end]), "at {end}");
            }
        }
        assert!(!may_complete(b" return"));
        // Sampling, one byte a token: it ends where the function closes, or at the stop.
        let ids: Vec<u32> = answer.bytes().map(u32::from).collect();
        let decode = |t: &[u32]| t.iter().map(|&b| b as u8).collect::<Vec<u8>>();
        let ends = (1..=ids.len()).find(|&n| answer_ends(&ids[..n], 0, decode));
        assert_eq!(ends, Some(first));
        assert!(answer_ends(&[b'i' as u32, 0], 0, decode));
        assert!(!answer_ends(&[], 0, decode));
    }

    #[test]
    fn answers_splice_into_the_buggy_file() {
        let buggy = "int f() {\n  return 2;\n}\nint main() {}\n".to_string();
        let check = Check {
            flags: vec![],
            support: Default::default(),
            fixed: String::new(),
            span: (0, buggy.find("}\n").unwrap() + 1),
            buggy,
            oracle: Oracle { stdout: String::new(), exit_code: 0 },
            failure: serde_json::from_value(serde_json::json!({"kind":"x","detector":"y","signal":null,"location":null,"line":null,"function":null,"message":"","values":[],"stack":[],"exit_code":null,"expected":null,"printed":null})).unwrap(),
            verified_by: "schema".into(),
        };
        let answer = "/* REASONING:\n   x\n*/\nint f() {\n  return 1;\n}\n";
        assert_eq!(
            splice(&check, answer),
            "int f() {\n  return 1;\n}\nint main() {}\n"
        );
        assert_eq!(answer_code("int g();"), "int g();");
    }

    #[test]
    fn splits_follow_projects() {
        let named = vec!["b".to_string()];
        assert_eq!(split_of("b", &named, 0), "test");
        assert_eq!(split_of("a", &named, 100), "train");
        assert_eq!(split_of("a", &[], 100), "test");
        assert_eq!(split_of("a", &[], 0), "train");
    }
}
