//! The cluster backend against a real `redis-server` on loopback: two veilgate instances
//! sharing caps and the new-tunnel rate, releases across instances, a killed instance's
//! slots coming back within `lease_ttl`, and each fail mode while Redis is down and after it
//! is back. Without `redis-server` every test here says SKIPPED on stderr and returns.

mod common;

use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::child::Veilgate;
use common::redis::RedisServer;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Config text for one instance on `redis` with `extra` limits.
fn cluster_config(redis: &RedisServer, fail_mode: &str, origin: &Origin, extra: &str) -> String {
    format!(
        "[cluster]\nbackend = \"redis\"\nredis_url = \"{}\"\nlease_ttl = \"3s\"\ntimeout = \"200ms\"\nfail_mode = \"{fail_mode}\"\n{extra}\n{}",
        redis.url(),
        loopback_policy(&[origin.port()])
    )
}

async fn start(redis: &RedisServer, fail_mode: &str, origin: &Origin, extra: &str) -> TestProxy {
    let proxy = TestProxy::start(&cluster_config(redis, fail_mode, origin, extra)).await;
    wait_mode(&proxy, "redis").await;
    proxy
}

async fn wait_mode(proxy: &TestProxy, mode: &str) {
    let series = format!("veilgate_cluster_mode{{mode=\"{mode}\"}}");
    eventually(&format!("cluster mode {mode}"), async || proxy.metric(&series).await, |v| *v == 1.0).await;
}

async fn open(proxy: &TestProxy, from: &str, origin: &Origin) -> (u16, TcpStream) {
    let (head, s) = connect_from(proxy.addr, Some(ip(from)), &origin.addr.to_string()).await;
    (head.status, s)
}

async fn echoes(s: &mut TcpStream) {
    s.write_all(b"still here").await.unwrap();
    let mut b = [0u8; 10];
    bounded(s.read_exact(&mut b)).await.unwrap();
    assert_eq!(&b, b"still here");
}

async fn metric(proxy: &TestProxy, series: &str) -> f64 {
    proxy.metric(series).await
}

/// Waits until `reason` has been counted `n` times: a refusal is counted after its answer is
/// written and the connection is closed.
async fn refusals(proxy: &TestProxy, reason: &str, n: f64) {
    let series = format!("veilgate_refusals_total{{reason=\"{reason}\"}}");
    eventually(&format!("{n} {reason} refusals"), async || proxy.metric(&series).await, |v| *v == n).await;
}

#[tokio::test]
async fn a_client_cap_holds_across_instances_and_a_release_frees_it_for_both() {
    let Some(redis) = RedisServer::start("a_client_cap_holds_across_instances") else { return };
    let origin = Origin::echo().await;
    let limits = "[limits.per_client]\nmax_tunnels = 2";
    let a = start(&redis, "closed", &origin, limits).await;
    let b = start(&redis, "closed", &origin, limits).await;
    let (s1, mut t1) = open(&a, "127.0.0.2", &origin).await;
    let (s2, _t2) = open(&a, "127.0.0.2", &origin).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(open(&b, "127.0.0.2", &origin).await.0, 429, "the third tunnel, on the other instance");
    assert_eq!(open(&a, "127.0.0.2", &origin).await.0, 429, "and on the same one");
    assert_eq!(open(&b, "127.0.0.3", &origin).await.0, 200, "another client has its own cap");
    refusals(&b, "client_cap", 1.0).await;
    assert_eq!(metric(&a, "veilgate_cluster_decisions_total{result=\"admitted\"}").await, 2.0);
    assert_eq!(metric(&a, "veilgate_cluster_decisions_total{result=\"refused\"}").await, 1.0);
    assert_eq!(metric(&b, "veilgate_cluster_decisions_total{result=\"admitted\"}").await, 1.0);
    assert_eq!(metric(&b, "veilgate_cluster_errors_total{kind=\"connection\"}").await, 0.0);
    assert_eq!(redis.command("ZCARD vg:{v4:127.0.0.2}:conn").trim(), ":2");
    echoes(&mut t1).await;
    // A release on A frees a place that B can take; a cap refusal wrote nothing.
    drop(t1);
    let (status, _t3) =
        eventually("B admits once A released", async || open(&b, "127.0.0.2", &origin).await, |r| r.0 == 200).await;
    assert_eq!(status, 200);
    assert_eq!(open(&a, "127.0.0.2", &origin).await.0, 429, "full again, across both");
    assert_eq!(metric(&a, "veilgate_cluster_decision_duration_seconds_count").await, 4.0);
}

