//! Builds and runs programs in the sandbox with AddressSanitizer and
//! UndefinedBehaviorSanitizer (and libstdc++'s assertions), one build directory per
//! program: `main.cpp`, the headers it carries, and for a mutant schema the switch header.

use cxxlm_eval::{Limits, Outcome, Sandbox};
use regex::Regex;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::mutate::SCHEMA_HEADER;
use crate::report::{classify, Failure, Oracle};
use crate::{Result, TaskError};

/// The flags every task is built with (recorded in each task).
pub const FLAGS: [&str; 10] = [
    "-std=c++20",
    "-O0",
    "-g1",
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
    "-D_GLIBCXX_ASSERTIONS",
    "-w",
    "-Iinclude",
    "-pthread",
];

/// The sanitizers' run-time options. Leak checking is off: LeakSanitizer needs ptrace,
/// which a sandbox may deny, and a leak alone changes no behaviour a task checks.
const ASAN_OPTIONS: &str =
    "ASAN_OPTIONS=detect_leaks=0:hard_rss_limit_mb=1024:allocator_may_return_null=1:detect_stack_use_after_return=0";
const UBSAN_OPTIONS: &str = "UBSAN_OPTIONS=print_stacktrace=1";

pub struct Judge {
    compile: Sandbox,
    /// Originals get longer than mutants, which are cut at a few times an original's
    /// longest run.
    original: Sandbox,
    mutant: Sandbox,
    /// Longest run of an original program kept.
    pub slow: Duration,
}

#[derive(Debug, Clone)]
pub struct Build {
    pub ok: bool,
    /// Lines and columns (bytes, 1-based) of `main.cpp` that g++'s errors and their
    /// notes point at.
    pub main_positions: BTreeSet<(usize, usize)>,
    /// Lines of `main.cpp` with an `error:` of their own.
    pub error_lines: BTreeSet<usize>,
    pub first_error: Option<String>,
    /// g++'s warnings (none are reported unless asked for, [`Judge::build_warning`]).
    pub warnings: usize,
    pub seconds: f64,
}

/// A build directory holding a program's files.
pub struct Workdir {
    dir: tempfile::TempDir,
}

