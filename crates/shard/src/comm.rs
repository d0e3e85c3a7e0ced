//! The all-reduce between CPU shard processes of one model (tensor parallelism without GPUs): a star
//! over Unix sockets (one host) or TCP (`--master-addr`/`--master-port`, shards on several hosts).
//! Rank 0 listens; every other rank connects and says its rank. To sum a buffer, ranks 1.. send theirs to rank 0, which adds them in rank order and sends the
//! sum back, so every rank gets the same bits. CUDA shards sum on the device over NCCL instead
//! (`--comm`); this group then only carries rank 0's NCCL unique id to the others ([`SocketComm::broadcast`]).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lorax_engine::comm::Communicator;
use lorax_engine::{EngineError, Result};

/// A connection between two ranks.
pub trait Link: Read + Write + Send {}
impl<T: Read + Write + Send> Link for T {}

/// Where the ranks meet: rank 0 listens there, the others connect.
#[derive(Debug, Clone)]
pub enum Rendezvous {
    /// A Unix socket path (all ranks on one host).
    Unix(PathBuf),
    /// `host:port` over TCP (ranks on several hosts; rank 0 binds it, the others connect to it).
    Tcp(String),
}

/// The connections (rank 0: one per peer; the others: one to rank 0) and a reusable byte buffer.
type Links = (Vec<Box<dyn Link>>, Vec<u8>);

/// A rank's connections: rank 0 holds one per peer (index = rank - 1), the others one to rank 0.
pub struct SocketComm {
    rank: usize,
    world: usize,
    /// The connections and one byte buffer reused by every all-reduce (two per layer per step).
    links: Mutex<Links>,
}

/// Sets both timeouts of a socket and boxes it.
fn link_unix(s: UnixStream) -> std::io::Result<Box<dyn Link>> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(Box::new(s))
}

fn link_tcp(s: TcpStream) -> std::io::Result<Box<dyn Link>> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(Box::new(s))
}

/// How long one all-reduce may wait for a peer before failing the forward pass.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// The rendezvous socket of a one-host deployment.
pub fn socket_path(uds_prefix: &str) -> PathBuf {
    PathBuf::from(format!("{uds_prefix}-comm"))
}

fn io_err(what: &str, e: std::io::Error) -> EngineError {
    EngineError::Backend(format!("tensor-parallel all-reduce: {what}: {e}"))
}

impl SocketComm {
    /// Joins the group: rank 0 accepts `world - 1` peers, the others connect (retrying until
    /// `timeout`, since rank 0 may still be starting). Blocking.
    pub fn join(at: &Rendezvous, rank: usize, world: usize, timeout: Duration) -> anyhow::Result<Self> {
        anyhow::ensure!(world >= 2 && rank < world, "rank {rank} of world {world}");
        let streams = if rank == 0 {
            let mut accept: Box<dyn FnMut() -> std::io::Result<Box<dyn Link>>> = match at {
                Rendezvous::Unix(path) => {
                    if path.exists() {
                        std::fs::remove_file(path)?;
                    }
                    let listener = UnixListener::bind(path)?;
                    Box::new(move || link_unix(listener.accept()?.0))
                }
                Rendezvous::Tcp(addr) => {
                    let listener = TcpListener::bind(addr.as_str())?;
                    Box::new(move || link_tcp(listener.accept()?.0))
                }
            };
            let mut peers: Vec<Option<Box<dyn Link>>> = (1..world).map(|_| None).collect();
            for _ in 1..world {
                let mut stream = accept()?;
                let mut buf = [0u8; 4];
                stream.read_exact(&mut buf)?;
                let peer = u32::from_le_bytes(buf) as usize;
                anyhow::ensure!(
                    (1..world).contains(&peer) && peers[peer - 1].is_none(),
                    "unexpected peer rank {peer} joined"
                );
                peers[peer - 1] = Some(stream);
            }
            if let Rendezvous::Unix(path) = at {
                let _ = std::fs::remove_file(path);
            }
            peers.into_iter().flatten().collect()
        } else {
            let deadline = Instant::now() + timeout;
            let mut stream = loop {
                let attempt = match at {
                    Rendezvous::Unix(path) => UnixStream::connect(path).and_then(link_unix),
                    Rendezvous::Tcp(addr) => TcpStream::connect(addr.as_str()).and_then(link_tcp),
                };
                match attempt {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        tracing::debug!("waiting for rank 0 at {at:?}: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => anyhow::bail!("rank 0 never listened at {at:?}: {e}"),
                }
            };
            stream.write_all(&u32::try_from(rank)?.to_le_bytes())?;
            vec![stream]
        };
        tracing::info!(rank, world, ?at, "tensor-parallel group joined");
        Ok(Self {
            rank,
            world,
            links: Mutex::new((streams, Vec::new())),
        })
    }
}

/// Largest message [`SocketComm::broadcast`] accepts.
const MAX_BROADCAST: u64 = 1 << 20;

impl SocketComm {
    fn links(&self) -> Result<std::sync::MutexGuard<'_, Links>> {
        self.links
            .lock()
            .map_err(|_| EngineError::Backend("tensor-parallel connections poisoned".into()))
    }

