//! `tls-origin`: a TLS server for the MITM comparison that records every ClientHello it gets,
//! and `tls-hellos`: a summary of those records.
//!
//! After the handshake the client's first application byte selects the mode:
//! `D` sink (discard and count; on the client's close the connection's count is written back),
//! `S` source (stream until the client closes), `E` echo, `H` (or `G`, `P`: the first byte of a
//! request line) an HTTP/1.1 request answered `200 OK` with a 5-byte body and
//! `Connection: close`, `Q` the sink totals (16 bytes: bytes, connections), `W` nothing (a
//! client's warm-up). Records with mode `Q` or `W` are control traffic, left out of summaries.

use crate::common::{Json, accept_forever, emit, err, loopback_addr};
use crate::pki;
use crate::servers::pattern;
use clap::Args;
use rustls::server::{Acceptor, ClientHello};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_rustls::LazyConfigAcceptor;

#[derive(Args)]
pub struct OriginArgs {
    /// Loopback address to serve TLS on; repeat for several (e.g. 127.0.0.1:18943 and [::1]:18943).
    #[arg(long, required = true)]
    pub listen: Vec<String>,
    /// Directory of the test PKI (origin-ca.pem, origin-leaf.pem and keys): made if missing.
    #[arg(long)]
    pub pki_dir: PathBuf,
    /// Where to append one JSON line per connection (default: PKI_DIR/clienthellos.jsonl).
    #[arg(long)]
    pub hello_log: Option<PathBuf>,
    /// Exit by itself after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub max_secs: u64,
}

#[derive(Args)]
pub struct HellosArgs {
    /// A clienthellos.jsonl written by tls-origin.
    #[arg(long)]
    pub file: PathBuf,
    /// Skip this many lines first (to summarise only what one phase of a run added).
    #[arg(long, default_value_t = 0)]
    pub skip: usize,
    /// Free-form label copied into the JSON output.
    #[arg(long, default_value = "")]
    pub label: String,
}

static SINK_BYTES: AtomicU64 = AtomicU64::new(0);
static SINK_CONNS: AtomicU64 = AtomicU64::new(0);
static CONN_IDS: AtomicU64 = AtomicU64::new(0);

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(120);

struct HelloLog(Mutex<std::fs::File>);

impl HelloLog {
    fn append(&self, rec: &Json) {
        let mut line = Value::Object(rec.clone()).to_string();
        line.push('\n');
        if let Ok(mut f) = self.0.lock() {
            // One write per record on an O_APPEND file: lines never interleave.
            let _ = f.write_all(line.as_bytes());
        }
    }
}

fn hex16(v: u16) -> String {
    format!("0x{v:04x}")
}

fn name_or_hex(name: Option<&str>, v: u16) -> String {
    name.map(str::to_string).unwrap_or_else(|| hex16(v))
}

/// What a ClientHello offered, and a stable fingerprint of it: `vgfp1-` and the first 24 hex
/// digits of SHA-256 over `cs=<suites>;ss=<signature schemes>;alpn=<protocols>` (codes in hex,
/// in the order offered, comma-separated).
pub fn hello_record(h: &ClientHello<'_>) -> Json {
    let suites: Vec<u16> = h.cipher_suites().iter().map(|c| u16::from(*c)).collect();
    let schemes: Vec<u16> = h.signature_schemes().iter().map(|s| u16::from(*s)).collect();
    let alpn: Vec<String> =
        h.alpn().map(|it| it.map(|p| String::from_utf8_lossy(p).into_owned()).collect()).unwrap_or_default();
    let groups: Vec<String> = h
        .named_groups()
        .map(|g| g.iter().map(|g| name_or_hex(g.as_str(), u16::from(*g))).collect())
        .unwrap_or_default();
    let join = |v: &[u16]| v.iter().map(|x| format!("{x:04x}")).collect::<Vec<_>>().join(",");
    let canon = format!("cs={};ss={};alpn={}", join(&suites), join(&schemes), alpn.join(","));
    let digest = Sha256::digest(canon.as_bytes());
    let fp: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
    let mut m = Json::new();
    m.insert("sni".into(), json!(h.server_name()));
    m.insert("alpn".into(), json!(alpn));
    m.insert(
        "cipher_suites".into(),
        json!(h.cipher_suites().iter().map(|c| name_or_hex(c.as_str(), u16::from(*c))).collect::<Vec<_>>()),
    );
    m.insert(
        "signature_schemes".into(),
        json!(h.signature_schemes().iter().map(|s| name_or_hex(s.as_str(), u16::from(*s))).collect::<Vec<_>>()),
    );
    m.insert("named_groups".into(), json!(groups));
    m.insert("fingerprint".into(), json!(format!("vgfp1-{fp}")));
    m.insert("fingerprint_input".into(), json!(canon));
    m
}

