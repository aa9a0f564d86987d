//! `tasks bugs`: runnable programs found in a corpus, bugs injected into them, each
//! mutant kept only when its behaviour verifiably changes, and written as tasks.
//!
//! Work is split into chunks of candidates per package; a chunk's tasks are written to
//! `part-PPPP-CCCCC.jsonl.zst` (temporary name, then renamed) and its counts to
//! `stats/part-PPPP-CCCCC.json` after that: a chunk whose counts exist is done. A killed
//! run, rerun with the same command, redoes only unfinished chunks and ends with the
//! files an uninterrupted run writes.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::judge::{Judge, Workdir, FLAGS};
use crate::mutate::{self, Operator, Site};
use crate::program::{for_each_package, system_include_dirs, FindLimits, Finder, Program};
use crate::report::{Failure, Oracle};
use crate::task::{function_span, injected_bug_text, split_of, Check, Provenance, Task};
use crate::{Result, TaskError};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BugSettings {
    pub inputs: Vec<String>,
    /// Schema sites per operator per program, and in all.
    pub per_operator: usize,
    pub per_program: usize,
    /// Mutants that need a build of their own, per program.
    pub standalone: usize,
    /// Candidates per package (0: all), taken in path order.
    pub max_candidates: usize,
    pub chunk: usize,
    pub max_program_bytes: usize,
    pub test_projects: Vec<String>,
    pub test_percent: u64,
}

impl Default for BugSettings {
    fn default() -> Self {
        BugSettings {
            inputs: Vec::new(),
            per_operator: 8,
            per_program: 64,
            standalone: 2,
            max_candidates: 0,
            chunk: 8,
            max_program_bytes: FindLimits::default().max_program_bytes,
            test_projects: Vec::new(),
            test_percent: 10,
        }
    }
}

/// Counts of one chunk, or merged over many.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BugStats {
    pub candidates: u64,
    /// Candidates that did not become programs with an oracle, by reason.
    pub rejected: BTreeMap<String, u64>,
    pub programs: u64,
    pub sites: BTreeMap<String, u64>,
    pub tried: BTreeMap<String, u64>,
    pub verified: BTreeMap<String, u64>,
    /// Mutants tried and not kept, by reason.
    pub not_kept: BTreeMap<String, u64>,
    /// Verified mutants by what showed the failure.
    pub failures: BTreeMap<String, u64>,
    pub splits: BTreeMap<String, u64>,
    pub builds: u64,
    pub runs: u64,
    /// Time in g++, and in all the work on programs (summed over threads).
    pub gxx_seconds: f64,
    pub busy_seconds: f64,
    /// Wall time of the chunks.
    pub wall_seconds: f64,
}

fn bump(map: &mut BTreeMap<String, u64>, key: &str, n: u64) {
    *map.entry(key.to_string()).or_default() += n;
}

impl BugStats {
    pub fn merge(&mut self, o: &BugStats) {
        self.candidates += o.candidates;
        self.programs += o.programs;
        self.builds += o.builds;
        self.runs += o.runs;
        self.gxx_seconds += o.gxx_seconds;
        self.busy_seconds += o.busy_seconds;
        self.wall_seconds += o.wall_seconds;
        for (mine, theirs) in [
            (&mut self.rejected, &o.rejected),
            (&mut self.sites, &o.sites),
            (&mut self.tried, &o.tried),
            (&mut self.verified, &o.verified),
            (&mut self.not_kept, &o.not_kept),
            (&mut self.failures, &o.failures),
            (&mut self.splits, &o.splits),
        ] {
            for (k, v) in theirs {
                bump(mine, k, *v);
            }
        }
    }

    pub fn tasks(&self) -> u64 {
        self.verified.values().sum()
    }
}

struct Verified {
    site: Site,
    failure: Failure,
    by: &'static str,
}

