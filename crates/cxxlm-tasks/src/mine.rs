//! `tasks mine`: bug fixes from a git repository's history, reduced to function-level
//! before/after pairs. A commit is taken when its message says it fixes something
//! (CommitPack-style patterns); each C/C++ file it changes is read before and after, the
//! functions whose bodies changed are paired by their heads, and a pair is kept when
//! both sides are functions the function finder sees and the change is small. The
//! commit's subject becomes the task line and its message the reasoning.

use regex::Regex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use crate::task::{split_of, Provenance, Task};
use crate::{Result, TaskError};
use cxxlm_eval::functions::{code_only, function_bodies};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MineSettings {
    /// Case-insensitive pattern a commit message must match.
    pub pattern: String,
    /// Commits changing more C/C++ files than this are skipped (refactorings).
    pub max_files: usize,
    /// Commits adding and removing more lines than this are skipped.
    pub max_diff_lines: usize,
    /// A kept function changed in at most this many lines...
    pub max_changed_lines: usize,
    /// ...and has at most this many lines.
    pub max_function_lines: usize,
    /// Files larger than this are not read.
    pub max_file_bytes: usize,
    pub test_projects: Vec<String>,
    pub test_percent: u64,
}

impl Default for MineSettings {
    fn default() -> Self {
        MineSettings {
            pattern: r"\b(fix(e[sd]|ing)?|bug(fix)?|patch(ed)?|repair(ed)?|resolve[sd]?|correct(s|ed|ly)?|crash(es)?|leak(s)?|overflow(s)?|segfault|use[- ]after[- ]free|off[- ]by[- ]one|uninitiali[sz]ed|typo|wrong|incorrect|regression)\b".into(),
            max_files: 4,
            max_diff_lines: 200,
            max_changed_lines: 20,
            max_function_lines: 120,
            max_file_bytes: 500_000,
            test_projects: Vec::new(),
            test_percent: 10,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MineStats {
    pub commits: u64,
    pub fix_messages: u64,
    pub with_cxx_changes: u64,
    /// Commits or files left out, by reason.
    pub skipped: BTreeMap<String, u64>,
    pub files_read: u64,
    pub pairs: u64,
    /// Commits that gave at least one pair.
    pub commits_with_pairs: u64,
    pub seconds: f64,
}

const CXX_EXTENSIONS: [&str; 12] = [
    "c", "cc", "cpp", "cxx", "c++", "h", "hh", "hpp", "hxx", "inl", "ipp", "tcc",
];

fn is_cxx(path: &str) -> bool {
    path.rsplit_once('.')
        .is_some_and(|(_, e)| CXX_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn git(repo: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .output()
        .map_err(|e| TaskError::Git(format!("running git in {}: {e}", repo.display())))?;
    if !out.status.success() {
        return Err(TaskError::Git(format!(
            "{} {}: {}",
            repo.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `git cat-file --batch` kept open: blobs by `<commit>:<path>`.
struct Blobs {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl Blobs {
    fn start(repo: &Path) -> Result<Self> {
        let mut child = Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(["cat-file", "--batch"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| TaskError::Git(format!("git cat-file in {}: {e}", repo.display())))?;
        let input = child
            .stdin
            .take()
            .ok_or_else(|| TaskError::Git("no stdin".into()))?;
        let output = BufReader::new(
            child
                .stdout
                .take()
                .ok_or_else(|| TaskError::Git("no stdout".into()))?,
        );
        Ok(Blobs {
            child,
            input,
            output,
        })
    }

    /// The blob's text; `Ok(None)` if missing or too large, `Err` if git stopped
    /// answering (a corrupt object).
    fn text(&mut self, spec: &str, max: usize) -> std::result::Result<Option<Vec<u8>>, String> {
        writeln!(self.input, "{spec}").map_err(|e| e.to_string())?;
        self.input.flush().map_err(|e| e.to_string())?;
        let mut header = String::new();
        self.output
            .read_line(&mut header)
            .map_err(|e| e.to_string())?;
        if header.is_empty() {
            return Err("git cat-file stopped".into());
        }
        if header.trim_end().ends_with("missing") {
            return Ok(None);
        }
        let size: usize = header
            .split_whitespace()
            .nth(2)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("unexpected cat-file header {header:?}"))?;
        let mut data = vec![0u8; size + 1];
        self.output
            .read_exact(&mut data)
            .map_err(|e| e.to_string())?;
        data.pop();
        Ok((size <= max).then_some(data))
    }
}

impl Drop for Blobs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Functions of a file by their head (whitespace squashed): (head, whole text, body lines).
fn functions(text: &str) -> HashMap<String, (String, usize)> {
    let code = code_only(text);
    let mut out = HashMap::new();
    let mut seen = HashMap::<String, usize>::new();
    for body in function_bodies(text) {
        let open = body.open - 1;
        let mut start = open;
        while start > 0 && !b";{}".contains(&code[start - 1]) {
            start -= 1;
        }
        while start < open && code[start].is_ascii_whitespace() {
            start += 1;
        }
        let head: String = String::from_utf8_lossy(&code[start..open])
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        *seen.entry(head.clone()).or_default() += 1;
        let whole = text[start..=body.close].to_string();
        let lines = whole.lines().count();
        out.insert(head, (whole, lines));
    }
    // Overloads written alike cannot be paired: left out.
    out.retain(|h, _| seen.get(h) == Some(&1) && !h.is_empty());
    out
}

/// Lines of `a` and `b` that differ, counted as removed plus added (a longest common
/// subsequence of lines).
fn changed_lines(a: &str, b: &str) -> usize {
    let a: Vec<&str> = a.lines().map(str::trim).collect();
    let b: Vec<&str> = b.lines().map(str::trim).collect();
    let mut dp = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            dp[i][j] = if a[i] == b[j] {
                dp[i + 1][j + 1] + 1
            } else {
                dp[i + 1][j].max(dp[i][j + 1])
            };
        }
    }
    a.len() + b.len() - 2 * dp[0][0] as usize
}

fn bump(map: &mut BTreeMap<String, u64>, key: &str) {
    *map.entry(key.to_string()).or_default() += 1;
}

/// Mines `repo` (a checkout or a bare repository) from `HEAD` back; `each` gets every task.
pub fn mine(
    repo: &Path,
    settings: &MineSettings,
    each: &mut dyn FnMut(Task) -> Result<()>,
) -> Result<MineStats> {
    let started = std::time::Instant::now();
    let pattern = Regex::new(&format!("(?i){}", settings.pattern))
        .map_err(|e| TaskError::Input(format!("--pattern: {e}")))?;
    let project =
        crate::program::project_of(&repo.canonicalize().unwrap_or_else(|_| repo.to_path_buf()))
            .trim_end_matches("/repo")
            .to_string();
    let project = if project == "repo" {
        // A mirror laid out as <owner+name>/repo.
        repo.parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().replace('+', "/"))
            .unwrap_or(project)
    } else {
        project
    };
    let log = git(
        repo,
        &[
            "log",
            "--no-merges",
            "--first-parent",
            "--format=%x1e%H %P%x00%B",
        ],
    )?;
    let mut stats = MineStats::default();
    let mut blobs = Blobs::start(repo)?;
    let split = split_of(&project, &settings.test_projects, settings.test_percent);
    for record in log.split('\x1e').filter(|r| !r.trim().is_empty()) {
        stats.commits += 1;
        let Some((ids, message)) = record.split_once('\0') else {
            bump(&mut stats.skipped, "unreadable_log_record");
            continue;
        };
        let mut ids = ids.split_whitespace();
        let (Some(commit), Some(parent)) = (ids.next(), ids.next()) else {
            bump(&mut stats.skipped, "root_commit");
            continue;
        };
        let message = message.trim();
        let subject = message.lines().next().unwrap_or("").trim();
        if !pattern.is_match(message) {
            continue;
        }
        stats.fix_messages += 1;
        let numstat = match git(
            repo,
            &[
                "diff-tree",
                "--no-commit-id",
                "-r",
                "--numstat",
                "--no-renames",
                parent,
                commit,
            ],
        ) {
            Ok(n) => n,
            Err(_) => {
                bump(&mut stats.skipped, "corrupt_object");
                continue;
            }
        };
        let mut files = Vec::new();
        let mut total = 0usize;
        let mut binary = false;
        for line in numstat.lines() {
            let mut f = line.split('\t');
            let (Some(add), Some(del), Some(path)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            if !is_cxx(path) {
                continue;
            }
            match (add.parse::<usize>(), del.parse::<usize>()) {
                (Ok(a), Ok(d)) => total += a + d,
                _ => binary = true,
            }
            files.push(path.to_string());
        }
        if files.is_empty() {
            continue;
        }
        stats.with_cxx_changes += 1;
        if binary {
            bump(&mut stats.skipped, "binary_file");
            continue;
        }
        if files.len() > settings.max_files {
            bump(&mut stats.skipped, "too_many_files");
            continue;
        }
        if total > settings.max_diff_lines {
            bump(&mut stats.skipped, "huge_diff");
            continue;
        }
        let mut pairs = 0;
        for path in &files {
            let (before, after) = match (
                blobs.text(&format!("{parent}:{path}"), settings.max_file_bytes),
                blobs.text(&format!("{commit}:{path}"), settings.max_file_bytes),
            ) {
                (Ok(Some(b)), Ok(Some(a))) => (b, a),
                (Ok(_), Ok(_)) => {
                    bump(&mut stats.skipped, "added_removed_or_large_file");
                    continue;
                }
                _ => {
                    bump(&mut stats.skipped, "corrupt_object");
                    blobs = Blobs::start(repo)?;
                    continue;
                }
            };
            let (Ok(before), Ok(after)) = (String::from_utf8(before), String::from_utf8(after))
            else {
                bump(&mut stats.skipped, "not_utf8");
                continue;
            };
            stats.files_read += 1;
            let old = functions(&before);
            let new = functions(&after);
            let mut heads: Vec<&String> = old.keys().filter(|h| new.contains_key(*h)).collect();
            heads.sort();
            for head in heads {
                let (b, bl) = &old[head];
                let (a, al) = &new[head];
                if b == a {
                    continue;
                }
                if (*bl).max(*al) > settings.max_function_lines {
                    bump(&mut stats.skipped, "function_too_long");
                    continue;
                }
                let changed = changed_lines(b, a);
                if changed == 0 {
                    bump(&mut stats.skipped, "whitespace_only");
                    continue;
                }
                if changed > settings.max_changed_lines {
                    bump(&mut stats.skipped, "change_too_large");
                    continue;
                }
                let body: Vec<&str> = message
                    .lines()
                    .skip(1)
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .take(12)
                    .collect();
                let why = if body.is_empty() {
                    subject.to_string()
                } else {
                    body.join("\n   ")
                };
                let name = head
                    .split('(')
                    .next()
                    .unwrap_or(head)
                    .split_whitespace()
                    .last()
                    .unwrap_or("");
                each(Task {
                    id: format!(
                        "{project}@{}:{path}#{name}",
                        &commit[..12.min(commit.len())]
                    ),
                    kind: "commit_fix".into(),
                    input: format!("// TASK: {subject}\n{b}\n"),
                    output: format!(
                        "/* REASONING:\n   {}\n   {} line(s) of `{name}` change.\n*/\n{a}\n",
                        why.replace("*/", "* /"),
                        changed
                    ),
                    project: project.clone(),
                    split: split.into(),
                    provenance: Provenance {
                        source: repo.display().to_string(),
                        path: path.clone(),
                        commit: Some(commit.to_string()),
                        operator: None,
                        line: None,
                        change: subject.to_string(),
                    },
                    check: None,
                })?;
                stats.pairs += 1;
                pairs += 1;
            }
        }
        if pairs > 0 {
            stats.commits_with_pairs += 1;
        }
    }
    stats.seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}

/// Runs [`mine`] into `out/tasks.jsonl.zst` and `out/stats.json` (both written whole
/// under temporary names: a killed run leaves nothing, and rerunning redoes it).
pub fn mine_to(repo: &Path, out: &Path, settings: &MineSettings) -> Result<MineStats> {
    std::fs::create_dir_all(out).map_err(|e| TaskError::io(out, e))?;
    let path: PathBuf = out.join("tasks.jsonl.zst");
    let mut writer = cxxlm_data::shard::ShardWriter::create(path, 3)
        .map_err(|e| TaskError::Input(e.to_string()))?;
    let stats = mine(repo, settings, &mut |t| {
        writer
            .write_line(&serde_json::to_string(&t).map_err(TaskError::json)?)
            .map_err(|e| TaskError::Input(e.to_string()))
    })?;
    writer
        .finish()
        .map_err(|e| TaskError::Input(e.to_string()))?;
    let json = serde_json::to_vec_pretty(&stats).map_err(TaskError::json)?;
    cxxlm_data::shard::write_atomic(&out.join("stats.json"), &json)?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(dir: &Path, args: &[&str]) {
        let ok = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .status()
            .unwrap()
            .success();
        assert!(ok, "git {args:?}");
    }

    #[test]
    fn fix_commits_become_function_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("proj");
        std::fs::create_dir(&repo).unwrap();
        sh(&repo, &["init", "-q"]);
        let v1 = "int sum(const int* a, int n) {\n  int s = 0;\n  for (int i = 0; i <= n; ++i) s += a[i];\n  return s;\n}\nint other() { return 1; }\n";
        std::fs::write(repo.join("a.cpp"), v1).unwrap();
        std::fs::write(repo.join("notes.txt"), "x").unwrap();
        sh(&repo, &["add", "."]);
        sh(&repo, &["commit", "-q", "-m", "Add sum"]);
        std::fs::write(repo.join("a.cpp"), v1.replace("i <= n", "i < n")).unwrap();
        sh(
            &repo,
            &[
                "commit",
                "-q",
                "-am",
                "Fix off-by-one in sum\n\nThe loop read one past the end.",
            ],
        );
        std::fs::write(
            repo.join("a.cpp"),
            v1.replace("i <= n", "i < n")
                .replace("return 1", "return 2"),
        )
        .unwrap();
        sh(&repo, &["commit", "-q", "-am", "Change other"]);
        std::fs::write(repo.join("notes.txt"), "y").unwrap();
        sh(&repo, &["commit", "-q", "-am", "fix typo in notes"]);
        let mut tasks = Vec::new();
        let stats = mine(&repo, &MineSettings::default(), &mut |t| {
            tasks.push(t);
            Ok(())
        })
        .unwrap();
        assert_eq!(
            (
                stats.commits,
                stats.fix_messages,
                stats.with_cxx_changes,
                stats.pairs
            ),
            (4, 2, 1, 1)
        );
        let t = &tasks[0];
        assert_eq!(t.project, "proj");
        assert!(
            t.input
                .starts_with("// TASK: Fix off-by-one in sum\nint sum("),
            "{}",
            t.input
        );
        assert!(t.input.contains("i <= n") && t.output.contains("i < n"));
        assert!(t.output.contains("The loop read one past the end."));
        assert!(!t.output.contains("other"));
    }

    #[test]
    fn changed_lines_count_removed_and_added() {
        assert_eq!(changed_lines("a\nb\nc", "a\nx\nc"), 2);
        assert_eq!(changed_lines("a\nb", "a\nb\nc"), 1);
        assert_eq!(changed_lines("a", "a"), 0);
    }
}
