//! `vgbench soak`: a bounded soak and chaos run against the veilgate binary.
//!
//! It starts veilgate as a child process on a config of its own (loopback origins reachable,
//! a short `header_timeout`), waits for /readyz, and for `--seconds` runs every load class of
//! [`clients`] at once — integrity streams, churn, abusive clients, slow peers, origins that
//! reset or half-close, and a burst of thousands of tunnels from hundreds of addresses — while
//! a thread samples the proxy's descriptors, sockets, threads and RSS every second. Then it
//! lets the proxy settle and checks that everything it held has been given back.
//!
//! It fails (one JSON line with `"ok": false` and the reasons, exit 1) on a lost or corrupted
//! byte, a failed well-formed tunnel, an abusive client answered wrongly, descriptors or
//! sockets not back to the baseline after the settle, tunnels still counted active, in-flight
//! bytes per tunnel above the bounds, a panic in the proxy's log, or a proxy that ignores
//! SIGTERM.

mod child;
mod clients;
mod data;
mod procfs;

use clap::Args;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, timeout_at};

use crate::common::{Json, emit, err, proc_sample, r2, self_cpu};
use child::{TempDir, Veilgate};
use clients::Load;
use data::Registry;
use procfs::{Sample, v4};

#[derive(Args)]
pub struct SoakArgs {
    /// The veilgate binary. Default: the newer of target/release/veilgate and
    /// target/debug/veilgate in the repository this vgbench was built from.
    #[arg(long)]
    pub veilgate: Option<PathBuf>,
    /// Length of the mixed load, in seconds.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Seconds the proxy gets after the load to give back every descriptor and socket.
    #[arg(long, default_value_t = 5)]
    pub settle: u64,
    /// The proxy's header_timeout in the soak config (the slowloris checks expect 408 at it).
    #[arg(long, default_value_t = 2)]
    pub header_timeout: u64,
    /// Concurrent integrity streams (each 1–32 MiB each way, SHA-256 checked both ways).
    #[arg(long, default_value_t = 3)]
    pub streams: u64,
    /// Churn: new tunnels per second (CONNECT, 200, a small echo, close).
    #[arg(long, default_value_t = 300)]
    pub churn_rate: u64,
    /// Tunnels in the burst (0 = no burst).
    #[arg(long, default_value_t = 5000)]
    pub burst: usize,
    /// Source addresses the burst comes from (127.0.1.x, 127.0.2.x, ...).
    #[arg(long, default_value_t = 250)]
    pub burst_addresses: usize,
    /// When the burst starts, as a fraction of --seconds.
    #[arg(long, default_value_t = 0.3)]
    pub burst_at: f64,
    /// Abandoned tunnels held for the whole run.
    #[arg(long, default_value_t = 8)]
    pub abandoned: usize,
    /// Slowloris and silent connections started per second (each class).
    #[arg(long, default_value_t = 5)]
    pub late_heads_per_s: usize,
    /// Descriptors and sockets allowed above the baseline after the settle.
    #[arg(long, default_value_t = 4)]
    pub fd_tolerance: u64,
    /// Bound on the bytes the proxy holds for one slow or abandoned tunnel outside its
    /// sockets' kernel queues (its pipes and buffers), KiB.
    #[arg(long, default_value_t = 2048)]
    pub max_held_kib: u64,
    /// Bound on RSS growth per open tunnel before the burst, KiB.
    #[arg(long, default_value_t = 1024)]
    pub max_rss_kib_per_tunnel: u64,
    /// Keep the temporary directory (config, veilgate.log) even when the soak passes.
    #[arg(long)]
    pub keep: bool,
    /// Free-form label copied into the JSON output.
    #[arg(long, default_value = "")]
    pub label: String,
}

/// A failure already reported on stdout/stderr: main exits 1 without printing it again.
#[derive(Debug)]
pub struct Reported;

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("soak failed (reported)")
    }
}

impl std::error::Error for Reported {}

/// One sampler tick.
#[derive(Clone, Debug)]
struct Point {
    t: f64,
    s: Sample,
    /// Over the watched tunnels: bytes in the proxy outside its sockets' queues (max), in its
    /// sockets' queues (max), and between the two ends in all (max).
    held_other: i64,
    held_kernel: u64,
    held_total: u64,
    watched: usize,
}

