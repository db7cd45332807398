//! The governor layer: one door ([`Governor::admit`]) for every admission limit, and
//! [`Throttle`] for every byte budget.
//!
//! Admission order is the cheapest refusal first: global cap (503), per-client cap (429),
//! per-client new-tunnel rate (429 + Retry-After), then the route's per-client cap (429).
//! An [`Admission`] owns the permits; dropping it, on any path, releases them.
//!
//! This is the seam DESIGN §4b keeps for several instances: admission and byte grants are
//! the only questions the tunnel asks, so a Redis-backed governor can answer them instead.

pub mod bandwidth;
pub mod conns;
pub mod pending;
pub mod rate;

use std::cell::Cell;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use dashmap::DashMap;

use crate::config::{ByteRate, Config, LimitsConfig, RouteConfig, RouteLimits};
use crate::error::Refusal;
use bandwidth::Bucket;
use conns::{Gauge, GaugePermit};
use rate::KeyedRate;

/// How often idle per-client state is swept.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// Who a limit applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// An IPv4 client.
    V4(Ipv4Addr),
    /// An IPv6 client's network: the address cut to `ipv6_prefix` bits.
    V6(Ipv6Addr),
    /// An authenticated user.
    User(Arc<str>),
}

impl ClientKey {
    /// The key for a client address: IPv4 as is (also when mapped into IPv6), IPv6 by prefix.
    pub fn from_ip(ip: IpAddr, ipv6_prefix: u8) -> ClientKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => ClientKey::V4(v4),
            IpAddr::V6(v6) => {
                let bits = u32::from(ipv6_prefix.min(128));
                let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
                ClientKey::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        }
    }
}

/// Direction of a byte flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to origin.
    Up,
    /// Origin to client.
    Down,
}

impl Direction {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

/// Which budget a wait was spent on (metric label `scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The client's own budget.
    Client,
    /// The client's budget for one route.
    Route,
    /// The proxy-wide budget.
    Global,
}

impl Scope {
    /// Every scope, in metric order.
    pub const ALL: [Scope; 3] = [Scope::Client, Scope::Route, Scope::Global];
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Client => "client",
            Scope::Route => "route",
            Scope::Global => "global",
        }
    }
}

/// The limits in force; swapped whole on reload.
#[derive(Debug, Clone, Default)]
struct Settings {
    limits: LimitsConfig,
    /// Route limits by route identity ([`RouteConfig::key`]), so a reload that reorders
    /// routes keeps each route's state and limits together.
    routes: HashMap<Arc<str>, RouteLimits>,
}

/// Per-client (or per-client-per-route) state. Shared by that client's tunnels; swept when
/// no tunnel holds it and it has been quiet for a sweep interval.
#[derive(Default)]
struct ClientState {
    tunnels: Arc<Gauge>,
    buckets: [Bucket; 2],
    last_used_ms: AtomicU64,
}

/// Key of the client map: the client, and the route identity for route-scoped state.
type StateKey = (ClientKey, Option<Arc<str>>);

/// All admission and bandwidth state of one proxy.
pub struct Governor {
    settings: ArcSwap<Settings>,
    global: Arc<Gauge>,
    clients: DashMap<StateKey, Arc<ClientState>>,
    rate: KeyedRate,
    /// Authentication attempts that need a hash, per client address (only with `[auth]`).
    auth_attempts: KeyedRate,
    global_buckets: [Bucket; 2],
    epoch: Instant,
}

impl Governor {
    /// A governor for `config`.
    pub fn new(config: &Config) -> Arc<Governor> {
        let g = Governor {
            settings: ArcSwap::from_pointee(Settings::default()),
            global: Arc::new(Gauge::default()),
            clients: DashMap::new(),
            rate: KeyedRate::default(),
            auth_attempts: KeyedRate::default(),
            global_buckets: Default::default(),
            epoch: Instant::now(),
        };
        g.update(config);
        Arc::new(g)
    }

    /// Applies new limits: at once for admissions, at the next chunk for running tunnels.
    /// Active counts are kept, so a lowered cap admits nobody until enough tunnels end.
    pub fn update(&self, config: &Config) {
        let pc = &config.limits.per_client;
        self.rate.configure(pc.new_tunnels_per_second, pc.new_tunnels_burst);
        let auth = config.auth.as_ref();
        self.auth_attempts.configure(auth.map(|a| a.attempts_per_second), auth.map(|a| a.attempts_burst));
        self.settings.store(Arc::new(Settings {
            limits: config.limits.clone(),
            routes: config
                .routes
                .iter()
                .filter_map(|r| r.per_client.clone().map(|l| (Arc::from(r.key()), l)))
                .collect(),
        }));
    }

