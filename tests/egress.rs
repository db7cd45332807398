//! Egress pools (issue 14): the source address an origin sees. Every origin here writes the
//! peer address it accepted first, so each tunnel reports the source it left from; pools are
//! loopback addresses (127.0.0.51 to .54), and the prefix test runs in a network namespace
//! of its own.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

const POOL: &str = "addresses = [\"127.0.0.51\", \"127.0.0.52\", \"127.0.0.53\", \"127.0.0.54\"]";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// An origin on `bind` that writes the peer's address and a newline, then echoes.
async fn peer_origin(bind: &str) -> Origin {
    Origin::spawn_on(bind, |mut s| async move {
        let peer = s.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default();
        if s.write_all(format!("{peer}\n").as_bytes()).await.is_ok() {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    })
    .await
}

/// The first line the origin wrote: the source address the tunnel left from.
async fn source_of<S: AsyncRead + Unpin>(s: &mut S) -> IpAddr {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    bounded(async {
        while !line.ends_with(b"\n") {
            match s.read(&mut byte).await {
                Ok(1) => line.push(byte[0]),
                _ => break,
            }
        }
    })
    .await;
    String::from_utf8_lossy(&line).trim().parse().unwrap_or_else(|_| panic!("origin line {line:?}"))
}

/// One tunnel from `from` (or the default address) to `target`, as `credentials`: its
/// status, and for a 200 the source address and the open client (drop it to close).
async fn tunnel(
    proxy: &TestProxy,
    from: Option<&str>,
    target: &str,
    credentials: Option<&str>,
) -> (u16, Option<(IpAddr, Client)>) {
    let mut c = Client::open(proxy.addr, from.map(ip), &Front::Plain).await.unwrap();
    let head = c.connect_as(target, credentials).await;
    if head.status != 200 {
        return (head.status, None);
    }
    let src = source_of(&mut c).await;
    (200, Some((src, c)))
}

/// The source of one tunnel that must succeed; the tunnel is closed.
async fn source(proxy: &TestProxy, from: Option<&str>, target: &str, credentials: Option<&str>) -> IpAddr {
    let (status, open) = tunnel(proxy, from, target, credentials).await;
    assert_eq!(status, 200, "tunnel from {from:?} as {credentials:?}");
    open.unwrap().0
}

async fn pool_metric(proxy: &TestProxy, name: &str, pool: &str) -> f64 {
    proxy.metric(&format!("veilgate_egress_{name}_total{{pool=\"{pool}\"}}")).await
}

fn config(origin: &Origin, pool: &str) -> String {
    format!(
        "{}[egress]\ndefault_pool = \"p\"\n[[egress.pools]]\nname = \"p\"\n{pool}\n",
        loopback_policy(&[origin.port()])
    )
}

#[tokio::test]
async fn rotate_leaves_from_every_address_in_turn() {
    let origin = peer_origin("127.0.0.1:0").await;
    let proxy = TestProxy::start(&config(&origin, &format!("{POOL}\nselect = \"rotate\""))).await;
    let target = origin.addr.to_string();
    let mut seen: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for _ in 0..40 {
        *seen.entry(source(&proxy, None, &target, None).await).or_default() += 1;
    }
    let want: BTreeMap<IpAddr, usize> = (51..=54).map(|i| (ip(&format!("127.0.0.{i}")), 10)).collect();
    assert_eq!(seen, want, "round robin over the four addresses");
    assert_eq!(pool_metric(&proxy, "tunnels", "p").await, 40.0);
    assert_eq!(pool_metric(&proxy, "failures", "p").await, 0.0);
    assert_eq!(pool_metric(&proxy, "isolation_shared", "p").await, 0.0);
}

#[tokio::test]
async fn sticky_keeps_each_client_on_one_address_across_restarts() {
    let origin = peer_origin("127.0.0.1:0").await;
    let text = config(&origin, &format!("{POOL}\nselect = \"sticky\""));
    let target = origin.addr.to_string();
    let mut first: BTreeMap<&str, IpAddr> = BTreeMap::new();
    for round in 0..2 {
        // A second proxy with the same pool: a restart, or another instance.
        let proxy = TestProxy::start(&text).await;
        for client in ["127.0.0.2", "127.0.0.3"] {
            let mut got = BTreeSet::new();
            for _ in 0..10 {
                got.insert(source(&proxy, Some(client), &target, None).await);
            }
            assert_eq!(got.len(), 1, "{client} in round {round}: {got:?}");
            let addr = *got.first().unwrap();
            assert_eq!(*first.entry(client).or_insert(addr), addr, "{client}: the same address after a restart");
        }
        assert_eq!(pool_metric(&proxy, "tunnels", "p").await, 20.0);
    }
    // And in any process: the hash has no per-process key, so these are fixed (a change here
    // moves every sticky client of every deployment to another address).
    let want = BTreeMap::from([("127.0.0.2", ip("127.0.0.53")), ("127.0.0.3", ip("127.0.0.51"))]);
    assert_eq!(first, want);
}

#[tokio::test]
async fn isolated_clients_never_share_an_address_while_one_is_free() {
    let origin = peer_origin("127.0.0.1:0").await;
    let proxy = TestProxy::start(&config(&origin, &format!("{POOL}\nselect = \"sticky\"\nisolate = true"))).await;
    let target = origin.addr.to_string();
    // Four clients, each holding a tunnel open, and each a second one: four addresses,
    // one per client, and a client's second tunnel on its first's address.
    let mut open = Vec::new();
    let mut by_client: BTreeMap<&str, IpAddr> = BTreeMap::new();
    for client in ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"] {
        for _ in 0..2 {
            let (status, t) = tunnel(&proxy, Some(client), &target, None).await;
            assert_eq!(status, 200);
            let (src, c) = t.unwrap();
            assert_eq!(*by_client.entry(client).or_insert(src), src, "{client} stays on its address");
            open.push(c);
        }
    }
    let distinct: BTreeSet<_> = by_client.values().collect();
    assert_eq!(distinct.len(), 4, "four clients, four addresses: {by_client:?}");
    assert_eq!(pool_metric(&proxy, "isolation_shared", "p").await, 0.0);
    // A fifth client while all four are held: it shares one, and that is counted.
    let (status, t) = tunnel(&proxy, Some("127.0.0.6"), &target, None).await;
    assert_eq!(status, 200);
    assert!(distinct.contains(&t.unwrap().0));
    assert_eq!(pool_metric(&proxy, "isolation_shared", "p").await, 1.0);
    assert_eq!(pool_metric(&proxy, "tunnels", "p").await, 9.0);
}

