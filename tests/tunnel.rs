//! The blind tunnel: exact bytes, pipelined bytes, half-close, HTTP/1.0, IPv6, anonymity,
//! idle timeout, and a real curl through to a TLS origin.

mod common;

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const EIGHT_MIB: usize = 8 << 20;

#[tokio::test]
async fn exact_bytes_both_ways() {
    // The origin sends 8 MiB down while it reads 8 MiB up, and reports the hash of what it got.
    let down_data = Arc::new(pattern(EIGHT_MIB, 7));
    let up_hash = Arc::new(Mutex::new(None::<Vec<u8>>));
    let (d, h) = (Arc::clone(&down_data), Arc::clone(&up_hash));
    let origin = Origin::spawn(move |s| {
        let (d, h) = (Arc::clone(&d), Arc::clone(&h));
        async move {
            let (mut r, mut w) = s.into_split();
            let writer = tokio::spawn(async move {
                w.write_all(&d).await.unwrap();
                w.shutdown().await.unwrap();
            });
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            *h.lock().unwrap() = Some(Sha256::digest(&got).to_vec());
            writer.await.unwrap();
        }
    })
    .await;
    let proxy = TestProxy::start(&loopback_policy(&[origin.port()])).await;
    let (head, s) = connect_via(proxy.addr, &origin.addr.to_string()).await;
    assert_eq!(head.status, 200, "{}", head.text);
    assert_eq!(head.text, "HTTP/1.1 200 Connection Established\r\n\r\n");
    let up_data = pattern(EIGHT_MIB, 11);
    let (mut r, mut w) = s.into_split();
    let up = up_data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&up).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    bounded(r.read_to_end(&mut got)).await.unwrap();
    bounded(writer).await.unwrap();
    assert_eq!(got.len(), EIGHT_MIB);
    assert_eq!(Sha256::digest(&got), Sha256::digest(&*down_data), "downstream bytes differ");
    let origin_hash = filled(&up_hash).await;
    assert_eq!(origin_hash, Sha256::digest(&up_data).to_vec(), "upstream bytes differ");
    assert_eq!(proxy.metric("veilgate_tunnel_bytes_total{mode=\"tunnel\",direction=\"up\"}").await, EIGHT_MIB as f64);
}

#[tokio::test]
async fn bytes_pipelined_with_the_head_go_first() {
    let origin = Origin::echo().await;
    let proxy = TestProxy::start(&loopback_policy(&[origin.port()])).await;
    let mut s = dial_proxy(proxy.addr, None).await;
    let req = format!("CONNECT {} HTTP/1.1\r\nHost: x\r\n\r\n\x16\x03\x01hello-pipelined", origin.addr);
    s.write_all(req.as_bytes()).await.unwrap();
    let head = read_reply_head(&mut s).await;
    assert_eq!(head.status, 200);
    let mut buf = vec![0u8; 18];
    bounded(s.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"\x16\x03\x01hello-pipelined");
}

#[tokio::test]
async fn half_close_lets_the_origin_answer_after_eof() {
    let origin = Origin::spawn(|mut s| async move {
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        let reply = format!("got {} bytes after your EOF", got.len());
        s.write_all(reply.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
    })
    .await;
    let proxy = TestProxy::start(&loopback_policy(&[origin.port()])).await;
    let (head, mut s) = connect_via(proxy.addr, &origin.addr.to_string()).await;
    assert_eq!(head.status, 200);
    s.write_all(b"ping").await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = String::new();
    bounded(s.read_to_string(&mut out)).await.unwrap();
    assert_eq!(out, "got 4 bytes after your EOF");
}

#[tokio::test]
async fn http_1_0_connect_gets_a_1_0_reply() {
    let origin = Origin::echo().await;
    let proxy = TestProxy::start(&loopback_policy(&[origin.port()])).await;
    let mut s = dial_proxy(proxy.addr, None).await;
    s.write_all(format!("CONNECT {} HTTP/1.0\r\n\r\n", origin.addr).as_bytes()).await.unwrap();
    let head = read_reply_head(&mut s).await;
    assert_eq!(head.text, "HTTP/1.0 200 Connection Established\r\n\r\n");
    s.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    bounded(s.read_exact(&mut b)).await.unwrap();
    assert_eq!(&b, b"x");
}

#[tokio::test]
async fn ipv6_literal_target() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: this machine has no ::1");
        return;
    }
    let origin = Origin::spawn_on("[::1]:0", |mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await;
    let proxy = TestProxy::start(&loopback_policy(&[origin.port()])).await;
    let (head, mut s) = connect_via(proxy.addr, &format!("[::1]:{}", origin.port())).await;
    assert_eq!(head.status, 200, "{}", head.text);
    s.write_all(b"v6").await.unwrap();
    let mut b = [0u8; 2];
    bounded(s.read_exact(&mut b)).await.unwrap();
    assert_eq!(&b, b"v6");
}

