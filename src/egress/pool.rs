//! `[[egress.pools]]` compiled: per pool and address family, the addresses or the prefix to
//! draw from, and how to draw. Selection is synchronous and takes one short lock at most
//! (isolation, sessions), so it adds nothing to a tunnel's state across an await.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use ipnet::IpNet;
use tracing::{info, warn};

use super::hash;
use super::state::{Hold, State};
use crate::config::{Config, FamilyFallback, PoolConfig, Select};
use crate::dial::Source;

/// How many draws from a prefix an isolating pool tries before it shares one.
const PREFIX_TRIES: usize = 8;
/// At most one "isolation exhausted" log line per pool in this many seconds.
const EXHAUSTED_LOG_EVERY_SECS: u64 = 60;

/// Where one family's sources come from.
#[derive(Debug)]
pub(super) enum Family {
    /// Listed addresses.
    List(Vec<IpAddr>),
    /// Drawn from a prefix (freebind).
    Prefix(IpNet),
    /// None: the kernel's choice (`Source::Kernel`) or refusal (`Source::Refuse`).
    Fallback(Source),
}

/// The counters of one pool (no-ops until [`super::Pools::observe`] registers them).
pub(super) struct Counters {
    pub tunnels: metrics::Counter,
    pub failures: metrics::Counter,
    pub shared: metrics::Counter,
}

impl Default for Counters {
    fn default() -> Counters {
        Counters {
            tunnels: metrics::Counter::noop(),
            failures: metrics::Counter::noop(),
            shared: metrics::Counter::noop(),
        }
    }
}

/// One compiled pool.
pub(super) struct Pool {
    pub name: Arc<str>,
    pub select: Select,
    pub isolate: bool,
    pub v4: Family,
    pub v6: Family,
    /// The rotation's next index (and, for prefixes, the draw's counter).
    next: AtomicUsize,
    /// Per-process keys for random prefix draws: unpredictable, unlike the sticky hash.
    random: RandomState,
    last_exhausted_log: AtomicU64,
    pub counters: Counters,
}

/// What one family's draw asks for.
pub(super) struct Draw {
    /// What a sticky pool hashes: the session's, or the identity's.
    pub sticky: u64,
    /// Draw afresh (the `rotate` parameter): a sticky pool rotates once.
    pub fresh: bool,
    /// An address to avoid when drawing afresh (the session's previous one).
    pub avoid: Option<IpAddr>,
}

impl Pool {
    pub fn new(p: &PoolConfig) -> Pool {
        let fallback = match p.family_fallback {
            FamilyFallback::Direct => Source::Kernel,
            FamilyFallback::Refuse => Source::Refuse,
        };
        let family = |v6: bool| {
            let list: Vec<IpAddr> = p.addresses.iter().copied().filter(|a| a.is_ipv6() == v6).collect();
            match p.prefix {
                Some(net) if matches!(net, IpNet::V6(_)) == v6 => Family::Prefix(net),
                _ if !list.is_empty() => Family::List(list),
                _ => Family::Fallback(fallback),
            }
        };
        Pool {
            name: Arc::from(p.name.as_str()),
            select: p.select,
            isolate: p.isolate,
            v4: family(false),
            v6: family(true),
            next: AtomicUsize::new(0),
            random: RandomState::new(),
            last_exhausted_log: AtomicU64::new(0),
            counters: Counters::default(),
        }
    }

    /// Says at load what isolation can promise: an isolating pool keeps apart at most as
    /// many identities at once as it has addresses of a family; with one, nothing.
    pub fn announce(&self) {
        if !self.isolate {
            return;
        }
        for (family, name) in [(&self.v4, "IPv4"), (&self.v6, "IPv6")] {
            match family {
                Family::List(list) if list.len() < 2 => warn!(
                    pool = %self.name,
                    family = name,
                    addresses = list.len(),
                    "egress pool cannot isolate: one {name} address is shared by every client; \
                     add addresses or a prefix"
                ),
                Family::List(list) => info!(
                    pool = %self.name,
                    family = name,
                    addresses = list.len(),
                    "egress pool isolates up to {} client identities at once over {name}; \
                     past that, the least-used address is shared (veilgate_egress_isolation_shared_total)",
                    list.len()
                ),
                Family::Prefix(net) => info!(
                    pool = %self.name,
                    family = name,
                    prefix = %net,
                    "egress pool isolates by drawing from its prefix"
                ),
                Family::Fallback(_) => {}
            }
        }
    }

