//! `cxxlm serve` with a tiny model trained here, driven by real clients on loopback:
//! the `openai` Python package (completions with suffix, streamed and not, chat),
//! requests shaped as llama.vim sends `/infill` (its `n_predict: 0` warm-up too), as
//! Continue sends Ollama's `/api/generate`, concurrent requests with one cancelled
//! mid-stream, a full queue, and bad requests. Then `cxxlm export hf`, loaded by
//! transformers with logits matching ours.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

const CLIENTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/serve_clients.py");

struct Trained {
    _f: Fixture,
    pack: PathBuf,
    run: PathBuf,
}

/// A tiny model with a context long enough for a request to be cancelled mid-stream,
/// trained on whole-line FIM middles as the speedrun's are (so the server cuts a cursor
/// at the end of its line at the line's start).
fn trained() -> &'static Trained {
    static TRAINED: OnceLock<Trained> = OnceLock::new();
    TRAINED.get_or_init(|| {
        let f = fixture(400, 2048);
        let pack = f.root.join("pack");
        run_ok(&pack_args(
            &f,
            &pack,
            &["--val-fraction", "0.1", "--fim-line-aligned"],
        ));
        let run = f.root.join("run");
        run_ok(&[
            "train",
            "pretrain",
            "--pack",
            pack.to_str().unwrap(),
            "--out",
            run.to_str().unwrap(),
            "--set",
            "model.preset=tiny",
            "--set",
            "model.seq_len=512",
            "--set",
            "train.device=cpu",
            "--set",
            "train.device_batch=2",
            "--set",
            "train.total_batch_tokens=1024",
            "--set",
            "train.steps=30",
            "--set",
            "eval.every=0",
        ]);
        Trained { _f: f, pack, run }
    })
}

/// A running server, stopped when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(run: &Path, extra: &[&str]) -> Server {
    let mut child = cxxlm()
        .args([
            "serve",
            "--checkpoint",
            run.to_str().unwrap(),
            "--port",
            "0",
            "--name",
            "tiny",
        ])
        .args(extra)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("cxxlm serve starts");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut url = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        eprintln!("server: {line}");
        if let Some(at) = line
            .split(" at ")
            .nth(1)
            .filter(|u| u.starts_with("http://"))
        {
            url = Some(at.trim().to_string());
            break;
        }
    }
    // The server's log goes on to this test's output.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            eprintln!("server: {line}");
        }
    });
    let url = url.expect("the server prints its address");
    Server { child, url }
}

fn clients(server: &Server, scenario: &str) {
    let out = Command::new("python3")
        .args([CLIENTS, &server.url, scenario])
        .output()
        .expect("python3 runs (scripts/setup.sh installs the clients)");
    let said = String::from_utf8_lossy(&out.stdout);
    eprintln!("{said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "clients ({scenario}) failed:\n{said}");
    assert!(
        said.contains(&format!("all {scenario} checks passed")),
        "{said}"
    );
}

#[test]
fn editors_and_clients_are_served_and_bad_requests_answered() {
    let t = trained();
    let server = serve(&t.run, &["--slots", "4"]);
    clients(&server, "editors");
}

#[test]
fn a_full_queue_is_answered_503() {
    let t = trained();
    let server = serve(&t.run, &["--slots", "1", "--queue", "1"]);
    clients(&server, "busy");
}

#[test]
fn the_hf_export_loads_in_transformers_with_our_logits() {
    let t = trained();
    let out = t.run.parent().unwrap().join("hf");
    let said = run_ok(&[
        "export",
        "hf",
        t.run.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    let said = String::from_utf8_lossy(&said.stdout);
    assert!(said.contains("greedy tokens equal: true"), "{said}");
    let parity: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("parity.json")).unwrap()).unwrap();
    assert_eq!(parity["passed"], true, "{parity}");
    assert_eq!(parity["class"], "NanoChatForCausalLM");
    assert!(parity["max_abs_logit_diff"].as_f64().unwrap() < 1e-3);
    // transformers' chat template lays an indented conversation out as our prompt does.
    assert_eq!(parity["chat_template_ids_equal"], true, "{parity}");
    for file in [
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(file).exists(), "{file}");
    }
    // A SwiGLU model has no slot in NanoChatForCausalLM: refused, and nothing written.
    let swiglu = t.run.parent().unwrap().join("swiglu");
    run_ok(&[
        "train",
        "pretrain",
        "--pack",
        t.pack.to_str().unwrap(),
        "--out",
        swiglu.to_str().unwrap(),
        "--set",
        "model.preset=tiny",
        "--set",
        "model.activation=swiglu",
        "--set",
        "train.device=cpu",
        "--set",
        "train.device_batch=2",
        "--set",
        "train.total_batch_tokens=256",
        "--set",
        "train.steps=1",
        "--set",
        "eval.every=0",
    ]);
    let refused = swiglu.parent().unwrap().join("swiglu-hf");
    let err = run_fails(&[
        "export",
        "hf",
        swiglu.to_str().unwrap(),
        "-o",
        refused.to_str().unwrap(),
    ]);
    assert!(err.contains("SwiGLU") && err.contains("refused"), "{err}");
    assert!(!refused.exists());
}

