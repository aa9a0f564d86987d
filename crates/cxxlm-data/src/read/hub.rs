//! A Hugging Face Hub client for datasets: list files under a path (paginated), and
//! download them into a cache, resuming partial downloads with HTTP ranges and
//! verifying each file against the checksum the Hub lists (sha256 for LFS files, the
//! git blob sha1 otherwise) before it is used, cached files included.
//!
//! What the endpoint says is not trusted: listed paths that would leave the cache are
//! refused, pagination is followed only on the endpoint's own origin (the token goes
//! nowhere else) and a page seen before ends the listing with an error. Every request
//! runs on a thread of its own, so a stalled connection never holds a run that is asked
//! to stop.

use serde::Deserialize;
use sha1::Digest;
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{DataError, Result};

const ATTEMPTS: u32 = 5;

/// How often a wait on the network looks at the stop flag.
const POLL: Duration = Duration::from_millis(50);

/// A path component that stays where it is joined: not empty, `.` or `..`.
fn plain_component(c: &str) -> bool {
    !c.is_empty() && c != "." && c != ".." && !c.contains(['/', '\0'])
}

/// A relative path whose components are all plain (no `..`, no absolute path, no
/// empty components), so that joining it to a directory stays inside that directory.
fn safe_relative(path: &str) -> bool {
    !path.is_empty() && path.split('/').all(plain_component)
}

/// `hf://datasets/<owner>/<name>[@<revision>]/<path>`; a `/` in the revision is
/// written `%2F`, as in the Hub's own `hf://` addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSpec {
    pub repo: String,
    pub revision: String,
    pub path: String,
}

