//! The cluster backend against a real three-master Redis Cluster on loopback
//! (`cluster.redis_cluster_nodes`): caps shared by two instances for clients whose keys sit on
//! different masters, releases and renewals whose batches span slots, the global cap's own
//! slot, and bandwidth grants. Without `redis-server`/`redis-cli` every test here says
//! SKIPPED on stderr and returns.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::redis::RedisCluster;
use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

async fn start(cluster: &RedisCluster, origin: &Origin, extra: &str) -> TestProxy {
    let proxy = TestProxy::start(&format!(
        "[cluster]\nbackend = \"redis\"\nredis_cluster_nodes = {}\nlease_ttl = \"3s\"\ntimeout = \"200ms\"\nfail_mode = \"closed\"\n{extra}\n{}",
        cluster.nodes_toml(),
        loopback_policy(&[origin.port()])
    ))
    .await;
    let series = "veilgate_cluster_mode{mode=\"redis\"}";
    eventually("cluster mode redis", async || proxy.metric(series).await, |v| *v == 1.0).await;
    proxy
}

async fn open(proxy: &TestProxy, from: &str, origin: &Origin) -> (u16, TcpStream) {
    let (head, s) = connect_from(proxy.addr, Some(ip(from)), &origin.addr.to_string()).await;
    (head.status, s)
}

/// Clients whose keys, with the global set, land on all three masters of the test cluster
/// (asserted through `DBSIZE`, not assumed).
const CLIENTS: [&str; 6] = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6", "127.0.0.7"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_hold_across_instances_on_a_redis_cluster_and_releases_free_them() {
    let Some(cluster) = RedisCluster::start("caps_hold_across_instances_on_a_redis_cluster") else { return };
    let origin = Origin::echo().await;
    let limits = "[limits]\nmax_tunnels = 100\n[limits.per_client]\nmax_tunnels = 2";
    let a = start(&cluster, &origin, limits).await;
    let b = start(&cluster, &origin, limits).await;
    let mut held = Vec::new();
    for client in CLIENTS {
        let (s1, t1) = open(&a, client, &origin).await;
        let (s2, t2) = open(&b, client, &origin).await;
        assert_eq!((s1, s2), (200, 200), "{client}: two tunnels, one on each instance");
        assert_eq!(open(&b, client, &origin).await.0, 429, "{client}: the third, across both");
        assert_eq!(open(&a, client, &origin).await.0, 429, "{client}: on either");
        held.push((t1, t2));
    }
    let per_node = cluster.keys_per_node();
    assert!(per_node.iter().filter(|n| **n > 0).count() >= 2, "keys on at least two masters: {per_node:?}");
    for client in CLIENTS {
        let z = cluster.command_on_owner(&format!("ZCARD vg:{{v4:{client}}}:conn"));
        assert_eq!(z.trim(), ":2", "{client}");
    }
    // A refused tunnel gives its global lease back in the next release batch: wait for it.
    let global = async || cluster.command_on_owner("ZCARD vg:{global}:conn").trim().to_string();
    eventually("the global set holds the 12 tunnels", global, |z| z == ":12").await;
    assert_eq!(a.metric("veilgate_cluster_errors_total{kind=\"response\"}").await, 0.0);

    // Renewals: one batch over every client's slot and the heartbeat's, each lease renewed
    // past its 3 s ttl, so the caps still hold after it.
    let renewed = async || a.metric("veilgate_cluster_lease_renewals_total").await;
    eventually_within(Duration::from_secs(5), "a renewal of A's six leases", renewed, |n| *n >= 6.0).await;
    tokio::time::sleep(Duration::from_secs(4)).await; // past lease_ttl: only renewals keep them
    for client in CLIENTS {
        assert_eq!(open(&b, client, &origin).await.0, 429, "{client}: leases renewed past their ttl");
    }
    eventually("the global set holds the 12 tunnels", global, |z| z == ":12").await;
    assert_eq!(a.metric("veilgate_cluster_mode{mode=\"redis\"}").await, 1.0, "no renewal failed");
    assert_eq!(b.metric("veilgate_cluster_mode{mode=\"redis\"}").await, 1.0, "no renewal failed");

    // Releases: A's six tunnels end at once, one batch over six client slots and the global
    // one; B then gets each client's place.
    for (t1, _) in held.iter_mut() {
        t1.shutdown().await.unwrap();
    }
    let kept: Vec<TcpStream> = held.into_iter().map(|(_, t2)| t2).collect();
    let mut again = Vec::new();
    for client in CLIENTS {
        let (status, s) = eventually(
            &format!("{client} admitted once A released"),
            async || open(&b, client, &origin).await,
            |r| r.0 == 200,
        )
        .await;
        assert_eq!(status, 200);
        again.push(s);
        assert_eq!(open(&a, client, &origin).await.0, 429, "{client}: full again");
    }
    eventually("the global set holds the 12 tunnels", global, |z| z == ":12").await;
    drop((kept, again));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_flushed_on_every_master_are_loaded_again_where_they_run() {
    let Some(cluster) = RedisCluster::start("scripts_flushed_on_every_master_are_loaded_again") else { return };
    let origin = Origin::echo().await;
    let limits = "[limits]\nmax_tunnels = 100\n[limits.per_client]\nmax_tunnels = 1";
    let a = start(&cluster, &origin, limits).await;
    for port in &cluster.ports {
        assert_eq!(cluster.command(*port, "SCRIPT FLUSH").trim(), "+OK");
    }
    // Every admission's EVALSHA now meets NOSCRIPT on the master owning its slot, which must
    // load the script there and run it: the caps still hold, nothing falls to the fail mode.
    let mut held = Vec::new();
    for client in CLIENTS {
        let (status, s) = open(&a, client, &origin).await;
        assert_eq!(status, 200, "{client}");
        held.push(s);
        assert_eq!(open(&a, client, &origin).await.0, 429, "{client}: the cap, decided by the reloaded script");
    }
    assert_eq!(a.metric("veilgate_cluster_decisions_total{result=\"failed\"}").await, 0.0);
    assert_eq!(a.metric("veilgate_cluster_mode{mode=\"redis\"}").await, 1.0);
    let per_node = cluster.keys_per_node();
    assert!(per_node.iter().filter(|n| **n > 0).count() >= 2, "keys on at least two masters: {per_node:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_bandwidth_holds_across_instances_on_a_redis_cluster() {
    let Some(cluster) = RedisCluster::start("a_client_bandwidth_holds_across_instances_on_a_redis_cluster") else {
        return;
    };
    let origin = Origin::source().await;
    let limits = "[limits.per_client]\nbandwidth_down = \"512 KiB/s\"";
    let a = start(&cluster, &origin, limits).await;
    let b = start(&cluster, &origin, limits).await;
    assert_the_fleet_holds_the_client_rate(&a, &b, &origin).await;
    let bucket = cluster.command_on_owner("EXISTS vg:{v4:127.0.0.10}:bw:down");
    assert!(bucket.starts_with(':'), "the bucket's owner answers: {bucket}");
}
