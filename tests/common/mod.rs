//! Test fixtures: veilgate in-process on an ephemeral loopback port, fake origins on other
//! ephemeral ports, and clients that speak CONNECT. Every wait is bounded.
#![allow(dead_code)]

pub mod child;
pub mod tls;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use veilgate::{Config, Controller, Proxy};

/// Upper bound for any single step of a test.
pub const STEP: Duration = Duration::from_secs(10);

/// Awaits `f` for at most [`STEP`].
pub async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, f).await.expect("test step timed out")
}

/// A running veilgate.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub controller: Controller,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestProxy {
    /// Starts veilgate with `toml` (listeners replaced by 127.0.0.1:0).
    pub async fn start(toml: &str) -> TestProxy {
        let mut config = Config::from_toml(toml, "test config").expect("test config is valid");
        config.server.listen = vec!["127.0.0.1:0".parse().unwrap()];
        config.server.admin_listen = Some("127.0.0.1:0".parse().unwrap());
        TestProxy::start_config(config).await
    }

    /// Starts veilgate with a ready config.
    pub async fn start_config(config: Config) -> TestProxy {
        let proxy = Proxy::bind(config).await.expect("proxy binds");
        let addr = proxy.proxy_addrs()[0];
        let admin = proxy.admin_addr();
        let controller = proxy.controller();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(proxy.run(async {
            let _ = rx.await;
        }));
        TestProxy { addr, admin, controller, stop: Some(tx), task: Some(task) }
    }

    /// Begins the drain; returns the task that ends when the proxy has stopped.
    pub fn begin_shutdown(&mut self) -> JoinHandle<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.take().expect("proxy still running")
    }

    /// GET on the admin listener: (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let admin = self.admin.expect("admin listener");
        let mut s = bounded(TcpStream::connect(admin)).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        bounded(s.read_to_string(&mut out)).await.unwrap();
        let status = out[9..12].parse().unwrap();
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (status, body)
    }

    /// The value of one series in /metrics, e.g. `veilgate_refusals_total{reason="bad_request"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        let (_, body) = self.admin_get("/metrics").await;
        metric_value(&body, series).unwrap_or_else(|| panic!("series {series} not in scrape:\n{body}"))
    }
}

/// Finds `series` (name plus labels exactly as rendered) in a Prometheus exposition.
pub fn metric_value(body: &str, series: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Config text that lets the proxy reach loopback origins on `ports`.
pub fn loopback_policy(ports: &[u16]) -> String {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!("[policy]\ndeny_private = false\nallowed_ports = [{}]\n", ports.join(", "))
}

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

/// What an origin handler left in `slot`, once it has (within the test step bound).
pub async fn filled<T>(slot: &Mutex<Option<T>>) -> T {
    bounded(async {
        loop {
            if let Some(v) = slot.lock().unwrap().take() {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// A reply head read byte by byte, so nothing after it is consumed.
pub struct ReplyHead {
    pub status: u16,
    pub text: String,
}

impl ReplyHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
        })
    }
}

/// Reads a response head (up to and including the blank line).
pub async fn read_reply_head(s: &mut TcpStream) -> ReplyHead {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    bounded(async {
        while !head.ends_with(b"\r\n\r\n") {
            match s.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&head).to_string();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    ReplyHead { status, text }
}

/// Connects to the proxy from `from` (a loopback address such as 127.0.0.5) or the default.
pub async fn dial_proxy(proxy: SocketAddr, from: Option<IpAddr>) -> TcpStream {
    match from {
        None => bounded(TcpStream::connect(proxy)).await.expect("proxy accepts"),
        Some(ip) => {
            let sock = TcpSocket::new_v4().unwrap();
            sock.bind(SocketAddr::new(ip, 0)).expect("bind client address");
            bounded(sock.connect(proxy)).await.expect("proxy accepts")
        }
    }
}

/// Sends `CONNECT target` and reads the reply head.
pub async fn connect_via(proxy: SocketAddr, target: &str) -> (ReplyHead, TcpStream) {
    connect_from(proxy, None, target).await
}

/// Sends `CONNECT target` from a chosen client address.
pub async fn connect_from(proxy: SocketAddr, from: Option<IpAddr>, target: &str) -> (ReplyHead, TcpStream) {
    let mut s = dial_proxy(proxy, from).await;
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).await.unwrap();
    let head = read_reply_head(&mut s).await;
    (head, s)
}

/// Sends raw bytes and returns everything the proxy answers until it closes.
pub async fn raw_exchange(proxy: SocketAddr, bytes: &[u8]) -> String {
    let mut s = dial_proxy(proxy, None).await;
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = bounded(s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

/// Deterministic pseudo-random bytes (xorshift), so corruption anywhere shows in a hash.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Sets this process's soft descriptor limit to `limit` (at most the hard limit) and returns
/// what it is now. Each test file is its own process, so this touches no other file's tests.
pub fn set_nofile(limit: u64) -> u64 {
    let mut cur = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur), 0);
        let lim = libc::rlimit { rlim_cur: limit.min(cur.rlim_max), rlim_max: cur.rlim_max };
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        lim.rlim_cur
    }
}

/// Opens a tunnel to an echo `origin` and checks it relays: the proxy still serves.
pub async fn still_serves(proxy: &TestProxy, origin: &Origin) {
    let (head, mut s) = connect_via(proxy.addr, &origin.addr.to_string()).await;
    assert_eq!(head.status, 200, "the next client is served: {}", head.text);
    s.write_all(b"alive").await.unwrap();
    let mut b = [0u8; 5];
    bounded(s.read_exact(&mut b)).await.unwrap();
    assert_eq!(&b, b"alive");
}
