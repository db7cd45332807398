//! Three in-process veilgate instances behind a real HAProxy (`mode tcp`, `balance
//! roundrobin`, `send-proxy-v2`, health checks on each admin port's `/readyz`), sharing their
//! limits through a real `redis-server`: the PROXY source is the limiter key across the fleet
//! (and with `backend = "local"` each instance counts alone), a connection that goes round
//! HAProxy is refused, and a Redis that stops answering (`SIGSTOP`) gets every admission
//! answered at once by the fail mode until `SIGCONT` brings the cluster limits back; an
//! instance that drains leaves HAProxy's pool through its `/readyz`. Without
//! `redis-server` or `haproxy` each test says SKIPPED on stderr and returns.

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::haproxy::Haproxy;
use common::redis::RedisServer;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The per-client tunnel cap the fleet shares.
const CAP: usize = 4;
/// Instances behind HAProxy.
const INSTANCES: usize = 3;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// One instance's config: PROXY protocol required from HAProxy (127.0.0.1), a per-client cap
/// of [`CAP`] and `per_client` more of that table, and `cluster` as the `[cluster]` body.
fn instance_config_with(cluster: &str, origin: &Origin, per_client: &str) -> String {
    format!(
        "[server]\nproxy_protocol = \"required\"\nproxy_protocol_from = [\"127.0.0.1/32\"]\n\
         [cluster]\n{cluster}\n[limits.per_client]\nmax_tunnels = {CAP}\n{per_client}\n{}",
        loopback_policy(&[origin.port()])
    )
}

/// The instances, each started with `extra` limits and, on the Redis backend, deciding in
/// Redis before it is returned.
async fn start_instances(cluster: &str, origin: &Origin, extra: &str) -> Vec<TestProxy> {
    let mut instances = Vec::new();
    for _ in 0..INSTANCES {
        let p = TestProxy::start(&instance_config_with(cluster, origin, extra)).await;
        if cluster.contains("redis") {
            wait_mode(&p, "redis").await;
        }
        instances.push(p);
    }
    instances
}

fn redis_cluster(redis: &RedisServer, fail_mode: &str, timeout: &str) -> String {
    format!(
        "backend = \"redis\"\nredis_url = \"{}\"\nlease_ttl = \"2s\"\ntimeout = \"{timeout}\"\nfail_mode = \"{fail_mode}\"",
        redis.url()
    )
}

/// HAProxy in front of `instances`, with the settings of deploy/haproxy/haproxy.cfg (mode
/// tcp, roundrobin, send-proxy-v2 to the proxy port, `option httpchk GET /readyz` on the
/// admin port, redispatch) but check intervals short enough for a test.
fn haproxy_body(instances: &[TestProxy]) -> String {
    let mut body = String::from(
        "defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n  retries 2\n  option redispatch\n\
         frontend proxy\n  bind {front}\n  default_backend veilgate\n\
         backend veilgate\n  balance roundrobin\n  option httpchk GET /readyz\n  http-check expect status 200\n\
         default-server inter 500ms fastinter 200ms downinter 200ms fall 2 rise 2\n",
    );
    for (i, p) in instances.iter().enumerate() {
        let admin = p.admin.expect("admin listener").port();
        body.push_str(&format!("  server vg{} {} send-proxy-v2 check port {admin}\n", i + 1, p.addr));
    }
    body
}

async fn start_haproxy(test: &str, instances: &[TestProxy]) -> Option<Haproxy> {
    let h = Haproxy::start(test, &haproxy_body(instances))?;
    all_servers(&h, "UP").await;
    Some(h)
}

/// Waits until HAProxy sees every instance in `status` (its health checks decide).
async fn all_servers(h: &Haproxy, status: &str) {
    eventually(
        &format!("HAProxy sees every instance {status}"),
        async || h.server_status("veilgate"),
        |s| s.len() == INSTANCES && s.iter().all(|(_, st)| st == status),
    )
    .await;
}

async fn wait_mode(proxy: &TestProxy, mode: &str) {
    let series = format!("veilgate_cluster_mode{{mode=\"{mode}\"}}");
    eventually(&format!("cluster mode {mode}"), async || proxy.metric(&series).await, |v| *v == 1.0).await;
}