#[tokio::test]
async fn origin_sees_the_proxy_and_nothing_of_the_head() {
    // The origin records every byte it receives; only the payload may arrive.
    let (origin, received) = Origin::recording().await;
    let proxy = TestProxy::start(&loopback_policy(&[origin.port()])).await;
    let client_ip: IpAddr = "127.0.0.5".parse().unwrap();
    let mut s = dial_proxy(proxy.addr, Some(client_ip)).await;
    let head = format!(
        "CONNECT {} HTTP/1.1\r\nHost: {0}\r\nProxy-Authorization: Basic dXNlcjpwYXNz\r\nUser-Agent: secret-agent/1.0\r\n\
         X-Forwarded-For: 10.9.8.7\r\nForwarded: for=10.9.8.7\r\nVia: 1.1 client\r\n\r\n",
        origin.addr
    );
    s.write_all(head.as_bytes()).await.unwrap();
    assert_eq!(read_reply_head(&mut s).await.status, 200);
    s.write_all(b"payload only").await.unwrap();
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    bounded(s.read_to_end(&mut rest)).await.unwrap();
    assert_eq!(filled(&received).await, b"payload only");
    let peers = origin.peers.lock().unwrap().clone();
    assert_eq!(peers.len(), 1);
    assert_ne!(peers[0].ip(), client_ip, "the origin must not see the client's address");
}

#[tokio::test]
async fn idle_tunnels_are_closed() {
    let origin = Origin::echo().await;
    let toml = format!("[server]\nidle_timeout = \"300ms\"\n{}", loopback_policy(&[origin.port()]));
    let proxy = TestProxy::start(&toml).await;
    let (head, mut s) = connect_via(proxy.addr, &origin.addr.to_string()).await;
    assert_eq!(head.status, 200);
    let started = Instant::now();
    let mut buf = [0u8; 8];
    // A clean close (FIN), not a reset: the proxy closes a socket it has fully read.
    let n = bounded(s.read(&mut buf)).await.expect("closed cleanly, not reset");
    assert_eq!(n, 0, "the proxy closes an idle tunnel");
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(proxy.metric("veilgate_tunnels_total{mode=\"tunnel\",outcome=\"idle_timeout\"}").await, 1.0);
}

#[tokio::test]
async fn real_curl_through_to_a_tls_origin() {
    let Ok(version) = std::process::Command::new("curl").arg("--version").output() else {
        eprintln!("skipped: curl is not installed");
        return;
    };
    assert!(version.status.success());
    let pki = tls::TestPki::new();
    let origin = tls::TlsOrigin::start(&pki, "hello through veilgate").await;
    let proxy = TestProxy::start(&loopback_policy(&[origin.addr.port()])).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let url = format!("https://localhost:{}/", origin.addr.port());
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-x", &format!("http://{}", proxy.addr), "--cacert"])
        .arg(&ca)
        .arg(&url)
        .output();
    let out = bounded(out).await.unwrap();
    assert!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello through veilgate");
}