    /// The source for one family, holding it in `hold` when the pool isolates.
    pub fn draw(&self, v6: bool, d: &Draw, state: &State, hold: &mut Hold) -> Source {
        let family = if v6 { &self.v6 } else { &self.v4 };
        let slot = usize::from(v6);
        match family {
            Family::Fallback(source) => *source,
            Family::List(list) => {
                let n = list.len();
                let mut start = if self.select == Select::Sticky && !d.fresh {
                    (d.sticky % n as u64) as usize
                } else {
                    self.next.fetch_add(1, Ordering::Relaxed) % n
                };
                if d.fresh && n > 1 && d.avoid == Some(list[start]) {
                    start = (start + 1) % n;
                }
                if !self.isolate {
                    return Source::Bind(list[start]);
                }
                let ring = (0..n).map(|i| list[(start + i) % n]);
                if let Some(a) = state.take_free(hold, slot, ring) {
                    return Source::Bind(a);
                }
                self.exhausted();
                // `list` is never empty, so neither is the choice.
                state.take_least_used(hold, slot, list).map_or(Source::Refuse, Source::Bind)
            }
            Family::Prefix(net) => {
                let first = if self.select == Select::Sticky && !d.fresh { d.sticky } else { self.random_seed() };
                let mut addr = in_prefix(net, first);
                if d.fresh && d.avoid == Some(addr) {
                    addr = in_prefix(net, self.random_seed());
                }
                if !self.isolate {
                    return Source::Freebind(addr);
                }
                let tries = std::iter::once(addr).chain((1..PREFIX_TRIES).map(|_| in_prefix(net, self.random_seed())));
                if let Some(a) = state.take_free(hold, slot, tries) {
                    return Source::Freebind(a);
                }
                self.exhausted();
                state.take_least_used(hold, slot, &[addr]).map_or(Source::Refuse, Source::Freebind)
            }
        }
    }

    fn random_seed(&self) -> u64 {
        self.random.hash_one(self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// Counts a tunnel that shares an address with another identity, and says so in the
    /// log at most once a minute per pool.
    fn exhausted(&self) {
        self.counters.shared.increment(1);
        let now = crate::egress::unix_secs();
        let last = self.last_exhausted_log.load(Ordering::Relaxed);
        if now >= last + EXHAUSTED_LOG_EVERY_SECS
            && self.last_exhausted_log.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            warn!(pool = %self.name, "egress pool has no free address for another client identity; sharing the least-used one");
        }
    }
}

/// An address in `net` from `seed`, never the prefix's own (all-zero host part) address
/// nor, for IPv4, its broadcast.
pub(super) fn in_prefix(net: &IpNet, seed: u64) -> IpAddr {
    match net {
        IpNet::V4(n) => {
            let host_bits = 32 - u32::from(n.prefix_len());
            let size = 1u64 << host_bits;
            // Validation keeps prefixes at /30 or shorter, so size - 2 >= 2.
            let host = 1 + hash::mix(seed) % (size - 2);
            IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) | host as u32))
        }
        IpNet::V6(n) => {
            let host_bits = 128 - u32::from(n.prefix_len());
            let mask = if host_bits == 128 { u128::MAX } else { (1u128 << host_bits) - 1 };
            let host = (hash::wide(seed) & mask).max(1);
            IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | host))
        }
    }
}

/// Every pool of a configuration, and which one each route uses.
pub(super) fn compile(config: &Config) -> (Vec<Pool>, Vec<Option<usize>>, Option<usize>) {
    let pools: Vec<Pool> = config.egress.pools.iter().map(Pool::new).collect();
    let index = |name: &str| pools.iter().position(|p| &*p.name == name);
    let default = config.egress.default_pool.as_deref().and_then(index);
    let by_route = config.routes.iter().map(|r| r.egress.as_deref().and_then(index).or(default)).collect();
    for p in &pools {
        p.announce();
    }
    (pools, by_route, default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_draws_stay_inside_and_skip_the_network_address() {
        let v6: IpNet = "2001:db8:1::/48".parse().unwrap();
        let v4: IpNet = "192.0.2.0/30".parse().unwrap();
        for seed in 0..200 {
            let a = in_prefix(&v6, seed);
            assert!(v6.contains(&a) && a != v6.network(), "{a}");
            let b = in_prefix(&v4, seed);
            assert!(v4.contains(&b) && b != v4.network() && b != v4.broadcast(), "{b}");
        }
        assert_eq!(in_prefix(&v6, 42), in_prefix(&v6, 42), "a seed is one address");
    }
}
