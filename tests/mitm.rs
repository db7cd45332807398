//! MITM routes: minted leaves, SNI checks, verified upstreams, observation, and the probe's
//! three verdicts, all against local TLS origins.

mod common;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use common::tls::{RecordingOrigin, TestPki};
use common::*;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsConnector;

struct Setup {
    _dir: tempfile::TempDir,
    ca_cert: PathBuf,
    origin_ca: PathBuf,
    origin_pki: TestPki,
}

fn setup() -> Setup {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let (ca_cert, _) = veilgate::mitm::ca::init(&dir.path().join("ca")).unwrap();
    let origin_pki = TestPki::new();
    let origin_ca = dir.path().join("origin-ca.pem");
    std::fs::write(&origin_ca, &origin_pki.ca_pem).unwrap();
    Setup { _dir: dir, ca_cert, origin_ca, origin_pki }
}

fn mitm_config(s: &Setup, port: u16, roots: &std::path::Path, mitm_hosts: &str) -> String {
    let key = s.ca_cert.with_file_name("veilgate-ca.key");
    format!(
        "{}[dns.hosts]\n\"wrong.test\" = \"127.0.0.1\"\n\
         [[routes]]\nhosts = [{mitm_hosts}]\nmode = \"mitm\"\n\
         [mitm]\nca_cert = \"{}\"\nca_key = \"{}\"\nupstream_roots = \"{}\"\n",
        loopback_policy(&[port]),
        s.ca_cert.display(),
        key.display(),
        roots.display()
    )
}

fn roots_from(paths: &[&std::path::Path]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for p in paths {
        for c in veilgate::mitm::ca::read_pem_certs(p).unwrap() {
            roots.add(c).unwrap();
        }
    }
    let mut cfg = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// CONNECT `target` through the proxy, then TLS with `sni` under `cfg`.
async fn tls_via(
    proxy: SocketAddr,
    target: &str,
    sni: ServerName<'static>,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let (head, s) = connect_via(proxy, target).await;
    assert_eq!(head.status, 200, "{}", head.text);
    bounded(TlsConnector::from(cfg).connect(sni, s)).await
}

fn leaf(tls: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
}

fn localhost() -> ServerName<'static> {
    ServerName::try_from("localhost").unwrap()
}

