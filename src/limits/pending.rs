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
        let mut permit = self.enter_unknown(global_cap)?;
        permit.identify(client, global_cap)?;
        Ok(permit)
    }

    /// Counts one more connection whose client is not known yet (a PROXY protocol header is
    /// still to come: the peer is the balancer, whom no client bound should charge). Only the
    /// global bound applies until [`PendingPermit::identify`].
    pub fn enter_unknown(&self, global_cap: u32) -> Result<PendingPermit, PendingRefusal> {
        let global = self.global.try_acquire(Some(global_cap)).ok_or(PendingRefusal::Global)?;
        Ok(PendingPermit { _global: global, per_client: Arc::clone(&self.per_client), client: None, late: false })
    }

    /// Connections in their head phase now.
    pub fn count(&self) -> u32 {
        self.global.active()
    }

    /// Connections of `client` in their head phase now (those whose client is known).
    pub fn for_client(&self, client: &ClientKey) -> u32 {
        self.per_client.get(client).map_or(0, |n| n.all)
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
    /// `None` until the client is known.
    client: Option<ClientKey>,
    late: bool,
}

impl PendingPermit {
    /// The connection's client is `client` now: count the connection against its share of
    /// `global_cap`, or say it is over it (the permit stays unidentified then).
    pub fn identify(&mut self, client: ClientKey, global_cap: u32) -> Result<(), PendingRefusal> {
        debug_assert!(self.client.is_none(), "a connection has one client");
        let share = (global_cap / 2).max(1);
        {
            let mut n = self.per_client.entry(client.clone()).or_default();
            if n.all >= share {
                return Err(PendingRefusal::ClientShare);
            }
            n.all += 1;
        }
        self.client = Some(client);
        Ok(())
    }

    /// The head is still incomplete after the grace: count it against the client's bound of
    /// late heads (`cap`), or refuse it when the client is at that bound.
    pub fn late(&mut self, cap: u32) -> Result<(), PendingRefusal> {
        // A head is only read once its client is known, so an unknown client has no head yet.
        let Some(client) = &self.client else { return Ok(()) };
        if self.late {
            return Ok(());
        }
        let mut n = self.per_client.entry(client.clone()).or_default();
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
        let Some(client) = &self.client else { return };
        if let Some(mut n) = self.per_client.get_mut(client) {
            n.all = n.all.saturating_sub(1);
            if self.late {
                n.late = n.late.saturating_sub(1);
            }
        }
        self.per_client.remove_if(client, |_, n| n.all == 0);
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
    fn a_client_learned_later_takes_its_share_then() {
        let p = Pending::default();
        let a = key("127.0.0.2");
        let mut unknown: Vec<PendingPermit> = (0..4).map(|_| p.enter_unknown(6).unwrap()).collect();
        assert_eq!(p.count(), 4);
        assert!(p.per_client.is_empty(), "no client is charged before it is known");
        assert!(unknown[0].late(1).is_ok(), "nothing to be late for yet");
        assert!(unknown[0].identify(a.clone(), 6).is_ok());
        assert!(unknown[1].identify(a.clone(), 6).is_ok());
        assert!(unknown[2].identify(a.clone(), 6).is_ok());
        assert_eq!(unknown[3].identify(a.clone(), 6), Err(PendingRefusal::ClientShare), "half of 6");
        assert!(unknown[0].late(1).is_ok());
        assert_eq!(unknown[1].late(1), Err(PendingRefusal::ClientLate));
        assert_eq!(p.enter_unknown(6).map(drop), Ok(()));
        let _more: Vec<_> = (0..2).map(|_| p.enter_unknown(6).unwrap()).collect();
        assert_eq!(p.enter_unknown(6).err(), Some(PendingRefusal::Global));
        unknown.clear();
        assert_eq!(p.late_for(&a), 0);
        assert!(p.per_client.is_empty());
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