    /// Rank 0's `bytes` to every rank (at startup: the NCCL unique id). On rank 0 `bytes` is sent; on
    /// the others it is replaced by what rank 0 sent. Every rank must call it at the same point.
    pub fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()> {
        let mut guard = self.links()?;
        let (streams, _) = &mut *guard;
        if self.rank == 0 {
            let mut message = (bytes.len() as u64).to_le_bytes().to_vec();
            message.extend_from_slice(bytes);
            for s in streams.iter_mut() {
                send(s.as_mut(), &message)?;
            }
        } else {
            let s = streams[0].as_mut();
            let mut len = [0u8; 8];
            s.read_exact(&mut len).map_err(|e| io_err("receive", e))?;
            let len = u64::from_le_bytes(len);
            if len > MAX_BROADCAST {
                return Err(EngineError::Backend(format!(
                    "tensor-parallel broadcast of {len} bytes from rank 0 (the ranks ran different calls)"
                )));
            }
            bytes.resize(usize::try_from(len).unwrap_or(0), 0);
            s.read_exact(bytes).map_err(|e| io_err("receive", e))?;
        }
        Ok(())
    }
}

/// `data` as a message (length, then little-endian values) in `buf`.
fn encode(data: &[f32], buf: &mut Vec<u8>) {
    buf.clear();
    buf.extend_from_slice(&(data.len() as u64).to_le_bytes());
    for v in data {
        buf.extend_from_slice(&v.to_le_bytes());
    }
}

fn send(stream: &mut dyn Link, message: &[u8]) -> Result<()> {
    stream.write_all(message).map_err(|e| io_err("send", e))
}

/// Reads one message into `out` (added to it with `add`), using `buf` as the byte buffer.
fn receive(stream: &mut dyn Link, out: &mut [f32], add: bool, buf: &mut Vec<u8>) -> Result<()> {
    let mut len = [0u8; 8];
    stream.read_exact(&mut len).map_err(|e| io_err("receive", e))?;
    if u64::from_le_bytes(len) != out.len() as u64 {
        return Err(EngineError::Backend(format!(
            "tensor-parallel all-reduce: a peer sent {} values, expected {} (the ranks ran different calls)",
            u64::from_le_bytes(len),
            out.len()
        )));
    }
    buf.resize(out.len() * 4, 0);
    stream.read_exact(buf).map_err(|e| io_err("receive", e))?;
    for (o, c) in out.iter_mut().zip(buf.chunks_exact(4)) {
        let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        if add {
            *o += v;
        } else {
            *o = v;
        }
    }
    Ok(())
}

impl Communicator for SocketComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<()> {
        let mut guard = self.links()?;
        let (streams, buf) = &mut *guard;
        if self.rank == 0 {
            for s in streams.iter_mut() {
                receive(s.as_mut(), data, true, buf)?;
            }
            // The sum is encoded once for every peer.
            encode(data, buf);
            for s in streams.iter_mut() {
                send(s.as_mut(), buf)?;
            }
        } else {
            let s = streams[0].as_mut();
            encode(data, buf);
            send(s, buf)?;
            receive(s, data, false, buf)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sum_over(at: Rendezvous) {
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let at = at.clone();
                std::thread::spawn(move || {
                    let comm = SocketComm::join(&at, rank, 3, Duration::from_secs(30)).unwrap();
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

    #[test]
    fn rank_zero_broadcasts_bytes_then_sums_still_work() {
        let dir = tempfile::tempdir().unwrap();
        let at = Rendezvous::Unix(dir.path().join("b-comm"));
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let at = at.clone();
                std::thread::spawn(move || {
                    let comm = SocketComm::join(&at, rank, 3, Duration::from_secs(30)).unwrap();
                    let mut id = if rank == 0 { (0..=255u8).collect() } else { vec![7u8; 3] };
                    comm.broadcast(&mut id).unwrap();
                    let mut v = vec![1.0f32];
                    comm.all_reduce_sum(&mut v).unwrap();
                    (id, v)
                })
            })
            .collect();
        for h in handles {
            let (id, v) = h.join().unwrap();
            assert_eq!(id, (0..=255u8).collect::<Vec<_>>());
            assert_eq!(v, vec![3.0]);
        }
    }

    #[test]
    fn three_ranks_sum_over_unix_sockets() {
        let dir = tempfile::tempdir().unwrap();
        sum_over(Rendezvous::Unix(dir.path().join("t-comm")));
    }

    #[test]
    fn three_ranks_sum_over_tcp() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        sum_over(Rendezvous::Tcp(format!("127.0.0.1:{port}")));
    }
}
