//! The HTTPS proxy listener (`server.tls_listen`): CONNECT inside TLS, the wrong protocol on
//! either port said plainly, credentials only under TLS, and the pair reloaded.

mod common;

use std::net::IpAddr;
use std::path::Path;

use common::tls::TestPki;
use common::*;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn tls_front(pki: &TestPki) -> Front {
    Front::Tls { config: pki.client_config(), name: ServerName::try_from("localhost").unwrap() }
}

#[tokio::test]
async fn connect_inside_tls_relays_exact_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let origin = Origin::echo().await;
    let proxy = TestProxy::start(&pki.listener_config(dir.path(), origin.port(), "")).await;
    let (head, mut client) =
        connect_over(&tls_front(&pki), proxy.tls[0], None, &format!("127.0.0.1:{}", origin.port())).await;
    assert_eq!(head.status, 200);
    let payload = pattern(256 * 1024, 7);
    let mut back = vec![0u8; payload.len()];
    bounded(async {
        let (mut r, mut w) = tokio::io::split(&mut client);
        let send = async {
            w.write_all(&payload).await.unwrap();
            w.flush().await.unwrap();
        };
        let recv = async { r.read_exact(&mut back).await.unwrap() };
        tokio::join!(send, recv);
    })
    .await;
    assert!(back == payload, "the echo came back byte for byte through TLS");
    // The plaintext listener still serves, on its own port.
    let (head, _s) = connect_via(proxy.addr, &format!("127.0.0.1:{}", origin.port())).await;
    assert_eq!(head.status, 200);
}

#[tokio::test]
async fn plaintext_on_the_tls_port_gets_a_readable_400() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let proxy = TestProxy::start(&pki.listener_config(dir.path(), 9, "")).await;
    let reply = raw_exchange(proxy.tls[0], b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 400 "), "{reply}");
    assert!(reply.contains("https://"), "the answer says what to do: {reply}");
    assert_eq!(proxy.metric("veilgate_refusals_total{reason=\"plaintext_on_tls\"}").await, 1.0);
}

#[tokio::test]
async fn tls_on_the_plaintext_port_is_refused_at_once_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let proxy = TestProxy::start(&pki.listener_config(dir.path(), 9, "")).await;
    let started = std::time::Instant::now();
    let opened = Client::open(proxy.addr, None, &tls_front(&pki)).await;
    assert!(opened.is_err(), "a TLS client cannot handshake with the plaintext listener");
    // At once, not at header_timeout (10 s): a ClientHello holds no line end to wait for.
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "took {:?}", started.elapsed());
    assert_eq!(proxy.metric("veilgate_refusals_total{reason=\"tls_on_plaintext\"}").await, 1.0);
}

#[tokio::test]
async fn a_failed_handshake_is_counted_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let origin = Origin::echo().await;
    let proxy = TestProxy::start(&pki.listener_config(dir.path(), origin.port(), "")).await;
    // A client that trusts another CA gives up on the certificate.
    let stranger = TestPki::new();
    assert!(Client::open(proxy.tls[0], None, &tls_front(&stranger)).await.is_err());
    eventually(
        "the failed handshake is counted",
        || proxy.metric("veilgate_refusals_total{reason=\"tls_handshake_failed\"}"),
        |v| *v == 1.0,
    )
    .await;
    let (head, _c) = connect_over(&tls_front(&pki), proxy.tls[0], None, &format!("127.0.0.1:{}", origin.port())).await;
    assert_eq!(head.status, 200);
}

