//! Runnable programs in a corpus: C++ files with a `main` whose includes resolve, either
//! to the system's headers or to small headers of the same package (copied beside the
//! program, so that a task carries everything it needs to be built again anywhere).

use cxxlm_data::config::InputConfig;
use cxxlm_data::read::{self, ReadItem, Unit, UnitReader};
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::{Result, TaskError};

/// The files of one package read from one input (an archive, a directory, a checkout).
pub struct Package {
    pub project: String,
    /// Path components before a file's subproject: 1 in archives (their top
    /// directory), 0 elsewhere.
    pub root_depth: usize,
    /// What it was read from.
    pub source: String,
    /// Paths inside the source, and texts (only files small enough to be used).
    pub files: BTreeMap<String, String>,
}

/// A program to build: its main file and the headers copied beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Program {
    pub project: String,
    pub source: String,
    pub path: String,
    pub text: String,
    /// Headers by their path relative to the build directory (`main.cpp` is at its root).
    pub support: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct FindLimits {
    /// Main files larger than this are not used (a task shows the whole file).
    pub max_program_bytes: usize,
    /// Headers larger than this are not copied.
    pub max_header_bytes: usize,
    /// At most this many bytes of headers in all.
    pub max_support_bytes: usize,
}

impl Default for FindLimits {
    fn default() -> Self {
        FindLimits {
            max_program_bytes: 12_000,
            max_header_bytes: 64_000,
            max_support_bytes: 256_000,
        }
    }
}

/// The project an input belongs to: a Debian source archive's package
/// (`boost1.81_1.81.0.orig.tar.xz` -> `boost1.81`), otherwise the file or directory name.
pub fn project_of(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    match name.split_once('_') {
        Some((package, rest)) if rest.contains(".orig") || rest.contains(".debian") => {
            package.to_string()
        }
        _ => name
            .split(".tar")
            .next()
            .unwrap_or(&name)
            .trim_end_matches(".git")
            .to_string(),
    }
}

/// Reads `inputs` one package at a time: each archive or git checkout is a package, and
/// so is each directory given that holds no archives; a directory of archives (a Debian
/// corpus) is one package per archive. Packaging-only archives (`.debian.tar.*`) are
/// skipped. Calls `each` with the package's index and the package.
pub fn for_each_package(
    inputs: &[String],
    max_file_bytes: usize,
    each: &mut dyn FnMut(usize, Package) -> Result<()>,
) -> Result<()> {
    let mut groups: Vec<(String, String, Vec<Unit>, usize)> = Vec::new();
    // Only reads from the Hub look at a stop flag, and no Hub client is configured here.
    let never = std::sync::atomic::AtomicBool::new(false);
    for input in inputs {
        let config = InputConfig {
            paths: vec![input.clone()],
            max_bytes: max_file_bytes as u64,
            ..Default::default()
        };
        let plan =
            read::plan(&config, None, &never).map_err(|e| TaskError::Input(e.to_string()))?;
        let root = Path::new(input);
        let (archives, files): (Vec<Unit>, Vec<Unit>) = plan.units.into_iter().partition(|u| {
            matches!(
                u,
                Unit::Local {
                    kind: read::Kind::Archive(_),
                    ..
                }
            )
        });
        for unit in archives {
            let Unit::Local { path, .. } = &unit else {
                continue;
            };
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let source = path.display().to_string();
            // Packaging-only archives, and an archive named twice (an input list may
            // name one first to have it read first).
            if name.contains(".debian.tar") || groups.iter().any(|g| g.1 == source) {
                continue;
            }
            groups.push((project_of(path), source, vec![unit], 1));
        }
        if !files.is_empty() {
            groups.push((project_of(root), input.clone(), files, 0));
        }
    }
    for (index, (project, source, units, root_depth)) in groups.into_iter().enumerate() {
        let mut reader = UnitReader::new(
            InputConfig {
                max_bytes: max_file_bytes as u64,
                ..Default::default()
            },
            None,
        );
        let mut files = BTreeMap::new();
        // Files of a directory are named from inside it.
        let prefix = if root_depth == 0 {
            format!("{}/", source.trim_end_matches('/'))
        } else {
            String::new()
        };
        for unit in &units {
            reader
                .read(
                    unit,
                    &mut |item| {
                        if let ReadItem::Doc(doc) = item {
                            if let Ok(text) = String::from_utf8(doc.bytes) {
                                let path = doc
                                    .meta
                                    .get("path")
                                    .and_then(|p| p.as_str())
                                    .unwrap_or(&doc.id)
                                    .to_string();
                                let path = path.strip_prefix(&prefix).unwrap_or(&path).to_string();
                                files.insert(path, text);
                            }
                        }
                        true
                    },
                    &never,
                )
                .map_err(|e| TaskError::Input(e.to_string()))?;
        }
        each(
            index,
            Package {
                project,
                root_depth,
                source,
                files,
            },
        )?;
    }
    Ok(())
}

