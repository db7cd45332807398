//! Test fixtures: veilgate in-process with every listener on an ephemeral loopback port
//! ([`test_config`], [`TestProxy`]), fake origins on other ephemeral ports (`origin`, `tls`),
//! clients that speak CONNECT over any front (`client`), and bounded waits (`wait`).
//! Each test file is its own crate with `mod common;` and uses a part of this, hence the
//! `allow(dead_code)` for the whole tree.
#![allow(dead_code)]

pub mod child;
pub mod client;
pub mod haproxy;
pub mod origin;
pub mod redis;
pub mod socks;
pub mod tls;
pub mod wait;

pub use client::*;
pub use origin::*;
pub use wait::*;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use veilgate::config::ServerConfig;
use veilgate::{Config, Controller, Proxy};

/// Parses and validates `toml` as [`TestProxy::start`] sees it: every listener of `[server]`
/// on port 0 of its own address (see [`ephemeral_listeners`]), so no test binds a fixed port
/// and two tests never collide.
pub fn test_config(toml: &str) -> Config {
    let mut doc: toml::Table = toml.parse().unwrap_or_else(|e| panic!("test config is TOML: {e}\n{toml}"));
    ephemeral_listeners(&mut doc);
    let text = toml::to_string(&doc).expect("a parsed table prints");
    Config::from_toml(&text, "test config").expect("test config is valid")
}

/// Puts every listener of `[server]` on port 0, keeping its IP: each key that ends in
/// `listen` (`listen`, `admin_listen`, and those later listener kinds bring), at any depth of
/// `[server]`, holding an address or a list of them. Listener keys the text leaves out get the
/// default's addresses first, since the defaults are fixed ports (8080, 9090).
pub fn ephemeral_listeners(doc: &mut toml::Table) {
    let defaults = toml::Table::try_from(ServerConfig::default()).expect("the default [server] is a table");
    let server = doc
        .entry("server")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .expect("[server] is a table");
    for (key, value) in defaults {
        if key.ends_with("listen") {
            server.entry(key).or_insert(value);
        }
    }
    listeners_on_port_zero("server", server);
}

/// Rewrites the listener keys in `table` (at `path`, for panics) and in the tables under it.
fn listeners_on_port_zero(path: &str, table: &mut toml::Table) {
    for (key, value) in table.iter_mut() {
        let path = format!("{path}.{key}");
        match value {
            _ if key.ends_with("listen") => port_zero(&path, value),
            toml::Value::Table(t) => listeners_on_port_zero(&path, t),
            toml::Value::Array(items) => {
                for t in items.iter_mut().filter_map(toml::Value::as_table_mut) {
                    listeners_on_port_zero(&path, t);
                }
            }
            _ => {}
        }
    }
}

/// An address, or a list of them, on port 0. Any other shape fails loudly: a listener this
/// does not understand would keep a fixed port.
fn port_zero(path: &str, value: &mut toml::Value) {
    match value {
        toml::Value::String(s) => {
            let addr: SocketAddr = s.parse().unwrap_or_else(|e| panic!("{path}: {s:?} is not an address: {e}"));
            *s = SocketAddr::new(addr.ip(), 0).to_string();
        }
        toml::Value::Array(items) => items.iter_mut().for_each(|v| port_zero(path, v)),
        other => panic!("{path}: expected an address or a list of them, got {other}; teach ephemeral_listeners"),
    }
}

/// A running veilgate.
pub struct TestProxy {
    /// The first proxy listener, the one most tests talk to.
    pub addr: SocketAddr,
    /// Every proxy listener, in `server.listen` order.
    pub addrs: Vec<SocketAddr>,
    /// The TLS (HTTPS proxy) listeners, in `server.tls_listen` order.
    pub tls: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub controller: Controller,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestProxy {
    /// Starts veilgate with `toml`, every listener on an ephemeral port ([`test_config`]).
    pub async fn start(toml: &str) -> TestProxy {
        TestProxy::start_config(test_config(toml)).await
    }

    /// Starts veilgate with a ready config.
    pub async fn start_config(config: Config) -> TestProxy {
        let proxy = Proxy::bind(config).await.expect("proxy binds");
        let addrs = proxy.proxy_addrs();
        let tls = proxy.tls_addrs();
        let addr = addrs[0];
        let admin = proxy.admin_addr();
        let controller = proxy.controller();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(proxy.run(async {
            let _ = rx.await;
        }));
        TestProxy { addr, addrs, tls, admin, controller, stop: Some(tx), task: Some(task) }
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

/// bcrypt's least cost: a hash in well under a millisecond, for tests where the cost is not
/// the point.
pub const FAST_COST: u32 = 4;

/// One line of a credentials file: `user`, then `password` hashed with bcrypt at `cost`.
pub fn htpasswd_line(user: &str, password: &str, cost: u32) -> String {
    format!("{user}:{}\n", bcrypt::hash(password, cost).unwrap())
}

/// Writes `users.htpasswd` in `dir` with one line per (user, password, bcrypt cost); its path.
pub fn htpasswd(dir: impl AsRef<Path>, users: &[(&str, &str, u32)]) -> PathBuf {
    let path = dir.as_ref().join("users.htpasswd");
    let lines: String = users.iter().map(|(u, p, cost)| htpasswd_line(u, p, *cost)).collect();
    std::fs::write(&path, lines).unwrap();
    path
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

/// Downloads `len` bytes from an [`Origin::source`] through `proxy`, as the client at `from`:
/// the bytes that arrived (fewer when the tunnel ended or stalled 5 s; at most 20 s in all).
pub async fn download(proxy: &TestProxy, from: &str, origin: &Origin, len: u64) -> u64 {
    let from: std::net::IpAddr = from.parse().unwrap();
    let (head, mut s) = connect_from(proxy.addr, Some(from), &origin.addr.to_string()).await;
    assert_eq!(head.status, 200);
    s.write_all(&len.to_be_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while got < len && std::time::Instant::now() < deadline {
        match tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => got += n as u64,
        }
    }
    got
}

/// One client (127.0.0.10) downloads 1 MiB through each of two instances `a` and `b` at once,
/// from an [`Origin::source`], under `bandwidth_down = "512 KiB/s"` per client shared by the
/// fleet (bandwidth grants): 2 MiB at 512 KiB/s is 4 s (2 s if each instance had its own
/// budget). The bound allows one grant of burst and two grants per instance (5 x 51 KiB); a
/// grant is 100 ms of the rate, so about 40 grants in all, whoever took them.
pub async fn assert_the_fleet_holds_the_client_rate(a: &TestProxy, b: &TestProxy, origin: &Origin) {
    let mib = 1u64 << 20;
    let started = std::time::Instant::now();
    let (got_a, got_b) = tokio::join!(download(a, "127.0.0.10", origin, mib), download(b, "127.0.0.10", origin, mib));
    let took = started.elapsed();
    assert_eq!((got_a, got_b), (mib, mib));
    let floor = std::time::Duration::from_secs_f64((2.0 * mib as f64 - 5.0 * 52_000.0) / (512.0 * 1024.0));
    assert!(took >= floor, "2 MiB in {took:?}: faster than the fleet rate allows ({floor:?})");
    assert!(took <= std::time::Duration::from_secs(7), "2 MiB in {took:?}: far slower than the fleet rate");
    let grants = a.metric("veilgate_cluster_bandwidth_grants_total").await
        + b.metric("veilgate_cluster_bandwidth_grants_total").await;
    assert!((30.0..=60.0).contains(&grants), "{grants} grants for 2 MiB");
}
