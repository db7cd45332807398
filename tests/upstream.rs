//! Parent proxies (`[[upstreams]]`, `[[upstream_groups]]`, `routes.upstream`), loopback only:
//! a real microsocks, a recording SOCKS5 server of the test's own, and a second veilgate as
//! an HTTP and an HTTPS parent; exact bytes, exact metrics, and no DNS query for `socks5h`.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use common::socks::{Asked, DnsStub, Microsocks, RecordingSocks};
use common::tls::TestPki;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `len` patterned bytes through a tunnel to an echo origin and checks every byte
/// comes back, writing and reading at once so no buffer on the way has to hold it all.
async fn echo_exact(s: TcpStream, len: usize, seed: u64) {
    let data = pattern(len, seed);
    let (mut r, mut w) = s.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w
    });
    let mut back = vec![0u8; len];
    bounded(r.read_exact(&mut back)).await.unwrap();
    drop(bounded(writer).await.unwrap());
    assert!(back == data, "the bytes came back unchanged");
}

/// Opens a tunnel to `target` from `from`, expects 200 and checks it relays exactly.
async fn tunnel_ok(proxy: &TestProxy, from: Option<IpAddr>, target: &str) {
    let (head, s) = connect_from(proxy.addr, from, target).await;
    assert_eq!(head.status, 200, "{target}: {}", head.text);
    echo_exact(s, 64 * 1024, 7).await;
}

async fn status_of(proxy: &TestProxy, target: &str) -> u16 {
    connect_via(proxy.addr, target).await.0.status
}

/// Waits for `series` to read `value` (a refusal is counted just after its answer is
/// written, so a client can read the answer first).
async fn expect_metric(proxy: &TestProxy, series: &str, value: f64) {
    eventually(series, async || proxy.metric(series).await, |v| *v == value).await;
}

/// An echo origin on 127.0.0.1 and, where the host has IPv6 loopback, on [::1] at the same
/// port: microsocks connects to the first address getaddrinfo gives for `localhost`, which is
/// ::1 where /etc/hosts lists it. Tunnels counted over both.
struct LocalhostEcho {
    v4: Origin,
    v6: Option<Origin>,
}

impl LocalhostEcho {
    async fn start() -> LocalhostEcho {
        let v4 = Origin::echo().await;
        let bind = format!("[::1]:{}", v4.port());
        let v6 = match std::net::TcpListener::bind(&bind) {
            Ok(probe) => {
                drop(probe);
                Some(
                    Origin::spawn_on(&bind, |mut s| async move {
                        let (mut r, mut w) = s.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    })
                    .await,
                )
            }
            Err(_) => None,
        };
        LocalhostEcho { v4, v6 }
    }

    fn port(&self) -> u16 {
        self.v4.port()
    }

    fn connections(&self) -> usize {
        self.v4.connections() + self.v6.as_ref().map_or(0, Origin::connections)
    }
}

fn series(name: &str, upstream: &str, outcome: &str) -> String {
    format!("veilgate_{name}{{upstream=\"{upstream}\",outcome=\"{outcome}\"}}")
}

fn up(upstream: &str) -> String {
    format!("veilgate_upstream_up{{upstream=\"{upstream}\"}}")
}

/// A secret file (mode 0600) in `dir`.
fn secret(dir: &Path, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).unwrap();
    std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
    path
}

