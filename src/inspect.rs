//! The live view behind `GET /clients` and `GET /tunnels` (`admin.inspect`): who is using the
//! proxy now, how much, under which limits, and what they were refused.
//!
//! With inspection off nothing here is touched: no tunnel registers, the meters count into
//! their own locals only, and refusals are not recorded per client. With it on, a tunnel
//! registers once after admission, and each chunk adds its size to one atomic.
//!
//! Rates are measured between inspections, over at least [`RATE_WINDOW`]: a view refreshed
//! every second or two (`veilgate top`) shows the rate of that interval.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{ClientAddressLog, Config, Mode};
use crate::limits::{ClientKey, Direction};
use crate::tunnel::client_field;

/// Shortest interval a rate is measured over.
pub const RATE_WINDOW: Duration = Duration::from_secs(1);
/// Most rows one answer carries.
pub const MAX_LIMIT: usize = 1000;
/// Clients whose refusals are remembered at once; past it the oldest quiet one is forgotten.
const MAX_REFUSING: usize = 10_000;
/// How long a client with no tunnel keeps its refusal count.
const REFUSALS_KEPT: Duration = Duration::from_secs(300);

/// Every live tunnel and recent refusal, for inspection.
pub struct Registry {
    tunnels: Mutex<HashMap<u64, Arc<Live>>>,
    next: AtomicU64,
    refusals: Mutex<HashMap<ClientKey, (u64, Instant)>>,
    /// Makes the opaque client ids of this process unguessable across processes.
    salt: RandomState,
}

/// One live tunnel's identity and byte counts.
pub struct Live {
    id: u64,
    key: ClientKey,
    addr: IpAddr,
    target: String,
    mode: Mode,
    started: Instant,
    /// By [`Direction`]; each shared with that direction's meter.
    bytes: [Arc<AtomicU64>; 2],
    sample: Mutex<Sample>,
    /// Where to leave when the tunnel ends; here rather than in [`Registered`], so the
    /// handle each tunnel carries is one pointer.
    registry: Weak<Registry>,
}

/// Bytes and rates seen at the last inspection.
#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    bytes: [u64; 2],
    rate: [f64; 2],
}

impl Live {
    /// The counter a meter of `dir` adds its bytes to: one pointer in the meter, which every
    /// tunnel's task carries.
    pub fn counter(&self, dir: Direction) -> Arc<AtomicU64> {
        Arc::clone(&self.bytes[dir as usize])
    }

    fn bytes(&self) -> [u64; 2] {
        [0, 1].map(|i| self.bytes[i].load(Ordering::Relaxed))
    }

    /// The rate each way since the previous inspection (at least [`RATE_WINDOW`] ago; else
    /// the rate that one measured).
    fn rate(&self, now: Instant) -> [f64; 2] {
        let bytes = self.bytes();
        let mut s = self.sample.lock().unwrap_or_else(|e| e.into_inner());
        let dt = now.saturating_duration_since(s.at);
        if dt >= RATE_WINDOW {
            let secs = dt.as_secs_f64();
            s.rate = [0, 1].map(|i| bytes[i].saturating_sub(s.bytes[i]) as f64 / secs);
            s.bytes = bytes;
            s.at = now;
        }
        s.rate
    }
}

/// A tunnel's place in the registry; leaving it (drop) removes the tunnel.
pub struct Registered {
    live: Arc<Live>,
}

impl Registered {
    /// The counters the tunnel's meters add to.
    pub fn live(&self) -> &Arc<Live> {
        &self.live
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(r) = self.live.registry.upgrade() {
            r.tunnels.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.live.id);
        }
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            tunnels: Mutex::default(),
            next: AtomicU64::new(1),
            refusals: Mutex::default(),
            salt: RandomState::new(),
        }
    }
}

impl Registry {
    /// Registers an admitted tunnel of `key` (from `addr`) to `target`.
    pub fn register(self: &Arc<Self>, key: ClientKey, addr: IpAddr, target: String, mode: Mode) -> Registered {
        let now = Instant::now();
        let live = Arc::new(Live {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            key,
            addr,
            target,
            mode,
            started: now,
            bytes: Default::default(),
            sample: Mutex::new(Sample { at: now, bytes: [0; 2], rate: [0.0; 2] }),
            registry: Arc::downgrade(self),
        });
        self.tunnels.lock().unwrap_or_else(|e| e.into_inner()).insert(live.id, Arc::clone(&live));
        Registered { live }
    }

