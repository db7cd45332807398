//! The load tests over plain tunnels — throughput, connrate, latency, idle — and the bulk and
//! idle engines the TLS tests reuse. They measure what tunnelbench measures, the same way.

use crate::common::*;
use crate::servers::{pattern, tcp_sink_query};
use clap::{Args, ValueEnum};
use serde_json::json;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep, timeout, timeout_at};

#[derive(Copy, Clone, ValueEnum, PartialEq, Eq, Debug)]
pub enum Dir {
    /// Client to server, into a sink.
    Up,
    /// Server to client, from a source.
    Down,
}

impl Dir {
    pub fn as_str(self) -> &'static str {
        match self {
            Dir::Up => "up",
            Dir::Down => "down",
        }
    }
}

#[derive(Args, Clone)]
pub struct BulkOpts {
    /// up: stream into a sink (the target must be a sink); down: read from a source.
    #[arg(long, value_enum, default_value_t = Dir::Up)]
    pub dir: Dir,
    /// Parallel tunnels.
    #[arg(long, default_value_t = 4)]
    pub conns: usize,
    /// Length of the measured window in seconds.
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    /// Write/read buffer size in bytes.
    #[arg(long, default_value_t = 128 * 1024)]
    pub buf: usize,
}

#[derive(Args)]
pub struct ThroughputArgs {
    #[command(flatten)]
    pub c: Common,
    #[command(flatten)]
    pub b: BulkOpts,
}

#[derive(Args)]
pub struct ConnrateArgs {
    #[command(flatten)]
    pub c: Common,
    /// Concurrent workers.
    #[arg(long, default_value_t = 50)]
    pub conns: usize,
    /// Total tunnels to open.
    #[arg(long, default_value_t = 2000)]
    pub total: usize,
    /// Stop starting new tunnels after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub max_secs: u64,
    /// Loopback source addresses (comma-separated), used round-robin by tunnel number, so
    /// one run acts as many clients (bench/throttle.sh passes 1,000).
    #[arg(long, value_delimiter = ',')]
    pub bind: Vec<std::net::IpAddr>,
    /// Send a PROXY protocol v2 header before each CONNECT, as HAProxy's `send-proxy-v2`
    /// does (veilgate with `server.proxy_protocol = "required"`). It claims a client in
    /// 192.0.2.0/24 (TEST-NET-1, never dialled: only a label), round-robin by tunnel number.
    #[arg(long)]
    pub proxy_v2: bool,
}

/// A PROXY v2 header for TCP over IPv4 from 192.0.2.x (x = 1 + i % 250) to `dst`.
fn proxy_v2_header(i: usize, dst: std::net::SocketAddr) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    h.extend_from_slice(&[192, 0, 2, 1 + (i % 250) as u8]);
    match dst.ip() {
        std::net::IpAddr::V4(v4) => h.extend_from_slice(&v4.octets()),
        std::net::IpAddr::V6(_) => h.extend_from_slice(&[127, 0, 0, 1]),
    }
    h.extend_from_slice(&(40000 + (i % 20000) as u16).to_be_bytes());
    h.extend_from_slice(&dst.port().to_be_bytes());
    h
}

#[derive(Args)]
pub struct LatencyArgs {
    #[command(flatten)]
    pub c: Common,
    /// Measured round trips.
    #[arg(long, default_value_t = 5000)]
    pub count: usize,
    /// Round trips before measuring.
    #[arg(long, default_value_t = 200)]
    pub warmup: usize,
    /// Message size in bytes.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Stop after this many seconds even if not all round trips are done.
    #[arg(long, default_value_t = 120)]
    pub max_secs: u64,
}

#[derive(Args, Clone)]
pub struct IdleOpts {
    /// Tunnels to open and hold.
    #[arg(long, default_value_t = 2000)]
    pub count: usize,
    /// Seconds to hold them idle.
    #[arg(long, default_value_t = 5)]
    pub hold: u64,
    /// Concurrent opens.
    #[arg(long, default_value_t = 64)]
    pub open_conc: usize,
    /// Seconds after the last open before the proxy's RSS is sampled (at most --hold).
    #[arg(long, default_value_t = 1)]
    pub settle: u64,
    /// Stop opening new tunnels after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub max_secs: u64,
}

