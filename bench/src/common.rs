//! What every subcommand shares: loopback-only addresses, opening a tunnel, proxy process
//! samples, percentiles and the one-JSON-line output.

use clap::Args;
use serde_json::{Map, Value, json};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub type Json = Map<String, Value>;

pub fn err(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

/// Split `HOST:PORT` (`[v6]:PORT` for IPv6) into its parts.
pub fn split_host_port(s: &str) -> io::Result<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:").ok_or_else(|| err(format!("{s}: expected [IPV6]:PORT")))?;
        (h, p)
    } else {
        s.rsplit_once(':').ok_or_else(|| err(format!("{s}: expected HOST:PORT")))?
    };
    let port: u16 = port.parse().map_err(|_| err(format!("{s}: bad port")))?;
    if port == 0 {
        return Err(err(format!("{s}: port 0")));
    }
    Ok((host.to_string(), port))
}

/// A loopback socket address for `HOST:PORT`. Only IP literals in 127.0.0.0/8 or ::1 and the
/// special-use names `localhost` / `*.localhost` (taken as 127.0.0.1, RFC 6761) are accepted:
/// no resolver is ever asked, so nothing can leave the machine.
pub fn loopback_addr(s: &str) -> io::Result<SocketAddr> {
    let (host, port) = split_host_port(s)?;
    let ip = match host.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => {
            let h = host.trim_end_matches('.').to_ascii_lowercase();
            if h == "localhost" || h.ends_with(".localhost") {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                return Err(err(format!("{s}: refusing a name other than localhost (loopback only, no DNS)")));
            }
        }
    };
    if !ip.is_loopback() {
        return Err(err(format!("{s}: refusing non-loopback address")));
    }
    Ok(SocketAddr::new(ip, port))
}