fn default_veilgate() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("target");
    let (rel, dbg) = (root.join("release/veilgate"), root.join("debug/veilgate"));
    let mtime = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    match (mtime(&rel), mtime(&dbg)) {
        (Some(r), Some(d)) if d > r => dbg,
        (Some(_), _) => rel,
        _ => dbg,
    }
}

fn nofile() -> u64 {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    r.rlim_cur
}

pub async fn soak(a: SoakArgs) -> io::Result<()> {
    let bin = a.veilgate.clone().unwrap_or_else(default_veilgate);
    if !bin.is_file() {
        return Err(err(format!("no veilgate binary at {} (build it, or give --veilgate)", bin.display())));
    }
    let per_addr = a.burst.div_ceil(a.burst_addresses.max(1));
    if a.burst > 0 && per_addr > 60 {
        return Err(err(format!(
            "{per_addr} burst tunnels per address: keep it under the default max_pending_per_client (64)"
        )));
    }
    if a.burst_addresses > 125 * 200 {
        return Err(err("at most 25,000 burst addresses"));
    }
    // Both ends of every burst tunnel live here, and the proxy (which inherits our limit)
    // needs two descriptors per tunnel.
    let need = 2 * a.burst as u64 + 3000;
    if nofile() < need {
        return Err(err(format!("open-file limit {} is below the {need} this burst needs (ulimit -n)", nofile())));
    }
    let mut tmp = TempDir::new()?;
    let bind = || TcpListener::bind("127.0.0.1:0");
    let (l_stream, l_churn, l_burst, l_silent) = (bind().await?, bind().await?, bind().await?, bind().await?);
    let addrs = [l_stream.local_addr()?, l_churn.local_addr()?, l_burst.local_addr()?, l_silent.local_addr()?];
    let reg = Arc::new(Registry::default());
    tokio::spawn(data::stream_origin(l_stream, reg.clone()));
    tokio::spawn(data::echo_origin(l_churn));
    tokio::spawn(data::echo_origin(l_burst));
    tokio::spawn(data::silent_origin(l_silent));
    let cfg_path = tmp.path.join("veilgate.toml");
    std::fs::write(&cfg_path, child::config(&addrs.map(|a| a.port()), a.header_timeout))?;
    // Started from this thread (the runtime's block_on thread), which lives to the end.
    let mut vg = Veilgate::start(&bin, &cfg_path, tmp.path.join("veilgate.log"))?;
    eprintln!("soak: veilgate {} (pid {}) on {}, {} s of load", bin.display(), vg.pid, vg.proxy, a.seconds);
    let result = run(&a, &mut vg, reg, addrs).await;
    let exit = vg.stop(Duration::from_secs(10));
    let (mut m, human, mut failures) = match result {
        Ok(x) => x,
        Err(e) => {
            tmp.keep = true;
            return Err(err(format!("{e} (veilgate log: {})", vg.log.display())));
        }
    };
    if !exit.starts_with("exited after SIGTERM") {
        failures.push(format!("veilgate at SIGTERM: {exit}"));
    }
    m.insert("veilgate_exit".into(), json!(exit));
    let log = scan_log(&vg.log);
    if log.panics > 0 {
        failures.push(format!("{} panic line(s) in veilgate's log", log.panics));
    }
    m.insert(
        "veilgate_log".into(),
        json!({"lines": log.lines, "warn": log.warn, "error": log.error, "panics": log.panics}),
    );
    let ok = failures.is_empty();
    tmp.keep |= a.keep || !ok;
    m.insert("ok".into(), json!(ok));
    m.insert("failures".into(), json!(failures));
    if tmp.keep {
        m.insert("dir".into(), json!(tmp.path.display().to_string()));
    }
    let mut human = human;
    human += &format!("\nveilgate log: {} lines, {} WARN, {} ERROR; {exit}", log.lines, log.warn, log.error);
    if ok {
        human += "\nsoak: PASS";
    } else {
        human += &format!("\nsoak: FAIL\n  - {}", failures.join("\n  - "));
        human += &format!("\n  (config and veilgate.log kept in {})", tmp.path.display());
    }
    emit(m, human);
    if ok { Ok(()) } else { Err(io::Error::other(Reported)) }
}