#[tokio::test]
async fn the_global_cap_and_a_route_cap_hold_across_instances() {
    let Some(redis) = RedisServer::start("the_global_cap_and_a_route_cap_hold_across_instances") else { return };
    let origin = Origin::echo().await;
    let limits = "[limits]\nmax_tunnels = 3\n[[routes]]\nhosts = [\"127.0.0.1\"]\n[routes.per_client]\nmax_tunnels = 1";
    let a = start(&redis, "closed", &origin, limits).await;
    let b = start(&redis, "closed", &origin, limits).await;
    let (s1, _t1) = open(&a, "127.0.0.2", &origin).await;
    assert_eq!(s1, 200);
    assert_eq!(open(&b, "127.0.0.2", &origin).await.0, 429, "the route's cap of 1 for this client, across instances");
    refusals(&b, "route_cap", 1.0).await;
    let (s2, _t2) = open(&b, "127.0.0.3", &origin).await;
    let (s3, _t3) = open(&a, "127.0.0.4", &origin).await;
    assert_eq!((s2, s3), (200, 200));
    assert_eq!(open(&b, "127.0.0.5", &origin).await.0, 503, "the global cap of 3, across instances");
    refusals(&b, "global_cap", 1.0).await;
    assert_eq!(redis.command("ZCARD vg:{global}:conn").trim(), ":3", "the route refusal gave its global place back");
}

#[tokio::test]
async fn the_new_tunnel_rate_is_shared_across_instances() {
    let Some(redis) = RedisServer::start("the_new_tunnel_rate_is_shared_across_instances") else { return };
    let origin = Origin::echo().await;
    let limits = "[limits.per_client]\nnew_tunnels_per_second = 1\nnew_tunnels_burst = 2";
    let a = start(&redis, "closed", &origin, limits).await;
    let b = start(&redis, "closed", &origin, limits).await;
    assert_eq!(open(&a, "127.0.0.2", &origin).await.0, 200);
    assert_eq!(open(&b, "127.0.0.2", &origin).await.0, 200);
    // The burst of 2 is spent across both; the next on either waits for the next token (1 s).
    for proxy in [&a, &b] {
        let (head, _s) = connect_from(proxy.addr, Some(ip("127.0.0.2")), &origin.addr.to_string()).await;
        assert_eq!(head.status, 429, "{}", head.text);
        assert_eq!(head.header("Retry-After"), Some("1"));
        refusals(proxy, "client_rate", 1.0).await;
    }
    assert_eq!(open(&b, "127.0.0.3", &origin).await.0, 200, "another client has its own rate");
}

#[tokio::test]
async fn a_refused_tunnel_spends_no_rate_token() {
    let Some(redis) = RedisServer::start("a_refused_tunnel_spends_no_rate_token") else { return };
    let origin = Origin::echo().await;
    // Two new tunnels per burst, one more a second; one tunnel at a time.
    let limits = "[limits.per_client]\nmax_tunnels = 1\nnew_tunnels_per_second = 1\nnew_tunnels_burst = 2";
    let a = start(&redis, "closed", &origin, limits).await;
    let b = start(&redis, "closed", &origin, limits).await;
    let (s, held) = open(&a, "127.0.0.4", &origin).await;
    assert_eq!(s, 200, "the first token");
    // Five cap refusals on B while A holds the slot. Had each spent a token, the GCRA would
    // be about 5 s in debt and B's next tunnel refused for its rate.
    for _ in 0..5 {
        let (head, _s) = connect_from(b.addr, Some(ip("127.0.0.4")), &origin.addr.to_string()).await;
        assert_eq!(head.status, 429);
        assert_eq!(head.header("Retry-After"), None, "a cap refusal, not a rate one");
    }
    drop(held);
    // Until A's release reaches Redis B is refused by the cap (which spends nothing either).
    let (status, retry_after, _t) = eventually(
        "B admitted, or refused for the rate",
        async || {
            let (h, s) = connect_from(b.addr, Some(ip("127.0.0.4")), &origin.addr.to_string()).await;
            (h.status, h.header("Retry-After").map(str::to_string), s)
        },
        |(status, retry_after, _)| *status == 200 || retry_after.is_some(),
    )
    .await;
    assert_eq!((status, retry_after), (200, None), "the second token was still there");
    refusals(&b, "client_rate", 0.0).await;
}

