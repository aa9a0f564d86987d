//! One writer per output: a command that writes a directory (a data run's task, a dedup
//! stage's task, a training run) holds an exclusive lock on a file in it while it runs,
//! and a second one is refused with the first one's process id. The lock (flock) goes
//! with the process, however it ends: a killed run leaves nothing to clean up.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

/// Held until dropped.
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

/// Locks `path` (created if needed) for `what`, or says who holds it.
pub fn hold(path: &Path, what: &str) -> Result<Lock> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(err).with_context(|| format!("locking {}", path.display()));
        }
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = match holder.trim() {
            "" => String::new(),
            pid => format!(" (process {pid})"),
        };
        bail!(
            "{what} is being written by another process{holder}, which holds {}: wait for it to end, or write elsewhere",
            path.display()
        );
    }
    file.set_len(0)
        .and_then(|_| file.rewind())
        .and_then(|_| write!(file, "{}", std::process::id()))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(Lock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out").join("run.lock");
        let first = hold(&path, "runs/x").unwrap();
        let err = hold(&path, "runs/x").unwrap_err().to_string();
        assert!(
            err.contains("runs/x is being written by another process")
                && err.contains(&format!("process {}", std::process::id())),
            "{err}"
        );
        drop(first);
        hold(&path, "runs/x").unwrap();
    }
}