struct LogScan {
    lines: usize,
    warn: usize,
    error: usize,
    panics: usize,
}

fn scan_log(p: &std::path::Path) -> LogScan {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let mut s = LogScan { lines: 0, warn: 0, error: 0, panics: 0 };
    for l in text.lines() {
        s.lines += 1;
        s.warn += usize::from(l.contains(" WARN "));
        s.error += usize::from(l.contains(" ERROR "));
        s.panics += usize::from(l.contains("panicked"));
    }
    s
}

type Outcome = (Json, String, Vec<String>);

async fn run(a: &SoakArgs, vg: &mut Veilgate, reg: Arc<Registry>, addrs: [SocketAddr; 4]) -> io::Result<Outcome> {
    let pid = vg.pid;
    // Baseline: the proxy at rest, ready, its listeners bound.
    sleep(Duration::from_millis(1000)).await;
    let (base, _) = procfs::sample(pid).ok_or_else(|| err("cannot read /proc for veilgate"))?;
    let start = Instant::now();
    let stop_at = start + Duration::from_secs(a.seconds);
    let cpu0 = (proc_sample(&[pid]).map(|p| p.cpu_s), self_cpu());
    let load = Arc::new(Load {
        proxy: vg.proxy,
        stream_origin: addrs[0],
        churn_origin: addrs[1],
        burst_origin: addrs[2],
        silent_origin: addrs[3],
        reg: reg.clone(),
        start,
        stop_at,
        header_timeout: Duration::from_secs(a.header_timeout),
        stats: Default::default(),
        verified: Default::default(),
        streams_checked: Default::default(),
    });

    // The sampler: its own thread, so a busy runtime cannot delay or skip a tick.
    let points = Arc::new(Mutex::new(Vec::<Point>::new()));
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (points, stop, reg) = (points.clone(), stop_sampling.clone(), reg.clone());
        let (proxy, origin) = (v4(vg.proxy), v4(addrs[0]));
        let t0 = std::time::Instant::now();
        std::thread::spawn(move || {
            let mut next = t0;
            // Bounded: the soak stops it; the count is a backstop of a day of samples.
            for _ in 0..86_400 {
                if stop.load(Relaxed) {
                    break;
                }
                if let Some(p) = take_point(pid, &reg, proxy, origin, t0.elapsed().as_secs_f64()) {
                    points.lock().expect("points").push(p);
                }
                next += Duration::from_secs(1);
                std::thread::sleep(next.saturating_duration_since(std::time::Instant::now()));
            }
        })
    };

    let big = 48 << 20;
    let mut set: JoinSet<&'static str> = JoinSet::new();
    for w in 0..a.streams {
        let l = load.clone();
        set.spawn(async move {
            clients::integrity(l, w).await;
            "integrity"
        });
    }
    macro_rules! class {
        ($name:expr, $fut:expr) => {{
            let fut = $fut;
            set.spawn(async move {
                fut.await;
                $name
            });
        }};
    }
    class!("churn", clients::churn(load.clone(), a.churn_rate));
    class!("origin_half_close", clients::half_close_origin(load.clone()));
    class!("origin_reset", clients::origin_reset(load.clone()));
    class!("client_reset_mid_stream", clients::client_reset(load.clone()));
    class!("reset_mid_head", clients::reset_mid_head(load.clone()));
    class!("garbage_head", clients::garbage(load.clone()));
    class!("slowloris", clients::late_heads(load.clone(), true, a.late_heads_per_s));
    class!("silent_connection", clients::late_heads(load.clone(), false, a.late_heads_per_s));
    class!("abandoned_tunnel", clients::abandoned(load.clone(), a.abandoned));
    for kind in ["slow_reader", "slow_reader", "slow_origin_reader", "slow_writer", "slow_origin_writer"] {
        class!(kind, clients::slow(load.clone(), kind, big));
    }
    let burst_at = start + Duration::from_secs_f64(a.seconds as f64 * a.burst_at.clamp(0.0, 1.0));
    let burst = (a.burst > 0).then(|| tokio::spawn(clients::burst(load.clone(), burst_at, a.burst, a.burst_addresses)));

    // Every class stops starting work at stop_at; give the slow ones time to drain.
    let mut failures = Vec::new();
    let join_limit = stop_at + Duration::from_secs(120);
    let mut unfinished = set.len();
    let mut ended: BTreeMap<&'static str, f64> = BTreeMap::new();
    while let Ok(Some(r)) = timeout_at(join_limit, set.join_next()).await {
        unfinished -= 1;
        match r {
            Ok(name) => {
                ended.insert(name, r2(start.elapsed().as_secs_f64()));
            }
            Err(e) => failures.push(format!("a load task failed: {e}")),
        }
    }
    if unfinished > 0 {
        failures.push(format!("{unfinished} load task(s) still running 120 s after the end"));
        set.abort_all();
    }
    let burst = match burst {
        Some(h) => match timeout_at(join_limit, h).await {
            Ok(Ok(b)) => Some(b),
            Ok(Err(e)) => {
                failures.push(format!("the burst task failed: {e}"));
                None
            }
            Err(_) => {
                failures.push("the burst did not finish".into());
                None
            }
        },
        None => None,
    };
    let load_end = start.elapsed().as_secs_f64();
    let cpu = (proc_sample(&[pid]).map(|p| p.cpu_s).zip(cpu0.0).map(|(b, a)| b - a), self_cpu() - cpu0.1);
    if !vg.alive() {
        return Err(err(format!("veilgate died during the soak: {}", vg.log_tail(5))));
    }
    // Settle, then the final look.
    sleep(Duration::from_secs(a.settle)).await;
    let after = procfs::sample(pid).map(|x| x.0).ok_or_else(|| err("cannot read /proc for veilgate"))?;
    stop_sampling.store(true, Relaxed);
    let _ = sampler.join();
    let points = std::mem::take(&mut *points.lock().expect("points"));
    let metrics = child::http_get(vg.admin, "/metrics").map(|(_, b)| b).unwrap_or_default();

    let report = Report { a, base: &base, after: &after, points: &points, load_end, burst: burst.as_ref(), cpu };
    let mut out = report.build(&load, &metrics, failures);
    // When each class's last client finished (the slow ones drain after the load's end).
    out.0.insert("class_ended_at_s".into(), json!(ended));
    Ok(out)
}