#[test]
fn the_teacher_asks_our_server_and_a_rerun_asks_nothing() {
    let t = trained();
    let server = serve(&t.run, &["--slots", "2"]);
    let dir = t.run.parent().unwrap().join("teacher");
    let prompt = dir.join("review.md");
    let records = dir.join("code.jsonl");
    write(&prompt, "Review this C++ function:\n{{code}}\n");
    let lines: Vec<String> = (0..5)
        .map(|i| serde_json::json!({"id": format!("f{i}"), "code": format!("int f{i}() {{ return {i}; }}")}).to_string())
        .collect();
    write(&records, lines.join("\n") + "\n");
    let (out, cache) = (dir.join("review.jsonl"), dir.join("cache"));
    let base_url = format!("{}/v1", server.url);
    let ask = |out: &Path| {
        let said = run_ok(&[
            "tasks",
            "teacher",
            "--prompt",
            prompt.to_str().unwrap(),
            "--records",
            records.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--base-url",
            &base_url,
            "--model",
            "tiny",
            "--max-tokens",
            "8",
            "--concurrency",
            "3",
            "--cache",
            cache.to_str().unwrap(),
        ]);
        String::from_utf8_lossy(&said.stdout).to_string()
    };
    let said = ask(&out);
    // Retries depend on the machine's load (a slow answer times out and is asked again).
    assert!(
        said.contains("5 requests: 0 from the cache, 5 asked (") && said.contains("), 0 failed"),
        "{said}"
    );
    let answers: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&str> = answers.iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["f0", "f1", "f2", "f3", "f4"]);
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(
            a["input"],
            format!("Review this C++ function:\nint f{i}() {{ return {i}; }}\n")
        );
        assert!(a["output"].is_string(), "{a}");
    }
    // The same answers from the cache, with the server gone.
    drop(server);
    let again = dir.join("again.jsonl");
    let said = ask(&again);
    assert!(
        said.contains("5 requests: 5 from the cache, 0 asked"),
        "{said}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap());
    // A new request with no server: retried, then a clear failure.
    write(
        &records,
        format!(
            "{}\n{}\n",
            lines[0],
            serde_json::json!({"id": "new", "code": "int g();"})
        ),
    );
    let err = run_fails(&[
        "tasks",
        "teacher",
        "--prompt",
        prompt.to_str().unwrap(),
        "--records",
        records.to_str().unwrap(),
        "-o",
        dir.join("third.jsonl").to_str().unwrap(),
        "--base-url",
        &base_url,
        "--model",
        "tiny",
        "--max-tokens",
        "8",
        "--retries",
        "1",
        "--backoff-ms",
        "10",
        "--cache",
        cache.to_str().unwrap(),
    ]);
    assert!(
        err.contains("1 requests failed")
            && err.contains("new: ")
            && err.contains("after 2 attempts"),
        "{err}"
    );
}

