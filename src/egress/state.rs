//! What egress selection remembers between tunnels: which client identities hold which
//! source address now (isolation), and which address each session is pinned to. It lives in
//! the proxy's context, not in a configuration snapshot, so a reload keeps the pins and never
//! forgets an address a running tunnel holds.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::dial::Source;

/// Most pinned sessions kept. Past it, expired pins are swept; if all are live, a new
/// session is served unpinned (its next tunnel draws again) rather than growing the table
/// without bound on user-chosen identifiers.
pub const MAX_SESSIONS: usize = 65_536;

/// The egress memory of one proxy.
#[derive(Default)]
pub struct State {
    holds: Arc<Holds>,
    sessions: Mutex<HashMap<u64, Pin>>,
}

/// A session's sources, per family, until `expires`.
#[derive(Debug, Clone, Copy)]
pub struct Pin {
    /// For IPv4 targets, once one was drawn.
    pub v4: Option<Source>,
    /// For IPv6 targets, once one was drawn.
    pub v6: Option<Source>,
    /// Pinned at plus `session_ttl`; not extended by use.
    pub expires: Instant,
}

/// Source addresses in use by isolating pools' tunnels, and by which identities.
#[derive(Default)]
struct Holds(Mutex<HashMap<IpAddr, Vec<(u64, u32)>>>);

impl Holds {
    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, Vec<(u64, u32)>>> {
        // A panic while holding it leaves counts that are still counts.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Addresses a tunnel holds: released when the tunnel ends, whichever way it ends.
pub struct Hold {
    holds: Arc<Holds>,
    owner: u64,
    addrs: [Option<IpAddr>; 2],
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut map = self.holds.lock();
        for addr in self.addrs.iter().flatten() {
            if let Some(owners) = map.get_mut(addr) {
                if let Some(i) = owners.iter().position(|(o, _)| *o == self.owner) {
                    owners[i].1 -= 1;
                    if owners[i].1 == 0 {
                        owners.swap_remove(i);
                    }
                }
                if owners.is_empty() {
                    map.remove(addr);
                }
            }
        }
    }
}

impl State {
    /// A hold for `owner`, with no address yet.
    pub fn hold(&self, owner: u64) -> Hold {
        Hold { holds: Arc::clone(&self.holds), owner, addrs: [None, None] }
    }

    /// Takes the first of `candidates` that no other identity holds now, into `hold`'s
    /// `slot` (0 IPv4, 1 IPv6). `None` when every candidate is held by someone else.
    pub fn take_free(&self, hold: &mut Hold, slot: usize, candidates: impl Iterator<Item = IpAddr>) -> Option<IpAddr> {
        let mut map = self.holds.lock();
        for addr in candidates {
            let owners = map.entry(addr).or_default();
            if owners.iter().all(|(o, _)| *o == hold.owner) {
                add(owners, hold.owner);
                hold.addrs[slot] = Some(addr);
                return Some(addr);
            }
        }
        // `or_default` may have left empty entries behind.
        map.retain(|_, owners| !owners.is_empty());
        None
    }

    /// When no address is free: the one of `candidates` with the fewest other identities on
    /// it (then the fewest tunnels), shared, into `hold`'s `slot`.
    pub fn take_least_used(&self, hold: &mut Hold, slot: usize, candidates: &[IpAddr]) -> Option<IpAddr> {
        let mut map = self.holds.lock();
        let load =
            |a: &IpAddr| map.get(a).map_or((0, 0), |o| (o.len(), o.iter().map(|(_, n)| u64::from(*n)).sum::<u64>()));
        let addr = *candidates.iter().min_by_key(|a| load(a))?;
        add(map.entry(addr).or_default(), hold.owner);
        hold.addrs[slot] = Some(addr);
        Some(addr)
    }

    /// Whether an identity other than `owner` holds `addr` now.
    pub fn held_by_other(&self, addr: IpAddr, owner: u64) -> bool {
        self.holds.lock().get(&addr).is_some_and(|o| o.iter().any(|(x, _)| *x != owner))
    }

    /// The live pin under `key`, if any.
    pub fn pinned(&self, key: u64, now: Instant) -> Option<Pin> {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.get(&key).filter(|p| p.expires > now).copied()
    }

    /// Pins `key` to `pin` (replacing an older pin). `false` when the table is full of live
    /// pins.
    pub fn pin(&self, key: u64, pin: Pin, now: Instant) -> bool {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if sessions.len() >= MAX_SESSIONS && !sessions.contains_key(&key) {
            sessions.retain(|_, p| p.expires > now);
            if sessions.len() >= MAX_SESSIONS {
                return false;
            }
        }
        sessions.insert(key, pin);
        true
    }

    /// Addresses held now (for tests).
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.holds.lock().len()
    }
}

fn add(owners: &mut Vec<(u64, u32)>, owner: u64) {
    match owners.iter_mut().find(|(o, _)| *o == owner) {
        Some((_, n)) => *n += 1,
        None => owners.push((owner, 1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_address_is_free_again_when_its_last_tunnel_ends() {
        let state = State::default();
        let list = [ip("192.0.2.1"), ip("192.0.2.2")];
        let mut a1 = state.hold(1);
        let mut a2 = state.hold(1);
        let mut b = state.hold(2);
        assert_eq!(state.take_free(&mut a1, 0, list.iter().copied()), Some(list[0]));
        assert_eq!(state.take_free(&mut a2, 0, list.iter().copied()), Some(list[0]), "the same identity shares");
        assert_eq!(state.take_free(&mut b, 0, list.iter().copied()), Some(list[1]), "another one does not");
        let mut c = state.hold(3);
        assert_eq!(state.take_free(&mut c, 0, list.iter().copied()), None);
        assert_eq!(state.held(), 2, "a failed search leaves no empty entries");
        drop(a1);
        assert!(state.held_by_other(list[0], 3), "identity 1 still has a tunnel there");
        drop(a2);
        assert!(!state.held_by_other(list[0], 3));
        assert_eq!(state.take_free(&mut c, 0, list.iter().copied()), Some(list[0]));
        drop((b, c));
        assert_eq!(state.held(), 0);
    }

    #[test]
    fn exhausted_pools_share_the_least_used_address() {
        let state = State::default();
        let list = [ip("192.0.2.1"), ip("192.0.2.2")];
        let mut holds: Vec<Hold> = (1..=3).map(|o| state.hold(o)).collect();
        state.take_free(&mut holds[0], 0, list.iter().copied());
        state.take_least_used(&mut holds[1], 0, &list);
        state.take_least_used(&mut holds[2], 0, &list);
        assert_eq!(holds[1].addrs[0], Some(list[1]), "the free one first");
        assert_eq!(holds[2].addrs[0], Some(list[0]), "then the least used");
    }

    #[test]
    fn pins_expire_and_the_table_is_bounded() {
        let state = State::default();
        let now = Instant::now();
        let later = now + std::time::Duration::from_secs(10);
        let pin = Pin { v4: Some(Source::Bind(ip("192.0.2.1"))), v6: None, expires: later };
        assert!(state.pin(7, pin, now));
        assert!(state.pinned(7, now).is_some());
        assert!(state.pinned(7, later).is_none(), "expired");
        for k in 0..MAX_SESSIONS as u64 {
            state.pin(1000 + k, pin, now);
        }
        assert!(!state.pin(1, pin, now), "full of live pins");
        assert!(state.pin(1, pin, later + std::time::Duration::from_secs(1)), "expired ones are swept");
    }
}