/// Builds the schema of `program` with `chosen` sites, dropping the sites g++ blames
/// (up to three rounds). Returns the build directory and the sites it holds, or why the
/// program does not build.
fn build_schema<'s>(
    judge: &Judge,
    program: &Program,
    mut chosen: Vec<&'s Site>,
    stats: &mut BugStats,
) -> Result<std::result::Result<(Workdir, Vec<&'s Site>), String>> {
    for round in 0..4 {
        let (source, ranges) = mutate::schema(&program.text, &chosen);
        let work = Workdir::new(&source, &program.support, true)?;
        let build = judge.build(&work, true)?;
        stats.builds += 1;
        stats.gxx_seconds += build.seconds;
        if build.ok {
            return Ok(Ok((work, chosen)));
        }
        let line_starts: Vec<usize> = std::iter::once(0)
            .chain(source.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        let line_of = |offset: usize| line_starts.partition_point(|&s| s <= offset);
        // A site is blamed when g++ points inside one of its edits; a position on a
        // line with edits but in none of them blames every site on that line.
        let mut blamed = vec![false; chosen.len()];
        for &(line, col) in &build.main_positions {
            let Some(&start) = line_starts.get(line.wrapping_sub(1)) else {
                continue;
            };
            let offset = start + col.saturating_sub(1);
            let inside: Vec<usize> = (0..chosen.len())
                .filter(|&k| ranges[k].iter().any(|&(a, b)| a <= offset && offset <= b))
                .collect();
            if inside.is_empty() {
                for k in 0..chosen.len() {
                    if ranges[k].iter().any(|&(a, _)| line_of(a) == line) {
                        blamed[k] = true;
                    }
                }
            } else {
                for k in inside {
                    blamed[k] = true;
                }
            }
        }
        let on_plain_lines = build
            .error_lines
            .iter()
            .any(|&l| !ranges.iter().flatten().any(|&(a, _)| line_of(a) == l));
        if round == 3 || !blamed.contains(&true) || (round == 0 && on_plain_lines) {
            return Ok(Err(build.first_error.unwrap_or_default()));
        }
        for (site, _) in chosen.iter().zip(&blamed).filter(|(_, b)| **b) {
            bump(
                &mut stats.not_kept,
                &format!("{}: does_not_compile", site.operator.name()),
                1,
            );
        }
        let mut keep = blamed.iter().map(|b| !b);
        chosen.retain(|_| keep.next().unwrap_or(true));
        if chosen.is_empty() {
            return Ok(Err("every mutant broke the build".into()));
        }
    }
    Ok(Err("the build failed".into()))
}

/// Finds, checks and keeps the mutants of one program.
fn mutate_program(
    judge: &Judge,
    program: &Program,
    settings: &BugSettings,
    stats: &mut BugStats,
) -> Result<(Option<Oracle>, Vec<Verified>)> {
    let sites = mutate::sites(&program.text);
    for s in &sites {
        bump(&mut stats.sites, s.operator.name(), 1);
    }
    let ready: Vec<Site> = sites.iter().filter(|s| s.schema_ready()).cloned().collect();
    let chosen = mutate::choose(&ready, settings.per_operator, settings.per_program);
    if chosen.is_empty() {
        bump(&mut stats.rejected, "no_mutation_site", 1);
        return Ok((None, Vec::new()));
    }
    let (work, chosen) = match build_schema(judge, program, chosen, stats)? {
        Ok(built) => built,
        Err(_) => {
            bump(&mut stats.rejected, "does_not_compile", 1);
            return Ok((None, Vec::new()));
        }
    };
    let oracle = judge.oracle(&work)?;
    stats.runs += 2;
    let oracle = match oracle {
        Ok((oracle, _)) => oracle,
        Err(reason) => {
            bump(&mut stats.rejected, reason, 1);
            return Ok((None, Vec::new()));
        }
    };
    stats.programs += 1;
    let own = |f: &str| f == "main.cpp" || program.support.contains_key(f);
    let mut kept = Vec::new();
    for (k, site) in chosen.iter().enumerate() {
        bump(&mut stats.tried, site.operator.name(), 1);
        stats.runs += 1;
        let Some(failure) = judge.judge(&work, k + 1, &oracle, &own)? else {
            bump(
                &mut stats.not_kept,
                &format!("{}: no_change", site.operator.name()),
                1,
            );
            continue;
        };
        stats.runs += 1;
        if judge.judge(&work, k + 1, &oracle, &own)?.as_ref() != Some(&failure) {
            bump(
                &mut stats.not_kept,
                &format!("{}: unstable", site.operator.name()),
                1,
            );
            continue;
        }
        kept.push(Verified {
            site: (*site).clone(),
            failure,
            by: "schema",
        });
    }
    // Mutants a schema cannot hold: a build each.
    for site in sites
        .iter()
        .filter(|s| !s.schema_ready())
        .take(settings.standalone)
    {
        bump(&mut stats.tried, site.operator.name(), 1);
        let work = Workdir::new(
            &mutate::mutant(&program.text, site),
            &program.support,
            false,
        )?;
        let build = judge.build(&work, false)?;
        stats.builds += 1;
        stats.gxx_seconds += build.seconds;
        if !build.ok {
            bump(
                &mut stats.not_kept,
                &format!("{}: does_not_compile", site.operator.name()),
                1,
            );
            continue;
        }
        stats.runs += 2;
        let Some(failure) = judge.judge(&work, 0, &oracle, &own)? else {
            bump(
                &mut stats.not_kept,
                &format!("{}: no_change", site.operator.name()),
                1,
            );
            continue;
        };
        if judge.judge(&work, 0, &oracle, &own)?.as_ref() != Some(&failure) {
            bump(
                &mut stats.not_kept,
                &format!("{}: unstable", site.operator.name()),
                1,
            );
            continue;
        }
        kept.push(Verified {
            site: site.clone(),
            failure,
            by: "standalone",
        });
    }
    Ok((Some(oracle), kept))
}

fn task_of(
    program: &Program,
    oracle: &Oracle,
    v: &Verified,
    n: usize,
    settings: &BugSettings,
) -> Option<Task> {
    let buggy = mutate::mutant(&program.text, &v.site);
    let at = v.site.edits.iter().map(|e| e.start).min()?;
    let span = function_span(&buggy, at)?;
    let (fs, fe) = function_span(&program.text, at)?;
    let (input, output) = injected_bug_text(&v.site, &v.failure, &buggy, &program.text[fs..fe]);
    let split = split_of(
        &program.project,
        &settings.test_projects,
        settings.test_percent,
    );
    Some(Task {
        id: format!(
            "{}/{}#{}@{}.{n}",
            program.project,
            program.path,
            v.site.operator.name(),
            v.site.line
        ),
        kind: "injected_bug".into(),
        input,
        output,
        project: program.project.clone(),
        split: split.into(),
        provenance: Provenance {
            source: program.source.clone(),
            path: program.path.clone(),
            commit: None,
            operator: Some(v.site.operator),
            line: Some(v.site.line),
            change: v.site.change.clone(),
        },
        check: Some(Check {
            flags: FLAGS.iter().map(|s| s.to_string()).collect(),
            support: program.support.clone(),
            fixed: program.text.clone(),
            buggy,
            span,
            oracle: oracle.clone(),
            failure: v.failure.clone(),
            verified_by: v.by.into(),
        }),
    })
}

/// One candidate from its path to its tasks.
fn candidate(
    judge: &Judge,
    finder: &Finder,
    path: &str,
    settings: &BugSettings,
) -> Result<(Vec<Task>, BugStats)> {
    let started = Instant::now();
    let mut stats = BugStats {
        candidates: 1,
        ..Default::default()
    };
    let mut tasks = Vec::new();
    match finder.program(path) {
        Err(r) => bump(&mut stats.rejected, r.reason(), 1),
        Ok(program) => {
            let (oracle, kept) = mutate_program(judge, &program, settings, &mut stats)?;
            if let Some(oracle) = oracle {
                for (n, v) in kept.iter().enumerate() {
                    match task_of(&program, &oracle, v, n, settings) {
                        Some(t) => {
                            bump(&mut stats.verified, v.site.operator.name(), 1);
                            bump(&mut stats.failures, &v.failure.kind, 1);
                            bump(&mut stats.splits, &t.split, 1);
                            tasks.push(t);
                        }
                        None => bump(
                            &mut stats.not_kept,
                            &format!("{}: no_function", v.site.operator.name()),
                            1,
                        ),
                    }
                }
            }
        }
    }
    stats.busy_seconds = started.elapsed().as_secs_f64();
    Ok((tasks, stats))
}

pub struct BugRun {
    pub out: PathBuf,
    pub settings: BugSettings,
}

impl BugRun {
    fn part(&self, package: usize, chunk: usize) -> PathBuf {
        self.out
            .join(format!("part-{package:04}-{chunk:05}.jsonl.zst"))
    }

    fn part_stats(&self, package: usize, chunk: usize) -> PathBuf {
        self.out
            .join("stats")
            .join(format!("part-{package:04}-{chunk:05}.json"))
    }

    /// Refuses an output directory written with other settings.
    fn claim(&self) -> Result<()> {
        std::fs::create_dir_all(self.out.join("stats")).map_err(|e| TaskError::io(&self.out, e))?;
        let path = self.out.join("settings.json");
        let mine = serde_json::to_string_pretty(&self.settings).map_err(TaskError::json)?;
        match std::fs::read_to_string(&path) {
            Ok(theirs) if theirs != mine => Err(TaskError::Resume(format!(
                "{} was written with other settings ({}); use another output directory",
                self.out.display(),
                path.display()
            ))),
            Ok(_) => Ok(()),
            Err(_) => Ok(cxxlm_data::shard::write_atomic(&path, mine.as_bytes())?),
        }
    }

    /// Runs every unfinished chunk; `progress` hears each finished chunk's counts.
    pub fn run(
        &self,
        threads: usize,
        stop: &std::sync::atomic::AtomicBool,
        progress: &mut dyn FnMut(&str, &BugStats),
    ) -> Result<BugStats> {
        self.claim()?;
        let judge = Judge::new()?;
        let system = system_include_dirs();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .build()
            .map_err(|e| TaskError::Input(e.to_string()))?;
        let limits = FindLimits {
            max_program_bytes: self.settings.max_program_bytes,
            ..Default::default()
        };
        for_each_package(
            &self.settings.inputs,
            limits.max_support_bytes,
            &mut |index, package| {
                let finder = Finder::new(&package, &system, limits.clone());
                let mut candidates = finder.candidates();
                if self.settings.max_candidates > 0 {
                    candidates.truncate(self.settings.max_candidates);
                }
                for (c, chunk) in candidates.chunks(self.settings.chunk.max(1)).enumerate() {
                    if self.part_stats(index, c).exists() {
                        continue;
                    }
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return Err(TaskError::Interrupted);
                    }
                    let started = Instant::now();
                    let results: Vec<Result<(Vec<Task>, BugStats)>> = pool.install(|| {
                        chunk
                            .par_iter()
                            .map(|path| candidate(&judge, &finder, path, &self.settings))
                            .collect()
                    });
                    let mut stats = BugStats::default();
                    let mut writer = cxxlm_data::shard::ShardWriter::create(self.part(index, c), 3)
                        .map_err(|e| TaskError::Input(e.to_string()))?;
                    for r in results {
                        let (tasks, s) = r?;
                        stats.merge(&s);
                        for t in &tasks {
                            writer
                                .write_line(&serde_json::to_string(t).map_err(TaskError::json)?)
                                .map_err(|e| TaskError::Input(e.to_string()))?;
                        }
                    }
                    writer
                        .finish()
                        .map_err(|e| TaskError::Input(e.to_string()))?;
                    stats.wall_seconds = started.elapsed().as_secs_f64();
                    let json = serde_json::to_vec_pretty(&stats).map_err(TaskError::json)?;
                    cxxlm_data::shard::write_atomic(&self.part_stats(index, c), &json)?;
                    progress(&package.project, &stats);
                }
                Ok(())
            },
        )?;
        self.merged_stats()
    }

    /// The counts of every finished chunk, merged, also written to `stats.json`.
    pub fn merged_stats(&self) -> Result<BugStats> {
        let dir = self.out.join("stats");
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| TaskError::io(&dir, e))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        paths.sort();
        let mut total = BugStats::default();
        for p in paths {
            let text = std::fs::read_to_string(&p).map_err(|e| TaskError::io(&p, e))?;
            let s: BugStats = serde_json::from_str(&text).map_err(|e| TaskError::Format {
                path: p.clone(),
                line: e.line(),
                message: e.to_string(),
            })?;
            total.merge(&s);
        }
        let json = serde_json::to_vec_pretty(&total).map_err(TaskError::json)?;
        cxxlm_data::shard::write_atomic(&self.out.join("stats.json"), &json)?;
        Ok(total)
    }
}

