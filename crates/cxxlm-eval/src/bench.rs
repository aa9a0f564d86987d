//! Coding benchmarks with unit tests: MultiPL-E (`name`, `prompt`, `tests`,
//! `stop_tokens`) and HumanEval-X (`task_id`, `prompt`, `declaration`,
//! `canonical_solution`, `test`). A completion is cut at the first stop token, placed
//! between the prompt and the tests, built and run in the sandbox; it passes when the
//! program exits 0. pass@k is the unbiased estimator of Chen et al. (2021).

use rayon::prelude::*;
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::compile::Compiler;
use crate::sandbox::Ending;
use crate::{EvalError, Result};

#[derive(Debug, Clone)]
pub struct Problem {
    pub name: String,
    pub prompt: String,
    pub tests: String,
    pub stop_tokens: Vec<String>,
    /// A reference solution (HumanEval-X), to check the harness itself.
    pub canonical: Option<String>,
}

/// MultiPL-E's MBPP in C++ (398 problems, "keep" variant; `evals/`), built in so that
/// `eval mbpp` needs no file from any working directory.
const MBPP_CPP: &str = include_str!("../../../evals/multipl-e_mbpp-cpp-keep.jsonl");

/// The built-in MBPP-C++ problems.
pub fn mbpp_cpp() -> Result<Vec<Problem>> {
    parse(MBPP_CPP, Path::new("<built-in MBPP-C++>"))
}

/// Reads a JSON lines benchmark in either format.
pub fn load(path: &Path) -> Result<Vec<Problem>> {
    let text = std::fs::read_to_string(path).map_err(|e| EvalError::io(path, e))?;
    parse(&text, path)
}

/// A JSON lines benchmark in either format; `path` names it in errors.
fn parse(text: &str, path: &Path) -> Result<Vec<Problem>> {
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let bad = |message: String| EvalError::Format {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        };
        let v: Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let field = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let problem = if let (Some(name), Some(tests)) = (field("name"), field("tests")) {
            Problem {
                name,
                prompt: field("prompt").ok_or_else(|| bad("no prompt".into()))?,
                tests,
                stop_tokens: v
                    .get("stop_tokens")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default(),
                canonical: None,
            }
        } else if let (Some(name), Some(tests)) = (field("task_id"), field("test")) {
            Problem {
                name,
                prompt: field("prompt").ok_or_else(|| bad("no prompt".into()))?,
                // The completion is cut before the function's closing brace, as in MultiPL-E.
                tests: format!("\n}}\n{tests}"),
                stop_tokens: vec!["\n}\n".into()],
                canonical: field("canonical_solution"),
            }
        } else {
            return Err(bad(
                "neither MultiPL-E (name, prompt, tests) nor HumanEval-X (task_id, prompt, test)"
                    .into(),
            ));
        };
        out.push(problem);
    }
    Ok(out)
}

impl Problem {
    /// The completion up to its first stop token.
    pub fn truncate<'a>(&self, completion: &'a str) -> &'a str {
        let end = self
            .stop_tokens
            .iter()
            .filter_map(|s| completion.find(s.as_str()))
            .min()
            .unwrap_or(completion.len());
        &completion[..end]
    }

    pub fn program(&self, completion: &str) -> String {
        format!("{}{}{}", self.prompt, self.truncate(completion), self.tests)
    }

    /// Whether any body can compile between the prompt and the tests: tried with one that
    /// never returns. Some of MultiPL-E's translations cannot (`std::any` compared with
    /// `==`, a parameter named `char`).
    pub fn buildable(&self, compiler: &Compiler) -> Result<bool> {
        Ok(compiler.check(&self.program(NEVER_RETURNS))?.ok)
    }
}

/// A function body valid for any return type, whichever headers the prompt includes.
const NEVER_RETURNS: &str = "    __builtin_trap();\n";

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub name: String,
    pub passed: bool,
    pub compiled: bool,
    /// How the compile or the run ended when it did not end normally.
    pub ending: Option<Ending>,
    pub category: Option<String>,
    /// The first lines of the compiler's message when it did not compile.
    pub compiler_message: Option<String>,
}

