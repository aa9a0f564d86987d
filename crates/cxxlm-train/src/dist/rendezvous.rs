//! How the ranks find each other: rank 0 listens at the master address, every other rank
//! connects (retrying until rank 0 is up) and proves it knows the job's secret
//! (`CXXLM_RENDEZVOUS_SECRET`): rank 0 sends a fresh nonce, the rank answers with who it
//! is, a nonce of its own and an HMAC-SHA256 of all of it under the secret. Rank 0 hands
//! out a payload (NCCL's unique id), authenticated the same way. Anything else that
//! connects is dropped with a warning: it can neither abort the run (a claim of another
//! world size counts only from a rank that knows the secret) nor hold it (each
//! connection's handshake runs on its own thread within a few seconds, and the whole
//! rendezvous within `CXXLM_RENDEZVOUS_TIMEOUT`). The control connections then stay
//! open as a watchdog: a rank that exits before saying it is done makes every other
//! rank stop with its name.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::World;

const HELLO: &str = "cxxlm-rendezvous";
/// How long one connection may take to say who it is.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// Handshakes under way at once; connections beyond are closed (a rank tries again).
const MAX_HANDSHAKES: usize = 64;
/// The longest greeting line, and the largest payload (NCCL's id is 128 bytes).
const MAX_LINE: usize = 512;
const MAX_PAYLOAD: usize = 4096;

pub(super) struct Links {
    /// Rank 0's payload.
    pub payload: Vec<u8>,
    /// For collectives over TCP: rank 0 holds one per other rank (in rank order), the
    /// others one to rank 0.
    pub data: Vec<TcpStream>,
    pub watchdog: Watchdog,
}

/// HMAC-SHA256 under `secret` of `parts`, each ended by a line break, in hex.
fn mac(secret: &str, parts: &[&str]) -> String {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).expect("any key size");
    for p in parts {
        m.update(p.as_bytes());
        m.update(b"\n");
    }
    hex::encode(m.finalize().into_bytes())
}

/// Equal, in a time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0, |d, (x, y)| d | (x ^ y)) == 0
}

fn nonce() -> Result<String, String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("reading /dev/urandom: {e}"))?;
    Ok(hex::encode(bytes))
}

/// Time left before `deadline`, or an error saying what was being waited for.
fn left(deadline: Instant, what: &str) -> Result<Duration, String> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("timed out {what}"))
}

/// Exactly `buf.len()` bytes, before `deadline` (however slowly they trickle in).
fn read_by(
    stream: &TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    what: &str,
) -> Result<(), String> {
    let mut got = 0;
    while got < buf.len() {
        stream
            .set_read_timeout(Some(left(deadline, what)?))
            .map_err(|e| e.to_string())?;
        match (&*stream).read(&mut buf[got..]) {
            Ok(0) => return Err(format!("the connection closed {what}")),
            Ok(n) => got += n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("{e} {what}")),
        }
    }
    Ok(())
}

/// One line of at most [`MAX_LINE`] bytes before `deadline`, read byte by byte so that
/// nothing after it is consumed.
fn read_line(stream: &TcpStream, deadline: Instant, what: &str) -> Result<String, String> {
    let mut line = Vec::new();
    let mut byte = [0u8];
    while line.len() <= MAX_LINE {
        read_by(stream, &mut byte, deadline, what)?;
        if byte[0] == b'\n' {
            return String::from_utf8(line).map_err(|_| format!("not text {what}"));
        }
        line.push(byte[0]);
    }
    Err(format!("a line over {MAX_LINE} bytes {what}"))
}

/// A rank that proved it knows the secret, on one of its connections.
struct Joined {
    kind: String,
    rank: usize,
    size: usize,
    /// Its nonce, which rank 0's payload answers.
    nonce: String,
    stream: TcpStream,
}

/// Rank 0's side of one connection's handshake.
fn greet(stream: TcpStream, secret: &str) -> Result<Joined, String> {
    let deadline = Instant::now() + HANDSHAKE;
    stream
        .set_nonblocking(false)
        .and_then(|_| stream.set_write_timeout(Some(HANDSHAKE)))
        .map_err(|e| e.to_string())?;
    let ours = nonce()?;
    writeln!(&stream, "{HELLO} {ours}").map_err(|e| e.to_string())?;
    let line = read_line(&stream, deadline, "before greeting")?;
    let fields: Vec<&str> = line.split(' ').collect();
    let [HELLO, kind, rank, size, theirs, proof] = fields[..] else {
        return Err("not a rank's greeting".into());
    };
    if !same(
        proof,
        &mac(secret, &["rank", &ours, kind, rank, size, theirs]),
    ) {
        return Err("it does not know the job's secret (CXXLM_RENDEZVOUS_SECRET)".into());
    }
    let (Ok(rank), Ok(size)) = (rank.parse(), size.parse()) else {
        return Err(format!("a greeting with rank {rank:?} of {size:?}"));
    };
    stream
        .set_read_timeout(None)
        .and_then(|_| stream.set_write_timeout(None))
        .and_then(|_| stream.set_nodelay(true))
        .map_err(|e| e.to_string())?;
    Ok(Joined {
        kind: kind.to_string(),
        rank,
        size,
        nonce: theirs.to_string(),
        stream,
    })
}

