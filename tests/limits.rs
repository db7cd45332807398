//! The governor on the wire: caps, rates, bandwidth, isolation between clients, reload and
//! proxy authentication. Transfers are bounded and timing bounds are tolerant.

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

async fn open(proxy: &TestProxy, from: &str, origin: &Origin) -> (ReplyHead, tokio::net::TcpStream) {
    connect_from(proxy.addr, Some(ip(from)), &origin.addr.to_string()).await
}

#[tokio::test]
async fn per_client_cap_admits_exactly_the_cap() {
    let origin = Origin::echo().await;
    let proxy =
        TestProxy::start(&format!("[limits.per_client]\nmax_tunnels = 4\n{}", loopback_policy(&[origin.port()]))).await;
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..9 {
        let started = Instant::now();
        let (head, s) = open(&proxy, "127.0.0.2", &origin).await;
        match head.status {
            200 => held.push(s),
            429 => {
                refused += 1;
                assert!(started.elapsed() < Duration::from_secs(1), "a refusal is fast");
                assert!(head.header("Retry-After").is_none(), "a cap is not a rate: no Retry-After");
            }
            other => panic!("unexpected {other}: {}", head.text),
        }
    }
    assert_eq!(held.len(), 4);
    assert_eq!(refused, 5);
    assert_eq!(proxy.metric("veilgate_refusals_total{reason=\"client_cap\"}").await, 5.0);
    // Another client has its own cap.
    let (head, _other) = open(&proxy, "127.0.0.3", &origin).await;
    assert_eq!(head.status, 200);
    // Closing one frees one slot.
    drop(held.pop());
    eventually("127.0.0.2 down to 3 tunnels", async || proxy.controller.active_for_ip(ip("127.0.0.2")), |n| *n == 3)
        .await;
    assert_eq!(open(&proxy, "127.0.0.2", &origin).await.0.status, 200);
}

#[tokio::test]
async fn abrupt_resets_never_leak_a_slot() {
    let origin = Origin::echo().await;
    let proxy =
        TestProxy::start(&format!("[limits.per_client]\nmax_tunnels = 8\n{}", loopback_policy(&[origin.port()]))).await;
    for round in 0..500 {
        let (head, s) = open(&proxy, "127.0.0.4", &origin).await;
        assert_eq!(head.status, 200, "round {round}");
        // SO_LINGER 0: close sends a RST instead of a FIN.
        let std = s.into_std().unwrap();
        socket2::SockRef::from(&std).set_linger(Some(Duration::ZERO)).unwrap();
        drop(std);
        if round % 50 == 49 {
            eventually(
                "127.0.0.4 under its cap",
                async || proxy.controller.active_for_ip(ip("127.0.0.4")),
                |n| *n <= 7,
            )
            .await;
        }
    }
    eventually(
        "no tunnel left, for 127.0.0.4 or in all",
        async || (proxy.controller.active_for_ip(ip("127.0.0.4")), proxy.controller.active_tunnels()),
        |counts| *counts == (0, 0),
    )
    .await;
    assert_eq!(proxy.metric("veilgate_tunnels_active{mode=\"tunnel\"}").await, 0.0);
}

#[tokio::test]
async fn new_tunnel_rate_gives_429_with_retry_after() {
    let origin = Origin::echo().await;
    let toml = format!(
        "[limits.per_client]\nnew_tunnels_per_second = 1\nnew_tunnels_burst = 3\n{}",
        loopback_policy(&[origin.port()])
    );
    let proxy = TestProxy::start(&toml).await;
    for _ in 0..3 {
        assert_eq!(open(&proxy, "127.0.0.6", &origin).await.0.status, 200);
    }
    let (head, _) = open(&proxy, "127.0.0.6", &origin).await;
    assert_eq!(head.status, 429, "{}", head.text);
    assert_eq!(head.header("Retry-After"), Some("1"), "{}", head.text);
    assert_eq!(open(&proxy, "127.0.0.7", &origin).await.0.status, 200, "another client has its own budget");
    assert_eq!(proxy.metric("veilgate_refusals_total{reason=\"client_rate\"}").await, 1.0);
}