#[tokio::test]
async fn bytes_are_exact_through_microsocks_with_the_name_resolved_by_it() {
    let Some(ms) = Microsocks::start("bytes_are_exact_through_microsocks", None, None) else { return };
    let origin = LocalhostEcho::start().await;
    let closed = common::child::free_port();
    let proxy = TestProxy::start(&format!(
        "{}\n[[upstreams]]\nname = \"ms\"\nurl = \"socks5h://{}\"\n[[routes]]\nhosts = [\"localhost\"]\nupstream = \"ms\"\n",
        loopback_policy(&[origin.port(), closed]),
        ms.addr
    ))
    .await;
    tunnel_ok(&proxy, None, &format!("localhost:{}", origin.port())).await;
    // A target no route sends to the parent is dialled directly: the origin sees veilgate.
    tunnel_ok(&proxy, None, &origin.v4.addr.to_string()).await;
    expect_metric(&proxy, &series("upstream_tunnels_total", "ms", "connected"), 1.0).await;
    expect_metric(&proxy, &series("upstream_tunnels_total", "ms", "parent_failed"), 0.0).await;
    expect_metric(&proxy, &up("ms"), 1.0).await;
    // The parent's "connection refused" (reply 5) is the origin's failure: 502, and the
    // parent stays up.
    assert_eq!(status_of(&proxy, &format!("localhost:{closed}")).await, 502);
    expect_metric(&proxy, &series("upstream_tunnels_total", "ms", "origin_failed"), 1.0).await;
    expect_metric(&proxy, "veilgate_refusals_total{reason=\"upstream_failed\"}", 1.0).await;
    expect_metric(&proxy, &up("ms"), 1.0).await;
    assert_eq!(origin.connections(), 2);
}

#[tokio::test]
async fn microsocks_with_credentials_from_a_file() {
    let Some(ms) = Microsocks::start("microsocks_with_credentials_from_a_file", None, Some(("alice", "s3cret"))) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let good = secret(dir.path(), "good", "alice:s3cret\n");
    let bad = secret(dir.path(), "bad", "alice:wrong\n");
    let origin = LocalhostEcho::start().await;
    let proxy = TestProxy::start(&format!(
        "{}\n[[upstreams]]\nname = \"good\"\nurl = \"socks5h://{ms}\"\ncredentials_file = \"{}\"\n\
         [[upstreams]]\nname = \"bad\"\nurl = \"socks5h://{ms}\"\ncredentials_file = \"{}\"\n\
         [[routes]]\nhosts = [\"localhost\"]\nupstream = \"good\"\n[[routes]]\nhosts = [\"127.0.0.1\"]\nupstream = \"bad\"\n",
        loopback_policy(&[origin.port()]),
        good.display(),
        bad.display(),
        ms = ms.addr
    ))
    .await;
    tunnel_ok(&proxy, None, &format!("localhost:{}", origin.port())).await;
    expect_metric(&proxy, &series("upstream_tunnels_total", "good", "connected"), 1.0).await;
    // The health check presents the credentials too, so refused ones take the parent down
    // before any tunnel has to find out; the route's tunnels then get 502 at once.
    eventually("the parent with wrong credentials marked down", async || proxy.metric(&up("bad")).await, |v| *v == 0.0)
        .await;
    assert_eq!(status_of(&proxy, &origin.v4.addr.to_string()).await, 502);
    expect_metric(&proxy, "veilgate_refusals_total{reason=\"parents_down\"}", 1.0).await;
    expect_metric(&proxy, &up("good"), 1.0).await;
    assert_eq!(origin.connections(), 1);
}

