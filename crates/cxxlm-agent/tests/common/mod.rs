//! A small repository with a planted bug, and a chat endpoint on loopback that replays a
//! fixed trajectory (shared with the command line's tests).
#![allow(dead_code)]

use std::path::Path;
use std::sync::{Arc, Mutex};

pub const STATS_CPP: &str = "#include \"stats.h\"\n\ndouble mean(const std::vector<int>& values) {\n    long total = 0;\n    for (std::size_t i = 0; i <= values.size(); ++i) {\n        total += values[i];\n    }\n    return static_cast<double>(total) / values.size();\n}\n";
/// Line 5 of stats.cpp, fixed.
pub const FIXED_LOOP: &str = "    for (std::size_t i = 0; i < values.size(); ++i) {\n";

/// `mean` reads one past the end of its vector: the test fails, and the address
/// sanitizer names the line, until line 5 of src/stats.cpp is fixed.
pub fn planted_repo(root: &Path) {
    let files = [
        ("src/stats.h", "#pragma once\n#include <vector>\n\ndouble mean(const std::vector<int>& values);\n"),
        ("src/stats.cpp", STATS_CPP),
        (
            "tests/test_stats.cpp",
            "#include \"stats.h\"\n#include <cstdio>\n\nint main() {\n    std::vector<int> v = {1, 2, 3, 6};\n    double m = mean(v);\n    if (m != 3.0) {\n        std::printf(\"FAIL: mean = %g, expected 3\\n\", m);\n        return 1;\n    }\n    std::printf(\"ok\\n\");\n}\n",
        ),
        (
            "Makefile",
            "CXXFLAGS = -std=c++17 -g -Isrc -fsanitize=address,undefined -fno-sanitize-recover=all\n\nbuild:\n\tg++ $(CXXFLAGS) src/stats.cpp tests/test_stats.cpp -o test_stats\n\ntest: build\n\t./test_stats\n",
        ),
    ];
    for (rel, text) in files {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let root_text = root.canonicalize().unwrap().display().to_string();
    let commands: Vec<serde_json::Value> = ["src/stats.cpp", "tests/test_stats.cpp"]
        .iter()
        .map(|f| {
            serde_json::json!({"directory": root_text, "file": f,
                "arguments": ["g++", "-std=c++17", "-Isrc", "-c", f]})
        })
        .collect();
    std::fs::write(
        root.join("compile_commands.json"),
        serde_json::to_string_pretty(&commands).unwrap(),
    )
    .unwrap();
}

/// A `/v1/chat/completions` server that answers with `replies` in order (then with an
/// error), keeping every request's messages.
pub struct Scripted {
    pub url: String,
    pub requests: Arc<Mutex<Vec<serde_json::Value>>>,
}

pub fn scripted(replies: Vec<String>) -> Scripted {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", server.server_addr().to_ip().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    std::thread::spawn(move || {
        let mut replies = replies.into_iter();
        for mut request in server.incoming_requests() {
            let mut body = String::new();
            request.as_reader().read_to_string(&mut body).unwrap();
            let body: serde_json::Value = serde_json::from_str(&body).unwrap();
            let path_ok = request.url() == "/v1/chat/completions";
            seen.lock().unwrap().push(body["messages"].clone());
            let response = match (path_ok, replies.next()) {
                (true, Some(content)) => tiny_http::Response::from_string(
                    serde_json::json!({
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                        "usage": {"total_tokens": 100},
                    })
                    .to_string(),
                ),
                _ => tiny_http::Response::from_string("{\"error\": \"no more replies\"}")
                    .with_status_code(400),
            };
            let _ = request.respond(response);
        }
    });
    Scripted { url, requests }
}

pub fn call(json: &str) -> String {
    format!("<|query_tool|>{json}")
}

/// The trajectory that finds and fixes the planted bug, with a malformed call and an
/// edit that breaks the parse on the way.
pub fn fixing_trajectory() -> Vec<String> {
    vec![
        format!("<|thought_start|>Run the tests first.<|thought_end|>{}", call(r#"{"tool": "test"}"#)),
        call(r#"{"tool": "open", "path": "src/stats.cpp"}"#),
        "<|query_tool|>{\"tool\": \"edit\", \"path\": ".to_string(),
        call(r#"{"tool": "edit", "path": "src/stats.cpp", "start": 5, "end": 5, "text": "    for (std::size_t i = 0; i < values.size(); ++i {\n"}"#),
        call(&serde_json::json!({"tool": "edit", "path": "src/stats.cpp", "start": 5, "end": 5, "text": FIXED_LOOP}).to_string()),
        call(r#"{"tool": "test"}"#),
        call(r#"{"tool": "submit"}"#),
    ]
}
