//! Runs untrusted programs (the compiler on model output, and what it builds) inside
//! bubblewrap: new user, PID, network, IPC and UTS namespaces; the system's `/usr`
//! read-only and nothing else of the host (no `/etc`, no home, no host `/tmp`); one
//! writable scratch directory; limits on CPU time, wall time, address space, processes,
//! file size and output. When started as root, each run gets a user id of its own, so
//! that the process limit counts only that run's processes.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{EvalError, Result};

#[derive(Debug, Clone)]
pub struct Limits {
    pub cpu_seconds: u64,
    pub wall: Duration,
    pub memory_bytes: u64,
    pub processes: u64,
    pub file_bytes: u64,
    /// Bytes kept of stdout and of stderr; more ends the run.
    pub output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            cpu_seconds: 10,
            wall: Duration::from_secs(20),
            memory_bytes: 2 << 30,
            processes: 32,
            file_bytes: 64 << 20,
            output_bytes: 1 << 20,
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

pub struct Sandbox {
    bwrap: PathBuf,
    pub limits: Limits,
    /// Host directories mounted read-only, and where (a precompiled header cache).
    read_only: Vec<(PathBuf, PathBuf)>,
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
        };
        let scratch = tempfile::tempdir().map_err(|e| EvalError::io("temporary directory", e))?;
        let probe = sandbox.run(scratch.path(), &["/usr/bin/true"], b"")?;
        if !probe.success() {
            return Err(EvalError::Sandbox(format!(
                "bubblewrap cannot create its namespaces here: {}",
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

    fn command(&self, scratch: &Path, argv: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bwrap);
        cmd.args([
            "--unshare-all",
            "--die-with-parent",
            "--new-session",
            "--clearenv",
        ]);
        cmd.args(["--setenv", "PATH", "/usr/bin", "--setenv", "HOME", "/work"]);
        cmd.args(["--setenv", "LANG", "C.UTF-8"]);
        cmd.args(["--ro-bind", "/usr", "/usr"]);
        for (link, target) in [
            ("/bin", "usr/bin"),
            ("/lib", "usr/lib"),
            ("/lib64", "usr/lib64"),
        ] {
            if Path::new(link).is_symlink() {
                cmd.args(["--symlink", target, link]);
            } else {
                cmd.args(["--ro-bind-try", link, link]);
            }
        }
        cmd.args(["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]);
        for (dir, inside) in &self.read_only {
            cmd.arg("--ro-bind").arg(dir).arg(inside);
        }
        cmd.args(["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]);
        cmd.arg("--bind").arg(scratch).arg("/work");
        cmd.args(["--chdir", "/work", "--"]);
        cmd.args(argv);
        cmd
    }

    /// Runs `argv` in the sandbox with `scratch` as its writable `/work`.
    pub fn run(&self, scratch: &Path, argv: &[&str], stdin: &[u8]) -> Result<Outcome> {
        let mut cmd = self.command(scratch, argv);
        // SAFETY: getuid has no preconditions.
        let root = unsafe { libc::getuid() } == 0;
        let uid = run_uid();
        if root {
            std::os::unix::fs::chown(scratch, Some(uid), Some(uid))
                .map_err(|e| EvalError::io(scratch, e))?;
        }
        let limits = self.limits.clone();
        let own_processes = if root { 0 } else { processes_of_this_user() };
        // SAFETY: only async-signal-safe calls (setrlimit, setgroups, setgid, setuid,
        // setpgid) run between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let set_soft = |resource, soft: u64, hard: u64| {
                    let lim = libc::rlimit {
                        rlim_cur: soft,
                        rlim_max: hard,
                    };
                    if libc::setrlimit(resource, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                };
                let set = |resource, value: u64| set_soft(resource, value, value);
                // SIGXCPU at the soft limit names the cause; SIGKILL a second later.
                set_soft(libc::RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1)?;
                set(libc::RLIMIT_AS, limits.memory_bytes)?;
                set(libc::RLIMIT_FSIZE, limits.file_bytes)?;
                set(libc::RLIMIT_CORE, 0)?;
                set(libc::RLIMIT_NPROC, own_processes + limits.processes)?;
                if root
                    && (libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(uid) != 0
                        || libc::setuid(uid) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                libc::setpgid(0, 0);
                Ok(())
            });
        }
        let started = Instant::now();
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| EvalError::io(&self.bwrap, e))?;
        let pid = child.id() as i32;
        let cap = self.limits.output_bytes;
        let take = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || -> (Vec<u8>, bool) {
                let mut out = Vec::new();
                let Some(mut pipe) = pipe else {
                    return (out, false);
                };
                let mut buf = [0u8; 65536];
                loop {
                    match pipe.read(&mut buf) {
                        Ok(0) | Err(_) => return (out, false),
                        Ok(n) if out.len() + n > cap => {
                            out.extend_from_slice(&buf[..cap - out.len()]);
                            // SAFETY: signalling our own child's process group.
                            unsafe { libc::kill(-pid, libc::SIGKILL) };
                            return (out, true);
                        }
                        Ok(n) => out.extend_from_slice(&buf[..n]),
                    }
                }
            })
        };
        let stdout = take(
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let stderr = take(
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        if let Some(mut input) = child.stdin.take() {
            use std::io::Write;
            let _ = input.write_all(stdin);
        }
        let mut timed_out = false;
        let status = loop {
            if let Some(status) = child
                .try_wait()
                .map_err(|e| EvalError::io(&self.bwrap, e))?
            {
                break status;
            }
            if started.elapsed() > self.limits.wall {
                timed_out = true;
                // SAFETY: as above.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
                break child.wait().map_err(|e| EvalError::io(&self.bwrap, e))?;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let (stdout, out_flood) = stdout.join().unwrap_or_default();
        let (stderr, err_flood) = stderr.join().unwrap_or_default();
        let signal = status.signal();
        // bwrap reports the sandboxed process's death by signal as exit code 128 + n.
        let code = status.code();
        let killed_by = signal.or(code.filter(|c| *c > 128).map(|c| c - 128));
        let text = String::from_utf8_lossy(&stderr);
        let ending = if timed_out {
            Ending::WallTime
        } else if out_flood || err_flood {
            Ending::Output
        } else if killed_by == Some(libc::SIGXCPU) {
            Ending::CpuTime
        } else if text.contains("bad_alloc")
            || text.contains("out of memory")
            || text.contains("memory exhausted")
            || text.contains("Cannot allocate memory")
        {
            Ending::Memory
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