#[tokio::test]
async fn require_tls_keeps_credentials_off_the_plaintext_listener() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let origin = Origin::echo().await;
    let users = htpasswd(dir.path(), &[("alice", "secret", FAST_COST)]);
    let auth = format!("[auth]\ncredentials_file = \"{}\"\nrequire_tls = true\n", users.display());
    let proxy = TestProxy::start(&pki.listener_config(dir.path(), origin.port(), &auth)).await;
    let target = format!("127.0.0.1:{}", origin.port());
    for credentials in [None, Some("alice:secret")] {
        let mut plain = Client::open(proxy.addr, None, &Front::Plain).await.unwrap();
        let head = plain.connect_as(&target, credentials).await;
        assert_eq!(head.status, 403, "plaintext, credentials {credentials:?}");
        assert_eq!(head.header("proxy-authenticate"), None, "no challenge in the clear");
    }
    assert_eq!(proxy.metric("veilgate_refusals_total{reason=\"tls_required\"}").await, 2.0);
    let mut tls = Client::open(proxy.tls[0], None, &tls_front(&pki)).await.unwrap();
    assert_eq!(tls.connect_as(&target, None).await.status, 407, "inside TLS the challenge is sent");
    let mut tls = Client::open(proxy.tls[0], None, &tls_front(&pki)).await.unwrap();
    assert_eq!(tls.connect_as(&target, Some("alice:secret")).await.status, 200);
}

#[tokio::test]
async fn a_reload_serves_the_new_pair_and_a_bad_one_keeps_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let first = TestPki::new();
    let origin = Origin::echo().await;
    let text = first.listener_config(dir.path(), origin.port(), "");
    let proxy = TestProxy::start(&text).await;
    let target = format!("127.0.0.1:{}", origin.port());
    let (head, mut held) = connect_over(&tls_front(&first), proxy.tls[0], None, &target).await;
    assert_eq!(head.status, 200);

    let second = TestPki::new();
    second.write_pair(dir.path());
    proxy.controller.reload(test_config(&text)).expect("the new pair loads");
    assert!(Client::open(proxy.tls[0], None, &tls_front(&first)).await.is_err(), "the old certificate is gone");
    let (head, _c) = connect_over(&tls_front(&second), proxy.tls[0], None, &target).await;
    assert_eq!(head.status, 200);
    // The tunnel opened under the old pair runs on.
    bounded(async {
        held.write_all(b"still here").await.unwrap();
        held.flush().await.unwrap();
        let mut back = [0u8; 10];
        held.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"still here");
    })
    .await;

    // A key that is not a key: the reload fails, and the second pair stays in service.
    let key = dir.path().join("proxy.key");
    std::fs::write(&key, "not a key").unwrap();
    let err = proxy.controller.reload(test_config(&text)).expect_err("a bad pair is refused");
    assert!(err.to_string().contains("proxy.key"), "{err}");
    let (head, _c) = connect_over(&tls_front(&second), proxy.tls[0], None, &target).await;
    assert_eq!(head.status, 200);
}