#[tokio::test]
async fn socks5h_sends_the_name_and_veilgate_asks_no_dns() {
    let dns = DnsStub::start().await;
    let origin = Origin::echo().await;
    let parent = RecordingSocks::start(origin.addr).await;
    let port = origin.port();
    // deny_private stays on: with socks5h there is no address to judge, and the parent
    // resolves; with socks5 veilgate resolves (through the stub) and judges the address.
    let config = |url: &str, deny_private: bool| {
        format!(
            "[policy]\nallowed_ports = [{port}]\ndeny_private = {deny_private}\n[dns]\nservers = [\"{}\"]\n\
             [[upstreams]]\nname = \"rec\"\nurl = \"{url}://{}\"\nhealth_check = \"1h\"\n\
             [[routes]]\nhosts = [\"*.test\", \"*.invalid\"]\nupstream = \"rec\"\n",
            dns.addr, parent.addr
        )
    };
    let proxy = TestProxy::start(&config("socks5h", true)).await;
    tunnel_ok(&proxy, None, &format!("origin.test:{port}")).await;
    assert_eq!(status_of(&proxy, &format!("nothing.invalid:{port}")).await, 502, "the parent's reply 4");
    assert_eq!(
        parent.requests().iter().map(|r| r.asked.clone()).collect::<Vec<_>>(),
        [Asked::Name("origin.test".into(), port), Asked::Name("nothing.invalid".into(), port)]
    );
    assert_eq!(dns.queries(), 0, "veilgate asked no DNS for names its parent resolves");
    expect_metric(&proxy, &series("upstream_tunnels_total", "rec", "connected"), 1.0).await;
    expect_metric(&proxy, &series("upstream_tunnels_total", "rec", "origin_failed"), 1.0).await;
    expect_metric(&proxy, "veilgate_refusals_total{reason=\"upstream_failed\"}", 1.0).await;
    expect_metric(&proxy, &up("rec"), 1.0).await;

    // socks5: veilgate resolves, and the post-DNS policy refuses 127.0.0.1 before the parent
    // hears of it.
    let proxy = TestProxy::start(&config("socks5", true)).await;
    assert_eq!(status_of(&proxy, &format!("origin.test:{port}")).await, 403);
    assert!(dns.queries() >= 1, "socks5 resolves at veilgate");
    assert_eq!(parent.requests().len(), 2, "a denied address never reaches the parent");
    // With the address allowed, the parent is given the address, not the name.
    let proxy = TestProxy::start(&config("socks5", false)).await;
    tunnel_ok(&proxy, None, &format!("origin.test:{port}")).await;
    assert_eq!(parent.requests()[2].asked, Asked::Addr(SocketAddr::from(([127, 0, 0, 1], port))));
}

#[tokio::test]
async fn isolate_by_client_gives_each_client_its_own_socks_username() {
    let origin = Origin::echo().await;
    let parent = RecordingSocks::start(origin.addr).await;
    let proxy = TestProxy::start(&format!(
        "{}\n[[upstreams]]\nname = \"tor\"\nurl = \"socks5h://{}\"\nisolate_by_client = true\nhealth_check = \"1h\"\n\
         [[routes]]\nhosts = [\"localhost\"]\nupstream = \"tor\"\n",
        loopback_policy(&[origin.port()]),
        parent.addr
    ))
    .await;
    let target = format!("localhost:{}", origin.port());
    for from in ["127.0.0.2", "127.0.0.2", "127.0.0.3"] {
        tunnel_ok(&proxy, Some(from.parse().unwrap()), &target).await;
    }
    let users: Vec<String> = parent.requests().into_iter().map(|r| r.user.expect("a username")).collect();
    assert_eq!(users.len(), 3);
    assert_eq!(users[0], users[1], "one client, one username: {users:?}");
    assert_ne!(users[0], users[2], "two clients, two usernames: {users:?}");
    for u in &users {
        assert!(u.starts_with("vg-") && !u.contains("127"), "an opaque token, not the address: {u}");
    }
}

#[tokio::test]
async fn a_denied_target_never_reaches_the_parent() {
    let origin = Origin::echo().await;
    let parent = RecordingSocks::start(origin.addr).await;
    let port = origin.port();
    let proxy = TestProxy::start(&format!(
        "[policy]\nallowed_ports = [{port}]\ndeny_hosts = [\"blocked.test\"]\n\
         [[upstreams]]\nname = \"rec\"\nurl = \"socks5h://{}\"\nhealth_check = \"1h\"\n\
         [[routes]]\nhosts = [\"*\"]\nupstream = \"rec\"\n",
        parent.addr
    ))
    .await;
    assert_eq!(status_of(&proxy, &format!("origin.test:{}", port + 1)).await, 403, "port");
    assert_eq!(status_of(&proxy, &format!("blocked.test:{port}")).await, 403, "host pattern");
    assert_eq!(status_of(&proxy, &format!("127.0.0.1:{port}")).await, 403, "private literal");
    assert_eq!(status_of(&proxy, &format!("[::ffff:127.0.0.1]:{port}")).await, 403, "another spelling");
    assert!(parent.requests().is_empty(), "the parent heard of none: {:?}", parent.requests());
    tunnel_ok(&proxy, None, &format!("origin.test:{port}")).await;
    assert_eq!(parent.requests().len(), 1);
    expect_metric(&proxy, &series("upstream_tunnels_total", "rec", "connected"), 1.0).await;
}

