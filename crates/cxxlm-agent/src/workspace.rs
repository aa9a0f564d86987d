//! The repository the agent works in: paths confined to it, and the tools that read and
//! edit its files, with its index kept up to date after every edit.

use std::path::{Component, Path, PathBuf};

use cxxlm_index::{Cursor, Graph, Index, Settings};

use crate::guard::Guard;
use crate::AgentError;

/// Bounds on what one tool answers.
const LIST_FILES: usize = 200;
const SEARCH_HITS: usize = 50;
const OPEN_LINES: usize = 60;
const MAX_OPEN_LINES: usize = 200;
const INDEX_DEFINITIONS: usize = 8;
const INDEX_CHUNK_LINES: u32 = 12;
const INDEX_BYTES: usize = 3000;
const SEARCH_FILE_BYTES: u64 = 1 << 20;

pub struct Workspace {
    root: PathBuf,
    index: Index,
    settings: Settings,
    guard: Guard,
    /// Whether the model may ask the index (the `index` tool, `search` by symbol).
    index_tools: bool,
}

/// A tool's answer: whether it did what was asked, and its text for the model.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub ok: bool,
    pub text: String,
}

impl Answer {
    pub fn ok(text: impl Into<String>) -> Answer {
        Answer {
            ok: true,
            text: text.into(),
        }
    }

    pub fn refused(text: impl Into<String>) -> Answer {
        Answer {
            ok: false,
            text: format!("error: {}", text.into()),
        }
    }
}

impl Workspace {
    /// Opens `root` and indexes it (reusing what a stored `cxxlm index` already read).
    pub fn new(root: &Path) -> Result<Workspace, AgentError> {
        let root = std::fs::canonicalize(root)
            .map_err(|e| AgentError::Input(format!("the repository {}: {e}", root.display())))?;
        if !root.is_dir() {
            return Err(AgentError::Input(format!(
                "the repository {} is not a folder",
                root.display()
            )));
        }
        let settings = Settings::default();
        let own = cxxlm_index::watch::default_dir(&root);
        let stored = cxxlm_index::Store::load(&own).ok().map(|(index, _)| index);
        let index = Index::build(&root, Some(&own), &settings, stored.as_ref(), |_, _| {})
            .map_err(|e| AgentError::Input(e.to_string()))?;
        let guard = Guard::new(&root)?;
        Ok(Workspace {
            root,
            index,
            settings,
            guard,
            index_tools: true,
        })
    }

    /// The same repository without the index's tools (`index`, `search` by symbol),
    /// to measure what they are worth.
    pub fn without_index_tools(mut self) -> Workspace {
        self.index_tools = false;
        self
    }

    pub fn index_tools(&self) -> bool {
        self.index_tools
    }

    fn index_off() -> Answer {
        Answer::refused("the index is not available in this run: search by `text` instead")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `rel` inside the repository: relative, no `..`, and no link out of it.
    pub fn resolve(&self, rel: &str) -> Result<PathBuf, String> {
        let path = Path::new(rel);
        if path.is_absolute() {
            return Err(format!(
                "{rel}: paths are relative to the repository's root"
            ));
        }
        if path.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(format!(
                "{rel}: `..` is not allowed; paths stay inside the repository"
            ));
        }
        let joined = self.root.join(path);
        let real = std::fs::canonicalize(&joined).map_err(|e| format!("{rel}: {e}"))?;
        if !real.starts_with(&self.root) {
            return Err(format!("{rel}: a link that leads out of the repository"));
        }
        Ok(real)
    }

    fn relative(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned()
    }

    /// Files (not hidden ones) under `rel` in path order.
    fn files_under(&self, rel: &str) -> Result<Vec<PathBuf>, String> {
        let dir = self.resolve(rel)?;
        let mut files: Vec<PathBuf> = walkdir::WalkDir::new(&dir)
            .sort_by_file_name()
            .into_iter()
            .filter_entry(|e| e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_file())
            .map(|e| e.into_path())
            .collect();
        files.sort();
        Ok(files)
    }

