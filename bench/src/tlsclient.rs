//! TLS clients for the MITM comparison: `tls-handshake`, `tls-throughput`, `tls-idle`.
//! Each trusts only the `--ca` file, so a MITM proxy is accepted only when its CA is given.

use crate::common::*;
use crate::load::{BulkOpts, Dir, IdleOpts, bulk_report, check_byte, close_gracefully, echo_byte, run_bulk, run_idle};
use crate::pki;
use clap::{Args, ValueEnum};
use rustls::pki_types::ServerName;
use serde_json::json;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

#[derive(Args, Clone)]
pub struct TlsOpts {
    /// PEM file of the only CA(s) to trust: the origin's CA for direct and blind-tunnel runs,
    /// the proxy's MITM CA for intercepted runs.
    #[arg(long)]
    pub ca: PathBuf,
    /// PEM file the client's own direct connections to the origin trust (the sink query of
    /// `--dir up` and the warm-up handshake); default: the `--ca` file. Give the origin's CA
    /// here when `--ca` is a MITM proxy's.
    #[arg(long)]
    pub origin_ca: Option<PathBuf>,
    /// Cipher suites to offer, in this order, comma-separated (rustls names, e.g.
    /// TLS13_AES_128_GCM_SHA256); default: rustls' own list. A different offer gives the
    /// client a ClientHello fingerprint of its own, as a browser's would differ from rustls'.
    #[arg(long, value_delimiter = ',')]
    pub cipher_suites: Vec<String>,
    /// Allow TLS session resumption (off by default: every handshake is a full one).
    #[arg(long)]
    pub resume: bool,
}

#[derive(Copy, Clone, ValueEnum, PartialEq, Eq)]
pub enum Check {
    /// Send `E` and one byte; expect it back.
    Echo,
    /// Send one HTTP/1.1 request; expect 200 and the 5-byte body.
    Http,
    /// Nothing after the handshake.
    None,
}

#[derive(Args)]
pub struct HandshakeArgs {
    #[command(flatten)]
    pub c: Common,
    #[command(flatten)]
    pub t: TlsOpts,
    /// Sequential connections (each: CONNECT, 200, TLS handshake, check, close).
    #[arg(long, default_value_t = 200)]
    pub count: usize,
    /// What to do on each connection after the (timed) handshake.
    #[arg(long, value_enum, default_value_t = Check::Echo)]
    pub check: Check,
    /// Skip the client's own warm-up handshake (made directly to the target, never through the
    /// proxy, so the client's one-time costs stay out of the first proxied handshake).
    #[arg(long)]
    pub no_client_warmup: bool,
    /// Stop after this many seconds even if not all connections are done.
    #[arg(long, default_value_t = 120)]
    pub max_secs: u64,
}

#[derive(Args)]
pub struct TlsThroughputArgs {
    #[command(flatten)]
    pub c: Common,
    #[command(flatten)]
    pub t: TlsOpts,
    #[command(flatten)]
    pub b: BulkOpts,
}

#[derive(Args)]
pub struct TlsIdleArgs {
    #[command(flatten)]
    pub c: Common,
    #[command(flatten)]
    pub t: TlsOpts,
    #[command(flatten)]
    pub i: IdleOpts,
}

/// Everything a TLS client run needs.
struct TlsCtx {
    ctx: Ctx,
    connector: TlsConnector,
    /// For the direct connections to the origin.
    origin_connector: TlsConnector,
    name: ServerName<'static>,
    /// The origin itself, for the sink query and the warm-up (never through the proxy).
    direct: SocketAddr,
}

impl TlsCtx {
    fn new(c: &Common, t: &TlsOpts) -> io::Result<TlsCtx> {
        let ctx = Ctx::new(c)?;
        let connector = TlsConnector::from(pki::client_config(&t.ca, t.resume, &t.cipher_suites)?);
        let origin_connector =
            TlsConnector::from(pki::client_config(t.origin_ca.as_ref().unwrap_or(&t.ca), false, &[])?);
        let name = pki::server_name(&ctx.target_host)?;
        let direct = ctx.target_addr;
        Ok(TlsCtx { ctx, connector, origin_connector, name, direct })
    }

    /// Tunnel (or direct connection) and handshake. Returns the stream, the time the tunnel took
    /// (TCP connect + CONNECT + 200), and the handshake's time after that, both in µs.
    async fn open(&self) -> io::Result<(TlsStream<TcpStream>, f64, f64)> {
        let t0 = Instant::now();
        let (tcp, rest) = self.ctx.open().await?;
        if !rest.is_empty() {
            return Err(err("unexpected bytes after the CONNECT answer"));
        }
        let t1 = Instant::now();
        let tls = timeout(self.ctx.op, self.connector.connect(self.name.clone(), tcp))
            .await
            .map_err(|_| err("TLS handshake timed out"))?
            .map_err(|e| err(format!("TLS handshake: {e}")))?;
        let t2 = Instant::now();
        Ok((tls, (t1 - t0).as_secs_f64() * 1e6, (t2 - t1).as_secs_f64() * 1e6))
    }