#[derive(Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub c: Common,
    #[command(flatten)]
    pub i: IdleOpts,
    /// Loopback source addresses (comma-separated), used round-robin by tunnel number, so
    /// the idle tunnels belong to many clients (bench/cluster_scale.sh: 100 tunnels, 100 clients).
    #[arg(long, value_delimiter = ',')]
    pub bind: Vec<std::net::IpAddr>,
}

// ---------------------------------------------------------------- helpers

/// Send one byte and expect it back (through an echo).
pub async fn echo_byte<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, b: u8) -> io::Result<()> {
    s.write_all(&[b]).await?;
    s.flush().await?;
    let mut r = [0u8; 1];
    s.read_exact(&mut r).await?;
    if r[0] != b {
        return Err(err("echo mismatch"));
    }
    Ok(())
}

/// Close our side (for TLS: close_notify, then FIN) and read until the peer closes too, within
/// `limit`, so no byte arrives at a closed socket (which would reset the connection).
pub async fn close_gracefully<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, limit: Duration) {
    let _ = timeout(limit, async {
        s.shutdown().await?;
        let mut buf = [0u8; 4096];
        while s.read(&mut buf).await? > 0 {}
        io::Result::Ok(())
    })
    .await;
}

/// The non-zero byte the i-th echo check sends.
pub fn check_byte(i: usize) -> u8 {
    (i % 250) as u8 + 1
}

// ---------------------------------------------------------------- bulk engine

/// What a bulk run measured.
pub struct BulkOut {
    /// Bytes counted: sink-confirmed (up) or read by the client (down).
    pub bytes: u64,
    /// Bytes the client wrote (up) or read (down).
    pub moved: u64,
    pub elapsed: f64,
    /// Up only: whether the sink confirmed every written byte.
    pub confirmed: Option<bool>,
    pub errors: usize,
    pub per_conn: Vec<u64>,
    pub client_cpu: f64,
    pub p0: Option<ProcSample>,
    pub p1: Option<ProcSample>,
}

/// Stream over already-open connections for `o.secs` seconds. `hello` is the first byte each
/// connection sends (it selects the server's mode). For `up`, `query` asks the sink (directly)
/// for its byte total; bytes count only once the sink has them, and the clock stops then.
pub async fn run_bulk<S, Q, F>(
    streams: Vec<S>,
    o: &BulkOpts,
    hello: u8,
    op: Duration,
    pids: &[u32],
    query: Q,
) -> io::Result<BulkOut>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Q: Fn() -> F,
    F: Future<Output = io::Result<u64>>,
{
    let n = streams.len();
    let sink_base = if o.dir == Dir::Up { Some(query().await?) } else { None };
    let counters: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let errors = Arc::new(AtomicUsize::new(0));
    let p0 = proc_sample(pids);
    let c0 = self_cpu();
    let t0 = Instant::now();
    let deadline = tokio::time::Instant::from_std(t0 + Duration::from_secs(o.secs));
    let mut handles = Vec::new();
    for (i, mut s) in streams.into_iter().enumerate() {
        let (counters, errors) = (counters.clone(), errors.clone());
        let (dir, bufsz) = (o.dir, o.buf.max(1));
        handles.push(tokio::spawn(async move {
            let mut buf = pattern(bufsz);
            let sent_hello = timeout_at(deadline, async {
                s.write_all(&[hello]).await?;
                s.flush().await
            })
            .await;
            if !matches!(sent_hello, Ok(Ok(()))) {
                errors.fetch_add(1, Relaxed);
                return s;
            }
            loop {
                // write()/read() are cancel-safe (for TLS too: tokio-rustls reports Pending only
                // when it took no bytes), so a deadline in the middle loses nothing.
                let r = if dir == Dir::Up {
                    timeout_at(deadline, s.write(&buf)).await
                } else {
                    timeout_at(deadline, s.read(&mut buf)).await
                };
                match r {
                    Ok(Ok(0)) | Ok(Err(_)) => {
                        errors.fetch_add(1, Relaxed);
                        break;
                    }
                    Ok(Ok(k)) => {
                        counters[i].fetch_add(k as u64, Relaxed);
                    }
                    Err(_) => break,
                }
            }
            if dir == Dir::Up {
                // TLS buffers plaintext it has accepted; push it out (a no-op for TCP).
                if !matches!(timeout(op, s.flush()).await, Ok(Ok(()))) {
                    errors.fetch_add(1, Relaxed);
                }
            }
            s
        }));
    }
    let mut keep = Vec::new();
    for h in handles {
        keep.push(h.await.map_err(|e| err(e.to_string()))?);
    }
    let moved: u64 = counters.iter().map(|x| x.load(Relaxed)).sum();
    let (bytes, elapsed, confirmed) = if let Some(base) = sink_base {
        let limit = Instant::now() + Duration::from_secs(10);
        loop {
            let got = query().await?.saturating_sub(base);
            if got >= moved || Instant::now() > limit {
                break (got, t0.elapsed().as_secs_f64(), Some(got == moved));
            }
            sleep(Duration::from_millis(1)).await;
        }
    } else {
        (moved, o.secs as f64, None)
    };
    let p1 = proc_sample(pids);
    let c1 = self_cpu();
    drop(keep);
    Ok(BulkOut {
        bytes,
        moved,
        elapsed,
        confirmed,
        errors: errors.load(Relaxed),
        per_conn: counters.iter().map(|x| x.load(Relaxed)).collect(),
        client_cpu: c1 - c0,
        p0,
        p1,
    })
}

