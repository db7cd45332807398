//! The head-phase bound tells a slowloris from a burst: thousands of fast heads from one
//! address are all served, while slow heads from one address are held to the per-client
//! bound without delaying anyone else. Its own test process: it opens thousands of sockets.

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Raises this process's descriptor limit to its hard limit and checks it covers `need`.
fn allow_descriptors(need: u64) {
    let now = set_nofile(u64::MAX);
    assert!(now >= need, "this test needs {need} descriptors; the hard limit is {now}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_2000_tunnels_from_one_address_is_served_on_the_defaults() {
    const N: usize = 2000;
    // Client, proxy's two sockets and the origin's, per tunnel.
    allow_descriptors(4 * N as u64 + 500);
    let origin = Origin::echo().await;
    let proxy = TestProxy::start(&loopback_policy(&[origin.port()])).await;
    let target = origin.addr.to_string();
    let mut opening = JoinSet::new();
    for _ in 0..N {
        let (proxy, target) = (proxy.addr, target.clone());
        opening.spawn(async move { connect_from(proxy, Some(ip("127.0.0.2")), &target).await });
    }
    let mut tunnels = Vec::with_capacity(N);
    let mut statuses = std::collections::BTreeMap::new();
    while let Some(done) = bounded(opening.join_next()).await {
        let (head, s) = done.unwrap();
        *statuses.entry(head.status).or_insert(0) += 1;
        tunnels.push(s);
    }
    assert_eq!(statuses, [(200, N)].into_iter().collect(), "every tunnel of the burst is served");
    assert_eq!(proxy.controller.active_tunnels(), N as u32, "all held open at once");
    // Every one of them relays.
    for (i, s) in tunnels.iter_mut().enumerate().step_by(97) {
        s.write_all(&[i as u8]).await.unwrap();
        let mut b = [0u8];
        bounded(s.read_exact(&mut b)).await.unwrap();
        assert_eq!(b[0], i as u8);
    }
    assert_eq!(proxy.metric("veilgate_refusals_total{reason=\"client_pending_cap\"}").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_from_one_address_are_held_to_the_bound_and_delay_nobody() {
    const N: usize = 1000;
    const BOUND: usize = 64;
    allow_descriptors(3 * N as u64 + 500);
    let origin = Origin::echo().await;
    let toml = format!("[server]\nhead_grace = \"300ms\"\n{}", loopback_policy(&[origin.port()]));
    let proxy = TestProxy::start(&toml).await;
    // 1,000 heads from one address, each a byte a second, none ever complete.
    let mut slow = JoinSet::new();
    for _ in 0..N {
        let proxy = proxy.addr;
        slow.spawn(async move {
            let mut s = dial_proxy(proxy, Some(ip("127.0.0.4"))).await;
            let mut got = Vec::new();
            for b in b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n".iter().take(4) {
                if s.write_all(&[*b]).await.is_err() {
                    break;
                }
                let mut buf = [0u8; 512];
                match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                    Err(_) => {}
                }
            }
            // Left open (still a slow head) or answered and closed.
            (String::from_utf8_lossy(&got).get(9..12).map(str::to_string), s)
        });
    }
    // Meanwhile another client's tunnels open as fast as ever.
    for _ in 0..5 {
        let started = Instant::now();
        let (head, _s) = connect_from(proxy.addr, Some(ip("127.0.0.5")), &origin.addr.to_string()).await;
        assert_eq!(head.status, 200);
        assert!(started.elapsed() < Duration::from_secs(1), "another client waited {:?}", started.elapsed());
        // On purpose: the five are spread over the second in which the slow heads go late and
        // are turned away, not bunched before it.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut refused = 0;
    let mut held = Vec::new();
    while let Some(done) = tokio::time::timeout(Duration::from_secs(15), slow.join_next()).await.unwrap() {
        match done.unwrap() {
            (Some(status), _) => {
                assert_eq!(status, "429");
                refused += 1;
            }
            (None, s) => held.push(s),
        }
    }
    assert_eq!((held.len(), refused), (BOUND, N - BOUND), "only the bound of late heads is held");
    assert_eq!(proxy.controller.pending_heads(), BOUND as u32);
    assert_eq!(proxy.metric("veilgate_refusals_total{reason=\"client_pending_cap\"}").await, (N - BOUND) as f64);
}
