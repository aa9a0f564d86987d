//! The Hub client against a local server that answers as the Hugging Face Hub does:
//! paginated tree listings, `resolve` downloads with ranges, LFS and git checksums,
//! gated repositories.

use cxxlm_data::pipeline::{run_task, TaskOutcome, TaskSpec};
use cxxlm_data::read::hub::{HubClient, HubSpec};
use cxxlm_data::PipelineConfig;
use sha1::Digest;
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

struct FakeHub {
    url: String,
    downloads: Arc<AtomicUsize>,
    ranged: Arc<AtomicUsize>,
}

fn jsonl(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| serde_json::json!({"id": format!("doc{i}"), "text": format!("int value_{i} = compute({i});\nint other_{i}();\n")}).to_string() + "\n")
        .collect::<String>()
        .into_bytes()
}

fn start_hub() -> FakeHub {
    let lfs = zstd::encode_all(&jsonl(40)[..], 3).unwrap();
    let plain = jsonl(3);
    let sha256 = hex::encode(sha2::Sha256::digest(&lfs));
    let mut h = sha1::Sha1::new();
    h.update(format!("blob {}\0", plain.len()));
    h.update(&plain);
    let git_oid = hex::encode(h.finalize());

    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let url = format!(
        "http://127.0.0.1:{}",
        server.server_addr().to_ip().unwrap().port()
    );
    let downloads = Arc::new(AtomicUsize::new(0));
    let ranged = Arc::new(AtomicUsize::new(0));
    let (d, r, base) = (downloads.clone(), ranged.clone(), url.clone());
    std::thread::spawn(move || {
        for req in server.incoming_requests() {
            let path = req.url().to_string();
            let auth = req
                .headers()
                .iter()
                .find(|h| h.field.equiv("Authorization"))
                .map(|h| h.value.to_string());
            let range = req
                .headers()
                .iter()
                .find(|h| h.field.equiv("Range"))
                .map(|h| h.value.to_string());
            let json = |body: String| {
                tiny_http::Response::from_string(body).with_header(
                    "Content-Type: application/json"
                        .parse::<tiny_http::Header>()
                        .unwrap(),
                )
            };
            if path.contains("/org/gated/") && auth.as_deref() != Some("Bearer secret") {
                let _ = req.respond(
                    tiny_http::Response::from_string("unauthorized").with_status_code(401),
                );
                continue;
            }
            if path.starts_with("/api/datasets/org/code/tree/main/data") {
                let page = if path.contains("cursor=2") {
                    json(serde_json::json!([{"type": "file", "oid": git_oid, "size": plain.len(), "path": "data/cpp/train-1.jsonl"}, {"type": "file", "oid": "x", "size": 5, "path": "data/README.md"}]).to_string())
                } else {
                    json(serde_json::json!([{"type": "directory", "oid": "d", "size": 0, "path": "data/cpp"}, {"type": "file", "oid": "y", "size": lfs.len(), "path": "data/cpp/train-0.jsonl.zst", "lfs": {"oid": sha256, "size": lfs.len(), "pointerSize": 130}}]).to_string())
                        .with_header(format!("Link: <{base}/api/datasets/org/code/tree/main/data?recursive=true&cursor=2>; rel=\"next\"").parse::<tiny_http::Header>().unwrap())
                };
                let _ = req.respond(page);
                continue;
            }
            if path.starts_with("/api/datasets/org/badsum/tree/main")
                || path.starts_with("/api/datasets/org/gated/tree/main")
            {
                let _ = req.respond(json(serde_json::json!([{"type": "file", "oid": "0000", "size": plain.len(), "path": "x.jsonl"}]).to_string()));
                continue;
            }
            let body = if path.ends_with("/train-0.jsonl.zst") {
                lfs.clone()
            } else if path.ends_with(".jsonl") {
                plain.clone()
            } else {
                let _ = req
                    .respond(tiny_http::Response::from_string("not found").with_status_code(404));
                continue;
            };
            d.fetch_add(1, Ordering::SeqCst);
            if let Some(from) = range.and_then(|v| {
                v.strip_prefix("bytes=")
                    .and_then(|s| s.trim_end_matches('-').parse::<usize>().ok())
            }) {
                r.fetch_add(1, Ordering::SeqCst);
                let rest = body[from..].to_vec();
                let _ = req.respond(tiny_http::Response::from_data(rest).with_status_code(206));
                continue;
            }
            let _ = req.respond(tiny_http::Response::from_data(body));
        }
    });
    FakeHub {
        url,
        downloads,
        ranged,
    }
}

