//! What a failing run says: sanitizer reports (AddressSanitizer, UndefinedBehaviorSanitizer),
//! assertion messages, signals, timeouts, or output that is not the oracle's, read into a
//! [`Failure`] and written as the seeds' `struct DebugState { ... }`.

use cxxlm_eval::{Ending, Outcome};
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

/// What a correct run printed and returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Oracle {
    pub stdout: String,
    pub exit_code: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// `heap-use-after-free`, `signed-integer-overflow`, `assertion`, `wrong-output`,
    /// `exit-code`, `timeout`, `crash`, ...
    pub kind: String,
    /// `AddressSanitizer`, `UndefinedBehaviorSanitizer`, `assert`, `libstdc++`, `oracle`,
    /// `sandbox`.
    pub detector: String,
    pub signal: Option<String>,
    /// `main.cpp:12`, where the report puts it.
    pub location: Option<String>,
    pub line: Option<usize>,
    pub function: Option<String>,
    /// The report's own words (addresses and process ids removed).
    pub message: String,
    /// Values the report names (sizes, operands, the checked expression).
    pub values: Vec<String>,
    /// Frames in the program's own code, innermost first: `function at main.cpp:12`.
    pub stack: Vec<String>,
    pub exit_code: Option<i32>,
    /// For wrong output: the first line that differs, expected and printed.
    pub expected: Option<String>,
    pub printed: Option<String>,
}

fn re(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pattern).expect("valid pattern"))
}

/// Removes what changes from run to run: addresses, process and thread ids.
fn scrub(s: &str) -> String {
    static ADDR: OnceLock<Regex> = OnceLock::new();
    static PID: OnceLock<Regex> = OnceLock::new();
    let s = re(&PID, r"==\d+==").replace_all(s, "");
    re(
        &ADDR,
        r"\s*(?:on address |at pc |bp |sp |at |address )?0x[0-9a-fA-F]+",
    )
    .replace_all(&s, "")
    .trim()
    .to_string()
}

fn signal_name(n: i32) -> String {
    match n {
        4 => "SIGILL".into(),
        6 => "SIGABRT".into(),
        7 => "SIGBUS".into(),
        8 => "SIGFPE".into(),
        9 => "SIGKILL".into(),
        11 => "SIGSEGV".into(),
        24 => "SIGXCPU".into(),
        n => format!("signal {n}"),
    }
}

/// Where the sandbox's working directory and paths of the program's files are cut to
/// the names a task shows.
fn short_path(p: &str) -> String {
    p.trim_start_matches("/work/").to_string()
}

/// Frames `#N 0x... in FUNCTION FILE:LINE[:COL]` in the program's own files.
fn frames(report: &str, own: &dyn Fn(&str) -> bool) -> Vec<(String, String, usize)> {
    static FRAME: OnceLock<Regex> = OnceLock::new();
    let frame = re(
        &FRAME,
        r"(?m)^\s*#\d+ 0x[0-9a-f]+ in (.+?) (/?[^\s:]+):(\d+)(?::\d+)?\s*$",
    );
    frame
        .captures_iter(report)
        .filter_map(|c| {
            let file = short_path(&c[2]);
            own(&file).then(|| (c[1].to_string(), file, c[3].parse().unwrap_or(0)))
        })
        .collect()
}

fn ubsan_kind(message: &str) -> &'static str {
    let rules: [(&str, &str); 12] = [
        ("signed integer overflow", "signed-integer-overflow"),
        ("out of bounds for type", "index-out-of-bounds"),
        ("null pointer", "null-pointer-dereference"),
        (
            "reached the end of a value-returning function",
            "missing-return",
        ),
        ("not a valid value for type", "invalid-value"),
        ("shift exponent", "invalid-shift"),
        ("left shift of", "invalid-shift"),
        ("division by zero", "division-by-zero"),
        ("misaligned address", "misaligned-access"),
        ("pointer overflow", "pointer-overflow"),
        (
            "is outside the range of representable values",
            "float-cast-overflow",
        ),
        ("negation of", "signed-integer-overflow"),
    ];
    rules
        .iter()
        .find(|(needle, _)| message.contains(needle))
        .map_or("undefined-behavior", |(_, k)| k)
}