#[tokio::test]
async fn curl_speaks_to_the_https_proxy() {
    let Ok(version) = std::process::Command::new("curl").arg("--version").output() else {
        eprintln!("SKIPPED curl_speaks_to_the_https_proxy: curl is not installed");
        return;
    };
    if !String::from_utf8_lossy(&version.stdout).contains("HTTPS-proxy") {
        eprintln!("SKIPPED curl_speaks_to_the_https_proxy: this curl has no HTTPS-proxy feature");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let origin = Origin::spawn(|mut s| async move {
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\nthrough TLS\n").await;
    })
    .await;
    let proxy = TestProxy::start(&pki.listener_config(dir.path(), origin.port(), "")).await;
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    // `extra` curl flags; curl's answer body.
    let curl = async |extra: &[&str]| {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "10", "--proxytunnel"])
            .args(extra)
            .arg("--proxy-cacert")
            .arg(&ca)
            .arg("--proxy")
            .arg(format!("https://localhost:{}", proxy.tls[0].port()))
            .arg(format!("http://127.0.0.1:{}/", origin.port()))
            .output();
        let out = bounded(out).await.unwrap();
        assert!(out.status.success(), "curl {extra:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(curl(&[]).await, "through TLS\n");
    assert_eq!(proxy.metric("veilgate_tls_sessions_total{protocol=\"http/1.1\"}").await, 1.0);
    // HTTP/2 to the proxy: curl 8.1 and later.
    let help = std::process::Command::new("curl").args(["--help", "all"]).output().unwrap();
    if !String::from_utf8_lossy(&help.stdout).contains("--proxy-http2") {
        eprintln!(
            "SKIPPED the --proxy-http2 half of curl_speaks_to_the_https_proxy: this curl (before 8.1) has no --proxy-http2"
        );
        return;
    }
    assert_eq!(curl(&["--proxy-http2"]).await, "through TLS\n");
    assert_eq!(proxy.metric("veilgate_tls_sessions_total{protocol=\"h2\"}").await, 1.0);
}

fn as_client(pki: &TestPki, cn: &str) -> Front {
    Front::Tls { config: pki.client_config_as(cn), name: ServerName::try_from("localhost").unwrap() }
}

/// A TLS listener asking for client certificates of `pki`'s CA (`auth`: required or
/// optional), one tunnel per client, for an origin on `origin_port`.
fn client_cert_config(dir: &Path, pki: &TestPki, origin_port: u16, auth: &str) -> String {
    let ca = dir.join("clients-ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let (cert, key) = pki.write_pair(dir);
    format!(
        "[server]\ntls_listen = [\"127.0.0.1:0\"]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n\
         tls_client_ca = \"{}\"\ntls_client_auth = \"{auth}\"\n[limits.per_client]\nmax_tunnels = 1\n{}",
        cert.display(),
        key.display(),
        ca.display(),
        loopback_policy(&[origin_port])
    )
}

#[tokio::test]
async fn a_client_certificate_is_the_identity_limits_key_by() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let origin = Origin::echo().await;
    let text = client_cert_config(dir.path(), &pki, origin.port(), "required");
    let proxy = TestProxy::start(&text).await;
    let target = format!("127.0.0.1:{}", origin.port());
    let a: IpAddr = "127.0.0.2".parse().unwrap();
    let b: IpAddr = "127.0.0.3".parse().unwrap();
    // Carol from two addresses is one client: her second tunnel is over her cap.
    let (head, _carol) = connect_over(&as_client(&pki, "carol"), proxy.tls[0], Some(a), &target).await;
    assert_eq!(head.status, 200);
    let (head, _) = connect_over(&as_client(&pki, "carol"), proxy.tls[0], Some(b), &target).await;
    assert_eq!(head.status, 429, "carol is keyed by her certificate, not her address");
    // Dave, from carol's first address, is someone else.
    let (head, _dave) = connect_over(&as_client(&pki, "dave"), proxy.tls[0], Some(a), &target).await;
    assert_eq!(head.status, 200);
    // Required: no certificate, no session; a certificate from another CA neither.
    assert!(no_session(proxy.tls[0], &tls_front(&pki), &target).await, "no certificate");
    let stranger = TestPki::new();
    let forged =
        Front::Tls { config: stranger.client_config_as("carol"), name: ServerName::try_from("localhost").unwrap() };
    assert!(no_session(proxy.tls[0], &forged, &target).await, "a certificate of another CA");
    assert_eq!(proxy.metric("veilgate_refusals_total{reason=\"tls_handshake_failed\"}").await, 2.0);
}

/// Whether the listener refuses `front` a session. In TLS 1.3 the server judges the client's
/// certificate after the client has finished its side, so the refusal shows on first use.
async fn no_session(listener: std::net::SocketAddr, front: &Front, target: &str) -> bool {
    let Ok(mut c) = Client::open(listener, None, front).await else { return true };
    let req = format!("CONNECT {target} HTTP/1.1\r\n\r\n");
    if c.write_all(req.as_bytes()).await.is_err() || c.flush().await.is_err() {
        return true;
    }
    let mut buf = [0u8; 64];
    matches!(bounded(c.read(&mut buf)).await, Err(_) | Ok(0))
}

#[tokio::test]
async fn optional_client_certificates_serve_clients_without_one_by_address() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let origin = Origin::echo().await;
    let text = client_cert_config(dir.path(), &pki, origin.port(), "optional");
    let proxy = TestProxy::start(&text).await;
    let target = format!("127.0.0.1:{}", origin.port());
    let a: IpAddr = "127.0.0.2".parse().unwrap();
    let (head, _anon) = connect_over(&tls_front(&pki), proxy.tls[0], Some(a), &target).await;
    assert_eq!(head.status, 200, "no certificate: served");
    let (head, _) = connect_over(&tls_front(&pki), proxy.tls[0], Some(a), &target).await;
    assert_eq!(head.status, 429, "and keyed by its address");
    let (head, _carol) = connect_over(&as_client(&pki, "carol"), proxy.tls[0], Some(a), &target).await;
    assert_eq!(head.status, 200, "a certificate from the same address is its own client");
}

