//! HTTP/1.1 over std's sockets, a thread per connection: requests with a body of known
//! length or chunked, JSON responses, and streamed ones (chunked: SSE or NDJSON). Kept
//! this small so that a connection's thread can ask its socket, while the model
//! generates, whether the client has gone away (a read-side peek), which is what lets a
//! newer keystroke's request cancel the old one.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

/// Connections served at once; more are answered 503 and closed.
const MAX_CONNECTIONS: usize = 512;
const MAX_HEAD: usize = 64 * 1024;
/// An idle keep-alive connection is closed after this.
const IDLE: Duration = Duration::from_secs(120);

pub struct Request {
    pub method: String,
    /// Without the query string.
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Why a request could not be read: answered with this status, then the connection
/// closes.
pub struct BadRequest(pub u16, pub String);

pub struct Conn {
    reader: BufReader<TcpStream>,
    stream: TcpStream,
    keep_alive: bool,
    /// A chunked response is open.
    streaming: bool,
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

impl Conn {
    /// Whether the client has closed its end (or the connection broke).
    pub fn closed(&self) -> bool {
        if !self.reader.buffer().is_empty() {
            return false;
        }
        let mut byte = 0u8;
        // SAFETY: a one-byte buffer we own; MSG_PEEK leaves the data in the socket.
        let n = unsafe {
            libc::recv(
                self.stream.as_raw_fd(),
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => true,
            n if n > 0 => false,
            _ => {
                let e = io::Error::last_os_error();
                !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                )
            }
        }
    }

    fn head(&mut self, status: u16, content_type: &str, length: Option<usize>) -> io::Result<()> {
        let mut head = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nCache-Control: no-cache\r\n",
            reason(status)
        );
        match length {
            Some(n) => head += &format!("Content-Length: {n}\r\n"),
            None => head += "Transfer-Encoding: chunked\r\n",
        }
        if !self.keep_alive {
            head += "Connection: close\r\n";
        }
        head += "\r\n";
        self.stream.write_all(head.as_bytes())
    }

    pub fn json(&mut self, status: u16, body: &Value) -> io::Result<()> {
        let text = body.to_string();
        self.head(status, "application/json", Some(text.len()))?;
        self.stream.write_all(text.as_bytes())?;
        self.stream.flush()
    }

    /// Starts a chunked response (`text/event-stream` or `application/x-ndjson`).
    pub fn start_stream(&mut self, content_type: &str) -> io::Result<()> {
        self.streaming = true;
        self.head(200, content_type, None)
    }

    pub fn chunk(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let mut out = format!("{:x}\r\n", data.len()).into_bytes();
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
        self.stream.write_all(&out)?;
        self.stream.flush()
    }

    pub fn end_stream(&mut self) -> io::Result<()> {
        self.streaming = false;
        self.stream.write_all(b"0\r\n\r\n")?;
        self.stream.flush()
    }

    fn read_line(&mut self, limit: &mut usize) -> Result<Option<String>, BadRequest> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(*limit as u64)
            .read_until(b'\n', &mut line)
            .map_err(|e| BadRequest(408, format!("reading the request: {e}")))?;
        if n == 0 {
            return Ok(None);
        }
        *limit -= n;
        if !line.ends_with(b"\n") {
            return Err(BadRequest(400, "request head too long or cut short".into()));
        }
        let line = String::from_utf8(line)
            .map_err(|_| BadRequest(400, "request head is not UTF-8".into()))?;
        Ok(Some(line.trim_end_matches(['\r', '\n']).to_string()))
    }

