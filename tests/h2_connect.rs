//! HTTP/2 CONNECT on the TLS listener: one tunnel per stream, refusals per stream, the
//! connection shared.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::tls::TestPki;
use common::*;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::{Method, Request};
use rustls::pki_types::ServerName;

/// An HTTP/2 connection to the TLS listener (ALPN h2), its driver running on its own task.
async fn h2_connect(pki: &TestPki, listener: std::net::SocketAddr) -> SendRequest<Bytes> {
    let mut cfg = (*pki.client_config()).clone();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = dial_proxy(listener, None).await;
    let tls = bounded(
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "the listener offers h2");
    let (send, conn) = bounded(h2::client::handshake(tls)).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// Opens a CONNECT stream to `target`: its status, and the stream's two halves.
async fn open(h2: &mut SendRequest<Bytes>, target: &str) -> (u16, SendStream<Bytes>, RecvStream) {
    let req = Request::builder().method(Method::CONNECT).uri(target).body(()).unwrap();
    let mut ready = bounded(h2.clone().ready()).await.unwrap();
    let (resp, send) = ready.send_request(req, false).unwrap();
    let resp = bounded(resp).await.unwrap();
    (resp.status().as_u16(), send, resp.into_body())
}

/// Sends `data` on the stream and reads as many bytes back.
async fn echo(send: &mut SendStream<Bytes>, recv: &mut RecvStream, data: &[u8]) -> Vec<u8> {
    send.send_data(Bytes::copy_from_slice(data), false).unwrap();
    let mut got = Vec::new();
    while got.len() < data.len() {
        let chunk = bounded(recv.data()).await.expect("stream open").unwrap();
        recv.flow_control().release_capacity(chunk.len()).unwrap();
        got.extend_from_slice(&chunk);
    }
    got
}

async fn body(recv: &mut RecvStream) -> String {
    let mut out = Vec::new();
    while let Some(chunk) = bounded(recv.data()).await {
        out.extend_from_slice(&chunk.unwrap());
    }
    String::from_utf8_lossy(&out).to_string()
}

#[tokio::test]
async fn each_stream_is_a_tunnel_on_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let origin = Origin::echo().await;
    let proxy = TestProxy::start(&pki.listener_config(dir.path(), origin.port(), "")).await;
    let target = format!("127.0.0.1:{}", origin.port());
    let mut h2 = h2_connect(&pki, proxy.tls[0]).await;
    let (s1, mut send1, mut recv1) = open(&mut h2, &target).await;
    let (s2, mut send2, mut recv2) = open(&mut h2, &target).await;
    assert_eq!((s1, s2), (200, 200));
    let a = pattern(300 * 1024, 1);
    let b = pattern(200 * 1024, 2);
    let (got_a, got_b) = tokio::join!(echo(&mut send1, &mut recv1, &a), echo(&mut send2, &mut recv2, &b));
    assert!(got_a == a && got_b == b, "each stream's bytes came back exactly, unmixed");
    assert_eq!(origin.connections(), 2, "one upstream connection per stream");
    assert_eq!(proxy.controller.active_tunnels(), 2);
    // The client ends one stream: its tunnel ends, the other runs on.
    send1.send_data(Bytes::new(), true).unwrap();
    eventually("one tunnel left", async || proxy.controller.active_tunnels(), |n| *n == 1).await;
    assert_eq!(echo(&mut send2, &mut recv2, b"still here").await, b"still here");
}

#[tokio::test]
async fn refusals_are_per_stream_and_a_reset_gives_the_place_back() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let origin = Origin::echo().await;
    let extra = "[limits.per_client]\nmax_tunnels = 1\n";
    let proxy = TestProxy::start(&pki.listener_config(dir.path(), origin.port(), extra)).await;
    let target = format!("127.0.0.1:{}", origin.port());
    let mut h2 = h2_connect(&pki, proxy.tls[0]).await;
    // A port the policy does not allow: 403 on that stream only, the connection stays.
    let (status, _s, mut denied) = open(&mut h2, "127.0.0.1:9").await;
    assert_eq!(status, 403);
    assert!(body(&mut denied).await.contains("port_denied"));
    let (status, mut send, mut recv) = open(&mut h2, &target).await;
    assert_eq!(status, 200);
    // Over the client's cap: the streams of one connection are one client's tunnels.
    let (status, _s, mut over) = open(&mut h2, &target).await;
    assert_eq!(status, 429);
    assert!(body(&mut over).await.contains("client_cap"));
    // Not a CONNECT: 405 on the stream.
    let get = Request::builder().method(Method::GET).uri("https://localhost/").body(()).unwrap();
    let (resp, _s) = bounded(h2.clone().ready()).await.unwrap().send_request(get, true).unwrap();
    let resp = bounded(resp).await.unwrap();
    assert_eq!(resp.status().as_u16(), 405);
    assert_eq!(resp.headers().get("allow").map(|v| v.as_bytes()), Some(&b"CONNECT"[..]));
    // The first stream is untouched by all that.
    assert_eq!(echo(&mut send, &mut recv, b"after refusals").await, b"after refusals");
    assert_eq!(proxy.metric("veilgate_refusals_total{reason=\"client_cap\"}").await, 1.0);
    assert_eq!(proxy.metric("veilgate_refusals_total{reason=\"port_denied\"}").await, 1.0);
    // A reset stream releases its place: the next one is admitted. CANCEL is how a browser
    // ends a tunnel it no longer needs: counted as closed, not as an error.
    send.send_reset(h2::Reason::CANCEL);
    eventually("the reset tunnel ended", async || proxy.controller.active_tunnels(), |n| *n == 0).await;
    let closed = "veilgate_tunnels_total{mode=\"tunnel\",outcome=\"closed\"}";
    let failed = "veilgate_tunnels_total{mode=\"tunnel\",outcome=\"error\"}";
    eventually("the cancelled tunnel counted", async || proxy.metric(closed).await, |n| *n == 1.0).await;
    assert_eq!(proxy.metric(failed).await, 0.0);
    let (status, mut send, mut recv) = open(&mut h2, &target).await;
    assert_eq!(status, 200);
    assert_eq!(echo(&mut send, &mut recv, b"again").await, b"again");
    // A reset that says something went wrong is a failed tunnel.
    send.send_reset(h2::Reason::INTERNAL_ERROR);
    eventually("the failed tunnel counted", async || proxy.metric(failed).await, |n| *n == 1.0).await;
    assert_eq!(proxy.metric(closed).await, 1.0);
}

