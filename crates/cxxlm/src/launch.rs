//! `cxxlm launch --gpus N -- <cxxlm command>`: the command as N ranks of one
//! data-parallel job on this host, with the variables `torchrun` sets (so the same
//! command also runs under `torchrun --no-python` or a Slurm wrapper, without this)
//! and a fresh secret the ranks prove to each other (`CXXLM_RENDEZVOUS_SECRET`).

use anyhow::{bail, Context, Result};
use clap::Args;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::interrupt;

#[derive(Args)]
pub struct LaunchArgs {
    /// Ranks to start, one per GPU (on a host without GPUs they train on the CPU).
    #[arg(long)]
    gpus: usize,
    /// Port rank 0 listens on for the others (default: a free one).
    #[arg(long)]
    master_port: Option<u16>,
    /// What each rank runs, e.g. `-- train pretrain --config run.toml`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// After one rank fails, how long the others get to stop on their own.
const GRACE: Duration = Duration::from_secs(30);

pub fn run(args: LaunchArgs) -> Result<()> {
    if args.gpus == 0 {
        bail!("--gpus must be at least 1");
    }
    let port = match args.master_port {
        Some(p) => p,
        None => std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free port for the ranks to meet at")?
            .port(),
    };
    interrupt::install();
    let exe = std::env::current_exe().context("locating the cxxlm binary")?;
    // Ranks share the host's cores (as torchrun does): without this, each rank's CPU
    // thread pool would claim every core and the oversubscribed pools spin.
    let threads = std::env::var("OMP_NUM_THREADS").unwrap_or_else(|_| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / args.gpus).max(1).to_string()
    });
    let mut secret = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut secret))
        .context("making the job's secret from /dev/urandom")?;
    let secret: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let mut children: Vec<Child> = Vec::new();
    for rank in 0..args.gpus {
        let child = Command::new(&exe)
            .env("OMP_NUM_THREADS", &threads)
            .args(&args.command)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", args.gpus.to_string())
            .env("LOCAL_WORLD_SIZE", args.gpus.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("CXXLM_RENDEZVOUS_SECRET", &secret)
            // NVLink multicast stays off: it needs fabric support shared hosts lack.
            .env("NCCL_NVLS_ENABLE", "0")
            .env("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
            .env("NVSHMEM_DISABLE_NVLS", "1")
            .spawn()
            .with_context(|| format!("starting rank {rank}"))?;
        children.push(child);
    }
    let signal = |child: &Child, sig| {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    };
    let mut exited: Vec<Option<ExitStatus>> = vec![None; args.gpus];
    let mut first_failure: Option<(usize, ExitStatus, Instant)> = None;
    let mut forwarded = false;
    while exited.iter().any(Option::is_none) {
        for (rank, child) in children.iter_mut().enumerate() {
            if exited[rank].is_some() {
                continue;
            }
            if let Some(status) = child.try_wait()? {
                exited[rank] = Some(status);
                if !status.success() && first_failure.is_none() {
                    first_failure = Some((rank, status, Instant::now()));
                }
            }
        }
        if interrupt::requested() && !forwarded {
            forwarded = true;
            for (rank, child) in children.iter().enumerate() {
                if exited[rank].is_none() {
                    signal(child, libc::SIGTERM);
                }
            }
        }
        if let Some((_, _, at)) = first_failure {
            if at.elapsed() > GRACE {
                for (rank, child) in children.iter().enumerate() {
                    if exited[rank].is_none() {
                        signal(child, libc::SIGKILL);
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Some((rank, status, _)) = first_failure {
        bail!("rank {rank} of {} failed ({status})", args.gpus);
    }
    Ok(())
}