#[tokio::test]
async fn fail_mode_closed_refuses_new_tunnels_keeps_running_ones_and_recovers() {
    let Some(mut redis) = RedisServer::start("fail_mode_closed") else { return };
    let origin = Origin::echo().await;
    let a = start(&redis, "closed", &origin, "[limits.per_client]\nmax_tunnels = 2").await;
    let (s, mut running) = open(&a, "127.0.0.6", &origin).await;
    assert_eq!(s, 200);
    redis.stop();
    for i in 0..3 {
        let started = Instant::now();
        let (head, _s) = connect_from(a.addr, Some(ip("127.0.0.6")), &origin.addr.to_string()).await;
        assert_eq!(head.status, 503, "attempt {i}: {}", head.text);
        assert!(started.elapsed() < Duration::from_secs(1), "answered within the decision budget");
    }
    refusals(&a, "cluster_unavailable", 3.0).await;
    wait_mode(&a, "closed").await;
    assert_eq!(a.admin_get("/readyz").await.0, 503, "a balancer should take this instance out");
    assert!(metric(&a, "veilgate_cluster_errors_total{kind=\"connection\"}").await >= 1.0);
    echoes(&mut running).await;
    // Redis comes back empty: the running tunnel's lease is written again before any
    // admission asks, so the cap of 2 leaves room for exactly one more.
    redis.restart();
    wait_mode(&a, "redis").await;
    assert_eq!(a.admin_get("/readyz").await.0, 200);
    assert_eq!(redis.command("ZCARD vg:{v4:127.0.0.6}:conn").trim(), ":1", "the running tunnel re-registered");
    let (s, _t2) = open(&a, "127.0.0.6", &origin).await;
    assert_eq!(s, 200);
    assert_eq!(open(&a, "127.0.0.6", &origin).await.0, 429);
    echoes(&mut running).await;
}

/// Two instances, both counted in Redis, then Redis stops: `mode` decides what one instance
/// admits of a per-client cap of 2. Returns the statuses of three tunnels.
async fn admitted_while_redis_is_down(mode: &str) -> Option<Vec<u16>> {
    let mut redis = RedisServer::start(&format!("fail_mode_{mode}"))?;
    let origin = Origin::echo().await;
    let limits = "[limits.per_client]\nmax_tunnels = 2";
    let a = start(&redis, mode, &origin, limits).await;
    let _b = start(&redis, mode, &origin, limits).await;
    eventually("A counts two instances", async || metric(&a, "veilgate_cluster_instances").await, |n| *n == 2.0).await;
    redis.stop();
    let mut held = Vec::new();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let (s, t) = open(&a, "127.0.0.7", &origin).await;
        statuses.push(s);
        held.push(t);
    }
    refusals(&a, "cluster_unavailable", 0.0).await;
    wait_mode(&a, mode).await;
    // Back: the tunnels the fail mode admitted count in Redis, and admission asks it again.
    redis.restart();
    wait_mode(&a, "redis").await;
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(redis.command("ZCARD vg:{v4:127.0.0.7}:conn").trim(), format!(":{admitted}"));
    let (s, _t) = open(&a, "127.0.0.7", &origin).await;
    assert_eq!(s, if admitted < 2 { 200 } else { 429 }, "the cluster cap again");
    Some(statuses)
}

#[tokio::test]
async fn fail_mode_local_divides_the_cap_by_the_live_instances() {
    if let Some(statuses) = admitted_while_redis_is_down("local").await {
        assert_eq!(statuses, [200, 429, 429], "a cap of 2 over 2 instances: 1 here");
    }
}

#[tokio::test]
async fn fail_mode_open_enforces_the_local_limits_only() {
    if let Some(statuses) = admitted_while_redis_is_down("open").await {
        assert_eq!(statuses, [200, 200, 429], "the whole cap of 2 here");
    }
}

