//! Hostile programs, built and run in the sandbox: each is contained, reported with its
//! reason, and leaves the host as it was.

use cxxlm_eval::{Compiler, Ending, Limits, Sandbox};
use std::time::Duration;

fn compiler() -> Compiler {
    let limits = Limits {
        cpu_seconds: 4,
        wall: Duration::from_secs(8),
        memory_bytes: 1 << 30,
        processes: 16,
        file_bytes: 16 << 20,
        output_bytes: 64 << 10,
    };
    Compiler::plain(
        Sandbox::new(limits).expect("bubblewrap works here (scripts/setup.sh installs it)"),
    )
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
fn an_infinite_loop_hits_the_cpu_limit() {
    let r = run("int main() { volatile unsigned long x = 0; for (;;) x++; }\n");
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
