//! The soak's origins and the bytes they exchange.
//!
//! Every stream's bytes are a deterministic function of (stream id, direction, offset), so a
//! receiver can check any prefix it got and both ends can hash what they sent and received.
//! The origins run in vgbench's own process: a client registers its stream's [`Spec`] in the
//! [`Registry`] before it connects and sends only the 12-byte hello (`VGSK` + id) through the
//! tunnel; the origin looks the spec up and writes what it sent and received back into the
//! same [`Stream`], where the client compares them. Nothing about the check travels through
//! the proxy except the bytes under test.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, sleep, timeout};

use crate::common::{accept_forever, err};

/// The first bytes a soak client sends to the stream origin: magic and the stream id.
pub const HELLO_LEN: usize = 12;
const MAGIC: &[u8; 4] = b"VGSK";
/// Chunk in which bulk bytes are generated, hashed and written.
pub const CHUNK: usize = 64 * 1024;
/// A slow peer moves this many bytes per [`SLOW_TICK`].
pub const SLOW_BYTES: usize = 1024;
pub const SLOW_TICK: Duration = Duration::from_millis(100);

/// Which way bytes go: up = client to origin, down = origin to client.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Way {
    Up,
    Down,
}

/// The bytes of one direction of one stream, at any offset.
pub struct Gen {
    key: u64,
    off: u64,
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Gen {
    pub fn new(id: u64, way: Way) -> Gen {
        Gen { key: splitmix(id.wrapping_mul(2).wrapping_add(u64::from(way == Way::Down))), off: 0 }
    }

    fn word(&self, w: u64) -> [u8; 8] {
        splitmix(self.key ^ w.wrapping_mul(0xD6E8_FEB8_6659_FD93)).to_le_bytes()
    }

    /// Fills `out` with the next bytes of the stream.
    pub fn fill(&mut self, out: &mut [u8]) {
        let mut i = 0;
        while i < out.len() && self.off % 8 != 0 {
            out[i] = self.word(self.off / 8)[(self.off % 8) as usize];
            self.off += 1;
            i += 1;
        }
        let mut words = out[i..].chunks_exact_mut(8);
        for c in &mut words {
            c.copy_from_slice(&self.word(self.off / 8));
            self.off += 8;
        }
        for b in words.into_remainder() {
            *b = self.word(self.off / 8)[(self.off % 8) as usize];
            self.off += 1;
        }
    }
}

/// A running SHA-256 with the byte count.
#[derive(Default, Clone)]
pub struct Tally {
    pub bytes: u64,
    hash: Sha256,
}

impl Tally {
    pub fn add(&mut self, b: &[u8]) {
        self.bytes += b.len() as u64;
        self.hash.update(b);
    }
    pub fn done(self) -> Seal {
        Seal { bytes: self.bytes, sha256: self.hash.finalize().into() }
    }
}

/// What one end sent or received in one direction: count and SHA-256.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Seal {
    pub bytes: u64,
    pub sha256: [u8; 32],
}

/// What the origin does with a stream.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Behaviour {
    /// Read `up` bytes to EOF and write `down` bytes, both at once; FIN after the last byte.
    Normal,
    /// As Normal, but read at [`SLOW_BYTES`] per [`SLOW_TICK`] until `slow_until`.
    SlowRead,
    /// As Normal, but write at [`SLOW_BYTES`] per [`SLOW_TICK`] until `slow_until`.
    SlowWrite,
    /// Write `down` bytes, then reset (SO_LINGER 0), never reading.
    Reset,
}

/// A stream as the client declares it before connecting.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    pub behaviour: Behaviour,
    pub up: u64,
    pub down: u64,
    pub slow_until: Option<Instant>,
}

