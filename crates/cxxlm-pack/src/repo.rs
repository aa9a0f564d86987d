//! Repository-level examples, as StarCoder2 and Qwen2.5-Coder pretrain on them: the files of
//! one repository in one sequence, `<|repo_name|>name` then `<|file_sep|>path\ncode` per
//! file, each header before the files that include it, cut into examples of at most a
//! context of tokens (each again headed by the repository's name). Fill-in-the-middle
//! hides a span of one file with the rest of the example around it.

use cxxlm_index::includes::{normalize, Resolver};
use cxxlm_index::parse::Include;
use cxxlm_tokenizer::PieceCache;
use serde_json::{Map, Value};

use crate::fim::{Layout, Packer};
use crate::rng::Rng;
use crate::{PackError, Result};

/// Tokens reserved in an example for what fill-in-the-middle adds: its three specials and
/// the tokens that cutting merged pieces apart can add.
const FIM_MARGIN: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RepoConfig {
    /// Tokens an example holds at most (a file longer than that is an example alone).
    pub context: usize,
    /// Share of repositories (chosen by a hash of their name) packed file by file
    /// instead, so that short documents stay in the mix.
    pub file_share: f64,
}

/// The repository a document comes from and its path there, from what the data stage
/// recorded: the git checkout (`meta.repo`) or archive (`meta.archive`) it was read from,
/// else the folder holding it.
pub fn locate(id: &str, meta: &Map<String, Value>) -> (String, String) {
    let path = meta.get("path").and_then(Value::as_str).unwrap_or(id);
    let text = |key: &str| meta.get(key).and_then(Value::as_str);
    match text("repo").or_else(|| text("archive")) {
        Some(source) => {
            let name = source.trim_end_matches('/');
            let name = name.rsplit('/').next().unwrap_or(name);
            (name.to_string(), path.to_string())
        }
        None => {
            let folder = path.rsplit_once('/').map_or("", |(d, _)| d);
            (folder.to_string(), path.to_string())
        }
    }
}

/// The `#include`s of a file, read line by line (directives, not a C++ parse), leaving out
/// those inside block comments and in `#if 0` branches.
pub fn includes(text: &str) -> Vec<Include> {
    let mut out = Vec::new();
    let mut in_comment = false;
    // Open `#if`s since a `#if 0` (0: not in one).
    let mut disabled = 0usize;
    for (i, line) in text.lines().enumerate() {
        let starts_in_comment = in_comment;
        in_comment = ends_in_comment(line, in_comment);
        if starts_in_comment {
            continue;
        }
        let Some(directive) = line.trim_start().strip_prefix('#') else {
            continue;
        };
        let directive = directive.trim_start();
        let word = directive
            .split(|c: char| !c.is_ascii_alphanumeric())
            .next()
            .unwrap_or("");
        match word {
            "if" | "ifdef" | "ifndef" if disabled > 0 => disabled += 1,
            "if" if directive[2..].trim_start().starts_with('0') => disabled = 1,
            "endif" if disabled > 0 => disabled -= 1,
            "else" | "elif" if disabled == 1 => disabled = 0,
            _ => {}
        }
        if disabled > 0 || word != "include" {
            continue;
        }
        let rest = directive["include".len()..].trim_start();
        let (angle, close) = match rest.chars().next() {
            Some('"') => (false, '"'),
            Some('<') => (true, '>'),
            _ => continue,
        };
        if let Some(end) = rest[1..].find(close) {
            out.push(Include {
                path: rest[1..1 + end].to_string(),
                angle,
                line: i as u32 + 1,
            });
        }
    }
    out
}