impl HubSpec {
    /// `None` when `input` is not a Hub address at all.
    pub fn parse(input: &str) -> Option<Result<HubSpec>> {
        let rest = input.strip_prefix("hf://")?;
        let bad = || {
            DataError::Config(format!(
                "{input}: expected hf://datasets/<owner>/<name>[@revision]/<path>, without `.` or `..` components"
            ))
        };
        let Some(rest) = rest.strip_prefix("datasets/") else {
            return Some(Err(bad()));
        };
        let mut parts = rest.splitn(3, '/');
        let (Some(owner), Some(name)) = (parts.next(), parts.next()) else {
            return Some(Err(bad()));
        };
        let (name, revision) = match name.split_once('@') {
            Some((n, r)) => (n, r.replace("%2F", "/").replace("%2f", "/")),
            None => (name, "main".to_string()),
        };
        let path = parts.next().unwrap_or("").trim_matches('/').to_string();
        let safe = plain_component(owner)
            && plain_component(name)
            && safe_relative(&revision)
            && (path.is_empty() || safe_relative(&path));
        if !safe {
            return Some(Err(bad()));
        }
        Some(Ok(HubSpec {
            repo: format!("{owner}/{name}"),
            revision,
            path,
        }))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubFile {
    pub repo: String,
    pub revision: String,
    pub path: String,
    pub size: u64,
    /// The git blob id (sha1 of `blob <len>\0<bytes>`).
    pub git_oid: String,
    /// sha256 of the content, for files stored in LFS.
    pub sha256: Option<String>,
}

impl HubFile {
    pub fn url_path(&self) -> String {
        format!("hf://datasets/{}/{}", self.repo, self.path)
    }
}

#[derive(Deserialize)]
struct TreeEntry {
    #[serde(rename = "type")]
    kind: String,
    path: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    oid: String,
    lfs: Option<LfsInfo>,
}

#[derive(Deserialize)]
struct LfsInfo {
    oid: String,
    size: u64,
}

/// The HTTP side: an agent and the token, cheap to clone onto a request's thread.
#[derive(Clone)]
struct Http {
    agent: ureq::Agent,
    token: Option<String>,
}

impl Http {
    fn get(&self, url: &str) -> ureq::Request {
        let req = self
            .agent
            .get(url)
            .set("User-Agent", concat!("cxxlm/", env!("CARGO_PKG_VERSION")));
        match &self.token {
            Some(t) => req.set("Authorization", &format!("Bearer {t}")),
            None => req,
        }
    }
}

pub struct HubClient {
    endpoint: String,
    http: Http,
    cache: PathBuf,
    retry_pause: Duration,
}

impl HubClient {
    pub fn new(endpoint: &str, token: Option<String>, cache: PathBuf) -> Self {
        HubClient {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            http: Http {
                agent: ureq::AgentBuilder::new()
                    .timeout_connect(Duration::from_secs(30))
                    .timeout_read(Duration::from_secs(120))
                    .build(),
                token: token.filter(|t| !t.is_empty()),
            },
            cache,
            retry_pause: Duration::from_secs(2),
        }
    }

    /// Endpoint from `HF_ENDPOINT`, token from `HF_TOKEN`, cache under `HF_HOME` or
    /// `~/.cache`, each unless given.
    pub fn from_env(endpoint: Option<&str>, cache: Option<PathBuf>) -> Self {
        let endpoint = endpoint
            .map(str::to_string)
            .or_else(|| std::env::var("HF_ENDPOINT").ok())
            .unwrap_or_else(|| "https://huggingface.co".into());
        let cache = cache.unwrap_or_else(|| {
            let base = std::env::var_os("HF_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"));
            base.join("cxxlm").join("hub")
        });
        HubClient::new(&endpoint, std::env::var("HF_TOKEN").ok(), cache)
    }

    pub fn with_retry_pause(mut self, pause: Duration) -> Self {
        self.retry_pause = pause;
        self
    }

    /// How long a connection may stay silent before the request is retried.
    pub fn with_read_timeout(mut self, timeout: Duration) -> Self {
        self.http.agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(timeout)
            .build();
        self
    }

    /// Every file under the spec's path, in path order, following pagination. `stop`
    /// ends the listing at once with [`DataError::Interrupted`].
    pub fn list(&self, spec: &HubSpec, stop: &AtomicBool) -> Result<Vec<HubFile>> {
        let revision = spec.revision.replace('/', "%2F");
        let mut url = format!(
            "{}/api/datasets/{}/tree/{revision}/{}?recursive=true",
            self.endpoint, spec.repo, spec.path
        );
        let mut seen = HashSet::new();
        let mut files = Vec::new();
        loop {
            seen.insert(url.clone());
            let (next, entries) = self.with_retries(&url, &spec.repo, stop, |resp| {
                let next = resp.header("Link").and_then(next_link);
                let entries: Vec<TreeEntry> = resp.into_json().map_err(|e| e.to_string())?;
                Ok((next, entries))
            })?;
            for e in entries.into_iter().filter(|e| e.kind == "file") {
                if !safe_relative(&e.path) {
                    return Err(DataError::Hub(format!(
                        "listing {url}: the endpoint lists the path {:?}, which would leave the download cache; refusing this listing",
                        e.path
                    )));
                }
                let (size, sha256) = match e.lfs {
                    Some(l) => (l.size, Some(l.oid)),
                    None => (e.size, None),
                };
                files.push(HubFile {
                    repo: spec.repo.clone(),
                    revision: spec.revision.clone(),
                    path: e.path,
                    size,
                    git_oid: e.oid,
                    sha256,
                });
            }
            let Some(next) = next else { break };
            let next = self.same_origin(&next).ok_or_else(|| {
                DataError::Hub(format!(
                    "listing {url}: the next page is at {next}, outside {}; not following it (the token is sent to the endpoint only)",
                    self.endpoint
                ))
            })?;
            if seen.contains(&next) {
                return Err(DataError::Hub(format!(
                    "listing {url}: the next page is {next} again; the endpoint's pagination loops"
                )));
            }
            url = next;
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(files)
    }

    /// `link` as an absolute URL when it is on the endpoint's origin (scheme, host and
    /// port), else `None`.
    fn same_origin(&self, link: &str) -> Option<String> {
        let ours = origin(&self.endpoint)?;
        if link.starts_with('/') && !link.starts_with("//") {
            return Some(format!("{ours}{link}"));
        }
        origin(link)
            .is_some_and(|o| o.eq_ignore_ascii_case(ours))
            .then(|| link.to_string())
    }

    /// A GET whose response `read` consumes, with retries on transport errors, 5xx and
    /// 429; other statuses are final.
    fn with_retries<T: Send + 'static>(
        &self,
        url: &str,
        repo: &str,
        stop: &AtomicBool,
        read: impl Fn(ureq::Response) -> std::result::Result<T, String> + Send + Sync + 'static,
    ) -> Result<T> {
        let read = Arc::new(read);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (http, owned, read) = (self.http.clone(), url.to_string(), read.clone());
            let result = interruptible(stop, move |_| match http.get(&owned).call() {
                Ok(resp) => read(resp).map_err(|e| (None, format!("unexpected reply: {e}"))),
                Err(ureq::Error::Status(code, _)) => Err((Some(code), format!("HTTP {code}"))),
                Err(e) => Err((None, e.to_string())),
            })?;
            match result {
                Ok(v) => return Ok(v),
                Err((Some(code), _)) if code < 500 && code != 429 => {
                    return Err(status_error(repo, code, url))
                }
                Err((_, e)) if attempt < ATTEMPTS => {
                    tracing::warn!("{url}: {e}; retrying ({attempt}/{ATTEMPTS})");
                    pause(self.retry_pause * attempt, stop)?;
                }
                Err((_, e)) => {
                    return Err(DataError::Hub(format!(
                        "{url}: {e} (after {ATTEMPTS} attempts)"
                    )))
                }
            }
        }
    }

