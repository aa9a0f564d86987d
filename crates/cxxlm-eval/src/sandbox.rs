//! Runs untrusted programs (the compiler on model output, and what it builds) inside
//! bubblewrap: new user, PID, network, IPC, UTS and cgroup namespaces; the system's
//! `/usr` read-only and nothing else of the host (no `/etc`, no home, no host `/tmp`,
//! not one variable of the host's environment); a seccomp filter against reaching other
//! processes, namespaces, mounts and rarely used kernel interfaces ([`seccomp`]); the
//! caller's scratch files, and a small RAM-backed `/work` (and `/tmp`) of bounded size,
//! the only places a run can write; limits on CPU time, wall time, address space,
//! processes, file size and output. When started as root, each run gets a user id of its
//! own, so that the process limit counts only that run's processes.
//!
//! A run ends by killing the init process of its PID namespace, which takes every
//! process of the run with it; it does not depend on the parent-death signal (which
//! only covers the death of the calling process itself), and its output is read only
//! until a deadline.

mod seccomp;
mod spawn;

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{EvalError, Result};

#[derive(Debug, Clone)]
pub struct Limits {
    pub cpu_seconds: u64,
    pub wall: Duration,
    /// The address space of each process.
    pub memory_bytes: u64,
    pub processes: u64,
    /// The largest file a process may write (each scratch file is bounded by it).
    pub file_bytes: u64,
    /// The size of the run's own `/work`, which `/tmp` is part of: new files go there,
    /// in memory (so a run holds at most `memory_bytes` per process plus this).
    pub tmp_bytes: u64,
    /// Bytes kept of stdout and of stderr; more ends the run.
    pub output_bytes: usize,
    /// Lowers the run's CPU priority by this much (its niceness, at most 19), so that
    /// the caller's own threads keep their cores while runs share the machine.
    pub nice: u8,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            cpu_seconds: 10,
            wall: Duration::from_secs(20),
            memory_bytes: 2 << 30,
            processes: 32,
            file_bytes: 64 << 20,
            tmp_bytes: 256 << 20,
            output_bytes: 1 << 20,
            nice: 0,
        }
    }
}

/// Why a sandboxed run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ending {
    Exited,
    WallTime,
    CpuTime,
    Memory,
    /// A write beyond the file size limit or the room in `/work`.
    Storage,
    /// Stopped by the undefined behaviour sanitizer.
    UndefinedBehaviour,
    Output,
    Signal,
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub ending: Ending,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub wall: Duration,
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.ending == Ending::Exited && self.code == Some(0)
    }
}

/// Run user ids (as root) are taken from here up, one per run in flight.
const FIRST_RUN_UID: u32 = 1_000_000;

fn run_uid() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 1000;
    FIRST_RUN_UID + (std::process::id() % 1000) * 1000 + n
}

/// How long output is still read once a run is over (all its processes are dead by
/// then, so the pipes end at once unless something is wrong).
const DRAIN: Duration = Duration::from_secs(1);

/// Where bubblewrap finds the seccomp filter and writes its child's pid.
const SECCOMP_FD: RawFd = 3;
const INFO_FD: RawFd = 4;

pub struct Sandbox {
    bwrap: PathBuf,
    pub limits: Limits,
    /// Host directories mounted read-only, and where (a precompiled header cache).
    read_only: Vec<(PathBuf, PathBuf)>,
    filter: Vec<u8>,
}

/// A file (bound writable) or directory (read-only) of the scratch directory.
struct Entry {
    host: PathBuf,
    name: std::ffi::OsString,
    dir: bool,
}

impl Sandbox {
    /// Finds `bwrap` and checks that it can create its namespaces here.
    pub fn new(limits: Limits) -> Result<Self> {
        // The system's first: a `bwrap` earlier on PATH must not be able to widen it.
        let on_path = std::env::var_os("PATH")
            .map(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("bwrap"))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let bwrap = ["/usr/bin/bwrap", "/bin/bwrap"]
            .iter()
            .map(PathBuf::from)
            .chain(on_path)
            .find(|p| p.is_file())
            .ok_or_else(|| {
                EvalError::Sandbox(
                    "bubblewrap is not installed (Debian: apt-get install bubblewrap; scripts/setup.sh does it)".into(),
                )
            })?;
        let sandbox = Sandbox {
            bwrap,
            limits,
            read_only: Vec::new(),
            filter: seccomp::bytes(),
        };
        let scratch = tempfile::tempdir().map_err(|e| EvalError::io("temporary directory", e))?;
        let probe = sandbox.run(scratch.path(), &["/usr/bin/true"], b"")?;
        if !probe.success() {
            return Err(EvalError::Sandbox(format!(
                "bubblewrap cannot run the sandbox here (it needs bubblewrap 0.7 or later, and unprivileged user namespaces or root): {}",
                String::from_utf8_lossy(&probe.stderr).trim()
            )));
        }
        Ok(sandbox)
    }

