//! `cxxlm tok` end to end: train on shards, load the result in Python `tokenizers`.

mod common;

use common::*;
use std::process::Command;

fn corpus(root: &std::path::Path) {
    for n in 0..60 {
        let text: String = (0..3).map(|k| cpp_source(n * 3 + k)).collect();
        write(&root.join(format!("src/f{n}.cpp")), text);
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
    let trained = |name: &str, flags: &[&str]| {
        let out = tmp.path().join(name);
        let mut args = vec!["tok", "train", "-i", shards.to_str().unwrap()];
        args.extend(["--vocab", "600"]);
        args.extend(flags);
        args.extend(["-o", out.to_str().unwrap()]);
        run_ok(&args);
        out
    };
    let tok = trained("tokenizer.json", &[]);

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
    let bos = bos_id(&tok).to_string();
    assert!(
        !ours.split_whitespace().any(|id| id == bos),
        "special token produced from text"
    );

    python_tokenizers_agree(tmp.path(), &tok);

    // With superword merges (lines as pieces), Python `tokenizers` agrees too.
    let superwords = trained("superwords.json", &["--second-stage-mib", "1"]);
    let pattern = |p: &std::path::Path| {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        v["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"].clone()
    };
    assert_eq!(pattern(&tok), cxxlm_tokenizer::PIECE_PATTERN);
    assert_eq!(pattern(&superwords), cxxlm_tokenizer::PATTERN);
    python_tokenizers_agree(tmp.path(), &superwords);

    // Kept within lines: no superword takes in a line break (the first stage's pieces
    // hold one only after punctuation).
    let within = trained(
        "within.json",
        &["--second-stage-mib", "1", "--superwords-within-lines"],
    );
    let joins_a_line_break = |p: &std::path::Path| {
        cxxlm_tokenizer::load(p)
            .unwrap()
            .tokens()
            .iter()
            .any(|t| t.contains(&b'\n') && t.iter().any(u8::is_ascii_alphanumeric))
    };
    assert!(joins_a_line_break(&superwords));
    assert!(!joins_a_line_break(&within));
    python_tokenizers_agree(tmp.path(), &within);

    // Indentation apart from the line break before it: Python `tokenizers` splits that
    // pattern as we do.
    let apart = trained("apart.json", &["--indentation-apart"]);
    assert_eq!(pattern(&apart), cxxlm_tokenizer::INDENTATION_APART_PATTERN);
    python_tokenizers_agree(tmp.path(), &apart);
}

fn bos_id(tok: &std::path::Path) -> u32 {
    cxxlm_tokenizer::load(tok)
        .unwrap()
        .special_id("<|bos|>")
        .unwrap()
}

/// Python `tokenizers` reads the file and gives the same ids as `cxxlm tok encode`, on
/// text that spells special tokens too: as ours, it never makes them from text.
fn python_tokenizers_agree(dir: &std::path::Path, tok: &std::path::Path) {
    let plain = dir.join("plain.cpp");
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
    let script = "import sys\nfrom tokenizers import Tokenizer\nt = Tokenizer.from_file(sys.argv[1])\ntext = open(sys.argv[2], encoding='utf-8', newline='').read()\nenc = t.encode(text, add_special_tokens=False)\nassert t.decode(enc.ids) == text, 'decode differs'\nbos = int(sys.argv[3])\nassert (t.token_to_id('<|bos|>'), t.token_to_id('<|fim_middle|>')) == (bos, bos + 4), 'special ids differ'\nassert not any(i >= bos for i in enc.ids), 'a special token from text'\nprint(' '.join(map(str, enc.ids)))\n";
    let bos = bos_id(tok).to_string();
    let py = Command::new("python3")
        .args([
            "-c",
            script,
            tok.to_str().unwrap(),
            plain.to_str().unwrap(),
            &bos,
        ])
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

#[test]
fn unreadable_inputs_are_named_and_no_text_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    write(
        &shards.join("part-00000-00000.jsonl.zst"),
        b"\x28\xb5\x2f\xfd garbage",
    );
    let out = tmp.path().join("tok.json");
    let args = [
        "tok",
        "train",
        "-i",
        shards.to_str().unwrap(),
        "--vocab",
        "512",
        "-o",
        out.to_str().unwrap(),
    ];
    let err = run_fails(&args);
    assert!(
        err.contains("part-00000-00000.jsonl.zst: corrupt_compressed")
            && err.contains("no text in"),
        "{err}"
    );
    assert!(!out.exists());
    // Beside readable text: trained, the bad shard still named.
    let text = tmp.path().join("text");
    corpus(&text);
    let mut args = args.to_vec();
    args.extend(["-i", text.to_str().unwrap()]);
    let said = run_ok(&args);
    let err = String::from_utf8_lossy(&said.stderr);
    assert!(
        err.contains("1 inputs skipped") && err.contains("corrupt_compressed"),
        "{err}"
    );
}
