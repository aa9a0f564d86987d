//! Hostile programs, built and run in the sandbox: each is contained, reported with its
//! reason, and leaves the host as it was.

use cxxlm_eval::{Compiler, Ending, Limits, Sandbox};
use std::time::Duration;

fn limits() -> Limits {
    Limits {
        cpu_seconds: 4,
        wall: Duration::from_secs(8),
        memory_bytes: 1 << 30,
        processes: 16,
        file_bytes: 16 << 20,
        tmp_bytes: 8 << 20,
        output_bytes: 64 << 10,
        nice: 0,
    }
}

fn sandbox(limits: Limits) -> Sandbox {
    Sandbox::new(limits).expect("bubblewrap works here (scripts/setup.sh installs it)")
}

fn compiler() -> Compiler {
    Compiler::plain(sandbox(limits()))
}

fn run(source: &str) -> cxxlm_eval::Outcome {
    let (built, ran) = compiler().build_and_run(source, b"").unwrap();
    assert!(built.ok, "{source}: {built:?}");
    ran.unwrap()
}

#[test]
fn a_correct_program_runs_and_reads_its_input() {
    let (built, ran) = compiler()
        .build_and_run(
            "#include <iostream>\nint main() { int a, b; std::cin >> a >> b; std::cout << a + b; }\n",
            b"2 40",
        )
        .unwrap();
    let ran = ran.unwrap();
    assert!(built.ok && ran.success(), "{ran:?}");
    assert_eq!(ran.stdout, b"42");
}

#[test]
fn a_run_asked_to_yield_the_cpu_runs_at_a_lower_priority() {
    let scratch = tempfile::tempdir().unwrap();
    let niceness = |nice| {
        let ran = sandbox(Limits { nice, ..limits() })
            .run(scratch.path(), &["/usr/bin/nice"], b"")
            .unwrap();
        assert!(ran.success(), "{ran:?}");
        String::from_utf8_lossy(&ran.stdout)
            .trim()
            .parse::<i32>()
            .unwrap()
    };
    // SAFETY: getpriority has no preconditions.
    let ours = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    assert_eq!(niceness(0), ours);
    assert_eq!(niceness(10), (ours + 10).min(19));
}

#[test]
fn an_infinite_loop_hits_the_cpu_limit() {
    // Room in wall time for a busy machine to give it its CPU seconds.
    let compiler = Compiler::plain(sandbox(Limits {
        cpu_seconds: 2,
        wall: Duration::from_secs(60),
        ..limits()
    }));
    let (built, ran) = compiler
        .build_and_run(
            "int main() { volatile unsigned long x = 0; for (;;) x++; }\n",
            b"",
        )
        .unwrap();
    assert!(built.ok, "{built:?}");
    let r = ran.unwrap();
    assert_eq!(r.ending, Ending::CpuTime, "{r:?}");
}

#[test]
fn sleeping_forever_hits_the_wall_clock_limit() {
    let r = run("#include <unistd.h>\nint main() { for (;;) pause(); }\n");
    assert_eq!(r.ending, Ending::WallTime, "{r:?}");
    assert!(r.wall < Duration::from_secs(12));
}

#[test]
fn a_fork_bomb_is_contained() {
    let r = run(
        "#include <unistd.h>\n#include <cstdio>\nint main() {\n  int failed = 0;\n  for (int i = 0; i < 10000; i++) if (fork() < 0) { failed = 1; break; }\n  if (failed) { std::puts(\"fork refused\"); std::fflush(stdout); }\n  for (;;) pause();\n}\n",
    );
    assert!(
        matches!(r.ending, Ending::WallTime | Ending::Signal),
        "{r:?}"
    );
    assert!(
        String::from_utf8_lossy(&r.stdout).contains("fork refused"),
        "{r:?}"
    );
}

#[test]
fn a_ten_gigabyte_allocation_fails() {
    let r = run(
        "#include <vector>\n#include <cstdio>\nint main() { std::vector<char> v(10ul << 30, 1); std::printf(\"%d\", v[5]); }\n",
    );
    assert_eq!(r.ending, Ending::Memory, "{r:?}");
}

#[test]
fn the_network_is_unreachable() {
    let r = run(
        "#include <sys/socket.h>\n#include <netinet/in.h>\n#include <arpa/inet.h>\n#include <cstdio>\nint main() {\n  int s = socket(AF_INET, SOCK_STREAM, 0);\n  sockaddr_in a{}; a.sin_family = AF_INET; a.sin_port = htons(80);\n  inet_pton(AF_INET, \"1.1.1.1\", &a.sin_addr);\n  if (connect(s, (sockaddr*)&a, sizeof a) == 0) { std::puts(\"connected\"); return 0; }\n  std::perror(\"connect\"); return 3;\n}\n",
    );
    assert_eq!((r.ending, r.code), (Ending::Exited, Some(3)), "{r:?}");
}

