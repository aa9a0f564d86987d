//! A Hugging Face Hub client for datasets: list files under a path (paginated), and
//! download them into a cache, resuming partial downloads with HTTP ranges and
//! verifying each file against the checksum the Hub lists (sha256 for LFS files, the
//! git blob sha1 otherwise) before it is used.

use serde::Deserialize;
use sha1::Digest;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{DataError, Result};

const ATTEMPTS: u32 = 5;

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
                "{input}: expected hf://datasets/<owner>/<name>[@revision]/<path>"
            ))
        };
        let Some(rest) = rest.strip_prefix("datasets/") else {
            return Some(Err(bad()));
        };
        let mut parts = rest.splitn(3, '/');
        let (Some(owner), Some(name)) = (parts.next(), parts.next()) else {
            return Some(Err(bad()));
        };
        if owner.is_empty() || name.is_empty() {
            return Some(Err(bad()));
        }
        let (name, revision) = match name.split_once('@') {
            Some((n, r)) => (n, r.replace("%2F", "/").replace("%2f", "/")),
            None => (name, "main".to_string()),
        };
        Some(Ok(HubSpec {
            repo: format!("{owner}/{name}"),
            revision,
            path: parts.next().unwrap_or("").trim_matches('/').to_string(),
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

pub struct HubClient {
    endpoint: String,
    token: Option<String>,
    cache: PathBuf,
    agent: ureq::Agent,
    retry_pause: Duration,
}

impl HubClient {
    pub fn new(endpoint: &str, token: Option<String>, cache: PathBuf) -> Self {
        HubClient {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token: token.filter(|t| !t.is_empty()),
            cache,
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(30))
                .timeout_read(Duration::from_secs(120))
                .build(),
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

    fn status_error(&self, repo: &str, code: u16, url: &str) -> DataError {
        let hint = match code {
            401 | 403 => format!(": set HF_TOKEN to a token with access to {repo} (gated datasets need their terms accepted on the Hub)"),
            404 => format!(": no such dataset, revision or path in {repo}"),
            _ => String::new(),
        };
        DataError::Hub(format!("HTTP {code} for {url}{hint}"))
    }

    /// Every file under the spec's path, in the Hub's order, following pagination.
    pub fn list(&self, spec: &HubSpec) -> Result<Vec<HubFile>> {
        let revision = spec.revision.replace('/', "%2F");
        let mut url = format!(
            "{}/api/datasets/{}/tree/{revision}/{}?recursive=true",
            self.endpoint, spec.repo, spec.path
        );
        let mut files = Vec::new();
        loop {
            let resp = self.get_with_retries(&url, &spec.repo)?;
            let next = resp.header("Link").and_then(next_link);
            let entries: Vec<TreeEntry> = resp
                .into_json()
                .map_err(|e| DataError::Hub(format!("listing {url}: unexpected reply: {e}")))?;
            for e in entries.into_iter().filter(|e| e.kind == "file") {
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
            match next {
                Some(n) => url = n,
                None => break,
            }
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(files)
    }

    /// GET with retries on transport errors, 5xx and 429; other statuses are final.
    fn get_with_retries(&self, url: &str, repo: &str) -> Result<ureq::Response> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.get(url).call() {
                Ok(r) => return Ok(r),
                Err(ureq::Error::Status(code, _)) if code < 500 && code != 429 => {
                    return Err(self.status_error(repo, code, url))
                }
                Err(e) if attempt < ATTEMPTS => {
                    tracing::warn!("{url}: {e}; retrying ({attempt}/{ATTEMPTS})");
                    std::thread::sleep(self.retry_pause * attempt);
                }
                Err(e) => {
                    return Err(DataError::Hub(format!(
                        "{url}: {e} (after {ATTEMPTS} attempts)"
                    )))
                }
            }
        }
    }

    pub fn cached_path(&self, file: &HubFile) -> PathBuf {
        self.cache
            .join("datasets")
            .join(&file.repo)
            .join(file.revision.replace('/', "--"))
            .join(&file.path)
    }

    /// Where a download in progress lives until it is complete and verified.
    pub fn partial_path(&self, file: &HubFile) -> PathBuf {
        let mut name = self.cached_path(file).into_os_string();
        name.push(".part");
        PathBuf::from(name)
    }

    /// The file's local path, downloading it (or the rest of it) first if needed.
    pub fn fetch(&self, file: &HubFile) -> Result<PathBuf> {
        let dest = self.cached_path(file);
        if std::fs::metadata(&dest).is_ok_and(|m| m.len() == file.size) {
            return Ok(dest);
        }
        let dir = dest.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        let part = self.partial_path(file);
        let url = format!(
            "{}/datasets/{}/resolve/{}/{}",
            self.endpoint,
            file.repo,
            file.revision.replace('/', "%2F"),
            file.path
        );
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.download_rest(&url, &part, file) {
                Ok(()) => break,
                Err(DownloadError::Fatal(e)) => return Err(e),
                Err(DownloadError::Retry(msg)) if attempt < ATTEMPTS => {
                    tracing::warn!("{url}: {msg}; resuming ({attempt}/{ATTEMPTS})");
                    std::thread::sleep(self.retry_pause * attempt);
                }
                Err(DownloadError::Retry(msg)) => {
                    return Err(DataError::Hub(format!(
                        "{url}: {msg} (gave up after {ATTEMPTS} attempts; rerun to resume)"
                    )))
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

    fn download_rest(
        &self,
        url: &str,
        part: &Path,
        file: &HubFile,
    ) -> std::result::Result<(), DownloadError> {
        let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
        if have == file.size {
            return Ok(());
        }
        let mut req = self.get(url);
        if have > 0 && have < file.size {
            req = req.set("Range", &format!("bytes={have}-"));
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(416, _)) => {
                // The partial file is not a prefix of this file: start over.
                std::fs::remove_file(part)
                    .map_err(|e| DownloadError::Fatal(DataError::io(part, e)))?;
                return Err(DownloadError::Retry("range not satisfiable".into()));
            }
            Err(ureq::Error::Status(code, _)) if code < 500 && code != 429 => {
                return Err(DownloadError::Fatal(
                    self.status_error(&file.repo, code, url),
                ))
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
        let mut body =
            resp.into_reader()
                .take(file.size.saturating_sub(if append { have } else { 0 }));
        let mut buf = vec![0u8; 1 << 20];
        loop {
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
}

enum DownloadError {
    Retry(String),
    Fatal(DataError),
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