fn take_point(
    pid: u32,
    reg: &Registry,
    proxy: Option<SocketAddrV4>,
    origin: Option<SocketAddrV4>,
    t: f64,
) -> Option<Point> {
    let watched = reg.watched();
    // "Written" counters before the table, "read" counters after it: a byte moving meanwhile
    // makes the in-flight figure smaller, never larger.
    let written: Vec<(u64, u64)> =
        watched.iter().map(|s| (s.client_written.load(Relaxed), s.origin_written.load(Relaxed))).collect();
    let (s, table) = procfs::sample(pid)?;
    let mut p = Point { t, s, held_other: i64::MIN, held_kernel: 0, held_total: 0, watched: 0 };
    let (Some(proxy), Some(origin)) = (proxy, origin) else { return Some(p) };
    for (st, (cw, ow)) in watched.iter().zip(written) {
        let (cr, or) = (st.client_read.load(Relaxed), st.origin_read.load(Relaxed));
        let cl = st.client_local.lock().expect("local").and_then(v4);
        let op = st.origin_peer.lock().expect("peer").and_then(v4);
        let (Some(cl), Some(op)) = (cl, op) else { continue };
        let socks = [(cl, proxy), (proxy, cl), (op, origin), (origin, op)].map(|k| table.get(&k).copied());
        let [Some(client), Some(proxy_cl), Some(proxy_up), Some(origin_s)] = socks else { continue };
        let q = |l: procfs::TcpLine| l.tx_queue + l.rx_queue;
        let total = cw.saturating_sub(or) + ow.saturating_sub(cr);
        let outside = q(client) + q(origin_s);
        let kernel = q(proxy_cl) + q(proxy_up);
        p.watched += 1;
        p.held_total = p.held_total.max(total);
        p.held_kernel = p.held_kernel.max(kernel);
        p.held_other = p.held_other.max(total as i64 - outside as i64 - kernel as i64);
    }
    Some(p)
}

struct Report<'a> {
    a: &'a SoakArgs,
    base: &'a Sample,
    after: &'a Sample,
    points: &'a [Point],
    load_end: f64,
    burst: Option<&'a clients::Burst>,
    /// CPU seconds over the load: the proxy's, and vgbench's own (clients and origins).
    cpu: (Option<f64>, f64),
}