#[tokio::test]
async fn fifty_streams_to_fifty_targets_on_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let mut origins = Vec::new();
    for _ in 0..50 {
        origins.push(Origin::echo().await);
    }
    let ports: Vec<u16> = origins.iter().map(Origin::port).collect();
    let mut config = pki.listener_config(dir.path(), ports[0], "[limits.per_client]\nmax_tunnels = 50\n");
    config = config.replace(&loopback_policy(&[ports[0]]), &loopback_policy(&ports));
    let proxy = TestProxy::start(&config).await;
    let mut h2 = h2_connect(&pki, proxy.tls[0]).await;
    let mut streams = Vec::new();
    for port in &ports {
        let (status, send, recv) = open(&mut h2, &format!("127.0.0.1:{port}")).await;
        assert_eq!(status, 200, "stream to port {port}");
        streams.push((send, recv));
    }
    // A denied target and one over the client's cap get their status on their own stream.
    let (status, _s, mut denied) = open(&mut h2, "127.0.0.1:9").await;
    assert_eq!(status, 403);
    assert!(body(&mut denied).await.contains("port_denied"));
    let (status, _s, _r) = open(&mut h2, &format!("127.0.0.1:{}", ports[0])).await;
    assert_eq!(status, 429, "the streams of one connection count against one client's cap");
    // Every stream relays its own bytes, all at once.
    let mut set = tokio::task::JoinSet::new();
    for (i, (mut send, mut recv)) in streams.drain(..).enumerate() {
        set.spawn(async move {
            let data = pattern(32 * 1024, i as u64);
            let exact = echo(&mut send, &mut recv, &data).await == data;
            (i, exact, send, recv)
        });
    }
    let mut back = Vec::new();
    while let Some(done) = bounded(set.join_next()).await {
        back.push(done.unwrap());
    }
    back.sort_by_key(|b| b.0);
    let inexact: Vec<usize> = back.iter().filter(|b| !b.1).map(|b| b.0).collect();
    assert!(back.len() == 50 && inexact.is_empty(), "streams with wrong bytes: {inexact:?}");
    streams = back.into_iter().map(|(_, _, send, recv)| (send, recv)).collect();
    assert!(origins.iter().all(|o| o.connections() == 1), "one upstream connection per target");
    // Resets give their places back: ten cancelled, ten new ones admitted.
    for (send, _) in streams.iter_mut().take(10) {
        send.send_reset(h2::Reason::CANCEL);
    }
    eventually("ten tunnels ended", async || proxy.controller.active_tunnels(), |n| *n == 40).await;
    for port in &ports[..10] {
        let (status, mut send, mut recv) = open(&mut h2, &format!("127.0.0.1:{port}")).await;
        assert_eq!(status, 200);
        assert_eq!(echo(&mut send, &mut recv, b"again").await, b"again");
        streams.push((send, recv));
    }
    assert_eq!(proxy.controller.active_tunnels(), 50);
    assert_eq!(proxy.metric("veilgate_refusals_total{reason=\"client_cap\"}").await, 1.0);
    assert_eq!(proxy.metric("veilgate_refusals_total{reason=\"port_denied\"}").await, 1.0);
    assert_eq!(proxy.metric("veilgate_tls_sessions_total{protocol=\"h2\"}").await, 1.0, "all on one connection");
}

#[tokio::test]
async fn http1_clients_still_get_http1_on_the_same_listener() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let origin = Origin::echo().await;
    let proxy = TestProxy::start(&pki.listener_config(dir.path(), origin.port(), "")).await;
    let front = Front::Tls { config: pki.client_config(), name: ServerName::try_from("localhost").unwrap() };
    let (head, _c) = connect_over(&front, proxy.tls[0], None, &format!("127.0.0.1:{}", origin.port())).await;
    assert_eq!(head.status, 200);
}