/// A veilgate as the parent, asking for Basic credentials; its config for `origin_port`.
fn parent_config(dir: &Path, origin_port: u16) -> String {
    let users = htpasswd(dir, &[("child", "pw", FAST_COST)]);
    format!("{}\n[auth]\ncredentials_file = \"{}\"\n", loopback_policy(&[origin_port]), users.display())
}

#[tokio::test]
async fn a_second_veilgate_as_an_http_parent() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::echo().await;
    let creds = secret(dir.path(), "parent.cred", "child:pw\n");
    // The child sends the names unresolved; the parent knows them from its static [dns].
    let parent = TestProxy::start(&format!(
        "{}\n[dns]\nhosts = {{ \"origin.test\" = \"127.0.0.1\", \"anon.test\" = \"127.0.0.1\" }}\n",
        parent_config(dir.path(), origin.port())
    ))
    .await;
    let proxy = TestProxy::start(&format!(
        "[policy]\nallowed_ports = [{}]\n\
         [[upstreams]]\nname = \"vg\"\nurl = \"http://{}\"\ncredentials_file = \"{}\"\n\
         [[upstreams]]\nname = \"anon\"\nurl = \"http://{}\"\n\
         [[routes]]\nhosts = [\"origin.test\"]\nupstream = \"vg\"\n[[routes]]\nhosts = [\"anon.test\"]\nupstream = \"anon\"\n",
        origin.port(),
        parent.addr,
        creds.display(),
        parent.addr
    ))
    .await;
    tunnel_ok(&proxy, None, &format!("origin.test:{}", origin.port())).await;
    expect_metric(&proxy, &series("upstream_tunnels_total", "vg", "connected"), 1.0).await;
    expect_metric(&parent, "veilgate_refusals_total{reason=\"auth_required\"}", 0.0).await;
    // Without credentials the parent answers 407: our 502 says the parent failed (it refused
    // us), and that parent is down until a health check passes.
    assert_eq!(status_of(&proxy, &format!("anon.test:{}", origin.port())).await, 502);
    expect_metric(&parent, "veilgate_refusals_total{reason=\"auth_required\"}", 1.0).await;
    expect_metric(&proxy, "veilgate_refusals_total{reason=\"parent_failed\"}", 1.0).await;
    expect_metric(&proxy, &series("upstream_tunnels_total", "anon", "parent_failed"), 1.0).await;
    expect_metric(&proxy, &up("anon"), 0.0).await;
    expect_metric(&proxy, &up("vg"), 1.0).await;
    assert_eq!(origin.connections(), 1);
}

#[tokio::test]
async fn a_second_veilgate_as_an_https_parent() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let origin = Origin::echo().await;
    let parent = TestProxy::start(&pki.listener_config(dir.path(), origin.port(), "")).await;
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let other = dir.path().join("other-ca.pem");
    std::fs::write(&other, TestPki::new().ca_pem).unwrap();
    let proxy = TestProxy::start(&format!(
        "[policy]\nallowed_ports = [{port}]\ndeny_private = false\n\
         [[upstreams]]\nname = \"tls\"\nurl = \"https://{tls}\"\nca_file = \"{}\"\n\
         [[upstreams]]\nname = \"untrusted\"\nurl = \"https://{tls}\"\nca_file = \"{}\"\n\
         [[routes]]\nhosts = [\"localhost\"]\nupstream = \"tls\"\n[[routes]]\nhosts = [\"127.0.0.1\"]\nupstream = \"untrusted\"\n",
        ca.display(),
        other.display(),
        port = origin.port(),
        tls = parent.tls[0]
    ))
    .await;
    tunnel_ok(&proxy, None, &format!("localhost:{}", origin.port())).await;
    expect_metric(&proxy, &series("upstream_tunnels_total", "tls", "connected"), 1.0).await;
    // A parent whose certificate the roots do not trust is never used: the health check's
    // handshake takes it down.
    eventually("the untrusted parent marked down", async || proxy.metric(&up("untrusted")).await, |v| *v == 0.0).await;
    assert_eq!(status_of(&proxy, &origin.addr.to_string()).await, 502);
    assert_eq!(origin.connections(), 1);
}

