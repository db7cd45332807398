//! The soak's load: every class of client, each a loop bounded by the run's end and by a
//! per-operation time limit, each counting what it did and what went wrong.
//!
//! Well-formed classes must all succeed; abusive classes must get exactly the expected answer.
//! Abusive clients and the burst use source addresses of their own (all of 127.0.0.0/8 is
//! loopback on Linux), so the per-address head bound never mixes them with the rest.

use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until, timeout};

use super::data::*;
use crate::common::err;

/// Where the load goes.
pub struct Load {
    pub proxy: SocketAddr,
    pub stream_origin: SocketAddr,
    pub churn_origin: SocketAddr,
    pub burst_origin: SocketAddr,
    pub silent_origin: SocketAddr,
    pub reg: Arc<Registry>,
    pub start: Instant,
    pub stop_at: Instant,
    pub header_timeout: Duration,
    pub stats: Stats,
    /// Bytes whose SHA-256 matched at both ends (or that matched the pattern, for prefixes).
    pub verified: AtomicU64,
    /// Integrity streams finished and checked.
    pub streams_checked: AtomicU64,
}

/// Per-class counters, and the refusals the proxy should have counted (by reason).
#[derive(Default)]
pub struct Stats(Mutex<BTreeMap<&'static str, Class>>, Mutex<BTreeMap<&'static str, u64>>);

#[derive(Default)]
pub struct Class {
    pub ok: u64,
    pub failed: u64,
    pub errors: Vec<String>,
    pub extra: BTreeMap<&'static str, Value>,
    /// Seconds from start to answer, for the head-deadline classes.
    pub answer_s: Vec<f64>,
}

impl Stats {
    pub fn ok(&self, class: &'static str) {
        self.0.lock().expect("stats").entry(class).or_default().ok += 1;
    }
    pub fn fail(&self, class: &'static str, why: String) {
        if why.contains(LATE) {
            self.refused("header_timeout");
            return self.add(class, "excused_vgbench_late", 1);
        }
        let mut m = self.0.lock().expect("stats");
        let c = m.entry(class).or_default();
        c.failed += 1;
        if c.errors.len() < 5 {
            c.errors.push(why);
        }
    }
    pub fn set(&self, class: &'static str, key: &'static str, v: Value) {
        self.0.lock().expect("stats").entry(class).or_default().extra.insert(key, v);
    }
    fn answered_after(&self, class: &'static str, secs: f64) {
        self.0.lock().expect("stats").entry(class).or_default().answer_s.push(secs);
    }
    fn add(&self, class: &'static str, key: &'static str, n: u64) {
        let mut m = self.0.lock().expect("stats");
        let v = m.entry(class).or_default().extra.entry(key).or_insert(json!(0));
        *v = json!(v.as_u64().unwrap_or(0) + n);
    }
    pub fn take(&self) -> BTreeMap<&'static str, Class> {
        std::mem::take(&mut *self.0.lock().expect("stats"))
    }
    /// Notes a refusal the proxy answered, by its reason in `veilgate_refusals_total`.
    fn refused(&self, reason: &'static str) {
        *self.1.lock().expect("stats").entry(reason).or_default() += 1;
    }
    pub fn refusals(&self) -> BTreeMap<&'static str, u64> {
        self.1.lock().expect("stats").clone()
    }
}

/// A small deterministic generator for sizes and choices.
pub fn mix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const MIB: u64 = 1 << 20;
/// Marks an error caused by vgbench itself being late (a starved machine), not by the proxy.
pub const LATE: &str = "vgbench was late";
/// Time limit of one short operation (open a tunnel, a small exchange, an answer).
const OP: Duration = Duration::from_secs(10);

