//! PROXY protocol inbound on the wire (`server.proxy_protocol = "required"`): the header's
//! source is the client for limits and the head-phase bounds; an untrusted peer, a missing,
//! malformed or late header is closed with no answer and counted; LOCAL is closed quietly;
//! headers split anyhow or sent with the CONNECT head work; everyone else keeps being served.
//! The last test puts a real HAProxy (`send-proxy-v2`) in front, when it is installed.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BALANCER: &str = "127.0.0.1";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A v1 header for a client at `src:sport`.
fn v1(src: &str, sport: u16) -> Vec<u8> {
    format!("PROXY TCP4 {src} 127.0.0.1 {sport} 8080\r\n").into_bytes()
}

/// A v2 header: `cmd` 1 = PROXY, 0 = LOCAL; TCP over IPv4 from `src:sport`.
fn v2(cmd: u8, src: &str, sport: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x20 | cmd, 0x11, 0, 12]);
    h.extend_from_slice(&src.parse::<Ipv4Addr>().unwrap().octets());
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&8080u16.to_be_bytes());
    h
}

fn connect_head(target: SocketAddr) -> Vec<u8> {
    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").into_bytes()
}

fn config(from: &str, extra: &str, ports: &[u16]) -> String {
    format!(
        "[server]\nproxy_protocol = \"required\"\nproxy_protocol_from = [\"{from}\"]\n{extra}\n{}",
        loopback_policy(ports)
    )
}

/// Connects from `from`, sends `header` and the CONNECT head in one write, reads the reply.
async fn tunnel_from(proxy: SocketAddr, from: &str, header: &[u8], target: SocketAddr) -> (ReplyHead, TcpStream) {
    let mut s = dial_proxy(proxy, Some(ip(from))).await;
    let mut bytes = header.to_vec();
    bytes.extend_from_slice(&connect_head(target));
    s.write_all(&bytes).await.unwrap();
    let head = read_reply_head(&mut s).await;
    (head, s)
}

async fn tunnel(proxy: SocketAddr, header: &[u8], target: SocketAddr) -> (ReplyHead, TcpStream) {
    tunnel_from(proxy, BALANCER, header, target).await
}

/// The connection ends with no byte from the proxy (within the test step bound).
async fn closed_unanswered(s: &mut TcpStream) {
    let mut out = Vec::new();
    let _ = bounded(s.read_to_end(&mut out)).await;
    assert!(out.is_empty(), "no answer expected, got {:?}", String::from_utf8_lossy(&out));
}

async fn echoes(s: &mut TcpStream, what: &[u8]) {
    s.write_all(what).await.unwrap();
    let mut back = vec![0u8; what.len()];
    bounded(s.read_exact(&mut back)).await.unwrap();
    assert_eq!(back, what);
}

async fn refusals(proxy: &TestProxy, reason: &str) -> f64 {
    proxy.metric(&format!("veilgate_refusals_total{{reason=\"{reason}\"}}")).await
}

async fn headers(proxy: &TestProxy, kind: &str) -> f64 {
    proxy.metric(&format!("veilgate_proxy_protocol_headers_total{{kind=\"{kind}\"}}")).await
}