/// A rank's side: connects to rank 0 as `kind` and proves it knows the secret; returns
/// the connection and this rank's nonce.
fn join(world: &World, kind: &str, deadline: Instant) -> Result<(TcpStream, String), String> {
    let mut last = String::from("no address");
    loop {
        let wait = match left(deadline, "") {
            Ok(wait) => wait,
            Err(_) => {
                return Err(format!(
                    "rank 0 did not answer at {} in time (CXXLM_RENDEZVOUS_TIMEOUT): {last}",
                    world.master
                ))
            }
        };
        let attempt = (|| {
            let addrs: Vec<SocketAddr> = world
                .master
                .to_socket_addrs()
                .map_err(|e| format!("resolving {}: {e}", world.master))?
                .collect();
            let addr = addrs.first().ok_or("no address")?;
            let stream = TcpStream::connect_timeout(addr, wait).map_err(|e| e.to_string())?;
            let by = deadline.min(Instant::now() + HANDSHAKE);
            stream
                .set_write_timeout(Some(HANDSHAKE))
                .map_err(|e| e.to_string())?;
            let line = read_line(&stream, by, "waiting for rank 0's greeting")?;
            let Some(theirs) = line.strip_prefix(&format!("{HELLO} ")) else {
                return Err(format!("{} is not rank 0 of a cxxlm run", world.master));
            };
            let ours = nonce()?;
            let (rank, size) = (world.rank.to_string(), world.size.to_string());
            let proof = mac(&world.secret, &["rank", theirs, kind, &rank, &size, &ours]);
            writeln!(&stream, "{HELLO} {kind} {rank} {size} {ours} {proof}")
                .map_err(|e| format!("greeting rank 0: {e}"))?;
            // The handshake's time limits end with it: a collective may wait for long.
            stream
                .set_read_timeout(None)
                .and_then(|_| stream.set_write_timeout(None))
                .and_then(|_| stream.set_nodelay(true))
                .map_err(|e| e.to_string())?;
            Ok((stream, ours))
        })();
        match attempt {
            Ok(joined) => return Ok(joined),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(super) fn connect(world: &World, with_data: bool, payload: &[u8]) -> Result<Links, String> {
    let deadline = Instant::now() + world.timeout;
    let kinds: &[&str] = if with_data {
        &["control", "data"]
    } else {
        &["control"]
    };
    if world.rank != 0 {
        let mut streams = Vec::new();
        for kind in kinds {
            streams.push(join(world, kind, deadline)?);
        }
        let (control, ours) = streams.remove(0);
        let waiting = "waiting for rank 0 to hear from every rank";
        let mut len = [0u8; 4];
        read_by(&control, &mut len, deadline, waiting).map_err(|e| {
            format!("{e} (if rank 0 refused this rank: do all ranks have the same CXXLM_RENDEZVOUS_SECRET?)")
        })?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_PAYLOAD {
            return Err(format!("rank 0 announced a payload of {len} bytes"));
        }
        let mut payload = vec![0u8; len];
        let mut proof = [0u8; 64];
        read_by(&control, &mut payload, deadline, "reading rank 0's payload")?;
        read_by(&control, &mut proof, deadline, "reading rank 0's payload")?;
        let expected = mac(&world.secret, &["payload", &ours, &hex::encode(&payload)]);
        if !same(&String::from_utf8_lossy(&proof), &expected) {
            return Err(format!(
                "the process at {} does not know the job's secret (CXXLM_RENDEZVOUS_SECRET)",
                world.master
            ));
        }
        control.set_read_timeout(None).map_err(|e| e.to_string())?;
        return Ok(Links {
            payload,
            data: streams.into_iter().map(|(s, _)| s).collect(),
            watchdog: Watchdog::start(world, vec![control]),
        });
    }

    let listener = TcpListener::bind(&world.master).map_err(|e| {
        format!(
            "cannot listen at {} (MASTER_ADDR:MASTER_PORT): {e}",
            world.master
        )
    })?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut control: Vec<Option<Joined>> = (1..world.size).map(|_| None).collect();
    let mut data: Vec<Option<TcpStream>> = (1..world.size).map(|_| None).collect();
    let wanted = (world.size - 1) * kinds.len();
    let mut joined = 0;
    let (tx, rx) = mpsc::channel::<(SocketAddr, Result<Joined, String>)>();
    let mut under_way = 0usize;
    while joined < wanted {
        while let Ok((peer, greeted)) = rx.try_recv() {
            under_way -= 1;
            let j = match greeted {
                Ok(j) => j,
                Err(why) => {
                    eprintln!(
                        "warning: ignored a connection to {} from {peer}: {why}",
                        world.master
                    );
                    continue;
                }
            };
            if j.size != world.size {
                return Err(format!(
                    "rank {} was started with WORLD_SIZE={}, rank 0 with {}",
                    j.rank, j.size, world.size
                ));
            }
            if j.rank == 0 || j.rank >= world.size {
                return Err(format!(
                    "a process says it is rank {} of {}",
                    j.rank, world.size
                ));
            }
            let taken = match j.kind.as_str() {
                "control" => control[j.rank - 1].is_some(),
                "data" if with_data => data[j.rank - 1].is_some(),
                other => return Err(format!("rank {} opened a {other:?} connection", j.rank)),
            };
            if taken {
                return Err(format!("two processes say they are rank {}", j.rank));
            }
            joined += 1;
            let slot = j.rank - 1;
            match j.kind.as_str() {
                "control" => control[slot] = Some(j),
                _ => data[slot] = Some(j.stream),
            }
        }
        if joined == wanted {
            break;
        }
        if Instant::now() > deadline {
            let missing: Vec<String> = (1..world.size)
                .filter(|r| control[r - 1].is_none())
                .map(|r| r.to_string())
                .collect();
            return Err(format!(
                "ranks {} did not reach {} in time (CXXLM_RENDEZVOUS_TIMEOUT)",
                missing.join(", "),
                world.master
            ));
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                if under_way >= MAX_HANDSHAKES {
                    continue;
                }
                under_way += 1;
                let (tx, secret) = (tx.clone(), world.secret.clone());
                std::thread::spawn(move || {
                    let _ = tx.send((peer, greet(stream, &secret)));
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("accepting at {}: {e}", world.master)),
        }
    }
    let control: Vec<Joined> = control.into_iter().flatten().collect();
    for (i, j) in control.iter().enumerate() {
        let proof = mac(&world.secret, &["payload", &j.nonce, &hex::encode(payload)]);
        let mut s = &j.stream;
        s.write_all(&(payload.len() as u32).to_le_bytes())
            .and_then(|_| s.write_all(payload))
            .and_then(|_| s.write_all(proof.as_bytes()))
            .map_err(|e| format!("sending to rank {}: {e}", i + 1))?;
    }
    Ok(Links {
        payload: payload.to_vec(),
        data: data.into_iter().flatten().collect(),
        watchdog: Watchdog::start(world, control.into_iter().map(|j| j.stream).collect()),
    })
}

/// Watches the control connections (one thread each). Rank 0 hears "done" from each
/// rank that finished; a connection that closes without it means that rank died: rank 0
/// tells the others ("abort <rank>") and every rank exits with that rank's name.
pub(super) struct Watchdog {
    rank: usize,
    streams: Arc<Vec<TcpStream>>,
    finished: Arc<AtomicBool>,
    done: Arc<(Mutex<usize>, Condvar)>,
}

fn stop_now(me: usize, message: &str) -> ! {
    eprintln!("error: {message}; rank {me} stops too");
    // SAFETY: _exit ends the process at once; a rank blocked in a collective cannot be
    // unwound, and nothing it holds needs flushing (checkpoints are written atomically).
    unsafe { libc::_exit(1) }
}

impl Watchdog {
    fn start(world: &World, streams: Vec<TcpStream>) -> Watchdog {
        let watchdog = Watchdog {
            rank: world.rank,
            streams: Arc::new(streams),
            finished: Arc::new(AtomicBool::new(false)),
            done: Arc::new((Mutex::new(0), Condvar::new())),
        };
        for (i, stream) in watchdog.streams.iter().enumerate() {
            let Ok(reader) = stream.try_clone() else {
                continue;
            };
            let me = world.rank;
            let peer = if me == 0 { i + 1 } else { 0 };
            let (streams, finished, done) = (
                watchdog.streams.clone(),
                watchdog.finished.clone(),
                watchdog.done.clone(),
            );
            std::thread::spawn(move || {
                let mut said_done = false;
                for line in BufReader::new(reader).lines() {
                    let Ok(line) = line else { break };
                    if line == "done" {
                        said_done = true;
                        let (count, signal) = &*done;
                        *count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
                        signal.notify_all();
                    } else if let Some(dead) = line.strip_prefix("abort ") {
                        stop_now(me, &format!("rank {dead} exited before the run ended"));
                    }
                }
                if said_done || finished.load(Ordering::SeqCst) {
                    return;
                }
                if me == 0 {
                    for mut s in streams.iter() {
                        let _ = writeln!(s, "abort {peer}");
                    }
                }
                stop_now(me, &format!("rank {peer} exited before the run ended"));
            });
        }
        watchdog
    }

    /// From now on, a closed connection is a normal end. Rank 0 returns once every other
    /// rank has said so (or after a minute).
    pub(super) fn finish(&self) {
        if self.rank == 0 {
            let (count, signal) = &*self.done;
            let guard = count.lock().unwrap_or_else(|e| e.into_inner());
            let _ = signal
                .wait_timeout_while(guard, Duration::from_secs(60), |n| *n < self.streams.len());
        }
        self.finished.store(true, Ordering::SeqCst);
        if self.rank != 0 {
            for mut s in self.streams.iter() {
                let _ = writeln!(s, "done");
            }
        }
    }
}
