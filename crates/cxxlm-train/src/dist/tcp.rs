//! Collectives over TCP for CPU tensors: a star through rank 0, which receives every
//! rank's tensor, combines them in rank order and sends the result back. Simple and
//! exact; meant for tests and CPU-only hosts, not for speed.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use tch::Tensor;

pub(super) struct Tcp {
    rank: usize,
    size: usize,
    /// Rank 0: one per other rank, in rank order; other ranks: one to rank 0.
    links: Mutex<Vec<TcpStream>>,
}

fn bytes_of(t: &Tensor) -> Vec<u8> {
    let t = t.contiguous();
    let numel = t.numel();
    let mut out = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut out, numel);
    out
}

fn send(mut s: &TcpStream, bytes: &[u8]) -> io::Result<()> {
    s.write_all(&(bytes.len() as u64).to_le_bytes())?;
    s.write_all(bytes)
}

/// A message of exactly `expected` bytes: every collective knows its size, so a peer
/// announcing another is refused before anything is allocated for it.
fn recv(mut s: &TcpStream, expected: usize) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len != expected as u64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a rank announced {len} bytes where {expected} were expected (tensors of different shapes?)"),
        ));
    }
    let mut out = vec![0u8; expected];
    s.read_exact(&mut out)?;
    Ok(out)
}

fn tensor_like(t: &Tensor, bytes: &[u8], shape: &[i64]) -> io::Result<Tensor> {
    let want = shape.iter().product::<i64>() as usize * t.kind().elt_size_in_bytes();
    if bytes.len() != want {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "a rank sent {} bytes where {want} were expected (tensors of different shapes?)",
                bytes.len()
            ),
        ));
    }
    Ok(Tensor::from_data_size(bytes, shape, t.kind()))
}

impl Tcp {
    pub(super) fn new(rank: usize, size: usize, links: Vec<TcpStream>) -> Tcp {
        Tcp {
            rank,
            size,
            links: Mutex::new(links),
        }
    }

    /// Rank 0 gathers every rank's bytes (its own first) and sends back what `combine`
    /// makes of them, `result_len` bytes; the other ranks send theirs and receive that.
    fn through_root(
        &self,
        mine: Vec<u8>,
        result_len: usize,
        combine: impl FnOnce(Vec<Vec<u8>>) -> io::Result<Vec<u8>>,
    ) -> io::Result<Vec<u8>> {
        let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if self.rank == 0 {
            let len = mine.len();
            let mut parts = vec![mine];
            for s in links.iter() {
                parts.push(recv(s, len)?);
            }
            let result = combine(parts)?;
            for s in links.iter() {
                send(s, &result)?;
            }
            Ok(result)
        } else {
            send(&links[0], &mine)?;
            recv(&links[0], result_len)
        }
    }

    pub(super) fn all_reduce_sum(&self, t: &Tensor) -> io::Result<()> {
        let shape = t.size();
        let mine = bytes_of(t);
        let len = mine.len();
        let sum = self.through_root(mine, len, |parts| {
            let mut acc = tensor_like(t, &parts[0], &shape)?;
            for p in &parts[1..] {
                acc += tensor_like(t, p, &shape)?;
            }
            Ok(bytes_of(&acc))
        })?;
        t.shallow_clone().copy_(&tensor_like(t, &sum, &shape)?);
        Ok(())
    }

    pub(super) fn all_gather(&self, t: &Tensor) -> io::Result<Tensor> {
        let mine = bytes_of(t);
        let len = mine.len() * self.size;
        let all = self.through_root(mine, len, |parts| Ok(parts.concat()))?;
        let mut shape = t.size();
        shape[0] *= self.size as i64;
        tensor_like(t, &all, &shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_of_another_size_is_refused_before_allocating_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sender = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (receiver, _) = listener.accept().unwrap();
        (&sender).write_all(&(1u64 << 62).to_le_bytes()).unwrap();
        let e = recv(&receiver, 16).unwrap_err().to_string();
        assert!(
            e.contains("announced 4611686018427387904 bytes where 16"),
            "{e}"
        );
        send(&sender, &[7; 16]).unwrap();
        assert_eq!(recv(&receiver, 16).unwrap(), [7; 16]);
    }
}