    /// The next request, or None when the client closed the connection between requests.
    fn read_request(&mut self, max_body: usize) -> Result<Option<Request>, BadRequest> {
        let mut limit = MAX_HEAD;
        let first = loop {
            match self.read_line(&mut limit)? {
                None => return Ok(None),
                Some(l) if l.is_empty() => continue,
                Some(l) => break l,
            }
        };
        let mut parts = first.split(' ');
        let (Some(method), Some(target), Some(version)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(BadRequest(400, format!("malformed request line {first:?}")));
        };
        if !version.starts_with("HTTP/1.") {
            return Err(BadRequest(400, format!("unsupported protocol {version:?}")));
        }
        let mut headers = Vec::new();
        loop {
            let line = self
                .read_line(&mut limit)?
                .ok_or_else(|| BadRequest(400, "request head cut short".into()))?;
            if line.is_empty() {
                break;
            }
            let (k, v) = line
                .split_once(':')
                .ok_or_else(|| BadRequest(400, format!("malformed header {line:?}")))?;
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        let mut request = Request {
            method: method.to_string(),
            path: target.split('?').next().unwrap_or("").to_string(),
            headers,
            body: Vec::new(),
        };
        self.keep_alive = !request
            .header("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close"))
            && version == "HTTP/1.1";
        if request
            .header("expect")
            .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
        {
            let _ = self.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        let too_big = || BadRequest(413, format!("request body over {max_body} bytes"));
        if request
            .header("transfer-encoding")
            .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
        {
            loop {
                let mut line_limit = 1024;
                let size = self
                    .read_line(&mut line_limit)?
                    .ok_or_else(|| BadRequest(400, "chunked body cut short".into()))?;
                let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| BadRequest(400, format!("bad chunk size {size:?}")))?;
                if request.body.len() + size > max_body {
                    return Err(too_big());
                }
                let start = request.body.len();
                request.body.resize(start + size, 0);
                self.reader
                    .read_exact(&mut request.body[start..])
                    .map_err(|e| BadRequest(400, format!("reading the body: {e}")))?;
                let mut crlf = [0u8; 2];
                self.reader
                    .read_exact(&mut crlf)
                    .map_err(|e| BadRequest(400, format!("reading the body: {e}")))?;
                if size == 0 {
                    break;
                }
            }
        } else if let Some(len) = request.header("content-length") {
            let len: usize = len
                .parse()
                .map_err(|_| BadRequest(400, format!("bad Content-Length {len:?}")))?;
            if len > max_body {
                return Err(too_big());
            }
            request.body.resize(len, 0);
            self.reader
                .read_exact(&mut request.body)
                .map_err(|e| BadRequest(400, format!("reading the body: {e}")))?;
        }
        Ok(Some(request))
    }
}

/// Accepts connections until the listener fails; each request goes to `handle`, which
/// writes its response on the connection.
pub fn listen(
    listener: TcpListener,
    max_body: usize,
    handle: impl Fn(Request, &mut Conn) -> io::Result<()> + Send + Sync + 'static,
) -> Result<(), String> {
    let handle = Arc::new(handle);
    let open = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(IDLE));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(60)));
        let Ok(read_half) = stream.try_clone() else {
            continue;
        };
        let mut conn = Conn {
            reader: BufReader::new(read_half),
            stream,
            keep_alive: false,
            streaming: false,
        };
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::SeqCst);
            let _ = conn.json(
                503,
                &crate::api::error_body("too many connections", "server_error"),
            );
            continue;
        }
        let (handle, open) = (handle.clone(), open.clone());
        let spawned = std::thread::Builder::new()
            .name("cxxlm-http".into())
            .spawn(move || {
                serve_connection(&mut conn, max_body, &*handle);
                open.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            eprintln!("warning: could not start a thread for a connection");
        }
    }
    Err("the listening socket failed".into())
}

fn serve_connection(
    conn: &mut Conn,
    max_body: usize,
    handle: &(impl Fn(Request, &mut Conn) -> io::Result<()> + ?Sized),
) {
    loop {
        match conn.read_request(max_body) {
            Ok(None) => return,
            Ok(Some(request)) => {
                if handle(request, conn).is_err() || !conn.keep_alive {
                    return;
                }
                if conn.streaming {
                    // A stream that was cut off cannot carry another response.
                    return;
                }
            }
            Err(BadRequest(status, message)) => {
                conn.keep_alive = false;
                if status != 408 {
                    let _ = conn.json(
                        status,
                        &crate::api::error_body(&message, "invalid_request_error"),
                    );
                }
                return;
            }
        }
    }
}
