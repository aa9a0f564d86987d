//! `cxxlm tok` end to end: train on shards, load the result in Python `tokenizers`.

mod common;

use common::*;
use std::process::Command;

fn corpus(root: &std::path::Path) {
    for n in 0..60 {
        write(&root.join(format!("src/f{n}.cpp")), cpp_source(n).repeat(3));
    }
    write(&root.join("src/odd.cpp"), "// unicode: naïve café — ✓ 😀\nconst char* s = \"<|bos|> is text here\";\nint x\t=\t1;   \r\n");
}

#[test]
fn trains_evaluates_and_python_tokenizers_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("corpus");
    corpus(&src);
    let shards = tmp.path().join("shards");
    data_run(&src, &shards, &[]);
    let tok = tmp.path().join("tokenizer.json");
    run_ok(&[
        "tok",
        "train",
        "-i",
        shards.to_str().unwrap(),
        "--vocab",
        "600",
        "-o",
        tok.to_str().unwrap(),
    ]);

    // Raw files (not normalized) round-trip and are counted against tiktoken.
    let report = tmp.path().join("eval.json");
    let out = run_ok(&[
        "tok",
        "eval",
        "--tokenizer",
        tok.to_str().unwrap(),
        "--json",
        report.to_str().unwrap(),
        src.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("round trip: 0 of 61 files differ"));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let overall = r["projects"].as_array().unwrap().last().unwrap();
    assert_eq!(overall["project"], "overall");
    assert!(overall["tokens"]["cl100k"]["raw_tokens"].as_u64().unwrap() > 0);

    let odd = src.join("src/odd.cpp");
    let ours = run_ok(&[
        "tok",
        "encode",
        "--tokenizer",
        tok.to_str().unwrap(),
        odd.to_str().unwrap(),
    ]);
    let ours = String::from_utf8(ours.stdout).unwrap();
    let bos = (600 - 64).to_string();
    assert!(
        !ours.split_whitespace().any(|id| id == bos),
        "special token produced from text"
    );

    // Python `tokenizers` reads the file and gives the same ids, on text that spells
    // special tokens too: as ours, it never makes them from text.
    let plain = tmp.path().join("plain.cpp");
    write(
        &plain,
        format!("{}\n// naïve — ✓ 😀\nint x\t=\t1;   \r\n// <|bos|><|fim_middle|> <|eos|>\n<|reserved_20|>", cpp_source(7)),
    );
    let ours = run_ok(&[
        "tok",
        "encode",
        "--tokenizer",
        tok.to_str().unwrap(),
        plain.to_str().unwrap(),
    ]);
    let script = "import sys\nfrom tokenizers import Tokenizer\nt = Tokenizer.from_file(sys.argv[1])\ntext = open(sys.argv[2], encoding='utf-8', newline='').read()\nenc = t.encode(text, add_special_tokens=False)\nassert t.decode(enc.ids) == text, 'decode differs'\nassert t.token_to_id('<|bos|>') == 536 and t.token_to_id('<|fim_middle|>') == 540\nassert not any(i >= 536 for i in enc.ids), 'a special token from text'\nprint(' '.join(map(str, enc.ids)))\n";
    let py = Command::new("python3")
        .args(["-c", script, tok.to_str().unwrap(), plain.to_str().unwrap()])
        .output()
        .expect("python3 runs");
    assert!(
        py.status.success(),
        "python tokenizers failed (is the tokenizers module installed?): {}",
        String::from_utf8_lossy(&py.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&py.stdout).trim(),
        String::from_utf8_lossy(&ours.stdout).trim()
    );
}

#[test]
fn a_foreign_tokenizer_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("gpt2.json");
    write(
        &bad,
        r#"{"pre_tokenizer": {"type": "ByteLevel"}, "model": {"type": "BPE"}}"#,
    );
    let f = tmp.path().join("a.cpp");
    write(&f, "int x;\n");
    let err = run_fails(&[
        "tok",
        "encode",
        "--tokenizer",
        bad.to_str().unwrap(),
        f.to_str().unwrap(),
    ]);
    assert!(err.contains("not a cxxlm tokenizer"), "{err}");
}
