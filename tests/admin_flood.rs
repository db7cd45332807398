//! A flood of silent connections on the admin port must not take the descriptors the proxy
//! listener needs: the admin listener holds a few per address and a few in all, turns the rest
//! away at once (counted), and closes idle ones after a short head deadline. This file is its
//! own test process, so lowering RLIMIT_NOFILE here touches no other test.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// Silent connections from one address: more than the 1,024 descriptors a default process has.
const FLOOD: usize = 1_100;
/// The admin listener's bounds and head deadline (src/admin.rs).
const PER_ADDRESS: usize = 8;
const GLOBAL: usize = 64;
const HEAD_DEADLINE: Duration = Duration::from_secs(2);
/// What a connection over a bound reads before the close.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: close\r\n\r\nbusy\n";

async fn connect_from_ip(to: SocketAddr, from: IpAddr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(from, 0))?;
    tokio::time::timeout(Duration::from_secs(2), sock.connect(to)).await.map_err(std::io::Error::other)?
}

/// How one silent connection ended: what it read, and how long after its connect the EOF came.
struct Ended {
    bytes: Vec<u8>,
    after: Duration,
}

/// Opens `n` silent connections from `from`, each watched by a task that reads to the end.
async fn flood(admin: SocketAddr, from: IpAddr, n: usize) -> Vec<JoinHandle<Ended>> {
    let mut watchers = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = match connect_from_ip(admin, from).await {
            Ok(s) => s,
            Err(e) => panic!("flood connection {i} from {from} failed: {e} (descriptors exhausted?)"),
        };
        let opened = Instant::now();
        watchers.push(tokio::spawn(async move {
            let mut bytes = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(8), s.read_to_end(&mut bytes)).await;
            assert!(read.is_ok(), "the admin listener never closed a silent connection");
            Ended { bytes, after: opened.elapsed() }
        }));
    }
    watchers
}

async fn get_from(admin: SocketAddr, from: IpAddr, path: &str) -> String {
    let mut s = connect_from_ip(admin, from).await.expect("scrape connects");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = Vec::new();
    bounded(s.read_to_end(&mut out)).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// Sorts the ended connections into (turned away, held until idle), checking each kind's end.
fn sort(ended: Vec<Ended>) -> (usize, usize) {
    let (mut refused, mut idle) = (0, 0);
    for e in ended {
        if e.bytes.is_empty() {
            idle += 1;
            assert!(
                e.after >= HEAD_DEADLINE - Duration::from_millis(300)
                    && e.after <= HEAD_DEADLINE + Duration::from_millis(1500),
                "an idle admin connection is closed at the head deadline, not after {:?}",
                e.after
            );
        } else {
            refused += 1;
            assert_eq!(e.bytes, BUSY, "{}", String::from_utf8_lossy(&e.bytes));
            assert!(
                e.after < Duration::from_secs(1),
                "a connection over the bound is closed at once, not after {:?}",
                e.after
            );
        }
    }
    (refused, idle)
}

// Two workers: the proxy accepts while the flood is being opened, as it would in production.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_flood_on_the_admin_port_starves_nothing() {
    let origin = Origin::echo().await;
    let proxy = TestProxy::start(&loopback_policy(&[origin.port()])).await;
    let admin = proxy.admin.unwrap();
    // Room for the flood's own client sockets and a few hundred more: enough for the proxy
    // only if the admin listener does not hold a descriptor per silent connection.
    let open_now = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(64);
    set_nofile(open_now + FLOOD as u64 + 300);

    // One address floods.
    let started = Instant::now();
    let watchers = flood(admin, "127.0.0.2".parse().unwrap(), FLOOD).await;
    let opened_in = started.elapsed();
    // The proxy still tunnels, and a scrape from another address is answered.
    still_serves(&proxy, &origin).await;
    let scrape = get_from(admin, "127.0.0.3".parse().unwrap(), "/metrics").await;
    assert!(scrape.starts_with("HTTP/1.1 200 OK\r\n"), "{}", &scrape[..scrape.len().min(200)]);
    assert_eq!(metric_value(&scrape, "veilgate_accept_errors_total"), Some(0.0), "the proxy listener never hit EMFILE");

    let mut ended = Vec::new();
    for w in watchers {
        ended.push(w.await.unwrap());
    }
    let (refused_a, idle_a) = sort(ended);
    assert_eq!(refused_a + idle_a, FLOOD);
    if opened_in < HEAD_DEADLINE - Duration::from_millis(500) {
        // No held connection reached its deadline before the flood was open: exact.
        assert_eq!(idle_a, PER_ADDRESS, "held from one address");
    } else {
        assert!(idle_a >= PER_ADDRESS && refused_a >= FLOOD / 2, "refused {refused_a}, idle {idle_a}");
    }
    assert_eq!(proxy.metric("veilgate_admin_connections_refused_total").await, refused_a as f64);

    // Many addresses: the global bound holds.
    let addrs = (GLOBAL / PER_ADDRESS + 2) as u8;
    let started = Instant::now();
    let mut watchers = Vec::new();
    for i in 0..addrs {
        watchers.extend(flood(admin, IpAddr::from([127, 0, 0, 10 + i]), PER_ADDRESS + 1).await);
    }
    let opened_in = started.elapsed();
    let mut ended = Vec::new();
    for w in watchers {
        ended.push(w.await.unwrap());
    }
    let (refused_b, idle_b) = sort(ended);
    assert_eq!(refused_b + idle_b, usize::from(addrs) * (PER_ADDRESS + 1));
    if opened_in < HEAD_DEADLINE - Duration::from_millis(500) {
        assert_eq!(idle_b, GLOBAL, "held in all");
    }
    assert_eq!(proxy.metric("veilgate_admin_connections_refused_total").await, (refused_a + refused_b) as f64);
    assert_eq!(proxy.metric("veilgate_accept_errors_total").await, 0.0);
}