fn session_config(dir: &tempfile::TempDir, origin: &Origin, pool: &str, extra: &str) -> String {
    let users = htpasswd(dir, &[("alice", "pw", FAST_COST)]);
    format!(
        "{}[auth]\ncredentials_file = \"{}\"\n[auth.sessions]\nenabled = true\nsession_ttl = \"10m\"\n{extra}",
        config(origin, pool),
        users.display()
    )
}

async fn session_proxy(dir: &tempfile::TempDir, origin: &Origin, pool: &str, extra: &str) -> TestProxy {
    TestProxy::start(&session_config(dir, origin, pool, extra)).await
}

#[tokio::test]
async fn a_session_in_the_user_name_pins_its_address_and_rotate_moves_it() {
    let origin = peer_origin("127.0.0.1:0").await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = session_proxy(&dir, &origin, &format!("{POOL}\nselect = \"rotate\""), "").await;
    let target = origin.addr.to_string();
    let pinned = source(&proxy, None, &target, Some("alice-session-abc123:pw")).await;
    for _ in 0..6 {
        // Plain tunnels in between keep the rotation moving.
        source(&proxy, None, &target, Some("alice:pw")).await;
        assert_eq!(source(&proxy, None, &target, Some("alice-session-abc123:pw")).await, pinned);
    }
    let moved = source(&proxy, None, &target, Some("alice-session-abc123-rotate:pw")).await;
    assert_ne!(moved, pinned, "rotate draws another address");
    assert_eq!(source(&proxy, None, &target, Some("alice-session-abc123:pw")).await, moved, "and re-pins the session");
    // Without a session, a rotating pool rotates: two tunnels in a row differ.
    let a = source(&proxy, None, &target, Some("alice:pw")).await;
    assert_ne!(source(&proxy, None, &target, Some("alice:pw")).await, a);
    assert_eq!(pool_metric(&proxy, "tunnels", "p").await, 17.0);
}

#[tokio::test]
async fn pins_and_counts_survive_a_reload() {
    let origin = peer_origin("127.0.0.1:0").await;
    let dir = tempfile::tempdir().unwrap();
    let text = session_config(&dir, &origin, &format!("{POOL}\nselect = \"rotate\""), "");
    let proxy = TestProxy::start(&text).await;
    let target = origin.addr.to_string();
    let pinned = source(&proxy, None, &target, Some("alice-session-r1:pw")).await;
    proxy.controller.reload(test_config(&text)).expect("reload");
    for _ in 0..4 {
        source(&proxy, None, &target, Some("alice:pw")).await;
        assert_eq!(source(&proxy, None, &target, Some("alice-session-r1:pw")).await, pinned);
    }
    assert_eq!(pool_metric(&proxy, "tunnels", "p").await, 9.0, "the pool's count goes on");
}