/// Why a candidate was not made a program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    TooLarge,
    MissingHeader(String),
    IncludeOutside(String),
    TooManyHeaders,
}

impl Rejection {
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::TooLarge => "too_large",
            Rejection::MissingHeader(_) => "missing_header",
            Rejection::IncludeOutside(_) => "include_outside",
            Rejection::TooManyHeaders => "too_many_headers",
        }
    }
}

const MAIN_EXTENSIONS: [&str; 5] = [".cpp", ".cc", ".cxx", ".c++", ".C"];

fn has_main(text: &str) -> bool {
    static MAIN: OnceLock<Regex> = OnceLock::new();
    let re = MAIN.get_or_init(|| Regex::new(r"(?m)^\s*(?:int|auto)\s+main\s*\(").expect("valid"));
    re.is_match(text)
}

/// The system's include directories (`g++ -E -v`), to tell which `<...>` resolve.
pub fn system_include_dirs() -> Vec<PathBuf> {
    let out = std::process::Command::new("g++")
        .args([
            "-std=c++20",
            "-xc++",
            "-E",
            "-v",
            "/dev/null",
            "-o",
            "/dev/null",
        ])
        .output();
    let Ok(out) = out else { return Vec::new() };
    let text = String::from_utf8_lossy(&out.stderr);
    text.lines()
        .skip_while(|l| !l.starts_with("#include <...> search starts here:"))
        .skip(1)
        .take_while(|l| !l.starts_with("End of search list."))
        .map(|l| PathBuf::from(l.trim()))
        .collect()
}

/// Finds the programs of a package and what their includes need.
pub struct Finder<'p> {
    package: &'p Package,
    system: &'p [PathBuf],
    limits: FindLimits,
    /// File name -> paths in the package with that name.
    by_name: HashMap<&'p str, Vec<&'p str>>,
    /// Whether a `<name>` is a system header, as found so far.
    system_headers: std::sync::Mutex<HashMap<String, bool>>,
}