async fn sum(instances: &[TestProxy], series: &str) -> f64 {
    let mut total = 0.0;
    for p in instances {
        total += p.metric(series).await;
    }
    total
}

/// `attempts` CONNECTs through HAProxy from `from`, one after another; the statuses and the
/// admitted tunnels (held open, so each keeps its slot).
async fn attempts(front: std::net::SocketAddr, from: &str, origin: &Origin, n: usize) -> (Vec<u16>, Vec<TcpStream>) {
    let mut statuses = Vec::new();
    let mut held = Vec::new();
    for _ in 0..n {
        let (head, s) = connect_from(front, Some(ip(from)), &origin.addr.to_string()).await;
        statuses.push(head.status);
        if head.status == 200 {
            held.push(s);
        }
    }
    (statuses, held)
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

async fn echoes(s: &mut TcpStream) {
    s.write_all(b"still here").await.unwrap();
    let mut b = [0u8; 10];
    bounded(s.read_exact(&mut b)).await.unwrap();
    assert_eq!(&b, b"still here");
}

/// Three instances with `cluster`, HAProxy in front, 15 attempts from each of 127.0.0.2 and
/// 127.0.0.3 (5 per instance by round robin): the statuses per client, with the instances
/// (to look at) and every tunnel still held.
struct Run {
    instances: Vec<TestProxy>,
    two: Vec<u16>,
    three: Vec<u16>,
    _held: Vec<TcpStream>,
    _haproxy: Haproxy,
}

async fn fifteen_each(test: &str, cluster: &str, origin: &Origin) -> Option<Run> {
    let instances = start_instances(cluster, origin, "").await;
    let haproxy = start_haproxy(test, &instances).await?;
    // Counted from here: HAProxy's start-up probe (a bare connect) reached one instance too.
    let proxied = "veilgate_proxy_protocol_headers_total{kind=\"proxied\"}";
    let mut before = Vec::new();
    for p in &instances {
        before.push(p.metric(proxied).await);
    }
    let (two, mut held) = attempts(haproxy.front, "127.0.0.2", origin, 15).await;
    let (three, more) = attempts(haproxy.front, "127.0.0.3", origin, 15).await;
    held.extend(more);
    for s in &mut held {
        echoes(s).await;
    }
    // Round robin spread them: every instance saw its share of PROXY headers.
    for (i, p) in instances.iter().enumerate() {
        let seen = p.metric(proxied).await - before[i];
        assert_eq!(seen, 10.0, "instance {i}: 30 connections round robin over 3");
        assert_eq!(p.controller.active_for_ip(ip("127.0.0.1")), 0, "HAProxy is nobody's client");
    }
    Some(Run { instances, two, three, _held: held, _haproxy: haproxy })
}

async fn active(instances: &[TestProxy], from: &str) -> u32 {
    instances.iter().map(|p| p.controller.active_for_ip(ip(from))).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_haproxy_the_proxy_source_is_the_key_of_a_cap_shared_by_three_instances() {
    let test = "behind_haproxy_the_proxy_source_is_the_key_of_a_cap_shared_by_three_instances";
    let Some(redis) = RedisServer::start(test) else { return };
    let origin = Origin::echo().await;
    let Some(run) = fifteen_each(test, &redis_cluster(&redis, "closed", "200ms"), &origin).await else { return };
    assert_eq!((count(&run.two, 200), count(&run.two, 429)), (CAP, 15 - CAP), "127.0.0.2: {:?}", run.two);
    assert_eq!((count(&run.three, 200), count(&run.three, 429)), (CAP, 15 - CAP), "127.0.0.3: {:?}", run.three);
    assert_eq!(active(&run.instances, "127.0.0.2").await, CAP as u32);
    assert_eq!(active(&run.instances, "127.0.0.3").await, CAP as u32);
    assert_eq!(redis.command("ZCARD vg:{v4:127.0.0.2}:conn").trim(), ":4");
    assert_eq!(redis.command("ZCARD vg:{v4:127.0.0.3}:conn").trim(), ":4");
    let decisions = |r: &str| format!("veilgate_cluster_decisions_total{{result=\"{r}\"}}");
    assert_eq!(sum(&run.instances, &decisions("admitted")).await, 2.0 * CAP as f64);
    assert_eq!(sum(&run.instances, &decisions("refused")).await, 30.0 - 2.0 * CAP as f64);
    assert_eq!(sum(&run.instances, "veilgate_refusals_total{reason=\"client_cap\"}").await, 30.0 - 2.0 * CAP as f64);

    // A connection that goes round HAProxy (no header, though from the trusted address) is
    // closed unanswered and counted, on every instance.
    for p in &run.instances {
        let mut direct = dial_proxy(p.addr, None).await;
        direct.write_all(format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", origin.addr).as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = bounded(direct.read_to_end(&mut out)).await;
        assert!(out.is_empty(), "no answer expected, got {:?}", String::from_utf8_lossy(&out));
        assert_eq!(p.metric("veilgate_refusals_total{reason=\"proxy_protocol_missing\"}").await, 1.0);
    }
    assert_eq!(sum(&run.instances, &decisions("admitted")).await, 2.0 * CAP as f64, "it reached no limiter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_haproxy_the_local_backend_gives_each_instance_its_own_cap() {
    let origin = Origin::echo().await;
    let test = "behind_haproxy_the_local_backend_gives_each_instance_its_own_cap";
    let Some(run) = fifteen_each(test, "backend = \"local\"", &origin).await else { return };
    // The same setup as above with each instance counting alone: 3 x 4.
    let all = INSTANCES * CAP;
    assert_eq!((count(&run.two, 200), count(&run.two, 429)), (all, 15 - all), "127.0.0.2: {:?}", run.two);
    assert_eq!((count(&run.three, 200), count(&run.three, 429)), (all, 15 - all), "127.0.0.3: {:?}", run.three);
    for p in &run.instances {
        assert_eq!(p.controller.active_for_ip(ip("127.0.0.2")), CAP as u32);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_haproxy_a_stopped_redis_gets_fast_503s_and_sigcont_brings_the_cluster_cap_back() {
    let test = "behind_haproxy_a_stopped_redis_gets_fast_503s_and_sigcont_brings_the_cluster_cap_back";
    let Some(redis) = RedisServer::start(test) else { return };
    let origin = Origin::echo().await;
    let cluster = redis_cluster(&redis, "closed", "50ms");
    let instances = start_instances(&cluster, &origin, "").await;
    let Some(haproxy) = start_haproxy(test, &instances).await else { return };
    let (statuses, mut held) = attempts(haproxy.front, "127.0.0.2", &origin, 2).await;
    assert_eq!(statuses, [200, 200]);

    // Redis stops answering but keeps its connections: every call waits for the timeout.
    redis.signal(libc::SIGSTOP);
    let mut slowest = Duration::ZERO;
    for i in 0..6 {
        let started = Instant::now();
        let (head, _s) = connect_from(haproxy.front, Some(ip("127.0.0.2")), &origin.addr.to_string()).await;
        let took = started.elapsed();
        assert_eq!(head.status, 503, "attempt {i}: {}", head.text);
        slowest = slowest.max(took);
    }
    // 50 ms of decision timeout plus the round trip through HAProxy on a busy box.
    assert!(slowest < Duration::from_millis(250), "slowest answer while Redis is stopped: {slowest:?}");
    eventually(
        "six cluster_unavailable refusals",
        async || sum(&instances, "veilgate_refusals_total{reason=\"cluster_unavailable\"}").await,
        |n| *n == 6.0,
    )
    .await;
    for s in &mut held {
        echoes(s).await;
    }
    // fail_mode closed: /readyz says 503, so HAProxy takes every instance out.
    for p in &instances {
        wait_mode(p, "closed").await;
    }
    all_servers(&haproxy, "DOWN").await;

    redis.signal(libc::SIGCONT);
    for p in &instances {
        wait_mode(p, "redis").await;
    }
    all_servers(&haproxy, "UP").await;
    // The two running tunnels count again (their leases renewed or written anew), so the cap
    // of 4 leaves exactly two places.
    let (statuses, more) = attempts(haproxy.front, "127.0.0.2", &origin, 6).await;
    assert_eq!((count(&statuses, 200), count(&statuses, 429)), (2, 4), "{statuses:?}");
    assert_eq!(redis.command("ZCARD vg:{v4:127.0.0.2}:conn").trim(), ":4");
    held.extend(more);
    for s in &mut held {
        echoes(s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_haproxy_a_draining_instance_leaves_the_pool_and_its_clients_go_elsewhere() {
    let test = "behind_haproxy_a_draining_instance_leaves_the_pool_and_its_clients_go_elsewhere";
    let Some(redis) = RedisServer::start(test) else { return };
    let origin = Origin::echo().await;
    let cluster = redis_cluster(&redis, "closed", "200ms");
    let mut instances = start_instances(&cluster, &origin, "").await;
    let Some(haproxy) = start_haproxy(test, &instances).await else { return };
    let (statuses, mut held) = attempts(haproxy.front, "127.0.0.2", &origin, 1).await;
    assert_eq!(statuses, [200]);
    let draining = instances.iter().position(|p| p.controller.active_for_ip(ip("127.0.0.2")) == 1).unwrap();
    let addr = instances[draining].addr;
    let stopped = instances[draining].begin_shutdown();
    // veilgate closes its listener as the drain starts (no grace between /readyz 503 and the
    // close), so until HAProxy's check sees the 503 a connection may be sent to it and refused:
    // `retries` + `option redispatch` must take it to another instance.
    eventually("the draining listener refuses", async || TcpStream::connect(addr).await.is_err(), |r| *r).await;
    let (statuses, more) = attempts(haproxy.front, "127.0.0.3", &origin, 3).await;
    assert_eq!(statuses, [200, 200, 200], "redispatched while HAProxy still counts it in");
    held.extend(more);
    let name = format!("vg{}", draining + 1);
    let seen = eventually(
        "HAProxy takes the draining instance out through its /readyz",
        async || haproxy.server_status("veilgate"),
        |s| s.iter().any(|(n, st)| *n == name && st == "DOWN"),
    )
    .await;
    assert!(seen.iter().filter(|(_, st)| st == "UP").count() == INSTANCES - 1, "{seen:?}");
    assert_eq!(instances[draining].admin_get("/readyz").await.0, 503);
    let (statuses, more) = attempts(haproxy.front, "127.0.0.4", &origin, 3).await;
    assert_eq!(statuses, [200, 200, 200], "the others serve");
    held.extend(more);
    // Its running tunnel is never cut by leaving the pool; the drain ends when it does.
    for s in &mut held {
        echoes(s).await;
    }
    assert!(!stopped.is_finished(), "still draining while its tunnel runs");
    held.remove(0);
    bounded(stopped).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_haproxy_one_clients_bandwidth_over_three_instances_holds_its_rate() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let test = "behind_haproxy_one_clients_bandwidth_over_three_instances_holds_its_rate";
    let Some(redis) = RedisServer::start(test) else { return };
    let origin = Origin::source().await;
    let cluster = redis_cluster(&redis, "closed", "200ms");
    let instances = start_instances(&cluster, &origin, "bandwidth_down = \"1 MiB/s\"").await;
    let Some(haproxy) = start_haproxy(test, &instances).await else { return };
    // Three downloads of far more than 12 s allow, one per instance (round robin).
    let got = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..INSTANCES {
        let (head, mut s) = connect_from(haproxy.front, Some(ip("127.0.0.2")), &origin.addr.to_string()).await;
        assert_eq!(head.status, 200, "{}", head.text);
        s.write_all(&(64u64 << 20).to_be_bytes()).await.unwrap();
        let got = Arc::clone(&got);
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            // Bounded: the test stops reading after its window; 20 s is far past it.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                if n == 0 {
                    break;
                }
                got.fetch_add(n as u64, Ordering::Relaxed);
            }
        }));
    }
    for (i, p) in instances.iter().enumerate() {
        assert_eq!(p.controller.active_for_ip(ip("127.0.0.2")), 1, "instance {i} serves one of them");
    }
    // The first second spends the start-up burst; then 10 s at the fleet rate.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = got.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let bytes = got.load(Ordering::Relaxed) - start;
    let secs = started.elapsed().as_secs_f64();
    for t in &tasks {
        t.abort();
    }
    let ratio = bytes as f64 / (secs * (1u64 << 20) as f64);
    assert!((0.9..=1.1).contains(&ratio), "{bytes} bytes in {secs:.2} s: {ratio:.3} of 1 MiB/s over 3 instances");
}