    /// The client key for an address under the current `ipv6_prefix`.
    pub fn key_for(&self, ip: IpAddr) -> ClientKey {
        ClientKey::from_ip(ip, self.settings.load().limits.per_client.ipv6_prefix)
    }

    /// Admits one tunnel for `client` to a destination on `route`, or says why not.
    /// Cheapest refusal first.
    pub fn admit(self: &Arc<Self>, client: &ClientKey, route: Option<&RouteConfig>) -> Result<Admission, Refusal> {
        let settings = self.settings.load();
        let global = self.global.try_acquire(settings.limits.max_tunnels).ok_or(Refusal::GlobalCap)?;
        let (client_state, client_permit) = self
            .acquire_client(client.clone(), None, settings.limits.per_client.max_tunnels)
            .ok_or(Refusal::ClientCap)?;
        // The route's cap before the rate: a refusal for a full route should not also spend
        // the client's new-tunnel budget.
        let route_key: Option<Arc<str>> = route.map(|r| Arc::from(r.key())).filter(|k| settings.routes.contains_key(k));
        let route_scope = match (&route_key, route_key.as_ref().and_then(|k| settings.routes.get(k))) {
            (Some(k), Some(limits)) => Some(
                self.acquire_client(client.clone(), Some(Arc::clone(k)), limits.max_tunnels)
                    .ok_or(Refusal::RouteCap)?,
            ),
            _ => None,
        };
        self.rate.check(client).map_err(|retry_after| Refusal::ClientRate { retry_after })?;
        Ok(Admission {
            governor: Arc::clone(self),
            client: client_state,
            route: route_scope.as_ref().map(|(s, _)| Arc::clone(s)),
            route_key,
            _permits: (global, client_permit, route_scope.map(|(_, p)| p)),
        })
    }

    /// Counts one authentication attempt that needs a hash for `client` (its address's key);
    /// `Err` says how long until the next is allowed.
    pub fn auth_attempt(&self, client: &ClientKey) -> Result<(), Duration> {
        self.auth_attempts.check(client)
    }

    /// Takes a slot in the (client, route) state, creating it if needed. The check and the
    /// increment happen under the map's shard lock, the same lock the sweeper takes, so a
    /// state is never swept while a tunnel is being admitted to it.
    fn acquire_client(
        &self,
        client: ClientKey,
        route: Option<Arc<str>>,
        cap: Option<u32>,
    ) -> Option<(Arc<ClientState>, GaugePermit)> {
        let entry = self.clients.entry((client, route)).or_default();
        let state = Arc::clone(entry.value());
        state.last_used_ms.store(self.now_ms(), Ordering::Relaxed);
        let permit = state.tunnels.try_acquire(cap)?;
        drop(entry);
        Some((state, permit))
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Drops per-client state nobody uses and that has been quiet for a sweep interval, and
    /// the rate limiters' keys that are back to a fresh state. Returns (clients, rate keys);
    /// [`Governor::auth_attempt_keys`] tells the attempt limiter's.
    pub fn sweep(&self) -> (usize, usize) {
        let horizon = self.now_ms().saturating_sub(SWEEP_INTERVAL.as_millis() as u64);
        self.clients.retain(|_, st| Arc::strong_count(st) > 1 || st.last_used_ms.load(Ordering::Relaxed) > horizon);
        self.clients.shrink_to_fit();
        self.auth_attempts.sweep();
        (self.clients.len(), self.rate.sweep())
    }

    /// Keys the authentication-attempt limiter tracks now.
    pub fn auth_attempt_keys(&self) -> usize {
        self.auth_attempts.tracked()
    }

    /// Tracked keys: (client and route states, new-tunnel-rate keys).
    pub fn tracked_keys(&self) -> (usize, usize) {
        (self.clients.len(), self.rate.tracked())
    }

    /// Active tunnels overall.
    pub fn active_tunnels(&self) -> u32 {
        self.global.active()
    }

    /// Active tunnels of one client (not route-scoped).
    pub fn active_for(&self, client: &ClientKey) -> u32 {
        self.clients.get(&(client.clone(), None)).map_or(0, |s| s.tunnels.active())
    }

    /// Starts the sweeper; it stops when the returned guard is dropped or the governor goes.
    pub fn start_sweeper(self: &Arc<Self>, on_sweep: impl Fn(usize, usize) + Send + 'static) -> SweeperGuard {
        let weak = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(g) = weak.upgrade() else { return };
                let (clients, rate) = g.sweep();
                on_sweep(clients, rate);
            }
        });
        SweeperGuard(task)
    }
}

/// Stops the sweeper task when dropped (a background chore owned by a guard).
pub struct SweeperGuard(tokio::task::JoinHandle<()>);