/// How a run of a mutant differs from the original, or `None` if it does not.
/// `own` says which file names are the program's (frames elsewhere are the library's).
pub fn classify(outcome: &Outcome, oracle: &Oracle, own: &dyn Fn(&str) -> bool) -> Option<Failure> {
    let stderr = String::from_utf8_lossy(&outcome.stderr);
    let stdout = String::from_utf8_lossy(&outcome.stdout);
    let signal = outcome.signal.map(signal_name);
    let mut f = Failure {
        kind: String::new(),
        detector: String::new(),
        signal: signal.clone(),
        location: None,
        line: None,
        function: None,
        message: String::new(),
        values: Vec::new(),
        stack: Vec::new(),
        exit_code: outcome.code.filter(|_| outcome.signal.is_none()),
        expected: None,
        printed: None,
    };
    let stack = |f: &mut Failure, report: &str| {
        let fr = frames(report, own);
        if let Some((func, file, line)) = fr.first() {
            f.location.get_or_insert(format!("{file}:{line}"));
            f.line.get_or_insert(*line);
            f.function.get_or_insert(func.clone());
        }
        f.stack = fr
            .iter()
            .take(6)
            .map(|(func, file, line)| format!("{func} at {file}:{line}"))
            .collect();
    };

    static ASAN: OnceLock<Regex> = OnceLock::new();
    static UBSAN: OnceLock<Regex> = OnceLock::new();
    static ASSERT: OnceLock<Regex> = OnceLock::new();
    static ACCESS: OnceLock<Regex> = OnceLock::new();
    static REGION: OnceLock<Regex> = OnceLock::new();
    if let Some(c) = re(
        &ASAN,
        r"ERROR: (AddressSanitizer|LeakSanitizer): ([\w-]+)(.*)",
    )
    .captures(&stderr)
    {
        f.detector = c[1].to_string();
        f.kind = c[2].to_string();
        let rest = &stderr[c.get(0).map_or(0, |m| m.end())..];
        // Only the first report's frames (the allocation and free stacks follow).
        let first_stack = rest.split("\n\n").next().unwrap_or(rest);
        f.message = scrub(&format!("{}{}", &c[2], &c[3]));
        if let Some(a) = re(&ACCESS, r"(?m)^(READ|WRITE) of size (\d+)").captures(rest) {
            f.values
                .push(format!("access = \"{} of {} bytes\"", &a[1], &a[2]));
        }
        if let Some(r) = re(&REGION, r"is located (.+?) of (\d+)-byte region").captures(rest) {
            f.values
                .push(format!("where = \"{} of a {}-byte region\"", &r[1], &r[2]));
        }
        for (label, key) in [
            ("freed by thread", "freed_at"),
            ("previously allocated by thread", "allocated_at"),
        ] {
            if let Some(p) = rest.find(label) {
                if let Some((func, file, line)) = frames(&rest[p..], own).first() {
                    f.values
                        .push(format!("{key} = \"{func} at {file}:{line}\""));
                }
            }
        }
        stack(&mut f, first_stack);
        return Some(f);
    }
    if let Some(c) = re(&UBSAN, r"(?m)^(\S+?):(\d+):(\d+): runtime error: (.+)$").captures(&stderr)
    {
        f.detector = "UndefinedBehaviorSanitizer".into();
        f.message = scrub(&c[4]);
        f.kind = ubsan_kind(&f.message).into();
        let file = short_path(&c[1]);
        f.line = c[2].parse().ok();
        f.location = Some(format!("{file}:{}", &c[2]));
        f.values
            .push(format!("detail = \"{}\"", f.message.replace('"', "'")));
        let rest = &stderr[c.get(0).map_or(0, |m| m.end())..];
        stack(&mut f, rest);
        return Some(f);
    }
    if let Some(c) = re(
        &ASSERT,
        r"(?m)^(?:.*?: )?(\S+?):(\d+): (.+?): Assertion [`'](.+)' failed\.",
    )
    .captures(&stderr)
    {
        let file = short_path(&c[1]);
        let library = !own(&file);
        f.detector = if library { "libstdc++" } else { "assert" }.into();
        f.kind = "assertion".into();
        f.message = format!("Assertion `{}` failed", &c[4]);
        f.values
            .push(format!("condition = \"{}\"", c[4].replace('"', "'")));
        if library {
            f.values
                .push(format!("in = \"{}\"", scrub(&c[3]).replace('"', "'")));
        } else {
            f.location = Some(format!("{file}:{}", &c[2]));
            f.line = c[2].parse().ok();
            f.function = Some(c[3].to_string());
        }
        return Some(f);
    }
    match outcome.ending {
        Ending::WallTime | Ending::CpuTime => {
            f.kind = "timeout".into();
            f.detector = "sandbox".into();
            f.message = "the program did not finish within its time limit".into();
            f.signal = Some("SIGKILL".into());
            f.exit_code = None;
            return Some(f);
        }
        Ending::Output => {
            f.kind = "output-limit".into();
            f.detector = "sandbox".into();
            f.message = "the program printed without end".into();
            return Some(f);
        }
        Ending::Memory => {
            f.kind = "out-of-memory".into();
            f.detector = "sandbox".into();
            f.message = "the program ran out of memory".into();
            return Some(f);
        }
        Ending::Storage => {
            f.kind = "storage-limit".into();
            f.detector = "sandbox".into();
            f.message = "the program filled its scratch space".into();
            return Some(f);
        }
        // A sanitizer's own report, parsed above, describes undefined behaviour.
        Ending::Signal | Ending::Exited | Ending::UndefinedBehaviour => {}
    }
    if let Some(sig) = &signal {
        f.kind = "crash".into();
        f.detector = "signal".into();
        f.message = format!("the program was killed by {sig}");
        return Some(f);
    }
    if let Some(code) = outcome.code.filter(|&c| c != oracle.exit_code) {
        f.kind = "exit-code".into();
        f.detector = "oracle".into();
        f.message = format!(
            "the program exited with status {code}, expected {}",
            oracle.exit_code
        );
        f.values.push(format!("exit_code = {code}"));
        return Some(f);
    }
    if stdout != oracle.stdout {
        f.kind = "wrong-output".into();
        f.detector = "oracle".into();
        let (mut exp, mut got) = (oracle.stdout.lines(), stdout.lines());
        let mut n = 1;
        loop {
            match (exp.next(), got.next()) {
                (Some(a), Some(b)) if a == b => n += 1,
                (a, b) => {
                    f.expected = Some(a.unwrap_or("<end of output>").chars().take(200).collect());
                    f.printed = Some(b.unwrap_or("<end of output>").chars().take(200).collect());
                    break;
                }
            }
        }
        f.message = format!("output line {n} differs from the expected output");
        f.values.push(format!("output_line = {n}"));
        return Some(f);
    }
    None
}