    /// A TLS connection straight to the origin whose first byte is `mode`.
    async fn direct(&self, mode: u8) -> io::Result<TlsStream<TcpStream>> {
        let tcp =
            timeout(self.ctx.op, TcpStream::connect(self.direct)).await.map_err(|_| err("connect timed out"))??;
        tcp.set_nodelay(true)?;
        let mut tls = timeout(self.ctx.op, self.origin_connector.connect(self.name.clone(), tcp))
            .await
            .map_err(|_| err("TLS handshake timed out"))?
            .map_err(|e| err(format!("direct TLS to the origin (is --origin-ca its CA?): {e}")))?;
        tls.write_all(&[mode]).await?;
        tls.flush().await?;
        Ok(tls)
    }

    /// The origin's sink total (bytes), asked directly.
    async fn sink_query(&self) -> io::Result<u64> {
        let mut s = self.direct(b'Q').await?;
        let mut b = [0u8; 16];
        timeout(self.ctx.op, s.read_exact(&mut b)).await.map_err(|_| err("sink query timed out"))??;
        Ok(u64::from_be_bytes(b[..8].try_into().expect("8 bytes")))
    }
}

fn session_json(m: &mut Json, s: &TlsStream<TcpStream>) -> String {
    let c = s.get_ref().1;
    let version = c.protocol_version().and_then(|v| v.as_str()).unwrap_or("?");
    let suite = c.negotiated_cipher_suite().and_then(|s| s.suite().as_str()).unwrap_or("?");
    let alpn = c.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned());
    m.insert("tls_version".into(), json!(version));
    m.insert("cipher_suite".into(), json!(suite));
    m.insert("alpn".into(), json!(alpn));
    let mut human = format!("{version} {suite}");
    if let Some(der) = c.peer_certificates().and_then(|v| v.first()) {
        let fp = pki::cert_sha256(der.as_ref());
        let (subject, issuer) = pki::cert_names(der.as_ref());
        human += &format!(", leaf {fp} issued by \"{issuer}\"");
        m.insert("leaf_sha256".into(), json!(fp));
        m.insert("leaf_subject".into(), json!(subject));
        m.insert("leaf_issuer".into(), json!(issuer));
    }
    human
}

async fn check(s: &mut TlsStream<TcpStream>, how: Check, i: usize, host: &str) -> io::Result<()> {
    match how {
        Check::None => Ok(()),
        Check::Echo => {
            s.write_all(b"E").await?;
            echo_byte(s, check_byte(i)).await
        }
        Check::Http => {
            s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
            s.flush().await?;
            let mut body = Vec::new();
            // The origin closes after its answer; a missing close_notify is not our concern.
            let mut tmp = [0u8; 4096];
            loop {
                match s.read(&mut tmp).await {
                    Ok(0) => break,
                    Ok(n) => body.extend_from_slice(&tmp[..n]),
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !body.is_empty() => break,
                    Err(e) => return Err(e),
                }
                if body.len() > 65536 {
                    return Err(err("HTTP answer too large"));
                }
            }
            let text = String::from_utf8_lossy(&body);
            if text.starts_with("HTTP/1.1 200") && text.ends_with("\r\n\r\nhello") {
                Ok(())
            } else {
                Err(err(format!("unexpected HTTP answer: {:?}", text.lines().next().unwrap_or(""))))
            }
        }
    }
}