/// `veilgate probe --proxy https://...`: TLS to the proxy, CONNECT inside it, and the origin's
/// handshake inside that tunnel.
#[tokio::test]
async fn the_probe_speaks_to_the_https_proxy() {
    use common::tls::RecordingOrigin;
    use veilgate::probe::{Options, Verdict, probe_with};
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let origin = RecordingOrigin::start(&pki).await;
    let proxy = TestProxy::start(&pki.listener_config(dir.path(), origin.addr.port(), "")).await;
    let roots = dir.path().join("roots.pem");
    std::fs::write(&roots, &pki.ca_pem).unwrap();
    let opts = Options { proxy_ca: Some(roots.clone()), ..Options::default() };
    let via = format!("https://localhost:{}", proxy.tls[0].port());
    let target = format!("https://127.0.0.1:{}", origin.addr.port());
    let report = bounded(probe_with(&via, &target, Some(&roots), &opts)).await.unwrap();
    assert_eq!(report.verdict(), Verdict::BlindTunnel, "{}", report.render());
    // A proxy certificate the probe does not trust is an error, not a verdict.
    let err = bounded(probe_with(&via, &target, Some(&roots), &Options::default())).await.unwrap_err();
    assert!(err.to_string().contains("TLS handshake with the proxy"), "{err}");
}

/// A TCP relay in front of `to` that records every byte its clients send: what anyone on the
/// client's network would read.
async fn tap(to: std::net::SocketAddr) -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = std::sync::Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let record = std::sync::Arc::clone(&record);
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(to).await else { return };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = async {
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = cr.read(&mut buf).await {
                        record.lock().unwrap().extend_from_slice(&buf[..n]);
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = sw.shutdown().await;
                };
                tokio::join!(up, async {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                });
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn the_local_network_reads_targets_and_passwords_on_the_plaintext_listener_only() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let origin = Origin::echo().await;
    let htpasswd = htpasswd(dir.path(), &[("alice", "s3cret-pw", FAST_COST)]);
    let extra = format!(
        "[dns]\nhosts = {{ \"hidden-site.test\" = \"127.0.0.1\" }}\n[auth]\ncredentials_file = \"{}\"\n",
        htpasswd.display()
    );
    let proxy = TestProxy::start(&pki.listener_config(dir.path(), origin.port(), &extra)).await;
    let target = format!("hidden-site.test:{}", origin.port());
    let mut seen_by_network = Vec::new();
    for (front, listener) in [(Front::Plain, proxy.addr), (tls_front(&pki), proxy.tls[0])] {
        let (via, seen) = tap(listener).await;
        let mut client = Client::open(via, None, &front).await.expect("through the tap");
        let head = client.connect_as(&target, Some("alice:s3cret-pw")).await;
        assert_eq!(head.status, 200);
        client.write_all(b"the same session").await.unwrap();
        client.flush().await.unwrap();
        let mut back = [0u8; 16];
        bounded(client.read_exact(&mut back)).await.unwrap();
        assert_eq!(&back, b"the same session");
        let bytes = seen.lock().unwrap().clone();
        seen_by_network.push(String::from_utf8_lossy(&bytes).into_owned());
    }
    let basic = base64_basic("alice:s3cret-pw");
    let (plain, tls) = (&seen_by_network[0], &seen_by_network[1]);
    assert!(plain.contains("hidden-site.test") && plain.contains(&basic) && plain.contains("the same session"));
    for secret in ["hidden-site.test", &basic, "alice", "the same session"] {
        assert!(!tls.contains(secret), "the TLS listener's client bytes show {secret:?}");
    }
}

fn base64_basic(credentials: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(credentials)
}
