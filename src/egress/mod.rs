//! Egress pools (`[[egress.pools]]`): which source address a tunnel leaves from, so an
//! origin cannot link every client of the proxy through one address.
//!
//! A route names a pool (`routes.egress`, else `egress.default_pool`); the pool draws a
//! source per address family ([`Pools::choose`]), and the dialer uses the one of the family
//! the origin's address has, so the source always matches the target's family (a family
//! the pool lacks falls back to the kernel's choice or is refused, per pool). `rotate` draws
//! per tunnel; `sticky` keeps an identity on one address by a stable hash ([`hash`]); a
//! session named in the user name (`[auth.sessions]`) is pinned for `session_ttl`; with
//! `isolate`, two identities never hold one address at once while a free one remains
//! ([`state`]).
//!
//! With no pools, [`Pools::choose`] returns [`Egress::default`] before looking at anything,
//! so the dial path is what it was.

mod hash;
mod pool;
mod state;

use std::num::NonZeroU64;
use std::time::{Duration, Instant};

pub use state::{Hold, MAX_SESSIONS, State};

use crate::config::Config;
use crate::dial::{Egress, Source, Sources};
use crate::limits::ClientKey;
use crate::target::{Host, Target};
use pool::{Draw, Pool};
use state::Pin;

/// What the client asked of the egress in its user name (`[auth.sessions]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ask {
    /// The session (its hash, with the user's name), to pin to one address.
    pub session: Option<NonZeroU64>,
    /// Draw a fresh address (and re-pin the session).
    pub rotate: bool,
}

impl Ask {
    /// `user`'s session `id` (from `user-session-id`).
    pub fn session(user: &str, id: &str) -> Option<NonZeroU64> {
        NonZeroU64::new(hash::session(user, id))
    }
}

/// The egress chosen for one tunnel.
pub struct Choice {
    /// How to dial.
    pub egress: Egress,
    /// The pool it came from, for its counters ([`Pools::dialed`]).
    pub pool: Option<usize>,
    /// The addresses it holds (isolating pools): to keep until the tunnel ends.
    pub hold: Option<Hold>,
}

impl Choice {
    fn direct() -> Choice {
        Choice { egress: Egress::default(), pool: None, hold: None }
    }
}

/// The pools of one configuration snapshot.
pub struct Pools {
    pools: Vec<Pool>,
    /// The pool of each route, by route index (the route's own, else the default).
    by_route: Vec<Option<usize>>,
    /// The pool for targets no route matches.
    default: Option<usize>,
    session_ttl: Duration,
}

impl Pools {
    /// Compiles `[egress]`, and says at load what each isolating pool can promise.
    pub fn new(config: &Config) -> Pools {
        let (pools, by_route, default) = pool::compile(config);
        let session_ttl = config.auth.as_ref().map_or(Duration::ZERO, |a| a.sessions.session_ttl.0);
        Pools { pools, by_route, default, session_ttl }
    }

    /// Registers each pool's counters (at zero) with the proxy's metrics.
    pub fn observe(&mut self, metrics: &crate::metrics::Metrics) {
        for p in &mut self.pools {
            let name = p.name.to_string();
            p.counters.tunnels = metrics.config_counter(
                "veilgate_egress_tunnels_total",
                "Tunnels connected through an egress pool, by pool.",
                ("pool", name.clone()),
            );
            p.counters.failures = metrics.config_counter(
                "veilgate_egress_failures_total",
                "Dials through an egress pool that failed (no source of the family, connect errors), by pool.",
                ("pool", name.clone()),
            );
            p.counters.shared = metrics.config_counter(
                "veilgate_egress_isolation_shared_total",
                "Tunnels of an isolating pool that had to share an address with another client identity, by pool.",
                ("pool", name),
            );
        }
    }

    /// The egress for a tunnel to `target` on the route at `route` (its index), for the
    /// client `key`, with what the client asked in its user name.
    pub fn choose(&self, state: &State, route: Option<usize>, key: &ClientKey, ask: Ask, target: &Target) -> Choice {
        if self.pools.is_empty() {
            return Choice::direct();
        }
        let index = match route {
            Some(i) => self.by_route.get(i).copied().flatten(),
            None => self.default,
        };
        let Some(index) = index else {
            return Choice::direct();
        };
        let pool = &self.pools[index];
        let owner = hash::identity(key);
        let mut hold = state.hold(owner);
        let families = match &target.host {
            Host::Ip(ip) if ip.to_canonical().is_ipv4() => [true, false],
            Host::Ip(_) => [false, true],
            Host::Name(_) => [true, true],
        };
        let now = Instant::now();
        let pin_key = ask.session.filter(|_| !self.session_ttl.is_zero()).map(|s| hash::pin(&pool.name, s.get()));
        let old = pin_key.and_then(|k| state.pinned(k, now));
        let sticky = ask.session.map_or(owner, NonZeroU64::get);
        let mut sources = Sources { v4: Source::Refuse, v6: Source::Refuse };
        let mut changed = old.is_none() || ask.rotate;
        for (v6, wanted) in [false, true].into_iter().zip(families) {
            if !wanted {
                continue;
            }
            let pinned = old.and_then(|p| if v6 { p.v6 } else { p.v4 });
            let reuse = pinned.filter(|s| !ask.rotate && keep(pool, state, &mut hold, v6, *s));
            let source = reuse.unwrap_or_else(|| {
                changed = true;
                let draw = Draw { sticky, fresh: ask.rotate, avoid: pinned.and_then(address) };
                pool.draw(v6, &draw, state, &mut hold)
            });
            *(if v6 { &mut sources.v6 } else { &mut sources.v4 }) = source;
        }
        if let (Some(k), true) = (pin_key, changed) {
            // A rotation starts the session over; a family drawn for the first time (or
            // again, for isolation) joins the session's pin and keeps its expiry.
            let kept = old.filter(|_| !ask.rotate);
            let pin = Pin {
                v4: if families[0] { Some(sources.v4) } else { kept.and_then(|p| p.v4) },
                v6: if families[1] { Some(sources.v6) } else { kept.and_then(|p| p.v6) },
                expires: kept.map_or(now + self.session_ttl, |p| p.expires),
            };
            state.pin(k, pin, now);
        }
        let hold = pool.isolate.then_some(hold);
        Choice { egress: Egress::Pool(sources), pool: Some(index), hold }
    }

    /// Counts a dial through `pool` (a [`Choice`]'s).
    pub fn dialed(&self, pool: Option<usize>, ok: bool) {
        if let Some(p) = pool.and_then(|i| self.pools.get(i)) {
            if ok { &p.counters.tunnels } else { &p.counters.failures }.increment(1);
        }
    }
}

/// Whether a pinned source can still be used: in an isolating pool, not while another
/// identity holds it (isolation wins over the pin; the session is re-pinned).
fn keep(pool: &Pool, state: &State, hold: &mut Hold, v6: bool, source: Source) -> bool {
    match address(source) {
        Some(addr) if pool.isolate => state.take_free(hold, usize::from(v6), std::iter::once(addr)).is_some(),
        _ => true,
    }
}

fn address(source: Source) -> Option<std::net::IpAddr> {
    match source {
        Source::Bind(a) | Source::Freebind(a) => Some(a),
        Source::Kernel | Source::Refuse => None,
    }
}

/// Seconds since the epoch, for "once a minute" log budgets.
fn unix_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
