//! Keeping a stored index fresh: file-system events (inotify on Linux, through
//! `notify`), each saved, created or deleted file read again and its record appended to
//! the journal; a rescan (files whose size or time changed) when the event queue
//! overflowed; a new snapshot when the journal has grown long.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};

use crate::index::{Change, Index, Settings};
use crate::store::Store;
use crate::IndexError;

/// Events arriving within this long of the first are handled together (an editor's
/// save is several: write, close, rename of a backup).
const SETTLE: Duration = Duration::from_millis(5);
/// Journal records past which the watcher writes a new snapshot.
const COMPACT_AFTER: usize = 2000;

/// One round of refreshes.
#[derive(Debug)]
pub struct Refresh {
    pub changes: Vec<(String, Change)>,
    /// Reading, parsing, updating and appending to the journal.
    pub elapsed: Duration,
    /// A full rescan after the event queue overflowed.
    pub rescan: bool,
    /// A new snapshot was written (the journal had grown long).
    pub compacted: bool,
}

/// Watches the index's repository until `stop` is set, refreshing `index` and its
/// store on every change and telling `report` about each round that changed something
/// (with the index as it now is).
/// `ready` is called once every folder is watched (inotify's watches are set folder by
/// folder: a save before then may go unseen).
pub fn watch(
    index: &mut Index,
    store: &mut Store,
    settings: &Settings,
    stop: &AtomicBool,
    ready: impl FnOnce(),
    mut report: impl FnMut(&Index, &Refresh),
) -> Result<(), IndexError> {
    let (tx, rx) = mpsc::channel();
    let mut watcher = notify::recommended_watcher(tx).map_err(watch_error)?;
    let root = index.root().to_path_buf();
    watcher
        .watch(&root, RecursiveMode::Recursive)
        .map_err(watch_error)?;
    ready();
    while !stop.load(Ordering::Relaxed) {
        let first = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(e) => e,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let mut paths = BTreeSet::new();
        let mut rescan = false;
        let mut take = |event: notify::Result<notify::Event>| match event {
            Ok(e) => {
                rescan |= e.need_rescan();
                if e.kind.is_access() {
                    return;
                }
                paths.extend(e.paths);
            }
            Err(_) => rescan = true,
        };
        take(first);
        let settle_until = Instant::now() + SETTLE;
        while let Some(wait) = settle_until.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(wait) {
                Ok(e) => take(e),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let changes = match rescan {
            true => {
                let own = store.dir().to_path_buf();
                let fresh = Index::build(&root, Some(&own), settings, Some(index), |_, _| {})?;
                let changes = vec![(
                    String::new(),
                    Change::Parsed {
                        defs: fresh.definitions(),
                        refs: 0,
                    },
                )];
                *index = fresh;
                *store = Store::save(&own, index)?;
                changes
            }
            false => {
                let mut changes = Vec::new();
                for p in &paths {
                    changes.extend(index.refresh(p, settings));
                }
                changes.retain(|(_, c)| *c != Change::Ignored && *c != Change::Unchanged);
                if !changes.is_empty() {
                    store.record(index, &changes)?;
                }
                changes
            }
        };
        if changes.is_empty() {
            continue;
        }
        let compacted = store.journal_records() > COMPACT_AFTER;
        if compacted {
            *store = Store::save(store.dir(), index)?;
        }
        report(
            index,
            &Refresh {
                changes,
                elapsed: started.elapsed(),
                rescan,
                compacted,
            },
        );
    }
    Ok(())
}

fn watch_error(e: notify::Error) -> IndexError {
    let hint = match &e.kind {
        notify::ErrorKind::MaxFilesWatch => {
            " (raise the limit: sysctl fs.inotify.max_user_watches=1048576)"
        }
        _ => "",
    };
    IndexError::Watch(format!("{e}{hint}"))
}

/// Opens the index stored in `dir`, or builds and stores it when there is none.
pub fn open_or_build(
    repo: &Path,
    dir: &Path,
    settings: &Settings,
    progress: impl FnMut(usize, usize),
) -> Result<(Index, Store, bool), IndexError> {
    match Store::load(dir) {
        Ok((index, store)) => Ok((index, store, false)),
        Err(IndexError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            let index = Index::build(repo, Some(dir), settings, None, progress)?;
            let store = Store::save(dir, &index)?;
            Ok((index, store, true))
        }
        Err(e) => Err(e),
    }
}

/// The index folder of a repository when none is named.
pub fn default_dir(repo: &Path) -> PathBuf {
    repo.join(crate::index::DEFAULT_DIR)
}
