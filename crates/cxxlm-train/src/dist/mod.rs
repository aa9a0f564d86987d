//! Data parallelism across processes. [`World`] says who this process is, from the
//! variables `torchrun` and Slurm wrappers set (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`,
//! `MASTER_ADDR`, `MASTER_PORT`); [`Comm`] connects the ranks at that address and offers
//! the collectives the optimizer needs: NCCL on GPUs (on the stream torch computes on),
//! a TCP star through rank 0 on CPUs (for tests and CPU-only hosts). A watchdog on the
//! rendezvous connections stops every rank, naming the one that died, instead of
//! leaving them waiting in a collective forever.

mod nccl;
mod rendezvous;
mod tcp;

use std::time::Duration;
use tch::{Device, Kind, Tensor};

use crate::{Result, TrainError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    /// This process's GPU on its host.
    pub local_rank: usize,
    pub size: usize,
    /// `MASTER_ADDR:MASTER_PORT`, where rank 0 listens.
    pub master: String,
    /// The job's secret (`CXXLM_RENDEZVOUS_SECRET`), which every rank must prove to know.
    pub secret: String,
    /// How long the ranks wait for each other at the start (`CXXLM_RENDEZVOUS_TIMEOUT`).
    pub timeout: Duration,
}

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

impl World {
    pub fn single() -> World {
        World {
            rank: 0,
            local_rank: 0,
            size: 1,
            master: String::new(),
            secret: String::new(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The world the environment describes; one process when `WORLD_SIZE` is not set.
    pub fn from_env() -> Result<World> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<World> {
        let Some(size) = var("WORLD_SIZE") else {
            return Ok(World::single());
        };
        let number = |name: &str, value: Option<String>| -> Result<usize> {
            let value = value.ok_or_else(|| {
                TrainError::Config(format!("WORLD_SIZE is set but {name} is not"))
            })?;
            value.trim().parse().map_err(|_| {
                TrainError::Config(format!("{name}={value:?} is not a non-negative integer"))
            })
        };
        let size = number("WORLD_SIZE", Some(size))?;
        let rank = number("RANK", var("RANK"))?;
        let local_rank = match var("LOCAL_RANK") {
            Some(v) => number("LOCAL_RANK", Some(v))?,
            None => rank,
        };
        if size == 0 || rank >= size {
            return Err(TrainError::Config(format!(
                "RANK={rank} does not fit WORLD_SIZE={size}"
            )));
        }
        let addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let port = number("MASTER_PORT", var("MASTER_PORT"))?;
        let secret = var("CXXLM_RENDEZVOUS_SECRET").unwrap_or_default();
        if size > 1 && secret.is_empty() {
            return Err(TrainError::Config(
                "CXXLM_RENDEZVOUS_SECRET is not set: give every rank of the job the same random secret (`cxxlm launch` makes one; with another launcher, e.g. `export CXXLM_RENDEZVOUS_SECRET=$(openssl rand -hex 32)` before it), so that no other process can join or disturb the run".into(),
            ));
        }
        let timeout = match var("CXXLM_RENDEZVOUS_TIMEOUT") {
            Some(v) => Duration::from_secs(v.trim().parse().map_err(|_| {
                TrainError::Config(format!(
                    "CXXLM_RENDEZVOUS_TIMEOUT={v:?} is not a number of seconds"
                ))
            })?),
            None => DEFAULT_TIMEOUT,
        };
        Ok(World {
            rank,
            local_rank,
            size,
            master: format!("{addr}:{port}"),
            secret,
            timeout,
        })
    }
}

enum Backend {
    Single,
    Tcp(tcp::Tcp),
    Nccl(nccl::Nccl),
}

/// The ranks of one run, connected. Collectives must be called by every rank in the
/// same order with tensors of the same shapes.
pub struct Comm {
    pub world: World,
    backend: Backend,
    watchdog: Option<rendezvous::Watchdog>,
}

impl Comm {
    /// One process alone: every collective is the identity.
    pub fn single() -> Comm {
        Comm {
            world: World::single(),
            backend: Backend::Single,
            watchdog: None,
        }
    }

    /// Meets the other ranks of `world` at its master address; tensors live on `device`
    /// (CUDA: NCCL on that GPU, made current; CPU: TCP through rank 0).
    pub fn connect(world: World, device: Device) -> Result<Comm> {
        if world.size == 1 {
            return Ok(Comm::single());
        }
        let fail = |e: String| TrainError::Collective(format!("rank {}: {e}", world.rank));
        let (backend, watchdog) = match device {
            Device::Cuda(index) => {
                crate::cuda::set_device(index).map_err(fail)?;
                // NVLink multicast (NVLS) stays off unless asked for: it needs fabric
                // support that shared and virtualized hosts do not give.
                if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
                    std::env::set_var("NCCL_NVLS_ENABLE", "0");
                }
                let id = if world.rank == 0 {
                    nccl::unique_id().map_err(fail)?.to_vec()
                } else {
                    Vec::new()
                };
                let links = rendezvous::connect(&world, false, &id).map_err(fail)?;
                let nccl = nccl::Nccl::init(&links.payload, world.rank, world.size, index)
                    .map_err(fail)?;
                (Backend::Nccl(nccl), links.watchdog)
            }
            _ => {
                let links = rendezvous::connect(&world, true, &[]).map_err(fail)?;
                (
                    Backend::Tcp(tcp::Tcp::new(world.rank, world.size, links.data)),
                    links.watchdog,
                )
            }
        };
        Ok(Comm {
            world,
            backend,
            watchdog: Some(watchdog),
        })
    }

    pub fn rank(&self) -> usize {
        self.world.rank
    }

    pub fn size(&self) -> usize {
        self.world.size
    }

    fn failed(&self, e: impl std::fmt::Display) -> TrainError {
        TrainError::Collective(format!("rank {}: {e}", self.world.rank))
    }

    /// Sums `t` over the ranks, in place.
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<()> {
        match &self.backend {
            Backend::Single => Ok(()),
            Backend::Tcp(c) => c.all_reduce_sum(t).map_err(|e| self.failed(e)),
            Backend::Nccl(c) => c.all_reduce_sum(t).map_err(|e| self.failed(e)),
        }
    }

    /// The mean over the ranks of `t` (whose first dimension is a multiple of the world
    /// size), cut along that dimension: rank r gets the r-th of `size` equal parts.
    pub fn reduce_scatter_mean(&self, t: &Tensor) -> Result<Tensor> {
        let size = self.world.size as i64;
        if t.size()[0] % size != 0 {
            return Err(self.failed(format!(
                "reduce-scatter of shape {:?} over {size} ranks",
                t.size()
            )));
        }
        match &self.backend {
            Backend::Single => Ok(t.shallow_clone()),
            Backend::Tcp(c) => {
                let sum = t.copy();
                c.all_reduce_sum(&sum).map_err(|e| self.failed(e))?;
                let part = t.size()[0] / size;
                Ok((sum / size as f64)
                    .narrow(0, self.world.rank as i64 * part, part)
                    .contiguous())
            }
            Backend::Nccl(c) => c.reduce_scatter_mean(t, size).map_err(|e| self.failed(e)),
        }
    }

    /// Every rank's `t` (same shape everywhere), concatenated in rank order along the
    /// first dimension.
    pub fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        match &self.backend {
            Backend::Single => Ok(t.shallow_clone()),
            Backend::Tcp(c) => c.all_gather(t).map_err(|e| self.failed(e)),
            Backend::Nccl(c) => c.all_gather(t, self.world.size).map_err(|e| self.failed(e)),
        }
    }

    /// Rank 0's `value`, on every rank.
    pub fn from_rank0(&self, value: f64, device: Device) -> Result<f64> {
        let mine = if self.world.rank == 0 { value } else { 0.0 };
        let t = Tensor::from_slice(&[mine]).to_device(device);
        self.all_reduce_sum(&t)?;
        Ok(t.double_value(&[0]))
    }

    /// Host figures over the ranks: the sums of `sums` and the maxima of `maxima` (each
    /// rank's in the same order), in one collective.
    pub fn sums_and_maxima(&self, sums: &[f64], maxima: &[f64]) -> Result<(Vec<f64>, Vec<f64>)> {
        if self.world.size == 1 {
            return Ok((sums.to_vec(), maxima.to_vec()));
        }
        let device = match &self.backend {
            Backend::Nccl(c) => Device::Cuda(c.device),
            _ => Device::Cpu,
        };
        let mine: Vec<f64> = sums.iter().chain(maxima).copied().collect();
        let n = mine.len() as i64;
        let all = self.all_gather(&Tensor::from_slice(&mine).view([1, n]).to_device(device))?;
        let split = sums.len() as i64;
        let values =
            |t: Tensor| Vec::<f64>::try_from(&t.to_device(Device::Cpu)).map_err(|e| self.failed(e));
        Ok((
            values(
                all.narrow(1, 0, split)
                    .sum_dim_intlist(0, false, Kind::Double),
            )?,
            values(all.narrow(1, split, n - split).amax(0, false))?,
        ))
    }

    /// Whether `flag` is true on any rank.
    pub fn any(&self, flag: bool, device: Device) -> Result<bool> {
        if self.world.size == 1 {
            return Ok(flag);
        }
        let t = Tensor::from_slice(&[flag as i64 as f64]).to_device(device);
        self.all_reduce_sum(&t)?;
        Ok(t.double_value(&[0]) > 0.0)
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) -> Result<()> {
        match &self.backend {
            Backend::Single => Ok(()),
            Backend::Tcp(c) => c
                .all_reduce_sum(&Tensor::zeros([1], (Kind::Float, Device::Cpu)))
                .map_err(|e| self.failed(e)),
            Backend::Nccl(c) => c.barrier().map_err(|e| self.failed(e)),
        }
    }

    /// Ends the run on this rank: after this, another rank exiting is no longer an error.
    pub fn finish(self) -> Result<()> {
        self.barrier()?;
        if let Some(w) = &self.watchdog {
            w.finish();
        }
        Ok(())
    }
}

/// `t` flattened and padded with zeros to a multiple of `parts` elements (a view when no
/// padding is needed).
pub(crate) fn flat_padded(t: &Tensor, parts: usize) -> Tensor {
    let flat = t.reshape([-1]);
    let n = flat.size()[0];
    let pad = (parts as i64 - n % parts as i64) % parts as i64;
    if pad == 0 {
        flat
    } else {
        Tensor::cat(
            &[
                flat.shallow_clone(),
                flat.new_zeros([pad], (flat.kind(), flat.device())),
            ],
            0,
        )
    }
}

#[cfg(test)]
const TEST_SECRET: &str = "a secret of this test";

/// Ranks as threads of this process, joined over loopback TCP.
#[cfg(test)]
pub(crate) fn with_ranks<T: Send + 'static>(
    size: usize,
    work: impl Fn(Comm) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let work = std::sync::Arc::new(work);
    let handles: Vec<_> = (0..size)
        .map(|rank| {
            let work = work.clone();
            std::thread::spawn(move || {
                let world = World {
                    rank,
                    local_rank: rank,
                    size,
                    master: format!("127.0.0.1:{port}"),
                    secret: TEST_SECRET.into(),
                    timeout: Duration::from_secs(60),
                };
                work(Comm::connect(world, Device::Cpu).expect("rendezvous"))
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("rank thread"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn the_world_comes_from_torchrun_variables() {
        assert_eq!(World::from_vars(vars(&[])).unwrap(), World::single());
        let w = World::from_vars(vars(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node7"),
            ("MASTER_PORT", "29500"),
            ("CXXLM_RENDEZVOUS_SECRET", "s3cret"),
            ("CXXLM_RENDEZVOUS_TIMEOUT", "20"),
        ]))
        .unwrap();
        assert_eq!((w.rank, w.local_rank, w.size), (3, 1, 4));
        assert_eq!(w.master, "node7:29500");
        assert_eq!((w.secret.as_str(), w.timeout.as_secs()), ("s3cret", 20));
        let err = |v: &[(&str, &str)]| World::from_vars(vars(v)).unwrap_err().to_string();
        assert!(err(&[("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).contains("RANK is not"));
        assert!(
            err(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_PORT", "1")])
                .contains("does not fit")
        );
        assert!(err(&[("WORLD_SIZE", "2"), ("RANK", "x")]).contains("RANK=\"x\""));
        assert!(err(&[("WORLD_SIZE", "2"), ("RANK", "1")]).contains("MASTER_PORT"));
        let no_secret = err(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_PORT", "1")]);
        assert!(
            no_secret.contains("CXXLM_RENDEZVOUS_SECRET is not set"),
            "{no_secret}"
        );
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    }

    /// Rank `rank` of two on `port`, as a thread: it connects, sums its rank over both
    /// ranks, and returns the sum (or why it could not).
    fn rank_thread(
        rank: usize,
        port: u16,
        timeout: Duration,
    ) -> std::sync::mpsc::Receiver<std::result::Result<f64, String>> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let world = World {
                rank,
                local_rank: rank,
                size: 2,
                master: format!("127.0.0.1:{port}"),
                secret: TEST_SECRET.into(),
                timeout,
            };
            let result = Comm::connect(world, Device::Cpu)
                .and_then(|comm| {
                    let t = Tensor::from_slice(&[rank as f64 + 1.0]);
                    comm.all_reduce_sum(&t)?;
                    comm.finish()?;
                    Ok(t.double_value(&[0]))
                })
                .map_err(|e| e.to_string());
            let _ = tx.send(result);
        });
        rx
    }

    #[test]
    fn strangers_can_neither_abort_nor_hold_the_rendezvous() {
        use std::io::Write;
        let port = free_port();
        let rank0 = rank_thread(0, port, Duration::from_secs(60));
        let connect = || loop {
            if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                return s;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // Claims another world size, without the secret.
        let mut liar = connect();
        liar.write_all(b"cxxlm-rendezvous control 1 99 00 00\n")
            .unwrap();
        // Sends a byte now and then, forever.
        let mut slow = connect();
        std::thread::spawn(move || {
            while slow.write_all(b"c").is_ok() {
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        // Poses as rank 1's data link and announces a 2^62-byte message.
        let mut bomb = connect();
        bomb.write_all(b"cxxlm-rendezvous data 1 2 00 00\n")
            .unwrap();
        bomb.write_all(&(1u64 << 62).to_le_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let rank1 = rank_thread(1, port, Duration::from_secs(60));
        for rank in [rank0, rank1] {
            let sum = rank
                .recv_timeout(Duration::from_secs(90))
                .expect("the rendezvous ends")
                .expect("and succeeds");
            assert_eq!(sum, 3.0);
        }
    }

    #[test]
    fn a_stranger_at_the_master_address_cannot_hold_a_rank() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    while s.write_all(b"x").is_ok() {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                });
            }
        });
        let e = rank_thread(1, port, Duration::from_secs(2))
            .recv_timeout(Duration::from_secs(60))
            .expect("the rendezvous ends")
            .unwrap_err();
        assert!(e.contains("did not answer") && e.contains("in time"), "{e}");
    }

    #[test]
    fn tcp_collectives_agree_with_their_definitions() {
        let results = with_ranks(3, |comm| {
            let r = comm.rank() as f32;
            // Rank r holds [r, r+1, ..., r+5].
            let t = Tensor::arange(6, (Kind::Float, Device::Cpu)) + r as f64;
            let sum = t.copy();
            comm.all_reduce_sum(&sum).unwrap();
            let mean_part = comm.reduce_scatter_mean(&t).unwrap();
            let gathered = comm
                .all_gather(&Tensor::from_slice(&[r, 10.0 * r]))
                .unwrap();
            let from0 = comm.from_rank0(7.0 + r as f64, Device::Cpu).unwrap();
            let any = comm.any(comm.rank() == 2, Device::Cpu).unwrap();
            let figures = comm.sums_and_maxima(&[0.5, r as f64], &[-(r as f64), 2.0 * r as f64]);
            comm.barrier().unwrap();
            let v = |t: &Tensor| Vec::<f32>::try_from(t).unwrap();
            let out = (
                v(&sum),
                v(&mean_part),
                v(&gathered),
                from0,
                any,
                figures.unwrap(),
            );
            comm.finish().unwrap();
            out
        });
        for (rank, (sum, part, gathered, from0, any, figures)) in results.into_iter().enumerate() {
            assert_eq!(sum, vec![3.0, 6.0, 9.0, 12.0, 15.0, 18.0]);
            // The mean is [1, 2, ..., 6]; rank r gets elements 2r and 2r+1.
            let r = rank as f32;
            assert_eq!(part, vec![2.0 * r + 1.0, 2.0 * r + 2.0]);
            assert_eq!(gathered, vec![0.0, 0.0, 1.0, 10.0, 2.0, 20.0]);
            assert_eq!((from0, any), (7.0, true));
            assert_eq!(figures, (vec![1.5, 3.0], vec![0.0, 4.0]));
        }
    }

    #[test]
    fn a_reduce_scatter_that_does_not_divide_is_refused() {
        let errors = with_ranks(2, |comm| {
            let e = comm
                .reduce_scatter_mean(&Tensor::zeros([3], (Kind::Float, Device::Cpu)))
                .unwrap_err()
                .to_string();
            comm.finish().unwrap();
            e
        });
        assert!(errors[0].contains("over 2 ranks"), "{}", errors[0]);
    }

    #[test]
    fn padding_rounds_up_to_the_parts() {
        let t = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
        assert_eq!(flat_padded(&t, 3).size(), [6]);
        let padded = flat_padded(&t, 4);
        assert_eq!(padded.size(), [8]);
        assert_eq!(padded.sum(Kind::Float).double_value(&[]), 6.0);
    }
}
