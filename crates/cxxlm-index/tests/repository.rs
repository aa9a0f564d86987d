//! A small repository written here, indexed, changed, refreshed and compared with a
//! fresh build; its ranking at a call site; a damaged index; bad files.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use cxxlm_index::watch::watch;
use cxxlm_index::{Change, Cursor, Graph, Index, IndexError, Settings, Store};

fn write(root: &Path, rel: &str, text: impl AsRef<[u8]>) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// Lines of a file before `marker`'s line, plus one: its 1-based line.
fn line_of(root: &Path, rel: &str, marker: &str) -> u32 {
    let text = std::fs::read_to_string(root.join(rel)).unwrap();
    text.lines().position(|l| l.contains(marker)).unwrap() as u32 + 1
}

/// A geometry library, a logger every file calls, a checksum nobody near the cursor
/// uses, and a main whose cursor sits on a call to `distance`.
fn repository() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    write(
        &root,
        "include/geo/point.h",
        "#pragma once\nstruct Point {\n    double x, y;\n};\ndouble distance(const Point& a, const Point& b);\n",
    );
    write(
        &root,
        "src/point.cpp",
        "#include \"geo/point.h\"\n#include <cmath>\n\ndouble distance(const Point& a, const Point& b) {\n    double dx = a.x - b.x, dy = a.y - b.y;\n    return std::sqrt(dx * dx + dy * dy);\n}\n",
    );
    write(
        &root,
        "src/log.h",
        "#pragma once\nvoid log_message(const char* text);\nvoid log_flush();\n",
    );
    write(
        &root,
        "src/log.cpp",
        "#include \"log.h\"\n#include <cstdio>\nvoid log_message(const char* text) { std::puts(text); }\nvoid log_flush() { std::fflush(stdout); }\n",
    );
    write(
        &root,
        "src/checksum.cpp",
        "unsigned compute_checksum(const char* data, unsigned n) {\n    unsigned sum = 0;\n    for (unsigned i = 0; i < n; ++i) sum = sum * 31 + data[i];\n    return sum;\n}\n",
    );
    for (i, name) in ["src/a.cpp", "src/b.cpp", "src/c.cpp"].iter().enumerate() {
        let calls = "    log_message(\"step\");\n    log_flush();\n".repeat(5);
        write(
            &root,
            name,
            format!(
                "#include \"log.h\"\nunsigned compute_checksum(const char*, unsigned);\nvoid task_{i}() {{\n{calls}    compute_checksum(\"x\", 1);\n}}\n"
            ),
        );
    }
    let filler = "// notes\n".repeat(40);
    write(
        &root,
        "src/main.cpp",
        format!(
            "#include \"geo/point.h\"\n#include \"log.h\"\n\nvoid report() {{\n    log_message(\"start\");\n    log_flush();\n}}\n{filler}\nint main() {{\n    Point p{{0, 0}}, q{{3, 4}};\n    double d = distance(p, q); // CURSOR\n    return d > 4.0 ? 0 : 1;\n}}\n"
        ),
    );
    (dir, root)
}

fn settings() -> Settings {
    Settings {
        max_bytes: 64 << 10,
        ..Settings::default()
    }
}

fn build(root: &Path, store: &Path) -> Index {
    Index::build(root, Some(store), &settings(), None, |_, _| {}).unwrap()
}

#[test]
fn definitions_references_and_includes_of_a_repository() {
    let (_d, root) = repository();
    let index = build(&root, &root.join(".cxxlm-index"));
    assert_eq!(index.files().len(), 9);
    let view = index.view();
    let point = &view["src/point.cpp"];
    assert!(point.defs.iter().any(|d| d.0 == "distance"), "{point:?}");
    assert_eq!(view["src/a.cpp"].refs.get("log_message"), Some(&5));
    let graph = Graph::new(&index);
    assert_eq!(
        graph.includes_of("src/main.cpp"),
        vec!["include/geo/point.h", "src/log.h"]
    );
    // Found without compile_commands.json by its path suffix, and with it through -I.
    assert_eq!(
        graph.includes_of("src/point.cpp"),
        vec!["include/geo/point.h"]
    );
}