#[tokio::test]
async fn an_instance_starts_while_redis_is_down_and_joins_when_it_is_up() {
    let Some(mut redis) = RedisServer::start("an_instance_starts_while_redis_is_down") else { return };
    let origin = Origin::echo().await;
    redis.stop();
    let a = TestProxy::start(&cluster_config(&redis, "local", &origin, "[limits.per_client]\nmax_tunnels = 1")).await;
    assert_eq!(metric(&a, "veilgate_cluster_mode{mode=\"local\"}").await, 1.0);
    let (s, _t) = open(&a, "127.0.0.9", &origin).await;
    assert_eq!(s, 200, "served on local limits");
    assert_eq!(a.admin_get("/readyz").await.0, 200);
    redis.restart();
    wait_mode(&a, "redis").await;
    assert_eq!(redis.command("ZCARD vg:{v4:127.0.0.9}:conn").trim(), ":1");
    assert_eq!(open(&a, "127.0.0.9", &origin).await.0, 429);
}

#[tokio::test]
async fn a_killed_instance_gives_its_slots_back_within_the_lease_ttl() {
    let Some(redis) = RedisServer::start("a_killed_instance_gives_its_slots_back") else { return };
    let origin = Origin::echo().await;
    let limits = "[limits.per_client]\nmax_tunnels = 2";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("veilgate.toml");
    std::fs::write(&file, cluster_config(&redis, "closed", &origin, limits)).unwrap();
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (listen, admin) = (free(), free());
    let child = Command::new(env!("CARGO_BIN_EXE_veilgate"))
        .args(["run", "--config"])
        .arg(&file)
        .args(["--listen", &listen.to_string(), "--admin-listen", &admin.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut killed = Veilgate(child);
    let b = start(&redis, "closed", &origin, limits).await;
    let mode = async || {
        let Ok(mut s) = TcpStream::connect(admin).await else { return None };
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.ok()?;
        let mut out = String::new();
        bounded(s.read_to_string(&mut out)).await.ok()?;
        metric_value(&out, "veilgate_cluster_mode{mode=\"redis\"}")
    };
    eventually("the child instance asks Redis", mode, |m| *m == Some(1.0)).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let (head, s) = connect_from(listen, Some(ip("127.0.0.8")), &origin.addr.to_string()).await;
        assert_eq!(head.status, 200);
        held.push(s);
    }
    assert_eq!(open(&b, "127.0.0.8", &origin).await.0, 429);
    killed.0.kill().unwrap(); // SIGKILL: no release, no goodbye
    killed.0.wait().unwrap();
    let died = Instant::now();
    assert_eq!(open(&b, "127.0.0.8", &origin).await.0, 429, "the leases outlive the process for a while");
    let (status, _t) = eventually_within(
        Duration::from_secs(6),
        "the dead instance's leases expire",
        async || open(&b, "127.0.0.8", &origin).await,
        |r| r.0 == 200,
    )
    .await;
    assert_eq!(status, 200);
    let took = died.elapsed();
    // The leases end at most lease_ttl (3 s) after the last renewal; 1 s for the polling.
    assert!(took <= Duration::from_secs(4), "back within lease_ttl: {took:?}");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_bandwidth_holds_across_instances_by_grants() {
    let Some(redis) = RedisServer::start("a_client_bandwidth_holds_across_instances") else { return };
    let origin = Origin::source().await;
    let limits = "[limits.per_client]\nbandwidth_down = \"512 KiB/s\"";
    let a = start(&redis, "closed", &origin, limits).await;
    let b = start(&redis, "closed", &origin, limits).await;
    assert_the_fleet_holds_the_client_rate(&a, &b, &origin).await;
}

/// Redis' count of `EVALSHA` calls since the last `CONFIG RESETSTAT`.
fn evalsha_calls(redis: &RedisServer) -> u64 {
    let stats = redis.command("INFO commandstats");
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Redis' count of calls of `command` (lower case) since the last `CONFIG RESETSTAT`.
fn calls(redis: &RedisServer, command: &str) -> u64 {
    let stats = redis.command("INFO commandstats");
    let prefix = format!("cmdstat_{command}:calls=");
    stats
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_pass_costs_two_commands_per_set_not_per_lease() {
    let Some(redis) = RedisServer::start("a_renewal_pass_costs_two_commands_per_set") else { return };
    let origin = Origin::echo().await;
    let a =
        start(&redis, "closed", &origin, "[limits]\nmax_tunnels = 100\n[limits.per_client]\nmax_tunnels = 10").await;
    // Three clients with four tunnels each: twelve leases in four sets (three clients' and
    // the global one).
    let mut held = Vec::new();
    for client in ["127.0.0.20", "127.0.0.21", "127.0.0.22"] {
        for _ in 0..4 {
            let (status, s) = open(&a, client, &origin).await;
            assert_eq!(status, 200);
            held.push(s);
        }
    }
    let renewals = async || a.metric("veilgate_cluster_lease_renewals_total").await;
    let before = eventually("a first renewal of the twelve", renewals, |n| *n >= 12.0).await;
    redis.command("CONFIG RESETSTAT");
    let from = renewals().await;
    eventually("two more renewal passes", renewals, |n| *n >= from + 24.0).await;
    let (pexpire, zadd) = (calls(&redis, "pexpire"), calls(&redis, "zadd"));
    let passes = ((renewals().await - from) / 12.0).ceil() as u64 + 1;
    assert!(before >= 12.0);
    // Per pass: one PEXPIRE per set (4), one ZADD per set and the heartbeat's (5). Per lease,
    // it was 24 and 25.
    assert!((8..=4 * passes).contains(&pexpire), "{pexpire} PEXPIRE in about {passes} passes");
    assert!((10..=5 * passes).contains(&zadd), "{zadd} ZADD in about {passes} passes");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_client_costs_redis_one_call_per_grant() {
    let Some(redis) = RedisServer::start("a_saturated_client_costs_redis_one_call_per_grant") else { return };
    let origin = Origin::source().await;
    let a = start(&redis, "closed", &origin, "[limits.per_client]\nbandwidth_down = \"512 KiB/s\"").await;
    redis.command("CONFIG RESETSTAT");
    let mib = 1u64 << 20;
    assert_eq!(download(&a, "127.0.0.12", &origin, mib).await, mib);
    let grants = metric(&a, "veilgate_cluster_bandwidth_grants_total").await as u64;
    let calls = evalsha_calls(&redis);
    // About 20 grants of 100 ms for 2 s; the calls are those grants, the tunnel's admission,
    // and a few asks that met another's spending or a late tick. Asking again before the
    // bucket could answer yes made it twice the grants.
    assert!((15..=30).contains(&grants), "{grants} grants for 1 MiB at 512 KiB/s");
    assert!(calls <= grants + grants / 4 + 3, "{calls} script calls for {grants} grants");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_download_goes_on_at_its_local_share_while_redis_is_down() {
    let Some(mut redis) = RedisServer::start("a_running_download_goes_on_while_redis_is_down") else { return };
    let origin = Origin::source().await;
    let a = start(&redis, "closed", &origin, "[limits.per_client]\nbandwidth_down = \"512 KiB/s\"").await;
    let mib = 1u64 << 20;
    let started = Instant::now();
    let transfer = download(&a, "127.0.0.11", &origin, mib);
    let outage = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        redis.stop();
    };
    let (got, ()) = tokio::join!(transfer, outage);
    let took = started.elapsed();
    assert_eq!(got, mib, "the tunnel kept its bytes coming (fed locally at rate / 1 instance)");
    assert!(took >= Duration::from_millis(1600) && took <= Duration::from_secs(6), "1 MiB at 512 KiB/s in {took:?}");
    wait_mode(&a, "closed").await;
}

/// Counts this thread's allocations, for the one test that checks the local backend's admit
/// path allocates nothing (the cluster backend's match arm must cost it nothing).
struct Counting;

thread_local! {
    static ALLOCATIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's contract is passed on.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: the caller's contract is passed on.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

#[tokio::test(flavor = "current_thread")]
async fn the_local_backend_admits_a_known_client_without_allocating() {
    use veilgate::limits::{AdmitRequest, ClientKey, Governor};
    let config = veilgate::Config::from_toml(
        "[limits]\nmax_tunnels = 100\n[limits.per_client]\nmax_tunnels = 4\nnew_tunnels_per_second = 1000",
        "test",
    )
    .unwrap();
    let g = Governor::new(&config);
    let client = ClientKey::V4("127.0.0.2".parse().unwrap());
    let req = AdmitRequest { client: &client, route: None };
    drop(g.admit(req).await.unwrap()); // the client's pool and rate key are made once
    let before = ALLOCATIONS.with(|n| n.get());
    for _ in 0..100 {
        drop(g.admit(req).await.unwrap());
    }
    assert_eq!(ALLOCATIONS.with(|n| n.get()) - before, 0, "admitting a known client allocates nothing");
}