pub async fn tls_origin(a: OriginArgs) -> io::Result<()> {
    let (chain, key, made) = pki::origin_identity(&a.pki_dir)?;
    let leaf_fp = pki::cert_sha256(chain[0].as_ref());
    let mut cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| err(format!("origin certificate: {e}")))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let cfg = Arc::new(cfg);
    let log_path = a.hello_log.clone().unwrap_or_else(|| a.pki_dir.join("clienthellos.jsonl"));
    let file = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
    let log = Arc::new(HelloLog(Mutex::new(file)));
    let mut tasks = Vec::new();
    for addr in &a.listen {
        let l = TcpListener::bind(loopback_addr(addr)?).await?;
        eprintln!("tls-origin listening on {}", l.local_addr()?);
        let (cfg, log) = (cfg.clone(), log.clone());
        tasks.push(tokio::spawn(accept_forever(l, move |s| origin_conn(s, cfg.clone(), log.clone()))));
    }
    eprintln!(
        "tls-origin: PKI in {} ({}), CA {}, leaf SHA-256 {leaf_fp}, hellos to {}",
        a.pki_dir.display(),
        if made { "made now" } else { "reused" },
        a.pki_dir.join(pki::CA_PEM).display(),
        log_path.display()
    );
    tokio::time::sleep(Duration::from_secs(a.max_secs)).await;
    eprintln!("tls-origin: --max-secs reached, exiting");
    for t in tasks {
        t.abort();
    }
    Ok(())
}

async fn origin_conn(tcp: TcpStream, cfg: Arc<rustls::ServerConfig>, log: Arc<HelloLog>) {
    let mut rec = Json::new();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    rec.insert("ts_ms".into(), json!(now));
    rec.insert("conn".into(), json!(CONN_IDS.fetch_add(1, Relaxed)));
    rec.insert("peer".into(), json!(tcp.peer_addr().ok().map(|a| a.to_string())));
    rec.insert("local".into(), json!(tcp.local_addr().ok().map(|a| a.to_string())));
    let start = match timeout(HANDSHAKE_TIMEOUT, LazyConfigAcceptor::new(Acceptor::default(), tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return fail(&log, rec, format!("no ClientHello: {e}")),
        Err(_) => return fail(&log, rec, "no ClientHello in time".into()),
    };
    rec.extend(hello_record(&start.client_hello()));
    let mut tls = match timeout(HANDSHAKE_TIMEOUT, start.into_stream(cfg)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return fail(&log, rec, format!("handshake: {e}")),
        Err(_) => return fail(&log, rec, "handshake timed out".into()),
    };
    {
        let c = tls.get_ref().1;
        rec.insert("version".into(), json!(c.protocol_version().and_then(|v| v.as_str())));
        rec.insert("negotiated_cipher".into(), json!(c.negotiated_cipher_suite().and_then(|s| s.suite().as_str())));
        rec.insert("negotiated_alpn".into(), json!(c.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned())));
    }
    let mut first = [0u8; 1];
    let mode = match timeout(FIRST_BYTE_TIMEOUT, tls.read(&mut first)).await {
        Ok(Ok(1)) => first[0],
        Ok(Ok(_)) => return fail(&log, rec, "closed before a mode byte".into()),
        Ok(Err(e)) => return fail(&log, rec, format!("reading the mode byte: {e}")),
        Err(_) => return fail(&log, rec, "no mode byte in time".into()),
    };
    let mode_name = match mode {
        b'D' => "D",
        b'S' => "S",
        b'E' => "E",
        b'Q' => "Q",
        b'W' => "W",
        b'H' | b'G' | b'P' => "H",
        _ => "?",
    };
    rec.insert("mode".into(), json!(mode_name));
    log.append(&rec);
    let _ = match mode_name {
        "D" => sink(&mut tls).await,
        "S" => source(&mut tls).await,
        "E" => echo(&mut tls).await,
        "Q" => query(&mut tls).await,
        "H" => http(&mut tls, mode).await,
        _ => tls.shutdown().await,
    };
}

fn fail(log: &HelloLog, mut rec: Json, why: String) {
    rec.insert("error".into(), json!(why));
    log.append(&rec);
}

async fn sink<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> io::Result<()> {
    SINK_CONNS.fetch_add(1, Relaxed);
    let mut buf = vec![0u8; 256 * 1024];
    let mut mine = 0u64;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            s.write_all(&mine.to_be_bytes()).await?;
            return s.shutdown().await;
        }
        mine += n as u64;
        SINK_BYTES.fetch_add(n as u64, Relaxed);
    }
}