#[test]
fn host_files_are_neither_readable_nor_writable() {
    let marker = std::env::temp_dir().join(format!("cxxlm-sandbox-escape-{}", std::process::id()));
    let source = format!(
        "#include <cstdio>\nint main() {{\n  int bad = 0;\n  const char* secrets[] = {{\"/etc/shadow\", \"/etc/passwd\", \"/root/.bashrc\", \"/home\"}};\n  for (auto p : secrets) if (std::FILE* f = std::fopen(p, \"r\")) {{ std::printf(\"read %s\\n\", p); bad = 1; std::fclose(f); }}\n  const char* targets[] = {{\"/usr/escape\", \"{}\", \"/etc/escape\"}};\n  for (auto p : targets) if (std::FILE* f = std::fopen(p, \"w\")) {{ std::printf(\"wrote %s\\n\", p); std::fputs(\"x\", f); std::fclose(f); }}\n  std::FILE* ok = std::fopen(\"/work/mine.txt\", \"w\");\n  return bad * 10 + (ok ? 0 : 1);\n}}\n",
        marker.display()
    );
    let r = run(&source);
    let said = String::from_utf8_lossy(&r.stdout);
    assert!(!said.contains("read "), "{said}");
    assert_eq!(r.code, Some(0), "{r:?}");
    // Writes outside /work land in the sandbox's own tmpfs at most, never on the host.
    assert!(!marker.exists() && !std::path::Path::new("/usr/escape").exists());
}

#[test]
fn a_flood_of_output_is_cut() {
    let r = run("#include <cstdio>\nint main() { for (;;) std::puts(\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"); }\n");
    assert_eq!(r.ending, Ending::Output, "{r:?}");
    assert_eq!(r.stdout.len(), 64 << 10);
}

#[test]
fn a_compiler_bomb_is_stopped() {
    // Each level instantiates two of the next: 2^40 instantiations if nothing stops it.
    let bomb = "template <int N> struct B { static constexpr long v = B<N - 1>::v + B<N - 2>::v + 1; };\ntemplate <> struct B<0> { static constexpr long v = 1; };\ntemplate <> struct B<1> { static constexpr long v = 1; };\n#include </dev/zero>\nint main() { return B<40>::v > 0 ? 0 : 1; }\n";
    let (built, ran) = compiler().build_and_run(bomb, b"").unwrap();
    assert!(!built.ok && ran.is_none(), "{built:?}");
    let category = built.category.unwrap();
    assert!(
        ["memory", "cputime", "walltime", "other"].contains(&category.as_str()),
        "{category}"
    );
}

#[test]
fn syntax_checks_with_the_header_cache_classify_failures() {
    let cache = tempfile::tempdir().unwrap();
    let c = Compiler::new(Sandbox::new(Limits::default()).unwrap(), cache.path()).unwrap();
    let good = c
        .check("#include <bits/stdc++.h>\nint main() { std::vector<int> v{1}; return v[0] - 1; }\n")
        .unwrap();
    assert!(good.ok && good.warnings == 0, "{good:?}");
    let warned = c
        .check("int main() { int unused = 1; return 0; }\n")
        .unwrap();
    assert!(warned.ok && warned.warnings == 1, "{warned:?}");
    let bad = c
        .check("#include <vector>\nint main() { return undefined_thing; }\n")
        .unwrap();
    assert_eq!(bad.category.as_deref(), Some("undeclared"), "{bad:?}");
}