#[tokio::test]
async fn the_carried_source_is_the_client_for_limits_in_v1_and_v2() {
    let origin = Origin::echo().await;
    let proxy =
        TestProxy::start(&config("127.0.0.1/32", "[limits.per_client]\nmax_tunnels = 1", &[origin.port()])).await;
    let (a, mut sa) = tunnel(proxy.addr, &v1("127.0.0.2", 40001), origin.addr).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let (b, mut sb) = tunnel(proxy.addr, &v2(1, "127.0.0.3", 40002), origin.addr).await;
    assert_eq!(b.status, 200, "another carried source is another client: {}", b.text);
    echoes(&mut sa, b"to the origin and back").await;
    echoes(&mut sb, b"and this one too").await;
    assert_eq!(proxy.controller.active_for_ip(ip("127.0.0.2")), 1);
    assert_eq!(proxy.controller.active_for_ip(ip("127.0.0.3")), 1);
    assert_eq!(proxy.controller.active_for_ip(ip(BALANCER)), 0, "the balancer is nobody's client");
    // The same carried source, in either version, is the same client: at its cap.
    let (c, _) = tunnel(proxy.addr, &v2(1, "127.0.0.2", 40003), origin.addr).await;
    assert_eq!(c.status, 429, "{}", c.text);
    let (d, _) = tunnel(proxy.addr, &v1("127.0.0.3", 40004), origin.addr).await;
    assert_eq!(d.status, 429, "{}", d.text);
    assert_eq!(refusals(&proxy, "client_cap").await, 2.0);
    assert_eq!(headers(&proxy, "proxied").await, 4.0);
    drop(sa);
    bounded(async {
        while proxy.controller.active_for_ip(ip("127.0.0.2")) > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let (e, mut se) = tunnel(proxy.addr, &v1("127.0.0.2", 40005), origin.addr).await;
    assert_eq!(e.status, 200, "its slot came back: {}", e.text);
    echoes(&mut se, b"again").await;
}

#[tokio::test]
async fn the_origin_gets_exactly_the_clients_bytes_when_all_come_in_one_write() {
    let (origin, slot) = Origin::recording().await;
    let proxy = TestProxy::start(&config("127.0.0.1/32", "", &[origin.port()])).await;
    let mut s = dial_proxy(proxy.addr, None).await;
    let mut all = v2(1, "127.0.0.2", 40001);
    all.extend_from_slice(&connect_head(origin.addr));
    all.extend_from_slice(b"\x16\x03\x01 pipelined");
    s.write_all(&all).await.unwrap();
    let head = read_reply_head(&mut s).await;
    assert_eq!(head.status, 200, "{}", head.text);
    s.write_all(b" then more").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(filled(&slot).await, b"\x16\x03\x01 pipelined then more", "no header byte reaches the origin");
}

#[tokio::test]
async fn a_header_split_across_writes_with_pauses_is_read_whole() {
    let origin = Origin::echo().await;
    let proxy = TestProxy::start(&config("127.0.0.1/32", "", &[origin.port()])).await;
    for header in [v1("127.0.0.2", 40001), v2(1, "127.0.0.2", 40002)] {
        let mut s = dial_proxy(proxy.addr, None).await;
        // For v1 one cut is right after the last space (where `ppp` alone gives up, taking
        // the empty port for a bad one), the other before the LF.
        let last_space = header.iter().rposition(|&b| b == b' ').map_or(0, |i| i + 1);
        let mut cuts = vec![0, 3, 13, 16, last_space, header.len() - 1, header.len()];
        cuts.sort_unstable();
        cuts.dedup();
        for piece in cuts.windows(2).map(|w| &header[w[0]..w[1]]) {
            s.write_all(piece).await.unwrap();
            s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        s.write_all(&connect_head(origin.addr)).await.unwrap();
        let head = read_reply_head(&mut s).await;
        assert_eq!(head.status, 200, "{}", head.text);
        echoes(&mut s, b"whole").await;
        assert_eq!(proxy.controller.active_for_ip(ip("127.0.0.2")), 1);
    }
}

#[tokio::test]
async fn missing_and_malformed_headers_are_closed_unanswered_and_counted() {
    let origin = Origin::echo().await;
    let proxy = TestProxy::start(&config("127.0.0.1/32", "", &[origin.port()])).await;
    // A CONNECT straight from a trusted peer: no header.
    let mut s = dial_proxy(proxy.addr, None).await;
    s.write_all(&connect_head(origin.addr)).await.unwrap();
    closed_unanswered(&mut s).await;
    assert_eq!(refusals(&proxy, "proxy_protocol_missing").await, 1.0);
    let mut bad_v2 = v2(1, "127.0.0.2", 40001);
    bad_v2[12] = 0x21 + 0x10; // version 3
    for bad in [
        b"PROXY TCP4 127.0.0.02 127.0.0.1 40001 8080\r\n".to_vec(),
        b"PROXY TCP4 127.0.0.2 127.0.0.1 40001 8080\n".to_vec(),
        bad_v2,
    ] {
        let mut s = dial_proxy(proxy.addr, None).await;
        let mut bytes = bad.clone();
        bytes.extend_from_slice(&connect_head(origin.addr));
        s.write_all(&bytes).await.unwrap();
        closed_unanswered(&mut s).await;
    }
    assert_eq!(refusals(&proxy, "proxy_protocol_malformed").await, 3.0);
    assert_eq!(headers(&proxy, "proxied").await, 0.0);
    let (head, mut s) = tunnel(proxy.addr, &v1("127.0.0.2", 40002), origin.addr).await;
    assert_eq!(head.status, 200, "everyone else is served: {}", head.text);
    echoes(&mut s, b"still").await;
}

#[tokio::test]
async fn a_peer_outside_proxy_protocol_from_is_closed_before_a_byte_is_read() {
    let origin = Origin::echo().await;
    let proxy = TestProxy::start(&config("127.0.0.2/32", "", &[origin.port()])).await;
    let (head, mut s) = tunnel_from(proxy.addr, "127.0.0.3", &v1("192.0.2.1", 40001), origin.addr).await;
    assert_eq!(head.status, 0, "no answer: {}", head.text);
    closed_unanswered(&mut s).await;
    assert_eq!(refusals(&proxy, "proxy_protocol_untrusted").await, 1.0);
    assert_eq!(proxy.controller.pending_heads(), 0, "nothing held for it");
    let (head, mut s) = tunnel_from(proxy.addr, "127.0.0.2", &v1("192.0.2.1", 40002), origin.addr).await;
    assert_eq!(head.status, 200, "the trusted balancer is served: {}", head.text);
    echoes(&mut s, b"ok").await;
    assert_eq!(proxy.controller.active_for_ip(ip("192.0.2.1")), 1);
    assert_eq!(refusals(&proxy, "proxy_protocol_untrusted").await, 1.0);
}

#[tokio::test]
async fn local_is_a_health_check_closed_quietly_and_unknown_is_the_balancer() {
    let origin = Origin::echo().await;
    let proxy = TestProxy::start(&config("127.0.0.1/32", "", &[origin.port()])).await;
    let mut s = dial_proxy(proxy.addr, None).await;
    s.write_all(&v2(0, "0.0.0.0", 0)).await.unwrap();
    closed_unanswered(&mut s).await;
    assert_eq!(headers(&proxy, "local").await, 1.0);
    for reason in ["missing", "malformed", "untrusted", "timeout"] {
        assert_eq!(refusals(&proxy, &format!("proxy_protocol_{reason}")).await, 0.0, "a check is no refusal");
    }
    // UNKNOWN: "use the real connection's parameters", so the balancer is the client.
    let (head, mut s) = tunnel(proxy.addr, b"PROXY UNKNOWN\r\n", origin.addr).await;
    assert_eq!(head.status, 200, "{}", head.text);
    echoes(&mut s, b"unknown").await;
    assert_eq!(proxy.controller.active_for_ip(ip(BALANCER)), 1);
    assert_eq!(headers(&proxy, "unknown").await, 1.0);
}

#[tokio::test]
async fn a_late_header_is_closed_at_header_timeout_and_others_are_served_meanwhile() {
    let origin = Origin::echo().await;
    let proxy = TestProxy::start(&config("127.0.0.1/32", "header_timeout = \"1s\"", &[origin.port()])).await;
    let started = Instant::now();
    let mut slow = dial_proxy(proxy.addr, None).await;
    slow.write_all(b"PROXY TCP4 127.0.0.2 ").await.unwrap();
    let mut silent = dial_proxy(proxy.addr, None).await;
    let (head, mut s) = tunnel(proxy.addr, &v2(1, "127.0.0.3", 40001), origin.addr).await;
    assert_eq!(head.status, 200, "{}", head.text);
    echoes(&mut s, b"meanwhile").await;
    closed_unanswered(&mut slow).await;
    closed_unanswered(&mut silent).await;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(5), "closed after {took:?}");
    assert_eq!(refusals(&proxy, "proxy_protocol_timeout").await, 2.0);
    assert_eq!(proxy.controller.pending_heads(), 0);
}

#[tokio::test]
async fn the_head_phase_bounds_charge_the_carried_client_and_the_global_one_applies_from_accept() {
    let origin = Origin::echo().await;
    // max_pending 4: one client may hold 2 unfinished heads.
    let proxy = TestProxy::start(&config("127.0.0.1/32", "max_pending = 4", &[origin.port()])).await;
    let mut held = Vec::new();
    for port in [40001, 40002] {
        let mut s = dial_proxy(proxy.addr, None).await;
        s.write_all(&v2(1, "127.0.0.2", port)).await.unwrap();
        held.push(s);
    }
    bounded(async {
        while proxy.controller.pending_for_ip(ip("127.0.0.2")) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(proxy.controller.pending_for_ip(ip(BALANCER)), 0, "the balancer is not charged");
    let mut third = dial_proxy(proxy.addr, None).await;
    third.write_all(&v2(1, "127.0.0.2", 40003)).await.unwrap();
    let head = read_reply_head(&mut third).await;
    assert_eq!(head.status, 429, "over its share, answered to the client: {}", head.text);
    assert_eq!(refusals(&proxy, "client_pending_cap").await, 1.0);
    // Two more that send nothing fill the global bound, which holds at accept.
    for _ in 0..2 {
        held.push(dial_proxy(proxy.addr, None).await);
    }
    bounded(async {
        while proxy.controller.pending_heads() < 4 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let mut over = dial_proxy(proxy.addr, None).await;
    let head = read_reply_head(&mut over).await;
    assert_eq!(head.status, 503, "{}", head.text);
    assert_eq!(refusals(&proxy, "pending_cap").await, 1.0);
    held.pop();
    bounded(async {
        while proxy.controller.pending_heads() > 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let (head, mut s) = tunnel(proxy.addr, &v2(1, "127.0.0.3", 40004), origin.addr).await;
    assert_eq!(head.status, 200, "another client has its own share: {}", head.text);
    echoes(&mut s, b"mine").await;
}

/// The binary's log: one line per unanswered close that says why, the peer's bytes escaped
/// (no raw control byte reaches the log), an untrusted peer under `log.client_address`.
#[test]
fn each_unanswered_close_is_one_log_line_with_the_peers_bytes_escaped() {
    use std::io::{BufRead, BufReader, Read, Write};
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (listen, admin) = (free(), free());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("veilgate.toml");
    std::fs::write(
        &file,
        format!(
            "[server]\nlisten = [\"{listen}\"]\nadmin_listen = \"{admin}\"\nproxy_protocol = \"required\"\n\
             proxy_protocol_from = [\"127.0.0.1/32\"]\n"
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_veilgate"))
        .args(["run", "--config"])
        .arg(&file)
        .env("VEILGATE_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let _vg = common::child::Veilgate(child);
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let next_line_with = |needle: &str| -> String {
        let deadline = Instant::now() + STEP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).unwrap_or_else(|_| panic!("no log line with {needle}"));
            if line.contains(needle) {
                return line;
            }
        }
    };
    next_line_with("proxy listener up");
    let send = |from: Option<&str>, bytes: &[u8]| {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        if let Some(from) = from {
            sock.bind(&SocketAddr::new(ip(from), 0).into()).unwrap();
        }
        sock.connect_timeout(&listen.into(), STEP).unwrap();
        let mut s: std::net::TcpStream = sock.into();
        s.set_read_timeout(Some(STEP)).unwrap();
        s.write_all(bytes).unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        assert!(answer.is_empty(), "unanswered");
    };
    send(None, b"CONNECT \"\x1b[31m x=1 HTTP/1.1\r\n\r\n");
    let line = next_line_with("proxy_protocol_missing");
    assert!(line.contains("closed: PROXY protocol header missing"), "{line}");
    assert!(line.contains(r#"detail="starts with \"CONNECT \\\"\\x1b[31m x\"""#), "16 bytes, escaped: {line}");
    assert!(!line.contains('\x1b'), "no raw escape byte: {line:?}");
    assert!(line.contains("balancer=\"127.0.0.1:"), "the trusted peer is named: {line}");
    send(None, b"PROXY TCP4 127.0.0.2 127.0.0.1 5 6\n");
    let line = next_line_with("proxy_protocol_malformed");
    assert!(line.contains("v1 line ends in LF without CR"), "{line}");
    send(Some("127.0.0.7"), &v1("127.0.0.2", 40001));
    let line = next_line_with("proxy_protocol_untrusted");
    assert!(!line.contains("127.0.0.7"), "an untrusted peer may be a client: omitted by default: {line}");
}

/// HAProxy, if installed: `send-proxy-v2` in front of the in-process veilgate.
fn haproxy_binary() -> Option<std::path::PathBuf> {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("haproxy")).collect::<Vec<_>>())
        .unwrap_or_default();
    candidates.into_iter().chain([std::path::PathBuf::from("/usr/sbin/haproxy")]).find(|p| p.is_file())
}

/// The HAProxy child, killed by its PID and reaped when dropped.
struct Haproxy(std::process::Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// HAProxy in `mode tcp` on a free loopback port in front of `backend`, with `send-proxy-v2`
/// and health checks that carry a header (LOCAL, every 200 ms), its stats socket in `dir`;
/// up when its frontend accepts (bounded). Its frontend address and the process.
async fn haproxy_in_front_of(
    bin: &std::path::Path,
    dir: &std::path::Path,
    backend: SocketAddr,
) -> (SocketAddr, Haproxy) {
    let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 200\n  stats socket {}\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend fe\n  bind {front}\n  default_backend vg\n\
             backend vg\n  server vg {backend} send-proxy-v2 check check-send-proxy inter 200ms\n",
            dir.join("haproxy.sock").display(),
        ),
    )
    .unwrap();
    let child = std::process::Command::new(bin)
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("haproxy starts");
    let haproxy = Haproxy(child);
    bounded(async {
        while TcpStream::connect(front).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    (front, haproxy)
}

#[tokio::test]
async fn behind_a_real_haproxy_with_send_proxy_v2() {
    let Some(bin) = haproxy_binary() else {
        eprintln!(
            "SKIPPED behind_a_real_haproxy_with_send_proxy_v2: no haproxy binary on PATH or at /usr/sbin/haproxy \
             (apt-get install haproxy; .ci/run installs it)"
        );
        return;
    };
    let origin = Origin::echo().await;
    let proxy =
        TestProxy::start(&config("127.0.0.1/32", "[limits.per_client]\nmax_tunnels = 1", &[origin.port()])).await;
    let dir = tempfile::tempdir().unwrap();
    let (front, _haproxy) = haproxy_in_front_of(&bin, dir.path(), proxy.addr).await;

    let (a, mut sa) = connect_from(front, Some(ip("127.0.0.5")), &origin.addr.to_string()).await;
    assert_eq!(a.status, 200, "{}", a.text);
    echoes(&mut sa, b"through haproxy").await;
    assert_eq!(proxy.controller.active_for_ip(ip("127.0.0.5")), 1, "HAProxy's PROXY source is the client");
    assert_eq!(proxy.controller.active_for_ip(ip(BALANCER)), 0);
    let (b, _sb) = connect_from(front, Some(ip("127.0.0.5")), &origin.addr.to_string()).await;
    assert_eq!(b.status, 429, "the same client behind HAProxy, at its cap: {}", b.text);
    let (c, mut sc) = connect_from(front, Some(ip("127.0.0.6")), &origin.addr.to_string()).await;
    assert_eq!(c.status, 200, "another client behind the same HAProxy: {}", c.text);
    echoes(&mut sc, b"me too").await;
    // A connection that goes round HAProxy has no header.
    let mut direct = dial_proxy(proxy.addr, None).await;
    direct.write_all(&connect_head(origin.addr)).await.unwrap();
    closed_unanswered(&mut direct).await;
    assert_eq!(refusals(&proxy, "proxy_protocol_missing").await, 1.0);
    // HAProxy's health checks arrive as LOCAL (every 200 ms); answered by a close, they keep
    // the server up (a failing check would take it down after 3).
    bounded(async {
        while headers(&proxy, "local").await < 5.0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let stat = haproxy_server_state(&dir.path().join("haproxy.sock"));
    assert!(stat.contains("UP") && stat.contains("L4OK"), "HAProxy's view of veilgate: {stat}");
    assert_eq!(refusals(&proxy, "proxy_protocol_malformed").await, 0.0);
}

/// The `vg` server's row of HAProxy's `show stat`: its status and last check.
fn haproxy_server_state(socket: &std::path::Path) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("haproxy stats socket");
    s.set_read_timeout(Some(STEP)).unwrap();
    s.write_all(b"show stat\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines().find(|l| l.starts_with("vg,vg,")).unwrap_or("no vg row").to_string()
}

/// The TLS listener behind the header: the header read exactly (here split in two writes with
/// a pause), then the TLS handshake from the client's first byte, and the carried source is
/// the client.
#[tokio::test]
async fn the_tls_listener_reads_the_header_then_the_handshake() {
    use common::tls::TestPki;
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let origin = Origin::echo().await;
    let extra = "[limits.per_client]\nmax_tunnels = 1\n";
    let mut text = pki.listener_config(dir.path(), origin.port(), extra);
    text = text
        .replace("[server]\n", "[server]\nproxy_protocol = \"required\"\nproxy_protocol_from = [\"127.0.0.1/32\"]\n");
    let proxy = TestProxy::start(&text).await;
    let connector = tokio_rustls::TlsConnector::from(pki.client_config());
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let open = async |src: &str| {
        let mut tcp = dial_proxy(proxy.tls[0], None).await;
        let header = v2(1, src, 40100);
        tcp.write_all(&header[..7]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        tcp.write_all(&header[7..]).await.unwrap();
        let mut tls = bounded(connector.connect(name.clone(), tcp)).await.expect("handshake after the header");
        tls.write_all(&connect_head(origin.addr)).await.unwrap();
        let head = read_reply_head(&mut tls).await;
        (head, tls)
    };
    let (a, mut ta) = open("127.0.0.7").await;
    assert_eq!(a.status, 200, "{}", a.text);
    ta.write_all(b"inside TLS, behind a header").await.unwrap();
    let mut back = [0u8; 27];
    bounded(ta.read_exact(&mut back)).await.unwrap();
    assert_eq!(&back, b"inside TLS, behind a header");
    assert_eq!(proxy.controller.active_for_ip(ip("127.0.0.7")), 1, "the carried source is the client");
    let (b, _tb) = open("127.0.0.7").await;
    assert_eq!(b.status, 429, "the same carried source at its cap: {}", b.text);
    let (c, _tc) = open("127.0.0.8").await;
    assert_eq!(c.status, 200, "another carried source: {}", c.text);
    // TLS straight to the listener, with no header: closed unanswered, counted.
    let mut bare = dial_proxy(proxy.tls[0], None).await;
    bare.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 0, 0, 1, 0]).await.unwrap();
    closed_unanswered(&mut bare).await;
    assert_eq!(refusals(&proxy, "proxy_protocol_missing").await, 1.0);
    assert_eq!(headers(&proxy, "proxied").await, 3.0);
}

#[tokio::test]
async fn the_tls_listener_behind_a_real_haproxy_keys_limits_by_the_carried_source() {
    use common::tls::TestPki;
    let Some(bin) = haproxy_binary() else {
        eprintln!(
            "SKIPPED the_tls_listener_behind_a_real_haproxy_keys_limits_by_the_carried_source: no haproxy binary \
             (apt-get install haproxy; .ci/run installs it)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let origin = Origin::echo().await;
    let mut text = pki.listener_config(dir.path(), origin.port(), "[limits.per_client]\nmax_tunnels = 1\n");
    text = text
        .replace("[server]\n", "[server]\nproxy_protocol = \"required\"\nproxy_protocol_from = [\"127.0.0.1/32\"]\n");
    let proxy = TestProxy::start(&text).await;
    // TLS passes through HAProxy untouched (mode tcp); the header goes first.
    let (front, _haproxy) = haproxy_in_front_of(&bin, dir.path(), proxy.tls[0]).await;
    let tls =
        Front::Tls { config: pki.client_config(), name: rustls::pki_types::ServerName::try_from("localhost").unwrap() };
    let target = origin.addr.to_string();
    let (a, mut ca) = connect_over(&tls, front, Some(ip("127.0.0.5")), &target).await;
    assert_eq!(a.status, 200, "{}", a.text);
    ca.write_all(b"TLS through haproxy").await.unwrap();
    let mut back = [0u8; 19];
    bounded(ca.read_exact(&mut back)).await.unwrap();
    assert_eq!(&back, b"TLS through haproxy");
    assert_eq!(proxy.controller.active_for_ip(ip("127.0.0.5")), 1, "HAProxy's PROXY source is the client");
    let (b, _cb) = connect_over(&tls, front, Some(ip("127.0.0.5")), &target).await;
    assert_eq!(b.status, 429, "{}", b.text);
    let (c, _cc) = connect_over(&tls, front, Some(ip("127.0.0.6")), &target).await;
    assert_eq!(c.status, 200, "{}", c.text);
    // HAProxy's checks arrive as LOCAL headers and are closed quietly.
    eventually("LOCAL health checks", async || headers(&proxy, "local").await, |n| *n >= 3.0).await;
    assert_eq!(refusals(&proxy, "tls_handshake_failed").await, 0.0);
}