/// POSTs `body` as JSON (once the model is loaded) and returns the JSON answer.
fn post(server: &Server, path: &str, body: serde_json::Value) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while ureq::get(&format!("{}/health", server.url)).call().is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the model never loaded"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    ureq::post(&format!("{}{path}", server.url))
        .send_json(body)
        .expect("the server answers 200")
        .into_json()
        .expect("a JSON answer")
}

#[test]
fn infill_without_context_gets_it_from_the_repository_index() {
    let t = trained();
    let repo = t.run.parent().unwrap().join("indexed-repo");
    write(
        &repo.join("include/shapes/area.h"),
        "#pragma once\nstruct Rect { double w, h; };\ndouble rect_area(const Rect& r);\n",
    );
    write(
        &repo.join("src/area.cpp"),
        "#include \"shapes/area.h\"\ndouble rect_area(const Rect& r) {\n    return r.w * r.h;\n}\n",
    );
    write(
        &repo.join("src/trace.cpp"),
        "#include <cstdio>\nvoid trace_event(const char* what) { std::puts(what); }\nvoid trace_twice(const char* w) { trace_event(w); trace_event(w); }\n",
    );
    run_ok(&["index", "build", repo.to_str().unwrap()]);
    let server = serve(&t.run, &["--index", repo.to_str().unwrap()]);
    let request = serde_json::json!({
        "input_prefix": "#include \"shapes/area.h\"\nint main() {\n    Rect r{2, 3};\n",
        "prompt": "    double a = rect_area(",
        "input_suffix": ");\n    return a > 5 ? 0 : 1;\n}\n",
        "n_predict": 4,
    });
    let reply = post(&server, "/infill", request.clone());
    let chosen = reply["index_context"].as_array().expect("index_context");
    let files: Vec<&str> = chosen
        .iter()
        .map(|c| c["filename"].as_str().unwrap())
        .collect();
    let area = files.iter().position(|f| *f == "src/area.cpp");
    let trace = files.iter().position(|f| *f == "src/trace.cpp");
    assert!(area.is_some(), "{reply:#}");
    assert!(trace.is_none_or(|t| t > area.unwrap()), "{reply:#}");
    // The context is in the prompt: more tokens evaluated than by a server without it.
    let plain = serve(&t.run, &[]);
    let bare = post(&plain, "/infill", request.clone());
    assert!(bare.get("index_context").is_none(), "{bare:#}");
    assert!(
        reply["tokens_evaluated"].as_u64() > bare["tokens_evaluated"].as_u64(),
        "{reply:#} {bare:#}"
    );
    // What the client sends is used as it is.
    let mut own = request;
    own["input_extra"] = serde_json::json!([{"filename": "mine.h", "text": "int mine();\n"}]);
    assert!(post(&server, "/infill", own).get("index_context").is_none());
}

#[test]
fn a_plain_prompt_is_healed_alike_by_serve_and_sample() {
    let t = trained();
    let bpe = cxxlm_tokenizer::load(&t._f.tokenizer).unwrap();
    // A prompt whose last token the training text extended (a brace before an indented
    // line, or a word cut at the cursor): it is taken off, and the first token written
    // must begin with it.
    let prompt = [
        "int count(const char* s) {\n",
        "namespace std {\n",
        "typedef std::vec",
        "typename iterator_tra",
    ]
    .into_iter()
    .find(|p| bpe.heal(&mut bpe.encode(p)).is_some())
    .expect("one of the prompts ends with a token that longer ones begin with");
    let server = serve(&t.run, &[]);
    let answer = post(
        &server,
        "/v1/completions",
        serde_json::json!({"prompt": prompt, "max_tokens": 12, "temperature": 0}),
    );
    let text = answer["choices"][0]["text"].as_str().unwrap();
    let sampled = run_ok(&[
        "sample",
        "--checkpoint",
        t.run.to_str().unwrap(),
        "--prompt",
        prompt,
        "--max-tokens",
        "12",
        "--temperature",
        "0",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&sampled.stdout),
        format!("{prompt}{text}\n"),
        "serve and sample continue the healed prompt alike"
    );
}