/// What re-running a task's two versions, each built on its own, showed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Reverified {
    pub id: String,
    pub operator: Option<Operator>,
    /// The fix builds, runs clean and prints the oracle's output.
    pub fixed_matches_oracle: bool,
    /// The bug builds and its run differs from the oracle.
    pub buggy_fails: bool,
    /// ... in the way the task records.
    pub same_failure_kind: bool,
    /// The task's `output` (what a model learns to answer), spliced into the bug as an
    /// answer is, passes.
    pub output_passes: bool,
}

/// Builds the fixed and the buggy file of `task` on their own and runs both, and judges
/// the task's own `output` as an answer.
pub fn reverify(judge: &Judge, task: &Task) -> Result<Reverified> {
    let check = task
        .check
        .as_ref()
        .ok_or_else(|| TaskError::Input(format!("task {} has no check", task.id)))?;
    let fixed = score(judge, check, &check.fixed, false)?;
    let buggy = score(judge, check, &check.buggy, false)?;
    let output = score(judge, check, &task.output, true)?;
    // A function-body task's stub need only fail, in any way (it may not even build);
    // its recorded failure is the bug's it was made from.
    let body = task.kind == crate::bodies::KIND;
    Ok(Reverified {
        id: task.id.clone(),
        operator: task.provenance.operator,
        fixed_matches_oracle: fixed.passed,
        buggy_fails: (buggy.compiled || body) && !buggy.passed,
        same_failure_kind: body || buggy.failure.as_deref() == Some(check.failure.kind.as_str()),
        output_passes: output.passed,
    })
}