#[tokio::test]
async fn global_cap_gives_503() {
    let origin = Origin::echo().await;
    let proxy = TestProxy::start(&format!("[limits]\nmax_tunnels = 2\n{}", loopback_policy(&[origin.port()]))).await;
    let _a = open(&proxy, "127.0.0.2", &origin).await;
    let _b = open(&proxy, "127.0.0.3", &origin).await;
    let (head, _) = open(&proxy, "127.0.0.4", &origin).await;
    assert_eq!(head.status, 503, "{}", head.text);
    assert_eq!(proxy.metric("veilgate_config_max_tunnels").await, 2.0);
}

/// Reads `len` bytes from an origin that streams, and returns how long it took.
async fn timed_download(proxy: &TestProxy, from: &str, origin: &Origin, len: usize) -> Duration {
    let (head, mut s) = open(proxy, from, origin).await;
    assert_eq!(head.status, 200, "{}", head.text);
    s.write_all(&(len as u64).to_be_bytes()).await.unwrap();
    let started = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    loop {
        let n = bounded(s.read(&mut buf)).await.unwrap();
        if n == 0 {
            break;
        }
        assert!(buf[..n].iter().all(|b| *b == 0x5a), "corrupted bytes at {got}");
        got += n;
    }
    assert_eq!(got, len, "exactly the bytes sent, no more, no fewer");
    started.elapsed()
}

#[tokio::test]
async fn bandwidth_is_paced_and_clients_are_isolated() {
    let origin = Origin::source().await;
    let toml = format!("[limits.per_client]\nbandwidth_down = \"1 MiB/s\"\n{}", loopback_policy(&[origin.port()]));
    let proxy = TestProxy::start(&toml).await;
    // Two clients at once, 2 MiB each at 1 MiB/s each: each lasts 1.5 s to 3 s. Were the
    // budgets shared, they would take about 4 s.
    let (a, b) = tokio::join!(
        timed_download(&proxy, "127.0.0.2", &origin, 2 << 20),
        timed_download(&proxy, "127.0.0.3", &origin, 2 << 20)
    );
    for (who, took) in [("a", a), ("b", b)] {
        assert!(took >= Duration::from_millis(1500) && took <= Duration::from_secs(3), "client {who}: {took:?}");
    }
    let waited = proxy.metric("veilgate_throttle_wait_seconds{scope=\"client\",direction=\"down\"}").await;
    assert!(waited > 1.0, "throttle wait is counted: {waited}");
}

#[tokio::test]
async fn one_clients_tunnels_share_its_budget() {
    let origin = Origin::source().await;
    let toml = format!("[limits.per_client]\nbandwidth_down = \"2 MiB/s\"\n{}", loopback_policy(&[origin.port()]));
    let proxy = TestProxy::start(&toml).await;
    // Two tunnels of one client, 2 MiB each = 4 MiB at 2 MiB/s: about 2 s for both, and
    // both finish at about the same time (fair turns, not first-come-first-served).
    let (a, b) = tokio::join!(
        timed_download(&proxy, "127.0.0.2", &origin, 2 << 20),
        timed_download(&proxy, "127.0.0.2", &origin, 2 << 20)
    );
    assert!(a.max(b) >= Duration::from_millis(1500), "shared budget: {a:?} {b:?}");
    assert!(a.max(b) <= Duration::from_secs(3), "{a:?} {b:?}");
    let ratio = a.max(b).as_secs_f64() / a.min(b).as_secs_f64();
    assert!(ratio < 1.3, "fair sharing: {a:?} vs {b:?}");
}

#[tokio::test]
async fn route_limits_apply_to_their_destinations() {
    let origin = Origin::echo().await;
    let p = origin.port();
    let toml = format!(
        "{}[dns.hosts]\n\"slow.test\" = \"127.0.0.1\"\n\"free.test\" = \"127.0.0.1\"\n\
         [[routes]]\nhosts = [\"slow.test\"]\n[routes.per_client]\nmax_tunnels = 1\n",
        loopback_policy(&[p])
    );
    let proxy = TestProxy::start(&toml).await;
    let (h1, _k1) = connect_from(proxy.addr, Some(ip("127.0.0.2")), &format!("slow.test:{p}")).await;
    assert_eq!(h1.status, 200);
    let (h2, _) = connect_from(proxy.addr, Some(ip("127.0.0.2")), &format!("slow.test:{p}")).await;
    assert_eq!(h2.status, 429);
    let (h3, _k3) = connect_from(proxy.addr, Some(ip("127.0.0.2")), &format!("free.test:{p}")).await;
    assert_eq!(h3.status, 200, "other destinations are not capped by the route");
    assert_eq!(proxy.metric("veilgate_refusals_total{reason=\"route_cap\"}").await, 1.0);
}

