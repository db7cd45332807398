//! Every refusal: its status, that the origin sees nothing, and that the next client is
//! still served.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::AsyncWriteExt;

async fn status_of(proxy: &TestProxy, request: &[u8]) -> (u16, String) {
    let text = raw_exchange(proxy.addr, request).await;
    (text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0), text)
}

#[tokio::test]
async fn other_methods_get_405_and_no_upstream_connection() {
    let origin = Origin::echo().await;
    let proxy = TestProxy::start(&loopback_policy(&[origin.port()])).await;
    let o = origin.addr;
    for req in [
        format!("GET http://{o}/ HTTP/1.1\r\nHost: {o}\r\n\r\n"),
        format!("POST http://{o}/ HTTP/1.1\r\nHost: {o}\r\nContent-Length: 0\r\n\r\n"),
        "GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
        format!("OPTIONS {o} HTTP/1.1\r\n\r\n"),
        format!("PUT http://{o}/x HTTP/1.1\r\nHost: {o}\r\n"),
    ] {
        let (status, text) = status_of(&proxy, req.as_bytes()).await;
        assert_eq!(status, 405, "{req:?} -> {text}");
        assert!(text.contains("\r\nAllow: CONNECT\r\n"), "{text}");
        assert!(text.contains("\r\nConnection: close\r\n"), "{text}");
    }
    assert_eq!(origin.connections(), 0, "no upstream connection for a refused method");
    assert_eq!(proxy.metric("veilgate_refusals_total{reason=\"method_not_allowed\"}").await, 5.0);
    still_serves(&proxy, &origin).await;
}

#[tokio::test]
async fn malformed_requests_get_400() {
    let origin = Origin::echo().await;
    let proxy = TestProxy::start(&loopback_policy(&[origin.port()])).await;
    let p = origin.port();
    let cases: Vec<Vec<u8>> = vec![
        b"CONNECT 127.0.0.1 HTTP/1.1\r\n\r\n".to_vec(),
        b"CONNECT 127.0.0.1: HTTP/1.1\r\n\r\n".to_vec(),
        b"CONNECT 127.0.0.1:0 HTTP/1.1\r\n\r\n".to_vec(),
        b"CONNECT 127.0.0.1:65536 HTTP/1.1\r\n\r\n".to_vec(),
        format!("CONNECT user:pw@127.0.0.1:{p} HTTP/1.1\r\n\r\n").into_bytes(),
        format!("CONNECT [::1:{p} HTTP/1.1\r\n\r\n").into_bytes(),
        format!("CONNECT ::1:{p} HTTP/1.1\r\n\r\n").into_bytes(),
        format!("CONNECT [127.0.0.1]:{p} HTTP/1.1\r\n\r\n").into_bytes(),
        format!("CONNECT exa\x01mple.com:{p} HTTP/1.1\r\n\r\n").into_bytes(),
        format!("CONNECT 127.0.0.1:{p} HTTP/1.1\r\nX-Bad: a\0b\r\n\r\n").into_bytes(),
        format!("CONNECT 127.0.0.1:{p} HTTP/1.1\r\nBad Name: v\r\n\r\n").into_bytes(),
        format!("CONNECT 127.0.0.1:{p} HTTP/2.0\r\n\r\n").into_bytes(),
        format!("CONNECT 127.0.0.1:{p}\r\n\r\n").into_bytes(),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http at all\r\n\r\n".to_vec(),
    ];
    for req in &cases {
        let (status, text) = status_of(&proxy, req).await;
        assert_eq!(status, 400, "{:?} -> {text}", String::from_utf8_lossy(req));
    }
    assert_eq!(origin.connections(), 0);
    // The last case starts like a TLS ClientHello: still 400, counted as what it is.
    assert_eq!(proxy.metric("veilgate_refusals_total{reason=\"bad_request\"}").await, (cases.len() - 1) as f64);
    assert_eq!(proxy.metric("veilgate_refusals_total{reason=\"tls_on_plaintext\"}").await, 1.0);
    still_serves(&proxy, &origin).await;
}

