//! The governor layer: one door ([`Governor::admit`]) for every admission limit, and
//! [`Throttle`] for every byte budget (drawn from the [`Pool`]s a tunnel was admitted to).
//!
//! Admission order is the cheapest refusal first: global cap (503), per-client cap (429),
//! per-client new-tunnel rate (429 + Retry-After), then the route's per-client cap (429).
//! A [`Lease`] holds the tunnel's place under every limit; dropping it, on any path, gives
//! the place back.
//!
//! This is the seam DESIGN §4b keeps for several instances: admission and byte grants are
//! the only questions the tunnel asks, and the [`Governor`] answers them through a backend:
//! [`Local`] (this process's own state) today, a Redis-backed cluster backend later. That is
//! why [`Governor::admit`] is `async` although the local backend never waits, and why what
//! only the local backend has (its client map, sweeps) is reached through
//! [`Governor::local`] rather than sitting on the type every tunnel calls.

pub mod bandwidth;
pub mod cluster;
pub mod conns;
pub mod local;
pub mod pending;
pub mod pool;
pub mod rate;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{ByteRate, ClusterBackend, Config};
use crate::error::Refusal;
use crate::metrics::ClusterMetrics;
pub use cluster::Cluster;
use conns::Slot;
pub use local::{Local, SWEEP_INTERVAL, SweeperGuard};
use pool::Pools;
pub use pool::{Pool, Throttle, Waited};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// What a tunnel asks to be admitted as.
#[derive(Debug, Clone, Copy)]
pub struct AdmitRequest<'a> {
    /// The client: its address's key, or its user once authenticated.
    pub client: &'a ClientKey,
    /// The identity ([`RouteConfig::key`](crate::config::RouteConfig::key)) of the route the
    /// target matched, if any; compiled once per configuration, not per tunnel.
    pub route: Option<&'a Arc<str>>,
}

/// Where the governor's answers come from. An enum, not a trait object: the set is closed,
/// and `admit` stays a plain `async fn` with no boxing.
enum Backend {
    /// This process's own counters, limiters and buckets.
    Local(Arc<Local>),
    /// Caps and new-tunnel rate in Redis, shared by every instance (`[cluster]`).
    Cluster(Cluster),
}

/// The one door for admission and byte budgets, whichever backend answers.
pub struct Governor {
    backend: Backend,
}

impl Governor {
    /// A governor for `config` whose metrics count nothing (tests, tools).
    pub fn new(config: &Config) -> Arc<Governor> {
        Governor::build(config, ClusterMetrics::noop())
    }

    /// A governor for `config`, on the backend `[cluster]` names. The cluster backend starts
    /// without waiting for Redis (its fail mode answers until Redis does), so this needs a
    /// tokio runtime when `backend = "redis"`.
    pub fn build(config: &Config, metrics: ClusterMetrics) -> Arc<Governor> {
        let local = Local::with_feeding(config, config.cluster.backend == ClusterBackend::Redis);
        let backend = match config.cluster.backend {
            ClusterBackend::Local => Backend::Local(local),
            ClusterBackend::Redis => match Cluster::start(Arc::clone(&local), &config.cluster, metrics) {
                Ok(cluster) => Backend::Cluster(cluster),
                Err(e) => {
                    // `Config::validate` parsed the URL already; this is a client that cannot
                    // use it (a TLS URL without TLS support, say). Say so, and run alone.
                    tracing::error!(error = %e, "cluster backend cannot start; this instance enforces local limits only");
                    // Not the one made for feeding: nothing would feed its byte budgets.
                    Backend::Local(Local::new(config))
                }
            },
        };
        Arc::new(Governor { backend })
    }

    /// Applies new limits: at once for admissions, at the next chunk for running tunnels.
    /// The `[cluster]` section itself takes effect only after a restart.
    pub fn update(&self, config: &Config) {
        self.local().update(config);
        let started = match &self.backend {
            Backend::Local(_) => ClusterBackend::Local,
            Backend::Cluster(c) => {
                if c.config() != &config.cluster {
                    tracing::warn!("[cluster] changes take effect only after a restart");
                }
                return;
            }
        };
        if started != config.cluster.backend {
            tracing::warn!("[cluster] changes take effect only after a restart");
        }
    }

    /// Admits one tunnel, or says why not. Cheapest refusal first.
    pub async fn admit(&self, req: AdmitRequest<'_>) -> Result<Lease, Refusal> {
        match &self.backend {
            Backend::Local(local) => local.admit(&req),
            // Boxed: its Redis round trips' state would otherwise sit inline in every
            // tunnel's task, also on the local backend, for the tunnel's whole life.
            Backend::Cluster(cluster) => Box::pin(cluster.admit(&req)).await,
        }
    }

    /// The cluster backend, when `[cluster] backend = "redis"` runs.
    pub fn cluster(&self) -> Option<&Cluster> {
        match &self.backend {
            Backend::Local(_) => None,
            Backend::Cluster(c) => Some(c),
        }
    }