    /// Counts a refusal of the client `key`. Bounded: the map forgets clients quiet for
    /// [`REFUSALS_KEPT`], and past [`MAX_REFUSING`] the one refused longest ago.
    pub fn refused(&self, key: ClientKey) {
        let now = Instant::now();
        let mut map = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_REFUSING && !map.contains_key(&key) {
            map.retain(|_, (_, at)| now.saturating_duration_since(*at) < REFUSALS_KEPT);
            if map.len() >= MAX_REFUSING {
                if let Some(oldest) = map.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| k.clone()) {
                    map.remove(&oldest);
                }
            }
        }
        let e = map.entry(key).or_insert((0, now));
        e.0 += 1;
        e.1 = now;
    }

    /// How a client is shown: a user by name; an address (or IPv6 prefix) as
    /// `log.client_address` allows, and always an opaque id that stays the same for the
    /// process's life, so rows can be told apart when the address is omitted.
    fn who(&self, key: &ClientKey, config: &Config) -> Who {
        let id = format!("{:012x}", self.salt.hash_one(key) >> 16);
        let privacy = config.log.client_address;
        match key {
            ClientKey::User(u) => Who { id, user: Some(u.to_string()), client: None },
            ClientKey::V4(ip) => Who { id, user: None, client: client_field(IpAddr::V4(*ip), privacy) },
            // An IPv6 client is its prefix; shown whole, it says so.
            ClientKey::V6(net) => {
                let client = client_field(IpAddr::V6(*net), privacy).map(|c| match privacy {
                    ClientAddressLog::Full => format!("{c}/{}", config.limits.per_client.ipv6_prefix),
                    _ => c,
                });
                Who { id, user: None, client }
            }
        }
    }

    /// `GET /tunnels`: live tunnels, fastest first (then oldest), `offset` and `limit` rows.
    pub fn tunnels(&self, config: &Config, offset: usize, limit: usize) -> TunnelsView {
        let now = Instant::now();
        let privacy = config.log.client_address;
        let all: Vec<Arc<Live>> = self.tunnels.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        let mut rows: Vec<TunnelRow> = all
            .iter()
            .map(|t| {
                let rate = t.rate(now);
                let bytes = t.bytes();
                let who = self.who(&t.key, config);
                TunnelRow {
                    id: t.id,
                    client_id: who.id,
                    user: who.user,
                    client: client_field(t.addr, privacy),
                    target: t.target.clone(),
                    mode: t.mode.as_str(),
                    age_s: now.saturating_duration_since(t.started).as_secs(),
                    bytes_up: bytes[0],
                    bytes_down: bytes[1],
                    rate_up: rate[0].round() as u64,
                    rate_down: rate[1].round() as u64,
                }
            })
            .collect();
        rows.sort_by(|a, b| (b.rate_up + b.rate_down, b.age_s, a.id).cmp(&(a.rate_up + a.rate_down, a.age_s, b.id)));
        let total = rows.len();
        TunnelsView { total, offset, tunnels: rows.into_iter().skip(offset).take(limit.min(MAX_LIMIT)).collect() }
    }

    /// `GET /clients`: clients with a live tunnel or a recent refusal, fastest first.
    pub fn clients(&self, config: &Config, offset: usize, limit: usize) -> ClientsView {
        let now = Instant::now();
        let all: Vec<Arc<Live>> = self.tunnels.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        let mut by_key: HashMap<ClientKey, ClientAgg> = HashMap::new();
        for t in &all {
            let rate = t.rate(now);
            let bytes = t.bytes();
            let agg = by_key.entry(t.key.clone()).or_default();
            agg.tunnels += 1;
            for i in 0..2 {
                agg.bytes[i] += bytes[i];
                agg.rate[i] += rate[i];
            }
        }
        {
            let mut refusals = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
            refusals.retain(|k, (_, at)| now.saturating_duration_since(*at) < REFUSALS_KEPT || by_key.contains_key(k));
            for (k, (n, _)) in refusals.iter() {
                by_key.entry(k.clone()).or_default().refusals = *n;
            }
        }
        let pc = &config.limits.per_client;
        let limits = Limits {
            max_tunnels: pc.max_tunnels,
            new_tunnels_per_second: pc.new_tunnels_per_second.map(|r| r.get()),
            bandwidth_up: pc.bandwidth_up.map(|r| r.bytes_per_sec()),
            bandwidth_down: pc.bandwidth_down.map(|r| r.bytes_per_sec()),
        };
        let mut rows: Vec<ClientRow> = by_key
            .into_iter()
            .map(|(key, a)| {
                let who = self.who(&key, config);
                ClientRow {
                    id: who.id,
                    user: who.user,
                    client: who.client,
                    tunnels: a.tunnels,
                    bytes_up: a.bytes[0],
                    bytes_down: a.bytes[1],
                    rate_up: a.rate[0].round() as u64,
                    rate_down: a.rate[1].round() as u64,
                    refusals: a.refusals,
                    limits: limits.clone(),
                }
            })
            .collect();
        rows.sort_by(|a, b| {
            (b.rate_up + b.rate_down, b.tunnels, b.refusals, &a.id).cmp(&(
                a.rate_up + a.rate_down,
                a.tunnels,
                a.refusals,
                &b.id,
            ))
        });
        let total = rows.len();
        ClientsView { total, offset, clients: rows.into_iter().skip(offset).take(limit.min(MAX_LIMIT)).collect() }
    }
}