#[tokio::test]
async fn a_session_authenticates_as_its_user_and_unknown_parameters_are_refused() {
    let origin = peer_origin("127.0.0.1:0").await;
    let dir = tempfile::tempdir().unwrap();
    let proxy =
        session_proxy(&dir, &origin, &format!("{POOL}\nselect = \"sticky\""), "[limits.per_client]\nmax_tunnels = 2\n")
            .await;
    let target = origin.addr.to_string();
    // Limits are alice's, whatever the session: two tunnels, then 429.
    let (s1, t1) = tunnel(&proxy, None, &target, Some("alice-session-a:pw")).await;
    let (s2, t2) = tunnel(&proxy, None, &target, Some("alice-session-b:pw")).await;
    assert_eq!((s1, s2), (200, 200));
    let (s3, _) = tunnel(&proxy, None, &target, Some("alice-session-c:pw")).await;
    assert_eq!(s3, 429, "alice's cap of 2 counts every session of hers");
    drop((t1, t2));
    // The password checked is alice's.
    let mut c = Client::open(proxy.addr, None, &Front::Plain).await.unwrap();
    let head = c.connect_as(&target, Some("alice-session-a:wrong")).await;
    assert_eq!(head.status, 407);
    drop(c);
    // An unknown parameter: 407 with its own reason, and a challenge like any 407.
    for bad in ["alice-country-de:pw", "alice-session:pw", "alice-session-a.b:pw"] {
        let mut c = Client::open(proxy.addr, None, &Front::Plain).await.unwrap();
        let head = c.connect_as(&target, Some(bad)).await;
        assert_eq!(head.status, 407, "{bad}");
        assert!(head.header("Proxy-Authenticate").is_some(), "{}", head.text);
        let mut body = String::new();
        let _ = bounded(c.read_to_string(&mut body)).await;
        assert!(body.contains("unknown or malformed parameter in the user name"), "{body}");
    }
    // A refusal is counted once its answer is out, so the count may trail the reply a little.
    let counts = eventually(
        "the refusals counted",
        async || {
            let refused = |reason: &str| format!("veilgate_refusals_total{{reason=\"{reason}\"}}");
            (proxy.metric(&refused("auth_session_param")).await, proxy.metric(&refused("auth_required")).await)
        },
        |&(param, wrong)| param >= 3.0 && wrong >= 1.0,
    )
    .await;
    assert_eq!(counts, (3.0, 1.0));
    assert_eq!(proxy.metric("veilgate_auth_hashes_total").await, 4.0, "no hash for a bad parameter");
}

#[tokio::test]
async fn a_pool_without_the_targets_family_refuses_or_falls_back_as_configured() {
    let origin = peer_origin("127.0.0.1:0").await;
    let target = origin.addr.to_string();
    let refusing = TestProxy::start(&config(&origin, "addresses = [\"::1\"]")).await;
    let (status, _) = tunnel(&refusing, None, &target, None).await;
    assert_eq!(status, 502);
    let series = "veilgate_refusals_total{reason=\"egress_family\"}";
    // Counted once the answer is out: the count may trail the reply a little.
    let refused = eventually("the refusal counted", async || refusing.metric(series).await, |n| *n >= 1.0).await;
    assert_eq!(refused, 1.0);
    assert_eq!(pool_metric(&refusing, "failures", "p").await, 1.0);
    assert_eq!(pool_metric(&refusing, "tunnels", "p").await, 0.0);

    let direct = TestProxy::start(&config(&origin, "addresses = [\"::1\"]\nfamily_fallback = \"direct\"")).await;
    assert_eq!(source(&direct, None, &target, None).await, ip("127.0.0.1"), "the kernel's choice");
    assert_eq!(pool_metric(&direct, "tunnels", "p").await, 1.0);
}

#[tokio::test]
async fn a_name_with_both_families_leaves_by_the_family_the_pool_has() {
    // `localhost` answers ::1 and 127.0.0.1 (locally, RFC 6761); the origin listens on IPv4
    // only, and the IPv4-only pool refuses IPv6, so the IPv6 attempt is never made.
    let origin = peer_origin("127.0.0.1:0").await;
    let proxy = TestProxy::start(&config(&origin, "addresses = [\"127.0.0.52\"]")).await;
    let target = format!("localhost:{}", origin.port());
    assert_eq!(source(&proxy, None, &target, None).await, ip("127.0.0.52"));
    assert_eq!(pool_metric(&proxy, "tunnels", "p").await, 1.0);
}