/// Captures log lines written while `f` runs (current-thread runtime: the proxy's tasks run here).
fn capture() -> (tracing::subscriber::DefaultGuard, Arc<Mutex<Vec<u8>>>) {
    #[derive(Clone)]
    struct W(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for W {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            std::io::Write::write(&mut *self.0.lock().unwrap(), b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Arc::new(Mutex::new(Vec::new()));
    let w = W(Arc::clone(&buf));
    let sub = tracing_subscriber::fmt().with_ansi(false).with_writer(move || w.clone()).finish();
    (tracing::subscriber::set_default(sub), buf)
}

/// One test of this file at a time. tracing's callsites (and their cached interest) are shared
/// by every thread of the test binary, and a test capturing this thread's log lines missed
/// some while another test reached the same callsites with no subscriber.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    // tokio's: each test has a runtime of its own, and this guard is held across awaits.
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

#[tokio::test]
async fn trusted_clients_get_a_minted_leaf_and_requests_are_observed() {
    let _serial = serial().await;
    let s = setup();
    let origin = RecordingOrigin::start(&s.origin_pki).await;
    let port = origin.addr.port();
    let (_guard, logs) = capture();
    let proxy = TestProxy::start(&mitm_config(&s, port, &s.origin_ca, "\"localhost\"")).await;
    let mut tls =
        tls_via(proxy.addr, &format!("localhost:{port}"), localhost(), roots_from(&[&s.ca_cert])).await.unwrap();
    let cert = leaf(&tls);
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).unwrap();
    assert!(parsed.issuer().to_string().contains("veilgate interception CA"), "{}", parsed.issuer());
    let san = parsed.subject_alternative_name().unwrap().unwrap().value.general_names.clone();
    assert_eq!(format!("{san:?}"), "[DNSName(\"localhost\")]");
    assert!(parsed.validity().time_to_expiration().unwrap().whole_days() <= 30);
    // Two pipelined requests; the origin must get exactly these bytes.
    let requests = b"GET /a?token=secret HTTP/1.1\r\nHost: localhost\r\n\r\nGET /b HTTP/1.1\r\nHost: localhost\r\n\r\n";
    tls.write_all(requests).await.unwrap();
    let mut got = vec![0u8; 2 * 82];
    bounded(tls.read_exact(&mut got)).await.unwrap();
    assert!(String::from_utf8_lossy(&got).ends_with("hello"));
    tls.shutdown().await.unwrap();
    let mut rest = Vec::new();
    bounded(tls.read_to_end(&mut rest)).await.unwrap();
    assert!(rest.is_empty());
    eventually("the tunnel to end", async || proxy.controller.active_tunnels(), |n| *n == 0).await;
    assert_eq!(origin.received.lock().unwrap().as_slice(), requests, "byte for byte, nothing added");
    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    let observed: Vec<&str> = text.lines().filter(|l| l.contains("http exchange")).collect();
    assert_eq!(observed.len(), 2, "{text}");
    assert!(
        observed[0].contains("method=\"GET\"")
            && observed[0].contains("host=\"localhost\"")
            && observed[0].contains("path=\"/a\"")
            && observed[0].contains("status=200"),
        "client-sent values are quoted: {text}"
    );
    assert!(!text.contains("secret"), "query strings are not logged by default");
    assert_eq!(proxy.metric("veilgate_mitm_certs_minted_total").await, 1.0);
    assert_eq!(proxy.metric("veilgate_tunnels_total{mode=\"mitm\",outcome=\"closed\"}").await, 1.0);
    assert!(proxy.metric("veilgate_tunnel_bytes_total{mode=\"mitm\",direction=\"up\"}").await == requests.len() as f64);
    // A second tunnel to the same host reuses the cached leaf.
    let again =
        tls_via(proxy.addr, &format!("localhost:{port}"), localhost(), roots_from(&[&s.ca_cert])).await.unwrap();
    assert_eq!(leaf(&again), cert);
    assert_eq!(proxy.metric("veilgate_mitm_cert_cache_hits_total").await, 1.0);
}

#[tokio::test]
async fn clients_that_do_not_trust_the_ca_fail_and_tunnel_routes_stay_blind() {
    let _serial = serial().await;
    let s = setup();
    let origin = RecordingOrigin::start(&s.origin_pki).await;
    let port = origin.addr.port();
    // mitm for localhost only; 127.0.0.1 is tunnelled.
    let proxy = TestProxy::start(&mitm_config(&s, port, &s.origin_ca, "\"localhost\"")).await;
    let err = tls_via(proxy.addr, &format!("localhost:{port}"), localhost(), roots_from(&[&s.origin_ca])).await;
    assert!(err.is_err(), "a client that trusts only the real CA rejects the minted leaf");
    let ip = ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
    let blind = tls_via(proxy.addr, &format!("127.0.0.1:{port}"), ip, roots_from(&[&s.origin_ca])).await.unwrap();
    assert_eq!(leaf(&blind), s.origin_pki.leaf_chain[0], "the tunnel shows the origin's own certificate");
}

#[tokio::test]
async fn ip_literal_targets_get_an_ip_san() {
    let _serial = serial().await;
    let s = setup();
    let origin = RecordingOrigin::start(&s.origin_pki).await;
    let port = origin.addr.port();
    let proxy = TestProxy::start(&mitm_config(&s, port, &s.origin_ca, "\"127.0.0.1\"")).await;
    let ip = ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
    let tls = tls_via(proxy.addr, &format!("127.0.0.1:{port}"), ip, roots_from(&[&s.ca_cert])).await.unwrap();
    let cert = leaf(&tls);
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).unwrap();
    let san = parsed.subject_alternative_name().unwrap().unwrap().value.general_names.clone();
    assert_eq!(format!("{san:?}"), "[IPAddress([127, 0, 0, 1])]");
}

#[tokio::test]
async fn sni_must_name_the_connect_host() {
    let _serial = serial().await;
    let s = setup();
    let origin = RecordingOrigin::start(&s.origin_pki).await;
    let port = origin.addr.port();
    let proxy = TestProxy::start(&mitm_config(&s, port, &s.origin_ca, "\"localhost\"")).await;
    let other = ServerName::try_from("elsewhere.test").unwrap();
    let r = tls_via(proxy.addr, &format!("localhost:{port}"), other, roots_from(&[&s.ca_cert])).await;
    assert!(r.is_err());
    assert_eq!(proxy.metric("veilgate_tls_handshake_failures_total{side=\"client\"}").await, 1.0);
    assert_eq!(proxy.metric("veilgate_tunnels_total{mode=\"mitm\",outcome=\"tls_failed\"}").await, 1.0);
    assert!(origin.received.lock().unwrap().is_empty());
}

#[tokio::test]
async fn untrusted_or_wrong_name_upstreams_fail_the_client_too() {
    let _serial = serial().await;
    let s = setup();
    let origin = RecordingOrigin::start(&s.origin_pki).await;
    let port = origin.addr.port();
    // Upstream roots that do not include the origin's CA: its certificate is as good as self-signed.
    let stranger = TestPki::new();
    let stranger_ca = s._dir.path().join("stranger.pem");
    std::fs::write(&stranger_ca, &stranger.ca_pem).unwrap();
    let proxy = TestProxy::start(&mitm_config(&s, port, &stranger_ca, "\"localhost\", \"wrong.test\"")).await;
    let r = tls_via(proxy.addr, &format!("localhost:{port}"), localhost(), roots_from(&[&s.ca_cert])).await;
    assert!(r.is_err(), "an untrusted upstream is never turned into a trusted leaf");
    drop(proxy);
    // Trusted CA, but the certificate does not name the host.
    let proxy = TestProxy::start(&mitm_config(&s, port, &s.origin_ca, "\"localhost\", \"wrong.test\"")).await;
    let wrong = ServerName::try_from("wrong.test").unwrap();
    let r = tls_via(proxy.addr, &format!("wrong.test:{port}"), wrong, roots_from(&[&s.ca_cert])).await;
    assert!(r.is_err(), "a wrong-name upstream fails the client's handshake");
    assert_eq!(proxy.metric("veilgate_tls_handshake_failures_total{side=\"upstream\"}").await, 1.0);
    assert_eq!(proxy.metric("veilgate_mitm_certs_minted_total").await, 0.0);
}

#[tokio::test]
async fn the_probe_gives_each_verdict() {
    let _serial = serial().await;
    use veilgate::probe::{Verdict, probe};
    let s = setup();
    let origin = RecordingOrigin::start(&s.origin_pki).await;
    let port = origin.addr.port();
    let proxy = TestProxy::start(&mitm_config(&s, port, &s.origin_ca, "\"localhost\"")).await;
    let both = s._dir.path().join("both.pem");
    let mut f = std::fs::File::create(&both).unwrap();
    f.write_all(s.origin_pki.ca_pem.as_bytes()).unwrap();
    f.write_all(std::fs::read(&s.ca_cert).unwrap().as_slice()).unwrap();
    let p = format!("http://{}", proxy.addr);
    let blind = bounded(probe(&p, &format!("https://127.0.0.1:{port}"), Some(&s.origin_ca))).await.unwrap();
    assert_eq!(blind.verdict(), Verdict::BlindTunnel, "{}", blind.render());
    assert_eq!(blind.hsts.as_deref(), Some("max-age=60"));
    let trusted = bounded(probe(&p, &format!("https://localhost:{port}/"), Some(&both))).await.unwrap();
    assert_eq!(trusted.verdict(), Verdict::InterceptedTrusted, "{}", trusted.render());
    let rejected = bounded(probe(&p, &format!("https://localhost:{port}"), Some(&s.origin_ca))).await.unwrap();
    assert_eq!(rejected.verdict(), Verdict::InterceptedRejected, "{}", rejected.render());
    assert!(rejected.render().contains("NOT verified"));
    // The binary's exit codes: 3 intercepted, 0 blind, 2 error.
    let run = |origin: String, ca: &std::path::Path| {
        let (p, ca) = (p.clone(), ca.to_path_buf());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_veilgate"))
                .args(["probe", "--proxy", &p, &origin, "--ca-file"])
                .arg(ca)
                .output()
                .unwrap()
        })
    };
    let out = bounded(run(format!("https://localhost:{port}"), &both)).await.unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stdout));
    let out = bounded(run(format!("https://127.0.0.1:{port}"), &s.origin_ca)).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    let out = bounded(run("http://not-https".into(), &s.origin_ca)).await.unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn a_ca_key_others_can_read_is_refused_at_start() {
    let _serial = serial().await;
    use std::os::unix::fs::PermissionsExt;
    let s = setup();
    let key = s.ca_cert.with_file_name("veilgate-ca.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let mut config = test_config(&mitm_config(&s, 443, &s.origin_ca, "\"localhost\""));
    config.server.admin_listen = None;
    let err = veilgate::Proxy::bind(config).await.err().expect("refused");
    assert!(err.to_string().contains("readable by group or others"), "{err}");
}