/// One stream, shared by its client, its origin and the sampler.
pub struct Stream {
    pub id: u64,
    pub spec: Spec,
    /// Bytes the client has written / read, and the origin has written / read (for the
    /// in-flight measure: what left one end and has not reached the other).
    pub client_written: AtomicU64,
    pub client_read: AtomicU64,
    pub origin_written: AtomicU64,
    pub origin_read: AtomicU64,
    /// The proxy's upstream socket as the origin saw it (its peer address).
    pub origin_peer: Mutex<Option<SocketAddr>>,
    /// The client's socket (local address), for matching /proc/net/tcp lines.
    pub client_local: Mutex<Option<SocketAddr>>,
    /// What the origin received (up) and sent (down), set when it finished.
    pub origin_up: Mutex<Option<Seal>>,
    pub origin_down: Mutex<Option<Seal>>,
    /// The origin's connection ended (EOF, error or its own reset), and why if not cleanly.
    pub origin_ended: AtomicBool,
    pub origin_error: Mutex<Option<String>>,
    /// The sampler measures this stream's in-flight bytes (slow peers).
    pub watched: bool,
}

/// Streams by id; the origin finds its spec here.
#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Arc<Stream>>>,
}

impl Registry {
    pub fn register(&self, spec: Spec, watched: bool) -> Arc<Stream> {
        let id = self.next.fetch_add(1, Relaxed) + 1;
        let s = Arc::new(Stream {
            id,
            spec,
            client_written: AtomicU64::new(0),
            client_read: AtomicU64::new(0),
            origin_written: AtomicU64::new(0),
            origin_read: AtomicU64::new(0),
            origin_peer: Mutex::new(None),
            client_local: Mutex::new(None),
            origin_up: Mutex::new(None),
            origin_down: Mutex::new(None),
            origin_ended: AtomicBool::new(false),
            origin_error: Mutex::new(None),
            watched,
        });
        self.live.lock().expect("registry").insert(id, s.clone());
        s
    }

    pub fn remove(&self, id: u64) {
        self.live.lock().expect("registry").remove(&id);
    }

    fn get(&self, id: u64) -> Option<Arc<Stream>> {
        self.live.lock().expect("registry").get(&id).cloned()
    }

    /// The open streams the sampler watches.
    pub fn watched(&self) -> Vec<Arc<Stream>> {
        self.live.lock().expect("registry").values().filter(|s| s.watched).cloned().collect()
    }
}

/// The hello that names stream `id`.
pub fn hello(id: u64) -> [u8; HELLO_LEN] {
    let mut h = [0u8; HELLO_LEN];
    h[..4].copy_from_slice(MAGIC);
    h[4..].copy_from_slice(&id.to_be_bytes());
    h
}

/// Close with a reset instead of a FIN (SO_LINGER 0), as a crashing peer does.
pub fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