#[tokio::test]
async fn a_route_picks_its_pool_and_others_leave_as_before() {
    let origin = peer_origin("127.0.0.1:0").await;
    let text = format!(
        "{}[[egress.pools]]\nname = \"r\"\naddresses = [\"127.0.0.53\"]\n[[routes]]\nhosts = [\"localhost\"]\negress = \"r\"\n",
        loopback_policy(&[origin.port()])
    );
    let proxy = TestProxy::start(&text).await;
    let by_route = source(&proxy, None, &format!("localhost:{}", origin.port()), None).await;
    assert_eq!(by_route, ip("127.0.0.53"));
    // No default pool: a target no route names leaves from the kernel's choice.
    assert_eq!(source(&proxy, None, &origin.addr.to_string(), None).await, ip("127.0.0.1"));
    assert_eq!(pool_metric(&proxy, "tunnels", "r").await, 1.0);
}

/// Where the prefix test runs: in a network namespace of its own, where it may add the local
/// route a prefix needs. Run by [`prefix_draws_fresh_addresses_in_a_namespace`] only.
const NETNS_ENV: &str = "VEILGATE_EGRESS_NETNS";

#[tokio::test]
async fn prefix_draws_fresh_addresses_in_a_namespace() {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false);
    let runs =
        |cmd: &str, arg: &str| std::process::Command::new(cmd).arg(arg).output().is_ok_and(|o| o.status.success());
    let unshare = runs("unshare", "--version") && runs("ip", "-V");
    if !root || !unshare {
        eprintln!(
            "\n*** SKIPPED prefix_draws_fresh_addresses_in_a_namespace: needs root, unshare and ip \
             (root={root}) to make a network namespace with `ip -6 route add local 2001:db8:1::/48 dev lo` ***\n"
        );
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = tokio::process::Command::new("unshare")
        .args(["--net", "--"])
        .arg(exe)
        .args(["--exact", "prefix_in_namespace", "--ignored", "--nocapture", "--test-threads=1"])
        .env(NETNS_ENV, "1")
        .output();
    let out = bounded(out).await.expect("unshare runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() && text.contains("unshare failed") {
        eprintln!("\n*** SKIPPED prefix_draws_fresh_addresses_in_a_namespace: {text} ***\n");
        return;
    }
    assert!(out.status.success() && text.contains(PREFIX_DONE), "inner test:\n{text}");
}

/// The prefix test proper, inside the namespace the test above made.
#[tokio::test]
#[ignore = "run inside a network namespace by prefix_draws_fresh_addresses_in_a_namespace"]
async fn prefix_in_namespace() {
    if std::env::var(NETNS_ENV).as_deref() != Ok("1") {
        // Outside the namespace it would change the host's routes: only the test above runs it.
        eprintln!("prefix_in_namespace: not in the test's namespace, nothing done");
        return;
    }
    for cmd in [&["link", "set", "lo", "up"][..], &["-6", "route", "add", "local", "2001:db8:1::/48", "dev", "lo"]] {
        let st = std::process::Command::new("ip").args(cmd).status().unwrap();
        assert!(st.success(), "ip {cmd:?}");
    }
    let prefix: ipnet::IpNet = "2001:db8:1::/48".parse().unwrap();
    let origin = peer_origin("[::1]:0").await;
    let target = origin.addr.to_string();
    let rotate = TestProxy::start(&config(&origin, "prefix = \"2001:db8:1::/48\"")).await;
    let mut seen = BTreeSet::new();
    for _ in 0..10 {
        let src = source(&rotate, None, &target, None).await;
        assert!(prefix.contains(&src), "{src} in {prefix}");
        seen.insert(src);
    }
    assert_eq!(seen.len(), 10, "a fresh address per tunnel: {seen:?}");
    assert_eq!(pool_metric(&rotate, "tunnels", "p").await, 10.0);
    // The prefix is IPv6 only: an IPv4 target is refused (family_fallback = "refuse").
    let (status, _) = tunnel(&rotate, None, &format!("127.0.0.1:{}", origin.port()), None).await;
    assert_eq!(status, 502);

    let sticky = TestProxy::start(&config(&origin, "prefix = \"2001:db8:1::/48\"\nselect = \"sticky\"")).await;
    let a = source(&sticky, Some("127.0.0.2"), &target, None).await;
    let b = source(&sticky, Some("127.0.0.3"), &target, None).await;
    assert!(prefix.contains(&a) && prefix.contains(&b) && a != b, "{a} {b}");
    for _ in 0..3 {
        assert_eq!(source(&sticky, Some("127.0.0.2"), &target, None).await, a);
    }
    eprintln!("{PREFIX_DONE}");
}

/// What the inner test prints when it got to its end, for the outer one to look for.
const PREFIX_DONE: &str = "prefix test done inside its namespace";
