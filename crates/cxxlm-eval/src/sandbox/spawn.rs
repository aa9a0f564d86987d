//! Starting a program the way `posix_spawn` does: the child shares the caller's memory
//! until it execs (`CLONE_VM | CLONE_VFORK`) instead of getting a copy of it. `fork`,
//! which `Command` uses once there is setup to do before the exec, copies the page
//! tables of the whole process and write-protects its memory: in a trainer with
//! gigabytes mapped that costs a fraction of a second per program and stalls the thread
//! that feeds the GPU, and a pool of judges starts programs many times a second.
//!
//! Between the clone and the exec, the child runs on its own stack but in the caller's
//! memory and with the calling thread's thread-local storage, while the calling thread
//! waits: it must only make system calls (no allocation, no locks, no panics), and only
//! through wrappers that act on the calling process alone (raw `setuid` and the like:
//! glibc's wrappers change every thread of the process, which would be the caller's).

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

/// A started program: its pid (to wait for with [`wait`]) and the other ends of its
/// stdin, stdout and stderr pipes.
pub(super) struct Spawned {
    pub pid: i32,
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// The child's side: what it execs, its pipes, and the caller's setup, run after the
/// signals are reset and the pipes in place, just before the exec.
struct Child<'a> {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    stdio: [RawFd; 3],
    /// Where the child writes the error number when the setup or the exec fails.
    error: RawFd,
    setup: &'a mut dyn FnMut() -> io::Result<()>,
}

const STACK_BYTES: usize = 256 << 10;

/// Starts `program` with `args` and an empty environment, running `setup` in the child
/// just before the exec (under the rules of this module's comment); no descriptor the
/// caller holds beyond the pipes reaches the program, close-on-exec or not, unless
/// `setup` puts it somewhere (`dup2` makes a descriptor without close-on-exec).
pub(super) fn spawn(
    program: &OsStr,
    args: &[impl AsRef<OsStr>],
    setup: &mut dyn FnMut() -> io::Result<()>,
) -> io::Result<Spawned> {
    let c_string = |s: &OsStr| {
        CString::new(s.as_bytes()).map_err(|_| io::Error::other("a NUL byte in an argument"))
    };
    let program = c_string(program)?;
    let args = std::iter::once(Ok(program.clone()))
        .chain(args.iter().map(|a| c_string(a.as_ref())))
        .collect::<io::Result<Vec<_>>>()?;
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let (stdin_read, stdin_write) = pipe()?;
    let (stdout_read, stdout_write) = pipe()?;
    let (stderr_read, stderr_write) = pipe()?;
    let (error_read, error_write) = pipe()?;
    let mut child = Child {
        program: program.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        stdio: [
            stdin_read.as_raw_fd(),
            stdout_write.as_raw_fd(),
            stderr_write.as_raw_fd(),
        ],
        error: error_write.as_raw_fd(),
        setup,
    };
    let mut stack = vec![0u8; STACK_BYTES];
    // SAFETY: the stack is ours and outlives the child's use of it (CLONE_VFORK returns
    // once the child has exec'd or exited); signals stay blocked in this thread while
    // the child starts, so no handler of ours runs on its stack.
    let pid = unsafe {
        let top = (stack.as_mut_ptr().add(STACK_BYTES) as usize & !15) as *mut libc::c_void;
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let pid = libc::clone(
            child_main,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &mut child as *mut Child as *mut libc::c_void,
        );
        let clone_error = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        if pid < 0 {
            return Err(clone_error);
        }
        pid
    };
    drop((stdin_read, stdout_write, stderr_write, error_write));
    // The pipe ends at the exec; before that, the child writes why it failed (four
    // bytes: one write, whole).
    let mut errno = [0u8; 4];
    match File::from(error_read).read_exact(&mut errno) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
        failed => {
            let _ = wait(pid);
            failed?;
            return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)));
        }
    }
    Ok(Spawned {
        pid,
        stdin: stdin_write,
        stdout: stdout_read,
        stderr: stderr_read,
    })
}

extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Child` of `spawn`, whose thread waits until we exec or exit;
    // everything below is a system call.
    unsafe {
        let child = &mut *(arg as *mut Child);
        // The caller's handlers are not ours to run; SIGPIPE, ignored by Rust's runtime,
        // back to its default as `Command` does.
        for signal in 1..=libc::SIGRTMAX() {
            let mut action: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, std::ptr::null(), &mut action) != 0 {
                continue;
            }
            let handled = action.sa_sigaction != libc::SIG_DFL
                && (action.sa_sigaction != libc::SIG_IGN || signal == libc::SIGPIPE);
            if handled {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(signal, &default, std::ptr::null_mut());
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        // Every descriptor of ours out of the way of the numbers the pipes and the setup
        // move to first, then the pipes in place.
        let error = libc::fcntl(child.error, libc::F_DUPFD_CLOEXEC, 10);
        if error < 0 {
            libc::_exit(127);
        }
        let mut failed = false;
        for (target, fd) in child.stdio.iter().enumerate() {
            let moved = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10);
            failed |= moved < 0 || libc::dup2(moved, target as RawFd) < 0;
        }
        // Descriptors left open without close-on-exec (a C library's device files,
        // sockets, a build tool's jobserver pipe) end at the exec too.
        failed |= !close_on_exec_from(3);
        if !failed {
            match (child.setup)() {
                Ok(()) => {
                    libc::execve(child.program, child.argv, child.envp);
                }
                Err(e) => {
                    let errno = e.raw_os_error().unwrap_or(libc::EINVAL);
                    *libc::__errno_location() = errno;
                }
            }
        }
        let errno = (*libc::__errno_location()).to_ne_bytes();
        libc::write(error, errno.as_ptr().cast(), 4);
        libc::_exit(127)
    }
}

/// Marks every descriptor from `first` on close-on-exec: `close_range` (Linux 5.11), else
/// [`close_on_exec_one_by_one`]. Only system calls: it runs in the child.
fn close_on_exec_from(first: RawFd) -> bool {
    // SAFETY: a system call on this process's own descriptor table.
    let marked = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) == 0
    };
    marked || close_on_exec_one_by_one(first)
}

/// Marks every descriptor from `first` up to the descriptor limit close-on-exec, where
/// `close_range` is missing.
fn close_on_exec_one_by_one(first: RawFd) -> bool {
    // SAFETY: system calls on this process's own descriptor table.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return false;
        }
        for fd in first..limit.rlim_cur.min(1 << 20) as RawFd {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        true
    }
}

/// Waits for the spawned process `pid` to end.
pub(super) fn wait(pid: i32) -> io::Result<ExitStatus> {
    loop {
        let mut status = 0;
        // SAFETY: waiting for our own child.
        if unsafe { libc::waitpid(pid, &mut status, 0) } == pid {
            return Ok(ExitStatus::from_raw(status));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A pipe, both ends close-on-exec.
pub(super) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sets the calling process's user and group id (and no supplementary groups) with the
/// system calls themselves: see the module's comment.
pub(super) fn drop_to(uid: u32) -> io::Result<()> {
    let check = |r: libc::c_long| match r {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    };
    // SAFETY: setgroups(0, NULL), setgid and setuid of this process.
    unsafe {
        check(libc::syscall(
            libc::SYS_setgroups,
            0,
            std::ptr::null::<libc::gid_t>(),
        ))?;
        check(libc::syscall(libc::SYS_setgid, uid))?;
        check(libc::syscall(libc::SYS_setuid, uid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn runs_a_program_with_its_setup_and_pipes() {
        let mut setup_ran = false;
        let args = ["-c", "cat; echo err >&2; exit 3"];
        let mut setup = || {
            setup_ran = true;
            Ok(())
        };
        let s = spawn(OsStr::new("/bin/sh"), &args, &mut setup).unwrap();
        std::fs::File::from(s.stdin).write_all(b"in").unwrap();
        let (mut out, mut err) = (String::new(), String::new());
        std::fs::File::from(s.stdout)
            .read_to_string(&mut out)
            .unwrap();
        std::fs::File::from(s.stderr)
            .read_to_string(&mut err)
            .unwrap();
        assert_eq!(wait(s.pid).unwrap().code(), Some(3));
        assert_eq!((out.as_str(), err.as_str()), ("in", "err\n"));
        assert!(setup_ran, "the setup runs in the child, in our memory");
    }

    #[test]
    fn descriptors_are_marked_one_by_one_where_close_range_is_missing() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let fd = null.as_raw_fd();
        let check = ["-c", "[ -e /proc/self/fd/40 ] && echo open || echo closed"];
        for one_by_one in [false, true] {
            // In the child, after the spawn's own marking: a descriptor without
            // close-on-exec at 40, then the fallback alone.
            let mut setup = || unsafe {
                if libc::dup2(fd, 40) < 0 {
                    return Err(io::Error::last_os_error());
                }
                match !one_by_one || close_on_exec_one_by_one(3) {
                    true => Ok(()),
                    false => Err(io::Error::from_raw_os_error(libc::EBADF)),
                }
            };
            let s = spawn(OsStr::new("/bin/sh"), &check, &mut setup).unwrap();
            let mut out = String::new();
            File::from(s.stdout).read_to_string(&mut out).unwrap();
            assert!(wait(s.pid).unwrap().success());
            let want = if one_by_one { "closed" } else { "open" };
            assert_eq!(out.trim(), want, "marked one by one: {one_by_one}");
        }
    }

    #[test]
    fn a_failed_setup_or_exec_is_the_callers_error() {
        let mut failing = || Err(io::Error::from_raw_os_error(libc::EPERM));
        let e = spawn(OsStr::new("/bin/true"), &[""; 0], &mut failing)
            .err()
            .unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        let e = spawn(OsStr::new("/nonexistent/program"), &[""; 0], &mut || Ok(()))
            .err()
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