/// A TCP connection to `to` from `src` (any port): IP_BIND_ADDRESS_NO_PORT leaves the port
/// choice to connect(), so thousands of connections share few source addresses.
pub async fn connect_from(src: Option<Ipv4Addr>, to: SocketAddr) -> io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    if let Some(ip) = src {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int.
        unsafe {
            use std::os::fd::AsRawFd;
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        sock.bind(SocketAddr::new(ip.into(), 0))?;
    }
    let s = sock.connect(to).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

impl Load {
    fn running(&self) -> bool {
        Instant::now() < self.stop_at
    }

    /// A tunnel to `target` through the proxy, from `src`.
    ///
    /// A 408 is the proxy's fault only if our head left within `header_timeout` of our
    /// connect; on a machine so busy that vgbench itself was later than that, the error says
    /// so (see [`LATE`]) and the class counts it apart instead of failing.
    pub async fn tunnel(&self, src: Option<Ipv4Addr>, target: SocketAddr) -> io::Result<TcpStream> {
        let t0 = Instant::now();
        timeout(OP, async {
            let mut s = connect_from(src, self.proxy).await?;
            s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).await?;
            let sent = t0.elapsed();
            let Some((status, head, rest)) = read_head(&mut s).await? else {
                return Err(err("proxy closed without answering the CONNECT"));
            };
            if status == 408 && sent + Duration::from_millis(50) >= self.header_timeout {
                return Err(err(format!("{LATE} sending its head ({:.2} s after connect)", sent.as_secs_f64())));
            }
            if status != 200 {
                return Err(err(format!("CONNECT answered {:?}", head.lines().next().unwrap_or(""))));
            }
            if !rest.is_empty() {
                return Err(err("bytes after the 200 before any were sent"));
            }
            Ok(s)
        })
        .await
        .map_err(|_| err("tunnel open timed out"))?
    }

    /// A tunnel to the stream origin carrying stream `st` (hello sent).
    async fn stream_tunnel(&self, st: &Stream) -> io::Result<TcpStream> {
        let mut s = self.tunnel(None, self.stream_origin).await?;
        *st.client_local.lock().expect("local") = s.local_addr().ok();
        s.write_all(&hello(st.id)).await?;
        Ok(s)
    }

    /// After the client's side is done: wait for the origin's record and compare both ways.
    async fn check_stream(&self, st: &Stream, sent: Seal, got: Seal) -> io::Result<u64> {
        wait_until(OP, || st.origin_ended.load(Relaxed)).await;
        if let Some(e) = st.origin_error.lock().expect("error").clone() {
            return Err(err(format!("origin side failed: {e}")));
        }
        let up = compare("up", Some(sent), *st.origin_up.lock().expect("up"))?;
        let down = compare("down", *st.origin_down.lock().expect("down"), Some(got))?;
        self.verified.fetch_add(up + down, Relaxed);
        Ok(up + down)
    }
}

// ---------------------------------------------------------------- streams with data

