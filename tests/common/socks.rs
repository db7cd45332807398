//! Parents for the parent-proxy tests: a real `microsocks` (the Debian package) as a child
//! process on a free loopback port, a small SOCKS5 server of our own that records what it is
//! asked (the usernames and destinations microsocks does not show), and a DNS stub on
//! loopback that counts the queries it gets.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::eventually_blocking;

/// A running `microsocks`, stopped by its PID when dropped.
pub struct Microsocks {
    /// Where it listens.
    pub addr: SocketAddr,
    auth: Option<(String, String)>,
    child: Option<Child>,
}

impl Microsocks {
    /// Starts one on `port` of 127.0.0.1 (a free one when `None`), requiring `auth` when
    /// given, and waits until it accepts; `None` (after a loud message naming `test`) when
    /// `microsocks` is not installed.
    pub fn start(test: &str, port: Option<u16>, auth: Option<(&str, &str)>) -> Option<Microsocks> {
        if Command::new("microsocks").arg("-h").stdout(Stdio::null()).stderr(Stdio::null()).status().is_err() {
            // Straight to the process's stderr: the harness captures eprintln! of a test that
            // passes, and this must be seen.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: microsocks is not installed (apt-get install microsocks); \
                 parent dialing was NOT tested against a real SOCKS5 server"
            );
            return None;
        }
        let port = port.unwrap_or_else(super::child::free_port);
        let auth = auth.map(|(u, p)| (u.to_string(), p.to_string()));
        let mut m = Microsocks { addr: SocketAddr::from(([127, 0, 0, 1], port)), auth, child: None };
        m.restart();
        Some(m)
    }

    /// Stops it (SIGKILL, as in a crash).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and waits until it accepts.
    pub fn restart(&mut self) {
        self.stop();
        let mut cmd = Command::new("microsocks");
        cmd.args(["-i", "127.0.0.1", "-p", &self.addr.port().to_string()]);
        if let Some((u, p)) = &self.auth {
            cmd.args(["-u", u, "-P", p]);
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("microsocks starts");
        self.child = Some(child);
        let addr = self.addr;
        eventually_blocking(
            "microsocks accepts",
            || std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(200)).is_ok(),
            |ok| *ok,
        );
    }
}

impl Drop for Microsocks {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What one CONNECT asked the recording server for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asked {
    /// A name, unresolved (ATYP 3).
    Name(String, u16),
    /// An address (ATYP 1 or 4).
    Addr(SocketAddr),
}

/// One CONNECT request: the RFC 1929 username, if any, and the destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub user: Option<String>,
    pub asked: Asked,
}

/// A SOCKS5 server that records every CONNECT and connects each to `origin` whatever it
/// names (so names need no resolver), except `*.invalid`, answered with reply 4 (host
/// unreachable) as a resolving parent would.
pub struct RecordingSocks {
    pub addr: SocketAddr,
    pub requests: Arc<Mutex<Vec<Request>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RecordingSocks {
    pub async fn start(origin: SocketAddr) -> RecordingSocks {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<Request>>> = Arc::default();
        let log = Arc::clone(&requests);
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    let _ = serve(s, origin, log).await;
                });
            }
        });
        RecordingSocks { addr, requests, task }
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for RecordingSocks {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut s: TcpStream, origin: SocketAddr, log: Arc<Mutex<Vec<Request>>>) -> std::io::Result<()> {
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await?;
    let mut methods = vec![0u8; usize::from(head[1])];
    s.read_exact(&mut methods).await?;
    let mut user = None;
    if methods.contains(&2) {
        s.write_all(&[5, 2]).await?;
        let mut v = [0u8; 2];
        s.read_exact(&mut v).await?;
        let mut u = vec![0u8; usize::from(v[1])];
        s.read_exact(&mut u).await?;
        let mut plen = [0u8; 1];
        s.read_exact(&mut plen).await?;
        let mut p = vec![0u8; usize::from(plen[0])];
        s.read_exact(&mut p).await?;
        user = Some(String::from_utf8_lossy(&u).to_string());
        s.write_all(&[1, 0]).await?;
    } else {
        s.write_all(&[5, 0]).await?;
    }
    let mut req = [0u8; 4];
    s.read_exact(&mut req).await?;
    let asked = match req[3] {
        1 => {
            let mut a = [0u8; 6];
            s.read_exact(&mut a).await?;
            let ip = std::net::Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            Asked::Addr(SocketAddr::from((ip, u16::from_be_bytes([a[4], a[5]]))))
        }
        4 => {
            let mut a = [0u8; 18];
            s.read_exact(&mut a).await?;
            let ip: [u8; 16] = a[..16].try_into().unwrap();
            Asked::Addr(SocketAddr::from((std::net::Ipv6Addr::from(ip), u16::from_be_bytes([a[16], a[17]]))))
        }
        _ => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len).await?;
            let mut name = vec![0u8; usize::from(len[0]) + 2];
            s.read_exact(&mut name).await?;
            let port = u16::from_be_bytes([name[name.len() - 2], name[name.len() - 1]]);
            Asked::Name(String::from_utf8_lossy(&name[..name.len() - 2]).to_string(), port)
        }
    };
    let invalid = matches!(&asked, Asked::Name(n, _) if n.ends_with(".invalid"));
    log.lock().unwrap().push(Request { user, asked });
    if invalid {
        return s.write_all(&[5, 4, 0, 1, 0, 0, 0, 0, 0, 0]).await;
    }
    let mut up = TcpStream::connect(origin).await?;
    s.write_all(&[5, 0, 0, 1, 127, 0, 0, 1, 0, 0]).await?;
    tokio::io::copy_bidirectional(&mut s, &mut up).await.map(drop)
}

/// A DNS server on loopback that counts queries and answers A questions with 127.0.0.1 (and
/// others with no records).
pub struct DnsStub {
    pub addr: SocketAddr,
    queries: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl DnsStub {
    pub async fn start() -> DnsStub {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let queries = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&queries);
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else { return };
                count.fetch_add(1, Ordering::SeqCst);
                if let Some(reply) = answer(&buf[..n]) {
                    let _ = sock.send_to(&reply, from).await;
                }
            }
        });
        DnsStub { addr, queries, task }
    }

    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}

impl Drop for DnsStub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The reply to one query: its header and question, and one A record 127.0.0.1 when it
/// asked for A.
fn answer(q: &[u8]) -> Option<Vec<u8>> {
    if q.len() < 12 {
        return None;
    }
    let mut i = 12;
    while *q.get(i)? != 0 {
        i += usize::from(q[i]) + 1;
    }
    let qend = i + 5;
    let qtype = u16::from_be_bytes([*q.get(i + 1)?, *q.get(i + 2)?]);
    let a = qtype == 1;
    let mut r = Vec::with_capacity(qend + 16);
    r.extend_from_slice(&q[..2]);
    r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, u8::from(a), 0, 0, 0, 0]);
    r.extend_from_slice(q.get(12..qend)?);
    if a {
        r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 1]);
    }
    Some(r)
}