/// A judged answer to a task.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Verdict {
    pub compiled: bool,
    /// Ran clean with the oracle's output.
    pub passed: bool,
    /// The failure kind when it compiled and did not pass.
    pub failure: Option<String>,
}

/// Builds `main` (a whole `main.cpp`) with the task's headers and judges its run
/// against the oracle. `splice_answer`: `main` is an answer to splice into the bug.
pub fn score(judge: &Judge, check: &Check, main: &str, splice_answer: bool) -> Result<Verdict> {
    let program = if splice_answer {
        crate::task::splice(check, main)
    } else {
        main.to_string()
    };
    let work = Workdir::new(&program, &check.support, false)?;
    let build = judge.build(&work, false)?;
    if !build.ok {
        return Ok(Verdict {
            compiled: false,
            passed: false,
            failure: Some("does_not_compile".into()),
        });
    }
    let own = |f: &str| f == "main.cpp" || check.support.contains_key(f);
    let failure = judge.judge(&work, 0, &check.oracle, &own)?;
    Ok(Verdict {
        compiled: true,
        passed: failure.is_none(),
        failure: failure.map(|f| f.kind),
    })
}

/// The runnable tasks (those with a check) of `split`, at most `limit` of them, spread
/// evenly over it.
pub fn runnable(tasks: Vec<Task>, split: &str, limit: Option<usize>) -> Vec<Task> {
    let tasks: Vec<Task> = tasks
        .into_iter()
        .filter(|t| t.split == split && t.check.is_some())
        .collect();
    match limit.filter(|&n| n < tasks.len()) {
        Some(n) => (0..n).map(|i| tasks[i * tasks.len() / n].clone()).collect(),
        None => tasks,
    }
}