/// The JSON fields and human line of a bulk run (shared by throughput and tls-throughput).
pub fn bulk_report(m: &mut Json, test: &str, label: &str, o: &BulkOpts, r: &BulkOut) -> String {
    let mbps = r.bytes as f64 / r.elapsed.max(1e-9) / 1e6;
    m.insert("dir".into(), json!(o.dir.as_str()));
    m.insert("conns".into(), json!(o.conns));
    m.insert("secs".into(), json!(o.secs));
    m.insert("bytes".into(), json!(r.bytes));
    m.insert("client_counted_bytes".into(), json!(r.moved));
    m.insert("sink_confirmed".into(), json!(r.confirmed));
    m.insert("elapsed_s".into(), json!(r4(r.elapsed)));
    m.insert("mbyte_per_s".into(), json!(r2(mbps)));
    m.insert("gbit_per_s".into(), json!(r2(mbps * 8.0 / 1000.0)));
    m.insert("errors".into(), json!(r.errors));
    let per_conn: Vec<f64> = r.per_conn.iter().map(|b| r2(*b as f64 / o.secs.max(1) as f64 / 1e6)).collect();
    m.insert("per_conn_mbyte_per_s".into(), json!(per_conn));
    m.insert("client_cpu_s".into(), json!(r2(r.client_cpu)));
    let mut cpu_txt = String::new();
    if let Some(cpu) = insert_cpu(m, r.p0, r.p1) {
        let per_gb = cpu / (r.bytes as f64 / 1e9);
        m.insert("proxy_cpu_s_per_gb".into(), num(r2(per_gb)));
        cpu_txt = format!(", proxy {per_gb:.2} CPU-s/GB, RSS {} KiB", r.p1.map(|p| p.rss_kib).unwrap_or(0));
    }
    format!(
        "{test} {} {label}: {mbps:.1} MB/s ({:.2} Gbit/s) over {} conns, {:.2} s, {} bytes, {} errors{cpu_txt}{}",
        o.dir.as_str(),
        mbps * 8.0 / 1000.0,
        o.conns,
        r.elapsed,
        r.bytes,
        r.errors,
        if r.confirmed == Some(false) { " [SINK COUNT MISMATCH]" } else { "" }
    )
}

pub async fn throughput(a: ThroughputArgs) -> io::Result<()> {
    let c = Ctx::new(&a.c)?;
    let mut streams = Vec::with_capacity(a.b.conns);
    for _ in 0..a.b.conns {
        let (s, rest) = c.open().await?;
        if !rest.is_empty() {
            return Err(err("unexpected bytes after the CONNECT answer"));
        }
        streams.push(s);
    }
    let hello = if a.b.dir == Dir::Up { b'D' } else { b'G' };
    let sink = c.target_addr;
    let r = run_bulk(streams, &a.b, hello, c.op, &a.c.pid, || tcp_sink_query(sink)).await?;
    let mut m = base_json("throughput", &a.c);
    let human = bulk_report(&mut m, "throughput", &who(&a.c), &a.b, &r);
    emit(m, human);
    Ok(())
}

