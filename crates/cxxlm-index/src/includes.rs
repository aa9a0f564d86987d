//! The include graph: `#include`s resolved to files of the repository, as a compiler
//! would look for them (the including file's folder for quoted ones, then the include
//! directories of compile_commands.json), else by the longest path suffix that names a
//! file of the repository (headers are found without a build configuration).

use std::path::Path;

use rustc_hash::{FxHashMap, FxHashSet};

use crate::parse::Include;

pub const COMPILE_COMMANDS: &str = "compile_commands.json";

/// Where compile_commands.json is looked for, relative to the repository.
const COMPILE_COMMANDS_AT: [&str; 2] = ["compile_commands.json", "build/compile_commands.json"];

/// The folder a compile_commands.json entry runs in ("" when it names none).
pub fn command_directory(entry: &serde_json::Value) -> &str {
    entry
        .get("directory")
        .and_then(|d| d.as_str())
        .unwrap_or("")
}

/// The command line of a compile_commands.json entry, the compiler first: its
/// `arguments`, else its `command` split at white space; neither: `None`.
pub fn command_arguments(entry: &serde_json::Value) -> Option<Vec<String>> {
    match (entry.get("arguments"), entry.get("command")) {
        (Some(serde_json::Value::Array(a)), _) => Some(
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
        ),
        (_, Some(serde_json::Value::String(c))) => Some(
            c.split_whitespace()
                .map(|w| w.trim_matches(['"', '\'']).to_string())
                .collect(),
        ),
        _ => None,
    }
}

/// The include directories (`-I`, `-isystem`, `-iquote`, `-idirafter`) named in the
/// repository's compile_commands.json that lie inside it, relative to its root, in
/// first-seen order. No such file: none. A file that cannot be read: an error naming it.
pub fn compile_commands_dirs(root: &Path) -> Result<Vec<String>, String> {
    let Some(path) = COMPILE_COMMANDS_AT
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.is_file())
    else {
        return Ok(Vec::new());
    };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let entries: Vec<serde_json::Value> = serde_json::from_str(&text).map_err(|e| {
        format!(
            "{}: not a compilation database (a JSON list of commands): {e}",
            path.display()
        )
    })?;
    let mut dirs: Vec<String> = Vec::new();
    for entry in &entries {
        let directory = command_directory(entry);
        let Some(args) = command_arguments(entry) else {
            continue;
        };
        let mut i = 0;
        while i < args.len() {
            let arg = &args[i];
            let mut dir = None;
            for flag in ["-isystem", "-iquote", "-idirafter", "-I"] {
                if arg == flag {
                    dir = args.get(i + 1).cloned();
                    i += 1;
                    break;
                }
                if let Some(rest) = arg.strip_prefix(flag) {
                    dir = Some(rest.to_string());
                    break;
                }
            }
            i += 1;
            let Some(dir) = dir else { continue };
            let absolute = match Path::new(&dir).is_absolute() {
                true => dir,
                false => format!("{directory}/{dir}"),
            };
            let root_text = root.to_string_lossy();
            let Some(rel) = normalize(&absolute)
                .strip_prefix(&*normalize(&root_text))
                .map(|r| r.trim_start_matches('/').to_string())
            else {
                continue;
            };
            if !dirs.contains(&rel) {
                dirs.push(rel);
            }
        }
    }
    Ok(dirs)
}

/// `a/./b/../c` as `a/c`, lexically; a path that climbs above its start keeps its `..`s
/// dropped at the top (it names nothing inside the repository then).
pub fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    let joined = parts.join("/");
    match path.starts_with('/') {
        true => format!("/{joined}"),
        false => joined,
    }
}

/// Resolves includes against a repository's files (the index's, or those `cxxlm pack`
/// orders).
pub struct Resolver<'a> {
    files: FxHashSet<&'a str>,
    dirs: &'a [String],
    /// Files by their last path component.
    by_name: FxHashMap<&'a str, Vec<&'a str>>,
}

impl<'a> Resolver<'a> {
    /// Over the files of these paths (relative to the root, normalized) and the include
    /// directories `dirs`.
    pub fn new(paths: impl IntoIterator<Item = &'a str>, dirs: &'a [String]) -> Resolver<'a> {
        let files: FxHashSet<&str> = paths.into_iter().collect();
        let mut by_name: FxHashMap<&str, Vec<&str>> = FxHashMap::default();
        for &path in &files {
            let name = path.rsplit('/').next().unwrap_or(path);
            by_name.entry(name).or_default().push(path);
        }
        Resolver {
            files,
            dirs,
            by_name,
        }
    }

    fn existing(&self, path: &str) -> Option<&'a str> {
        self.files.get(path).copied()
    }

    /// The repository file `include` (written in `from`) names, if any.
    pub fn resolve(&self, from: &str, include: &Include) -> Option<&'a str> {
        let wanted = normalize(&include.path);
        if !include.angle {
            let folder = from.rsplit_once('/').map_or("", |(d, _)| d);
            if let Some(found) = self.existing(&normalize(&format!("{folder}/{}", include.path))) {
                return Some(found);
            }
        }
        for dir in self.dirs {
            if let Some(found) = self.existing(&normalize(&format!("{dir}/{}", include.path))) {
                return Some(found);
            }
        }
        if let Some(found) = self.existing(&wanted) {
            return Some(found);
        }
        // By suffix: the candidate nearest the including file (the longest shared
        // folder prefix), then the first by path.
        let name = wanted.rsplit('/').next()?;
        let suffix = format!("/{wanted}");
        self.by_name
            .get(name)?
            .iter()
            .filter(|p| p.ends_with(&suffix))
            .max_by_key(|p| {
                let shared = p
                    .split('/')
                    .zip(from.split('/'))
                    .take_while(|(a, b)| a == b)
                    .count();
                (shared, std::cmp::Reverse(**p))
            })
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_lexically() {
        assert_eq!(normalize("a/./b/../c"), "a/c");
        assert_eq!(normalize("/x//y/"), "/x/y");
        assert_eq!(normalize("../../z"), "z");
    }

    #[test]
    fn include_dirs_from_a_compilation_database() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let r = root.display();
        std::fs::write(
            root.join(COMPILE_COMMANDS),
            format!(
                r#"[{{"directory": "{r}/build", "file": "a.cpp",
                     "arguments": ["c++", "-I../include", "-isystem", "{r}/third_party", "-I/usr/include", "-c", "a.cpp"]}},
                   {{"directory": "{r}", "file": "b.cpp", "command": "c++ -Iinclude -iquote src/gen -c b.cpp"}}]"#
            ),
        )
        .unwrap();
        assert_eq!(
            compile_commands_dirs(&root).unwrap(),
            vec!["include", "third_party", "src/gen"]
        );
        std::fs::write(root.join(COMPILE_COMMANDS), "{not json").unwrap();
        let e = compile_commands_dirs(&root).unwrap_err();
        assert!(e.contains("compile_commands.json"), "{e}");
    }
}