impl Drop for SweeperGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An admitted tunnel's permits and the budgets it draws on. Drop releases everything.
pub struct Admission {
    governor: Arc<Governor>,
    client: Arc<ClientState>,
    route: Option<Arc<ClientState>>,
    route_key: Option<Arc<str>>,
    _permits: (GaugePermit, GaugePermit, Option<GaugePermit>),
}

impl Admission {
    /// The receive buffer to give the socket that `dir` reads from, when a budget applies.
    ///
    /// A throttle pushes back on the sender by not reading. With the kernel's autotuned
    /// buffer (megabytes on a fast path) the sender would first fill that buffer and feel no
    /// push-back for seconds, so its own view of the rate, and the fairness among its
    /// tunnels, would be off by whatever fit. 1/8 s of the tightest rate is asked for (the
    /// kernel doubles it for its overhead), so one read finds a whole chunk (at most 1/8 s,
    /// see [`bandwidth::chunk_for`]) waiting; fast budgets keep autotuning.
    pub fn receive_buffer(&self, dir: Direction) -> Option<usize> {
        let s = self.governor.settings.load();
        let tightest = self.throttle(dir).rates(&s).into_iter().flatten().min()?;
        let window = usize::try_from(tightest.bytes_per_sec() / 8).unwrap_or(usize::MAX);
        (window < bandwidth::AUTOTUNE_ABOVE).then(|| window.max(bandwidth::MIN_RCVBUF))
    }

    /// The throttle for one direction of this tunnel.
    pub fn throttle(&self, dir: Direction) -> Throttle {
        Throttle {
            governor: Arc::clone(&self.governor),
            client: Arc::clone(&self.client),
            route: self.route.clone(),
            route_key: self.route_key.clone(),
            dir,
            carry: 0,
            seen: Cell::new(None),
        }
    }
}

/// Time a chunk spent waiting, by scope.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Waited(pub [Duration; 3]);

/// One direction's draw on the client, route and global budgets.
pub struct Throttle {
    governor: Arc<Governor>,
    client: Arc<ClientState>,
    route: Option<Arc<ClientState>>,
    route_key: Option<Arc<str>>,
    dir: Direction,
    /// Bytes not yet charged (less than a cell), so small writes are charged exactly overall.
    carry: u64,
    /// The rates [`Throttle::max_chunk`] read for the chunk now in flight, so its wait uses
    /// them instead of reading the settings a second time per chunk.
    seen: Cell<Option<[Option<ByteRate>; 3]>>,
}

impl Throttle {
    fn rates(&self, s: &Settings) -> [Option<ByteRate>; 3] {
        let pick = |up: Option<ByteRate>, down: Option<ByteRate>| match self.dir {
            Direction::Up => up,
            Direction::Down => down,
        };
        let pc = &s.limits.per_client;
        let route =
            self.route_key.as_ref().and_then(|k| s.routes.get(k)).and_then(|r| pick(r.bandwidth_up, r.bandwidth_down));
        [pick(pc.bandwidth_up, pc.bandwidth_down), route, s.limits.bandwidth]
    }

    /// Largest chunk the relay should read, or `None` when no budget applies.
    pub fn max_chunk(&self) -> Option<usize> {
        let rates = self.rates(&self.governor.settings.load());
        self.seen.set(Some(rates));
        let sharers = [
            Some(self.client.tunnels.active()),
            self.route.as_ref().map(|r| r.tunnels.active()),
            Some(self.governor.global.active()),
        ];
        rates.into_iter().zip(sharers).filter_map(|(r, n)| Some(bandwidth::chunk_for(r?, n.unwrap_or(1)))).min()
    }

    /// Waits until `n` bytes may pass: client budget, then route, then global.
    pub async fn wait(&mut self, n: usize) -> Waited {
        let mut waited = Waited::default();
        let rates = match self.seen.take() {
            Some(r) => r,
            None => self.rates(&self.governor.settings.load()),
        };
        if rates.iter().all(Option::is_none) {
            self.carry = 0;
            return waited;
        }
        let total = self.carry + n as u64;
        self.carry = total % bandwidth::CELL;
        let cells = u32::try_from(total / bandwidth::CELL).unwrap_or(u32::MAX);
        if cells == 0 {
            return waited;
        }
        let d = self.dir.index();
        let buckets: [Option<&Bucket>; 3] = [
            Some(&self.client.buckets[d]),
            self.route.as_deref().map(|r| &r.buckets[d]),
            Some(&self.governor.global_buckets[d]),
        ];
        for (i, (rate, bucket)) in rates.iter().zip(buckets).enumerate() {
            if let (Some(rate), Some(bucket)) = (rate, bucket) {
                waited.0[i] = bucket.take(*rate, cells).await;
            }
        }
        self.client.last_used_ms.store(self.governor.now_ms(), Ordering::Relaxed);
        waited
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_are_keyed_by_prefix() {
        let a = ClientKey::from_ip("2001:db8:1:2:aaaa::1".parse().unwrap(), 64);
        let b = ClientKey::from_ip("2001:db8:1:2:bbbb::2".parse().unwrap(), 64);
        let c = ClientKey::from_ip("2001:db8:1:3::1".parse().unwrap(), 64);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            ClientKey::from_ip("::ffff:10.0.0.1".parse().unwrap(), 64),
            ClientKey::V4("10.0.0.1".parse().unwrap())
        );
    }

