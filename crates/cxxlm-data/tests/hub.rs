//! The Hub client against a local server that answers as the Hugging Face Hub does:
//! paginated tree listings, `resolve` downloads with ranges, LFS and git checksums,
//! gated repositories; and as a hostile or broken mirror would: paths that climb out
//! of the cache, pagination to another origin or in a loop, a stalled download.

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
    /// Requests for the stalled file that have begun.
    stalled: Arc<AtomicUsize>,
    /// Requests that reached the other origin the `elsewhere` listing points to.
    elsewhere: Arc<AtomicUsize>,
}

/// A server on another origin that counts the requests it gets.
fn start_other_origin() -> (String, Arc<AtomicUsize>) {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let url = format!(
        "http://127.0.0.1:{}",
        server.server_addr().to_ip().unwrap().port()
    );
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for req in server.incoming_requests() {
            h.fetch_add(1, Ordering::SeqCst);
            let _ = req.respond(tiny_http::Response::from_string("[]"));
        }
    });
    (url, hits)
}

/// Half of `body`, then nothing: a connection that stalls mid-download.
struct Stalling {
    body: Vec<u8>,
    sent: bool,
}

impl Read for Stalling {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.sent {
            std::thread::sleep(Duration::from_secs(3600));
            return Ok(0);
        }
        self.sent = true;
        let n = (self.body.len() / 2).min(buf.len());
        buf[..n].copy_from_slice(&self.body[..n]);
        Ok(n)
    }
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
    let stalled = Arc::new(AtomicUsize::new(0));
    let (other, elsewhere) = start_other_origin();
    let (d, r, st, base) = (
        downloads.clone(),
        ranged.clone(),
        stalled.clone(),
        url.clone(),
    );
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
            let one_file = |p: &str| {
                json(serde_json::json!([{"type": "file", "oid": git_oid, "size": plain.len(), "path": p}]).to_string())
            };
            let link = |page: tiny_http::Response<std::io::Cursor<Vec<u8>>>, to: String| {
                page.with_header(
                    format!("Link: <{to}>; rel=\"next\"")
                        .parse::<tiny_http::Header>()
                        .unwrap(),
                )
            };
            if path.starts_with("/api/datasets/org/escape/tree/main") {
                let _ = req.respond(one_file("data/../../../escaped.jsonl"));
                continue;
            }
            if path.starts_with("/api/datasets/org/absolute/tree/main") {
                let _ = req.respond(one_file("/tmp/absolute.jsonl"));
                continue;
            }
            if path.starts_with("/api/datasets/org/elsewhere/tree/main") {
                let to = format!("{other}/api/datasets/org/elsewhere/tree/main?cursor=2");
                let _ = req.respond(link(one_file("a.jsonl"), to));
                continue;
            }
            if path.starts_with("/api/datasets/org/loop/tree/main") {
                let to = format!("{base}/api/datasets/org/loop/tree/main?recursive=true&cursor=1");
                let _ = req.respond(link(one_file("a.jsonl"), to));
                continue;
            }
            if path.starts_with("/api/datasets/org/stall/tree/main") {
                let _ = req.respond(one_file("stall.jsonl"));
                continue;
            }
            if path.ends_with("/stall.jsonl") {
                st.fetch_add(1, Ordering::SeqCst);
                let body = plain.clone();
                std::thread::spawn(move || {
                    let len = body.len();
                    let reader = Stalling { body, sent: false };
                    let _ = req.respond(tiny_http::Response::new(
                        200.into(),
                        Vec::new(),
                        reader,
                        Some(len),
                        None,
                    ));
                });
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
        stalled,
        elsewhere,
    }
}

fn go() -> AtomicBool {
    AtomicBool::new(false)
}

