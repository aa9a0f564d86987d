//! The edit guard: a translation unit checked with `g++ -fsyntax-only` and the flags the
//! project compiles it with (its compile_commands.json entry; a file without one, such as
//! a header, takes the first entry's), in the sandbox with
//! the repository mounted read-only at `/repo`. The text checked is given, so the file
//! itself is changed only once its edit is accepted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cxxlm_eval::sandbox::{Limits, Sandbox};

use crate::AgentError;

/// Where the repository appears inside the sandbox.
const REPO: &str = "/repo";
/// The file checked, inside the sandbox's scratch folder.
const CHECKED: &str = "checked";

pub struct Guard {
    sandbox: Sandbox,
    root: PathBuf,
    /// Flags per file (relative path), and those for files without an entry.
    entries: Vec<(String, Vec<String>)>,
    default_flags: Vec<String>,
}

/// The outcome of a check: whether it parsed, and g++'s errors when not.
#[derive(Debug, Clone, PartialEq)]
pub struct Parse {
    pub ok: bool,
    pub errors: String,
}

impl Guard {
    pub fn new(root: &Path) -> Result<Guard, AgentError> {
        let sandbox = Sandbox::new(Limits {
            cpu_seconds: 30,
            wall: Duration::from_secs(60),
            memory_bytes: 4 << 30,
            ..Limits::default()
        })?
        .with_read_only(root, REPO);
        let entries = compile_commands(root)?;
        let default_flags = entries.first().map(|(_, f)| f.clone()).unwrap_or_default();
        Ok(Guard {
            sandbox,
            root: root.to_path_buf(),
            entries,
            default_flags,
        })
    }

    /// Checks `text` as the file `rel` of the repository.
    pub fn check(&self, rel: &str, text: &str) -> Result<Parse, AgentError> {
        let scratch = tempfile::tempdir().map_err(|e| AgentError::io("a scratch folder", e))?;
        let file = scratch.path().join(CHECKED);
        std::fs::write(&file, text).map_err(|e| AgentError::io(&file, e))?;
        let flags = self
            .entries
            .iter()
            .find(|(f, _)| f == rel)
            .map_or(&self.default_flags, |(_, f)| f);
        let folder = Path::new(rel).parent().unwrap_or(Path::new(""));
        let quoted = format!("-iquote{REPO}/{}", folder.display());
        let mut argv = vec![
            "/usr/bin/g++",
            "-fsyntax-only",
            "-x",
            "c++",
            quoted.as_str(),
        ];
        argv.extend(flags.iter().map(String::as_str));
        argv.push(CHECKED);
        let out = self.sandbox.run(scratch.path(), &argv, b"")?;
        let errors: Vec<String> = String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| l.contains("error"))
            .take(10)
            .map(|l| l.replacen(CHECKED, rel, 1))
            .collect();
        Ok(Parse {
            ok: out.success(),
            errors: errors.join("\n"),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// The flags of each compile_commands.json entry inside the repository that matter to a
/// parse (include folders, macros, the standard, `-f`/`-m` options), with the
/// repository's paths moved to where the sandbox shows it.
fn compile_commands(root: &Path) -> Result<Vec<(String, Vec<String>)>, AgentError> {
    let Some(path) = ["compile_commands.json", "build/compile_commands.json"]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.is_file())
    else {
        return Ok(Vec::new());
    };
    let bad = |message: String| AgentError::Input(format!("{}: {message}", path.display()));
    let text = std::fs::read_to_string(&path).map_err(|e| AgentError::io(&path, e))?;
    let entries: Vec<serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| bad(format!("not a compilation database: {e}")))?;
    let root_text = root.to_string_lossy().into_owned();
    let inside = |p: &str, dir: &str| -> String {
        let absolute = match Path::new(p).is_absolute() {
            true => p.to_string(),
            false => format!("{dir}/{p}"),
        };
        let absolute = cxxlm_index::includes::normalize(&absolute);
        let absolute = format!("/{}", absolute.trim_start_matches('/'));
        match absolute.strip_prefix(&root_text) {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => format!("{REPO}{rest}"),
            _ => absolute,
        }
    };
    let mut out = Vec::new();
    for entry in &entries {
        let dir = cxxlm_index::includes::command_directory(entry);
        let Some(file) = entry.get("file").and_then(|f| f.as_str()) else {
            continue;
        };
        let Some(args) = cxxlm_index::includes::command_arguments(entry) else {
            continue;
        };
        let mut flags = Vec::new();
        let mut i = 1;
        while i < args.len() {
            let a = &args[i];
            i += 1;
            let with_path = ["-I", "-isystem", "-iquote", "-idirafter", "-include"]
                .into_iter()
                .find(|f| a.starts_with(f));
            match with_path {
                Some(flag) => {
                    let value = match a.len() > flag.len() {
                        true => a[flag.len()..].to_string(),
                        false => {
                            i += 1;
                            args.get(i - 1).cloned().unwrap_or_default()
                        }
                    };
                    flags.push(flag.to_string());
                    flags.push(inside(&value, dir));
                }
                None if a.starts_with("-D") || a.starts_with("-U") || a.starts_with("-std=") => {
                    flags.push(a.clone())
                }
                None if (a.starts_with("-f") || a.starts_with("-m"))
                    && !a.starts_with("-fsyntax") =>
                {
                    flags.push(a.clone())
                }
                None => {}
            }
        }
        let file = inside(file, dir);
        if let Some(rel) = file.strip_prefix(&format!("{REPO}/")) {
            out.push((rel.to_string(), flags));
        }
    }
    Ok(out)
}
