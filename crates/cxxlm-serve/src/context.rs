//! Repository context for `/infill` from a `cxxlm index`: when a client sends no
//! `input_extra`, the definitions that rank highest at the cursor (the names around it,
//! by personalized PageRank over the repository's references) are sent in its place.

use cxxlm_index::{Cursor, Graph, Store};

use crate::text::ContextFile;

/// Definitions considered per request, and the text they may add.
const CANDIDATES: usize = 16;
const MAX_LINES: u32 = 40;
const MAX_BYTES: usize = 6000;

pub struct RepoIndex {
    graph: Graph<'static>,
}

/// A chunk chosen: the file and lines it came from.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Chosen {
    pub filename: String,
    pub line: u32,
    pub end_line: u32,
}

impl RepoIndex {
    /// Opens the index stored in `dir` for the server's lifetime.
    pub fn open(dir: &std::path::Path) -> Result<RepoIndex, String> {
        let (index, _) = Store::load(dir).map_err(|e| e.to_string())?;
        // Held until the process ends: the graph borrows it.
        let index = Box::leak(Box::new(index));
        Ok(RepoIndex {
            graph: Graph::new(index),
        })
    }

    pub fn files(&self) -> usize {
        self.graph.index().files().len()
    }

    /// Context files for a cursor between `prefix` and `suffix`, leaving out what the
    /// editor already shows.
    pub fn context(&self, prefix: &str, suffix: &str) -> (Vec<ContextFile>, Vec<Chosen>) {
        let cursor = Cursor {
            file: None,
            text: Some(format!("{prefix}{suffix}")),
            line: Some(prefix.matches('\n').count() as u32 + 1),
            symbols: Vec::new(),
        };
        let ranking = self.graph.rank(&cursor, CANDIDATES);
        let root = self.graph.index().root();
        let chunks = cxxlm_index::chunks(
            root,
            &ranking.definitions,
            MAX_LINES,
            MAX_BYTES,
            |_, text| {
                let text = text.trim();
                prefix.contains(text) || suffix.contains(text)
            },
        );
        let chosen = chunks
            .iter()
            .map(|c| Chosen {
                filename: c.file.clone(),
                line: c.line,
                end_line: c.end_line,
            })
            .collect();
        let files = chunks
            .into_iter()
            .map(|c| ContextFile {
                name: c.file,
                text: c.text,
            })
            .collect();
        (files, chosen)
    }
}
