//! Retrieval pairs mined from a small repository written here: what each kind pairs,
//! a split that never shares a file, BM25 and recall at 10.

use std::collections::BTreeSet;
use std::path::Path;

use cxxlm_index::retrieval::{recall_at, top_k, words};
use cxxlm_index::{mine, Bm25, Index, MineSettings, Pair, PairKind, Settings};

const VERBS: [&str; 8] = [
    "read", "write", "parse", "check", "count", "merge", "split", "sort",
];
const NOUNS: [&str; 8] = [
    "header", "packet", "buffer", "token", "record", "matrix", "string", "socket",
];

fn write(root: &Path, rel: &str, text: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// 16 modules of 4 functions `verb_noun`, each declared and documented in its header
/// and defined in its source, and an application file per module calling its functions
/// and the next module's.
fn repository(root: &Path) {
    let names: Vec<(String, &str, &str)> = VERBS
        .iter()
        .flat_map(|v| NOUNS.iter().map(move |n| (format!("{v}_{n}"), *v, *n)))
        .collect();
    for (m, module) in names.chunks(4).enumerate() {
        let mut header = String::from("#pragma once\n");
        let mut source = format!("#include \"mod_{m}.h\"\n");
        for (name, verb, noun) in module {
            header += &format!(
                "\n/// Uses the {noun} given to {verb} it in place; returns how many bytes were used.\nint {name}(char* {noun}, int size);\n"
            );
            source += &format!(
                "\nint {name}(char* {noun}, int size) {{\n    int {verb}_total = 0;\n    for (int i = 0; i < size; ++i) {verb}_total += {noun}[i];\n    return {verb}_total;\n}}\n"
            );
        }
        write(root, &format!("include/mod_{m}.h"), &header);
        write(root, &format!("src/mod_{m}.cpp"), &source);
        let next = &names[((m + 1) % 16) * 4].0;
        let mut app = format!("#include \"mod_{m}.h\"\n#include \"mod_{}.h\"\n\nint app_{m}(char* data, int size) {{\n    int used = 0;\n", (m + 1) % 16);
        for (name, _, _) in module {
            app += &format!("    used += {name}(data, size);\n\n\n\n");
        }
        app += &format!("    used += {next}(data, size);\n    return used;\n}}\n");
        write(root, &format!("app/app_{m}.cpp"), &app);
    }
}

#[test]
fn pairs_split_and_recall() {
    let dir = tempfile::tempdir().unwrap();
    repository(dir.path());
    let index = Index::build(dir.path(), None, &Settings::default(), None, |_, _| {}).unwrap();
    // Nothing held out first: every pair is kept.
    let all = MineSettings {
        held_out_percent: 0,
        ..MineSettings::default()
    };
    let mined = mine(&index, &all);
    // 64 definitions plus the 16 application functions.
    assert_eq!(mined.candidates.len(), 80);
    let target = |name: &str| {
        mined
            .candidates
            .iter()
            .position(|c| c.name == name)
            .unwrap()
    };
    let of_kind = |kind| mined.pairs.iter().filter(move |p| p.kind == kind);

    // Each documented declaration gives a doc comment pair and a declaration pair that
    // lead to the definition in the source file, not to the header.
    let doc = of_kind(PairKind::DocComment)
        .find(|p| p.target == target("parse_token"))
        .expect("parse_token's doc comment");
    assert_eq!(
        doc.query,
        "Uses the token given to parse it in place; returns how many bytes were used."
    );
    assert_eq!(mined.candidates[doc.target].file, "src/mod_4.cpp");
    assert!(mined.candidates[doc.target]
        .text
        .starts_with("int parse_token(char* token, int size) {"));
    let decl = of_kind(PairKind::Declaration)
        .find(|p| p.target == target("parse_token"))
        .expect("parse_token's declaration");
    assert_eq!(decl.query, "int parse_token(char* token, int size);");
    assert_eq!(decl.file, "include/mod_4.h");

    // A call site comes with the lines around it.
    let call = of_kind(PairKind::CallSite)
        .find(|p| p.target == target("parse_token"))
        .expect("parse_token's call");
    assert_eq!(call.file, "app/app_4.cpp");
    assert!(call.query.contains("    used += parse_token(data, size);"));
    assert_eq!(mined.pairs.len(), 64 * 2 + 80);
    assert!(mined.dropped.is_empty(), "{:?}", mined.dropped);

    // A fifth held out: a pair whose two files fall in different splits is dropped.
    let mined = mine(&index, &MineSettings::default());
    assert_eq!(
        mined.pairs.len() + mined.dropped["pair_straddles_split"],
        64 * 2 + 80
    );

    // Held-out and training pairs share no file, and both exist.
    let files = |held_out: bool| -> BTreeSet<&str> {
        mined
            .pairs
            .iter()
            .filter(|p| p.held_out == held_out)
            .flat_map(|p| [p.file.as_str(), mined.candidates[p.target].file.as_str()])
            .collect()
    };
    assert!(!files(true).is_empty() && !files(false).is_empty());
    assert!(files(true).is_disjoint(&files(false)));

    // BM25 over the candidates finds a declaration's definition first; recall at 10 on
    // the held-out pairs counts each kind.
    let bm25 = Bm25::new(mined.candidates.iter().map(|c| c.text.as_str()));
    assert_eq!(top_k(&bm25.scores(&decl.query), 1), vec![decl.target]);
    let held_out: Vec<&Pair> = mined.held_out().collect();
    let queries: Vec<&str> = held_out.iter().map(|p| p.query.as_str()).collect();
    let recall = recall_at(&held_out, 10, &bm25.rank(&queries, 10));
    assert_eq!(recall.pairs, held_out.len());
    assert!(recall.found > 0 && recall.found <= recall.pairs);
    assert_eq!(
        recall.by_kind.values().map(|(_, n)| n).sum::<usize>(),
        recall.pairs
    );
    // A ranking that knows nothing finds a target only where it happens to be among the
    // first ten candidates.
    let blind = recall_at(&held_out, 10, &vec![(0..10).collect(); held_out.len()]);
    assert!(blind.found < recall.found, "{blind:?} {recall:?}");
}

#[test]
fn a_file_changed_since_indexing_is_left_out() {
    let dir = tempfile::tempdir().unwrap();
    repository(dir.path());
    let index = Index::build(dir.path(), None, &Settings::default(), None, |_, _| {}).unwrap();
    write(dir.path(), "src/mod_0.cpp", "int changed() { return 0; }\n");
    let mined = mine(&index, &MineSettings::default());
    assert_eq!(mined.dropped.get("file_changed_since_indexed"), Some(&1));
    assert!(mined.candidates.iter().all(|c| c.file != "src/mod_0.cpp"));
    assert_eq!(mined.candidates.len(), 76);
}

#[test]
fn words_split_identifiers() {
    assert_eq!(
        words("getValue(raw_buffer_size) x StringRef"),
        vec![
            "get",
            "value",
            "getvalue",
            "raw",
            "buffer",
            "size",
            "raw_buffer_size",
            "string",
            "ref",
            "stringref"
        ]
    );
}