fn c_string(s: &str) -> String {
    let escaped: String = s
        .chars()
        .take(300)
        .flat_map(|c| match c {
            '"' => vec!['\\', '"'],
            '\\' => vec!['\\', '\\'],
            '\n' => vec!['\\', 'n'],
            c if c.is_control() => vec![' '],
            c => vec![c],
        })
        .collect();
    format!("\"{escaped}\"")
}

impl Failure {
    /// The seeds' debug state: what a developer sees after the failing run.
    pub fn debug_state(&self) -> String {
        let mut out = String::from("struct DebugState {\n");
        out.push_str(&format!(
            "  const char* error = {};  // {}\n",
            c_string(&self.kind),
            self.detector
        ));
        if let Some(s) = &self.signal {
            out.push_str(&format!("  const char* signal = {};\n", c_string(s)));
        }
        if let Some(code) = self.exit_code {
            out.push_str(&format!("  int exit_code = {code};\n"));
        }
        if let Some(l) = &self.location {
            let within = self
                .function
                .as_deref()
                .map(|f| format!(" in {f}"))
                .unwrap_or_default();
            out.push_str(&format!(
                "  const char* location = {};\n",
                c_string(&format!("{l}{within}"))
            ));
        }
        out.push_str(&format!(
            "  const char* message = {};\n",
            c_string(&self.message)
        ));
        if let (Some(e), Some(p)) = (&self.expected, &self.printed) {
            out.push_str(&format!(
                "  const char* expected_output = {};\n",
                c_string(e)
            ));
            out.push_str(&format!("  const char* actual_output = {};\n", c_string(p)));
        }
        if !self.values.is_empty() {
            out.push_str("  // values from the report\n");
            for v in &self.values {
                out.push_str(&format!("  // {v}\n"));
            }
        }
        if !self.stack.is_empty() {
            let frames: Vec<String> = self.stack.iter().map(|s| c_string(s)).collect();
            out.push_str(&format!(
                "  const char* stack[{}] = {{{}}};\n",
                frames.len(),
                frames.join(", ")
            ));
        }
        out.push_str("};\n");
        out
    }