pub fn judge(compiler: &Compiler, problem: &Problem, completion: &str) -> Result<Verdict> {
    let (built, ran) = compiler.build_and_run(&problem.program(completion), b"")?;
    let ending = match &ran {
        Some(r) if r.ending != Ending::Exited => Some(r.ending),
        _ => None,
    };
    Ok(Verdict {
        name: problem.name.clone(),
        passed: ran.as_ref().is_some_and(|r| r.success()),
        compiled: built.ok,
        ending,
        category: built.category,
        compiler_message: built.message,
    })
}

/// The mean of per-problem scores; 0 (not the -0 of an empty float sum) for none.
pub fn mean_score(scores: &[f64]) -> f64 {
    if scores.is_empty() {
        return 0.0;
    }
    scores.iter().sum::<f64>() / scores.len() as f64
}

/// The probability that at least one of `k` samples drawn from `n`, of which `c` are
/// correct, is correct.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if n < k || n == 0 {
        return f64::NAN;
    }
    if n - c < k {
        return 1.0;
    }
    1.0 - ((n - c + 1)..=n)
        .map(|i| 1.0 - k as f64 / i as f64)
        .product::<f64>()
}

/// The standard error of a rate pooled over problems, each `(successes, trials)`, with the
/// problem as the unit sampled: samples of one problem succeed or fail together, so
/// counting them as independent understates the error (five samples of 100 problems are
/// closer to 100 draws than to 500). For a score per problem, pass each as `(score, 1)`.
/// NaN for fewer than two problems.
pub fn standard_error_over_problems(per_problem: &[(f64, f64)]) -> f64 {
    let p = per_problem.len() as f64;
    let trials: f64 = per_problem.iter().map(|&(_, n)| n).sum();
    if per_problem.len() < 2 || trials == 0.0 {
        return f64::NAN;
    }
    let rate = per_problem.iter().map(|&(k, _)| k).sum::<f64>() / trials;
    let spread: f64 = per_problem
        .iter()
        .map(|&(k, n)| (k - rate * n).powi(2))
        .sum();
    (p / (p - 1.0) * spread).sqrt() / trials
}

/// [`standard_error_over_problems`] of one score per problem.
pub fn standard_error_of_scores(scores: &[f64]) -> f64 {
    let each: Vec<(f64, f64)> = scores.iter().map(|&s| (s, 1.0)).collect();
    standard_error_over_problems(&each)
}

/// One model's share of samples against another's on the same problems: the mean of the
/// per-problem differences and its standard error, so that two runs judged on one
/// benchmark are told apart by what they do on each problem, not by two whole rates whose
/// errors both hold the problems' spread.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Paired {
    pub problems: usize,
    pub difference: f64,
    pub standard_error: f64,
}