    /// Where `file` is kept; an error for a file whose repository, revision or path
    /// would put it outside the cache.
    pub fn cached_path(&self, file: &HubFile) -> Result<PathBuf> {
        let revision = file.revision.replace('/', "--");
        let safe = file.repo.split('/').count() == 2
            && safe_relative(&file.repo)
            && plain_component(&revision)
            && safe_relative(&file.path);
        if !safe {
            return Err(DataError::Hub(format!(
                "{}@{}: not a path inside the download cache",
                file.url_path(),
                file.revision
            )));
        }
        Ok(self
            .cache
            .join("datasets")
            .join(&file.repo)
            .join(revision)
            .join(&file.path))
    }

    /// Where a download in progress lives until it is complete and verified.
    pub fn partial_path(&self, file: &HubFile) -> Result<PathBuf> {
        let mut name = self.cached_path(file)?.into_os_string();
        name.push(".part");
        Ok(PathBuf::from(name))
    }

    /// The file's local path, downloading it (or the rest of it) first unless a cached
    /// copy matches its checksum. `stop` ends a download at once with
    /// [`DataError::Interrupted`], keeping what has arrived for the next run.
    pub fn fetch(&self, file: &HubFile, stop: &AtomicBool) -> Result<PathBuf> {
        let dest = self.cached_path(file)?;
        if dest.exists() {
            match verify(&dest, file) {
                Ok(()) => return Ok(dest),
                Err(msg) => {
                    tracing::warn!("{}: {msg}; downloading it again", dest.display());
                    std::fs::remove_file(&dest).map_err(|e| DataError::io(&dest, e))?;
                }
            }
        }
        let dir = dest.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        let part = self.partial_path(file)?;
        let url = format!(
            "{}/datasets/{}/resolve/{}/{}",
            self.endpoint,
            file.repo,
            file.revision.replace('/', "%2F"),
            file.path
        );
        // Attempts in a row that brought no new bytes.
        let mut attempt = 0;
        loop {
            let before = std::fs::metadata(&part).map_or(0, |m| m.len());
            let (http, owned, path, f) =
                (self.http.clone(), url.clone(), part.clone(), file.clone());
            let result = interruptible(stop, move |abandoned| {
                download_rest(&http, &owned, &path, &f, abandoned)
            })?;
            match result {
                Ok(()) => break,
                Err(DownloadError::Fatal(e)) => return Err(e),
                Err(DownloadError::Retry(msg)) => {
                    if std::fs::metadata(&part).map_or(0, |m| m.len()) > before {
                        attempt = 0;
                    }
                    attempt += 1;
                    if attempt >= ATTEMPTS {
                        return Err(DataError::Hub(format!(
                            "{url}: {msg} (gave up after {ATTEMPTS} attempts without progress; rerun to resume)"
                        )));
                    }
                    tracing::warn!("{url}: {msg}; resuming ({attempt}/{ATTEMPTS})");
                    pause(self.retry_pause * attempt, stop)?;
                }
            }
        }
        if let Err(msg) = verify(&part, file) {
            let _ = std::fs::remove_file(&part);
            return Err(DataError::Hub(format!(
                "{url}: {msg}; the partial download was removed, rerun to fetch it again"
            )));
        }
        std::fs::rename(&part, &dest).map_err(|e| DataError::io(&dest, e))?;
        Ok(dest)
    }
}

