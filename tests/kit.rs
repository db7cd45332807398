//! The test kit itself, where a mistake would not show in the tests that use it: listeners
//! that would keep a fixed port, a client front that is not exercised yet, a wait that would
//! fail without saying what it saw.

mod common;

use std::net::SocketAddr;

use common::tls::{RecordingOrigin, TestPki};
use common::*;
use rustls::pki_types::ServerName;
use tokio::io::AsyncReadExt;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[tokio::test]
async fn every_listener_gets_an_ephemeral_port_on_its_own_address() {
    // Left out: the defaults' addresses (fixed ports 8080 and 9090) on port 0.
    let config = test_config("");
    assert_eq!(config.server.listen, [addr("127.0.0.1:0")]);
    assert_eq!(config.server.admin_listen, Some(addr("127.0.0.1:0")));
    // Given: each keeps its IP; the proxy binds them all and reports where.
    let toml = "[server]\nlisten = [\"127.0.0.1:8080\", \"127.0.0.3:8080\"]\nadmin_listen = \"127.0.0.4:9090\"\n";
    let config = test_config(toml);
    assert_eq!(config.server.listen, [addr("127.0.0.1:0"), addr("127.0.0.3:0")]);
    assert_eq!(config.server.admin_listen, Some(addr("127.0.0.4:0")));
    let proxy = TestProxy::start(toml).await;
    let ips: Vec<String> = proxy.addrs.iter().map(|a| a.ip().to_string()).collect();
    assert_eq!(ips, ["127.0.0.1", "127.0.0.3"]);
    assert!(proxy.addrs.iter().all(|a| a.port() != 0));
    assert_eq!(proxy.admin.map(|a| a.ip().to_string()), Some("127.0.0.4".to_string()));
}

/// A listener kind the config does not have yet is found by its key, in any shape.
#[test]
fn listener_keys_of_any_kind_and_shape_are_rewritten() {
    let mut doc: toml::Table = "[server]\nmax_pending = 5\ntls_listen = [\"[::1]:8443\"]\n\
         [[server.h2]]\nlisten = \"127.0.0.2:443\"\nname = \"x.test:443\"\n"
        .parse()
        .unwrap();
    ephemeral_listeners(&mut doc);
    let server = &doc["server"];
    assert_eq!(server["tls_listen"].as_array().unwrap()[0].as_str(), Some("[::1]:0"));
    assert_eq!(server["h2"][0]["listen"].as_str(), Some("127.0.0.2:0"));
    assert_eq!(server["h2"][0]["name"].as_str(), Some("x.test:443"), "only listener keys");
    assert_eq!(server["max_pending"].as_integer(), Some(5));
    assert_eq!(server["listen"].as_array().unwrap()[0].as_str(), Some("127.0.0.1:0"), "the default, filled in");
    assert_eq!(server["admin_listen"].as_str(), Some("127.0.0.1:0"));
}

/// The CONNECT exchange over the TLS front, against a TLS origin that records what it got
/// (it answers any head with a 200, as a TLS listener of the proxy would a CONNECT).
#[tokio::test]
async fn the_tls_front_speaks_the_same_exchange() {
    let pki = TestPki::new();
    let origin = RecordingOrigin::start(&pki).await;
    let front = Front::Tls { config: pki.client_config(), name: ServerName::try_from("localhost").unwrap() };
    let (head, mut client) = connect_over(&front, origin.addr, None, "example.test:443").await;
    assert_eq!(head.status, 200, "{}", head.text);
    assert_eq!(head.header("Content-Length"), Some("5"));
    let mut body = [0u8; 5];
    bounded(client.read_exact(&mut body)).await.unwrap();
    assert_eq!(&body, b"hello", "nothing after the head was consumed");
    assert_eq!(
        origin.received.lock().unwrap().as_slice(),
        b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n"
    );
    assert_eq!(client.tcp().peer_addr().unwrap(), origin.addr);
}

#[tokio::test]
#[should_panic(expected = "waiting for the answer; last seen: 41")]
async fn a_wait_that_times_out_names_what_it_saw() {
    let reach = |k: &i32| *k == 42;
    eventually_within(std::time::Duration::from_millis(50), "the answer", async || 41, reach).await;
}
