//! Proxy authentication under pressure: wrong passwords from one address cannot lock other
//! clients out, attempts that need a hash are bounded per address before any hash, and a
//! repeated wrong header costs no second hash.

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

async fn proxy_with_users(
    dir: &tempfile::TempDir,
    users: &[(&str, &str, u32)],
    auth: &str,
    origin: &Origin,
) -> TestProxy {
    let toml = format!(
        "[auth]\ncredentials_file = \"{}\"\n{auth}\n{}",
        htpasswd(dir, users).display(),
        loopback_policy(&[origin.port()])
    );
    TestProxy::start(&toml).await
}

/// CONNECT with `user:password` (if any) from `from`; the reply head.
async fn connect_as(proxy: &TestProxy, from: &str, target: &str, credentials: Option<&str>) -> ReplyHead {
    let mut s = Client::open(proxy.addr, Some(ip(from)), &Front::Plain).await.unwrap();
    let head = s.connect_as(target, credentials).await;
    if head.status == 200 {
        s.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        bounded(s.read_exact(&mut echo)).await.unwrap();
        assert_eq!(&echo, b"ping");
    }
    head
}

async fn refusals(proxy: &TestProxy, reason: &str) -> f64 {
    proxy.metric(&format!("veilgate_refusals_total{{reason=\"{reason}\"}}")).await
}

async fn hashes(proxy: &TestProxy) -> f64 {
    proxy.metric("veilgate_auth_hashes_total").await
}

/// The lock-out: sixty concurrent wrong passwords from one address, at a cost that keeps the
/// verification slots busy for many seconds. Another client's right password must still be
/// verified at once, not after the queue (and never answered 407).
#[tokio::test]
async fn wrong_passwords_from_one_address_do_not_lock_out_another() {
    let origin = Origin::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let users = [("alice", "wonderland", 10), ("bob", "builder", 4)];
    let proxy = std::sync::Arc::new(proxy_with_users(&dir, &users, "", &origin).await);
    let t = origin.addr.to_string();
    let attackers: Vec<_> = (0..60)
        .map(|i| {
            let (proxy, t) = (std::sync::Arc::clone(&proxy), t.clone());
            tokio::spawn(async move { connect_as(&proxy, "127.0.0.2", &t, Some(&format!("alice:wrong{i}"))).await })
        })
        .collect();
    // Once most attempts were turned away, the first twenty (the burst) are waiting or hashing.
    eventually("30 attempts turned away", async || refusals(&proxy, "auth_attempts").await, |n| *n >= 30.0).await;
    let started = Instant::now();
    let bob = connect_as(&proxy, "127.0.0.3", &t, Some("bob:builder")).await;
    let waited = started.elapsed();
    assert_eq!(bob.status, 200, "{}", bob.text);
    assert!(waited < Duration::from_secs(1), "bob waited {waited:?} behind another address's attempts");

    let mut statuses = Vec::new();
    for a in attackers {
        statuses.push(bounded(a).await.unwrap());
    }
    let count = |status: u16| statuses.iter().filter(|h| h.status == status).count() as f64;
    let (n407, n429, n503) = (count(407), count(429), count(503));
    assert_eq!(n407 + n429 + n503, 60.0, "only these answers");
    assert!(n429 >= 35.0, "the burst of 20 (plus what 5/s refilled) was all that got through: {n429}");
    assert!(n407 >= 1.0, "the first attempts were judged");
    for h in statuses.iter().filter(|h| h.status == 429) {
        assert_eq!(h.header("Retry-After"), Some("1"), "{}", h.text);
    }
    assert_eq!(refusals(&proxy, "auth_attempts").await, n429);
    assert_eq!(refusals(&proxy, "auth_required").await, n407);
    assert_eq!(refusals(&proxy, "auth_busy").await, n503);
    assert_eq!(hashes(&proxy).await, n407 + 1.0, "one hash per judged attempt, and bob's");
}

/// Past the per-address budget: 429 + Retry-After and no hash; other addresses unaffected.
#[tokio::test]
async fn attempts_past_the_per_address_limit_get_429_and_no_hash() {
    let origin = Origin::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let auth = "attempts_per_second = 1\nattempts_burst = 3";
    let proxy = proxy_with_users(&dir, &[("alice", "wonderland", 4)], auth, &origin).await;
    let t = origin.addr.to_string();
    for i in 0..3 {
        let h = connect_as(&proxy, "127.0.0.2", &t, Some(&format!("alice:wrong{i}"))).await;
        assert_eq!(h.status, 407, "{}", h.text);
    }
    for i in 3..5 {
        let h = connect_as(&proxy, "127.0.0.2", &t, Some(&format!("alice:wrong{i}"))).await;
        assert_eq!(h.status, 429, "{}", h.text);
        assert_eq!(h.header("Retry-After"), Some("1"));
    }
    // Without a header there is nothing to hash: still 407, not 429.
    assert_eq!(connect_as(&proxy, "127.0.0.2", &t, None).await.status, 407);
    assert_eq!(hashes(&proxy).await, 3.0, "no hash past the budget");
    assert_eq!(refusals(&proxy, "auth_attempts").await, 2.0);
    assert_eq!(refusals(&proxy, "auth_required").await, 4.0);
    // The budget is the address's, not the user's.
    assert_eq!(connect_as(&proxy, "127.0.0.3", &t, Some("alice:wonderland")).await.status, 200);
    assert_eq!(hashes(&proxy).await, 4.0);
    // And a verified header is answered from the cache, even from the address out of budget.
    assert_eq!(connect_as(&proxy, "127.0.0.2", &t, Some("alice:wonderland")).await.status, 200);
    assert_eq!(hashes(&proxy).await, 4.0);
    assert_eq!(proxy.metric("veilgate_limiter_keys{limiter=\"auth_attempts\"}").await, 2.0);
}