#[tokio::test]
async fn failover_skips_a_dead_member_until_its_health_check_passes() {
    let Some(mut a) = Microsocks::start("failover_skips_a_dead_member", None, None) else { return };
    let Some(b) = Microsocks::start("failover_skips_a_dead_member", None, None) else { return };
    let origin = LocalhostEcho::start().await;
    let target = format!("localhost:{}", origin.port());
    let (a_addr, b_addr) = (a.addr, b.addr);
    let config = |health: &str| {
        format!(
            "{}\n[[upstreams]]\nname = \"a\"\nurl = \"socks5h://{}\"\nhealth_check = \"{health}\"\n\
             [[upstreams]]\nname = \"b\"\nurl = \"socks5h://{}\"\nhealth_check = \"{health}\"\n\
             [[upstream_groups]]\nname = \"parents\"\nmembers = [\"a\", \"b\"]\nstrategy = \"failover\"\n\
             [[routes]]\nhosts = [\"localhost\"]\nupstream = \"parents\"\n",
            loopback_policy(&[origin.port()]),
            a_addr,
            b_addr
        )
    };
    // A member that fails a tunnel's dial is marked down there, and the same tunnel goes on
    // to the next member.
    let proxy = TestProxy::start(&config("1h")).await;
    tunnel_ok(&proxy, None, &target).await;
    expect_metric(&proxy, &series("upstream_tunnels_total", "a", "connected"), 1.0).await;
    a.stop();
    tunnel_ok(&proxy, None, &target).await;
    tunnel_ok(&proxy, None, &target).await;
    expect_metric(&proxy, &series("upstream_tunnels_total", "a", "parent_failed"), 1.0).await;
    expect_metric(&proxy, &series("upstream_tunnels_total", "b", "connected"), 2.0).await;
    expect_metric(&proxy, &up("a"), 0.0).await;
    expect_metric(&proxy, &up("b"), 1.0).await;
    drop(proxy);

    // A member down at start-up is found by the first check, and back at the first check
    // that passes.
    let proxy = TestProxy::start(&config("100ms")).await;
    eventually("a marked down by its check", async || proxy.metric(&up("a")).await, |v| *v == 0.0).await;
    tunnel_ok(&proxy, None, &target).await;
    expect_metric(&proxy, &series("upstream_tunnels_total", "b", "connected"), 1.0).await;
    a.restart();
    eventually("a back up by its check", async || proxy.metric(&up("a")).await, |v| *v == 1.0).await;
    tunnel_ok(&proxy, None, &target).await;
    expect_metric(&proxy, &series("upstream_tunnels_total", "a", "connected"), 1.0).await;
    expect_metric(&proxy, &series("upstream_tunnels_total", "a", "parent_failed"), 0.0).await;
}