pub async fn tls_handshake(a: HandshakeArgs) -> io::Result<()> {
    let t = TlsCtx::new(&a.c, &a.t)?;
    if !a.no_client_warmup {
        // The handshake's work is what warms the client up; a failure here only costs that.
        if let Err(e) = t.direct(b'W').await {
            eprintln!("tls-handshake: client warm-up failed ({e}); continuing");
        }
    }
    let (mut hs, mut total) = (Vec::with_capacity(a.count), Vec::with_capacity(a.count));
    let mut errs: Vec<String> = Vec::new();
    let mut first: Option<(usize, f64, f64)> = None;
    let mut m = base_json("tls-handshake", &a.c);
    let mut session_txt = String::new();
    let p0 = proc_sample(&a.c.pid);
    let t0 = Instant::now();
    let stop_at = t0 + Duration::from_secs(a.max_secs);
    for i in 0..a.count {
        if Instant::now() > stop_at {
            break;
        }
        let r = async {
            let (mut s, tun_us, hs_us) = t.open().await?;
            if first.is_none() {
                session_txt = session_json(&mut m, &s);
            }
            timeout(t.ctx.op, check(&mut s, a.check, i, &t.ctx.target_host))
                .await
                .map_err(|_| err("check timed out"))??;
            if a.check != Check::Http {
                // Close cleanly (untimed); after HTTP the origin has closed already.
                close_gracefully(&mut s, Duration::from_secs(1)).await;
            }
            io::Result::Ok((tun_us, hs_us))
        }
        .await;
        match r {
            Ok((tun_us, hs_us)) => {
                if first.is_none() {
                    first = Some((i, hs_us, tun_us + hs_us));
                } else {
                    hs.push(hs_us);
                    total.push(tun_us + hs_us);
                }
            }
            Err(e) => errs.push(e.to_string()),
        }
    }
    let el = t0.elapsed().as_secs_f64();
    let p1 = proc_sample(&a.c.pid);
    let ok = hs.len() + usize::from(first.is_some());
    sort(&mut hs);
    sort(&mut total);
    m.insert("count".into(), json!(a.count));
    m.insert("ok".into(), json!(ok));
    m.insert("errors".into(), json!(errs.len()));
    m.insert("first_error".into(), json!(errs.first()));
    m.insert("elapsed_s".into(), json!(r2(el)));
    m.insert("resumption".into(), json!(a.t.resume));
    if let Some((i, h, tot)) = first {
        m.insert("first_index".into(), json!(i));
        m.insert("first_handshake_us".into(), json!(h.round()));
        m.insert("first_total_us".into(), json!(tot.round()));
    }
    for (k, v, q) in [
        ("handshake_p50_us", &hs, 0.5),
        ("handshake_p99_us", &hs, 0.99),
        ("total_p50_us", &total, 0.5),
        ("total_p99_us", &total, 0.99),
    ] {
        m.insert(k.into(), num(percentile(v, q).round()));
    }
    let mut cpu_txt = String::new();
    if let Some(cpu) = insert_cpu(&mut m, p0, p1) {
        let per = (cpu * 1e6 / ok.max(1) as f64).round();
        m.insert("proxy_cpu_us_per_handshake".into(), json!(per));
        cpu_txt = format!(", proxy {per:.0} CPU-us/conn");
    }
    let human = format!(
        "tls-handshake {}: {ok}/{} ok; first {:.0} us (total {:.0}); later handshake p50 {:.0} us p99 {:.0} us, total p50 {:.0} us{cpu_txt}; {session_txt}{}",
        who(&a.c),
        a.count,
        first.map_or(f64::NAN, |f| f.1),
        first.map_or(f64::NAN, |f| f.2),
        percentile(&hs, 0.5),
        percentile(&hs, 0.99),
        percentile(&total, 0.5),
        errs.first().map(|e| format!("; first error: {e}")).unwrap_or_default()
    );
    emit(m, human);
    Ok(())
}

pub async fn tls_throughput(a: TlsThroughputArgs) -> io::Result<()> {
    let t = TlsCtx::new(&a.c, &a.t)?;
    let mut streams = Vec::with_capacity(a.b.conns);
    let mut m = base_json("tls-throughput", &a.c);
    let mut session_txt = String::new();
    for i in 0..a.b.conns {
        let (s, _, _) = t.open().await?;
        if i == 0 {
            session_txt = session_json(&mut m, &s);
        }
        streams.push(s);
    }
    let hello = if a.b.dir == Dir::Up { b'D' } else { b'S' };
    let r = run_bulk(streams, &a.b, hello, t.ctx.op, &a.c.pid, || t.sink_query()).await?;
    let human = bulk_report(&mut m, "tls-throughput", &who(&a.c), &a.b, &r) + "; " + &session_txt;
    emit(m, human);
    Ok(())
}

pub async fn tls_idle(a: TlsIdleArgs) -> io::Result<()> {
    let t = Arc::new(TlsCtx::new(&a.c, &a.t)?);
    let mut m = base_json("tls-idle", &a.c);
    let tt = t.clone();
    let human = run_idle(&a.i, t.ctx.op, &a.c.pid, "tls-idle", &who(&a.c), &mut m, move |i| {
        let t = tt.clone();
        async move {
            let (mut s, _, _) = t.open().await?;
            check(&mut s, Check::Echo, i, "").await?;
            Ok(s)
        }
    })
    .await;
    emit(m, human);
    Ok(())
}
