//! Fake plaintext origins on ephemeral loopback ports (TLS ones are in [`super::tls`]).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::eventually;

/// A fake origin: accepts on 127.0.0.1:0 and runs `handler` per connection.
pub struct Origin {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
    task: JoinHandle<()>,
}

impl Origin {
    /// An origin on `bind` (use "127.0.0.1:0" or "[::1]:0").
    pub async fn spawn_on<F, Fut>(bind: &str, handler: F) -> Origin
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind(bind).await.expect("origin binds");
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let (a, p) = (Arc::clone(&accepted), Arc::clone(&peers));
        let task = tokio::spawn(async move {
            while let Ok((s, peer)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                p.lock().unwrap().push(peer);
                tokio::spawn(handler(s));
            }
        });
        Origin { addr, accepted, peers, task }
    }

    /// An origin on 127.0.0.1.
    pub async fn spawn<F, Fut>(handler: F) -> Origin
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Origin::spawn_on("127.0.0.1:0", handler).await
    }

    /// An echo origin.
    pub async fn echo() -> Origin {
        Origin::spawn(|mut s| async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        })
        .await
    }

    /// An origin that reads each connection to its end and leaves what it got in the slot
    /// (see [`filled`]).
    pub async fn recording() -> (Origin, Arc<Mutex<Option<Vec<u8>>>>) {
        let slot = Arc::new(Mutex::new(None));
        let s2 = Arc::clone(&slot);
        let origin = Origin::spawn(move |mut s| {
            let slot = Arc::clone(&s2);
            async move {
                let mut all = Vec::new();
                let _ = s.read_to_end(&mut all).await;
                *slot.lock().unwrap() = Some(all);
            }
        })
        .await;
        (origin, slot)
    }

    /// An origin that reads an 8-byte big-endian length and sends that many 0x5a bytes, then
    /// closes: downloads of a known size, for bandwidth tests.
    pub async fn source() -> Origin {
        Origin::spawn(|mut s| async move {
            let mut len = [0u8; 8];
            if s.read_exact(&mut len).await.is_err() {
                return;
            }
            let mut left = u64::from_be_bytes(len) as usize;
            let chunk = vec![0x5au8; 64 * 1024];
            while left > 0 {
                let n = left.min(chunk.len());
                if s.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
                left -= n;
            }
            let _ = s.shutdown().await;
        })
        .await
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What an origin handler left in `slot`, once it has (within the wait bound).
pub async fn filled<T: std::fmt::Debug>(slot: &Mutex<Option<T>>) -> T {
    let taken = eventually("the origin to fill its slot", async || slot.lock().unwrap().take(), Option::is_some).await;
    taken.expect("eventually returns the value that was seen")
}
