//! The RL reward of the seeds: compiles +1 (else -1), no warnings +0.5, tests 5 x the
//! fraction passed, a `/* REASONING:` comment +0.5.

use crate::compile::Diagnosis;

pub fn reward(
    completion: &str,
    compiled: &Diagnosis,
    tests_passed: usize,
    tests_total: usize,
) -> f64 {
    if !compiled.ok {
        return -1.0;
    }
    let mut r = 1.0;
    if compiled.warnings == 0 {
        r += 0.5;
    }
    if tests_total > 0 {
        r += 5.0 * tests_passed as f64 / tests_total as f64;
    }
    if completion.contains("/* REASONING:") {
        r += 0.5;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diagnosis(ok: bool, warnings: usize) -> Diagnosis {
        Diagnosis {
            ok,
            warnings,
            errors: usize::from(!ok),
            category: None,
            first_error: None,
            message: None,
        }
    }

    #[test]
    fn follows_the_seeds() {
        assert_eq!(reward("x", &diagnosis(false, 0), 3, 3), -1.0);
        assert_eq!(reward("x", &diagnosis(true, 2), 0, 4), 1.0);
        assert_eq!(reward("x", &diagnosis(true, 0), 2, 4), 1.0 + 0.5 + 2.5);
        assert_eq!(
            reward("/* REASONING: loop */", &diagnosis(true, 0), 4, 4),
            7.0
        );
    }
}