#[tokio::test]
async fn every_member_down_is_a_502_with_its_reason() {
    let origin = Origin::echo().await;
    let dead = common::child::free_port();
    let proxy = TestProxy::start(&format!(
        "{}\n[[upstreams]]\nname = \"gone\"\nurl = \"socks5h://127.0.0.1:{dead}\"\nhealth_check = \"1h\"\n\
         [[upstream_groups]]\nname = \"g\"\nmembers = [\"gone\"]\nstrategy = \"round-robin\"\n\
         [[routes]]\nhosts = [\"localhost\"]\nupstream = \"g\"\n",
        loopback_policy(&[origin.port()])
    ))
    .await;
    eventually("the dead parent marked down", async || proxy.metric(&up("gone")).await, |v| *v == 0.0).await;
    let mut s = dial_proxy(proxy.addr, None).await;
    s.write_all(format!("CONNECT localhost:{} HTTP/1.1\r\n\r\n", origin.port()).as_bytes()).await.unwrap();
    let mut answer = String::new();
    bounded(s.read_to_string(&mut answer)).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 502 "), "{answer}");
    assert!(answer.contains("every parent proxy of this route is down"), "{answer}");
    expect_metric(&proxy, "veilgate_refusals_total{reason=\"parents_down\"}", 1.0).await;
    assert_eq!(origin.connections(), 0);
}

/// A parent that accepts and then says nothing more after `answer` (the SOCKS5 greeting
/// reply, or nothing at all), holding each connection; counts connections.
async fn mute_parent(answer: &'static [u8]) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = std::sync::Arc::clone(&count);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut greeting = [0u8; 3];
                if s.read_exact(&mut greeting).await.is_ok() && !answer.is_empty() {
                    let _ = s.write_all(answer).await;
                }
                let mut rest = [0u8; 512];
                while matches!(s.read(&mut rest).await, Ok(n) if n > 0) {}
            });
        }
    });
    (addr, count)
}

#[tokio::test]
async fn deadlines_bound_every_step_and_say_whose_they_were() {
    let origin = Origin::echo().await;
    // Greets, then never answers the CONNECT: the parent is alive and working on the origin.
    let (slow_origin, _) = mute_parent(&[5, 0]).await;
    // Accepts, then never greets: the parent itself is stuck.
    let (stuck, _) = mute_parent(&[]).await;
    let proxy = TestProxy::start(&format!(
        "{}\n[server]\nconnect_timeout = \"300ms\"\n\
         [[upstreams]]\nname = \"slow\"\nurl = \"socks5h://{slow_origin}\"\nhealth_check = \"1h\"\n\
         [[upstreams]]\nname = \"stuck\"\nurl = \"socks5h://{stuck}\"\nhealth_check = \"1h\"\n\
         [[routes]]\nhosts = [\"localhost\"]\nupstream = \"slow\"\n[[routes]]\nhosts = [\"127.0.0.1\"]\nupstream = \"stuck\"\n",
        loopback_policy(&[origin.port()])
    ))
    .await;
    let started = std::time::Instant::now();
    assert_eq!(status_of(&proxy, &format!("localhost:{}", origin.port())).await, 504);
    assert!(started.elapsed() < std::time::Duration::from_secs(3), "within connect_timeout: {:?}", started.elapsed());
    expect_metric(&proxy, &series("upstream_tunnels_total", "slow", "timeout"), 1.0).await;
    expect_metric(&proxy, &up("slow"), 1.0).await;
    // The stuck parent: its health check or this tunnel (whichever ends first) times out
    // and takes it down; the client gets 504 or, once it is down, 502. Never a hang.
    let status = status_of(&proxy, &origin.addr.to_string()).await;
    assert!(status == 504 || status == 502, "{status}");
    expect_metric(&proxy, &up("stuck"), 0.0).await;
    expect_metric(
        &proxy,
        "veilgate_refusals_total{reason=\"upstream_timeout\"}",
        if status == 504 { 2.0 } else { 1.0 },
    )
    .await;
    assert_eq!(origin.connections(), 0);
}

#[tokio::test]
async fn a_reload_stops_the_old_health_checks() {
    let (parent, checks) = mute_parent(&[5, 0]).await;
    let base = "[policy]\nallowed_ports = [443]\n";
    let proxy = TestProxy::start(&format!(
        "{base}[[upstreams]]\nname = \"p\"\nurl = \"socks5h://{parent}\"\nhealth_check = \"20ms\"\n"
    ))
    .await;
    let count = || checks.load(std::sync::atomic::Ordering::SeqCst);
    eventually("health checks running", async || count(), |n| *n >= 3).await;
    proxy.controller.reload(test_config(base)).unwrap();
    // One check may have been under way when the reload came; none starts after it.
    let after = count();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(count() <= after + 1, "checks went on after the reload: {after} then {}", count());
}