fn status_error(repo: &str, code: u16, url: &str) -> DataError {
    let hint = match code {
        401 | 403 => format!(": set HF_TOKEN to a token with access to {repo} (gated datasets need their terms accepted on the Hub)"),
        404 => format!(": no such dataset, revision or path in {repo}"),
        _ => String::new(),
    };
    DataError::Hub(format!("HTTP {code} for {url}{hint}"))
}

/// Runs `work` (blocking network I/O) on a thread of its own and waits for it, giving
/// up with [`DataError::Interrupted`] as soon as `stop` is set. The abandoned thread is
/// told so through the flag it gets, and ends at its next read or its read timeout.
fn interruptible<T: Send + 'static>(
    stop: &AtomicBool,
    work: impl FnOnce(&AtomicBool) -> T + Send + 'static,
) -> Result<T> {
    let abandoned = Arc::new(AtomicBool::new(false));
    let (tx, rx) = crossbeam_channel::bounded(1);
    let flag = abandoned.clone();
    std::thread::spawn(move || {
        let _ = tx.send(work(&flag));
    });
    loop {
        match rx.recv_timeout(POLL) {
            Ok(v) => return Ok(v),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                if stop.load(Ordering::Relaxed) {
                    abandoned.store(true, Ordering::Relaxed);
                    return Err(DataError::Interrupted);
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                return Err(DataError::Hub("a download thread failed".into()))
            }
        }
    }
}

/// Sleeps `total`, or less when `stop` is set (then `Interrupted`).
fn pause(total: Duration, stop: &AtomicBool) -> Result<()> {
    let until = std::time::Instant::now() + total;
    while std::time::Instant::now() < until {
        if stop.load(Ordering::Relaxed) {
            return Err(DataError::Interrupted);
        }
        std::thread::sleep(POLL.min(until.saturating_duration_since(std::time::Instant::now())));
    }
    Ok(())
}

enum DownloadError {
    Retry(String),
    Fatal(DataError),
}

/// Appends the rest of `file` to `part` (or writes it afresh where the server ignores
/// the range).
fn download_rest(
    http: &Http,
    url: &str,
    part: &Path,
    file: &HubFile,
    abandoned: &AtomicBool,
) -> std::result::Result<(), DownloadError> {
    let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    if have == file.size {
        return Ok(());
    }
    let mut req = http.get(url);
    if have > 0 && have < file.size {
        req = req.set("Range", &format!("bytes={have}-"));
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(416, _)) => {
            // The partial file is not a prefix of this file: start over.
            std::fs::remove_file(part).map_err(|e| DownloadError::Fatal(DataError::io(part, e)))?;
            return Err(DownloadError::Retry("range not satisfiable".into()));
        }
        Err(ureq::Error::Status(code, _)) if code < 500 && code != 429 => {
            return Err(DownloadError::Fatal(status_error(&file.repo, code, url)))
        }
        Err(e) => return Err(DownloadError::Retry(e.to_string())),
    };
    let append = resp.status() == 206;
    let mut out = OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(part)
        .map_err(|e| DownloadError::Fatal(DataError::io(part, e)))?;
    let mut body = resp
        .into_reader()
        .take(file.size.saturating_sub(if append { have } else { 0 }));
    let mut buf = vec![0u8; 1 << 20];
    loop {
        if abandoned.load(Ordering::Relaxed) {
            return Err(DownloadError::Fatal(DataError::Interrupted));
        }
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => return Err(DownloadError::Retry(format!("connection lost: {e}"))),
        };
        out.write_all(&buf[..n])
            .map_err(|e| DownloadError::Fatal(DataError::io(part, e)))?;
    }
    out.sync_all()
        .map_err(|e| DownloadError::Fatal(DataError::io(part, e)))?;
    let now = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    if now < file.size {
        return Err(DownloadError::Retry(format!(
            "got {now} of {} bytes",
            file.size
        )));
    }
    Ok(())
}