    pub fn list(&self, rel: Option<&str>) -> Answer {
        let files = match self.files_under(rel.unwrap_or(".")) {
            Ok(f) => f,
            Err(e) => return Answer::refused(e),
        };
        let mut text: String = files
            .iter()
            .take(LIST_FILES)
            .map(|f| self.relative(f) + "\n")
            .collect();
        if files.len() > LIST_FILES {
            text += &format!("... and {} more files\n", files.len() - LIST_FILES);
        }
        Answer::ok(text)
    }

    pub fn search(&self, text: Option<&str>, symbol: Option<&str>) -> Answer {
        match (text, symbol) {
            (Some(t), None) if !t.is_empty() => self.search_text(t),
            (None, Some(_)) if !self.index_tools => Self::index_off(),
            (None, Some(s)) if !s.is_empty() => self.search_symbol(s),
            _ => Answer::refused("search takes one of a non-empty `text` or `symbol`"),
        }
    }

    fn search_text(&self, needle: &str) -> Answer {
        let files = match self.files_under(".") {
            Ok(f) => f,
            Err(e) => return Answer::refused(e),
        };
        let mut hits = Vec::new();
        let mut more = 0;
        for f in files {
            if std::fs::metadata(&f).map_or(true, |m| m.len() > SEARCH_FILE_BYTES) {
                continue;
            }
            let Ok(content) = std::fs::read_to_string(&f) else {
                continue;
            };
            for (i, line) in content.lines().enumerate() {
                if line.contains(needle) {
                    match hits.len() < SEARCH_HITS {
                        true => {
                            hits.push(format!("{}:{}: {}", self.relative(&f), i + 1, line.trim()))
                        }
                        false => more += 1,
                    }
                }
            }
        }
        let mut text = hits.join("\n");
        match (hits.is_empty(), more) {
            (true, _) => text = format!("no line holds {needle:?}"),
            (false, 0) => {}
            (false, n) => text += &format!("\n... and {n} more lines"),
        }
        Answer::ok(text)
    }

    fn search_symbol(&self, symbol: &str) -> Answer {
        let Some(id) = self.index.names().get(symbol) else {
            return Answer::ok(format!("no definition of {symbol} in the index"));
        };
        let mut hits = Vec::new();
        for (file, entry) in self.index.files() {
            for d in entry.defs.iter().filter(|d| d.name == id) {
                hits.push(format!(
                    "{file}:{}-{}: {} {symbol}",
                    d.line,
                    d.end_line,
                    d.kind.name()
                ));
            }
        }
        if hits.is_empty() {
            return Answer::ok(format!("no definition of {symbol} in the index"));
        }
        hits.truncate(SEARCH_HITS);
        Answer::ok(hits.join("\n"))
    }

    pub fn open(&self, rel: &str, line: Option<usize>, lines: Option<usize>) -> Answer {
        let path = match self.resolve(rel) {
            Ok(p) => p,
            Err(e) => return Answer::refused(e),
        };
        let content = match std::fs::read_to_string(&path) {
            Ok(c) => c,
            Err(e) => return Answer::refused(format!("{rel}: {e}")),
        };
        let all: Vec<&str> = content.lines().collect();
        let first = line.unwrap_or(1).max(1);
        if first > all.len().max(1) {
            return Answer::refused(format!(
                "{rel} has {} lines; line {first} is past its end",
                all.len()
            ));
        }
        let count = lines.unwrap_or(OPEN_LINES).clamp(1, MAX_OPEN_LINES);
        let last = (first + count - 1).min(all.len());
        Answer::ok(format!(
            "{rel} ({} lines), lines {first}-{last}:\n{}",
            all.len(),
            numbered(&all, first, last)
        ))
    }