async fn query<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> io::Result<()> {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&SINK_BYTES.load(Relaxed).to_be_bytes());
    out[8..].copy_from_slice(&SINK_CONNS.load(Relaxed).to_be_bytes());
    s.write_all(&out).await?;
    s.shutdown().await
}

async fn source<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> io::Result<()> {
    let buf = pattern(128 * 1024);
    loop {
        s.write_all(&buf).await?;
    }
}

async fn echo<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return s.shutdown().await;
        }
        s.write_all(&buf[..n]).await?;
        s.flush().await?;
    }
}

/// Read one request head (the mode byte `H` is dropped; `G`/`P` begin the request line) and
/// answer it.
async fn http<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, first: u8) -> io::Result<()> {
    let mut head = if first == b'H' { Vec::new() } else { vec![first] };
    let mut tmp = [0u8; 4096];
    timeout(HANDSHAKE_TIMEOUT, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            if head.len() > 16384 {
                return Err(err("request head too large"));
            }
            let n = s.read(&mut tmp).await?;
            if n == 0 {
                return Err(err("closed inside the request head"));
            }
            head.extend_from_slice(&tmp[..n]);
        }
        Ok(())
    })
    .await
    .map_err(|_| err("request head timed out"))??;
    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        .await?;
    s.flush().await?;
    s.shutdown().await
}

/// `tls-hellos`: group the recorded ClientHellos by fingerprint.
pub fn tls_hellos(a: HellosArgs) -> io::Result<()> {
    let text = std::fs::read_to_string(&a.file).map_err(|e| err(format!("{}: {e}", a.file.display())))?;
    #[derive(Default)]
    struct Group {
        count: u64,
        sni: BTreeMap<String, u64>,
        modes: BTreeMap<String, u64>,
        example: Json,
    }
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    let (mut records, mut control, mut failed) = (0u64, 0u64, 0u64);
    for line in text.lines().skip(a.skip).filter(|l| !l.trim().is_empty()) {
        let Ok(Value::Object(r)) = serde_json::from_str::<Value>(line) else { continue };
        records += 1;
        let mode = r.get("mode").and_then(Value::as_str).unwrap_or("-").to_string();
        if mode == "Q" || mode == "W" {
            control += 1;
            continue;
        }
        if r.contains_key("error") {
            failed += 1;
        }
        let Some(fp) = r.get("fingerprint").and_then(Value::as_str) else { continue };
        let g = groups.entry(fp.to_string()).or_default();
        g.count += 1;
        let sni = r.get("sni").and_then(Value::as_str).unwrap_or("(none)").to_string();
        *g.sni.entry(sni).or_default() += 1;
        *g.modes.entry(mode).or_default() += 1;
        if g.example.is_empty() {
            for k in ["alpn", "cipher_suites", "signature_schemes", "named_groups", "version", "negotiated_cipher"] {
                g.example.insert(k.into(), r.get(k).cloned().unwrap_or(Value::Null));
            }
        }
    }
    let mut human = format!(
        "tls-hellos{}{}: {records} records ({control} control, {failed} failed)",
        if a.label.is_empty() { "" } else { " " },
        a.label
    );
    let mut list = Vec::new();
    for (fp, g) in &groups {
        let n_suites = g.example.get("cipher_suites").and_then(Value::as_array).map_or(0, Vec::len);
        let n_schemes = g.example.get("signature_schemes").and_then(Value::as_array).map_or(0, Vec::len);
        human += &format!(
            "; {fp} x{} (SNI {:?}, {n_suites} suites, {n_schemes} sig schemes)",
            g.count,
            g.sni.keys().collect::<Vec<_>>()
        );
        let mut e = g.example.clone();
        e.insert("fingerprint".into(), json!(fp));
        e.insert("count".into(), json!(g.count));
        e.insert("sni".into(), json!(g.sni));
        e.insert("modes".into(), json!(g.modes));
        list.push(Value::Object(e));
    }
    let mut m = Json::new();
    m.insert("tool".into(), json!("vgbench"));
    m.insert("test".into(), json!("tls-hellos"));
    m.insert("label".into(), json!(a.label));
    m.insert("records".into(), json!(records));
    m.insert("control_records".into(), json!(control));
    m.insert("failed_records".into(), json!(failed));
    m.insert("fingerprints".into(), json!(groups.keys().collect::<Vec<_>>()));
    m.insert("groups".into(), Value::Array(list));
    emit(m, human);
    Ok(())
}
