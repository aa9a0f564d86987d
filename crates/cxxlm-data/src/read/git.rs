use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use super::{looks_like_cxx, meta, name_of, size_skip, skip, Kind, Plan, ReadItem, Sink, Unit};
use crate::config::InputConfig;
use crate::document::RawDocument;
use crate::error::{DataError, Result};
use crate::stats::Skipped;

fn git_error(repo: &Path, message: impl Into<String>) -> DataError {
    DataError::Input {
        input: repo.display().to_string(),
        message: message.into(),
    }
}

/// The C/C++ files of HEAD (not the working tree), one unit per blob.
pub fn plan(repo: &Path, plan: &mut Plan) -> Result<()> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["ls-tree", "-r", "-z", "-l", "HEAD"])
        .output()
        .map_err(|e| git_error(repo, format!("cannot run git: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(git_error(
            repo,
            format!("git ls-tree HEAD failed: {}", err.trim()),
        ));
    }
    for record in out.stdout.split(|&b| b == 0).filter(|r| !r.is_empty()) {
        let Some(tab) = record.iter().position(|&b| b == b'\t') else {
            continue;
        };
        let head = String::from_utf8_lossy(&record[..tab]);
        let path = name_of(&record[tab + 1..]);
        let fields: Vec<&str> = head.split_whitespace().collect();
        let [mode, kind, oid, size] = fields[..] else {
            continue;
        };
        if kind != "blob" || mode == "120000" {
            continue;
        }
        let name = path.rsplit('/').next().unwrap_or(&path);
        let kind = match Kind::of(name) {
            Some(k @ (Kind::Source | Kind::MaybeSource)) => k,
            _ => {
                plan.ignored_files += 1;
                continue;
            }
        };
        // git prints `BAD` where it cannot read the object's header.
        let Ok(size) = size.parse() else {
            plan.skipped.push(Skipped {
                input: format!("{}/{path}", repo.display()),
                reason: "corrupt".into(),
                detail: format!("git cannot read object {oid} (size {size})"),
            });
            continue;
        };
        plan.units.push(Unit::GitBlob {
            repo: repo.to_path_buf(),
            oid: oid.to_string(),
            path,
            size,
            kind,
        });
    }
    Ok(())
}

/// Why `git cat-file` gave no blob.
enum BlobError {
    /// It says the object is missing (so it is, or its header is corrupt); it goes on.
    Unreadable(String),
    /// It stopped (a corrupt object body makes it exit): it must be started again.
    Stopped(String),
}

/// One `git cat-file --batch` per repository, fed object ids one at a time.
pub struct CatFile {
    repo: PathBuf,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// The last lines git wrote to stderr, drained as they come so it never blocks.
    stderr: Option<std::thread::JoinHandle<String>>,
}

/// What `git cat-file` said on stderr, up to this many lines.
const STDERR_LINES: usize = 4;

impl CatFile {
    pub fn start(repo: &Path) -> Result<Self> {
        let mut child = Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(["cat-file", "--batch"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| git_error(repo, format!("cannot run git cat-file: {e}")))?;
        let missing = |what: &str| git_error(repo, format!("git cat-file has no {what}"));
        let stdin = child.stdin.take().ok_or_else(|| missing("stdin"))?;
        let stdout = BufReader::new(child.stdout.take().ok_or_else(|| missing("stdout"))?);
        let stderr = child.stderr.take().ok_or_else(|| missing("stderr"))?;
        let stderr = std::thread::spawn(move || {
            let mut last = std::collections::VecDeque::new();
            for line in BufReader::new(stderr)
                .lines()
                .map_while(std::io::Result::ok)
            {
                if last.len() == STDERR_LINES {
                    last.pop_front();
                }
                last.push_back(line);
            }
            Vec::from(last).join("; ")
        });
        Ok(CatFile {
            repo: repo.to_path_buf(),
            child,
            stdin,
            stdout,
            stderr: Some(stderr),
        })
    }

    fn blob(&mut self, oid: &str) -> std::result::Result<Vec<u8>, BlobError> {
        let stopped = |e: std::io::Error| BlobError::Stopped(e.to_string());
        writeln!(self.stdin, "{oid}").map_err(stopped)?;
        self.stdin.flush().map_err(stopped)?;
        let mut header = String::new();
        if self.stdout.read_line(&mut header).map_err(stopped)? == 0 {
            return Err(BlobError::Stopped("it exited".into()));
        }
        let fields: Vec<&str> = header.split_whitespace().collect();
        let size = match fields[..] {
            [_, "missing"] => {
                return Err(BlobError::Unreadable(
                    "git cannot read the object (missing, or its header is corrupt)".into(),
                ))
            }
            [_, _, size] => size.parse::<usize>().ok(),
            _ => None,
        };
        let size = size
            .ok_or_else(|| BlobError::Stopped(format!("unexpected reply {:?}", header.trim())))?;
        let mut bytes = vec![0; size + 1];
        self.stdout.read_exact(&mut bytes).map_err(stopped)?;
        bytes.pop();
        Ok(bytes)
    }

    /// Ends this `git cat-file` (whose output can no longer be trusted) and starts a new
    /// one; returns what the old one said on stderr.
    fn restart(&mut self) -> Result<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let said = self
            .stderr
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        *self = CatFile::start(&self.repo)?;
        Ok(said)
    }
}

impl Drop for CatFile {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads one blob into `sink`. An object git cannot read is skipped as `corrupt`; a
/// `git cat-file` that died on it is started again for the next ones.
#[allow(clippy::too_many_arguments)]
pub fn read_blob(
    cat: &mut CatFile,
    repo: &Path,
    oid: &str,
    path: &str,
    size: u64,
    kind: Kind,
    config: &InputConfig,
    sink: Sink,
) -> Result<()> {
    let id = format!("{}/{path}", repo.display());
    if let Some(item) = size_skip(&id, size, config) {
        sink(item);
        return Ok(());
    }
    let bytes = match cat.blob(oid) {
        Ok(b) => b,
        Err(BlobError::Unreadable(why)) => {
            sink(skip(&id, "corrupt", format!("object {oid}: {why}"), size));
            return Ok(());
        }
        Err(BlobError::Stopped(why)) => {
            let said = cat.restart()?;
            sink(skip(
                &id,
                "corrupt",
                format!("object {oid}: git cat-file stopped on it ({why}): {said}"),
                size,
            ));
            return Ok(());
        }
    };
    if kind == Kind::MaybeSource && !looks_like_cxx(&bytes) {
        sink(ReadItem::Ignored);
        return Ok(());
    }
    let m = meta(&[
        ("source", "git".into()),
        ("repo", repo.display().to_string().into()),
        ("path", path.into()),
        ("blob", oid.into()),
    ]);
    sink(ReadItem::Doc(RawDocument { id, bytes, meta: m }));
    Ok(())
}