/// Waits (at most `limit`) until `f` says yes; checks every 10 ms.
pub async fn wait_until(limit: Duration, f: impl Fn() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------- origins

/// The stream origin: serves every registered stream by its spec.
pub async fn stream_origin(l: TcpListener, reg: Arc<Registry>) {
    accept_forever(l, move |s| {
        let reg = reg.clone();
        async move {
            let peer = s.peer_addr().ok();
            let mut s = s;
            let mut h = [0u8; HELLO_LEN];
            // The hello is ours, through a tunnel that is already established: 10 s is generous.
            if !matches!(timeout(Duration::from_secs(10), s.read_exact(&mut h)).await, Ok(Ok(_))) || &h[..4] != MAGIC {
                return;
            }
            let id = u64::from_be_bytes(h[4..].try_into().expect("8 bytes"));
            let Some(st) = reg.get(id) else { return };
            *st.origin_peer.lock().expect("peer") = peer;
            let r = serve_stream(s, &st).await;
            if let Err(e) = r {
                *st.origin_error.lock().expect("error") = Some(e.to_string());
            }
            st.origin_ended.store(true, Relaxed);
        }
    })
    .await;
}

async fn serve_stream(s: TcpStream, st: &Arc<Stream>) -> io::Result<()> {
    let spec = st.spec;
    if spec.behaviour == Behaviour::Reset {
        let mut s = s;
        let mut g = Gen::new(st.id, Way::Down);
        let mut buf = vec![0u8; CHUNK];
        let mut left = spec.down;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            g.fill(&mut buf[..n]);
            s.write_all(&buf[..n]).await?;
            st.origin_written.fetch_add(n as u64, Relaxed);
            left -= n as u64;
            tokio::task::yield_now().await;
        }
        reset(s);
        return Ok(());
    }
    let (mut r, mut w) = s.into_split();
    let slow_read = if spec.behaviour == Behaviour::SlowRead { spec.slow_until } else { None };
    let slow_write = if spec.behaviour == Behaviour::SlowWrite { spec.slow_until } else { None };
    let reader = async {
        let mut t = Tally::default();
        let mut buf = vec![0u8; CHUNK];
        loop {
            let slow = slow_read.is_some_and(|u| Instant::now() < u);
            let room = if slow { SLOW_BYTES } else { CHUNK };
            let n = r.read(&mut buf[..room]).await?;
            if n == 0 {
                break;
            }
            t.add(&buf[..n]);
            st.origin_read.fetch_add(n as u64, Relaxed);
            if slow {
                sleep(SLOW_TICK).await;
            } else {
                tokio::task::yield_now().await;
            }
        }
        *st.origin_up.lock().expect("up") = Some(t.done());
        io::Result::Ok(())
    };
    let writer = async {
        let mut t = Tally::default();
        let mut g = Gen::new(st.id, Way::Down);
        let mut buf = vec![0u8; CHUNK];
        let mut left = spec.down;
        while left > 0 {
            let slow = slow_write.is_some_and(|u| Instant::now() < u);
            let n = left.min(if slow { SLOW_BYTES } else { CHUNK } as u64) as usize;
            g.fill(&mut buf[..n]);
            t.add(&buf[..n]);
            w.write_all(&buf[..n]).await?;
            st.origin_written.fetch_add(n as u64, Relaxed);
            left -= n as u64;
            if slow {
                sleep(SLOW_TICK).await;
            } else {
                tokio::task::yield_now().await;
            }
        }
        *st.origin_down.lock().expect("down") = Some(t.done());
        w.shutdown().await
    };
    let (a, b) = tokio::join!(reader, writer);
    a.and(b)
}

/// Echo: writes back whatever arrives (churn and burst tunnels end here).
pub async fn echo_origin(l: TcpListener) {
    accept_forever(l, |mut s| async move {
        let mut buf = [0u8; 4096];
        loop {
            let n = match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if s.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    })
    .await;
}

/// Silent: accepts and never writes; closes when the other side does.
pub async fn silent_origin(l: TcpListener) {
    accept_forever(l, |mut s| async move {
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                return;
            }
        }
    })
    .await;
}

/// Compares what one end sent with what the other received.
pub fn compare(what: &str, sent: Option<Seal>, got: Option<Seal>) -> io::Result<u64> {
    match (sent, got) {
        (Some(s), Some(g)) if s == g => Ok(s.bytes),
        (Some(s), Some(g)) if s.bytes != g.bytes => {
            Err(err(format!("{what}: {} bytes sent, {} received", s.bytes, g.bytes)))
        }
        (Some(s), Some(_)) => Err(err(format!("{what}: {} bytes arrived corrupted (SHA-256 differs)", s.bytes))),
        (None, _) => Err(err(format!("{what}: the sender did not finish"))),
        (_, None) => Err(err(format!("{what}: the receiver did not finish"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gen_is_the_same_whatever_the_chunking() {
        let mut whole = vec![0u8; 1000];
        Gen::new(7, Way::Up).fill(&mut whole);
        let mut parts = vec![0u8; 1000];
        let mut g = Gen::new(7, Way::Up);
        let mut at = 0;
        for n in [3, 1, 8, 13, 64, 911] {
            g.fill(&mut parts[at..at + n]);
            at += n;
        }
        assert_eq!(whole, parts);
        let mut other = vec![0u8; 1000];
        Gen::new(7, Way::Down).fill(&mut other);
        assert_ne!(whole, other);
    }
}
