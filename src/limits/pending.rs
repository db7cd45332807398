//! Connections still sending their CONNECT head. They are not tunnels yet, so the tunnel
//! caps do not see them; without a bound of their own, one host could hold thousands of
//! half-sent heads (each up to `header_timeout`) and exhaust descriptors for everyone.
//!
//! The bound must tell a slowloris from a burst. A NAT or a load tester opening 2,000
//! tunnels at once has 2,000 connections in their head phase for a few microseconds each;
//! a slowloris holds each one for seconds. So a head counts against the per-client bound
//! (`max_pending_per_client`) only once it is *late*: still incomplete after
//! `server.head_grace`. A client at its bound of late heads has its next late head closed
//! (429), while the heads it completes in time are never refused by this module. What a
//! client can hold within the grace is bounded too: no client may take more than half of
//! the global bound (`max_pending`), so a flood from one source cannot turn everyone else
//! away at accept.
//!
//! Clients are keyed like every other limit ([`ClientKey`]: IPv4 address, IPv6 prefix), so
//! the addresses of one /64 cannot each take a bound of their own.

use std::sync::Arc;

use dashmap::DashMap;

use super::ClientKey;
use super::conns::{Slot, Slots};

/// Global and per-client counts of connections in their head phase.
#[derive(Default)]
pub struct Pending {
    global: Arc<Slots>,
    per_client: Arc<DashMap<ClientKey, Counts>>,
}

/// One client's connections in their head phase: all of them, and the late ones.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    all: u32,
    late: u32,
}

/// Why a connection was turned away in its head phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingRefusal {
    /// `server.max_pending` reached.
    Global,
    /// This client holds half of `server.max_pending` already.
    ClientShare,
    /// This client has `server.max_pending_per_client` late heads already.
    ClientLate,
}

impl Pending {
    /// Counts one more connection of `client` at accept, or says which bound it would cross.
    pub fn enter(&self, client: ClientKey, global_cap: u32) -> Result<PendingPermit, PendingRefusal> {
        let global = self.global.try_acquire(Some(global_cap)).ok_or(PendingRefusal::Global)?;
        let share = (global_cap / 2).max(1);
        {
            let mut n = self.per_client.entry(client.clone()).or_default();
            if n.all >= share {
                return Err(PendingRefusal::ClientShare);
            }
            n.all += 1;
        }
        Ok(PendingPermit { _global: global, per_client: Arc::clone(&self.per_client), client, late: false })
    }

    /// Connections in their head phase now.
    pub fn count(&self) -> u32 {
        self.global.active()
    }

    /// Late heads of `client` now.
    pub fn late_for(&self, client: &ClientKey) -> u32 {
        self.per_client.get(client).map_or(0, |n| n.late)
    }
}

/// One connection in its head phase; dropping it ends that phase.
pub struct PendingPermit {
    _global: Slot,
    per_client: Arc<DashMap<ClientKey, Counts>>,
    client: ClientKey,
    late: bool,
}

impl PendingPermit {
    /// The head is still incomplete after the grace: count it against the client's bound of
    /// late heads (`cap`), or refuse it when the client is at that bound.
    pub fn late(&mut self, cap: u32) -> Result<(), PendingRefusal> {
        if self.late {
            return Ok(());
        }
        let mut n = self.per_client.entry(self.client.clone()).or_default();
        if n.late >= cap {
            return Err(PendingRefusal::ClientLate);
        }
        n.late += 1;
        self.late = true;
        Ok(())
    }
}

impl Drop for PendingPermit {
    fn drop(&mut self) {
        if let Some(mut n) = self.per_client.get_mut(&self.client) {
            n.all = n.all.saturating_sub(1);
            if self.late {
                n.late = n.late.saturating_sub(1);
            }
        }
        self.per_client.remove_if(&self.client, |_, n| n.all == 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> ClientKey {
        ClientKey::from_ip(s.parse().unwrap(), 64)
    }

    #[test]
    fn only_late_heads_meet_the_per_client_bound() {
        let p = Pending::default();
        let a = key("127.0.0.2");
        let mut heads: Vec<PendingPermit> = (0..100).map(|_| p.enter(a.clone(), 1000).unwrap()).collect();
        assert_eq!(p.count(), 100, "a burst is not refused");
        assert!(heads[0].late(2).is_ok());
        assert!(heads[0].late(2).is_ok(), "counted once");
        assert!(heads[1].late(2).is_ok());
        assert_eq!(heads[2].late(2), Err(PendingRefusal::ClientLate));
        assert_eq!(p.late_for(&a), 2);
        assert!(p.enter(key("127.0.0.3",), 1000).unwrap().late(2).is_ok(), "another client has its own bound");
        heads.remove(0);
        assert_eq!(p.late_for(&a), 1);
        assert!(heads[1].late(2).is_ok(), "a slot freed by a late head that ended");
        drop(heads);
        assert_eq!(p.count(), 0);
        assert!(p.per_client.is_empty(), "a client with nothing pending is forgotten");
    }

    #[test]
    fn global_bound_and_one_clients_share_of_it() {
        let p = Pending::default();
        let (a, b) = (key("127.0.0.2"), key("127.0.0.3"));
        let _a: Vec<_> = (0..5).map(|_| p.enter(a.clone(), 10).unwrap()).collect();
        assert_eq!(p.enter(a.clone(), 10).err(), Some(PendingRefusal::ClientShare));
        let _b: Vec<_> = (0..5).map(|_| p.enter(b.clone(), 10).unwrap()).collect();
        assert_eq!(p.enter(key("127.0.0.4"), 10).err(), Some(PendingRefusal::Global));
        assert_eq!(p.count(), 10);
    }

    #[test]
    fn one_ipv6_prefix_is_one_client() {
        let p = Pending::default();
        let mut one = p.enter(key("2001:db8::1"), 100).unwrap();
        let mut two = p.enter(key("2001:db8::2"), 100).unwrap();
        assert!(one.late(1).is_ok());
        assert_eq!(two.late(1), Err(PendingRefusal::ClientLate), "the same /64");
        assert!(p.enter(key("2001:db8:0:1::1"), 100).unwrap().late(1).is_ok(), "another /64");
    }
}
