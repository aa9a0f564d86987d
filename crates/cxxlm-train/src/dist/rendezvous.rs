//! How the ranks find each other: rank 0 listens at the master address, every other rank
//! connects (retrying until rank 0 is up) and says who it is; rank 0 hands out a payload
//! (NCCL's unique id). The control connections then stay open as a watchdog: a rank
//! that exits before saying it is done makes every other rank stop with its name.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::World;

const HELLO: &str = "cxxlm-rendezvous";

/// How long ranks wait for each other at the start (`CXXLM_RENDEZVOUS_TIMEOUT`, seconds).
fn timeout() -> Duration {
    let secs = std::env::var("CXXLM_RENDEZVOUS_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(secs)
}

pub(super) struct Links {
    /// Rank 0's payload.
    pub payload: Vec<u8>,
    /// For collectives over TCP: rank 0 holds one per other rank (in rank order), the
    /// others one to rank 0.
    pub data: Vec<TcpStream>,
    pub watchdog: Watchdog,
}

pub(super) fn connect(world: &World, with_data: bool, payload: &[u8]) -> Result<Links, String> {
    let deadline = Instant::now() + timeout();
    let kinds: &[&str] = if with_data {
        &["control", "data"]
    } else {
        &["control"]
    };
    if world.rank == 0 {
        let listener = TcpListener::bind(&world.master).map_err(|e| {
            format!(
                "cannot listen at {} (MASTER_ADDR:MASTER_PORT): {e}",
                world.master
            )
        })?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let mut control: Vec<Option<TcpStream>> = (1..world.size).map(|_| None).collect();
        let mut data: Vec<Option<TcpStream>> = (1..world.size).map(|_| None).collect();
        let wanted = (world.size - 1) * kinds.len();
        let mut joined = 0;
        while joined < wanted {
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
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
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => return Err(format!("accepting at {}: {e}", world.master)),
            };
            stream.set_nonblocking(false).map_err(|e| e.to_string())?;
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .map_err(|e| e.to_string())?;
            // Whatever is not a rank's greeting (a port scanner, a stray client) is dropped.
            let Some(line) = read_greeting(&stream) else {
                continue;
            };
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [HELLO, kind, rank, size] = fields[..] else {
                continue;
            };
            let (Ok(rank), Ok(size)) = (rank.parse::<usize>(), size.parse::<usize>()) else {
                continue;
            };
            if size != world.size {
                return Err(format!(
                    "rank {rank} was started with WORLD_SIZE={size}, rank 0 with {}",
                    world.size
                ));
            }
            let slot = match kind {
                "control" => &mut control,
                "data" if with_data => &mut data,
                _ => continue,
            };
            if rank == 0 || rank >= world.size || slot[rank - 1].is_some() {
                return Err(format!("two processes say they are rank {rank}"));
            }
            stream.set_read_timeout(None).map_err(|e| e.to_string())?;
            stream.set_nodelay(true).map_err(|e| e.to_string())?;
            slot[rank - 1] = Some(stream);
            joined += 1;
        }
        let control: Vec<TcpStream> = control.into_iter().flatten().collect();
        for (i, mut s) in control.iter().enumerate() {
            s.write_all(&(payload.len() as u32).to_le_bytes())
                .and_then(|_| s.write_all(payload))
                .map_err(|e| format!("sending to rank {}: {e}", i + 1))?;
        }
        Ok(Links {
            payload: payload.to_vec(),
            data: data.into_iter().flatten().collect(),
            watchdog: Watchdog::start(world, control),
        })
    } else {
        let mut streams = Vec::new();
        for kind in kinds {
            let mut stream = loop {
                match TcpStream::connect(&world.master) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => {
                        return Err(format!(
                            "rank 0 did not answer at {} in time (CXXLM_RENDEZVOUS_TIMEOUT): {e}",
                            world.master
                        ))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            };
            stream.set_nodelay(true).map_err(|e| e.to_string())?;
            writeln!(stream, "{HELLO} {kind} {} {}", world.rank, world.size)
                .map_err(|e| format!("greeting rank 0: {e}"))?;
            streams.push(stream);
        }
        let mut control = streams.remove(0);
        let left = deadline.saturating_duration_since(Instant::now());
        control
            .set_read_timeout(Some(left.max(Duration::from_secs(1))))
            .map_err(|e| e.to_string())?;
        let mut len = [0u8; 4];
        control
            .read_exact(&mut len)
            .map_err(|e| format!("waiting for rank 0 to hear from every rank: {e}"))?;
        let mut payload = vec![0u8; u32::from_le_bytes(len) as usize];
        control
            .read_exact(&mut payload)
            .map_err(|e| format!("reading rank 0's payload: {e}"))?;
        control.set_read_timeout(None).map_err(|e| e.to_string())?;
        Ok(Links {
            payload,
            data: streams,
            watchdog: Watchdog::start(world, vec![control]),
        })
    }
}

/// One line, read byte by byte so that nothing after it is consumed.
fn read_greeting(mut stream: &TcpStream) -> Option<String> {
    let mut line = Vec::new();
    let mut byte = [0u8];
    while line.len() < 256 {
        stream.read_exact(&mut byte).ok()?;
        if byte[0] == b'\n' {
            return String::from_utf8(line).ok();
        }
        line.push(byte[0]);
    }
    None
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