#[tokio::test]
async fn oversized_head_gets_431() {
    let origin = Origin::echo().await;
    let proxy =
        TestProxy::start(&format!("[server]\nmax_header_bytes = 1024\n{}", loopback_policy(&[origin.port()]))).await;
    let req = format!("CONNECT {} HTTP/1.1\r\nX-Pad: {}\r\n\r\n", origin.addr, "a".repeat(2000));
    let (status, _) = status_of(&proxy, req.as_bytes()).await;
    assert_eq!(status, 431);
    // Endless header lines without a blank line: the cap, not memory, ends it.
    let endless = "CONNECT 127.0.0.1:1 HTTP/1.1\r\n".to_string() + &"X: y\r\n".repeat(400);
    let (status, _) = status_of(&proxy, endless.as_bytes()).await;
    assert_eq!(status, 431);
    assert_eq!(origin.connections(), 0);
    still_serves(&proxy, &origin).await;
}

#[tokio::test]
async fn slowloris_gets_408_within_the_header_timeout() {
    let origin = Origin::echo().await;
    let proxy =
        TestProxy::start(&format!("[server]\nheader_timeout = \"400ms\"\n{}", loopback_policy(&[origin.port()]))).await;
    let mut s = dial_proxy(proxy.addr, None).await;
    let started = Instant::now();
    s.write_all(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n").await.unwrap();
    // Trickle a header byte every 100 ms: each read succeeds, the whole head never ends. The
    // sleep is the trickle's pace, on purpose: time must pass for the header timeout.
    let trickle = async {
        for _ in 0..50 {
            if s.write_all(b"X").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(2), trickle).await.ok();
    let head = read_reply_head(&mut s).await;
    assert_eq!(head.status, 408, "{}", head.text);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(proxy.metric("veilgate_refusals_total{reason=\"header_timeout\"}").await, 1.0);
    still_serves(&proxy, &origin).await;
}

#[tokio::test]
async fn unresolvable_names_and_refused_ports_get_502() {
    let origin = Origin::echo().await;
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let proxy = TestProxy::start(&loopback_policy(&[origin.port(), closed_port])).await;
    let (head, _) = connect_via(proxy.addr, &format!("nothing.invalid:{}", origin.port())).await;
    assert_eq!(head.status, 502, "{}", head.text);
    let (head, _) = connect_via(proxy.addr, &format!("127.0.0.1:{closed_port}")).await;
    assert_eq!(head.status, 502, "{}", head.text);
    assert_eq!(proxy.metric("veilgate_refusals_total{reason=\"dns_failed\"}").await, 1.0);
    assert_eq!(proxy.metric("veilgate_refusals_total{reason=\"upstream_failed\"}").await, 1.0);
    still_serves(&proxy, &origin).await;
}

#[tokio::test]
async fn static_dns_entries_resolve_without_a_query() {
    let origin = Origin::echo().await;
    let toml = format!("[dns.hosts]\n\"origin.test\" = \"127.0.0.1\"\n{}", loopback_policy(&[origin.port()]));
    let proxy = TestProxy::start(&toml).await;
    let (head, _) = connect_via(proxy.addr, &format!("Origin.TEST.:{}", origin.port())).await;
    assert_eq!(head.status, 200, "{}", head.text);
}

#[tokio::test]
async fn a_connect_that_never_completes_gets_504() {
    // A listener that never accepts, with its backlog full: further SYNs are dropped.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.connect(&addr.into());
        fillers.push(s);
    }
    // A filler whose handshake completed sits in the accept queue; with a backlog of 0 that
    // one makes it full.
    eventually(
        "the listener's accept queue to fill",
        async || fillers.iter().filter(|s| s.peer_addr().is_ok()).count(),
        |established| *established >= 1,
    )
    .await;
    let toml = format!("[server]\nconnect_timeout = \"500ms\"\n{}", loopback_policy(&[addr.port()]));
    let proxy = TestProxy::start(&toml).await;
    let started = Instant::now();
    let (head, _) = connect_via(proxy.addr, &addr.to_string()).await;
    assert_eq!(head.status, 504, "{}", head.text);
    assert!(started.elapsed() >= Duration::from_millis(450));
    drop(fillers);
}

#[tokio::test]
async fn private_and_loopback_targets_are_denied_in_every_spelling() {
    let origin = Origin::echo().await;
    let p = origin.port();
    let proxy = TestProxy::start(&format!("[policy]\nallowed_ports = [{p}]\n")).await;
    for host in [
        "127.0.0.1",
        "127.1",
        "2130706433",
        "0x7f000001",
        "0177.0.0.1",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "localhost",
        "LocalHost.",
        "foo.localhost",
        "0.0.0.0",
        "0",
    ] {
        let (head, _) = connect_via(proxy.addr, &format!("{host}:{p}")).await;
        assert_eq!(head.status, 403, "{host} -> {}", head.text);
    }
    assert_eq!(origin.connections(), 0, "the origin saw nothing");
    assert_eq!(proxy.metric("veilgate_refusals_total{reason=\"address_denied\"}").await, 13.0);
}

#[tokio::test]
async fn ports_and_hosts_outside_the_policy_are_denied() {
    let origin = Origin::echo().await;
    let p = origin.port();
    let toml = format!(
        "[policy]\ndeny_private = false\nallowed_ports = [{p}]\ndeny_hosts = [\"*.blocked.test\"]\n\
         [dns.hosts]\n\"a.blocked.test\" = \"127.0.0.1\"\n\"fine.test\" = \"127.0.0.1\"\n"
    );
    let proxy = TestProxy::start(&toml).await;
    let (head, _) = connect_via(proxy.addr, &format!("127.0.0.1:{}", p.wrapping_add(1).max(1))).await;
    assert_eq!(head.status, 403);
    let (head, _) = connect_via(proxy.addr, &format!("a.blocked.test:{p}")).await;
    assert_eq!(head.status, 403);
    let (head, _) = connect_via(proxy.addr, &format!("fine.test:{p}")).await;
    assert_eq!(head.status, 200);
    assert_eq!(origin.connections(), 1);
    assert_eq!(proxy.metric("veilgate_refusals_total{reason=\"port_denied\"}").await, 1.0);
    assert_eq!(proxy.metric("veilgate_refusals_total{reason=\"host_denied\"}").await, 1.0);
}

#[tokio::test]
async fn a_name_resolving_to_a_denied_address_is_denied_after_dns() {
    let origin = Origin::echo().await;
    let p = origin.port();
    // Names pass the pre-DNS check; the address they resolve to is checked again.
    let toml = format!("[policy]\nallowed_ports = [{p}]\n[dns.hosts]\n\"rebind.test\" = [\"127.0.0.1\", \"::1\"]\n");
    let proxy = TestProxy::start(&toml).await;
    let (head, _) = connect_via(proxy.addr, &format!("rebind.test:{p}")).await;
    assert_eq!(head.status, 403);
    assert_eq!(origin.connections(), 0);
}

#[tokio::test]
async fn the_proxy_never_dials_itself() {
    let proxy = TestProxy::start("[policy]\ndeny_private = false\nallowed_ports = [\"1-65535\"]\n").await;
    let (head, _) = connect_via(proxy.addr, &proxy.addr.to_string()).await;
    assert_eq!(head.status, 403, "{}", head.text);
    let (head, _) = connect_via(proxy.addr, &proxy.admin.unwrap().to_string()).await;
    assert_eq!(head.status, 403, "{}", head.text);
}

#[tokio::test]
async fn route_deny_gets_403() {
    let origin = Origin::echo().await;
    let p = origin.port();
    let toml = format!(
        "{}[dns.hosts]\n\"no.test\" = \"127.0.0.1\"\n[[routes]]\nhosts = [\"no.test\"]\nmode = \"deny\"\n",
        loopback_policy(&[p])
    );
    let proxy = TestProxy::start(&toml).await;
    let (head, _) = connect_via(proxy.addr, &format!("no.test:{p}")).await;
    assert_eq!(head.status, 403);
    assert_eq!(proxy.metric("veilgate_refusals_total{reason=\"route_denied\"}").await, 1.0);
    assert_eq!(origin.connections(), 0);
}