/// Sends `byte` as TCP urgent data (`MSG_OOB`), waiting for room in the send buffer.
async fn send_urgent(s: &tokio::net::TcpStream, byte: u8) {
    loop {
        bounded(s.writable()).await.unwrap();
        match s.try_io(tokio::io::Interest::WRITABLE, || socket2::SockRef::from(s).send_out_of_band(&[byte])) {
            Ok(1) => return,
            Ok(n) => panic!("urgent send wrote {n} bytes"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => panic!("urgent send: {e}"),
        }
    }
}

#[tokio::test]
async fn urgent_data_in_a_bulk_direction_passes_as_ordinary_bytes() {
    // Linux stops splice(2) at the TCP urgent mark, and a relay that only splices would stall
    // there (or take the FIN behind it for the end of the stream). Each side sends 64 KiB, so
    // both directions are bulk, then one urgent byte and a tail: every byte must arrive, in
    // order, as ordinary data (the urgent flag is a property of one TCP hop, not of the bytes).
    const BULK: usize = 64 * 1024;
    let origin = Origin::spawn(|mut s| async move {
        let mut got = vec![0u8; BULK + 8];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..BULK], &pattern(BULK, 21)[..], "bulk bytes up");
        assert_eq!(&got[BULK..], b"!up-tail", "urgent byte and tail up");
        s.write_all(&pattern(BULK, 22)).await.unwrap();
        send_urgent(&s, b'!').await;
        s.write_all(b"down-tail").await.unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    })
    .await;
    let proxy = TestProxy::start(&loopback_policy(&[origin.port()])).await;
    let (head, mut s) = connect_via(proxy.addr, &origin.addr.to_string()).await;
    assert_eq!(head.status, 200, "{}", head.text);
    s.write_all(&pattern(BULK, 21)).await.unwrap();
    send_urgent(&s, b'!').await;
    s.write_all(b"up-tail").await.unwrap();
    let mut got = vec![0u8; BULK + 10];
    bounded(s.read_exact(&mut got)).await.unwrap();
    assert_eq!(&got[..BULK], &pattern(BULK, 22)[..], "bulk bytes down");
    assert_eq!(&got[BULK..], b"!down-tail", "urgent byte and tail down");
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    bounded(s.read_to_end(&mut rest)).await.unwrap();
    assert!(rest.is_empty(), "nothing after the tail");
    for (direction, want) in [("up", BULK + 8), ("down", BULK + 10)] {
        let series = format!("veilgate_tunnel_bytes_total{{mode=\"tunnel\",direction=\"{direction}\"}}");
        assert_eq!(proxy.metric(&series).await, want as f64, "{direction}");
    }
}

#[tokio::test]
async fn urgent_data_followed_by_the_end_of_the_stream_is_not_cut_off() {
    // When the relay reaches the urgent mark with the sender's FIN already queued behind it,
    // splice(2) says 0 (end of stream) rather than EAGAIN. A per-client bandwidth cap keeps
    // the relay behind the client, so the bulk, the urgent byte, the tail and the FIN are all
    // queued before it gets to the mark.
    const BULK: usize = 512 * 1024;
    let (origin, got) = Origin::recording().await;
    let toml = format!("[limits.per_client]\nbandwidth_up = \"8 MiB/s\"\n{}", loopback_policy(&[origin.port()]));
    let proxy = TestProxy::start(&toml).await;
    let (head, mut s) = connect_via(proxy.addr, &origin.addr.to_string()).await;
    assert_eq!(head.status, 200, "{}", head.text);
    s.write_all(&pattern(BULK, 31)).await.unwrap();
    send_urgent(&s, b'!').await;
    s.write_all(b"tail").await.unwrap();
    s.shutdown().await.unwrap();
    let all = filled(&got).await;
    assert_eq!(all.len(), BULK + 5, "every byte up to the FIN arrived");
    assert_eq!(&all[..BULK], &pattern(BULK, 31)[..]);
    assert_eq!(&all[BULK..], b"!tail");
}
