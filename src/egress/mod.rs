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

use std::time::{Duration, Instant};

pub use state::{Hold, MAX_SESSIONS, State};

use crate::config::Config;
use crate::dial::{Egress, Source, Sources};
use crate::limits::ClientKey;
use crate::target::{Host, Target};
use pool::{Draw, Pool};
use state::Pin;

/// What the client asked of the egress in its user name (`[auth.sessions]`): a session to
/// pin, a fresh address, both or neither. One word (the session's hash, bit 0 for rotate),
/// because it is carried across admission in every tunnel's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ask(u64);

impl Ask {
    /// Asks for `user`'s session `id` (from `user-session-id`).
    pub fn with_session(self, user: &str, id: &str) -> Ask {
        // Bit 1 set: a session is never all zeros, which reads as none.
        Ask((hash::session(user, id) | 2) & !1 | (self.0 & 1))
    }

    /// Asks for a fresh address.
    pub fn with_rotate(self) -> Ask {
        Ask(self.0 | 1)
    }

    /// The session's hash, if one was named.
    pub fn session(self) -> Option<u64> {
        Some(self.0 & !1).filter(|s| *s != 0)
    }

    /// Whether a fresh address was asked for.
    pub fn rotate(self) -> bool {
        self.0 & 1 == 1
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

    /// Boxed when it came from a pool, else nothing: a tunnel keeps its choice for its whole
    /// life (the hold), and one through no pool should carry no more than a pointer for it,
    /// nor allocate.
    pub fn boxed(self) -> Option<Box<Choice>> {
        self.pool.is_some().then(|| Box::new(self))
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
        let Some((index, pool)) = index.and_then(|i| Some((i, self.pools.get(i)?))) else {
            return Choice::direct();
        };
        let owner = hash::identity(key);
        let mut hold = state.hold(owner);
        let families = match &target.host {
            Host::Ip(ip) if ip.to_canonical().is_ipv4() => [true, false],
            Host::Ip(_) => [false, true],
            Host::Name(_) => [true, true],
        };
        let now = Instant::now();
        let pin_key = ask.session().filter(|_| !self.session_ttl.is_zero()).map(|s| hash::pin(&pool.name, s));
        let old = pin_key.and_then(|k| state.pinned(k, now));
        let sticky = ask.session().unwrap_or(owner);
        let mut sources = Sources { v4: Source::Refuse, v6: Source::Refuse };
        let mut changed = old.is_none() || ask.rotate();
        for (v6, wanted) in [false, true].into_iter().zip(families) {
            if !wanted {
                continue;
            }
            let pinned = old.and_then(|p| if v6 { p.v6 } else { p.v4 });
            let reuse = pinned.filter(|s| !ask.rotate() && keep(pool, state, &mut hold, v6, *s));
            let source = reuse.unwrap_or_else(|| {
                changed = true;
                let draw = Draw { sticky, fresh: ask.rotate(), avoid: pinned.and_then(address) };
                pool.draw(v6, &draw, state, &mut hold)
            });
            *(if v6 { &mut sources.v6 } else { &mut sources.v4 }) = source;
        }
        if let (Some(k), true) = (pin_key, changed) {
            // A rotation starts the session over; a family drawn for the first time (or
            // again, for isolation) joins the session's pin and keeps its expiry.
            let kept = old.filter(|_| !ask.rotate());
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

    /// Counts a dial through `choice`'s pool, if any.
    pub fn dialed(&self, choice: Option<&Choice>, ok: bool) {
        if let Some(p) = choice.and_then(|c| c.pool).and_then(|i| self.pools.get(i)) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn pools(extra: &str) -> Pools {
        let text = format!("[egress]\ndefault_pool = \"p\"\n[[egress.pools]]\nname = \"p\"\n{extra}\n");
        Pools::new(&Config::from_toml(&text, "t").unwrap())
    }

    fn user(name: &str) -> ClientKey {
        ClientKey::User(name.into())
    }

    fn target(s: &str) -> Target {
        Target::parse(s).unwrap()
    }

    fn v4(c: &Choice) -> Source {
        let Egress::Pool(s) = c.egress else { panic!("{:?}", c.egress) };
        s.v4
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn no_pools_is_the_direct_way_and_holds_nothing() {
        let p = Pools::new(&Config::default());
        let c = p.choose(&State::default(), None, &user("a"), Ask::default(), &target("192.0.2.1:443"));
        assert!(matches!(c.egress, Egress::Direct { bind: None }), "{:?}", c.egress);
        assert!(c.pool.is_none() && c.hold.is_none());
    }

    #[test]
    fn the_source_has_the_targets_family_or_the_fallback() {
        let state = State::default();
        let refuse = pools("addresses = [\"2001:db8::1\"]");
        let c = refuse.choose(&state, None, &user("a"), Ask::default(), &target("192.0.2.1:443"));
        assert_eq!(v4(&c), Source::Refuse);
        let direct = pools("addresses = [\"2001:db8::1\"]\nfamily_fallback = \"direct\"");
        let c = direct.choose(&state, None, &user("a"), Ask::default(), &target("192.0.2.1:443"));
        assert_eq!(v4(&c), Source::Kernel);
        // A name may answer either family: both are chosen.
        let c = direct.choose(&state, None, &user("a"), Ask::default(), &target("example.test:443"));
        let want = Sources { v4: Source::Kernel, v6: Source::Bind(ip("2001:db8::1")) };
        assert!(matches!(c.egress, Egress::Pool(s) if s == want), "{:?}", c.egress);
    }

    #[test]
    fn isolation_keeps_identities_apart_until_their_tunnels_end() {
        let state = State::default();
        let p = pools("addresses = [\"192.0.2.1\", \"192.0.2.2\"]\nselect = \"sticky\"\nisolate = true");
        let t = target("192.0.2.9:443");
        let a = p.choose(&state, None, &user("a"), Ask::default(), &t);
        let b = p.choose(&state, None, &user("b"), Ask::default(), &t);
        assert_ne!(v4(&a), v4(&b));
        let a2 = p.choose(&state, None, &user("a"), Ask::default(), &t);
        assert_eq!(v4(&a2), v4(&a), "an identity's tunnels share its address");
        let b_addr = v4(&b);
        drop(b);
        // b's address is free again: c, whose sticky hash may point anywhere, finds a free
        // address without sharing.
        let c = p.choose(&state, None, &user("c"), Ask::default(), &t);
        assert_eq!(v4(&c), b_addr);
        assert_eq!(state.held(), 2);
        drop((a, a2, c));
        assert_eq!(state.held(), 0);
    }

    #[test]
    fn a_session_is_pinned_and_rotate_moves_it() {
        let state = State::default();
        let text = "[auth]\ncredentials_file = \"x\"\n[auth.sessions]\nenabled = true\n\
                    [egress]\ndefault_pool = \"p\"\n[[egress.pools]]\nname = \"p\"\n\
                    addresses = [\"192.0.2.1\", \"192.0.2.2\", \"192.0.2.3\"]\n";
        let p = Pools::new(&Config::from_toml(text, "t").unwrap());
        let t = target("192.0.2.9:443");
        let s = Ask::default().with_session("a", "s1");
        let first = v4(&p.choose(&state, None, &user("a"), s, &t));
        for _ in 0..5 {
            p.choose(&state, None, &user("a"), Ask::default(), &t);
            assert_eq!(v4(&p.choose(&state, None, &user("a"), s, &t)), first);
        }
        let moved = v4(&p.choose(&state, None, &user("a"), s.with_rotate(), &t));
        assert_ne!(moved, first);
        assert_eq!(v4(&p.choose(&state, None, &user("a"), s, &t)), moved);
    }

    use crate::testlog::Capture;

    fn logged(f: impl FnOnce()) -> String {
        let out = Capture::default();
        let w = out.clone();
        let sub = tracing_subscriber::fmt().with_writer(move || w.clone()).with_ansi(false).finish();
        tracing::subscriber::with_default(sub, f);
        out.text()
    }

    #[test]
    fn what_isolation_can_promise_is_said_at_load_and_when_exhausted() {
        let log =
            logged(|| drop(pools("addresses = [\"192.0.2.1\", \"2001:db8::1\", \"2001:db8::2\"]\nisolate = true")));
        assert!(log.contains("WARN") && log.contains("egress pool cannot isolate") && log.contains("IPv4"), "{log}");
        assert!(log.contains("isolates up to 2 client identities at once over IPv6"), "{log}");
        assert_eq!(logged(|| drop(pools("addresses = [\"192.0.2.1\"]"))), "", "nothing to say without isolate");
        let state = State::default();
        let p = pools("addresses = [\"192.0.2.1\", \"192.0.2.2\"]\nisolate = true");
        let t = target("192.0.2.9:443");
        let (a, b) = (
            p.choose(&state, None, &user("a"), Ask::default(), &t),
            p.choose(&state, None, &user("b"), Ask::default(), &t),
        );
        let mut c = None;
        let log = logged(|| c = Some(p.choose(&state, None, &user("c"), Ask::default(), &t)));
        assert!(log.contains("no free address for another client identity"), "{log}");
        assert!([v4(&a), v4(&b)].contains(&v4(&c.unwrap())), "shared");
    }
}