#[tokio::test]
async fn reload_raises_and_lowers_caps_with_tunnels_open() {
    let origin = Origin::echo().await;
    let base = loopback_policy(&[origin.port()]);
    let with_cap = |n: u32| test_config(&format!("[limits.per_client]\nmax_tunnels = {n}\n{base}"));
    let proxy = TestProxy::start_config(with_cap(2)).await;
    let mut held = vec![open(&proxy, "127.0.0.2", &origin).await, open(&proxy, "127.0.0.2", &origin).await];
    assert!(held.iter().all(|(h, _)| h.status == 200));
    assert_eq!(open(&proxy, "127.0.0.2", &origin).await.0.status, 429);
    // Raise: one more fits at once; the open tunnels still count.
    proxy.controller.reload(with_cap(3)).unwrap();
    held.push(open(&proxy, "127.0.0.2", &origin).await);
    assert_eq!(held[2].0.status, 200);
    assert_eq!(open(&proxy, "127.0.0.2", &origin).await.0.status, 429);
    // Lower below what is open: running tunnels keep working, nobody new gets in.
    proxy.controller.reload(with_cap(1)).unwrap();
    assert_eq!(open(&proxy, "127.0.0.2", &origin).await.0.status, 429);
    let (_, s) = &mut held[0];
    s.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    bounded(s.read_exact(&mut b)).await.unwrap();
    // Only when the count drops below the new cap is a tunnel admitted again.
    held.truncate(0);
    eventually("127.0.0.2's tunnels closed", async || proxy.controller.active_for_ip(ip("127.0.0.2")), |n| *n == 0)
        .await;
    assert_eq!(open(&proxy, "127.0.0.2", &origin).await.0.status, 200);
    assert_eq!(proxy.metric("veilgate_config_reloads_total{result=\"ok\"}").await, 2.0);
}