#[test]
fn other_processes_namespaces_and_mounts_are_out_of_reach() {
    // Each line names a call that worked; threads and processes must still work.
    let r = run(r#"#include <cerrno>
#include <cstdio>
#include <fcntl.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>
int main() {
  if (ptrace(PTRACE_ATTACH, 1, 0, 0) == 0) std::puts("ptrace attach to init");
  char buf[8];
  iovec local{buf, sizeof buf}, remote{(void*)0x400000, sizeof buf};
  if (process_vm_readv(1, &local, 1, &remote, 1, 0) >= 0 || errno != EPERM) std::puts("process_vm_readv");
  if (open("/proc/1/mem", O_RDWR) >= 0) std::puts("open /proc/1/mem");
  if (unshare(CLONE_NEWUSER) == 0) std::puts("unshare user namespace");
  if (syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0) >= 0) std::puts("clone into a user namespace");
  if (mount("none", "/work", "tmpfs", 0, nullptr) == 0) std::puts("mount");
  if (syscall(SYS_io_uring_setup, 1, buf) >= 0) std::puts("io_uring");
  pid_t child = fork();
  if (child == 0) {
    if (ptrace(PTRACE_TRACEME, 0, 0, 0) == 0) std::puts("traceme");
    _exit(7);
  }
  int status = 0;
  if (child < 0 || waitpid(child, &status, 0) != child || WEXITSTATUS(status) != 7) std::puts("fork failed");
  int seen = 0;
  std::thread t([&] { seen = 1; });
  t.join();
  return seen ? 0 : 9;
}
"#);
    assert_eq!((r.ending, r.code), (Ending::Exited, Some(0)), "{r:?}");
    assert_eq!(String::from_utf8_lossy(&r.stdout), "", "{r:?}");
}

/// The escape the seccomp filter closes: a program makes the sandbox's init call
/// `prctl(PR_SET_PDEATHSIG, 0)` through ptrace and sleeps. Without the filter init then
/// outlives bubblewrap, and a run that waits for its output never returns.
#[cfg(target_arch = "x86_64")]
#[test]
fn freeing_init_from_the_parent_death_signal_does_not_outlive_the_run() {
    let source = r#"#include <cerrno>
#include <cstdio>
#include <cstring>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>
int main() {
  if (ptrace(PTRACE_SEIZE, 1, 0, 0) != 0) { std::printf("seize: %s\n", std::strerror(errno)); std::fflush(stdout); for (;;) pause(); }
  int status;
  ptrace(PTRACE_INTERRUPT, 1, 0, 0);
  waitpid(1, &status, __WALL);
  user_regs_struct saved, r;
  ptrace(PTRACE_GETREGS, 1, 0, &saved);
  r = saved;
  r.rip = saved.rip - 2;  // init waits in wait4: back to its `syscall` instruction
  r.orig_rax = -1;
  r.rax = SYS_prctl;
  r.rdi = PR_SET_PDEATHSIG;
  r.rsi = 0;
  ptrace(PTRACE_SETREGS, 1, 0, &r);
  ptrace(PTRACE_SINGLESTEP, 1, 0, 0);
  waitpid(1, &status, __WALL);
  ptrace(PTRACE_GETREGS, 1, 0, &r);
  std::printf("init's prctl returned %lld\n", (long long)r.rax);
  std::fflush(stdout);
  ptrace(PTRACE_SETREGS, 1, 0, &saved);
  ptrace(PTRACE_DETACH, 1, 0, 0);
  for (;;) pause();
}
"#;
    let compiler = Compiler::plain(sandbox(Limits {
        wall: Duration::from_secs(2),
        ..limits()
    }));
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(compiler.build_and_run(source, b""));
    });
    let (built, ran) = finished
        .recv_timeout(Duration::from_secs(60))
        .expect("the run returned")
        .unwrap();
    assert!(built.ok, "{built:?}");
    let r = ran.unwrap();
    assert_eq!(r.ending, Ending::WallTime, "{r:?}");
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "seize: Operation not permitted\n"
    );
}