fn kib(b: u64) -> f64 {
    r2(b as f64 / 1024.0)
}

impl Report<'_> {
    fn peak(&self, f: impl Fn(&Sample) -> u64) -> u64 {
        self.points.iter().map(|p| f(&p.s)).max().unwrap_or(0)
    }

    fn triple(&self, f: impl Fn(&Sample) -> u64 + Copy) -> Value {
        json!({"baseline": f(self.base), "peak": self.peak(f), "after_settle": f(self.after)})
    }

    /// The RSS sample nearest to `t` seconds (0 when there is none).
    fn rss_at(&self, t: f64) -> u64 {
        self.points.iter().min_by(|x, y| (x.t - t).abs().total_cmp(&(y.t - t).abs())).map_or(0, |p| p.s.rss_kib)
    }

    fn build(&self, load: &Load, metrics: &str, mut failures: Vec<String>) -> Outcome {
        let a = self.a;
        let mut m = Map::new();
        m.insert("tool".into(), json!("vgbench"));
        m.insert("test".into(), json!("soak"));
        m.insert("label".into(), json!(a.label));
        m.insert("seconds".into(), json!(a.seconds));
        m.insert("settle_s".into(), json!(a.settle));
        m.insert("header_timeout_s".into(), json!(a.header_timeout));
        m.insert("load_s".into(), json!(r2(self.load_end)));
        m.insert("proxy_cpu_s".into(), json!(self.cpu.0.map(r2)));
        m.insert("vgbench_cpu_s".into(), json!(r2(self.cpu.1)));
        let mut human = String::new();

        // Classes: every failure of any class fails the soak.
        let classes = load.stats.take();
        let mut cj = Map::new();
        let mut line = Vec::new();
        for (name, c) in &classes {
            let mut o = Map::new();
            o.insert("ok".into(), json!(c.ok));
            o.insert("failed".into(), json!(c.failed));
            if !c.errors.is_empty() {
                o.insert("first_errors".into(), json!(c.errors));
            }
            if !c.answer_s.is_empty() {
                let mut v = c.answer_s.clone();
                crate::common::sort(&mut v);
                o.insert("answer_s_min".into(), json!(r2(v[0])));
                o.insert("answer_s_max".into(), json!(r2(v[v.len() - 1])));
            }
            for (k, v) in &c.extra {
                o.insert((*k).into(), v.clone());
            }
            cj.insert((*name).into(), Value::Object(o));
            line.push(if c.failed > 0 {
                format!("{name} {}/{} FAILED", c.ok, c.ok + c.failed)
            } else {
                format!("{name} {}", c.ok)
            });
            if c.failed > 0 {
                failures.push(format!(
                    "{name}: {} failed; first: {}",
                    c.failed,
                    c.errors.first().cloned().unwrap_or_default()
                ));
            }
        }
        for need in ["integrity", "churn", "garbage_head", "slowloris", "silent_connection"] {
            if classes.get(need).is_none_or(|c| c.ok == 0) {
                failures.push(format!("{need}: nothing completed (the load did not run)"));
            }
        }
        m.insert("classes".into(), Value::Object(cj));
        let verified = load.verified.load(Relaxed);
        m.insert("bytes_verified".into(), json!(verified));
        m.insert("integrity_streams_checked".into(), json!(load.streams_checked.load(Relaxed)));
        human += &format!(
            "soak{}{}: {:.0} s of load (CPU: proxy {} s, vgbench {:.0} s); {:.1} MiB verified by SHA-256 ({} integrity streams)\n  tunnels: {}",
            if a.label.is_empty() { "" } else { " " },
            a.label,
            self.load_end,
            self.cpu.0.map_or("?".into(), |c| format!("{c:.0}")),
            self.cpu.1,
            verified as f64 / 1048576.0,
            load.streams_checked.load(Relaxed),
            line.join(", ")
        );

        // The proxy's resources.
        let tol = a.fd_tolerance;
        let mut pj = Map::new();
        pj.insert("fds".into(), self.triple(|s| s.fds));
        pj.insert("sockets".into(), self.triple(|s| s.sockets));
        pj.insert("pipes".into(), self.triple(|s| s.pipes));
        pj.insert("threads".into(), self.triple(|s| s.threads));
        pj.insert("rss_kib".into(), self.triple(|s| s.rss_kib));
        pj.insert("tcp_states_after_settle".into(), json!(self.after.states));
        pj.insert("tcp_queued_peak_kib".into(), json!(kib(self.peak(|s| s.queued))));
        let settled = self
            .points
            .iter()
            .find(|p| p.t >= self.load_end && p.s.fds <= self.base.fds + tol && p.s.sockets <= self.base.sockets + tol)
            .map(|p| r2(p.t - self.load_end));
        pj.insert("settled_after_s".into(), json!(settled));
        m.insert("proxy".into(), Value::Object(pj));
        for (what, b, x) in [
            ("descriptors", self.base.fds, self.after.fds),
            ("sockets", self.base.sockets, self.after.sockets),
            ("pipe descriptors", self.base.pipes, self.after.pipes),
        ] {
            if x > b + tol {
                failures.push(format!(
                    "{what} not back to baseline {} s after the load: {b} -> {x} (tolerance {tol})",
                    a.settle
                ));
            }
        }
        let lingering: u64 = self.after.states.iter().filter(|(k, _)| **k != "LISTEN").map(|(_, v)| *v).sum();
        human += &format!(
            "\n  proxy baseline/peak/after-settle: fds {}/{}/{}, sockets {}/{}/{}, pipes {}/{}/{}, threads {}/{}/{}, RSS {}/{}/{} KiB; back to baseline {}",
            self.base.fds,
            self.peak(|s| s.fds),
            self.after.fds,
            self.base.sockets,
            self.peak(|s| s.sockets),
            self.after.sockets,
            self.base.pipes,
            self.peak(|s| s.pipes),
            self.after.pipes,
            self.base.threads,
            self.peak(|s| s.threads),
            self.after.threads,
            self.base.rss_kib,
            self.peak(|s| s.rss_kib),
            self.after.rss_kib,
            settled.map_or("never".to_string(), |s| format!("{s:.0} s after the load")),
        );
        if lingering > 0 {
            human += &format!("; TCP states after settle: {:?}", self.after.states);
        }

        // The burst and the RSS it leaves behind.
        if let Some(b) = self.burst {
            let before = self.rss_at(b.started_at - 1.0);
            let peak = self
                .points
                .iter()
                .filter(|p| p.t >= b.started_at && p.t <= b.closed_at + 1.0)
                .map(|p| p.s.rss_kib)
                .max()
                .unwrap_or(0);
            let drained = self.rss_at(b.closed_at + 5.0);
            let sockets_peak = self
                .points
                .iter()
                .filter(|p| p.t >= b.started_at && p.t <= b.closed_at + 1.0)
                .map(|p| p.s.sockets)
                .max()
                .unwrap_or(0);
            m.insert(
                "burst".into(),
                json!({
                    "tunnels": b.planned, "addresses": b.addresses, "opened": b.opened, "pinged": b.pinged,
                    "open_s": r2(b.open_s), "started_at_s": r2(b.started_at), "closed_at_s": r2(b.closed_at),
                    "proxy_sockets_peak": sockets_peak,
                    "rss_before_kib": before, "rss_peak_kib": peak, "rss_drained_5s_kib": drained,
                    "rss_after_settle_kib": self.after.rss_kib,
                }),
            );
            human += &format!(
                "\n  burst: {}/{} opened in {:.1} s from {} addresses, {} pinged; proxy sockets peak {sockets_peak}; RSS {before} -> peak {peak} -> {drained} KiB 5 s after closing ({} KiB after settle)",
                b.opened, b.planned, b.open_s, b.addresses, b.pinged, self.after.rss_kib
            );
            if b.opened + b.excused < b.planned || b.pinged < b.opened {
                failures.push(format!("burst: {} of {} opened, {} pinged", b.opened, b.planned, b.pinged));
            }
        }

        // In-flight bytes. (1) RSS growth per open tunnel before the burst; (2) for watched
        // (slow and abandoned) tunnels, the bytes inside the proxy outside its sockets' queues.
        let pre_end = self.burst.map_or(self.load_end, |b| b.started_at);
        let pre: Vec<&Point> = self.points.iter().filter(|p| p.t < pre_end && p.t <= self.load_end).collect();
        let rss_growth = pre.iter().map(|p| p.s.rss_kib).max().unwrap_or(0).saturating_sub(self.base.rss_kib);
        let tunnels = pre.iter().map(|p| p.s.sockets.saturating_sub(self.base.sockets) / 2).max().unwrap_or(0);
        let per_tunnel = rss_growth as f64 / tunnels.max(1) as f64;
        let held_other = self.points.iter().filter(|p| p.watched > 0).map(|p| p.held_other).max();
        let held_kernel = self.points.iter().map(|p| p.held_kernel).max().unwrap_or(0);
        let held_total = self.points.iter().map(|p| p.held_total).max().unwrap_or(0);
        let watched = self.points.iter().map(|p| p.watched).max().unwrap_or(0);
        m.insert(
            "inflight".into(),
            json!({
                "rss_growth_before_burst_kib": rss_growth, "tunnels_open_before_burst_peak": tunnels,
                "rss_kib_per_tunnel": r2(per_tunnel), "rss_kib_per_tunnel_bound": a.max_rss_kib_per_tunnel,
                "watched_tunnels": watched,
                "held_outside_socket_queues_peak_kib": held_other.map(|x| kib(x.max(0) as u64)),
                "held_in_proxy_socket_queues_peak_kib": kib(held_kernel),
                "between_ends_peak_kib": kib(held_total),
                "held_bound_kib": a.max_held_kib,
            }),
        );
        human += &format!(
            "\n  in flight: RSS +{rss_growth} KiB over {tunnels} tunnels before the burst = {per_tunnel:.0} KiB/tunnel (bound {}); watched slow tunnels ({watched}): peak {} KiB between the ends, {} KiB in the proxy's socket queues, {} KiB in its pipes and buffers (bound {})",
            a.max_rss_kib_per_tunnel,
            kib(held_total) as u64,
            kib(held_kernel) as u64,
            held_other.map_or("?".into(), |x| format!("{}", x.max(0) / 1024)),
            a.max_held_kib,
        );
        if per_tunnel > a.max_rss_kib_per_tunnel as f64 {
            failures.push(format!(
                "RSS grew {per_tunnel:.0} KiB per tunnel before the burst (bound {})",
                a.max_rss_kib_per_tunnel
            ));
        }
        match held_other {
            Some(x) if x > (a.max_held_kib * 1024) as i64 => failures.push(format!(
                "the proxy held {} KiB of one slow tunnel outside its socket queues (bound {})",
                x / 1024,
                a.max_held_kib
            )),
            None if watched == 0 => failures.push("no slow tunnel could be measured in flight".into()),
            _ => {}
        }

        // The proxy's own account.
        let active = child::metric_sum(metrics, "veilgate_tunnels_active");
        let refusals: BTreeMap<String, f64> =
            child::metric_samples(metrics, "veilgate_refusals_total").into_iter().filter(|(_, v)| *v > 0.0).collect();
        let outcomes: BTreeMap<String, f64> =
            child::metric_samples(metrics, "veilgate_tunnels_total").into_iter().filter(|(_, v)| *v > 0.0).collect();
        m.insert("metrics".into(), json!({"tunnels_active": active, "refusals": refusals, "tunnels_total": outcomes}));
        if metrics.is_empty() {
            failures.push("could not read /metrics after the settle".into());
        } else if active != 0.0 {
            failures.push(format!("veilgate_tunnels_active is {active} after the settle"));
        }
        // Every refusal the soak provoked, counted once under its reason, and no other.
        let counted: BTreeMap<String, u64> = refusals
            .iter()
            .map(|(labels, v)| (labels.trim_start_matches("{reason=\"").trim_end_matches("\"}").to_string(), *v as u64))
            .collect();
        let expected: BTreeMap<String, u64> =
            load.stats.refusals().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        if !metrics.is_empty() && counted != expected {
            failures.push(format!("veilgate_refusals_total {counted:?}, but the soak provoked {expected:?}"));
        }
        human += &format!(
            "\n  metrics after settle: tunnels_active {active}, tunnels_total {outcomes:?}, refusals {counted:?} (as provoked: {})",
            counted == expected
        );
        (m, human, failures)
    }
}