    /// Mounts host directory `dir` read-only at `inside`.
    pub fn with_read_only(mut self, dir: &Path, inside: &str) -> Self {
        self.read_only
            .push((dir.to_path_buf(), PathBuf::from(inside)));
        self
    }

    /// bubblewrap's arguments for a run of `argv` that sees `entries` in /work.
    fn arguments(&self, entries: &[Entry], argv: &[&str]) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        args.extend(["--unshare-all", "--die-with-parent", "--new-session"].map(OsString::from));
        args.extend(
            ["--setenv", "PATH", "/usr/bin", "--setenv", "HOME", "/work"].map(OsString::from),
        );
        args.extend(
            ["--setenv", "LANG", "C.UTF-8", "--ro-bind", "/usr", "/usr"].map(OsString::from),
        );
        for (link, target) in [
            ("/bin", "usr/bin"),
            ("/lib", "usr/lib"),
            ("/lib64", "usr/lib64"),
        ] {
            let mount = match Path::new(link).is_symlink() {
                true => ["--symlink", target, link],
                false => ["--ro-bind-try", link, link],
            };
            args.extend(mount.map(OsString::from));
        }
        args.extend(["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"].map(OsString::from));
        for (dir, inside) in &self.read_only {
            args.extend(["--ro-bind".into(), dir.into(), inside.into()]);
        }
        // The init process stays reachable only from outside: its memory would be a way
        // to free it from the parent-death signal. /dev/shm is part of /dev: read-only
        // with it.
        args.extend(
            [
                "--proc",
                "/proc",
                "--tmpfs",
                "/proc/1",
                "--remount-ro",
                "/proc/1",
            ]
            .map(OsString::from),
        );
        args.extend(["--dev", "/dev", "--remount-ro", "/dev"].map(OsString::from));
        let size = self.limits.tmp_bytes.to_string();
        args.extend(
            ["--size", &size, "--tmpfs", "/work", "--dir", "/work/.tmp"].map(OsString::from),
        );
        args.extend(["--symlink", "work/.tmp", "/tmp"].map(OsString::from));
        for e in entries {
            let bind = if e.dir { "--ro-bind" } else { "--bind" };
            let inside = Path::new("/work").join(&e.name);
            args.extend([bind.into(), (&e.host).into(), inside.into()]);
        }
        // Everything else of the root (a tmpfs of bubblewrap's) is read-only.
        let (seccomp, info) = (SECCOMP_FD.to_string(), INFO_FD.to_string());
        args.extend(["--remount-ro", "/", "--chdir", "/work"].map(OsString::from));
        args.extend(["--seccomp", &seccomp, "--info-fd", &info, "--"].map(OsString::from));
        args.extend(argv.iter().map(OsString::from));
        args
    }

    /// Runs `argv` in the sandbox. The regular files directly in `scratch` appear in
    /// `/work` under their names, writable in place (each up to the file size limit), its
    /// directories read-only; whatever else the run writes lives in memory and is gone
    /// when it ends.
    pub fn run(&self, scratch: &Path, argv: &[&str], stdin: &[u8]) -> Result<Outcome> {
        // SAFETY: getuid has no preconditions.
        let root = unsafe { libc::getuid() } == 0;
        let uid = run_uid();
        let mut files = Vec::new();
        for entry in std::fs::read_dir(scratch).map_err(|e| EvalError::io(scratch, e))? {
            let entry = entry.map_err(|e| EvalError::io(scratch, e))?;
            let kind = entry
                .file_type()
                .map_err(|e| EvalError::io(entry.path(), e))?;
            if kind.is_dir() {
                files.push(Entry {
                    host: entry.path(),
                    name: entry.file_name(),
                    dir: true,
                });
            }
            if kind.is_file() {
                if root {
                    std::os::unix::fs::chown(entry.path(), Some(uid), Some(uid))
                        .map_err(|e| EvalError::io(entry.path(), e))?;
                }
                files.push(Entry {
                    host: entry.path(),
                    name: entry.file_name(),
                    dir: false,
                });
            }
        }
        let args = self.arguments(&files, argv);
        let (filter_read, filter_write) = pipe()?;
        File::from(filter_write)
            .write_all(&self.filter)
            .map_err(|e| EvalError::io("seccomp filter pipe", e))?;
        let (info_read, info_write) = pipe()?;
        let limits = &self.limits;
        let own_processes = if root { 0 } else { processes_of_this_user() };
        let (filter_fd, info_fd) = (filter_read.as_raw_fd(), info_write.as_raw_fd());
        // SAFETY: only system calls (setrlimit, getpriority, setpriority, setgroups,
        // setgid, setuid, setpgid, fcntl, dup2) run between the clone and the exec.
        let mut setup = || unsafe {
            let check = |r: libc::c_int| {
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(r)
                }
            };
            let set_soft = |resource, soft: u64, hard: u64| {
                let lim = libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                };
                check(libc::setrlimit(resource, &lim)).map(drop)
            };
            let set = |resource, value: u64| set_soft(resource, value, value);
            // SIGXCPU at the soft limit names the cause; SIGKILL a second later.
            set_soft(libc::RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1)?;
            set(libc::RLIMIT_AS, limits.memory_bytes)?;
            set(libc::RLIMIT_FSIZE, limits.file_bytes)?;
            set(libc::RLIMIT_CORE, 0)?;
            set(libc::RLIMIT_NPROC, own_processes + limits.processes)?;
            if limits.nice > 0 {
                let now = libc::getpriority(libc::PRIO_PROCESS, 0);
                let lower = (now + i32::from(limits.nice)).min(19);
                check(libc::setpriority(libc::PRIO_PROCESS, 0, lower))?;
            }
            if root {
                spawn::drop_to(uid)?;
            }
            libc::setpgid(0, 0);
            // Out of the way of the numbers they move to, then there (without
            // close-on-exec).
            let filter = check(libc::fcntl(filter_fd, libc::F_DUPFD_CLOEXEC, 10))?;
            let info = check(libc::fcntl(info_fd, libc::F_DUPFD_CLOEXEC, 10))?;
            check(libc::dup2(filter, SECCOMP_FD))?;
            check(libc::dup2(info, INFO_FD))?;
            Ok(())
        };
        let started = Instant::now();
        // bubblewrap itself gets no environment: its init's is readable in the sandbox.
        let child = spawn::spawn(self.bwrap.as_os_str(), &args, &mut setup)
            .map_err(|e| EvalError::io(&self.bwrap, e))?;
        drop((filter_read, info_write));
        let monitor = child.pid;
        let monitor_fd = match pidfd_open(monitor) {
            Ok(fd) => fd,
            Err(e) => {
                // SAFETY: signalling our own unreaped child's process group.
                unsafe { libc::kill(-monitor, libc::SIGKILL) };
                let _ = spawn::wait(monitor);
                return Err(EvalError::Sandbox(format!(
                    "pidfd_open: {e} (the sandbox needs Linux 5.3 or later)"
                )));
            }
        };
        let mut run = Run {
            monitor,
            monitor_fd: Some(monitor_fd),
            init: None,
            info: Some((info_read, Vec::new())),
            stdin: Some((File::from(child.stdin), 0)),
            stdout: Capture::new(child.stdout),
            stderr: Capture::new(child.stderr),
            cap: self.limits.output_bytes,
        };
        let watched = run.watch(stdin, started + self.limits.wall);
        // Whatever happened, the run ends here.
        let end = *watched.as_ref().unwrap_or(&Watched::WallTime);
        run.kill_init();
        // The monitor exits once it has reaped the init (killed first, it would leave it
        // a zombie for the host's init to reap).
        if end != Watched::Exited && (run.init.is_none() || !run.monitor_exits_within(DRAIN)) {
            // SAFETY: signalling our own unreaped child's process group.
            unsafe { libc::kill(-monitor, libc::SIGKILL) };
        }
        let status = spawn::wait(monitor).map_err(|e| EvalError::io(&self.bwrap, e))?;
        watched?;
        run.drain();
        let (stdout, stderr) = (run.stdout.data, run.stderr.data);
        let signal = status.signal();
        // bwrap reports the sandboxed process's death by signal as exit code 128 + n.
        let code = status.code();
        let killed_by = signal.or(code.filter(|c| *c > 128).map(|c| c - 128));
        let text = String::from_utf8_lossy(&stderr);
        let ending = if end == Watched::WallTime {
            Ending::WallTime
        } else if end == Watched::Flood {
            Ending::Output
        } else if killed_by == Some(libc::SIGXCPU) {
            Ending::CpuTime
        } else if text.contains("bad_alloc")
            || text.contains("out of memory")
            || text.contains("memory exhausted")
            || text.contains("Cannot allocate memory")
        {
            Ending::Memory
        } else if killed_by == Some(libc::SIGXFSZ)
            || text.contains("No space left on device")
            || text.contains("File too large")
        {
            Ending::Storage
        } else if code != Some(0) && text.contains(": runtime error: ") {
            Ending::UndefinedBehaviour
        } else if signal.is_some() || killed_by.is_some() {
            Ending::Signal
        } else {
            Ending::Exited
        };
        Ok(Outcome {
            ending,
            code,
            signal: killed_by,
            stdout,
            stderr,
            wall: started.elapsed(),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Watched {
    Exited,
    WallTime,
    Flood,
}

/// A run in flight: bubblewrap's outer process (the monitor, our child), the init of
/// the run's PID namespace once bubblewrap names it, and the pipes.
struct Run {
    monitor: i32,
    /// Until the monitor has exited.
    monitor_fd: Option<OwnedFd>,
    init: Option<OwnedFd>,
    /// bubblewrap's `--info-fd` pipe, until it has named the init.
    info: Option<(OwnedFd, Vec<u8>)>,
    /// The program's input pipe, and how much of the input it has taken.
    stdin: Option<(File, usize)>,
    stdout: Capture,
    stderr: Capture,
    cap: usize,
}

impl Run {
    /// Feeds the input and reads the output until the run exits, floods or reaches
    /// `deadline`; all in this thread, so nothing is left waiting on a pipe.
    fn watch(&mut self, stdin: &[u8], deadline: Instant) -> Result<Watched> {
        let mut drain_until = None;
        for fd in [
            self.stdout.fd(),
            self.stderr.fd(),
            self.stdin.as_ref().map(|(p, _)| p.as_raw_fd()),
            self.info.as_ref().map(|(p, _)| p.as_raw_fd()),
        ]
        .into_iter()
        .flatten()
        {
            set_nonblocking(fd)?;
        }
        loop {
            if self.monitor_fd.is_none() && self.stdout.done && self.stderr.done {
                return Ok(Watched::Exited);
            }
            let until = drain_until.unwrap_or(deadline);
            let now = Instant::now();
            if now >= until {
                return Ok(if drain_until.is_some() {
                    Watched::Exited
                } else {
                    Watched::WallTime
                });
            }
            let mut fds = Vec::with_capacity(5);
            let mut watch = |fd: Option<RawFd>, events| {
                if let Some(fd) = fd {
                    fds.push(libc::pollfd {
                        fd,
                        events,
                        revents: 0,
                    });
                }
            };
            watch(
                self.monitor_fd.as_ref().map(AsRawFd::as_raw_fd),
                libc::POLLIN,
            );
            watch(self.stdout.fd(), libc::POLLIN);
            watch(self.stderr.fd(), libc::POLLIN);
            watch(
                self.stdin.as_ref().map(|(p, _)| p.as_raw_fd()),
                libc::POLLOUT,
            );
            watch(self.info.as_ref().map(|(p, _)| p.as_raw_fd()), libc::POLLIN);
            let wait = (until - now).as_millis().min(i32::MAX as u128) as i32 + 1;
            // SAFETY: `fds` is a valid array of pollfd for its length.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait) };
            if ready < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(EvalError::io("poll", e));
            }
            self.read_info();
            self.feed(stdin);
            if self.stdout.read(self.cap) || self.stderr.read(self.cap) {
                return Ok(Watched::Flood);
            }
            let monitor_exited = fds.iter().any(|p| {
                Some(p.fd) == self.monitor_fd.as_ref().map(AsRawFd::as_raw_fd) && p.revents != 0
            });
            if monitor_exited {
                self.monitor_fd = None;
                drain_until = Some(Instant::now() + DRAIN);
            }
        }
    }

    /// Takes the init's pid from bubblewrap's info (`{"child-pid": N, ...}`) once it is
    /// all there, and holds the process by a pidfd so that its number cannot be reused
    /// under us.
    fn read_info(&mut self) {
        let Some((pipe, text)) = &mut self.info else {
            return;
        };
        let mut buf = [0u8; 1024];
        let ended = loop {
            // SAFETY: reading into a buffer of the given length.
            let n = unsafe { libc::read(pipe.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            match n {
                0 => break true,
                n if n > 0 => text.extend_from_slice(&buf[..n as usize]),
                _ => break false,
            }
        };
        if !ended && !text.contains(&b'}') {
            return;
        }
        let pid = String::from_utf8_lossy(text)
            .split_once("\"child-pid\":")
            .and_then(|(_, rest)| {
                rest.trim_start()
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse::<i32>()
                    .ok()
            });
        self.info = None;
        if let Some(pid) = pid {
            // Still the monitor's child, hence still the init (and not a reused number).
            self.init = pidfd_open(pid)
                .ok()
                .filter(|_| parent_of(pid) == Some(self.monitor));
        }
    }

    fn feed(&mut self, input: &[u8]) {
        let Some((pipe, written)) = &mut self.stdin else {
            return;
        };
        while *written < input.len() {
            match pipe.write(&input[*written..]) {
                Ok(n) => *written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(_) => break,
            }
        }
        // All given, or the program stopped reading: close its input.
        self.stdin = None;
    }

    fn kill_init(&mut self) {
        self.read_info();
        if let Some(init) = &self.init {
            // SAFETY: signalling the process the pidfd holds.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    init.as_raw_fd(),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                )
            };
        }
    }

    fn monitor_exits_within(&self, time: Duration) -> bool {
        let Some(fd) = &self.monitor_fd else {
            return true;
        };
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polling one valid pollfd.
        unsafe { libc::poll(&mut p, 1, time.as_millis() as i32) == 1 }
    }

    /// Reads what the run left in its pipes, until they end or for [`DRAIN`] at most.
    fn drain(&mut self) {
        let until = Instant::now() + DRAIN;
        while !(self.stdout.done && self.stderr.done) && Instant::now() < until {
            let mut fds: Vec<libc::pollfd> = [self.stdout.fd(), self.stderr.fd()]
                .into_iter()
                .flatten()
                .map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            let wait = until.saturating_duration_since(Instant::now()).as_millis() as i32 + 1;
            // SAFETY: as in `watch`.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait) };
            if self.stdout.read(self.cap) || self.stderr.read(self.cap) {
                break;
            }
        }
    }
}

/// Output read from a pipe, up to a cap.
struct Capture {
    pipe: File,
    data: Vec<u8>,
    done: bool,
}

impl Capture {
    fn new(pipe: OwnedFd) -> Self {
        Capture {
            pipe: File::from(pipe),
            data: Vec::new(),
            done: false,
        }
    }

    fn fd(&self) -> Option<RawFd> {
        (!self.done).then(|| self.pipe.as_raw_fd())
    }

    /// Reads what is there; true when it went past `cap` (kept up to it).
    fn read(&mut self, cap: usize) -> bool {
        if self.done {
            return false;
        }
        let pipe = &mut self.pipe;
        let mut buf = [0u8; 65536];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) => {
                    self.done = true;
                    return false;
                }
                Ok(n) if self.data.len() + n > cap => {
                    let keep = cap - self.data.len();
                    self.data.extend_from_slice(&buf[..keep]);
                    self.done = true;
                    return true;
                }
                Ok(n) => self.data.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.done = true;
                    return false;
                }
            }
        }
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    spawn::pipe().map_err(|e| EvalError::io("pipe", e))
}

fn set_nonblocking(fd: RawFd) -> Result<()> {
    // SAFETY: fcntl on a descriptor we hold.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(EvalError::io("fcntl", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor is new and ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The parent of process `pid`, from `/proc/<pid>/stat` (the field after the name's `)`).
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Processes of the current user, which `RLIMIT_NPROC` counts alongside the sandbox's.
fn processes_of_this_user() -> u64 {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("status")).is_ok_and(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    == Some(&uid.to_string())
            })
        })
        .count() as u64
}