// ---------------------------------------------------------------- connrate

async fn one_echo_tunnel_from(from: Option<std::net::IpAddr>, c: &Ctx, byte: u8) -> io::Result<tokio::net::TcpStream> {
    one_echo_tunnel_behind(from, &[], c, byte).await
}

async fn one_echo_tunnel_behind(
    from: Option<std::net::IpAddr>,
    header: &[u8],
    c: &Ctx,
    byte: u8,
) -> io::Result<tokio::net::TcpStream> {
    let (mut s, rest) = open_tunnel_behind(from, c.proxy, header, &c.target, c.target_addr).await?;
    if !rest.is_empty() {
        return Err(err("unexpected bytes after the CONNECT answer"));
    }
    echo_byte(&mut s, byte).await?;
    Ok(s)
}

pub async fn connrate(a: ConnrateArgs) -> io::Result<()> {
    let c = Arc::new(Ctx::new(&a.c)?);
    let bind = Arc::new(a.bind.clone());
    let proxy_v2 = a.proxy_v2.then_some(c.proxy).flatten();
    let mut m = base_json("connrate", &a.c);
    m.insert("total".into(), json!(a.total));
    m.insert("clients".into(), json!(a.bind.len().max(1)));
    m.insert("proxy_v2".into(), json!(a.proxy_v2));
    let op = c.op;
    let rate = Rate { conns: a.conns, total: a.total, max_secs: a.max_secs, op, pids: &a.c.pid };
    let human = run_connrate(rate, &mut m, move |i| {
        let (c, bind) = (c.clone(), bind.clone());
        async move {
            let from = (!bind.is_empty()).then(|| bind[i % bind.len()]);
            let header = proxy_v2.map(|p| proxy_v2_header(i, p)).unwrap_or_default();
            one_echo_tunnel_behind(from, &header, &c, check_byte(i)).await
        }
    })
    .await?;
    emit(m, format!("connrate {}: {human}", who(&a.c)));
    Ok(())
}

/// What [`run_connrate`] runs: workers, tunnels in all, a time bound, each tunnel's bound and
/// the proxy's PIDs for its CPU.
pub struct Rate<'a> {
    pub conns: usize,
    pub total: usize,
    pub max_secs: u64,
    pub op: Duration,
    pub pids: &'a [u32],
}

/// The tunnels-per-second engine: `r.conns` workers take tunnel numbers until `r.total` (or
/// `r.max_secs`), each running `one(i)` (open, one byte echoed) within `r.op` and dropping
/// what it returns. Fills `m` with the figures; returns the human line's figures.
pub async fn run_connrate<S, O, F>(r: Rate<'_>, m: &mut Json, one: O) -> io::Result<String>
where
    S: Send + 'static,
    O: Fn(usize) -> F + Send + Sync + 'static,
    F: Future<Output = io::Result<S>> + Send + 'static,
{
    let one = Arc::new(one);
    let next = Arc::new(AtomicUsize::new(0));
    let p0 = proc_sample(r.pids);
    let t0 = Instant::now();
    let stop_at = t0 + Duration::from_secs(r.max_secs);
    let mut hs = Vec::new();
    for _ in 0..r.conns.max(1) {
        let (one, next, total, op) = (one.clone(), next.clone(), r.total, r.op);
        hs.push(tokio::spawn(async move {
            let (mut lat, mut errs) = (Vec::new(), Vec::<String>::new());
            loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= total || Instant::now() > stop_at {
                    break;
                }
                let t = Instant::now();
                match timeout(op, one(i)).await {
                    Ok(Ok(s)) => {
                        lat.push(t.elapsed().as_secs_f64() * 1e6);
                        drop(s);
                    }
                    Ok(Err(e)) => errs.push(e.to_string()),
                    Err(_) => errs.push("timeout".into()),
                }
            }
            (lat, errs)
        }));
    }
    let (mut lat, mut errs) = (Vec::new(), Vec::new());
    for h in hs {
        let (l, e) = h.await.map_err(|e| err(e.to_string()))?;
        lat.extend(l);
        errs.extend(e);
    }
    let el = t0.elapsed().as_secs_f64();
    let p1 = proc_sample(r.pids);
    sort(&mut lat);
    let rate = lat.len() as f64 / el;
    m.insert("conns".into(), json!(r.conns));
    m.insert("ok".into(), json!(lat.len()));
    m.insert("errors".into(), json!(errs.len()));
    m.insert("first_error".into(), json!(errs.first()));
    m.insert("elapsed_s".into(), json!(r2(el)));
    m.insert("tunnels_per_s".into(), json!(r2(rate)));
    for (k, q) in [("p50_us", 0.5), ("p99_us", 0.99)] {
        m.insert(k.into(), num(percentile(&lat, q).round()));
    }
    m.insert("max_us".into(), json!(lat.last().map(|x| x.round())));
    let mut cpu_txt = String::new();
    if let Some(cpu) = insert_cpu(m, p0, p1) {
        let per = (cpu * 1e6 / lat.len().max(1) as f64).round();
        m.insert("proxy_cpu_us_per_tunnel".into(), json!(per));
        cpu_txt = format!(", proxy {per:.0} CPU-us/tunnel");
    }
    Ok(format!(
        "{rate:.0} tunnels/s, {} ok, {} errors, setup p50 {:.0} us p99 {:.0} us{cpu_txt}",
        lat.len(),
        errs.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    ))
}

