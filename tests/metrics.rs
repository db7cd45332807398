//! /metrics after known traffic: byte counters equal the bytes sent, gauges back to zero,
//! each refusal kind counted once, histograms with buckets, no client address anywhere.

mod common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn a_scrape_matches_the_traffic() {
    let origin = Origin::echo().await;
    let p = origin.port();
    let toml = format!(
        "[limits.per_client]\nmax_tunnels = 3\n{}[dns.hosts]\n\"denied.test\" = \"127.0.0.1\"\n\
         [[routes]]\nhosts = [\"denied.test\"]\nmode = \"deny\"\n",
        loopback_policy(&[p])
    );
    let proxy = TestProxy::start(&toml).await;
    let client = "127.0.0.9";
    // Three tunnels echo known amounts; each is closed by the client.
    let sizes = [1usize, 1000, 123_457];
    for (i, n) in sizes.iter().enumerate() {
        let (head, mut s) = connect_from(proxy.addr, Some(client.parse().unwrap()), &origin.addr.to_string()).await;
        assert_eq!(head.status, 200);
        let data = pattern(*n, i as u64 + 1);
        s.write_all(&data).await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        bounded(s.read_to_end(&mut back)).await.unwrap();
        assert_eq!(back, data);
    }
    // One of each refusal we can provoke cheaply.
    let _ = raw_exchange(proxy.addr, b"GET / HTTP/1.1\r\n\r\n").await;
    let _ = raw_exchange(proxy.addr, b"CONNECT nonsense HTTP/1.1\r\n\r\n").await;
    let _ = connect_via(proxy.addr, &format!("127.0.0.1:{}", p.wrapping_add(1).max(1))).await;
    let _ = connect_via(proxy.addr, &format!("denied.test:{p}")).await;
    let _ = connect_via(proxy.addr, &format!("x.invalid:{p}")).await;
    eventually("every tunnel ended", async || proxy.controller.active_tunnels(), |n| *n == 0).await;

    let (status, body) = proxy.admin_get("/metrics").await;
    assert_eq!(status, 200);
    let total: usize = sizes.iter().sum();
    let m = |s: &str| metric_value(&body, s).unwrap_or_else(|| panic!("{s} missing:\n{body}"));
    assert_eq!(m("veilgate_tunnel_bytes_total{mode=\"tunnel\",direction=\"up\"}"), total as f64);
    assert_eq!(m("veilgate_tunnel_bytes_total{mode=\"tunnel\",direction=\"down\"}"), total as f64);
    assert_eq!(m("veilgate_tunnels_total{mode=\"tunnel\",outcome=\"closed\"}"), 3.0);
    assert_eq!(m("veilgate_tunnels_active{mode=\"tunnel\"}"), 0.0);
    assert_eq!(m("veilgate_tunnel_duration_seconds_count"), 3.0);
    assert_eq!(m("veilgate_upstream_connect_duration_seconds_count"), 3.0);
    assert!(body.contains("veilgate_upstream_connect_duration_seconds_bucket{le=\"0.001\"}"), "real buckets");
    for (reason, n) in [
        ("method_not_allowed", 1.0),
        ("bad_request", 1.0),
        ("port_denied", 1.0),
        ("route_denied", 1.0),
        ("dns_failed", 1.0),
        ("client_cap", 0.0),
        ("global_cap", 0.0),
    ] {
        assert_eq!(m(&format!("veilgate_refusals_total{{reason=\"{reason}\"}}")), n, "{reason}");
    }
    let accepted = format!("veilgate_connections_accepted_total{{listener=\"{}\"}}", proxy.addr);
    assert_eq!(m(&accepted), 8.0);
    assert!(body.contains("# HELP veilgate_refusals_total"));
    assert!(body.contains("# TYPE veilgate_tunnel_duration_seconds histogram"));
    assert!(!body.contains(client), "no client address in the metrics");
    assert!(!body.contains("denied.test"), "no target host in the metrics");
    // Health endpoints and a 404.
    assert_eq!(proxy.admin_get("/healthz").await.0, 200);
    assert_eq!(proxy.admin_get("/readyz").await.0, 200);
    assert_eq!(proxy.admin_get("/nope").await.0, 404);
}

#[tokio::test]
async fn two_proxies_in_one_process_keep_their_own_counters() {
    let origin = Origin::echo().await;
    let a = TestProxy::start(&loopback_policy(&[origin.port()])).await;
    let b = TestProxy::start(&loopback_policy(&[origin.port()])).await;
    let _ = raw_exchange(a.addr, b"GET / HTTP/1.1\r\n\r\n").await;
    assert_eq!(a.metric("veilgate_refusals_total{reason=\"method_not_allowed\"}").await, 1.0);
    assert_eq!(b.metric("veilgate_refusals_total{reason=\"method_not_allowed\"}").await, 0.0);
}

/// Sends `request` to the admin listener and returns every byte of the answer.
async fn admin_raw(proxy: &TestProxy, request: &str) -> String {
    let mut s = bounded(tokio::net::TcpStream::connect(proxy.admin.unwrap())).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    bounded(s.read_to_end(&mut out)).await.unwrap();
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn head_on_the_admin_endpoints_sends_the_get_length_and_no_body() {
    let proxy = TestProxy::start("").await;
    let ok = |len: usize| {
        format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")
    };
    assert_eq!(admin_raw(&proxy, "HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await, ok(3));
    assert_eq!(admin_raw(&proxy, "HEAD /readyz HTTP/1.1\r\nHost: x\r\n\r\n").await, ok(6));
    assert_eq!(
        admin_raw(&proxy, "HEAD /nope HTTP/1.1\r\n\r\n").await,
        "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 10\r\nConnection: close\r\n\r\n"
    );
    // Nothing moves between these two requests, so the exposition has the same length.
    let (_, body) = proxy.admin_get("/metrics").await;
    let head = admin_raw(&proxy, "HEAD /metrics HTTP/1.1\r\n\r\n").await;
    let expected = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    assert_eq!(head, expected);
    // GET still has its body.
    assert_eq!(admin_raw(&proxy, "GET /healthz HTTP/1.1\r\n\r\n").await, ok(3) + "ok\n");
}

#[tokio::test]
async fn process_series_are_on_the_admin_scrape_with_plausible_values() {
    let proxy = TestProxy::start("").await;
    let (status, body) = proxy.admin_get("/metrics").await;
    assert_eq!(status, 200);
    let get = |name: &str| metric_value(&body, name).unwrap_or_else(|| panic!("{name} not in scrape:\n{body}"));
    let (open, max) = (get("process_open_fds"), get("process_max_fds"));
    assert!(open > 0.0 && open <= max, "open fds {open}, max {max}");
    assert!(get("process_resident_memory_bytes") > 1e6, "a tokio process holds more than a megabyte");
    assert!(get("process_virtual_memory_bytes") >= get("process_resident_memory_bytes"));
    assert!(get("process_threads") >= 1.0);
    assert!(get("process_cpu_seconds_total") >= 0.0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let start = get("process_start_time_seconds");
    assert!(start <= now + 1.0 && start > now - 3600.0, "started {start}, now {now}");
    assert!(body.contains("# TYPE process_cpu_seconds_total counter"), "{body}");
}