/// Reads the tasks of `tasks bugs`/`tasks mine` outputs (directories of parts, or files).
pub fn read_tasks(paths: &[PathBuf]) -> Result<Vec<Task>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut parts: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| TaskError::io(p, e))?
                .flatten()
                .map(|e| e.path())
                .filter(|f| {
                    let n = f
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    n.ends_with(".jsonl.zst") || n.ends_with(".jsonl")
                })
                .collect();
            parts.sort();
            files.extend(parts);
        } else {
            files.push(p.clone());
        }
    }
    let mut tasks = Vec::new();
    for f in files {
        let text = read_text(&f)?;
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let t: Task = serde_json::from_str(line).map_err(|e| TaskError::Format {
                path: f.clone(),
                line: i + 1,
                message: e.to_string(),
            })?;
            tasks.push(t);
        }
    }
    Ok(tasks)
}

pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| TaskError::io(path, e))?;
    let bytes = if path.extension().is_some_and(|e| e == "zst") {
        zstd::decode_all(&bytes[..]).map_err(|e| TaskError::io(path, e))?
    } else {
        bytes
    };
    String::from_utf8(bytes).map_err(|_| TaskError::Format {
        path: path.to_path_buf(),
        line: 0,
        message: "not UTF-8".into(),
    })
}