fn spec(address: &str) -> HubSpec {
    HubSpec::parse(address).unwrap().unwrap()
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
    let files = c.list(&spec, &go()).unwrap();
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
    let part = c.partial_path(&files[1]).unwrap();
    std::fs::create_dir_all(part.parent().unwrap()).unwrap();
    std::fs::write(&part, &lfs[..lfs.len() / 2]).unwrap();
    let local = c.fetch(&files[1], &go()).unwrap();
    assert_eq!(hub.ranged.load(Ordering::SeqCst), 1, "resumed with a range");
    assert!(!part.exists());
    let mut bytes = Vec::new();
    zstd::Decoder::new(std::fs::File::open(&local).unwrap())
        .unwrap()
        .read_to_end(&mut bytes)
        .unwrap();
    assert_eq!(bytes, jsonl(40));
    let local = c.fetch(&files[2], &go()).unwrap();
    assert_eq!(std::fs::read(local).unwrap(), jsonl(3));

    let before = hub.downloads.load(Ordering::SeqCst);
    c.fetch(&files[1], &go()).unwrap();
    assert_eq!(
        hub.downloads.load(Ordering::SeqCst),
        before,
        "cached files are not fetched again"
    );

    // A cached file is trusted for its checksum, not its size: one changed in place
    // (or put there by someone else) is fetched again.
    let cached = c.cached_path(&files[2]).unwrap();
    std::fs::write(&cached, vec![b'x'; jsonl(3).len()]).unwrap();
    let local = c.fetch(&files[2], &go()).unwrap();
    assert_eq!(std::fs::read(local).unwrap(), jsonl(3));
    assert_eq!(hub.downloads.load(Ordering::SeqCst), before + 1);
}

#[test]
fn listed_paths_that_leave_the_cache_are_refused() {
    let hub = start_hub();
    let root = tempfile::tempdir().unwrap();
    let cache = root.path().join("a").join("b").join("cache");
    let c = client(&hub, &cache, None);
    for (repo, listed) in [
        ("escape", "data/../../../escaped.jsonl"),
        ("absolute", "/tmp/absolute.jsonl"),
    ] {
        let err = c
            .list(&spec(&format!("hf://datasets/org/{repo}")), &go())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(listed) && err.contains("leave the download cache"),
            "{err}"
        );
    }
    // Nor can a file made by hand point outside it.
    let file = cxxlm_data::read::hub::HubFile {
        repo: "org/escape".into(),
        revision: "main".into(),
        path: "../../../../../../../escaped.jsonl".into(),
        size: 1,
        git_oid: String::new(),
        sha256: None,
    };
    assert!(c.fetch(&file, &go()).is_err());
    assert_eq!(hub.downloads.load(Ordering::SeqCst), 0);
    assert!(!root.path().join("escaped.jsonl").exists());
}

/// `work` on a thread; its result, or a panic when it has not ended within a minute.
fn within_a_minute<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(work()));
    rx.recv_timeout(Duration::from_secs(60))
        .expect("still running after a minute")
}

#[test]
fn pagination_stays_on_the_endpoint_and_a_loop_ends() {
    let hub = start_hub();
    let cache = tempfile::tempdir().unwrap();
    let c = Arc::new(client(&hub, cache.path(), Some("secret")));
    let err = c
        .list(&spec("hf://datasets/org/elsewhere"), &go())
        .unwrap_err()
        .to_string();
    assert!(err.contains("not following it"), "{err}");
    assert_eq!(
        hub.elsewhere.load(Ordering::SeqCst),
        0,
        "nothing, and so no token, went to the other origin"
    );
    let looping = c.clone();
    let err = within_a_minute(move || {
        looping
            .list(&spec("hf://datasets/org/loop"), &go())
            .map(|f| f.len())
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("pagination loops"), "{err}");
}

#[test]
fn a_stalled_download_ends_as_soon_as_it_is_asked_to_stop() {
    let hub = start_hub();
    let cache = tempfile::tempdir().unwrap();
    // The read timeout (120 s, five attempts) is far longer than this test may take.
    let c = client(&hub, cache.path(), None);
    let files = c.list(&spec("hf://datasets/org/stall"), &go()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (flag, stalled) = (stop.clone(), hub.stalled.clone());
    std::thread::spawn(move || {
        while stalled.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(200));
        flag.store(true, Ordering::SeqCst);
    });
    let file = files[0].clone();
    let err = within_a_minute(move || c.fetch(&file, &stop).map(|_| ())).unwrap_err();
    assert!(matches!(err, cxxlm_data::DataError::Interrupted), "{err}");
}

#[test]
fn checksum_mismatch_and_missing_token_are_clear_errors() {
    let hub = start_hub();
    let cache = tempfile::tempdir().unwrap();
    let c = client(&hub, cache.path(), None);
    let files = c.list(&spec("hf://datasets/org/badsum"), &go()).unwrap();
    let err = c.fetch(&files[0], &go()).unwrap_err().to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(!c.cached_path(&files[0]).unwrap().exists());

    let err = c
        .list(&spec("hf://datasets/org/gated"), &go())
        .unwrap_err()
        .to_string();
    assert!(err.contains("401") && err.contains("HF_TOKEN"), "{err}");
    let with_token = client(&hub, cache.path(), Some("secret"));
    assert_eq!(
        with_token
            .list(&spec("hf://datasets/org/gated"), &go())
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
