//! Graceful drain: stop accepting at once, let running tunnels finish up to the deadline,
//! then close them; readiness says so while draining.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn running_tunnels_finish_while_new_clients_are_turned_away() {
    let origin = Origin::echo().await;
    let mut proxy =
        TestProxy::start(&format!("[server]\ndrain_timeout = \"10s\"\n{}", loopback_policy(&[origin.port()]))).await;
    assert_eq!(proxy.admin_get("/readyz").await.0, 200);
    let (head, mut s) = connect_via(proxy.addr, &origin.addr.to_string()).await;
    assert_eq!(head.status, 200);
    let stopped = proxy.begin_shutdown();
    // Readiness flips and the listener closes.
    eventually("/readyz to say 503", async || proxy.admin_get("/readyz").await.0, |status| *status == 503).await;
    eventually(
        "the proxy listener to close",
        async || tokio::net::TcpStream::connect(proxy.addr).await.is_ok(),
        |accepting| !*accepting,
    )
    .await;
    // The running tunnel still works.
    s.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    bounded(s.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"still here");
    assert!(!stopped.is_finished(), "the proxy waits for the tunnel");
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    bounded(s.read_to_end(&mut rest)).await.unwrap();
    bounded(stopped).await.unwrap();
}

#[tokio::test]
async fn tunnels_past_the_drain_deadline_are_closed() {
    let origin = Origin::echo().await;
    let mut proxy =
        TestProxy::start(&format!("[server]\ndrain_timeout = \"300ms\"\n{}", loopback_policy(&[origin.port()]))).await;
    let (head, mut s) = connect_via(proxy.addr, &origin.addr.to_string()).await;
    assert_eq!(head.status, 200);
    let controller = proxy.controller.clone();
    let started = Instant::now();
    bounded(proxy.begin_shutdown()).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250));
    let mut buf = [0u8; 4];
    // A clean close (FIN), not a reset: the proxy closes a socket it has fully read.
    let n = bounded(s.read(&mut buf)).await.expect("closed cleanly, not reset");
    assert_eq!(n, 0, "the tunnel was closed at the deadline");
    assert_eq!(controller.active_tunnels(), 0);
    let metrics = controller.render_metrics();
    assert_eq!(metric_value(&metrics, "veilgate_tunnels_total{mode=\"tunnel\",outcome=\"shutdown\"}"), Some(1.0));
}

#[tokio::test]
async fn clients_still_sending_their_head_are_dropped_at_drain() {
    let mut proxy = TestProxy::start("").await;
    let mut s = dial_proxy(proxy.addr, None).await;
    s.write_all(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n").await.unwrap();
    eventually("the connection in its head phase", async || proxy.controller.pending_heads(), |n| *n == 1).await;
    bounded(proxy.begin_shutdown()).await.unwrap();
    let mut buf = Vec::new();
    let _ = bounded(s.read_to_end(&mut buf)).await;
    assert!(buf.is_empty(), "nothing was promised, nothing is sent");
}

/// `server.drain_delay`: `/readyz` says 503 at once, the listener keeps accepting (and
/// serving) for the delay, then closes; a balancer checking `/readyz` has moved its clients by
/// then.
#[tokio::test]
async fn with_a_drain_delay_readiness_goes_before_the_listener() {
    let origin = Origin::echo().await;
    let mut proxy = TestProxy::start(&format!(
        "[server]\ndrain_timeout = \"10s\"\ndrain_delay = \"1s\"\n{}",
        loopback_policy(&[origin.port()])
    ))
    .await;
    let stopped = proxy.begin_shutdown();
    let asked = Instant::now();
    eventually("/readyz to say 503", async || proxy.admin_get("/readyz").await.0, |status| *status == 503).await;
    // Not ready, still serving: a client the balancer sent a moment ago gets its tunnel.
    let (head, held) = connect_via(proxy.addr, &origin.addr.to_string()).await;
    assert_eq!(head.status, 200, "accepted and served during the delay");
    assert!(asked.elapsed() < Duration::from_millis(900), "checked within the delay: {:?}", asked.elapsed());
    eventually(
        "the proxy listener to close after the delay",
        async || tokio::net::TcpStream::connect(proxy.addr).await.is_ok(),
        |accepting| !*accepting,
    )
    .await;
    assert!(asked.elapsed() >= Duration::from_secs(1), "not before the delay: {:?}", asked.elapsed());
    drop(held);
    bounded(stopped).await.unwrap();
}