/// Over the problems both have, each given as `(successes, samples)`: the mean of
/// `other`'s share minus `baseline`'s.
pub fn paired_difference(
    baseline: &BTreeMap<String, (f64, f64)>,
    other: &BTreeMap<String, (f64, f64)>,
) -> Paired {
    let differences: Vec<f64> = baseline
        .iter()
        .filter_map(|(name, &(k, n))| {
            let &(k2, n2) = other.get(name)?;
            (n > 0.0 && n2 > 0.0).then(|| k2 / n2 - k / n)
        })
        .collect();
    Paired {
        problems: differences.len(),
        difference: differences.iter().sum::<f64>() / differences.len() as f64,
        standard_error: standard_error_of_scores(&differences),
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub problems: usize,
    pub samples: usize,
    pub compiled: usize,
    pub passed: usize,
    /// The problems no body can compile for ([`Problem::buildable`]); their samples count
    /// as failures above, as in MultiPL-E's figures...
    pub unbuildable: Vec<String>,
    /// ...and are left out of these two.
    pub buildable_samples: usize,
    pub buildable_compiled: usize,
    /// The standard error of `compiled / samples`, over problems
    /// ([`standard_error_over_problems`]).
    pub compile_rate_standard_error: f64,
    pub pass_at_k: BTreeMap<String, f64>,
    /// Each pass@k's standard error, over problems.
    pub pass_at_k_standard_error: BTreeMap<String, f64>,
    pub verdicts: Vec<Verdict>,
}

/// Judges every `(problem name, completion)` (in parallel) and reports pass@k for each
/// `k` over the problems with at least `k` samples.
pub fn score(
    compiler: &Compiler,
    problems: &[Problem],
    completions: &[(String, String)],
    ks: &[usize],
) -> Result<Report> {
    let by_name: BTreeMap<&str, &Problem> = problems.iter().map(|p| (p.name.as_str(), p)).collect();
    let verdicts = completions
        .par_iter()
        .map(|(name, completion)| {
            let problem = by_name.get(name.as_str()).ok_or_else(|| {
                EvalError::Sandbox(format!("completion for unknown problem {name:?}"))
            })?;
            judge(compiler, problem, completion)
        })
        .collect::<Result<Vec<_>>>()?;
    // Per problem: (samples, passed, compiled).
    let mut per: BTreeMap<&str, (usize, usize, usize)> = BTreeMap::new();
    for v in &verdicts {
        let e = per.entry(v.name.as_str()).or_default();
        e.0 += 1;
        e.1 += usize::from(v.passed);
        e.2 += usize::from(v.compiled);
    }
    // A problem with a sample that compiled is buildable: only the others are tried.
    let compiled: BTreeSet<&str> = verdicts
        .iter()
        .filter(|v| v.compiled)
        .map(|v| v.name.as_str())
        .collect();
    let unbuildable = per
        .par_iter()
        .filter(|(name, _)| !compiled.contains(*name))
        .map(|(name, _)| Ok((!by_name[name].buildable(compiler)?).then(|| name.to_string())))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect::<Vec<String>>();
    let buildable: Vec<&Verdict> = verdicts
        .iter()
        .filter(|v| !unbuildable.contains(&v.name))
        .collect();
    let mut pass_at_k_scores = BTreeMap::new();
    let mut pass_at_k_standard_error = BTreeMap::new();
    for &k in ks {
        let scores: Vec<f64> = per
            .values()
            .filter(|(n, _, _)| *n >= k)
            .map(|&(n, c, _)| pass_at_k(n, c, k))
            .collect();
        if scores.is_empty() {
            // No problem has k samples: pass@k has no estimate (not 0).
            continue;
        }
        pass_at_k_scores.insert(format!("pass@{k}"), mean_score(&scores));
        pass_at_k_standard_error.insert(format!("pass@{k}"), standard_error_of_scores(&scores));
    }
    let compiled_per_problem: Vec<(f64, f64)> = per
        .values()
        .map(|&(n, _, c)| (c as f64, n as f64))
        .collect();
    Ok(Report {
        problems: per.len(),
        samples: verdicts.len(),
        compiled: verdicts.iter().filter(|v| v.compiled).count(),
        passed: verdicts.iter().filter(|v| v.passed).count(),
        buildable_samples: buildable.len(),
        buildable_compiled: buildable.iter().filter(|v| v.compiled).count(),
        unbuildable,
        compile_rate_standard_error: standard_error_over_problems(&compiled_per_problem),
        pass_at_k: pass_at_k_scores,
        pass_at_k_standard_error,
        verdicts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_at_k_is_the_unbiased_estimator() {
        assert_eq!(pass_at_k(10, 0, 1), 0.0);
        assert!((pass_at_k(10, 3, 1) - 0.3).abs() < 1e-12);
        assert_eq!(pass_at_k(10, 8, 5), 1.0);
        // 1 - C(7,2)/C(10,2) = 1 - 21/45
        assert!((pass_at_k(10, 3, 2) - (1.0 - 21.0 / 45.0)).abs() < 1e-12);
    }

    #[test]
    fn a_rate_over_problems_errs_by_the_spread_between_problems() {
        // Two problems, five samples each: all of one compile, none of the other. As 10
        // independent samples the error would be sqrt(0.25 / 10) = 0.158; as two problems
        // it is 0.5 (the rate could as well be 0 or 1 over other problems).
        let se = standard_error_over_problems(&[(5.0, 5.0), (0.0, 5.0)]);
        assert!((se - 0.5).abs() < 1e-12, "{se}");
        // Problems that agree leave no error; one problem cannot give one.
        assert_eq!(standard_error_over_problems(&[(2.0, 4.0), (1.0, 2.0)]), 0.0);
        assert!(standard_error_over_problems(&[(1.0, 5.0)]).is_nan());
        // Scores per problem, each passed as (score, 1): sd / sqrt(P).
        let se = standard_error_over_problems(&[(0.0, 1.0), (1.0, 1.0), (0.5, 1.0)]);
        assert!((se - (0.25f64 / 3.0).sqrt()).abs() < 1e-12, "{se}");
    }

    #[test]
    fn a_paired_difference_is_over_the_shared_problems() {
        let runs = |rows: &[(&str, f64, f64)]| {
            rows.iter()
                .map(|&(name, k, n)| (name.to_string(), (k, n)))
                .collect::<BTreeMap<_, _>>()
        };
        // The other model compiles one more of five on `a` and `b` alike: +0.2 on each,
        // with no spread; `c` is the baseline's alone.
        let base = runs(&[("a", 1.0, 5.0), ("b", 4.0, 5.0), ("c", 0.0, 5.0)]);
        let other = runs(&[("a", 2.0, 5.0), ("b", 5.0, 5.0)]);
        let p = paired_difference(&base, &other);
        assert_eq!(p.problems, 2);
        assert!((p.difference - 0.2).abs() < 1e-12, "{p:?}");
        assert!(p.standard_error.abs() < 1e-12, "{p:?}");
        // Differences of +0.4 and -0.4: a mean of 0 whose error is 0.4.
        let other = runs(&[("a", 3.0, 5.0), ("b", 2.0, 5.0)]);
        let p = paired_difference(&base, &other);
        assert!(
            p.difference.abs() < 1e-12 && (p.standard_error - 0.4).abs() < 1e-12,
            "{p:?}"
        );
    }

    #[test]
    fn completions_stop_at_the_first_stop_token() {
        let p = Problem {
            name: "x".into(),
            prompt: "int f() {\n".into(),
            tests: "}\nint main() {}\n".into(),
            stop_tokens: vec!["\n}".into(), "\nint main".into()],
            canonical: None,
        };
        assert_eq!(p.truncate("  return 1;\n}\n\nint g() {}"), "  return 1;");
        assert_eq!(
            p.program("  return 1;"),
            "int f() {\n  return 1;}\nint main() {}\n"
        );
    }

    #[test]
    fn both_formats_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.jsonl");
        let records = [
            serde_json::json!({"task_id": "CPP/0", "prompt": "int add(int a, int b) {\n",
                "declaration": "int add(int a, int b) {\n", "canonical_solution": "    return a + b;\n}\n",
                "test": "int main() { return add(1, 2) == 3 ? 0 : 1; }\n"}),
            serde_json::json!({"name": "m", "prompt": "int f() {\n", "tests": "}\nint main() {}\n",
                "stop_tokens": ["\n}"]}),
        ];
        let text: Vec<String> = records.iter().map(|r| r.to_string()).collect();
        std::fs::write(&path, text.join("\n")).unwrap();
        let problems = load(&path).unwrap();
        let x = &problems[0];
        assert_eq!(x.name, "CPP/0");
        let program = x.program(x.canonical.as_deref().unwrap());
        assert!(
            program.ends_with("return a + b;\n}\nint main() { return add(1, 2) == 3 ? 0 : 1; }\n"),
            "{program}"
        );
        assert_eq!(problems[1].stop_tokens, vec!["\n}".to_string()]);
        std::fs::write(&path, "{\"prompt\": \"x\"}").unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("b.jsonl:1") && e.contains("HumanEval-X"), "{e}");
    }
}
