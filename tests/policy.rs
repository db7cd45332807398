//! Destination policy meets every spelling of an address the same way, and the proxy can
//! never be pointed at itself.

mod common;

use common::*;
use tokio::io::AsyncWriteExt;

/// Every way a client can write 127.0.0.1 in a CONNECT target that the dialler connects to
/// 127.0.0.1 with.
const SPELLINGS: [&str; 8] = [
    "127.0.0.1",
    "127.1",
    "0x7f000001",
    "2130706433",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[0:0:0:0:0:ffff:7f00:1]",
    "[::FFFF:127.0.0.1]",
];

/// CONNECT `spelling:port`: the status, and the tunnel when it was established.
async fn through(proxy: &TestProxy, spelling: &str, port: u16) -> (u16, Option<tokio::net::TcpStream>) {
    let (head, s) = connect_via(proxy.addr, &format!("{spelling}:{port}")).await;
    (head.status, (head.status == 200).then_some(s))
}

#[tokio::test]
async fn every_spelling_of_one_address_meets_the_same_host_rules() {
    let origin = Origin::echo().await;
    let p = origin.port();
    // (rules, expected status for every spelling)
    let cases = [
        (format!("deny_hosts = [\"127.0.0.1\"]\nallow_cidrs = [\"127.0.0.1/32\"]\nallowed_ports = [{p}]\n"), 403),
        (format!("deny_hosts = [\"::ffff:127.0.0.1\"]\ndeny_private = false\nallowed_ports = [{p}]\n"), 403),
        (format!("allow_hosts = [\"127.0.0.1\"]\ndeny_private = false\nallowed_ports = [{p}]\n"), 200),
        (format!("allow_hosts = [\"other.test\"]\ndeny_private = false\nallowed_ports = [{p}]\n"), 403),
    ];
    for (rules, want) in cases {
        let proxy = TestProxy::start(&format!("[policy]\n{rules}")).await;
        for spelling in SPELLINGS {
            let (status, _) = through(&proxy, spelling, p).await;
            assert_eq!(status, want, "{spelling} under\n{rules}");
        }
        if want == 403 {
            assert_eq!(
                proxy.metric("veilgate_refusals_total{reason=\"host_denied\"}").await,
                SPELLINGS.len() as f64,
                "{rules}"
            );
        }
    }
}

#[tokio::test]
async fn every_spelling_of_one_address_takes_the_same_route() {
    let origin = Origin::echo().await;
    let p = origin.port();
    let proxy =
        TestProxy::start(&format!("{}[[routes]]\nhosts = [\"127.0.0.1\"]\nmode = \"deny\"\n", loopback_policy(&[p])))
            .await;
    for spelling in SPELLINGS {
        assert_eq!(through(&proxy, spelling, p).await.0, 403, "{spelling}");
    }
    assert_eq!(proxy.metric("veilgate_refusals_total{reason=\"route_denied\"}").await, SPELLINGS.len() as f64);
    assert_eq!(origin.connections(), 0, "a denied route never dials");
}

#[tokio::test]
async fn every_spelling_of_an_intercepted_address_is_intercepted() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let (ca_cert, ca_key) = veilgate::mitm::ca::init(&dir.path().join("ca")).unwrap();
    let (origin, slot) = Origin::recording().await;
    let p = origin.port();
    let mitm = format!(
        "[mitm]\nca_cert = \"{}\"\nca_key = \"{}\"\nupstream_roots = \"{}\"\n",
        ca_cert.display(),
        ca_key.display(),
        ca_cert.display()
    );
    let route = "[[routes]]\nhosts = [\"127.0.0.1\"]\nmode = \"mitm\"\n";
    let proxy = TestProxy::start(&format!("{}{route}{mitm}", loopback_policy(&[p]))).await;
    // Plain bytes after the 200: a blind tunnel hands them to the origin; an interception
    // wants a ClientHello, fails its handshake and the origin receives nothing.
    for spelling in SPELLINGS {
        let (status, s) = through(&proxy, spelling, p).await;
        assert_eq!(status, 200, "{spelling}");
        let mut s = s.unwrap();
        s.write_all(b"hello, not TLS\r\n\r\n").await.unwrap();
        let _ = s.shutdown().await;
        drop(s);
        assert_eq!(filled(&slot).await, b"", "{spelling} was relayed blind past a mitm route");
    }
    assert_eq!(proxy.metric("veilgate_tunnels_total{mode=\"mitm\",outcome=\"tls_failed\"}").await, 8.0);
    // The control: a spelling no route names is a blind tunnel, and the origin gets the bytes.
    let proxy = TestProxy::start(&format!("{}{mitm}", loopback_policy(&[p]))).await;
    let (status, s) = through(&proxy, "[::ffff:127.0.0.1]", p).await;
    assert_eq!(status, 200);
    let mut s = s.unwrap();
    s.write_all(b"hello").await.unwrap();
    let _ = s.shutdown().await;
    assert_eq!(filled(&slot).await, b"hello");
}

#[tokio::test]
async fn the_unspecified_address_never_reaches_the_proxy_itself() {
    // Every port and no private-range rule: nothing but the self-dial rule stands in the way.
    let proxy = TestProxy::start("[policy]\ndeny_private = false\nallowed_ports = [\"1-65535\"]\n").await;
    let admin = proxy.admin.unwrap().port();
    let own = proxy.addr.port();
    let mut n = 0.0;
    for port in [admin, own] {
        for host in ["0.0.0.0", "0", "0.0.0.1", "[::]", "[0::0]", "[::ffff:0.0.0.0]", "[::ffff:0:0.0.0.0]"] {
            let (head, _) = connect_via(proxy.addr, &format!("{host}:{port}")).await;
            assert_eq!(head.status, 403, "{host}:{port}: {}", head.text);
            n += 1.0;
        }
    }
    assert_eq!(proxy.metric("veilgate_refusals_total{reason=\"address_denied\"}").await, n);
    assert_eq!(proxy.controller.active_tunnels(), 0);
}