    /// The `// TASK:` line: what a developer would be asked, from the failure alone.
    pub fn task_line(&self) -> String {
        let what = match (self.detector.as_str(), self.kind.as_str()) {
            ("AddressSanitizer" | "LeakSanitizer", k) => {
                format!("Fix the {k} that {} reports", self.detector)
            }
            ("UndefinedBehaviorSanitizer", k) => format!(
                "Fix the undefined behavior ({}) that UBSan reports",
                k.replace('-', " ")
            ),
            ("assert", _) => format!(
                "Fix the bug that makes the assertion {} fail",
                self.values
                    .first()
                    .map_or("", |v| v.trim_start_matches("condition = "))
                    .replace('"', "`")
            ),
            ("libstdc++", _) => {
                "Fix the out-of-contract library call that aborts the program".to_string()
            }
            (_, "timeout") => "Fix the bug that makes the program hang".to_string(),
            (_, "crash") => format!(
                "Fix the crash ({})",
                self.signal.as_deref().unwrap_or("signal")
            ),
            (_, "exit-code") => format!(
                "Fix the bug that makes the program exit with status {}",
                self.exit_code.unwrap_or(1)
            ),
            (_, "wrong-output") => {
                "Fix the bug that makes the program print the wrong output".to_string()
            }
            (_, k) => format!("Fix the bug ({k})"),
        };
        format!("// TASK: {what}")
    }