    /// Counts one authentication attempt that needs a hash for `client` (its address's key);
    /// `Err` says how long until the next is allowed.
    pub fn auth_attempt(&self, client: &ClientKey) -> Result<(), Duration> {
        self.local().auth_attempt(client)
    }

    /// Tunnels admitted by this process and not yet closed.
    pub fn active_tunnels(&self) -> u32 {
        self.local().active_tunnels()
    }

    /// The local backend, for what only it has: per-client counts, sweeps, the sweeper. A
    /// cluster backend keeps a local one too (for its fail mode and byte buckets), so this
    /// stays an accessor rather than an `Option`.
    pub fn local(&self) -> &Arc<Local> {
        match &self.backend {
            Backend::Local(local) => local,
            Backend::Cluster(cluster) => &cluster.local,
        }
    }
}

/// An admitted tunnel's place under every limit, and the pools it draws bytes from.
///
/// Dropping it releases the place. On the local backend that is a few atomic decrements
/// (the slots' own `Drop`), done synchronously where the tunnel ends. The cluster backend
/// cannot await Redis in `Drop`: its lease hands the release to a background task that
/// batches releases and renewals (DESIGN §4b), so dropping stays cheap there too.
pub struct Lease {
    pools: Pools,
    _slots: (Slot, Slot, Option<Slot>),
    /// The lease in Redis (cluster backend only).
    cluster: Option<cluster::Held>,
}

impl Lease {
    /// The tightest byte rate that applies to `dir` now (client, route or global), if any:
    /// what socket tuning sizes a receive buffer by.
    pub fn tightest_rate(&self, dir: Direction) -> Option<ByteRate> {
        self.pools.iter().flatten().filter_map(|p| p.rate(dir)).min()
    }