/// Writes `n` bytes of the up pattern, then FIN; slow (1 KiB a tick) until `slow_until`, and
/// with no `n` it stops when that slow period ends.
async fn write_up<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    st: &Stream,
    n: Option<u64>,
    slow_until: Option<Instant>,
) -> io::Result<Seal> {
    let mut g = Gen::new(st.id, Way::Up);
    let mut t = Tally::default();
    let mut buf = vec![0u8; CHUNK];
    let mut left = n.unwrap_or(u64::MAX);
    while left > 0 {
        let slow = slow_until.map(|u| Instant::now() < u);
        if slow == Some(false) && n.is_none() {
            break; // a slow writer with no length stops at the end of its slow period
        }
        let k = left.min(if slow == Some(true) { SLOW_BYTES } else { CHUNK } as u64) as usize;
        g.fill(&mut buf[..k]);
        t.add(&buf[..k]);
        w.write_all(&buf[..k]).await?;
        st.client_written.fetch_add(k as u64, Relaxed);
        left -= k as u64;
        if slow == Some(true) {
            sleep(SLOW_TICK).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
    w.shutdown().await?;
    Ok(t.done())
}

/// Reads to EOF, hashing; slow (1 KiB a tick) until `slow_until`.
async fn read_down<R: AsyncReadExt + Unpin>(r: &mut R, st: &Stream, slow_until: Option<Instant>) -> io::Result<Seal> {
    let mut t = Tally::default();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let slow = slow_until.is_some_and(|u| Instant::now() < u);
        let n = r.read(&mut buf[..if slow { SLOW_BYTES } else { CHUNK }]).await?;
        if n == 0 {
            return Ok(t.done());
        }
        t.add(&buf[..n]);
        st.client_read.fetch_add(n as u64, Relaxed);
        if slow {
            sleep(SLOW_TICK).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
}

/// How the client side of a data stream behaves.
#[derive(Clone, Copy)]
struct ClientWay {
    /// Read the whole down stream (to the origin's FIN) before writing anything up.
    down_first: bool,
    slow_read_until: Option<Instant>,
    slow_write_until: Option<Instant>,
    /// None: write until the slow period ends (a slow writer).
    up_len: Option<u64>,
}

/// One data stream: open, move both ways, check both ways. `limit` bounds the whole.
async fn run_stream(load: &Load, spec: Spec, way: ClientWay, watched: bool, limit: Duration) -> io::Result<u64> {
    let st = load.reg.register(spec, watched);
    let r = timeout(limit, async {
        let s = load.stream_tunnel(&st).await?;
        let (mut r, mut w) = s.into_split();
        let (sent, got) = if way.down_first {
            let got = read_down(&mut r, &st, way.slow_read_until).await?;
            let sent = write_up(&mut w, &st, way.up_len, way.slow_write_until).await?;
            (sent, got)
        } else {
            let (sent, got) = tokio::join!(
                write_up(&mut w, &st, way.up_len, way.slow_write_until),
                read_down(&mut r, &st, way.slow_read_until)
            );
            (sent?, got?)
        };
        load.check_stream(&st, sent, got).await
    })
    .await
    .unwrap_or_else(|_| Err(err(format!("stream not done within {} s", limit.as_secs()))));
    load.reg.remove(st.id);
    r
}

/// Integrity: back-to-back streams of 1–32 MiB each way, checked by SHA-256 both ways.
pub async fn integrity(load: Arc<Load>, worker: u64) {
    const C: &str = "integrity";
    let mut i = 0u64;
    while load.running() {
        i += 1;
        let r = mix(worker << 32 | i);
        let spec = Spec {
            behaviour: Behaviour::Normal,
            up: MIB + r % (31 * MIB + 1),
            down: MIB + (r >> 32) % (31 * MIB + 1),
            slow_until: None,
        };
        let way = ClientWay { down_first: false, slow_read_until: None, slow_write_until: None, up_len: Some(spec.up) };
        match run_stream(&load, spec, way, false, Duration::from_secs(120)).await {
            Ok(_) => {
                load.stats.ok(C);
                load.streams_checked.fetch_add(1, Relaxed);
            }
            Err(e) => {
                load.stats.fail(C, e.to_string());
                sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Origins that half-close: the origin sends its bytes and its FIN first; only then does the
/// client send its own, which must still arrive whole through the half-closed tunnel.
pub async fn half_close_origin(load: Arc<Load>) {
    const C: &str = "origin_half_close";
    let mut i = 0u64;
    while load.running() {
        i += 1;
        let r = mix(0xAC << 40 | i);
        let spec = Spec {
            behaviour: Behaviour::Normal,
            up: 64 * 1024 + r % MIB,
            down: 64 * 1024 + (r >> 32) % MIB,
            slow_until: None,
        };
        let way = ClientWay { down_first: true, slow_read_until: None, slow_write_until: None, up_len: Some(spec.up) };
        match run_stream(&load, spec, way, false, Duration::from_secs(30)).await {
            Ok(_) => load.stats.ok(C),
            Err(e) => load.stats.fail(C, e.to_string()),
        }
        sleep(Duration::from_millis(200)).await;
    }
}

/// Slow peers for the whole run, then a fast finish, all checked. `kind`:
/// - slow_reader: the client reads 1 KiB every 100 ms of a large down stream;
/// - slow_origin_reader: the origin reads 1 KiB every 100 ms of a large up stream;
/// - slow_writer: the client writes 1 KiB every 100 ms;
/// - slow_origin_writer: the origin writes 1 KiB every 100 ms.
///
/// The slow readers are watched: the sampler measures the bytes the proxy holds for them.
pub async fn slow(load: Arc<Load>, kind: &'static str, big: u64) {
    let until = Some(load.stop_at);
    let (spec, way, watched) = match kind {
        "slow_reader" => (
            Spec { behaviour: Behaviour::Normal, up: 0, down: big, slow_until: None },
            ClientWay { down_first: false, slow_read_until: until, slow_write_until: None, up_len: Some(0) },
            true,
        ),
        "slow_origin_reader" => (
            Spec { behaviour: Behaviour::SlowRead, up: big, down: 0, slow_until: until },
            ClientWay { down_first: false, slow_read_until: None, slow_write_until: None, up_len: Some(big) },
            true,
        ),
        "slow_writer" => (
            Spec { behaviour: Behaviour::Normal, up: 0, down: 256 * 1024, slow_until: None },
            ClientWay { down_first: false, slow_read_until: None, slow_write_until: until, up_len: None },
            false,
        ),
        _ => (
            Spec { behaviour: Behaviour::SlowWrite, up: 64 * 1024, down: 2 * MIB, slow_until: until },
            ClientWay { down_first: false, slow_read_until: None, slow_write_until: None, up_len: Some(64 * 1024) },
            false,
        ),
    };
    let limit = load.stop_at.saturating_duration_since(Instant::now()) + Duration::from_secs(60);
    match run_stream(&load, spec, way, watched, limit).await {
        Ok(n) => {
            load.stats.ok(kind);
            load.stats.add(kind, "bytes", n);
        }
        Err(e) => load.stats.fail(kind, e.to_string()),
    }
}

/// Origins that reset mid-stream: the client must see its tunnel end promptly, and what it
/// received before must be an exact prefix of what the origin sent.
pub async fn origin_reset(load: Arc<Load>) {
    const C: &str = "origin_reset";
    while load.running() {
        let spec = Spec { behaviour: Behaviour::Reset, up: 0, down: 256 * 1024, slow_until: None };
        let st = load.reg.register(spec, false);
        let r = async {
            let mut s = load.stream_tunnel(&st).await?;
            let mut g = Gen::new(st.id, Way::Down);
            let (mut buf, mut want) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
            let mut got = 0u64;
            let ended = timeout(OP, async {
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return Ok(()),
                        Ok(n) => {
                            g.fill(&mut want[..n]);
                            if buf[..n] != want[..n] {
                                return Err(err(format!("corrupted bytes at offset {got} before the reset")));
                            }
                            got += n as u64;
                        }
                    }
                }
            })
            .await;
            match ended {
                Ok(r) => r.map(|()| got),
                Err(_) => Err(err("the client's side stayed open 10 s after the origin reset")),
            }
        }
        .await;
        load.reg.remove(st.id);
        match r {
            Ok(n) => {
                load.stats.ok(C);
                load.stats.add(C, "bytes_before_reset", n);
                load.verified.fetch_add(n, Relaxed);
            }
            Err(e) => load.stats.fail(C, e.to_string()),
        }
        sleep(Duration::from_millis(250)).await;
    }
}

/// Clients that reset mid-stream: the origin's side of the tunnel must end promptly.
pub async fn client_reset(load: Arc<Load>) {
    const C: &str = "client_reset_mid_stream";
    while load.running() {
        let spec = Spec { behaviour: Behaviour::Normal, up: 0, down: 64 * MIB, slow_until: None };
        let st = load.reg.register(spec, false);
        let r = async {
            let mut s = load.stream_tunnel(&st).await?;
            s.write_all(&[1, 2, 3]).await?; // bytes the origin is reading when the reset comes
            let mut buf = vec![0u8; 64 * 1024];
            timeout(OP, s.read_exact(&mut buf)).await.map_err(|_| err("no data within 10 s"))??;
            reset(s);
            if !wait_until(OP, || st.origin_ended.load(Relaxed)).await {
                return Err(err("the origin's side stayed open 10 s after the client reset"));
            }
            Ok(())
        }
        .await;
        load.reg.remove(st.id);
        match r {
            Ok(()) => load.stats.ok(C),
            Err(e) => load.stats.fail(C, e.to_string()),
        }
        sleep(Duration::from_millis(200)).await;
    }
}

/// Abandoned tunnels: opened, then never written nor read until the run ends. Half end at a
/// silent origin, half at one that pushes 32 MiB the client never reads (watched).
pub async fn abandoned(load: Arc<Load>, n: usize) {
    const C: &str = "abandoned_tunnel";
    let mut held = Vec::new();
    let mut ids = Vec::new();
    for i in 0..n {
        let r = if i % 2 == 0 {
            load.tunnel(None, load.silent_origin).await
        } else {
            let spec = Spec { behaviour: Behaviour::Normal, up: 0, down: 32 * MIB, slow_until: None };
            let st = load.reg.register(spec, true);
            ids.push(st.id);
            load.stream_tunnel(&st).await
        };
        match r {
            Ok(s) => {
                held.push(s);
                load.stats.ok(C);
            }
            Err(e) => load.stats.fail(C, e.to_string()),
        }
    }
    sleep_until(load.stop_at).await;
    drop(held);
    for id in ids {
        load.reg.remove(id);
    }
}

// ---------------------------------------------------------------- churn and burst

/// Churn: `rate` tunnels a second (CONNECT, 200, 16 bytes echoed, close), at most 256 at once,
/// from 50 source addresses.
pub async fn churn(load: Arc<Load>, rate: u64) {
    const C: &str = "churn";
    let sem = Arc::new(Semaphore::new(256));
    let mut set = JoinSet::new();
    let t0 = Instant::now();
    let mut started = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while load.running() {
        tick.tick().await;
        let due = (t0.elapsed().as_secs_f64() * rate as f64) as u64;
        while started < due && load.running() {
            let Ok(permit) = sem.clone().acquire_owned().await else { break };
            started += 1;
            let (load, i) = (load.clone(), started);
            set.spawn(async move {
                let src = Ipv4Addr::new(127, 0, 3, 1 + (i % 50) as u8);
                let r = async {
                    let mut s = load.tunnel(Some(src), load.churn_origin).await?;
                    let msg = mix(i).to_le_bytes().repeat(2);
                    let mut back = [0u8; 16];
                    timeout(OP, async {
                        s.write_all(&msg).await?;
                        s.read_exact(&mut back).await
                    })
                    .await
                    .map_err(|_| err("echo timed out"))??;
                    if back[..] != msg[..] {
                        return Err(err("echo differs"));
                    }
                    io::Result::Ok(())
                }
                .await;
                drop(permit);
                match r {
                    Ok(()) => load.stats.ok(C),
                    Err(e) => load.stats.fail(C, e.to_string()),
                }
            });
        }
        while set.try_join_next().is_some() {}
    }
    while set.join_next().await.is_some() {}
    let el = t0.elapsed().as_secs_f64().min(load.stop_at.duration_since(t0).as_secs_f64());
    load.stats.set(C, "target_per_s", json!(rate));
    load.stats.set(C, "achieved_per_s", json!((started as f64 / el.max(1e-9)).round()));
}

/// What the burst saw, with the times the sampler's figures are matched to.
#[derive(Default, Debug)]
pub struct Burst {
    pub planned: usize,
    pub addresses: usize,
    pub opened: usize,
    /// Not opened because vgbench itself was late (see [`LATE`]).
    pub excused: usize,
    pub pinged: usize,
    pub open_s: f64,
    pub started_at: f64,
    pub all_open_at: f64,
    pub closed_at: f64,
}

/// The i-th of `addresses` burst source addresses: 127.0.1.1–127.0.1.125, 127.0.2.1–…
fn burst_addr(a: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 1 + (a / 125) as u8, 1 + (a % 125) as u8)
}

/// The burst: `n` tunnels from `addresses` source addresses opened at once (256 opens in
/// flight), held, each pinged (one byte echoed), held 2 s more, then closed.
pub async fn burst(load: Arc<Load>, at: Instant, n: usize, addresses: usize) -> Burst {
    const C: &str = "burst";
    sleep_until(at).await;
    let mut b = Burst { planned: n, addresses, started_at: load.start.elapsed().as_secs_f64(), ..Burst::default() };
    let t0 = Instant::now();
    let sem = Arc::new(Semaphore::new(256));
    let mut set = JoinSet::new();
    for i in 0..n {
        let (load, sem) = (load.clone(), sem.clone());
        set.spawn(async move {
            let _p = sem.acquire_owned().await.map_err(|e| err(e.to_string()))?;
            load.tunnel(Some(burst_addr(i % addresses.max(1))), load.burst_origin).await
        });
    }
    let mut held = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        match r.map_err(|e| err(e.to_string())).and_then(|r| r) {
            Ok(s) => held.push(s),
            Err(e) => {
                b.excused += usize::from(e.to_string().contains(LATE));
                load.stats.fail(C, format!("open: {e}"));
            }
        }
    }
    b.opened = held.len();
    b.open_s = t0.elapsed().as_secs_f64();
    b.all_open_at = load.start.elapsed().as_secs_f64();
    let mut pings = JoinSet::new();
    for (i, mut s) in held.into_iter().enumerate() {
        let sem = sem.clone();
        pings.spawn(async move {
            let _p = sem.acquire_owned().await.map_err(|e| err(e.to_string()));
            let b = (i % 250) as u8 + 1;
            let r = timeout(OP, async {
                s.write_all(&[b]).await?;
                let mut r = [0u8; 1];
                s.read_exact(&mut r).await?;
                if r[0] != b { Err(err("ping echoed a different byte")) } else { Ok(()) }
            })
            .await
            .unwrap_or_else(|_| Err(err("ping timed out")));
            (r, s)
        });
    }
    let mut held = Vec::with_capacity(n);
    while let Some(r) = pings.join_next().await {
        match r {
            Ok((Ok(()), s)) => {
                b.pinged += 1;
                load.stats.ok(C);
                held.push(s);
            }
            Ok((Err(e), _)) => load.stats.fail(C, format!("ping: {e}")),
            Err(e) => load.stats.fail(C, format!("ping task: {e}")),
        }
    }
    sleep(Duration::from_secs(2)).await;
    drop(held);
    b.closed_at = load.start.elapsed().as_secs_f64();
    b
}

// ---------------------------------------------------------------- abusive clients

/// Reads an answer head (at most 16 KiB): status, head text, bytes after it; `None` when the
/// proxy closed (or reset) the connection without sending a byte.
async fn read_head(s: &mut TcpStream) -> io::Result<Option<(u16, String, Vec<u8>)>> {
    let mut buf = Vec::with_capacity(256);
    let mut tmp = [0u8; 2048];
    loop {
        let n = match s.read(&mut tmp).await {
            Ok(n) => n,
            Err(e) if buf.is_empty() && e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
            Err(e) => return Err(e),
        };
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(err(format!("closed inside the answer head: {:?}", String::from_utf8_lossy(&buf))));
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..pos]).to_string();
            let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok());
            let Some(status) = status else { return Err(err(format!("not an HTTP answer: {head:?}"))) };
            return Ok(Some((status, head, buf[pos + 4..].to_vec())));
        }
        if buf.len() > 16384 {
            return Err(err("answer head larger than 16 KiB"));
        }
    }
}

