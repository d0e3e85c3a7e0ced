//! The all-reduce between CPU shard processes of one model (tensor parallelism without GPUs): a star
//! over Unix sockets. Rank 0 listens on `<uds-prefix>-comm`; every other rank connects and says its
//! rank. To sum a buffer, ranks 1.. send theirs to rank 0, which adds them in rank order and sends the
//! sum back, so every rank gets the same bits. GPU shards would use NCCL through the same
//! [`Communicator`] seam.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lorax_engine::comm::Communicator;
use lorax_engine::{EngineError, Result};

/// A rank's connections: rank 0 holds one per peer (index = rank - 1), the others one to rank 0.
pub struct UdsComm {
    rank: usize,
    world: usize,
    streams: Mutex<Vec<UnixStream>>,
}

/// How long one all-reduce may wait for a peer before failing the forward pass.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// The rendezvous socket of a deployment.
pub fn socket_path(uds_prefix: &str) -> PathBuf {
    PathBuf::from(format!("{uds_prefix}-comm"))
}

fn io_err(what: &str, e: std::io::Error) -> EngineError {
    EngineError::Backend(format!("tensor-parallel all-reduce: {what}: {e}"))
}

impl UdsComm {
    /// Joins the group: rank 0 accepts `world - 1` peers, the others connect (retrying until
    /// `timeout`, since rank 0 may still be starting). Blocking.
    pub fn join(path: &Path, rank: usize, world: usize, timeout: Duration) -> anyhow::Result<Self> {
        anyhow::ensure!(world >= 2 && rank < world, "rank {rank} of world {world}");
        let streams = if rank == 0 {
            if path.exists() {
                std::fs::remove_file(path)?;
            }
            let listener = UnixListener::bind(path)?;
            let mut peers: Vec<Option<UnixStream>> = (1..world).map(|_| None).collect();
            for _ in 1..world {
                let (mut stream, _) = listener.accept()?;
                let mut buf = [0u8; 4];
                stream.read_exact(&mut buf)?;
                let peer = u32::from_le_bytes(buf) as usize;
                anyhow::ensure!(
                    (1..world).contains(&peer) && peers[peer - 1].is_none(),
                    "unexpected peer rank {peer} joined"
                );
                peers[peer - 1] = Some(stream);
            }
            let _ = std::fs::remove_file(path);
            peers.into_iter().flatten().collect()
        } else {
            let deadline = Instant::now() + timeout;
            let mut stream = loop {
                match UnixStream::connect(path) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        tracing::debug!("waiting for rank 0's rendezvous socket: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => anyhow::bail!("rank 0 never opened {}: {e}", path.display()),
                }
            };
            stream.write_all(&u32::try_from(rank)?.to_le_bytes())?;
            vec![stream]
        };
        for s in &streams {
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
        }
        tracing::info!(rank, world, "tensor-parallel group joined");
        Ok(Self {
            rank,
            world,
            streams: Mutex::new(streams),
        })
    }
}

fn send(stream: &mut UnixStream, data: &[f32]) -> Result<()> {
    let mut bytes = Vec::with_capacity(8 + data.len() * 4);
    bytes.extend_from_slice(&(data.len() as u64).to_le_bytes());
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    stream.write_all(&bytes).map_err(|e| io_err("send", e))
}

fn receive(stream: &mut UnixStream, out: &mut [f32], add: bool) -> Result<()> {
    let mut len = [0u8; 8];
    stream.read_exact(&mut len).map_err(|e| io_err("receive", e))?;
    if u64::from_le_bytes(len) != out.len() as u64 {
        return Err(EngineError::Backend(format!(
            "tensor-parallel all-reduce: a peer sent {} values, expected {} (the ranks ran different calls)",
            u64::from_le_bytes(len),
            out.len()
        )));
    }
    let mut bytes = vec![0u8; out.len() * 4];
    stream.read_exact(&mut bytes).map_err(|e| io_err("receive", e))?;
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        if add {
            *o += v;
        } else {
            *o = v;
        }
    }
    Ok(())
}

impl Communicator for UdsComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
        let mut streams = self
            .streams
            .lock()
            .map_err(|_| EngineError::Backend("tensor-parallel connections poisoned".into()))?;
        if self.rank == 0 {
            for s in streams.iter_mut() {
                receive(s, data, true)?;
            }
            for s in streams.iter_mut() {
                send(s, data)?;
            }
        } else {
            let s = &mut streams[0];
            send(s, data)?;
            receive(s, data, false)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn three_ranks_sum_over_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t-comm");
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let comm = UdsComm::join(&path, rank, 3, Duration::from_secs(30)).unwrap();
                    let mut results = Vec::new();
                    for round in 0..20 {
                        let mut v = vec![rank as f32, round as f32, 0.5];
                        comm.all_reduce_sum(&mut v).unwrap();
                        results.push(v);
                    }
                    results
                })
            })
            .collect();
        for h in handles {
            for (round, v) in h.join().unwrap().into_iter().enumerate() {
                assert_eq!(v, vec![3.0, 3.0 * round as f32, 1.5]);
            }
        }
    }
}
