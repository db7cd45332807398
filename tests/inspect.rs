//! The live view (`admin.inspect`): `GET /clients`, `GET /tunnels` and `veilgate top`.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1 << 20;

async fn json(proxy: &TestProxy, path: &str) -> Value {
    let (status, body) = proxy.admin_get(path).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

fn config(origins: &[u16], privacy: &str) -> String {
    format!(
        "[limits.per_client]\nmax_tunnels = 4\nbandwidth_down = \"1 MiB/s\"\n[admin]\ninspect = true\n\
         [log]\nclient_address = \"{privacy}\"\n{}",
        loopback_policy(origins)
    )
}

/// A download of `len` bytes from the source origin, read (and dropped) as it comes.
async fn download(proxy: &TestProxy, from: &str, origin: u16, len: u64) -> tokio::task::JoinHandle<()> {
    let ip: IpAddr = from.parse().unwrap();
    let (head, mut s) = connect_from(proxy.addr, Some(ip), &format!("127.0.0.1:{origin}")).await;
    assert_eq!(head.status, 200);
    s.write_all(&len.to_be_bytes()).await.unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
}

#[tokio::test]
async fn off_by_default_and_says_so() {
    let proxy = TestProxy::start("").await;
    let (status, body) = proxy.admin_get("/clients").await;
    assert_eq!((status, body.as_str()), (404, "inspection is off (admin.inspect)\n"));
    assert_eq!(proxy.admin_get("/tunnels").await.0, 404);
}

#[tokio::test]
async fn clients_and_tunnels_show_use_limits_and_refusals() {
    let source = Origin::source().await;
    let echo = Origin::echo().await;
    let proxy = TestProxy::start(&config(&[source.port(), echo.port()], "full")).await;
    // 127.0.0.2 downloads on two tunnels under its 1 MiB/s; 127.0.0.3 holds one quiet tunnel
    // and is refused once (a port not allowed).
    let a = download(&proxy, "127.0.0.2", source.port(), 64 * MIB).await;
    let b = download(&proxy, "127.0.0.2", source.port(), 64 * MIB).await;
    let (head, quiet) =
        connect_from(proxy.addr, Some("127.0.0.3".parse().unwrap()), &format!("127.0.0.1:{}", echo.port())).await;
    assert_eq!(head.status, 200);
    let (head, _) = connect_from(proxy.addr, Some("127.0.0.3".parse().unwrap()), "127.0.0.1:9").await;
    assert_eq!(head.status, 403);

    let tunnels = json(&proxy, "/tunnels").await;
    assert_eq!(tunnels["total"], 3);
    let rows = tunnels["tunnels"].as_array().unwrap();
    assert!(rows.iter().all(|t| t["mode"] == "tunnel"));
    assert_eq!(rows.iter().filter(|t| t["target"] == format!("127.0.0.1:{}", source.port())).count(), 2);
    assert_eq!(rows.iter().filter(|t| t["client"] == "127.0.0.3").count(), 1);

    // Rates are measured between inspections: the first look above started the window.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let clients = json(&proxy, "/clients").await;
    assert_eq!(clients["total"], 2, "{clients}");
    let first = &clients["clients"][0];
    assert_eq!(first["client"], "127.0.0.2", "the fastest first: {clients}");
    assert_eq!(first["tunnels"], 2);
    let rate = first["rate_down"].as_u64().unwrap();
    assert!((MIB / 2..=3 * MIB / 2).contains(&rate), "about its 1 MiB/s: {rate}");
    assert!(first["bytes_down"].as_u64().unwrap() >= MIB, "{first}");
    assert_eq!(first["limits"]["bandwidth_down"], MIB);
    assert_eq!(first["limits"]["max_tunnels"], 4);
    assert_eq!(first["refusals"], 0);
    let second = &clients["clients"][1];
    assert_eq!(
        (second["client"].as_str(), second["tunnels"].as_u64(), second["refusals"].as_u64()),
        (Some("127.0.0.3"), Some(1), Some(1))
    );
    assert_eq!(first["id"].as_str().unwrap().len(), 12);

    // Pages.
    let page = json(&proxy, "/clients?limit=1&offset=1").await;
    assert_eq!((page["total"].as_u64(), page["offset"].as_u64()), (Some(2), Some(1)));
    assert_eq!(page["clients"].as_array().unwrap().len(), 1);
    assert_eq!(page["clients"][0]["client"], "127.0.0.3");

    // Closed tunnels leave the view.
    a.abort();
    b.abort();
    drop(quiet);
    eventually(
        "every tunnel has left /tunnels",
        async || json(&proxy, "/tunnels").await["total"].as_u64(),
        |t| *t == Some(0),
    )
    .await;
}

#[tokio::test]
async fn addresses_follow_the_log_privacy_setting() {
    let echo = Origin::echo().await;
    let proxy = TestProxy::start(&config(&[echo.port()], "omit")).await;
    let (_, _held) =
        connect_from(proxy.addr, Some("127.0.0.2".parse().unwrap()), &format!("127.0.0.1:{}", echo.port())).await;
    let clients = json(&proxy, "/clients").await;
    let row = &clients["clients"][0];
    assert_eq!(row["client"], Value::Null, "omitted: {row}");
    assert!(row["id"].as_str().is_some_and(|id| id.len() == 12), "still told apart by an opaque id: {row}");
    let tunnels = json(&proxy, "/tunnels").await;
    assert_eq!(tunnels["tunnels"][0]["client"], Value::Null);
    assert_eq!(tunnels["tunnels"][0]["client_id"], row["id"]);
    assert!(!json(&proxy, "/tunnels").await.to_string().contains("127.0.0.2"));
}

#[tokio::test]
async fn top_draws_the_view() {
    let echo = Origin::echo().await;
    let proxy = TestProxy::start(&config(&[echo.port()], "full")).await;
    let (_, _held) =
        connect_from(proxy.addr, Some("127.0.0.2".parse().unwrap()), &format!("127.0.0.1:{}", echo.port())).await;
    let admin = format!("http://{}", proxy.admin.unwrap());
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_veilgate"))
        .args(["top", "--admin", &admin, "--count", "1"])
        .output();
    let out = bounded(out).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("1 client(s)"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("127.0.0.2") && l.contains("1.0 MiB")), "{text}");
    // Against a proxy without inspection it says why and fails.
    let plain = TestProxy::start("").await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_veilgate"))
        .args(["top", "--admin", &format!("http://{}", plain.admin.unwrap()), "--count", "1"])
        .output();
    let out = bounded(out).await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("inspection is off"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
