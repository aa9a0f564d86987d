//! The seeds' RL reward for answers to runnable tasks (compiles +1 else -1, no warnings
//! +0.5, tests 5 x the share passed, a `/* REASONING:` comment +0.5), judged in the
//! sandbox by a pool of workers that score answers as they are handed in, so that the
//! caller waits only for the last ones (and, with answers handed in under several batch
//! numbers, for the last ones of the batch it needs). A program judged before is not
//! built again: verdicts are kept by the hash of the program and its headers.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::judge::{Judge, Workdir};
use crate::task::{cut_answer, splice, Check, Task};
use crate::{Result, TaskError};

/// What the sandbox showed of one program.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Judged {
    pub compiled: bool,
    /// g++'s warnings with `-Wall`.
    pub warnings: usize,
    /// The task's test: a clean run (sanitizers silent) printing the oracle's output.
    pub passed: bool,
    /// Why the run failed: its kind (`timeout`, `heap-use-after-free`, `wrong-output`,
    /// ...) and what detected it (`AddressSanitizer`, `oracle`, `sandbox`, ...).
    pub failure: Option<String>,
    pub detector: Option<String>,
}

impl Judged {
    pub fn timed_out(&self) -> bool {
        self.failure.as_deref() == Some("timeout")
    }

    pub fn sanitizer_fired(&self) -> bool {
        self.detector
            .as_deref()
            .is_some_and(|d| d.ends_with("Sanitizer"))
    }
}

/// One answer's reward and its parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rewarded {
    pub reward: f64,
    pub judged: Judged,
    /// The answer holds a `/* REASONING:` comment.
    pub reasoning: bool,
    /// The verdict was the cache's.
    pub cached: bool,
}