/// A wrong header sent again is refused from the failure cache: 407 again, no second hash.
#[tokio::test]
async fn a_repeated_wrong_header_costs_one_hash() {
    let origin = Origin::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = proxy_with_users(&dir, &[("alice", "wonderland", 4)], "", &origin).await;
    let t = origin.addr.to_string();
    for _ in 0..5 {
        let h = connect_as(&proxy, "127.0.0.2", &t, Some("alice:wrong")).await;
        assert_eq!(h.status, 407);
        assert_eq!(h.header("Proxy-Authenticate"), Some("Basic realm=\"veilgate\""));
    }
    // An unknown name is remembered the same way.
    for _ in 0..5 {
        assert_eq!(connect_as(&proxy, "127.0.0.2", &t, Some("mallory:x")).await.status, 407);
    }
    assert_eq!(hashes(&proxy).await, 2.0);
    assert_eq!(refusals(&proxy, "auth_required").await, 10.0);
    assert_eq!(refusals(&proxy, "auth_attempts").await, 0.0);
    assert_eq!(connect_as(&proxy, "127.0.0.2", &t, Some("alice:wonderland")).await.status, 200);
    assert_eq!(hashes(&proxy).await, 3.0);
}

/// `veilgate probe` through a proxy that requires credentials: given in the URL (percent-
/// decoded) or with `--proxy-user`, and, with `-c`, the origin resolved by the config's
/// `[dns] hosts` as the proxy resolves it.
#[tokio::test]
async fn the_probe_authenticates_and_resolves_with_the_config() {
    use common::tls::{RecordingOrigin, TestPki};
    use veilgate::probe::{Options, Verdict, probe_with};
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new();
    let origin = RecordingOrigin::start(&pki).await;
    let port = origin.addr.port();
    let roots = dir.path().join("roots.pem");
    std::fs::write(&roots, &pki.ca_pem).unwrap();
    let hosts = "[dns.hosts]\n\"origin.test\" = \"127.0.0.1\"\n";
    let toml = format!(
        "[auth]\ncredentials_file = \"{}\"\n{}{hosts}",
        htpasswd(&dir, &[("alice", "p@ss:word", FAST_COST)]).display(),
        loopback_policy(&[port])
    );
    let proxy = TestProxy::start(&toml).await;
    let target = format!("https://127.0.0.1:{port}");

    let with_url = format!("http://alice:p%40ss%3Aword@{}", proxy.addr);
    let report = bounded(probe_with(&with_url, &target, Some(&roots), &Options::default())).await.unwrap();
    assert_eq!(report.verdict(), Verdict::BlindTunnel, "{}", report.render());

    let bare = format!("http://{}", proxy.addr);
    let err = bounded(probe_with(&bare, &target, Some(&roots), &Options::default())).await.unwrap_err();
    assert!(err.to_string().contains("407 ") && err.to_string().contains("--proxy-user"), "{err}");
    let wrong = Options { proxy_user: Some("alice:nope".into()), dns: None, proxy_ca: None };
    let err = bounded(probe_with(&bare, &target, Some(&roots), &wrong)).await.unwrap_err();
    assert!(err.to_string().contains("did not accept these credentials"), "{err}");
    assert_eq!(refusals(&proxy, "auth_required").await, 2.0);

    // The binary: --proxy-user, and a name only the config's [dns] hosts knows (no query is
    // ever sent: without -c this name would go to the system resolver, so that is not run).
    let config = dir.path().join("probe.toml");
    std::fs::write(&config, hosts).unwrap();
    let args: Vec<String> = [
        "probe",
        "--proxy",
        &bare,
        "--proxy-user",
        "alice:p@ss:word",
        "-c",
        config.to_str().unwrap(),
        "--ca-file",
        roots.to_str().unwrap(),
        &format!("https://origin.test:{port}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = bounded(tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_veilgate")).args(&args).env_remove("VEILGATE_CONFIG").output()
    }))
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("verdict: blind tunnel"), "{stdout}");
}