#[test]
fn the_host_environment_is_not_visible() {
    let r = run(r#"#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
int main() {
  for (const char* p : {"/proc/1/environ", "/proc/self/environ"}) {
    std::ifstream f(p);
    std::string all((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    std::cout << p << '\n' << all << '\n';
  }
}
"#);
    assert!(r.success(), "{r:?}");
    let said = String::from_utf8_lossy(&r.stdout);
    let set_by_the_sandbox = ["PATH", "HOME", "LANG"];
    for (name, value) in std::env::vars() {
        if !set_by_the_sandbox.contains(&name.as_str()) {
            assert!(
                !said.contains(&format!("{name}={value}")),
                "{name} leaked: {said}"
            );
        }
    }
    let init = said.lines().nth(1).unwrap_or("");
    assert!(init.is_empty(), "init's environment: {init:?}");
}

/// Runs a shell script in the sandbox with `scratch` holding one file, `given`.
fn shell(script: &str, limits: Limits) -> (tempfile::TempDir, cxxlm_eval::Outcome) {
    let scratch = tempfile::tempdir().unwrap();
    std::fs::write(scratch.path().join("given"), b"x").unwrap();
    let r = sandbox(limits)
        .run(scratch.path(), &["/usr/bin/sh", "-c", script], b"")
        .unwrap();
    (scratch, r)
}

#[test]
fn memory_backed_directories_are_bounded() {
    // 8 MiB of room in /work and /tmp together; /dev, /dev/shm and / take nothing.
    let script = "for d in /tmp /work /dev/shm /dev /; do
      i=0; while [ $i -lt 12 ]; do head -c 1048576 /dev/zero > $d/f$i 2>/dev/null || break; i=$((i+1)); done
      echo $d $i
    done";
    let (_, r) = shell(script, limits());
    let said = String::from_utf8_lossy(&r.stdout).into_owned();
    let written: Vec<(String, usize)> = said
        .lines()
        .map(|l| {
            let (d, n) = l.split_once(' ').unwrap();
            (d.to_string(), n.parse().unwrap())
        })
        .collect();
    assert_eq!(written.len(), 5, "{r:?}");
    let mib = |d: &str| written.iter().find(|w| w.0 == d).unwrap().1;
    assert!(mib("/tmp") + mib("/work") <= 8, "{said}");
    assert!(mib("/tmp") >= 6, "/tmp should hold most of 8 MiB: {said}");
    assert_eq!(
        (mib("/dev/shm"), mib("/dev"), mib("/")),
        (0, 0, 0),
        "{said}"
    );
}

#[test]
fn the_host_disk_gets_only_the_given_files_each_bounded() {
    let script = "i=0; while [ $i -lt 8 ]; do head -c 4194304 /dev/zero > /work/new$i || break; i=$((i+1)); done
      head -c 67108864 /dev/zero > /work/given; echo done";
    let (scratch, r) = shell(script, limits());
    assert!(String::from_utf8_lossy(&r.stdout).contains("done"), "{r:?}");
    let mut names: Vec<String> = std::fs::read_dir(scratch.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["given"], "new files stay in the sandbox");
    let size = std::fs::metadata(scratch.path().join("given"))
        .unwrap()
        .len();
    assert_eq!(
        size,
        limits().file_bytes,
        "the given file grows to the file limit only"
    );
    assert_eq!(r.ending, Ending::Storage, "{r:?}");
}

#[test]
fn a_failed_build_keeps_the_start_of_the_compiler_message() {
    let (built, ran) = compiler()
        .build_and_run("#include <cxxlm_absent/any.hpp>\nint main() {}\n", b"")
        .unwrap();
    assert!(!built.ok && ran.is_none());
    assert_eq!(built.category.as_deref(), Some("missing_header"));
    let message = built.message.unwrap_or_default();
    assert!(
        message.contains("cxxlm_absent/any.hpp: No such file or directory"),
        "{message}"
    );
    assert!(message.lines().count() <= 6, "{message}");
}

#[test]
fn falling_off_the_end_of_a_function_is_a_compile_error() {
    // Optimized, the missing return "returns" what the register held: here the right answer.
    let source = "int twice(int x) { int y = 2 * x; if (y < 0) return -y; }\nint main() { return twice(21) == 42 ? 0 : 1; }\n";
    let (built, ran) = compiler().build_and_run(source, b"").unwrap();
    assert!(!built.ok && ran.is_none(), "{built:?}");
    assert_eq!(built.category.as_deref(), Some("return"), "{built:?}");
}

#[test]
fn undefined_behaviour_stops_the_program() {
    // Unchecked, the overflow wraps and the program exits 0.
    let r = run("#include <climits>\nint main() { volatile int x = INT_MAX; x = x + 1; return x == INT_MIN ? 0 : 1; }\n");
    assert_eq!(r.ending, Ending::UndefinedBehaviour, "{r:?}");
    assert!(!r.success());
}

#[test]
fn descriptors_the_host_left_open_do_not_reach_the_run() {
    use std::os::fd::AsRawFd;
    // A host file open for writing without close-on-exec, as C libraries (a GPU
    // driver's device files, sockets) and build tools (a jobserver's pipe) leave theirs;
    // above the numbers the sandbox gives its own descriptors.
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), b"host secret").unwrap();
    let file = std::fs::File::options()
        .write(true)
        .open(secret.path())
        .unwrap();
    // SAFETY: fcntl on our own descriptor; the copy is closed below.
    let fd = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD, 40) };
    assert!(fd >= 40);
    let (_scratch, r) = shell("ls /proc/self/fd", limits());
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    assert!(r.success(), "{r:?}");
    let open = String::from_utf8_lossy(&r.stdout);
    assert!(
        !open.lines().any(|l| l == fd.to_string()),
        "descriptor {fd} reached the run: {open}"
    );
}