/// Let the process hold many sockets (idle tests open thousands).
pub fn raise_nofile() {
    // SAFETY: plain libc calls on a local, initialised struct.
    unsafe {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Nearest-rank percentile of an ascending slice (NaN when empty).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

pub fn sort(v: &mut [f64]) {
    v.sort_by(|x, y| x.total_cmp(y));
}

pub fn r2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

pub fn r4(x: f64) -> f64 {
    (x * 10000.0).round() / 10000.0
}

/// A JSON number, or null for NaN/inf (serde_json would write null anyway; this is explicit).
pub fn num(x: f64) -> Value {
    if x.is_finite() { json!(x) } else { Value::Null }
}

/// CPU seconds (utime+stime of all threads), RSS KiB and threads, summed over the PIDs.
#[derive(Clone, Copy, Default)]
pub struct ProcSample {
    pub cpu_s: f64,
    pub rss_kib: u64,
    pub threads: u64,
}

pub fn proc_sample(pids: &[u32]) -> Option<ProcSample> {
    if pids.is_empty() {
        return None;
    }
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut s = ProcSample::default();
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after "(comm) ": state is [0], utime [11], stime [12].
        let f: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
        let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        s.cpu_s += ticks as f64 / tck;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        for line in status.lines() {
            let val = || line.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            if line.starts_with("VmRSS:") {
                s.rss_kib += val();
            } else if line.starts_with("Threads:") {
                s.threads += val();
            }
        }
    }
    Some(s)
}

pub fn self_cpu() -> f64 {
    proc_sample(&[std::process::id()]).map(|s| s.cpu_s).unwrap_or(f64::NAN)
}

/// Options every client subcommand takes.
#[derive(Args, Clone)]
pub struct Common {
    /// Proxy HOST:PORT, or "none" to connect to the target directly (the physical baseline).
    #[arg(long)]
    pub proxy: String,
    /// Target HOST:PORT sent in the CONNECT request (a vgbench server).
    #[arg(long)]
    pub target: String,
    /// PIDs of the proxy process(es), comma-separated, for CPU time and RSS from /proc.
    #[arg(long, value_delimiter = ',')]
    pub pid: Vec<u32>,
    /// Free-form label copied into the JSON output.
    #[arg(long, default_value = "")]
    pub label: String,
    /// Per-operation timeout in seconds (connect, CONNECT answer, handshake, one round trip).
    #[arg(long, default_value_t = 10)]
    pub op_timeout: u64,
}

/// The resolved form of [`Common`].
pub struct Ctx {
    pub proxy: Option<SocketAddr>,
    pub target: String,
    pub target_host: String,
    pub target_addr: SocketAddr,
    pub op: Duration,
}

impl Ctx {
    pub fn new(c: &Common) -> io::Result<Ctx> {
        let proxy = if c.proxy == "none" { None } else { Some(loopback_addr(&c.proxy)?) };
        let target_addr = loopback_addr(&c.target)?;
        let (target_host, _) = split_host_port(&c.target)?;
        Ok(Ctx {
            proxy,
            target: c.target.clone(),
            target_host,
            target_addr,
            op: Duration::from_secs(c.op_timeout.max(1)),
        })
    }

    /// Open a tunnel (or a direct connection) within the operation timeout.
    pub async fn open(&self) -> io::Result<(TcpStream, Vec<u8>)> {
        tokio::time::timeout(self.op, open_tunnel(self.proxy, &self.target, self.target_addr))
            .await
            .map_err(|_| err("tunnel open timed out"))?
    }
}

/// Connect to `target` through `proxy` with `CONNECT` (or straight to `target_addr` when
/// `proxy` is None). Returns the stream and any bytes that followed the proxy's answer head.
pub async fn open_tunnel(
    proxy: Option<SocketAddr>,
    target: &str,
    target_addr: SocketAddr,
) -> io::Result<(TcpStream, Vec<u8>)> {
    open_tunnel_from(None, proxy, target, target_addr).await
}

/// Connect to `to`, from the loopback source address `from` when given: one process can
/// then stand for many clients, as a proxy keys its per-client limits by source address.
pub async fn connect_from(from: Option<IpAddr>, to: SocketAddr) -> io::Result<TcpStream> {
    let Some(ip) = from else { return TcpStream::connect(to).await };
    if !ip.is_loopback() {
        return Err(err(format!("--bind {ip}: only loopback source addresses are allowed")));
    }
    let sock = if to.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    sock.bind(SocketAddr::new(ip, 0))?;
    sock.connect(to).await
}

/// As [`open_tunnel`], with the client socket bound to the source address `from`.
pub async fn open_tunnel_from(
    from: Option<IpAddr>,
    proxy: Option<SocketAddr>,
    target: &str,
    target_addr: SocketAddr,
) -> io::Result<(TcpStream, Vec<u8>)> {
    open_tunnel_behind(from, proxy, &[], target, target_addr).await
}

/// [`open_tunnel_from`] as a balancer would open it: `header` (a PROXY protocol header; empty
/// for none) written on its own first, as HAProxy writes it on connect, then the CONNECT.
pub async fn open_tunnel_behind(
    from: Option<IpAddr>,
    proxy: Option<SocketAddr>,
    header: &[u8],
    target: &str,
    target_addr: SocketAddr,
) -> io::Result<(TcpStream, Vec<u8>)> {
    let Some(p) = proxy else {
        let s = connect_from(from, target_addr).await?;
        s.set_nodelay(true)?;
        return Ok((s, Vec::new()));
    };
    let mut s = connect_from(from, p).await?;
    s.set_nodelay(true)?;
    if !header.is_empty() {
        s.write_all(header).await?;
    }
    let rest = connect_answer(&mut s, target).await?;
    Ok((s, rest))
}

/// Sends `CONNECT target` on an open stream (TCP, or TLS to the proxy) and reads the answer
/// head: an error unless it is 2xx; else the bytes that followed it.
pub async fn connect_answer<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, target: &str) -> io::Result<Vec<u8>> {
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).await?;
    s.flush().await?;
    let mut buf = Vec::with_capacity(256);
    let mut tmp = [0u8; 1024];
    loop {
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Err(err("proxy closed before its CONNECT answer"));
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..pos]);
            let status = head.split_whitespace().nth(1).unwrap_or("");
            if !status.starts_with('2') {
                let line = head.lines().next().unwrap_or("").to_string();
                return Err(err(format!("CONNECT refused: {line}")));
            }
            return Ok(buf[pos + 4..].to_vec());
        }
        if buf.len() > 16384 {
            return Err(err("CONNECT answer head too large"));
        }
    }
}

/// How a run names itself on its human line: the label, else the proxy (or "direct").
pub fn who(c: &Common) -> String {
    if !c.label.is_empty() {
        c.label.clone()
    } else if c.proxy == "none" {
        "direct".into()
    } else {
        format!("via {}", c.proxy)
    }
}

pub fn base_json(test: &str, c: &Common) -> Json {
    let mut m = Map::new();
    m.insert("tool".into(), json!("vgbench"));
    m.insert("test".into(), json!(test));
    m.insert("label".into(), json!(c.label));
    m.insert("proxy".into(), json!(c.proxy));
    m.insert("target".into(), json!(c.target));
    m
}

/// Insert the proxy's CPU seconds (and a per-unit figure) when both samples exist.
pub fn insert_cpu(m: &mut Json, p0: Option<ProcSample>, p1: Option<ProcSample>) -> Option<f64> {
    let (p0, p1) = (p0?, p1?);
    let cpu = p1.cpu_s - p0.cpu_s;
    m.insert("proxy_cpu_s".into(), json!(r2(cpu)));
    m.insert("proxy_rss_kib".into(), json!(p1.rss_kib));
    m.insert("proxy_threads".into(), json!(p1.threads));
    Some(cpu)
}

/// One JSON line on stdout, one human line on stderr.
pub fn emit(m: Json, human: String) {
    println!("{}", Value::Object(m));
    eprintln!("{human}");
}

/// Accepts on `l` for ever and spawns `handle` for each connection (TCP_NODELAY set). Accept
/// errors (out of descriptors, a reset before accept) are logged and retried: keep serving.
pub async fn accept_forever<F, Fut>(l: TcpListener, handle: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let (s, _) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        tokio::spawn(handle(s));
    }
}
