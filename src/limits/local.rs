//! The local backend: admission counters, rate limiters and byte buckets held in this
//! process. Also what only a local backend can offer: per-client counts, and the sweep that
//! forgets clients gone quiet.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::conns::Slot;
use super::pool::{Pool, now_ms};
use super::rate::KeyedRate;
use super::{AdmitRequest, ClientKey, Lease};
use crate::config::{Config, LimitsConfig, RouteLimits};
use crate::error::Refusal;

/// How often idle per-client state is swept.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// The limits in force; swapped whole on reload.
#[derive(Debug, Clone, Default)]
pub(super) struct Settings {
    pub(super) limits: LimitsConfig,
    /// Route limits by route identity ([`RouteConfig::key`](crate::config::RouteConfig::key)),
    /// so a reload that reorders routes keeps each route's state and limits together.
    pub(super) routes: HashMap<Arc<str>, RouteLimits>,
}

/// How much of the configured caps and new-tunnel rate this process enforces itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Share {
    /// All of them: the local backend, or a cluster backend failing open.
    Whole,
    /// None: Redis decides them. Only the pools (byte budgets) and local counts are kept.
    Pools,
    /// Each divided by this many live instances, rounded up so no limit becomes 0 (a
    /// cluster backend failing `local`).
    Part(NonZeroU32),
}

impl Share {
    fn cap(self, cap: Option<u32>) -> Option<u32> {
        match self {
            Share::Whole => cap,
            Share::Pools => None,
            Share::Part(n) => cap.map(|c| c.div_ceil(n.get()).max(1)),
        }
    }
}

/// Key of the client map: the client, and the route identity for route-scoped state.
type StateKey = (ClientKey, Option<Arc<str>>);

impl Settings {
    /// Gives `pool`, the pool of `key`, the byte rates these settings set for it.
    fn apply(&self, key: &StateKey, pool: &Pool) {
        match &key.1 {
            None => pool.set_rates(self.limits.per_client.bandwidth_up, self.limits.per_client.bandwidth_down),
            Some(route) => {
                let limits = self.routes.get(route);
                pool.set_rates(limits.and_then(|l| l.bandwidth_up), limits.and_then(|l| l.bandwidth_down));
            }
        }
    }
}

/// All admission and bandwidth state of this process: the local backend.
pub struct Local {
    pub(super) settings: ArcSwap<Settings>,
    /// Everyone's pool: the global cap and byte budgets.
    pub(super) global: Arc<Pool>,
    /// Per-client and per-client-per-route pools. Swept when no tunnel holds one and it has
    /// been quiet for a sweep interval.
    pub(super) clients: DashMap<StateKey, Arc<Pool>>,
    rate: KeyedRate,
    /// The new-tunnel rate divided among the instances, for a cluster backend's fail mode
    /// `local` ([`Share::Part`]); configured when first used and whenever the count moves.
    rate_part: KeyedRate,
    /// Authentication attempts that need a hash, per client address (only with `[auth]`).
    auth_attempts: KeyedRate,
    /// Whether per-client pools are fed from outside (a cluster backend's grants) rather
    /// than paced by their local rate alone.
    fed: bool,
}

impl Local {
    /// Local state for `config`.
    pub fn new(config: &Config) -> Arc<Local> {
        Local::with_feeding(config, false)
    }

    /// Local state whose per-client pools spend only credit granted from outside when `fed`
    /// (the cluster backend's bandwidth grants, [`super::cluster`]).
    pub(super) fn with_feeding(config: &Config, fed: bool) -> Arc<Local> {
        let g = Local {
            settings: ArcSwap::from_pointee(Settings::default()),
            global: Arc::default(),
            clients: DashMap::new(),
            rate: KeyedRate::default(),
            rate_part: KeyedRate::default(),
            auth_attempts: KeyedRate::default(),
            fed,
        };
        g.update(config);
        Arc::new(g)
    }