    /// The throttle for one direction of this tunnel.
    pub fn throttle(&self, dir: Direction) -> Throttle {
        Throttle::new(self.pools.clone(), dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

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

    async fn admit(g: &Governor, client: &ClientKey) -> Result<Lease, Refusal> {
        g.admit(AdmitRequest { client, route: None }).await
    }

    fn config(text: &str) -> Config {
        Config::from_toml(text, "test").unwrap()
    }

    #[tokio::test]
    async fn caps_and_release() {
        let g = Governor::new(&config("[limits]\nmax_tunnels = 3\n[limits.per_client]\nmax_tunnels = 2"));
        let a = ClientKey::V4("127.0.0.2".parse().unwrap());
        let b = ClientKey::V4("127.0.0.3".parse().unwrap());
        let a1 = admit(&g, &a).await.unwrap();
        let _a2 = admit(&g, &a).await.unwrap();
        assert_eq!(admit(&g, &a).await.err(), Some(Refusal::ClientCap));
        let _b1 = admit(&g, &b).await.unwrap();
        assert_eq!(admit(&g, &b).await.err(), Some(Refusal::GlobalCap));
        drop(a1);
        assert_eq!(g.local().active_for(&a), 1);
        assert!(admit(&g, &b).await.is_ok());
    }

    #[tokio::test]
    async fn a_share_of_the_caps_rounds_up_and_pools_only_has_none() {
        use local::Share;
        use std::num::NonZeroU32;
        let g = Governor::new(&config(
            "[limits]\nmax_tunnels = 100\n[limits.per_client]\nmax_tunnels = 3\nnew_tunnels_per_second = 4\nnew_tunnels_burst = 4",
        ));
        let local = g.local();
        let a = ClientKey::V4("127.0.0.2".parse().unwrap());
        let req = AdmitRequest { client: &a, route: None };
        let half = Share::Part(NonZeroU32::new(2).unwrap());
        let held: Vec<_> = (0..2).map(|_| local.admit_with(&req, half).unwrap()).collect();
        assert_eq!(local.admit_with(&req, half).err(), Some(Refusal::ClientCap), "3 over 2 instances: 2 here");
        let all: Vec<_> = (0..10).map(|_| local.admit_with(&req, Share::Pools).unwrap()).collect();
        assert_eq!(local.active_for(&a), 12, "Redis decides the caps; the local counts still see every tunnel");
        drop((held, all));
        // The rate's share: 4 over 3 instances is 2 (rounded up), burst 2.
        let third = Share::Part(NonZeroU32::new(3).unwrap());
        let b = ClientKey::V4("127.0.0.3".parse().unwrap());
        let req = AdmitRequest { client: &b, route: None };
        drop(local.admit_with(&req, third).unwrap());
        drop(local.admit_with(&req, third).unwrap());
        assert!(matches!(local.admit_with(&req, third).err(), Some(Refusal::ClientRate { .. })));
    }

    #[tokio::test]
    async fn rate_refusal_says_when() {
        let g = Governor::new(&config("[limits.per_client]\nnew_tunnels_per_second = 1\nnew_tunnels_burst = 2"));
        let a = ClientKey::V4("127.0.0.2".parse().unwrap());
        drop(admit(&g, &a).await.unwrap());
        drop(admit(&g, &a).await.unwrap());
        match admit(&g, &a).await {
            Err(Refusal::ClientRate { retry_after }) => {
                assert!(retry_after <= Duration::from_secs(1))
            }
            other => panic!("expected a rate refusal, got {:?}", other.err()),
        }
        assert_eq!(g.local().active_for(&a), 0, "a refused tunnel holds no slot");
    }

    #[tokio::test]
    async fn sweep_forgets_idle_clients_only() {
        let g = Governor::new(&config("[limits.per_client]\nmax_tunnels = 5"));
        let held = admit(&g, &ClientKey::V4("127.0.0.2".parse().unwrap())).await.unwrap();
        for i in 0..1000u32 {
            drop(admit(&g, &ClientKey::V6(Ipv6Addr::from(u128::from(i) << 64))).await.unwrap());
        }
        assert_eq!(g.local().tracked_keys().0, 1001);
        // Pretend a sweep interval has passed.
        for st in g.local().clients.iter() {
            st.last_used_ms.store(0, Ordering::Relaxed);
        }
        assert_eq!(g.local().sweep().0, 1, "only the state a tunnel still holds is kept");
        drop(held);
    }

    #[tokio::test]
    async fn a_flood_of_distinct_clients_leaves_nothing_behind() {
        let g = Governor::new(&config("[limits.per_client]\nmax_tunnels = 5\nnew_tunnels_per_second = 1000"));
        for i in 0..100_000u32 {
            drop(admit(&g, &ClientKey::V4(Ipv4Addr::from(i))).await.unwrap());
        }
        assert_eq!(g.local().tracked_keys(), (100_000, 100_000));
        for st in g.local().clients.iter() {
            st.last_used_ms.store(0, Ordering::Relaxed);
        }
        // One token at 1000/s is back to a fresh state after 1 ms.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(g.local().sweep(), (0, 0));
        assert!(g.local().clients.capacity() < 4096, "the map gave its memory back: {}", g.local().clients.capacity());
    }

    #[tokio::test]
    async fn auth_attempts_are_per_address_and_swept() {
        let g =
            Governor::new(&config("[auth]\ncredentials_file = \"x\"\nattempts_per_second = 1000\nattempts_burst = 2"));
        let a = ClientKey::from_ip("127.0.0.2".parse().unwrap(), 64);
        assert!(g.auth_attempt(&a).is_ok() && g.auth_attempt(&a).is_ok());
        assert!(g.auth_attempt(&a).is_err(), "past the burst");
        for i in 0..10_000u32 {
            let _ = g.auth_attempt(&ClientKey::V4(Ipv4Addr::from(i)));
        }
        assert_eq!(g.local().auth_attempt_keys(), 10_001);
        // One attempt at 1000/s is forgotten after 1 ms.
        tokio::time::sleep(Duration::from_millis(20)).await;
        g.local().sweep();
        assert_eq!(g.local().auth_attempt_keys(), 0);
        // Without [auth] nothing is counted.
        let g = Governor::new(&config(""));
        assert!((0..100).all(|_| g.auth_attempt(&a).is_ok()));
    }

    #[tokio::test]
    async fn a_reload_moves_the_rates_of_running_tunnels() {
        let first = config(
            "[limits]\nbandwidth = \"8 MiB/s\"\n[limits.per_client]\nbandwidth_down = \"1 MiB/s\"\n\
             [[routes]]\nhosts = [\"a.invalid\"]\n[routes.per_client]\nbandwidth_up = \"64 KiB/s\"",
        );
        let g = Governor::new(&first);
        let a = ClientKey::V4("127.0.0.2".parse().unwrap());
        let route: Arc<str> = Arc::from(first.routes[0].key());
        let lease = g.admit(AdmitRequest { client: &a, route: Some(&route) }).await.unwrap();
        let rates = |l: &Lease, d| l.pools.clone().map(|p| p.and_then(|p| p.rate(d)).map(|r| r.bytes_per_sec()));
        assert_eq!(rates(&lease, Direction::Down), [Some(1 << 20), None, Some(8 << 20)]);
        assert_eq!(rates(&lease, Direction::Up), [None, Some(64 << 10), Some(8 << 20)]);
        assert_eq!(lease.tightest_rate(Direction::Up), Some(ByteRate(64 << 10)));
        g.update(&config(
            "[limits.per_client]\nbandwidth_down = \"2 MiB/s\"\n\
             [[routes]]\nhosts = [\"a.invalid\"]\n[routes.per_client]\nbandwidth_up = \"128 KiB/s\"",
        ));
        assert_eq!(rates(&lease, Direction::Down), [Some(2 << 20), None, None]);
        assert_eq!(rates(&lease, Direction::Up), [None, Some(128 << 10), None]);
        // A client first seen after the reload gets the new rates too.
        let b = ClientKey::V4("127.0.0.3".parse().unwrap());
        let other = admit(&g, &b).await.unwrap();
        assert_eq!(rates(&other, Direction::Down), [Some(2 << 20), None, None]);
        assert_eq!(lease.throttle(Direction::Down).max_chunk(), Some(256 * 1024));
    }
}