#[tokio::test]
async fn a_large_response_to_a_slow_reader_is_not_held_back() {
    let _serial = serial().await;
    // A keep-alive origin sends 4 MiB and waits for the next request; the client starts
    // reading late, so the proxy's writes to it block part-way. Every byte must still arrive
    // (encrypted records must not sit unflushed in the proxy's TLS writer).
    const BODY: usize = 4 << 20;
    let s = setup();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(s.origin_pki.server_config());
    let origin = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = tls.read(&mut buf).await;
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n");
        tls.write_all(head.as_bytes()).await.unwrap();
        tls.write_all(&vec![b'z'; BODY]).await.unwrap();
        tls.flush().await.unwrap();
        // Keep the connection open, as a keep-alive origin does.
        let _ = tls.read(&mut buf).await;
    });
    let proxy = TestProxy::start(&mitm_config(&s, addr.port(), &s.origin_ca, "\"localhost\"")).await;
    let mut tls = tls_via(proxy.addr, &format!("localhost:{}", addr.port()), localhost(), roots_from(&[&s.ca_cert]))
        .await
        .unwrap();
    tls.write_all(b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    // On purpose: the client is late to read, so the 4 MiB fill the socket buffers and the
    // proxy's writes block part-way; what is being tested is what happens after that.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let want = format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n").len() + BODY;
    let mut got = vec![0u8; want];
    bounded(tls.read_exact(&mut got)).await.unwrap();
    assert!(got.ends_with(b"zzzz"));
    origin.abort();
}

