//! g++ in the sandbox: syntax checks against a precompiled `<bits/stdc++.h>` (most of a
//! check's time is parsing the standard library, which the header cache skips), and full
//! builds whose binaries then run in the sandbox too.

use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::sandbox::{Ending, Outcome, Sandbox};
use crate::{EvalError, Result};

pub const STD: &str = "-std=c++20";

/// Where the sandbox sees the precompiled header cache.
const PCH_INSIDE: &str = "/pch";

#[derive(Debug, Clone, Serialize)]
pub struct Diagnosis {
    pub ok: bool,
    pub warnings: usize,
    pub errors: usize,
    /// Why it failed: a class of the first error, or how the compiler was stopped.
    pub category: Option<String>,
    pub first_error: Option<String>,
    /// The first lines of what the compiler said, when it failed.
    pub message: Option<String>,
}

/// Lines of the compiler's message kept in a failed diagnosis, and characters per line.
const MESSAGE_LINES: usize = 6;
const MESSAGE_LINE_CHARS: usize = 240;

pub struct Compiler {
    sandbox: Sandbox,
    /// Whether checks use the precompiled `bits/stdc++.h`.
    pch: bool,
}

/// The first error's class, from g++'s wording.
fn categorize(first_error: &str) -> &'static str {
    let rules: [(&str, &[&str]); 7] = [
        ("missing_header", &["No such file or directory"]),
        (
            "undeclared",
            &[
                "was not declared",
                "does not name a type",
                "has no member named",
                "is not a member of",
            ],
        ),
        ("end_of_input", &["at end of input"]),
        ("syntax", &["expected ", "stray ", "missing terminating"]),
        (
            "type",
            &[
                "cannot convert",
                "invalid conversion",
                "no matching function",
                "no match for",
                "invalid operands",
            ],
        ),
        (
            "redefinition",
            &["redefinition of", "conflicting declaration"],
        ),
        (
            "return",
            &[
                "return-statement",
                "return type",
                "non-void function",
                "no return statement",
            ],
        ),
    ];
    rules
        .iter()
        .find(|(_, needles)| needles.iter().any(|n| first_error.contains(n)))
        .map_or("other", |(name, _)| name)
}

