//! One tunnel's upload throughput over the TLS listener: HTTP/1.1 CONNECT against one HTTP/2
//! CONNECT stream (issue 13: one stream should get at least 0.8x what the same tunnel gets
//! over HTTP/1.1 TLS). Everything on loopback: an in-process veilgate with a throwaway
//! certificate, and a sink origin that counts what arrives. Rounds alternate h1 and h2.
//!
//!     cargo run --release --example h2_throughput -- [SECONDS per run, default 3] [ROUNDS, default 3]

use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    let secs: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);

    // A throwaway certificate for localhost, written where the config can name it.
    let dir = std::env::temp_dir().join(format!("vg-h2tp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().self_signed(&key).unwrap();
    std::fs::write(dir.join("c.pem"), cert.pem()).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dir.join("k.pem"))
        .unwrap();
    std::io::Write::write_all(&mut f, key.serialize_pem().as_bytes()).unwrap();

    // The sink: counts every byte received.
    let sink = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sink_port = sink.local_addr().unwrap().port();
    let received = Arc::new(AtomicU64::new(0));
    let r2 = Arc::clone(&received);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = sink.accept().await {
            let r = Arc::clone(&r2);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    r.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });

    let toml = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nadmin_listen = \"127.0.0.1:0\"\ntls_listen = [\"127.0.0.1:0\"]\n\
         tls_cert = \"{}\"\ntls_key = \"{}\"\n[policy]\ndeny_private = false\nallowed_ports = [{sink_port}]\n",
        dir.join("c.pem").display(),
        dir.join("k.pem").display()
    );
    let config = veilgate::Config::from_toml(&toml, "example").unwrap();
    let proxy = veilgate::server::Proxy::bind(config).await.unwrap();
    let tls_addr = proxy.tls_addrs()[0];
    tokio::spawn(proxy.run(std::future::pending()));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let client = |alpn: &[u8]| {
        let mut c = rustls::ClientConfig::builder().with_root_certificates(roots.clone()).with_no_client_auth();
        c.alpn_protocols = vec![alpn.to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(c))
    };
    let target = format!("127.0.0.1:{sink_port}");
    let chunk = Bytes::from(vec![0x5a; 64 * 1024]);
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let mut mbps = [0.0f64; 2];
        for (i, h2) in [false, true].into_iter().enumerate() {
            let tcp = TcpStream::connect(tls_addr).await.unwrap();
            let name = ServerName::try_from("localhost").unwrap();
            let tls = client(if h2 { b"h2" } else { b"http/1.1" }).connect(name, tcp).await.unwrap();
            let before = received.load(Ordering::Relaxed);
            let started = Instant::now();
            let deadline = started + Duration::from_secs(secs);
            if h2 {
                let (send, conn) = h2::client::handshake(tls).await.unwrap();
                tokio::spawn(conn);
                let req = http::Request::builder().method(http::Method::CONNECT).uri(&target).body(()).unwrap();
                let (resp, mut stream) = send.ready().await.unwrap().send_request(req, false).unwrap();
                assert_eq!(resp.await.unwrap().status(), 200);
                while Instant::now() < deadline {
                    stream.reserve_capacity(chunk.len());
                    match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                        Some(Ok(n)) => stream.send_data(chunk.slice(..n.min(chunk.len())), false).unwrap(),
                        _ => break,
                    }
                }
            } else {
                let mut tls = tls;
                tls.write_all(format!("CONNECT {target} HTTP/1.1\r\n\r\n").as_bytes()).await.unwrap();
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    head.push(tls.read_u8().await.unwrap());
                }
                assert!(head.starts_with(b"HTTP/1.1 200"));
                while Instant::now() < deadline {
                    tls.write_all(&chunk).await.unwrap();
                }
            }
            let moved = received.load(Ordering::Relaxed) - before;
            mbps[i] = moved as f64 / started.elapsed().as_secs_f64() / 1e6;
        }
        ratios.push(mbps[1] / mbps[0]);
        println!(
            "round {round}: HTTP/1.1 TLS {:.0} MB/s, HTTP/2 stream {:.0} MB/s, h2/h1 {:.2}",
            mbps[0],
            mbps[1],
            mbps[1] / mbps[0]
        );
    }
    ratios.sort_by(f64::total_cmp);
    println!("median h2/h1: {:.2}", ratios[ratios.len() / 2]);
    let _ = std::fs::remove_dir_all(&dir);
}