#[test]
fn the_call_at_the_cursor_ranks_above_what_the_repository_uses_most() {
    let (_d, root) = repository();
    let index = build(&root, &root.join(".cxxlm-index"));
    let graph = Graph::new(&index);
    let position =
        |r: &cxxlm_index::Ranking, name: &str| r.definitions.iter().position(|d| d.name == name);
    // Without a cursor the logger, called everywhere, leads.
    let global = graph.rank(&Cursor::default(), 20);
    let (log, dist) = (
        position(&global, "log_message"),
        position(&global, "distance"),
    );
    assert!(
        log.is_some() && (dist.is_none() || log < dist),
        "{:#?}",
        global.definitions
    );

    let line = line_of(&root, "src/main.cpp", "CURSOR");
    let cursor = Cursor {
        file: Some("src/main.cpp".into()),
        line: Some(line),
        ..Cursor::default()
    };
    let ranked = graph.rank(&cursor, 20);
    // The function called leads (its declaration and its definition), then the type
    // of its arguments.
    assert_eq!(
        ranked.definitions[0].name, "distance",
        "{:#?}",
        ranked.definitions
    );
    let dist = position(&ranked, "distance").unwrap();
    assert!(
        position(&ranked, "Point").unwrap() <= 2,
        "{:#?}",
        ranked.definitions
    );
    for other in ["log_message", "compute_checksum", "log_flush"] {
        if let Some(p) = position(&ranked, other) {
            assert!(
                dist < p,
                "{other} ranks above distance: {:#?}",
                ranked.definitions
            );
        }
    }
    // The symbol asked for leads whatever the cursor.
    let asked = graph.rank(
        &Cursor {
            symbols: vec!["compute_checksum".into()],
            ..cursor.clone()
        },
        20,
    );
    assert_eq!(
        asked.definitions[0].name, "compute_checksum",
        "{:#?}",
        asked.definitions
    );
    let chunks = cxxlm_index::chunks(&root, &ranked.definitions, 40, 4096, |_, _| false);
    assert!(chunks[0].text.contains("double distance("), "{chunks:#?}");
}

#[test]
fn refreshed_index_equals_a_fresh_build() {
    let (_d, root) = repository();
    let store_dir = root.join(".cxxlm-index");
    let mut index = build(&root, &store_dir);
    let mut store = Store::save(&store_dir, &index).unwrap();

    // A function added, a file deleted, one created in a new folder, one made binary.
    std::thread::sleep(Duration::from_millis(20));
    write(
        &root,
        "src/main.cpp",
        "#include \"geo/point.h\"\nint scale(int v) { return 2 * v; }\nint main() { return scale(1); }\n",
    );
    std::fs::remove_file(root.join("src/c.cpp")).unwrap();
    write(
        &root,
        "src/extra/new.cpp",
        "int fresh_function() { return 1; }\n",
    );
    write(&root, "src/b.cpp", b"int x;\0\0\0binary");
    let mut changes = Vec::new();
    for p in [
        "src/main.cpp",
        "src/c.cpp",
        "src/extra",
        "src/b.cpp",
        "notes.txt",
    ] {
        changes.extend(index.refresh(&root.join(p), &settings()));
    }
    let kinds: Vec<(&str, &Change)> = changes.iter().map(|(p, c)| (p.as_str(), c)).collect();
    assert!(
        matches!(kinds[0], ("src/main.cpp", Change::Parsed { defs: 2, .. })),
        "{kinds:?}"
    );
    assert_eq!(kinds[1], ("src/c.cpp", &Change::Removed));
    assert!(
        matches!(kinds[2], ("src/extra/new.cpp", Change::Parsed { .. })),
        "{kinds:?}"
    );
    assert_eq!(
        kinds[3],
        ("src/b.cpp", &Change::Skipped(cxxlm_index::Skip::Binary))
    );
    assert_eq!(kinds.len(), 4, "{kinds:?}");
    store.record(&index, &changes).unwrap();

    let fresh = build(&root, &store_dir);
    assert_eq!(index.view(), fresh.view());
    assert_eq!(index.skipped(), fresh.skipped());
    // What was stored (snapshot and journal) reads back as the same index.
    let (loaded, _) = Store::load(&store_dir).unwrap();
    assert_eq!(loaded.view(), fresh.view());
    assert_eq!(loaded.skipped(), fresh.skipped());
    // A folder removed takes its files with it (its skipped ones too), whether the
    // folder's event or its files' come first.
    write(&root, "src/extra/deeper/bad.h", b"\xff\xfe");
    write(&root, "src/extra/deeper/more.h", "int more();\n");
    index.refresh(&root.join("src/extra/deeper"), &settings());
    assert_eq!(index.skip_counts().get("not_utf8"), Some(&1));
    std::fs::remove_dir_all(root.join("src/extra")).unwrap();
    let gone = index.refresh(&root.join("src/extra/deeper/more.h"), &settings());
    assert_eq!(
        gone,
        vec![("src/extra/deeper/more.h".to_string(), Change::Removed)]
    );
    let gone = index.refresh(&root.join("src/extra"), &settings());
    assert_eq!(
        gone,
        vec![
            ("src/extra/new.cpp".to_string(), Change::Removed),
            ("src/extra/deeper/bad.h".to_string(), Change::Removed),
        ]
    );
    assert_eq!(index.view(), build(&root, &store_dir).view());
    assert_eq!(index.skipped(), build(&root, &store_dir).skipped());
}