fn diagnose(outcome: &Outcome) -> Diagnosis {
    let text = String::from_utf8_lossy(&outcome.stderr);
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" error: ") || l.contains("fatal error:"))
        .collect();
    let warnings = text.lines().filter(|l| l.contains(" warning: ")).count();
    let ok = outcome.success();
    let first_error = errors
        .first()
        .map(|l| l.split_once("error: ").map_or(*l, |(_, m)| m).to_string());
    let category = if ok {
        None
    } else if outcome.ending != Ending::Exited {
        Some(format!("{:?}", outcome.ending).to_lowercase())
    } else {
        Some(
            first_error
                .as_deref()
                .map_or("other", categorize)
                .to_string(),
        )
    };
    let message = (!ok).then(|| {
        text.lines()
            .take(MESSAGE_LINES)
            .map(|l| match l.char_indices().nth(MESSAGE_LINE_CHARS) {
                Some((cut, _)) => format!("{}...", &l[..cut]),
                None => l.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    Diagnosis {
        ok,
        warnings,
        errors: errors.len(),
        category,
        first_error,
        message,
    }
}

impl Compiler {
    /// A compiler whose checks use a precompiled standard library header kept in
    /// `cache` (built there once per g++ version).
    pub fn new(sandbox: Sandbox, cache: &Path) -> Result<Self> {
        let version = Command::new("g++")
            .arg("-dumpfullversion")
            .output()
            .map_err(|e| {
                EvalError::Sandbox(format!(
                    "g++ is not installed ({e}); scripts/setup.sh installs it"
                ))
            })?;
        let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
        let dir = cache.join(format!("pch-g++-{version}"));
        let gch = dir.join("bits/stdc++.h.gch");
        if !gch.exists() {
            let header = find_stdcxx_header()?;
            std::fs::create_dir_all(gch.parent().expect("parent"))
                .map_err(|e| EvalError::io(&dir, e))?;
            let tmp = dir.join("bits/stdc++.h.gch.tmp");
            let out = Command::new("g++")
                .args([STD, "-x", "c++-header"])
                .arg(&header)
                .arg("-o")
                .arg(&tmp)
                .output()
                .map_err(|e| EvalError::io("g++", e))?;
            if !out.status.success() {
                return Err(EvalError::Sandbox(format!(
                    "precompiling {}: {}",
                    header.display(),
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
            // The program's own `#include <bits/stdc++.h>` finds this directory first;
            // past the first line the cache cannot serve it, so the real header must be here.
            let link = dir.join("bits/stdc++.h");
            if !link.exists() {
                std::os::unix::fs::symlink(&header, &link).map_err(|e| EvalError::io(&link, e))?;
            }
            std::fs::rename(&tmp, &gch).map_err(|e| EvalError::io(&gch, e))?;
        }
        Ok(Compiler {
            sandbox: sandbox.with_read_only(&dir, PCH_INSIDE),
            pch: true,
        })
    }

    /// A compiler without the header cache (the baseline of the benchmark).
    pub fn plain(sandbox: Sandbox) -> Self {
        Compiler {
            sandbox,
            pch: false,
        }
    }

    fn pch_args(&self) -> Vec<String> {
        if self.pch {
            vec![
                format!("-I{PCH_INSIDE}"),
                "-include".into(),
                "bits/stdc++.h".into(),
            ]
        } else {
            Vec::new()
        }
    }

    /// A scratch directory holding `source` as `main.cpp`.
    fn scratch_with(source: &str) -> Result<tempfile::TempDir> {
        let scratch = tempfile::tempdir().map_err(|e| EvalError::io("temporary directory", e))?;
        let file = scratch.path().join("main.cpp");
        std::fs::write(&file, source).map_err(|e| EvalError::io(&file, e))?;
        Ok(scratch)
    }

    /// `g++ -std=c++20 -Wall -Werror=return-type <flags> main.cpp` in the sandbox.
    fn gxx(&self, scratch: &Path, flags: &[String]) -> Result<Diagnosis> {
        // A function that falls off its end without a value is an error, not a program
        // whose behaviour is undefined (and which often passes tests when optimized).
        let mut argv = vec!["/usr/bin/g++", STD, "-Wall", "-Werror=return-type"];
        argv.extend(flags.iter().map(String::as_str));
        argv.push("main.cpp");
        Ok(diagnose(&self.sandbox.run(scratch, &argv, b"")?))
    }

    /// `g++ -fsyntax-only -Wall` on one translation unit.
    pub fn check(&self, source: &str) -> Result<Diagnosis> {
        let scratch = Self::scratch_with(source)?;
        let mut flags = vec!["-fsyntax-only".to_string(), "-Winvalid-pch".to_string()];
        flags.extend(self.pch_args());
        self.gxx(scratch.path(), &flags)
    }

    /// Builds a program unoptimized and with the undefined behaviour sanitizer (so that
    /// undefined behaviour does not pass for correct) and, if it compiles, runs it; both
    /// in the sandbox. (The address sanitizer cannot run under the address-space limit:
    /// it reserves terabytes for its shadow memory.)
    pub fn build_and_run(
        &self,
        source: &str,
        stdin: &[u8],
    ) -> Result<(Diagnosis, Option<Outcome>)> {
        let scratch = Self::scratch_with(source)?;
        // The sandbox writes only into files that exist: the program's is made here.
        let prog = scratch.path().join("prog");
        std::fs::File::create(&prog).map_err(|e| EvalError::io(&prog, e))?;
        std::fs::set_permissions(&prog, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(|e| EvalError::io(&prog, e))?;
        let flags = [
            "-O0",
            "-fsanitize=undefined",
            "-fno-sanitize-recover=undefined",
            "-o",
            "prog",
        ];
        let built = self.gxx(scratch.path(), &flags.map(String::from))?;
        if !built.ok {
            return Ok((built, None));
        }
        let ran = self.sandbox.run(scratch.path(), &["/work/prog"], stdin)?;
        Ok((built, Some(ran)))
    }
}

fn find_stdcxx_header() -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/include")
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|arch| {
            std::fs::read_dir(arch.path().join("c++"))
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|v| v.path().join("bits/stdc++.h"))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop().ok_or_else(|| {
        EvalError::Sandbox("no bits/stdc++.h under /usr/include/<arch>/c++ (install g++)".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_follow_gcc_wording() {
        assert_eq!(
            categorize("'foo' was not declared in this scope"),
            "undeclared"
        );
        assert_eq!(categorize("expected ';' before '}' token"), "syntax");
        assert_eq!(categorize("expected '}' at end of input"), "end_of_input");
        assert_eq!(categorize("cannot convert 'std::string' to 'int'"), "type");
        assert_eq!(
            categorize("boost/any.hpp: No such file or directory"),
            "missing_header"
        );
        assert_eq!(categorize("something new"), "other");
    }
}