/// An HTTPS origin that answers one request with `reply` and then closes its TCP connection
/// without close_notify, as most servers do after a response.
async fn abrupt_origin(pki: &TestPki, reply: &'static [u8]) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config());
    let task = tokio::spawn(async move {
        let Ok((s, _)) = listener.accept().await else { return };
        let Ok(mut tls) = acceptor.accept(s).await else { return };
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        tls.write_all(reply).await.unwrap();
        tls.flush().await.unwrap();
        // The TCP connection alone is closed: no close_notify.
        let (mut tcp, _) = tls.into_inner();
        let _ = tcp.shutdown().await;
    });
    (addr, task)
}

/// One request through a MITM route to an origin that sends `reply` and closes abruptly; the
/// tunnel's outcome as counted.
async fn outcome_after_abrupt_close(reply: &'static [u8]) -> (f64, f64) {
    let s = setup();
    let (addr, origin) = abrupt_origin(&s.origin_pki, reply).await;
    let port = addr.port();
    let proxy = TestProxy::start(&mitm_config(&s, port, &s.origin_ca, "\"localhost\"")).await;
    let mut tls =
        tls_via(proxy.addr, &format!("localhost:{port}"), localhost(), roots_from(&[&s.ca_cert])).await.unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    // Until the proxy closes (cleanly or not); what arrived is checked by the caller's metric.
    let _ = bounded(tls.read_to_end(&mut got)).await;
    assert!(got.starts_with(b"HTTP/1.1 200 OK"), "{}", String::from_utf8_lossy(&got));
    drop(tls);
    eventually("the tunnel to end", async || proxy.controller.active_tunnels(), |n| *n == 0).await;
    origin.abort();
    (
        proxy.metric("veilgate_tunnels_total{mode=\"mitm\",outcome=\"closed\"}").await,
        proxy.metric("veilgate_tunnels_total{mode=\"mitm\",outcome=\"error\"}").await,
    )
}

#[tokio::test]
async fn an_origin_closing_without_close_notify_after_a_complete_response_is_closed() {
    let _serial = serial().await;
    let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
    assert_eq!(outcome_after_abrupt_close(reply).await, (1.0, 0.0), "(closed, error)");
}

#[tokio::test]
async fn an_origin_closing_without_close_notify_inside_a_body_is_an_error() {
    let _serial = serial().await;
    let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello";
    assert_eq!(outcome_after_abrupt_close(reply).await, (0.0, 1.0), "(closed, error)");
}
