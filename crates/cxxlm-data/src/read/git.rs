use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use super::{looks_like_cxx, meta, size_skip, skip, Kind, Plan, ReadItem, Sink, Unit};
use crate::config::InputConfig;
use crate::document::RawDocument;
use crate::error::{DataError, Result};

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
        let record = String::from_utf8_lossy(record);
        let Some((head, path)) = record.split_once('\t') else {
            continue;
        };
        let fields: Vec<&str> = head.split_whitespace().collect();
        let [mode, kind, oid, size] = fields[..] else {
            continue;
        };
        if kind != "blob" || mode == "120000" {
            continue;
        }
        let name = path.rsplit('/').next().unwrap_or(path);
        match Kind::of(name) {
            Some(k @ (Kind::Source | Kind::MaybeSource)) => plan.units.push(Unit::GitBlob {
                repo: repo.to_path_buf(),
                oid: oid.to_string(),
                path: path.to_string(),
                size: size.parse().unwrap_or(0),
                kind: k,
            }),
            _ => plan.ignored_files += 1,
        }
    }
    Ok(())
}

/// One `git cat-file --batch` per repository, fed object ids one at a time.
pub struct CatFile {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl CatFile {
    pub fn start(repo: &PathBuf) -> Result<Self> {
        let mut child = Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(["cat-file", "--batch"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| git_error(repo, format!("cannot run git cat-file: {e}")))?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| git_error(repo, "no stdin"))?;
        let stdout = BufReader::new(
            child
                .stdout
                .take()
                .ok_or_else(|| git_error(repo, "no stdout"))?,
        );
        Ok(CatFile {
            child,
            stdin,
            stdout,
        })
    }

    fn blob(&mut self, oid: &str) -> std::io::Result<Vec<u8>> {
        writeln!(self.stdin, "{oid}")?;
        self.stdin.flush()?;
        let mut header = String::new();
        self.stdout.read_line(&mut header)?;
        let size: usize = header
            .split_whitespace()
            .nth(2)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                std::io::Error::other(format!("unexpected reply {:?}", header.trim()))
            })?;
        let mut bytes = vec![0; size + 1];
        self.stdout.read_exact(&mut bytes)?;
        bytes.pop();
        Ok(bytes)
    }
}

impl Drop for CatFile {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
) {
    let id = format!("{}/{path}", repo.display());
    if let Some(item) = size_skip(&id, size, config) {
        sink(item);
        return;
    }
    let bytes = match cat.blob(oid) {
        Ok(b) => b,
        Err(e) => {
            sink(skip(&id, "unreadable", e.to_string(), size));
            return;
        }
    };
    if kind == Kind::MaybeSource && !looks_like_cxx(&bytes) {
        sink(ReadItem::Ignored);
        return;
    }
    let m = meta(&[
        ("source", "git".into()),
        ("repo", repo.display().to_string().into()),
        ("path", path.into()),
        ("blob", oid.into()),
    ]);
    sink(ReadItem::Doc(RawDocument { id, bytes, meta: m }));
}