#[test]
fn refused_parent_credentials_are_one_log_line_that_says_so_and_never_the_password() {
    use common::child::{Veilgate, exchange};
    let Some(ms) = Microsocks::start("refused_parent_credentials_log", None, Some(("alice", "right-pass-1"))) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let creds = secret(dir.path(), "corp.cred", "alice:wrong-pass-2\n");
    let file = dir.path().join("veilgate.toml");
    std::fs::write(
        &file,
        format!(
            "{}\n[[upstreams]]\nname = \"corp\"\nurl = \"socks5h://{}\"\ncredentials_file = \"{}\"\nhealth_check = \"1h\"\n\
             [[routes]]\nhosts = [\"localhost\"]\nupstream = \"corp\"\n",
            loopback_policy(&[443]),
            ms.addr,
            creds.display()
        ),
    )
    .unwrap();
    let (mut vg, proxy, _admin) = Veilgate::run_logged(Some(&file));
    let (log, reader) = vg.gather_log();
    let lines = || log.lock().unwrap().clone();
    let down = eventually_blocking(
        "the line saying the parent refused our credentials",
        || lines().into_iter().find(|l| l.contains("parent proxy marked down")),
        Option::is_some,
    )
    .unwrap();
    assert!(down.contains("the parent refused our credentials") && down.contains("corp"), "{down}");
    let answer = exchange(proxy, b"CONNECT localhost:443 HTTP/1.1\r\n\r\n").unwrap();
    assert!(answer.starts_with("HTTP/1.1 502 "), "{answer}");
    let refused = eventually_blocking(
        "the refusal's line",
        || lines().into_iter().find(|l| l.contains("refused: ")),
        Option::is_some,
    )
    .unwrap();
    assert!(refused.contains("parents_down"), "{refused}");
    drop(vg);
    reader.join().unwrap();
    let all = lines();
    assert_eq!(all.iter().filter(|l| l.contains("parent proxy marked down")).count(), 1, "{all:#?}");
    assert!(all.iter().all(|l| !l.contains("wrong-pass-2") && !l.contains("right-pass-1")), "{all:#?}");
}

#[tokio::test]
async fn a_route_through_a_parent_takes_no_egress_pool_and_both_on_one_route_is_refused() {
    let origin = Origin::echo().await;
    let parent = RecordingSocks::start(origin.addr).await;
    let port = origin.port();
    let pools = "[egress]\ndefault_pool = \"p\"\n[[egress.pools]]\nname = \"p\"\naddresses = [\"127.0.0.51\"]\n";
    let text = format!(
        "{}\n{pools}[[upstreams]]\nname = \"rec\"\nurl = \"socks5h://{}\"\nhealth_check = \"1h\"\n\
         [[routes]]\nhosts = [\"origin.test\"]\nupstream = \"rec\"\n",
        loopback_policy(&[port]),
        parent.addr
    );
    let proxy = TestProxy::start(&text).await;
    tunnel_ok(&proxy, None, &format!("origin.test:{port}")).await;
    assert_eq!(parent.requests().len(), 1, "through the parent");
    // Anything else leaves from the default pool.
    tunnel_ok(&proxy, None, &format!("127.0.0.1:{port}")).await;
    assert_eq!(parent.requests().len(), 1);
    expect_metric(&proxy, "veilgate_egress_tunnels_total{pool=\"p\"}", 1.0).await;
    expect_metric(&proxy, &series("upstream_tunnels_total", "rec", "connected"), 1.0).await;
    let both = text.replace("upstream = \"rec\"\n", "upstream = \"rec\"\negress = \"p\"\n");
    let err = veilgate::config::Config::from_toml(&both, "test").unwrap_err().to_string();
    assert!(err.contains("routes[0].upstream") && err.contains("not both"), "{err}");
}
