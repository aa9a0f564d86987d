//! The system calls a sandboxed program may not make: a seccomp filter (classic BPF),
//! handed to bubblewrap's `--seccomp`, which installs it just before it runs the
//! program. Denied calls fail with `EPERM`; everything else is allowed. The list is what
//! a compiler, a test program and their children never need: reaching into other
//! processes (which is how a program could free the sandbox's init from the parent-death
//! signal that ends it), namespaces and mounts (the way to capabilities and the kernel's
//! larger surfaces), and kernel interfaces that programs of this kind do not use.

use libc::{c_long, sock_filter};

/// Calls that fail with `EPERM`.
const DENIED: &[c_long] = &[
    // Other processes: debugging, their memory, their file descriptors.
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_process_madvise,
    libc::SYS_pidfd_getfd,
    libc::SYS_kcmp,
    libc::SYS_migrate_pages,
    libc::SYS_move_pages,
    // Namespaces and mounts (new namespaces are also refused in `clone` below).
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    // Kernel interfaces with a history of exploits, unused by compilers and tests.
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_open_by_handle_at,
    libc::SYS_fanotify_init,
    // The machine's administration.
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_syslog,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_lookup_dcookie,
    libc::SYS_vhangup,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_iopl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_ioperm,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_modify_ldt,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_uselib,
];

/// `clone` flags that make namespaces.
const NEW_NAMESPACES: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u32;

#[cfg(target_arch = "x86_64")]
const NATIVE_ARCH: u32 = 0xc000_003e; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const NATIVE_ARCH: u32 = 0xc000_00b7; // AUDIT_ARCH_AARCH64

/// Offsets in `struct seccomp_data`: nr, arch, instruction pointer, args (the low half of
/// the first argument on these little-endian machines).
const NR: u32 = 0;
const ARCH: u32 = 4;
const ARG0_LOW: u32 = 16;

fn load(offset: u32) -> sock_filter {
    stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, offset)
}

fn stmt(code: u32, k: u32) -> sock_filter {
    jump(code, k, 0, 0)
}

fn jump(code: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

fn ret(value: u32) -> sock_filter {
    stmt(libc::BPF_RET | libc::BPF_K, value)
}

/// The filter's instructions.
pub fn program() -> Vec<sock_filter> {
    let eq = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
    let mut p = vec![
        load(ARCH),
        // Another ABI's numbering (32-bit calls through `int 0x80`) would bypass the list.
        jump(eq, NATIVE_ARCH, 1, 0),
        ret(libc::SECCOMP_RET_KILL_PROCESS),
        load(NR),
    ];
    // Checks jump forward to one of the returns at the end: [allow, deny, no such call].
    let checks = usize::from(cfg!(target_arch = "x86_64")) + 1 + DENIED.len() + 3;
    let to = |p: &Vec<sock_filter>, ret_index: usize| -> u8 {
        let target = 4 + checks + ret_index;
        u8::try_from(target - p.len() - 1).expect("the filter is short")
    };
    const DENY: usize = 1;
    const NO_SUCH_CALL: usize = 2;
    #[cfg(target_arch = "x86_64")]
    {
        // x32 calls: the same calls under other numbers.
        let jt = to(&p, DENY);
        p.push(jump(
            libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
            0x4000_0000,
            jt,
            0,
        ));
    }
    // clone3's flags are in memory the filter cannot read: C libraries fall back to clone.
    let jt = to(&p, NO_SUCH_CALL);
    p.push(jump(eq, libc::SYS_clone3 as u32, jt, 0));
    for &nr in DENIED {
        let jt = to(&p, DENY);
        p.push(jump(eq, nr as u32, jt, 0));
    }
    p.push(jump(eq, libc::SYS_clone as u32, 0, 2));
    p.push(load(ARG0_LOW));
    p.push(jump(
        libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K,
        NEW_NAMESPACES,
        1,
        0,
    ));
    debug_assert_eq!(p.len(), 4 + checks);
    p.push(ret(libc::SECCOMP_RET_ALLOW));
    p.push(ret(libc::SECCOMP_RET_ERRNO | libc::EPERM as u32));
    p.push(ret(libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32));
    p
}

/// The filter as bubblewrap reads it: the instructions' bytes, in the machine's order.
pub fn bytes() -> Vec<u8> {
    program()
        .iter()
        .flat_map(|i| {
            let mut b = Vec::with_capacity(8);
            b.extend_from_slice(&i.code.to_ne_bytes());
            b.push(i.jt);
            b.push(i.jf);
            b.extend_from_slice(&i.k.to_ne_bytes());
            b
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the filter on a call, as the kernel does.
    fn verdict(nr: c_long, arch: u32, arg0: u64) -> u32 {
        let p = program();
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let i = p[pc];
            let class = u32::from(i.code) & 0x07;
            match class {
                c if c == libc::BPF_LD => {
                    a = match i.k {
                        NR => nr as u32,
                        ARCH => arch,
                        ARG0_LOW => arg0 as u32,
                        k => panic!("load of offset {k}"),
                    }
                }
                c if c == libc::BPF_RET => return i.k,
                c if c == libc::BPF_JMP => {
                    let op = u32::from(i.code) & 0xf0;
                    let taken = match op {
                        o if o == libc::BPF_JEQ => a == i.k,
                        o if o == libc::BPF_JGE => a >= i.k,
                        o if o == libc::BPF_JSET => a & i.k != 0,
                        o => panic!("jump {o:#x}"),
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                c => panic!("class {c}"),
            }
            pc += 1;
        }
    }

    const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;

    #[test]
    fn denies_the_list_and_allows_the_rest() {
        for &nr in DENIED {
            assert_eq!(verdict(nr, NATIVE_ARCH, 0), EPERM, "{nr}");
        }
        for nr in [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_wait4,
            libc::SYS_execve,
        ] {
            assert_eq!(verdict(nr, NATIVE_ARCH, 0), libc::SECCOMP_RET_ALLOW, "{nr}");
        }
        assert_eq!(
            verdict(libc::SYS_clone3, NATIVE_ARCH, 0),
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32
        );
        assert_eq!(
            verdict(libc::SYS_read, 0x4000_0003, 0),
            libc::SECCOMP_RET_KILL_PROCESS
        );
    }

    #[test]
    fn clone_may_make_threads_and_processes_but_no_namespaces() {
        let thread = (libc::CLONE_VM | libc::CLONE_THREAD | libc::CLONE_SIGHAND) as u64;
        let fork = libc::SIGCHLD as u64;
        for flags in [thread, fork] {
            assert_eq!(
                verdict(libc::SYS_clone, NATIVE_ARCH, flags),
                libc::SECCOMP_RET_ALLOW
            );
        }
        for ns in [libc::CLONE_NEWUSER, libc::CLONE_NEWPID, libc::CLONE_NEWNS] {
            assert_eq!(
                verdict(libc::SYS_clone, NATIVE_ARCH, fork | ns as u64),
                EPERM
            );
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x32_numbers_are_denied() {
        assert_eq!(verdict(0x4000_0000 + 101, NATIVE_ARCH, 0), EPERM);
    }
}