impl Rewarded {
    /// The names of the reward's parts, in the order of [`Rewarded::parts`].
    pub const PARTS: [&'static str; 4] = ["compile", "warnings", "tests", "reasoning"];

    /// The reward's parts by name (they sum to it).
    pub fn parts(&self) -> [(&'static str, f64); 4] {
        let j = &self.judged;
        let on = |b: bool, v: f64| if b { v } else { 0.0 };
        let values = [
            if j.compiled { 1.0 } else { -1.0 },
            on(j.compiled && j.warnings == 0, 0.5),
            on(j.compiled && j.passed, 5.0),
            on(j.compiled && self.reasoning, 0.5),
        ];
        std::array::from_fn(|k| (Self::PARTS[k], values[k]))
    }
}

/// The seeds' reward of `answer` given its program's verdict (the task has one test:
/// the oracle's).
pub fn reward(answer: &str, judged: &Judged) -> f64 {
    let diagnosis = cxxlm_eval::compile::Diagnosis {
        ok: judged.compiled,
        warnings: judged.warnings,
        errors: usize::from(!judged.compiled),
        category: None,
        first_error: None,
        message: None,
    };
    cxxlm_eval::reward::reward(answer, &diagnosis, usize::from(judged.passed), 1)
}

/// Builds `program` with the task's headers (`-Wall`) and runs it against the oracle.
pub fn judge_program(judge: &Judge, check: &Check, program: &str) -> Result<Judged> {
    let work = Workdir::new(program, &check.support, false)?;
    let build = judge.build_warning(&work)?;
    if !build.ok {
        return Ok(Judged {
            compiled: false,
            warnings: build.warnings,
            passed: false,
            failure: None,
            detector: None,
        });
    }
    let own = |f: &str| f == "main.cpp" || check.support.contains_key(f);
    let failure = judge.judge(&work, 0, &check.oracle, &own)?;
    Ok(Judged {
        compiled: true,
        warnings: build.warnings,
        passed: failure.is_none(),
        detector: failure.as_ref().map(|f| f.detector.clone()),
        failure: failure.map(|f| f.kind),
    })
}

type Cache = Mutex<HashMap<u128, Judged>>;

/// Judged completions as they come back: how many of each batch are still out, and
/// those of batches not yet waited for.
struct Returns {
    results: Receiver<(u64, usize, Result<Rewarded>)>,
    pending: HashMap<u64, usize>,
    arrived: HashMap<u64, Vec<(usize, Result<Rewarded>)>>,
}

struct Job {
    batch: u64,
    id: usize,
    task: usize,
    completion: String,
}

/// Sandboxed workers judging answers to `tasks` as they are handed in.
pub struct RewardPool {
    jobs: Option<Sender<Job>>,
    done: Mutex<Returns>,
    workers: Vec<JoinHandle<()>>,
    cache: Arc<Cache>,
    batches: AtomicU64,
}

impl RewardPool {
    /// `workers` threads (0: one per core) judging answers to `tasks` (each must have a
    /// check).
    pub fn new(tasks: Arc<Vec<Task>>, workers: usize) -> Result<Self> {
        if let Some(t) = tasks.iter().find(|t| t.check.is_none()) {
            return Err(TaskError::Input(format!(
                "task {} has no check: only runnable tasks can be rewarded",
                t.id
            )));
        }
        let workers = match workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let judge = Arc::new(Judge::new()?);
        let cache: Arc<Cache> = Arc::default();
        let (jobs, queue) = channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        let (results, done) = channel();
        let workers = (0..workers)
            .map(|_| {
                let (queue, results, judge, cache, tasks) = (
                    queue.clone(),
                    results.clone(),
                    judge.clone(),
                    cache.clone(),
                    tasks.clone(),
                );
                std::thread::spawn(move || loop {
                    let job = match queue.lock().map(|q| q.recv()) {
                        Ok(Ok(job)) => job,
                        _ => return,
                    };
                    let check = tasks[job.task].check.as_ref().expect("checked above");
                    let scored = score(&judge, &cache, check, &job.completion);
                    if results.send((job.batch, job.id, scored)).is_err() {
                        return;
                    }
                })
            })
            .collect();
        Ok(RewardPool {
            jobs: Some(jobs),
            done: Mutex::new(Returns {
                results: done,
                pending: HashMap::new(),
                arrived: HashMap::new(),
            }),
            workers,
            cache,
            batches: AtomicU64::new(0),
        })
    }

    /// A batch number not given before, to hand completions in under.
    pub fn new_batch(&self) -> u64 {
        self.batches.fetch_add(1, Ordering::Relaxed)
    }

    /// Hands in a completion of `batch` (`id` names it in [`RewardPool::wait`]'s
    /// answer) to task number `task`; a worker judges it while the caller goes on.
    pub fn submit(&self, batch: u64, id: usize, task: usize, completion: String) {
        let mut done = self.done.lock().expect("pool lock");
        if let Some(jobs) = &self.jobs {
            if jobs
                .send(Job {
                    batch,
                    id,
                    task,
                    completion,
                })
                .is_ok()
            {
                *done.pending.entry(batch).or_default() += 1;
            }
        }
    }

    /// The rewards of every completion of `batch` handed in since the last call, by id;
    /// other batches' go on being judged.
    pub fn wait(&self, batch: u64) -> Result<Vec<(usize, Rewarded)>> {
        let mut done = self.done.lock().expect("pool lock");
        while done.pending.get(&batch).copied().unwrap_or(0) > 0 {
            let (b, id, scored) = done
                .results
                .recv()
                .map_err(|_| TaskError::Input("the reward workers stopped".into()))?;
            *done.pending.get_mut(&b).expect("a batch handed in") -= 1;
            done.arrived.entry(b).or_default().push((id, scored));
        }
        done.pending.remove(&batch);
        let mut out = Vec::new();
        for (id, scored) in done.arrived.remove(&batch).unwrap_or_default() {
            out.push((id, scored?));
        }
        Ok(out)
    }

    /// Programs judged so far (distinct ones).
    pub fn cached_programs(&self) -> usize {
        self.cache.lock().map_or(0, |c| c.len())
    }
}

impl Drop for RewardPool {
    fn drop(&mut self) {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// The reward of a completion: the answer cut where its function ends, spliced into the
/// task's program and judged (or the verdict of the same program before).
fn score(judge: &Judge, cache: &Cache, check: &Check, completion: &str) -> Result<Rewarded> {
    let answer = cut_answer(completion);
    let program = splice(check, &answer);
    let mut key = xxhash_rust::xxh3::Xxh3::new();
    key.update(program.as_bytes());
    for (name, text) in &check.support {
        key.update(&[0]);
        key.update(name.as_bytes());
        key.update(&[0]);
        key.update(text.as_bytes());
    }
    let key = key.digest128();
    let known = cache.lock().ok().and_then(|c| c.get(&key).cloned());
    let cached = known.is_some();
    let judged = match known {
        Some(j) => j,
        None => {
            let j = judge_program(judge, check, &program)?;
            if let Ok(mut c) = cache.lock() {
                c.insert(key, j.clone());
            }
            j
        }
    };
    Ok(Rewarded {
        reward: reward(&answer, &judged),
        reasoning: answer.contains("/* REASONING:"),
        judged,
        cached,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judged(compiled: bool, warnings: usize, passed: bool) -> Judged {
        Judged {
            compiled,
            warnings,
            passed,
            failure: None,
            detector: None,
        }
    }

    #[test]
    fn the_parts_sum_to_the_seeds_reward() {
        for (answer, j) in [
            ("int f() {}", judged(false, 0, false)),
            ("int f() { return 1; }", judged(true, 2, false)),
            ("int f() { return 1; }", judged(true, 0, true)),
            (
                "/* REASONING: x */\nint f() { return 1; }",
                judged(true, 0, true),
            ),
            ("/* REASONING: x */\nint f() {", judged(false, 0, false)),
        ] {
            let r = Rewarded {
                reward: reward(answer, &j),
                reasoning: answer.contains("/* REASONING:"),
                judged: j,
                cached: false,
            };
            let sum: f64 = r.parts().iter().map(|(_, v)| v).sum();
            assert_eq!(sum, r.reward, "{answer}");
        }
    }

    fn add_task() -> Task {
        let buggy_fn = "int add(int a, int b) { return a - b; }";
        let program = |f: &str| {
            format!("#include <cstdio>\n{f}\nint main() {{ std::printf(\"%d\\n\", add(2, 3)); }}\n")
        };
        let buggy = program(buggy_fn);
        let start = buggy.find(buggy_fn).unwrap();
        let task = serde_json::json!({
            "id": "add", "kind": "injected_bug", "input": "Fix add.", "output": "",
            "project": "p", "split": "train",
            "provenance": {"source": "s", "path": "add.cpp", "change": "c"},
            "check": {
                "flags": [], "support": {}, "fixed": program("int add(int a, int b) { return a + b; }"),
                "buggy": buggy, "span": [start, start + buggy_fn.len()],
                "oracle": {"stdout": "5\n", "exit_code": 0},
                "failure": {"kind": "wrong-output", "detector": "oracle", "signal": null,
                    "location": null, "line": null, "function": null, "message": "",
                    "values": [], "stack": [], "exit_code": 0, "expected": "5", "printed": "-1"},
                "verified_by": "standalone"
            }
        });
        serde_json::from_value(task).unwrap()
    }

    #[test]
    fn the_pool_judges_answers_in_the_sandbox_and_caches_programs() {
        let pool = RewardPool::new(Arc::new(vec![add_task()]), 2).unwrap();
        let answers = [
            "int add(int a, int b) { return a + b; }",
            "/* REASONING: the sign */\nint add(int a, int b) { return a + b; }\nint junk",
            "int add(int a, int b) { return a - b; }",
            "int add(int a, int b) { int unused; return a + b; }",
            "int add(int a, int b) { return a + ; }",
            "int add(int a, int b) { return a + b; }",
        ];
        // Two batches in flight: the second is waited for first, and each gets its own.
        for (i, a) in answers.iter().enumerate() {
            pool.submit(u64::from(i >= 4), i, 0, a.to_string());
        }
        let later = pool.wait(1).unwrap();
        assert_eq!(later.len(), 2);
        let mut got = pool.wait(0).unwrap();
        assert!(pool.wait(0).unwrap().is_empty());
        got.extend(later);
        got.sort_by_key(|(i, _)| *i);
        let rewards: Vec<f64> = got.iter().map(|(_, r)| r.reward).collect();
        assert_eq!(rewards, [6.5, 7.0, 1.5, 6.0, -1.0, 6.5], "{got:?}");
        assert_eq!(got[2].1.judged.failure.as_deref(), Some("wrong-output"));
        assert!(got[3].1.judged.warnings > 0);
        // The first, second and last answers make the same program (the reasoning is no
        // part of it): judged at most twice by the two workers, the last one cached.
        assert_eq!(pool.cached_programs(), 4);
        assert!(got[5].1.cached);
    }

    /// RL gives a batch up mid-sampling when a stop is asked for: its completions handed
    /// in so far are never waited for. The next batch still gets its own verdicts alone,
    /// and dropping the pool returns once the workers have judged what was queued.
    #[test]
    fn a_batch_given_up_leaves_the_next_its_own_and_the_pool_still_shuts_down() {
        let pool = RewardPool::new(Arc::new(vec![add_task()]), 1).unwrap();
        let given_up = pool.new_batch();
        for i in 0..3 {
            let wrong = format!("int add(int a, int b) {{ return a - b + {i}; }}");
            pool.submit(given_up, i, 0, wrong);
        }
        let next = pool.new_batch();
        pool.submit(next, 7, 0, "int add(int a, int b) { return a + b; }".into());
        let got = pool.wait(next).unwrap();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0, 7);
        assert!(got[0].1.judged.passed, "{got:?}");
        drop(pool);
    }
}