    /// Replaces lines `start..=end` of `rel` with `text` when the file still parses (or
    /// did not parse before either); else the file is left as it was.
    pub fn edit(
        &mut self,
        rel: &str,
        start: usize,
        end: usize,
        text: &str,
    ) -> Result<Answer, AgentError> {
        let path = match self.resolve(rel) {
            Ok(p) => p,
            Err(e) => return Ok(Answer::refused(e)),
        };
        let before = match std::fs::read_to_string(&path) {
            Ok(c) => c,
            Err(e) => return Ok(Answer::refused(format!("{rel}: {e}"))),
        };
        let lines: Vec<&str> = before.lines().collect();
        if start == 0 || start > lines.len() + 1 || end + 1 < start || end > lines.len() {
            return Ok(Answer::refused(format!(
                "lines {start}-{end} are not a range of {rel}, which has {} lines (end = start - 1 inserts before start)",
                lines.len()
            )));
        }
        let new_lines: Vec<&str> = text.lines().collect();
        let mut edited: Vec<&str> = lines[..start - 1].to_vec();
        edited.extend(&new_lines);
        edited.extend(&lines[end..]);
        let after = edited.join("\n") + "\n";
        let rel = self.relative(&path);
        let mut note = String::new();
        if is_cxx(&rel) {
            let parse = self.guard.check(&rel, &after)?;
            if !parse.ok {
                if self.guard.check(&rel, &before)?.ok {
                    return Ok(Answer::refused(format!(
                        "the edit was not made: {rel} would no longer parse:\n{}",
                        parse.errors
                    )));
                }
                note = format!(
                    "note: {rel} does not parse, nor did it before:\n{}\n",
                    parse.errors
                );
            }
        }
        write_atomic(&path, &after)?;
        self.index.refresh(&path, &self.settings);
        let shown_last = (start + new_lines.len()).min(edited.len()).max(start);
        let from = start.saturating_sub(3).max(1);
        Ok(Answer::ok(format!(
            "{note}{rel}: lines {start}-{end} replaced by {} lines; now lines {from}-{shown_last}:\n{}",
            new_lines.len(),
            numbered(&edited, from, shown_last.min(edited.len()))
        )))
    }

    /// The definitions that rank highest at `line` of `rel`, with their first lines.
    pub fn index(&self, rel: &str, line: usize) -> Answer {
        if !self.index_tools {
            return Self::index_off();
        }
        let path = match self.resolve(rel) {
            Ok(p) => p,
            Err(e) => return Answer::refused(e),
        };
        let graph = Graph::new(&self.index);
        let cursor = Cursor {
            file: Some(self.relative(&path)),
            text: None,
            line: Some(line as u32),
            symbols: Vec::new(),
        };
        let ranking = graph.rank(&cursor, INDEX_DEFINITIONS);
        let chunks = cxxlm_index::chunks(
            &self.root,
            &ranking.definitions,
            INDEX_CHUNK_LINES,
            INDEX_BYTES,
            |_, _| false,
        );
        if chunks.is_empty() {
            return Answer::ok(format!("the index ranks nothing at {rel}:{line}"));
        }
        let text = chunks
            .iter()
            .map(|c| format!("{}:{}-{}:\n{}", c.file, c.line, c.end_line, c.text))
            .collect::<Vec<_>>()
            .join("\n");
        Answer::ok(text)
    }
}

fn is_cxx(rel: &str) -> bool {
    cxxlm_index::index::is_source(rel)
}

/// Lines `first..=last` (1-based) with their numbers.
fn numbered(lines: &[&str], first: usize, last: usize) -> String {
    (first..=last)
        .filter_map(|n| lines.get(n - 1).map(|l| format!("{n:>5}  {l}\n")))
        .collect()
}

pub(crate) fn write_atomic(path: &Path, text: &str) -> Result<(), AgentError> {
    let tmp = path.with_file_name(format!(
        ".{}.cxxlm-edit",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    std::fs::write(&tmp, text).map_err(|e| AgentError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| AgentError::io(path, e))
}