// ---------------------------------------------------------------- latency

pub async fn latency(a: LatencyArgs) -> io::Result<()> {
    let c = Ctx::new(&a.c)?;
    let (mut s, rest) = c.open().await?;
    if !rest.is_empty() {
        return Err(err("unexpected bytes after the CONNECT answer"));
    }
    let size = a.size.max(1);
    let mut msg = pattern(size);
    let mut back = vec![0u8; size];
    let mut lat = Vec::with_capacity(a.count);
    let p0 = proc_sample(&a.c.pid);
    let t0 = Instant::now();
    let stop_at = t0 + Duration::from_secs(a.max_secs);
    for i in 0..a.warmup + a.count {
        if Instant::now() > stop_at {
            break;
        }
        msg[0] = (i % 256) as u8;
        let t = Instant::now();
        timeout(c.op, async {
            s.write_all(&msg).await?;
            s.read_exact(&mut back).await
        })
        .await
        .map_err(|_| err("round trip timed out"))??;
        if back != msg {
            return Err(err("echo mismatch"));
        }
        if i >= a.warmup {
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    let el = t0.elapsed().as_secs_f64();
    let p1 = proc_sample(&a.c.pid);
    sort(&mut lat);
    let mean = lat.iter().sum::<f64>() / lat.len().max(1) as f64;
    let mut m = base_json("latency", &a.c);
    m.insert("count".into(), json!(lat.len()));
    m.insert("size".into(), json!(size));
    for (k, q) in [("p50_us", 0.5), ("p90_us", 0.9), ("p99_us", 0.99)] {
        m.insert(k.into(), num(r2(percentile(&lat, q))));
    }
    m.insert("max_us".into(), json!(lat.last().map(|x| r2(*x))));
    m.insert("mean_us".into(), num(r2(mean)));
    m.insert("elapsed_s".into(), json!(r2(el)));
    insert_cpu(&mut m, p0, p1);
    let human = format!(
        "latency {}: {} round trips of {size} B, p50 {:.1} us, p90 {:.1} us, p99 {:.1} us",
        who(&a.c),
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.9),
        percentile(&lat, 0.99)
    );
    emit(m, human);
    Ok(())
}

// ---------------------------------------------------------------- idle engine

/// Open `o.count` connections with `open` (each already checked with a 1-byte echo),
/// `o.open_conc` at a time; hold them; sample the proxy's RSS after `o.settle` s; after
/// `o.hold` s check each again with a 1-byte echo. Fills `m` and returns the human line.
pub async fn run_idle<S, O, F>(
    o: &IdleOpts,
    op: Duration,
    pids: &[u32],
    test: &str,
    label: &str,
    m: &mut Json,
    open: O,
) -> String
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    O: Fn(usize) -> F + Send + Sync + 'static,
    F: Future<Output = io::Result<S>> + Send + 'static,
{
    let open = Arc::new(open);
    let p0 = proc_sample(pids);
    let sem = Arc::new(tokio::sync::Semaphore::new(o.open_conc.max(1)));
    let t0 = Instant::now();
    let stop_at = t0 + Duration::from_secs(o.max_secs);
    let mut hs = Vec::new();
    for i in 0..o.count {
        let (sem, open) = (sem.clone(), open.clone());
        hs.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.map_err(|e| e.to_string())?;
            if Instant::now() > stop_at {
                return Err("not started: --max-secs reached".to_string());
            }
            match timeout(op, open(i)).await {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timeout".into()),
            }
        }));
    }
    let mut streams = Vec::new();
    let mut errs = Vec::new();
    for h in hs {
        match h.await {
            Ok(Ok(s)) => streams.push(s),
            Ok(Err(e)) => errs.push(e),
            Err(e) => errs.push(e.to_string()),
        }
    }
    let open_s = t0.elapsed().as_secs_f64();
    let opened = streams.len();
    eprintln!("{test} {label}: {opened} open ({} errors) in {open_s:.2} s, holding {} s", errs.len(), o.hold);
    sleep(Duration::from_secs(o.settle.min(o.hold))).await;
    let p_hold = proc_sample(pids);
    sleep(Duration::from_secs(o.hold.saturating_sub(o.settle))).await;
    let mut checks = Vec::new();
    for (i, mut s) in streams.into_iter().enumerate() {
        checks.push(tokio::spawn(async move {
            let ok = matches!(timeout(op, echo_byte(&mut s, check_byte(i + 7))).await, Ok(Ok(())));
            (ok, s)
        }));
    }
    let mut alive = 0usize;
    let mut keep = Vec::new();
    for h in checks {
        if let Ok((ok, s)) = h.await {
            alive += usize::from(ok);
            keep.push(s);
        }
    }
    // Close them all cleanly, each within 2 s.
    let closers: Vec<_> = keep
        .into_iter()
        .map(|mut s| tokio::spawn(async move { close_gracefully(&mut s, Duration::from_secs(2)).await }))
        .collect();
    for c in closers {
        let _ = c.await;
    }
    m.insert("requested".into(), json!(o.count));
    m.insert("opened".into(), json!(opened));
    m.insert("open_errors".into(), json!(errs.len()));
    m.insert("first_error".into(), json!(errs.first()));
    m.insert("alive_after_hold".into(), json!(alive));
    m.insert("open_s".into(), json!(r2(open_s)));
    m.insert("hold_s".into(), json!(o.hold));
    let mut human = format!("{test} {label}: {opened}/{} opened, {alive} alive after {} s", o.count, o.hold);
    if let (Some(p0), Some(ph)) = (p0, p_hold) {
        let per = (ph.rss_kib as f64 - p0.rss_kib as f64) / opened.max(1) as f64;
        m.insert("proxy_rss_before_kib".into(), json!(p0.rss_kib));
        m.insert("proxy_rss_holding_kib".into(), json!(ph.rss_kib));
        m.insert("proxy_threads_before".into(), json!(p0.threads));
        m.insert("proxy_threads_holding".into(), json!(ph.threads));
        m.insert("kib_per_idle_tunnel".into(), json!(r2(per)));
        human += &format!("; proxy RSS {} -> {} KiB = {per:.1} KiB/tunnel", p0.rss_kib, ph.rss_kib);
    }
    human
}

pub async fn idle(a: IdleArgs) -> io::Result<()> {
    let c = Arc::new(Ctx::new(&a.c)?);
    let mut m = base_json("idle", &a.c);
    m.insert("clients".into(), json!(a.bind.len().max(1)));
    let (cc, bind) = (c.clone(), Arc::new(a.bind));
    let human = run_idle(&a.i, c.op, &a.c.pid, "idle", &who(&a.c), &mut m, move |i| {
        let (c, from) = (cc.clone(), (!bind.is_empty()).then(|| bind[i % bind.len()]));
        async move { one_echo_tunnel_from(from, &c, check_byte(i)).await }
    })
    .await;
    emit(m, human);
    Ok(())
}