    /// Applies new limits: at once for admissions, at the next chunk for running tunnels.
    /// Active counts are kept, so a lowered cap admits nobody until enough tunnels end.
    ///
    /// The settings are stored before the pools are walked, and a pool is made under its map
    /// shard's lock reading the settings then: a pool made during the walk either is visited
    /// by it or was made after it passed, from the new settings. Either way none keeps an old
    /// rate.
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
        let settings = self.settings.load();
        let limits = &settings.limits;
        self.global.set_rates(limits.bandwidth, limits.bandwidth);
        for entry in self.clients.iter() {
            settings.apply(entry.key(), entry.value());
        }
    }

    /// Admits one tunnel, or says why not. Cheapest refusal first.
    pub fn admit(self: &Arc<Self>, req: &AdmitRequest<'_>) -> Result<Lease, Refusal> {
        self.admit_with(req, Share::Whole)
    }

    /// Admits one tunnel under `share` of the configured caps and new-tunnel rate. The pools
    /// (and so the byte budgets) are the same whatever the share.
    pub(super) fn admit_with(self: &Arc<Self>, req: &AdmitRequest<'_>, share: Share) -> Result<Lease, Refusal> {
        let client = req.client;
        let settings = self.settings.load();
        let cap = |c: Option<u32>| share.cap(c);
        let global = self.global.tunnels.try_acquire(cap(settings.limits.max_tunnels)).ok_or(Refusal::GlobalCap)?;
        let (client_pool, client_slot) = self
            .acquire_client(client.clone(), None, cap(settings.limits.per_client.max_tunnels))
            .ok_or(Refusal::ClientCap)?;
        // The route's cap before the rate: a refusal for a full route should not also spend
        // the client's new-tunnel budget.
        let route_key: Option<Arc<str>> = req.route.filter(|k| settings.routes.contains_key(*k)).cloned();
        let route_scope = match (&route_key, route_key.as_ref().and_then(|k| settings.routes.get(k))) {
            (Some(k), Some(limits)) => Some(
                self.acquire_client(client.clone(), Some(Arc::clone(k)), cap(limits.max_tunnels))
                    .ok_or(Refusal::RouteCap)?,
            ),
            _ => None,
        };
        match share {
            Share::Whole => self.rate.check(client),
            Share::Pools => Ok(()),
            Share::Part(n) => {
                let pc = &settings.limits.per_client;
                let part = |v: Option<NonZeroU32>| {
                    v.map(|v| NonZeroU32::new(v.get().div_ceil(n.get())).unwrap_or(NonZeroU32::MIN))
                };
                self.rate_part.configure(part(pc.new_tunnels_per_second), part(pc.new_tunnels_burst));
                self.rate_part.check(client)
            }
        }
        .map_err(|retry_after| Refusal::ClientRate { retry_after })?;
        let (route_pool, route_slot) = route_scope.unzip();
        Ok(Lease {
            pools: [Some(client_pool), route_pool, Some(Arc::clone(&self.global))],
            _slots: (global, client_slot, route_slot),
            cluster: None,
        })
    }

    /// Counts one authentication attempt that needs a hash for `client` (its address's key);
    /// `Err` says how long until the next is allowed.
    pub fn auth_attempt(&self, client: &ClientKey) -> Result<(), Duration> {
        self.auth_attempts.check(client)
    }

    /// Takes a slot in the (client, route) pool, making it if needed. The check and the
    /// increment happen under the map's shard lock, the same lock the sweeper takes, so a
    /// pool is never swept while a tunnel is being admitted to it.
    fn acquire_client(
        &self,
        client: ClientKey,
        route: Option<Arc<str>>,
        cap: Option<u32>,
    ) -> Option<(Arc<Pool>, Slot)> {
        let entry = match self.clients.entry((client, route)) {
            Entry::Occupied(o) => o.into_ref(),
            Entry::Vacant(v) => {
                let fed = self.fed && v.key().1.is_none();
                let pool = Arc::new(if fed { Pool::fed() } else { Pool::default() });
                self.settings.load().apply(v.key(), &pool);
                v.insert(pool)
            }
        };
        let pool = Arc::clone(entry.value());
        pool.touch();
        let slot = pool.tunnels.try_acquire(cap)?;
        drop(entry);
        Some((pool, slot))
    }

    /// Drops per-client state nobody uses and that has been quiet for a sweep interval, and
    /// the rate limiters' keys that are back to a fresh state. Returns (clients, rate keys);
    /// [`Local::auth_attempt_keys`] tells the attempt limiter's.
    pub fn sweep(&self) -> (usize, usize) {
        let horizon = now_ms().saturating_sub(SWEEP_INTERVAL.as_millis() as u64);
        self.clients.retain(|_, st| Arc::strong_count(st) > 1 || st.last_used_ms.load(Ordering::Relaxed) > horizon);
        self.clients.shrink_to_fit();
        self.auth_attempts.sweep();
        self.rate_part.sweep();
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

    /// Active tunnels of this process.
    pub fn active_tunnels(&self) -> u32 {
        self.global.tunnels.active()
    }

    /// Active tunnels of one client (not route-scoped).
    pub fn active_for(&self, client: &ClientKey) -> u32 {
        self.clients.get(&(client.clone(), None)).map_or(0, |s| s.tunnels.active())
    }

    /// Starts the sweeper; it stops when the returned guard is dropped or the state goes.
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