impl Workdir {
    pub fn new(main: &str, support: &BTreeMap<String, String>, schema: bool) -> Result<Self> {
        let dir = tempfile::tempdir().map_err(|e| TaskError::io("temporary directory", e))?;
        let write = |rel: &str, text: &str| -> Result<()> {
            let path = dir.path().join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| TaskError::io(parent, e))?;
            }
            std::fs::write(&path, text).map_err(|e| TaskError::io(&path, e))
        };
        for (rel, text) in support {
            write(rel, text)?;
        }
        write("main.cpp", main)?;
        if schema {
            write("cxxlm_schema.h", SCHEMA_HEADER)?;
        }
        std::fs::create_dir_all(dir.path().join("include"))
            .map_err(|e| TaskError::io(dir.path(), e))?;
        // The sandbox writes only into files that exist: the program's is made here.
        let prog = dir.path().join("prog");
        std::fs::File::create(&prog).map_err(|e| TaskError::io(&prog, e))?;
        std::fs::set_permissions(&prog, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(|e| TaskError::io(&prog, e))?;
        Ok(Workdir { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

fn main_lines(stderr: &str) -> (BTreeSet<(usize, usize)>, BTreeSet<usize>) {
    static AT: OnceLock<Regex> = OnceLock::new();
    let at = AT.get_or_init(|| Regex::new(r"main\.cpp:(\d+):(\d+):( error:)?").expect("valid"));
    let mut all = BTreeSet::new();
    let mut errors = BTreeSet::new();
    for c in at.captures_iter(stderr) {
        if let (Ok(line), Ok(col)) = (c[1].parse::<usize>(), c[2].parse::<usize>()) {
            all.insert((line, col));
            if c.get(3).is_some() {
                errors.insert(line);
            }
        }
    }
    (all, errors)
}

/// How much lower than the judging process programs are built and run.
const JUDGED_NICE: u8 = 10;

impl Judge {
    pub fn new() -> Result<Self> {
        // Judging yields the CPU: an RL step samples on the same machine while its
        // completions are judged, and the sampler's host thread is on its critical path.
        let compile = Sandbox::new(Limits {
            cpu_seconds: 60,
            wall: Duration::from_secs(120),
            memory_bytes: 4 << 30,
            nice: JUDGED_NICE,
            ..Limits::default()
        })
        .map_err(TaskError::Eval)?;
        // The sanitizers reserve terabytes of address space: memory is bounded by
        // ASan's own RSS limit instead of RLIMIT_AS.
        let run = |seconds: u64| {
            Sandbox::new(Limits {
                cpu_seconds: seconds,
                wall: Duration::from_secs(seconds),
                memory_bytes: u64::MAX,
                processes: 16,
                file_bytes: 16 << 20,
                output_bytes: 256 << 10,
                nice: JUDGED_NICE,
                ..Limits::default()
            })
            .map_err(TaskError::Eval)
        };
        Ok(Judge {
            compile,
            original: run(5)?,
            mutant: run(3)?,
            slow: Duration::from_secs(1),
        })
    }

    /// `g++ FLAGS [-include cxxlm_schema.h] main.cpp -o prog` in the sandbox.
    pub fn build(&self, work: &Workdir, schema: bool) -> Result<Build> {
        self.build_with(work, schema, &FLAGS)
    }

    /// [`Judge::build`] with `-Wall` in place of `-w`: the build's warnings counted.
    pub fn build_warning(&self, work: &Workdir) -> Result<Build> {
        let flags: Vec<&str> = FLAGS
            .iter()
            .map(|&f| if f == "-w" { "-Wall" } else { f })
            .collect();
        self.build_with(work, false, &flags)
    }

    fn build_with(&self, work: &Workdir, schema: bool, flags: &[&str]) -> Result<Build> {
        let mut argv: Vec<&str> = vec!["/usr/bin/g++"];
        argv.extend(flags);
        if schema {
            argv.extend(["-include", "cxxlm_schema.h"]);
        }
        argv.extend(["-fdiagnostics-column-unit=byte", "main.cpp", "-o", "prog"]);
        let started = Instant::now();
        let out = self
            .compile
            .run(work.path(), &argv, b"")
            .map_err(TaskError::Eval)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let (main_positions, error_lines) = main_lines(&stderr);
        let first_error = stderr.lines().find(|l| l.contains("error:")).map(|l| {
            l.split_once("error: ")
                .map_or(l, |(_, m)| m)
                .chars()
                .take(300)
                .collect()
        });
        Ok(Build {
            ok: out.success(),
            main_positions,
            error_lines,
            first_error,
            warnings: stderr.lines().filter(|l| l.contains(" warning: ")).count(),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Runs the built program; `selector` picks a site of a schema build (0: none);
    /// a mutant gets the mutants' shorter time limit.
    pub fn run(&self, work: &Workdir, selector: usize, mutant: bool) -> Result<Outcome> {
        let selector = format!("CXXLM_MUTANT={selector}");
        let argv = [
            "/usr/bin/env",
            ASAN_OPTIONS,
            UBSAN_OPTIONS,
            &selector,
            "/work/prog",
        ];
        let sandbox = if mutant { &self.mutant } else { &self.original };
        sandbox
            .run(work.path(), &argv, b"")
            .map_err(TaskError::Eval)
    }

    /// The oracle of a built program: two runs that exit 0, print the same and report
    /// nothing; otherwise why not.
    pub fn oracle(
        &self,
        work: &Workdir,
    ) -> Result<std::result::Result<(Oracle, Duration), &'static str>> {
        let first = self.run(work, 0, false)?;
        let why = |o: &Outcome| -> Option<&'static str> {
            let stderr = String::from_utf8_lossy(&o.stderr);
            if o.ending != cxxlm_eval::Ending::Exited {
                Some(match o.ending {
                    cxxlm_eval::Ending::WallTime | cxxlm_eval::Ending::CpuTime => "timeout",
                    cxxlm_eval::Ending::Output => "output_limit",
                    cxxlm_eval::Ending::Memory => "memory",
                    _ => "crash",
                })
            } else if stderr.contains("Sanitizer") || stderr.contains("runtime error:") {
                Some("sanitizer_fires")
            } else if o.code != Some(0) {
                Some("nonzero_exit")
            } else if o.wall > self.slow {
                Some("slow")
            } else {
                None
            }
        };
        if let Some(reason) = why(&first) {
            return Ok(Err(reason));
        }
        let second = self.run(work, 0, false)?;
        if why(&second).is_some() || second.stdout != first.stdout {
            return Ok(Err("nondeterministic"));
        }
        Ok(Ok((
            Oracle {
                stdout: String::from_utf8_lossy(&first.stdout).into_owned(),
                exit_code: 0,
            },
            first.wall.max(second.wall),
        )))
    }

    /// How a run differs from the oracle (`None`: it does not).
    pub fn judge(
        &self,
        work: &Workdir,
        selector: usize,
        oracle: &Oracle,
        own: &dyn Fn(&str) -> bool,
    ) -> Result<Option<Failure>> {
        let outcome = self.run(work, selector, true)?;
        Ok(classify(&outcome, oracle, own))
    }
}