fn normalize(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

fn dir_of(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(d, _)| d)
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

impl<'p> Finder<'p> {
    pub fn new(package: &'p Package, system: &'p [PathBuf], limits: FindLimits) -> Self {
        let mut by_name: HashMap<&str, Vec<&str>> = HashMap::new();
        for path in package.files.keys() {
            by_name
                .entry(path.rsplit('/').next().unwrap_or(path))
                .or_default()
                .push(path);
        }
        Finder {
            package,
            system,
            limits,
            by_name,
            system_headers: Default::default(),
        }
    }

    /// Files with a `main`, in an order fixed by a hash of their paths (so that the
    /// first N are a sample of the whole package, not of its first directories).
    pub fn candidates(&self) -> Vec<&'p str> {
        let mut found: Vec<&str> = self
            .package
            .files
            .iter()
            .filter(|(p, t)| MAIN_EXTENSIONS.iter().any(|e| p.ends_with(e)) && has_main(t))
            .map(|(p, _)| p.as_str())
            .collect();
        found.sort_by_key(|p| (xxhash_rust::xxh3::xxh3_64(p.as_bytes()), *p));
        found
    }

    fn in_system(&self, name: &str) -> bool {
        if let Some(&known) = self
            .system_headers
            .lock()
            .ok()
            .and_then(|m| m.get(name).copied())
            .as_ref()
        {
            return known;
        }
        let found = self.system.iter().any(|d| d.join(name).is_file());
        if let Ok(mut m) = self.system_headers.lock() {
            m.insert(name.to_string(), found);
        }
        found
    }

    /// The package file an include names: beside the includer, then the one file in the
    /// package whose path ends with the name.
    fn in_package(&self, includer: &str, name: &str) -> Option<&'p str> {
        if let Some(p) = normalize(&join(dir_of(includer), name)) {
            if let Some((k, _)) = self.package.files.get_key_value(&p) {
                return Some(k.as_str());
            }
        }
        let base = name.rsplit('/').next().unwrap_or(name);
        let suffix = format!("/{name}");
        let matches: Vec<&&str> = self
            .by_name
            .get(base)?
            .iter()
            .filter(|p| p.ends_with(&suffix) || **p == name)
            .collect();
        (matches.len() == 1).then(|| *matches[0])
    }

    /// The project a file belongs to: the package, and in a package of several
    /// projects (a monorepo such as LLVM's, gcc's tree) its top directory.
    pub fn project_of(&self, path: &str) -> String {
        let parts: Vec<&str> = path.split('/').collect();
        match parts.get(self.package.root_depth) {
            Some(sub) if parts.len() > self.package.root_depth + 1 => {
                format!("{}/{sub}", self.package.project)
            }
            _ => self.package.project.clone(),
        }
    }

    /// The program at `path`, with the package headers it includes.
    pub fn program(&self, path: &str) -> std::result::Result<Program, Rejection> {
        let text = &self.package.files[path];
        if text.len() > self.limits.max_program_bytes {
            return Err(Rejection::TooLarge);
        }
        static INCLUDE: OnceLock<Regex> = OnceLock::new();
        let include = INCLUDE
            .get_or_init(|| Regex::new(r#"^\s*#\s*include\s*([<"])([^">]+)[">]"#).expect("valid"));
        let mut support: BTreeMap<String, String> = BTreeMap::new();
        let mut bytes = 0;
        // (real path in the package, where it is placed in the build directory, text)
        let mut queue: Vec<(String, String, &str)> =
            vec![(path.to_string(), "main.cpp".into(), text.as_str())];
        while let Some((real, placed, text)) = queue.pop() {
            let mut depth = 0i32;
            for line in text.lines() {
                let t = line.trim_start();
                if let Some(d) = t.strip_prefix('#') {
                    let d = d.trim_start();
                    if d.starts_with("if") {
                        depth += 1;
                    } else if d.starts_with("endif") {
                        depth -= 1;
                    }
                }
                let Some(c) = include.captures(line) else {
                    continue;
                };
                let (angle, name) = (&c[1] == "<", &c[2]);
                if angle && self.in_system(name) {
                    continue;
                }
                let found = self.in_package(&real, name);
                let Some(found) = found else {
                    if !angle && self.in_system(name) || depth > 0 {
                        continue; // a system header, or one the preprocessor may skip
                    }
                    return Err(Rejection::MissingHeader(name.to_string()));
                };
                // Where the compiler will look for it: beside the includer for "...",
                // under include/ (on -I) for <...>.
                let place = if angle {
                    normalize(&format!("include/{name}"))
                } else {
                    normalize(&join(dir_of(&placed), name))
                };
                let Some(place) = place.filter(|p| !p.is_empty() && p != "main.cpp") else {
                    return Err(Rejection::IncludeOutside(name.to_string()));
                };
                if support.contains_key(&place) {
                    continue;
                }
                let header = &self.package.files[found];
                if header.len() > self.limits.max_header_bytes {
                    return Err(Rejection::TooManyHeaders);
                }
                bytes += header.len();
                if bytes > self.limits.max_support_bytes {
                    return Err(Rejection::TooManyHeaders);
                }
                support.insert(place.clone(), header.clone());
                queue.push((found.to_string(), place, header.as_str()));
            }
        }
        Ok(Program {
            project: self.project_of(path),
            source: self.package.source.clone(),
            path: path.to_string(),
            text: text.clone(),
            support,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn package(files: &[(&str, &str)]) -> Package {
        Package {
            project: "p".into(),
            root_depth: 1,
            source: "p.tar".into(),
            files: files
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        }
    }

    #[test]
    fn includes_resolve_beside_then_by_unique_suffix() {
        let p = package(&[
            ("p/test/a/t.pass.cpp", "#include <vector>\n#include \"test_macros.h\"\n#include \"util/u.h\"\nint main() {}\n"),
            ("p/test/support/test_macros.h", "#pragma once\n#include \"detail.h\"\n"),
            ("p/test/support/detail.h", "#pragma once\n"),
            ("p/test/a/util/u.h", "#pragma once\n"),
            ("p/other/x.cpp", "#include \"nowhere.h\"\nint main() {}\n"),
            ("p/other/y.cpp", "#ifdef _WIN32\n#include <windows.h>\n#endif\nint main() {}\n"),
            ("p/other/lib.cpp", "int f() { return 1; }\n"),
        ]);
        let system = system_include_dirs();
        assert!(!system.is_empty());
        let finder = Finder::new(&p, &system, FindLimits::default());
        let mut found = finder.candidates();
        found.sort();
        assert_eq!(
            found,
            ["p/other/x.cpp", "p/other/y.cpp", "p/test/a/t.pass.cpp"]
        );
        let prog = finder.program("p/test/a/t.pass.cpp").unwrap();
        let placed: Vec<&str> = prog.support.keys().map(String::as_str).collect();
        assert_eq!(placed, ["detail.h", "test_macros.h", "util/u.h"]);
        assert_eq!(
            finder.program("p/other/x.cpp"),
            Err(Rejection::MissingHeader("nowhere.h".into()))
        );
        assert!(
            finder.program("p/other/y.cpp").is_ok(),
            "a conditional include may be skipped"
        );
        assert_eq!(prog.project, "p/test");
    }

    #[test]
    fn projects_are_named_after_packages() {
        assert_eq!(
            project_of(Path::new("/c/boost1.81_1.81.0.orig.tar.xz")),
            "boost1.81"
        );
        assert_eq!(
            project_of(Path::new("/c/opencv_4.6.0+dfsg.orig-contrib.tar.xz")),
            "opencv"
        );
        assert_eq!(project_of(Path::new("/src/fmt")), "fmt");
        assert_eq!(project_of(Path::new("/src/x.tar.gz")), "x");
    }
}