/// Reads a refusal and returns its status (`None`: closed without a byte); a refusal must
/// say `Connection: close` and be followed by the proxy's close, within 10 s.
async fn answer(s: &mut TcpStream) -> io::Result<Option<u16>> {
    let Some((status, head, rest)) = read_head(s).await? else { return Ok(None) };
    if !head.to_ascii_lowercase().contains("connection: close") {
        return Err(err(format!("{status} without Connection: close")));
    }
    let mut more = rest.len();
    let mut tmp = [0u8; 2048];
    loop {
        match timeout(OP, s.read(&mut tmp)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(Some(status)),
            Ok(Ok(k)) => more += k,
            Err(_) => return Err(err(format!("{status}, then the connection stayed open 10 s"))),
        }
        if more > 16384 {
            return Err(err(format!("{status} followed by more than 16 KiB")));
        }
    }
}

/// Heads that are wrong in one way each, the exact status each must get, and the reason the
/// proxy counts it under.
pub fn garbage_cases(port: u16) -> Vec<(&'static str, Vec<u8>, u16, &'static str)> {
    let ok = format!("127.0.0.1:{port}");
    let mut many = format!("CONNECT {ok} HTTP/1.1\r\n");
    for i in 0..100 {
        many += &format!("X-{i}: y\r\n");
    }
    many += "\r\n";
    let bad = "bad_request";
    vec![
        ("get", format!("GET http://{ok}/ HTTP/1.1\r\nHost: {ok}\r\n\r\n").into_bytes(), 405, "method_not_allowed"),
        ("delete_unfinished", b"DELETE /x HTTP/1.1\r\n".to_vec(), 405, "method_not_allowed"),
        ("no_port", b"CONNECT 127.0.0.1 HTTP/1.1\r\n\r\n".to_vec(), 400, bad),
        ("port_zero", b"CONNECT 127.0.0.1:0 HTTP/1.1\r\n\r\n".to_vec(), 400, bad),
        ("userinfo", format!("CONNECT user:pw@{ok} HTTP/1.1\r\n\r\n").into_bytes(), 400, bad),
        ("http2_version", format!("CONNECT {ok} HTTP/2.0\r\n\r\n").into_bytes(), 400, bad),
        // A TLS record where a request line belongs: a client set up for an HTTPS proxy.
        ("tls_hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n".to_vec(), 400, "tls_on_plaintext"),
        ("header_no_colon", format!("CONNECT {ok} HTTP/1.1\r\nBad Header\r\n\r\n").into_bytes(), 400, bad),
        ("bare_lf_garbage", b"\x01\x02\x03 \x04\n\n".to_vec(), 400, bad),
        (
            "oversized",
            format!("CONNECT {ok} HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000)).into_bytes(),
            431,
            "header_too_large",
        ),
        ("too_many_headers", many.into_bytes(), 431, "header_too_large"),
        ("port_not_allowed", b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n\r\n".to_vec(), 403, "port_denied"),
    ]
}

/// Garbage heads, one of each case in turn, from 127.0.4.3.
pub async fn garbage(load: Arc<Load>) {
    const C: &str = "garbage_head";
    let cases = garbage_cases(load.stream_origin.port());
    let src = Some(Ipv4Addr::new(127, 0, 4, 3));
    let mut i = 0usize;
    while load.running() {
        let (name, bytes, want, reason) = &cases[i % cases.len()];
        i += 1;
        let r = timeout(OP, async {
            let mut s = connect_from(src, load.proxy).await?;
            s.write_all(bytes).await?;
            answer(&mut s).await
        })
        .await
        .unwrap_or_else(|_| Err(err("no answer within 10 s")));
        match r {
            Ok(Some(got)) if got == *want => {
                load.stats.ok(C);
                load.stats.refused(reason);
            }
            Ok(Some(got)) => load.stats.fail(C, format!("{name}: got {got}, expected {want}")),
            Ok(None) => load.stats.fail(C, format!("{name}: closed without an answer, expected {want}")),
            Err(e) => load.stats.fail(C, format!("{name}: {e}")),
        }
        sleep(Duration::from_millis(20)).await;
    }
    load.stats.set(C, "cases", json!(cases.len()));
}

/// Heads that never complete: `trickle` sends one byte a second of a valid head (slowloris),
/// otherwise nothing at all. Each must get 408, or be closed, at the header deadline
/// (not before it, measured from just before our connect; at most 8 s after it, a margin for a
/// busy machine that still catches a deadline restarted by every byte, which would let the
/// 63-byte head trickle on for a minute).
pub async fn late_heads(load: Arc<Load>, trickle: bool, per_second: usize) {
    let (class, src) = if trickle {
        ("slowloris", Ipv4Addr::new(127, 0, 4, 1))
    } else {
        ("silent_connection", Ipv4Addr::new(127, 0, 4, 2))
    };
    let head = format!("CONNECT {} HTTP/1.1\r\nHost: x\r\nUser-Agent: slow\r\n\r\n", load.stream_origin).into_bytes();
    let head = Arc::new(head);
    let mut set = JoinSet::new();
    while load.running() {
        for _ in 0..per_second {
            let (load, head) = (load.clone(), head.clone());
            set.spawn(async move {
                let ht = load.header_timeout.as_secs_f64();
                let r = async {
                    // Before the connect: the proxy's clock cannot start earlier, so an answer
                    // sooner than header_timeout after this is the proxy's, however busy we are.
                    let t0 = Instant::now();
                    let mut s = connect_from(Some(src), load.proxy).await?;
                    let give_up = t0 + load.header_timeout + Duration::from_secs(10);
                    let mut next = 0usize;
                    let mut tick = tokio::time::interval(Duration::from_secs(1));
                    loop {
                        tokio::select! {
                            r = s.readable() => { r?; break; }
                            _ = tick.tick(), if trickle && next < head.len() => {
                                // One byte always fits an empty send buffer; a refused write
                                // means the proxy has closed, which the read will tell.
                                let _ = s.try_write(&head[next..next + 1]);
                                next += 1;
                            }
                            () = sleep_until(give_up) => {
                                return Err(err(format!("neither 408 nor a close {:.0} s after connecting", ht + 10.0)));
                            }
                        }
                    }
                    let at = t0.elapsed().as_secs_f64();
                    let status = answer(&mut s).await?;
                    Ok((status, at))
                }
                .await;
                match r {
                    Ok((status, at)) if status.is_none_or(|c| c == 408) => {
                        load.stats.answered_after(class, at);
                        load.stats.refused("header_timeout");
                        if at < ht - 0.01 || at > ht + 8.0 {
                            load.stats.fail(class, format!("answered after {at:.2} s, header_timeout is {ht} s"));
                        } else {
                            load.stats.ok(class);
                            if status.is_none() {
                                load.stats.add(class, "closed_without_408", 1);
                            }
                        }
                    }
                    Ok((Some(c), at)) => load.stats.fail(class, format!("got {c} after {at:.2} s, expected 408")),
                    Ok((None, _)) => unreachable!("handled above"),
                    Err(e) => load.stats.fail(class, e.to_string()),
                }
            });
        }
        sleep(Duration::from_secs(1)).await;
        while set.try_join_next().is_some() {}
    }
    let limit = Instant::now() + load.header_timeout + Duration::from_secs(10);
    while let Ok(Some(_)) = tokio::time::timeout_at(limit, set.join_next()).await {}
}

/// Resets in the middle of a head (SO_LINGER 0), from 127.0.4.4: nobody to answer; the
/// proxy must simply forget the connection (the descriptor check at the end sees if not).
pub async fn reset_mid_head(load: Arc<Load>) {
    const C: &str = "reset_mid_head";
    let src = Some(Ipv4Addr::new(127, 0, 4, 4));
    let part = format!("CONNECT {} HTTP/1.1\r\nHo", load.stream_origin).into_bytes();
    let mut i = 0usize;
    while load.running() {
        i += 1;
        let r = timeout(OP, async {
            let mut s = connect_from(src, load.proxy).await?;
            s.write_all(&part[..part.len() * (i % 4 + 1) / 4]).await?;
            // Give the proxy a moment to have read the part, sometimes none.
            if i % 2 == 0 {
                sleep(Duration::from_millis(5)).await;
            }
            reset(s);
            io::Result::Ok(())
        })
        .await
        .unwrap_or_else(|_| Err(err("connect timed out")));
        match r {
            Ok(()) => load.stats.ok(C),
            Err(e) => load.stats.fail(C, e.to_string()),
        }
        sleep(Duration::from_millis(50)).await;
    }
}