struct Who {
    id: String,
    user: Option<String>,
    client: Option<String>,
}

#[derive(Default)]
struct ClientAgg {
    tunnels: u32,
    bytes: [u64; 2],
    rate: [f64; 2],
    refusals: u64,
}

/// The per-client limits in force (the same for every client; shown per row so a view of
/// one client is complete). Rates in bytes per second; absent = no limit.
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    /// `limits.per_client.max_tunnels`.
    pub max_tunnels: Option<u32>,
    /// `limits.per_client.new_tunnels_per_second`.
    pub new_tunnels_per_second: Option<u32>,
    /// `limits.per_client.bandwidth_up`, bytes per second.
    pub bandwidth_up: Option<u64>,
    /// `limits.per_client.bandwidth_down`, bytes per second.
    pub bandwidth_down: Option<u64>,
}

/// One client in `GET /clients`.
#[derive(Debug, Serialize)]
pub struct ClientRow {
    /// Opaque, stable for the process's life.
    pub id: String,
    /// The authenticated user, for clients keyed by user.
    pub user: Option<String>,
    /// The address or IPv6 prefix, as `log.client_address` allows.
    pub client: Option<String>,
    /// Live tunnels.
    pub tunnels: u32,
    /// Bytes of the live tunnels, client to origin.
    pub bytes_up: u64,
    /// Bytes of the live tunnels, origin to client.
    pub bytes_down: u64,
    /// Bytes per second up, since the previous inspection.
    pub rate_up: u64,
    /// Bytes per second down, since the previous inspection.
    pub rate_down: u64,
    /// Refusals in the last five minutes (by address; before authentication a user is not
    /// known yet).
    pub refusals: u64,
    /// The limits in force.
    pub limits: Limits,
}

/// `GET /clients`.
#[derive(Debug, Serialize)]
pub struct ClientsView {
    /// Clients in all (before pagination).
    pub total: usize,
    /// Rows skipped.
    pub offset: usize,
    /// This page.
    pub clients: Vec<ClientRow>,
}

/// One tunnel in `GET /tunnels`.
#[derive(Debug, Serialize)]
pub struct TunnelRow {
    /// The tunnel's number in this process.
    pub id: u64,
    /// The client's opaque id (as in `/clients`).
    pub client_id: String,
    /// The authenticated user, if any.
    pub user: Option<String>,
    /// The client's address, as `log.client_address` allows.
    pub client: Option<String>,
    /// `host:port` as the client asked.
    pub target: String,
    /// `tunnel` or `mitm`.
    pub mode: &'static str,
    /// Seconds since admission.
    pub age_s: u64,
    /// Bytes client to origin.
    pub bytes_up: u64,
    /// Bytes origin to client.
    pub bytes_down: u64,
    /// Bytes per second up, since the previous inspection.
    pub rate_up: u64,
    /// Bytes per second down, since the previous inspection.
    pub rate_down: u64,
}

/// `GET /tunnels`.
#[derive(Debug, Serialize)]
pub struct TunnelsView {
    /// Tunnels in all (before pagination).
    pub total: usize,
    /// Rows skipped.
    pub offset: usize,
    /// This page.
    pub tunnels: Vec<TunnelRow>,
}

/// `offset` and `limit` from a query string (`limit` defaults to 50, at most
/// [`MAX_LIMIT`]); anything else in it is ignored.
pub fn page(query: &str) -> (usize, usize) {
    let mut offset = 0;
    let mut limit = 50;
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("offset", v)) => offset = v.parse().unwrap_or(0),
            Some(("limit", v)) => limit = v.parse().unwrap_or(50),
            _ => {}
        }
    }
    (offset, limit.clamp(1, MAX_LIMIT))
}