#[test]
fn the_watcher_refreshes_a_saved_file() {
    let (_d, root) = repository();
    let store_dir = root.join(".cxxlm-index");
    let (mut index, mut store, built) =
        cxxlm_index::watch::open_or_build(&root, &store_dir, &settings(), |_, _| {}).unwrap();
    assert!(built);
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let watching = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            watch(
                &mut index,
                &mut store,
                &settings(),
                &stop,
                || {},
                |_, r| {
                    let _ = tx.send(r.changes.clone());
                },
            )
            .unwrap();
            index
        })
    };
    // inotify's watches are in place once the watcher thread is past `watch`: give it
    // a moment, then save until a refresh is reported.
    let mut refreshed = None;
    for attempt in 0..50 {
        write(
            &root,
            "src/log.cpp",
            format!(
                "void log_message(const char*) {{}}\nint attempt_{attempt}() {{ return 0; }}\n"
            ),
        );
        if let Ok(changes) = rx.recv_timeout(Duration::from_millis(200)) {
            refreshed = Some(changes);
            break;
        }
    }
    let changes = refreshed.expect("a saved file is refreshed");
    assert_eq!(changes[0].0, "src/log.cpp");
    // Let the last save's events arrive, then stop.
    while rx.recv_timeout(Duration::from_millis(300)).is_ok() {}
    stop.store(true, Ordering::Relaxed);
    let index = watching.join().unwrap();
    let fresh = build(&root, &store_dir);
    assert_eq!(index.view(), fresh.view());
    let (loaded, _) = Store::load(&store_dir).unwrap();
    assert_eq!(loaded.view(), fresh.view());
}

#[test]
fn a_damaged_or_foreign_index_is_refused() {
    let (_d, root) = repository();
    let store_dir = root.join(".cxxlm-index");
    let mut index = build(&root, &store_dir);
    let mut store = Store::save(&store_dir, &index).unwrap();
    let snapshot = store_dir.join("snapshot.bin");
    let good = std::fs::read(&snapshot).unwrap();

    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x40;
    std::fs::write(&snapshot, &flipped).unwrap();
    let e = Store::load(&store_dir).unwrap_err();
    assert!(matches!(e, IndexError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("cxxlm index build"), "{e}");

    std::fs::write(&snapshot, &good[..good.len() / 2]).unwrap();
    assert!(matches!(
        Store::load(&store_dir).unwrap_err(),
        IndexError::Corrupt { .. }
    ));

    let mut other = good.clone();
    other[8] = 99;
    std::fs::write(&snapshot, &other).unwrap();
    let e = Store::load(&store_dir).unwrap_err();
    assert!(matches!(e, IndexError::Version { found: 99, .. }), "{e}");

    std::fs::write(&snapshot, b"{\"not\": \"an index\"}").unwrap();
    assert!(matches!(
        Store::load(&store_dir).unwrap_err(),
        IndexError::NotAnIndex(_)
    ));

    // A journal record damaged after the snapshot was written.
    std::fs::write(&snapshot, &good).unwrap();
    write(&root, "src/log.cpp", "void log_message(const char*) {}\n");
    let changes = index.refresh(&root.join("src/log.cpp"), &settings());
    store.record(&index, &changes).unwrap();
    assert!(Store::load(&store_dir).is_ok());
    let journal = store_dir.join("journal.bin");
    let mut bytes = std::fs::read(&journal).unwrap();
    let at = bytes.len() - 3;
    bytes[at] ^= 1;
    std::fs::write(&journal, &bytes).unwrap();
    let e = Store::load(&store_dir).unwrap_err();
    assert!(
        matches!(e, IndexError::Corrupt { .. }) && e.to_string().contains("journal"),
        "{e}"
    );
    std::fs::write(&journal, &bytes[..bytes.len() - 5]).unwrap();
    assert!(matches!(
        Store::load(&store_dir).unwrap_err(),
        IndexError::Corrupt { .. }
    ));
}

#[test]
fn bad_files_are_counted_not_fatal() {
    let (_d, root) = repository();
    write(&root, "bad/latin1.h", b"// caf\xe9\nint x;\n");
    write(&root, "bad/binary.cpp", b"\x7fELF\0\0\0\x01");
    write(&root, "bad/huge.cpp", "int a;\n".repeat(20_000));
    write(&root, "bad/notes.txt", b"\xff\xfe not C++ at all");
    std::os::unix::fs::symlink(root.join("nowhere.cpp"), root.join("bad/dangling.cpp")).unwrap();
    std::os::unix::fs::symlink(&root, root.join("bad/loop")).unwrap();
    let index = build(&root, &root.join(".cxxlm-index"));
    let counts = index.skip_counts();
    assert_eq!(counts.get("not_utf8"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("binary"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("too_large"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("unreadable"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("symlink_loop"), Some(&1), "{counts:?}");
    assert_eq!(index.skipped()["bad/loop"], cxxlm_index::Skip::SymlinkLoop);
    // The good files are all there.
    assert_eq!(index.files().len(), 9);
}