#[tokio::test]
async fn reload_changes_the_bandwidth_of_running_tunnels() {
    let origin = Origin::source().await;
    let base = loopback_policy(&[origin.port()]);
    let with_rate = |rate: &str| test_config(&format!("[limits.per_client]\nbandwidth_down = \"{rate}\"\n{base}"));
    let proxy = TestProxy::start_config(with_rate("256 KiB/s")).await;
    let (head, mut s) = open(&proxy, "127.0.0.2", &origin).await;
    assert_eq!(head.status, 200);
    s.write_all(&(6u64 << 20).to_be_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0usize;
    // At 256 KiB/s, 6 MiB would take 24 s; raised to 16 MiB/s after 0.5 s it takes well
    // under 3 s in all.
    let started = Instant::now();
    let mut raised = false;
    while got < 6 << 20 {
        if !raised && started.elapsed() > Duration::from_millis(500) {
            proxy.controller.reload(with_rate("16 MiB/s")).unwrap();
            raised = true;
        }
        let n = bounded(s.read(&mut buf)).await.unwrap();
        assert!(n > 0);
        got += n;
    }
    assert!(raised);
    assert!(started.elapsed() < Duration::from_secs(4), "the raised rate applied: {:?}", started.elapsed());
}

async fn connect_with_auth(proxy: &TestProxy, from: &str, target: &str, auth: Option<&str>) -> ReplyHead {
    let mut s = Client::open(proxy.addr, Some(ip(from)), &Front::Plain).await.unwrap();
    let head = s.connect_as(target, auth).await;
    // Keep the tunnel open for the caller's caps by leaking the socket into a task.
    tokio::spawn(async move {
        let mut b = [0u8; 1];
        let _ = s.read(&mut b).await;
    });
    head
}

#[tokio::test]
async fn proxy_auth_and_limits_keyed_by_user() {
    let origin = Origin::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let file = htpasswd(&dir, &[("alice", "wonderland", FAST_COST), ("bob", "builder", FAST_COST)]);
    let toml = format!(
        "[auth]\ncredentials_file = \"{}\"\nrealm = \"test realm\"\n[limits.per_client]\nmax_tunnels = 1\n{}",
        file.display(),
        loopback_policy(&[origin.port()])
    );
    let proxy = TestProxy::start(&toml).await;
    let t = origin.addr.to_string();
    let none = connect_with_auth(&proxy, "127.0.0.2", &t, None).await;
    assert_eq!(none.status, 407);
    assert_eq!(none.header("Proxy-Authenticate"), Some("Basic realm=\"test realm\""));
    assert_eq!(connect_with_auth(&proxy, "127.0.0.2", &t, Some("alice:wrong")).await.status, 407);
    assert_eq!(connect_with_auth(&proxy, "127.0.0.2", &t, Some("mallory:x")).await.status, 407);
    assert_eq!(connect_with_auth(&proxy, "127.0.0.2", &t, Some("alice:wonderland")).await.status, 200);
    // Alice's cap follows her to another address; Bob from Alice's address is his own client.
    assert_eq!(connect_with_auth(&proxy, "127.0.0.3", &t, Some("alice:wonderland")).await.status, 429);
    assert_eq!(connect_with_auth(&proxy, "127.0.0.2", &t, Some("bob:builder")).await.status, 200);
    assert_eq!(proxy.metric("veilgate_refusals_total{reason=\"auth_required\"}").await, 3.0);
    // The origin's accept may lag the proxy's 200 (sent once the kernel connected).
    eventually("the origin to accept both tunnels", async || origin.connections(), |n| *n >= 2).await;
    assert_eq!(origin.connections(), 2);
}

#[tokio::test]
async fn half_sent_heads_are_bounded_per_client() {
    let origin = Origin::echo().await;
    let toml =
        format!("[server]\nmax_pending_per_client = 2\nhead_grace = \"100ms\"\n{}", loopback_policy(&[origin.port()]));
    let proxy = TestProxy::start(&toml).await;
    // Two connections that never finish a head hold both of this client's slots once late.
    let _idle1 = dial_proxy(proxy.addr, Some(ip("127.0.0.8"))).await;
    let _idle2 = dial_proxy(proxy.addr, Some(ip("127.0.0.8"))).await;
    eventually("both idle connections in their head phase", async || proxy.controller.pending_heads(), |n| *n == 2)
        .await;
    // On purpose: let their grace (head_grace) run out, so both are late before the third is.
    // Lateness has no outside view to wait on.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let mut third = dial_proxy(proxy.addr, Some(ip("127.0.0.8"))).await;
    let head = read_reply_head(&mut third).await;
    assert_eq!(head.status, 429, "{}", head.text);
    assert!(started.elapsed() < Duration::from_secs(1), "turned away as soon as its head is late");
    // Another client is not affected.
    assert_eq!(open(&proxy, "127.0.0.9", &origin).await.0.status, 200);
}

#[tokio::test]
async fn reordering_routes_on_reload_keeps_each_routes_count() {
    let origin = Origin::echo().await;
    let p = origin.port();
    let config = |routes: &str| {
        test_config(&format!(
            "{}[dns.hosts]\n\"a.test\" = \"127.0.0.1\"\n\"b.test\" = \"127.0.0.1\"\n{routes}",
            loopback_policy(&[p])
        ))
    };
    let a = "[[routes]]\nhosts = [\"a.test\"]\n[routes.per_client]\nmax_tunnels = 1\n";
    let b = "[[routes]]\nhosts = [\"b.test\"]\n[routes.per_client]\nmax_tunnels = 1\n";
    let proxy = TestProxy::start_config(config(&format!("{a}{b}"))).await;
    let (h, _keep_a) = connect_from(proxy.addr, Some(ip("127.0.0.2")), &format!("a.test:{p}")).await;
    assert_eq!(h.status, 200);
    proxy.controller.reload(config(&format!("{b}{a}"))).unwrap();
    let (h, _) = connect_from(proxy.addr, Some(ip("127.0.0.2")), &format!("a.test:{p}")).await;
    assert_eq!(h.status, 429, "a's open tunnel still counts against a");
    let (h, _keep_b) = connect_from(proxy.addr, Some(ip("127.0.0.2")), &format!("b.test:{p}")).await;
    assert_eq!(h.status, 200, "b's count is its own");
}