/// Whether a block comment is open at the end of `line`, given whether one was at its
/// start (string and character literals and `//` comments are read past).
fn ends_in_comment(line: &str, mut open: bool) -> bool {
    let b = line.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if open {
            if b[i..].starts_with(b"*/") {
                open = false;
                i += 2;
            } else {
                i += 1;
            }
            continue;
        }
        match b[i] {
            b'/' if b[i..].starts_with(b"//") => return false,
            b'/' if b[i..].starts_with(b"/*") => {
                open = true;
                i += 2;
            }
            q @ (b'"' | b'\'') => {
                i += 1;
                while i < b.len() && b[i] != q {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    open
}

/// The order of `files` (path, text) in which every file comes after the files of the
/// set it includes (resolved as `cxxlm index` resolves them); among files free to go,
/// and to break include cycles, by path.
pub fn include_order(files: &[(String, String)]) -> Vec<usize> {
    let paths: Vec<String> = files.iter().map(|(p, _)| normalize(p)).collect();
    let resolver = Resolver::new(paths.iter().map(String::as_str), &[]);
    let index: std::collections::HashMap<&str, usize> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| (p.as_str(), i))
        .collect();
    let needs: Vec<Vec<usize>> = files
        .iter()
        .zip(&paths)
        .map(|((_, text), path)| {
            let mut n: Vec<usize> = includes(text)
                .iter()
                .filter_map(|inc| resolver.resolve(path, inc))
                .map(|found| index[found])
                .filter(|&j| paths[j] != *path)
                .collect();
            n.sort_unstable();
            n.dedup();
            n
        })
        .collect();
    let mut by_path: Vec<usize> = (0..files.len()).collect();
    by_path.sort_by(|&a, &b| paths[a].cmp(&paths[b]));
    // Depth-first from each file in path order, placing what it includes first; a file
    // met again while being placed closes a cycle and waits where it is.
    let (mut placed, mut open) = (vec![false; files.len()], vec![false; files.len()]);
    let mut order = Vec::with_capacity(files.len());
    for &start in &by_path {
        let mut stack = vec![(start, 0)];
        while let Some((file, next)) = stack.pop() {
            if placed[file] {
                continue;
            }
            open[file] = true;
            match needs[file].get(next) {
                Some(&dep) => {
                    stack.push((file, next + 1));
                    if !placed[dep] && !open[dep] {
                        stack.push((dep, 0));
                    }
                }
                None => {
                    placed[file] = true;
                    order.push(file);
                }
            }
        }
    }
    order
}

fn extend(out: &mut Vec<u32>, parts: &[Part]) {
    for p in parts {
        match p {
            Part::Special(id) => out.push(*id),
            Part::Tokens(t) => out.extend_from_slice(t),
        }
    }
}

/// One packed repository example and what it holds.
pub struct RepoExample {
    pub tokens: Vec<u32>,
    pub layout: Layout,
    /// Bytes of text (names, paths and code).
    pub text_bytes: usize,
    pub files: usize,
}

/// The parts of an example: special tokens, and the tokens of texts between them.
enum Part<'t> {
    Special(u32),
    Tokens(&'t [u32]),
}

impl Packer<'_> {
    /// The examples of repository `name` with `files` (path, text), in include order, cut
    /// at `context` tokens; each rearranged for fill-in-the-middle with probability
    /// `rate` (a span of one of its files, drawn from a generator keyed by the name and
    /// the example's number).
    pub fn repository(
        &self,
        name: &str,
        files: &[(String, String)],
        context: usize,
        rate: f64,
        cache: &mut PieceCache,
    ) -> Vec<RepoExample> {
        let s = self.specials;
        let rendered: Vec<String> = files.iter().map(|(p, t)| format!("{p}\n{t}")).collect();
        let encoded: Vec<Vec<u32>> = rendered
            .iter()
            .map(|r| self.bpe.encode_cached(r, cache))
            .collect();
        let name_tokens = self.bpe.encode_cached(name, cache);
        let budget = context.saturating_sub(FIM_MARGIN + 3 + name_tokens.len());
        let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
        let mut used = 0;
        for i in include_order(files) {
            let n = encoded[i].len() + 1;
            if used > 0 && used + n > budget {
                groups.push(Vec::new());
                used = 0;
            }
            groups.last_mut().expect("a group").push(i);
            used += n;
        }
        groups
            .iter()
            .enumerate()
            .filter(|(_, g)| !g.is_empty())
            .map(|(k, group)| {
                let mut parts = vec![Part::Special(s.repo_name), Part::Tokens(&name_tokens)];
                for &i in group {
                    parts.push(Part::Special(s.file_sep));
                    parts.push(Part::Tokens(&encoded[i]));
                }
                let key = format!("{name}\n{k}");
                let mut rng = Rng::keyed(self.fim.seed, key.as_bytes());
                let layout = self.layout(&mut rng, rate);
                let tokens = match layout {
                    Layout::Plain => {
                        let mut out = vec![s.bos];
                        extend(&mut out, &parts);
                        out.push(s.eos);
                        out
                    }
                    _ => {
                        // A span of the code of one file (not its path).
                        let f = group[rng.below(group.len() as u64) as usize];
                        let at = 3 + 2 * group.iter().position(|&i| i == f).expect("in group");
                        let text = &rendered[f];
                        let code = text.find('\n').map_or(text.len(), |n| n + 1);
                        let (lo, hi) = self.cut_points(&text[code..], &mut rng);
                        let (lo, hi) = (code + lo, code + hi);
                        let mut prefix = Vec::new();
                        extend(&mut prefix, &parts[..at]);
                        prefix.extend(self.bpe.encode_cached(&text[..lo], cache));
                        let middle = self.bpe.encode_cached(&text[lo..hi], cache);
                        let mut suffix = self.bpe.encode_cached(&text[hi..], cache);
                        extend(&mut suffix, &parts[at + 1..]);
                        self.arrange(layout, &prefix, &middle, &suffix)
                    }
                };
                RepoExample {
                    tokens,
                    layout,
                    text_bytes: name.len()
                        + group.iter().map(|&i| rendered[i].len()).sum::<usize>(),
                    files: group.len(),
                }
            })
            .collect()
    }

    /// A repository example's name and files (path, text) back from its tokens, in any
    /// layout.
    pub fn restore_repository(&self, tokens: &[u32]) -> Result<(String, Vec<(String, String)>)> {
        let s = self.specials;
        let bad = |m: &str| PackError::Fim(m.to_string());
        let body = self.in_order(tokens)?;
        let body = body
            .strip_prefix(&[s.repo_name])
            .ok_or_else(|| bad("a repository example starts with <|repo_name|>"))?;
        let text = |t: &[u32]| String::from_utf8_lossy(&self.bpe.decode(t)).into_owned();
        let mut pieces = body.split(|&t| t == s.file_sep);
        let name = text(pieces.next().unwrap_or_default());
        let files = pieces
            .map(|piece| {
                let file = text(piece);
                let (path, code) = file.split_once('\n').unwrap_or((&file, ""));
                (path.to_string(), code.to_string())
            })
            .collect();
        Ok((name, files))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fim::FimConfig;
    use cxxlm_tokenizer::Trainer;

    fn file(path: &str, text: &str) -> (String, String) {
        (path.to_string(), text.to_string())
    }

    /// A small repository: a library header included by another header and by sources,
    /// a header included only by a test, and a cycle of two headers.
    fn repository() -> Vec<(String, String)> {
        vec![
            file("src/main.cpp", "#include \"geometry/shape.h\"\n#include <vector>\nint main() { return area(Square{2}); }\n"),
            file("include/geometry/point.h", "#pragma once\nstruct Point { int x, y; };\n"),
            file("include/geometry/shape.h", "#pragma once\n  #  include \"point.h\"\nstruct Square { int side; };\nint area(Square s);\n"),
            file("src/shape.cpp", "#include <geometry/shape.h>\nint area(Square s) { return s.side * s.side; }\n"),
            file("tests/a.h", "#include \"b.h\"\nstruct A;\n"),
            file("tests/b.h", "#include \"a.h\"\nstruct B;\n"),
            file("tests/shape_test.cpp", "#include \"a.h\"\n#include \"../src/shape.cpp\"\n#if 0\n#include \"missing.h\"\n#endif\nint t() { return area(Square{3}) == 9; }\n"),
        ]
    }

    #[test]
    fn includes_in_comments_and_disabled_branches_do_not_count() {
        let text = "#include \"a.h\"\n/* old:\n#include \"gone.h\"\n*/ int x; // /*\n\
                    #if 0\n#include \"off.h\"\n#ifdef X\n#include \"off2.h\"\n#endif\n\
                    #else\n#include \"b.h\"\n#endif\nconst char* s = \"/*\";\n#include <c.h>\n";
        let found: Vec<String> = includes(text).into_iter().map(|i| i.path).collect();
        assert_eq!(found, ["a.h", "b.h", "c.h"]);
    }

    #[test]
    fn headers_come_before_the_files_that_include_them() {
        let files = repository();
        let order: Vec<&str> = include_order(&files)
            .iter()
            .map(|&i| files[i].0.as_str())
            .collect();
        assert_eq!(order.len(), files.len());
        let at = |p: &str| order.iter().position(|&o| o == p).unwrap();
        assert!(at("include/geometry/point.h") < at("include/geometry/shape.h"));
        assert!(
            at("include/geometry/shape.h") < at("src/main.cpp"),
            "{order:?}"
        );
        assert!(
            at("include/geometry/shape.h") < at("src/shape.cpp"),
            "angle, by suffix"
        );
        assert!(
            at("src/shape.cpp") < at("tests/shape_test.cpp"),
            "a relative ../ path"
        );
        assert!(
            at("tests/a.h") < at("tests/shape_test.cpp")
                && at("tests/b.h") < at("tests/shape_test.cpp")
        );
        assert_eq!(
            order,
            [
                "include/geometry/point.h",
                "include/geometry/shape.h",
                "src/main.cpp",
                "src/shape.cpp",
                "tests/b.h",
                "tests/a.h",
                "tests/shape_test.cpp"
            ],
            "ties and the a.h <-> b.h cycle broken by path"
        );
        let found: Vec<(String, bool)> = includes(&files[6].1)
            .into_iter()
            .map(|i| (i.path, i.angle))
            .collect();
        assert_eq!(found[0], ("a.h".to_string(), false));
        assert_eq!(
            found.len(),
            2,
            "an include of a disabled branch does not count"
        );
    }

    #[test]
    fn repository_examples_round_trip_in_every_layout() {
        let files = repository();
        let texts: Vec<String> = files.iter().map(|(_, t)| t.clone()).collect();
        let mut t = Trainer::new(700).unwrap();
        t.feed(&texts);
        let bpe = t.train().unwrap();
        let mut cache = PieceCache::default();
        for (seed, rate, context) in [(0, 0.0, 4096), (1, 1.0, 4096), (2, 1.0, 60), (3, 0.0, 60)] {
            let fim = FimConfig {
                seed,
                ..FimConfig::default()
            };
            let packer = Packer::new(&bpe, fim);
            let examples = packer.repository("geometry", &files, context, rate, &mut cache);
            let mut back = Vec::new();
            for e in &examples {
                assert_eq!(e.tokens[0], packer.specials.bos);
                assert_eq!(*e.tokens.last().unwrap(), packer.specials.eos);
                assert_eq!(e.layout == Layout::Plain, rate == 0.0);
                if context == 4096 {
                    assert_eq!(examples.len(), 1);
                } else if e.files > 1 {
                    assert!(e.tokens.len() <= context, "{} tokens", e.tokens.len());
                }
                let (name, restored) = packer.restore_repository(&e.tokens).unwrap();
                assert_eq!(name, "geometry");
                assert_eq!(restored.len(), e.files);
                back.extend(restored);
            }
            if context == 60 {
                assert!(examples.len() > 2, "cut into several examples");
            }
            let order = include_order(&files);
            let want: Vec<(String, String)> = order.iter().map(|&i| files[i].clone()).collect();
            assert_eq!(back, want, "seed {seed}, rate {rate}, context {context}");
        }
    }

    #[test]
    fn documents_are_placed_in_their_repository() {
        let meta = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), Value::from(*v)))
                .collect::<Map<String, Value>>()
        };
        let git = meta(&[
            ("source", "git"),
            ("repo", "/src/fmt/"),
            ("path", "include/fmt/core.h"),
        ]);
        assert_eq!(
            locate("x", &git),
            ("fmt".into(), "include/fmt/core.h".into())
        );
        let tar = meta(&[
            ("archive", "corpus/grpc_1.51.orig.tar.gz"),
            ("path", "grpc/src/a.cc"),
        ]);
        assert_eq!(
            locate("x", &tar),
            ("grpc_1.51.orig.tar.gz".into(), "grpc/src/a.cc".into())
        );
        let plain = meta(&[("path", "/usr/include/c++/12/vector")]);
        assert_eq!(
            locate("x", &plain),
            (
                "/usr/include/c++/12".into(),
                "/usr/include/c++/12/vector".into()
            )
        );
    }
}