fn verify(path: &Path, file: &HubFile) -> std::result::Result<(), String> {
    let f = File::open(path).map_err(|e| e.to_string())?;
    let (expected, actual) = match &file.sha256 {
        Some(sha) => (sha.clone(), digest(f, sha2::Sha256::new())?),
        None => {
            let mut h = sha1::Sha1::new();
            h.update(format!("blob {}\0", file.size));
            (file.git_oid.clone(), digest(f, h)?)
        }
    };
    if expected.eq_ignore_ascii_case(&actual) {
        Ok(())
    } else {
        Err(format!(
            "checksum mismatch: expected {expected}, got {actual}"
        ))
    }
}

/// The hex digest of everything `reader` yields, fed to `hasher`.
fn digest<D: Digest>(mut reader: impl Read, mut hasher: D) -> std::result::Result<String, String> {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

/// `scheme://host[:port]` of an absolute URL.
fn origin(url: &str) -> Option<&str> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    (!scheme.is_empty() && !authority.is_empty())
        .then(|| &url[..scheme.len() + 3 + authority.len()])
}

/// The `rel="next"` target of an HTTP `Link` header.
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        params.contains("rel=\"next\"").then(|| {
            url.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let s = HubSpec::parse("hf://datasets/bigcode/the-stack-dedup/data/c++")
            .unwrap()
            .unwrap();
        assert_eq!(
            (s.repo.as_str(), s.revision.as_str(), s.path.as_str()),
            ("bigcode/the-stack-dedup", "main", "data/c++")
        );
        let s = HubSpec::parse("hf://datasets/a/b@refs%2Fconvert%2Fparquet/default")
            .unwrap()
            .unwrap();
        assert_eq!(
            (s.revision.as_str(), s.path.as_str()),
            ("refs/convert/parquet", "default")
        );
        assert!(HubSpec::parse("/usr/include").is_none());
        assert!(HubSpec::parse("hf://models/x/y").unwrap().is_err());
        for escape in [
            "hf://datasets/../x/data",
            "hf://datasets/a/..@main/data",
            "hf://datasets/a/b@..%2F..%2Fx/data",
            "hf://datasets/a/b/data/../../..",
        ] {
            assert!(HubSpec::parse(escape).unwrap().is_err(), "{escape}");
        }
    }

    #[test]
    fn paths_that_would_leave_the_cache_are_unsafe() {
        assert!(safe_relative("data/cpp/train-0.parquet"));
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "a/./b",
            "a/",
        ] {
            assert!(!safe_relative(bad), "{bad:?}");
        }
    }

    #[test]
    fn origins() {
        let c = HubClient::new("https://hub.example:8443/", None, PathBuf::new());
        assert_eq!(
            c.same_origin("https://HUB.example:8443/api/x?cursor=1")
                .as_deref(),
            Some("https://HUB.example:8443/api/x?cursor=1")
        );
        assert_eq!(
            c.same_origin("/api/x?cursor=2").as_deref(),
            Some("https://hub.example:8443/api/x?cursor=2")
        );
        for other in [
            "https://hub.example/api/x",
            "http://hub.example:8443/api/x",
            "https://hub.example:8443@evil.example/api/x",
            "//evil.example/api/x",
            "https://evil.example/?https://hub.example:8443/",
        ] {
            assert_eq!(c.same_origin(other), None, "{other}");
        }
    }

    #[test]
    fn link_header() {
        let h = "<https://hub/api/x?cursor=abc>; rel=\"next\"";
        assert_eq!(
            next_link(h).as_deref(),
            Some("https://hub/api/x?cursor=abc")
        );
        assert_eq!(next_link("<a>; rel=\"prev\""), None);
    }
}