fn client(hub: &FakeHub, cache: &std::path::Path, token: Option<&str>) -> HubClient {
    HubClient::new(&hub.url, token.map(String::from), cache.to_path_buf())
        .with_retry_pause(Duration::from_millis(10))
}

#[test]
fn lists_pages_downloads_resumes_and_verifies() {
    let hub = start_hub();
    let cache = tempfile::tempdir().unwrap();
    let c = client(&hub, cache.path(), None);
    let spec = HubSpec::parse("hf://datasets/org/code/data")
        .unwrap()
        .unwrap();
    let files = c.list(&spec).unwrap();
    let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "data/README.md",
            "data/cpp/train-0.jsonl.zst",
            "data/cpp/train-1.jsonl"
        ]
    );
    assert!(files[1].sha256.is_some() && files[2].sha256.is_none());

    // A download cut off halfway (a killed run) is resumed with a range request.
    let lfs = zstd::encode_all(&jsonl(40)[..], 3).unwrap();
    let part = c.partial_path(&files[1]);
    std::fs::create_dir_all(part.parent().unwrap()).unwrap();
    std::fs::write(&part, &lfs[..lfs.len() / 2]).unwrap();
    let local = c.fetch(&files[1]).unwrap();
    assert_eq!(hub.ranged.load(Ordering::SeqCst), 1, "resumed with a range");
    assert!(!part.exists());
    let mut bytes = Vec::new();
    zstd::Decoder::new(std::fs::File::open(&local).unwrap())
        .unwrap()
        .read_to_end(&mut bytes)
        .unwrap();
    assert_eq!(bytes, jsonl(40));
    let local = c.fetch(&files[2]).unwrap();
    assert_eq!(std::fs::read(local).unwrap(), jsonl(3));

    let before = hub.downloads.load(Ordering::SeqCst);
    c.fetch(&files[1]).unwrap();
    assert_eq!(
        hub.downloads.load(Ordering::SeqCst),
        before,
        "cached files are not fetched again"
    );
}

#[test]
fn checksum_mismatch_and_missing_token_are_clear_errors() {
    let hub = start_hub();
    let cache = tempfile::tempdir().unwrap();
    let c = client(&hub, cache.path(), None);
    let files = c
        .list(&HubSpec::parse("hf://datasets/org/badsum").unwrap().unwrap())
        .unwrap();
    let err = c.fetch(&files[0]).unwrap_err().to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(!c.cached_path(&files[0]).exists());

    let err = c
        .list(&HubSpec::parse("hf://datasets/org/gated").unwrap().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("401") && err.contains("HF_TOKEN"), "{err}");
    let with_token = client(&hub, cache.path(), Some("secret"));
    assert_eq!(
        with_token
            .list(&HubSpec::parse("hf://datasets/org/gated").unwrap().unwrap())
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn the_pipeline_reads_hub_datasets() {
    let hub = start_hub();
    let tmp = tempfile::tempdir().unwrap();
    let mut config = PipelineConfig::default();
    config.input.paths = vec!["hf://datasets/org/code/data".into()];
    config.input.hub_endpoint = Some(hub.url.clone());
    config.input.hub_cache = Some(tmp.path().join("cache"));
    config.output.dir = tmp.path().join("out");
    let stop = AtomicBool::new(false);
    let TaskOutcome::Completed(stats) =
        run_task(&config, TaskSpec { tasks: 1, index: 0 }, &stop, &|_| {}).unwrap()
    else {
        panic!("fresh output directory")
    };
    // The three records of the plain file repeat the first three of the LFS one.
    assert_eq!(stats.written.docs, 40);
    assert_eq!(stats.steps.last().unwrap().dropped["duplicate"].docs, 3);
    assert_eq!(stats.read.ignored_files, 1, "README.md");
}