    fn config(text: &str) -> Config {
        Config::from_toml(text, "test").unwrap()
    }

    #[tokio::test]
    async fn caps_and_release() {
        let g = Governor::new(&config("[limits]\nmax_tunnels = 3\n[limits.per_client]\nmax_tunnels = 2"));
        let a = ClientKey::V4("127.0.0.2".parse().unwrap());
        let b = ClientKey::V4("127.0.0.3".parse().unwrap());
        let a1 = g.admit(&a, None).unwrap();
        let _a2 = g.admit(&a, None).unwrap();
        assert_eq!(g.admit(&a, None).err(), Some(Refusal::ClientCap));
        let _b1 = g.admit(&b, None).unwrap();
        assert_eq!(g.admit(&b, None).err(), Some(Refusal::GlobalCap));
        drop(a1);
        assert_eq!(g.active_for(&a), 1);
        assert!(g.admit(&b, None).is_ok());
    }

    #[tokio::test]
    async fn rate_refusal_says_when() {
        let g = Governor::new(&config("[limits.per_client]\nnew_tunnels_per_second = 1\nnew_tunnels_burst = 2"));
        let a = ClientKey::V4("127.0.0.2".parse().unwrap());
        drop(g.admit(&a, None).unwrap());
        drop(g.admit(&a, None).unwrap());
        match g.admit(&a, None) {
            Err(Refusal::ClientRate { retry_after }) => {
                assert!(retry_after <= Duration::from_secs(1))
            }
            other => panic!("expected a rate refusal, got {:?}", other.err()),
        }
        assert_eq!(g.active_for(&a), 0, "a refused tunnel holds no slot");
    }

    #[tokio::test]
    async fn sweep_forgets_idle_clients_only() {
        let g = Governor::new(&config("[limits.per_client]\nmax_tunnels = 5"));
        let held = g.admit(&ClientKey::V4("127.0.0.2".parse().unwrap()), None).unwrap();
        for i in 0..1000u32 {
            drop(g.admit(&ClientKey::V6(Ipv6Addr::from(u128::from(i) << 64)), None).unwrap());
        }
        assert_eq!(g.tracked_keys().0, 1001);
        // Pretend a sweep interval has passed.
        for st in g.clients.iter() {
            st.last_used_ms.store(0, Ordering::Relaxed);
        }
        assert_eq!(g.sweep().0, 1, "only the state a tunnel still holds is kept");
        drop(held);
    }

    #[tokio::test]
    async fn a_flood_of_distinct_clients_leaves_nothing_behind() {
        let g = Governor::new(&config("[limits.per_client]\nmax_tunnels = 5\nnew_tunnels_per_second = 1000"));
        for i in 0..100_000u32 {
            drop(g.admit(&ClientKey::V4(Ipv4Addr::from(i)), None).unwrap());
        }
        assert_eq!(g.tracked_keys(), (100_000, 100_000));
        for st in g.clients.iter() {
            st.last_used_ms.store(0, Ordering::Relaxed);
        }
        // One token at 1000/s is back to a fresh state after 1 ms.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(g.sweep(), (0, 0));
        assert!(g.clients.capacity() < 4096, "the map gave its memory back: {}", g.clients.capacity());
    }

    #[tokio::test]
    async fn auth_attempts_are_per_address_and_swept() {
        let g =
            Governor::new(&config("[auth]\ncredentials_file = \"x\"\nattempts_per_second = 1000\nattempts_burst = 2"));
        let a = g.key_for("127.0.0.2".parse().unwrap());
        assert!(g.auth_attempt(&a).is_ok() && g.auth_attempt(&a).is_ok());
        assert!(g.auth_attempt(&a).is_err(), "past the burst");
        for i in 0..10_000u32 {
            let _ = g.auth_attempt(&ClientKey::V4(Ipv4Addr::from(i)));
        }
        assert_eq!(g.auth_attempt_keys(), 10_001);
        // One attempt at 1000/s is forgotten after 1 ms.
        tokio::time::sleep(Duration::from_millis(20)).await;
        g.sweep();
        assert_eq!(g.auth_attempt_keys(), 0);
        // Without [auth] nothing is counted.
        let g = Governor::new(&config(""));
        assert!((0..100).all(|_| g.auth_attempt(&a).is_ok()));
    }
}