    /// One sentence: what the run showed, and where.
    pub fn summary(&self) -> String {
        let at = match (&self.location, &self.function) {
            (Some(l), Some(f)) => format!(" at {l} in {f}"),
            (Some(l), None) => format!(" at {l}"),
            _ => String::new(),
        };
        let called = self
            .stack
            .get(1)
            .map(|s| format!(", called from {s}"))
            .unwrap_or_default();
        match self.kind.as_str() {
            "wrong-output" => {
                format!(
                "The program runs to the end but its output differs: {} (expected {}, printed {}).",
                self.message,
                self.expected.as_deref().map(|e| format!("`{e}`")).unwrap_or_default(),
                self.printed.as_deref().map(|e| format!("`{e}`")).unwrap_or_default()
            )
            }
            _ => format!(
                "The run stopped with {} ({}){at}{called}: {}.",
                self.kind, self.detector, self.message
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn outcome(code: Option<i32>, signal: Option<i32>, stdout: &str, stderr: &str) -> Outcome {
        Outcome {
            ending: if signal.is_some() {
                Ending::Signal
            } else {
                Ending::Exited
            },
            code,
            signal,
            stdout: stdout.as_bytes().to_vec(),
            stderr: stderr.as_bytes().to_vec(),
            wall: Duration::from_millis(5),
        }
    }

    fn own(f: &str) -> bool {
        f == "main.cpp"
    }

    const ORACLE: Oracle = Oracle {
        stdout: String::new(),
        exit_code: 0,
    };

    #[test]
    fn asan_reports_give_kind_location_values_and_stack() {
        let report = "=================================================================\n==42==ERROR: AddressSanitizer: heap-use-after-free on address 0x602000000010 at pc 0x55d0 bp 0x7ffc sp 0x7ffc\nREAD of size 4 at 0x602000000010 thread T0\n    #0 0x55d0c1 in sum(int const*, int) /work/main.cpp:7\n    #1 0x55d0c2 in main /work/main.cpp:28\n    #2 0x7f00 in __libc_start_main ../csu/libc-start.c:308\n\n0x602000000010 is located 0 bytes inside of 12-byte region [0x602000000010,0x60200000001c)\nfreed by thread T0 here:\n    #0 0x7f01 in operator delete[](void*) ../../../../src/libsanitizer/asan/asan_new_delete.cpp:163\n    #1 0x55d0c3 in main /work/main.cpp:27\n";
        let f = classify(&outcome(Some(1), None, "", report), &ORACLE, &own).unwrap();
        assert_eq!(f.kind, "heap-use-after-free");
        assert_eq!(f.location.as_deref(), Some("main.cpp:7"));
        assert_eq!(f.function.as_deref(), Some("sum(int const*, int)"));
        assert_eq!(
            f.stack,
            ["sum(int const*, int) at main.cpp:7", "main at main.cpp:28"]
        );
        assert!(
            f.values
                .contains(&"freed_at = \"main at main.cpp:27\"".to_string()),
            "{:?}",
            f.values
        );
        assert!(!f.message.contains("0x"), "{}", f.message);
        let state = f.debug_state();
        assert!(
            state.starts_with("struct DebugState {\n") && state.ends_with("};\n"),
            "{state}"
        );
        assert!(f.task_line().contains("heap-use-after-free"));
    }

    #[test]
    fn ubsan_assertions_timeouts_and_output() {
        let ub = "/work/main.cpp:12:9: runtime error: signed integer overflow: 2147483647 + 1 cannot be represented in type 'int'\n    #0 0x1 in f(int) /work/main.cpp:12\n    #1 0x2 in main /work/main.cpp:20\n";
        let f = classify(&outcome(Some(1), None, "", ub), &ORACLE, &own).unwrap();
        assert_eq!(
            (f.kind.as_str(), f.line),
            ("signed-integer-overflow", Some(12))
        );
        let a = "prog: /work/main.cpp:30: int main(): Assertion `t == 6' failed.\n";
        let f = classify(&outcome(None, Some(6), "", a), &ORACLE, &own).unwrap();
        assert_eq!(
            (f.kind.as_str(), f.detector.as_str(), f.line),
            ("assertion", "assert", Some(30))
        );
        assert_eq!(f.signal.as_deref(), Some("SIGABRT"));
        let oracle = Oracle {
            stdout: "1\n2\n".into(),
            exit_code: 0,
        };
        assert!(classify(&outcome(Some(0), None, "1\n2\n", ""), &oracle, &own).is_none());
        let f = classify(&outcome(Some(0), None, "1\n3\n", ""), &oracle, &own).unwrap();
        assert_eq!(
            (f.expected.as_deref(), f.printed.as_deref()),
            (Some("2"), Some("3"))
        );
        let f = classify(&outcome(Some(3), None, "1\n2\n", ""), &oracle, &own).unwrap();
        assert_eq!(f.kind, "exit-code");
        let mut hang = outcome(None, Some(9), "", "");
        hang.ending = Ending::WallTime;
        assert_eq!(classify(&hang, &oracle, &own).unwrap().kind, "timeout");
    }
}
