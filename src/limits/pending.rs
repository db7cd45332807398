//! Connections still sending their CONNECT head. They are not tunnels yet, so the tunnel
//! caps do not see them; without a bound of their own, one host could hold thousands of
//! half-sent heads (each up to `header_timeout`) and exhaust descriptors for everyone.

use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;

use super::conns::{Gauge, GaugePermit};

/// Global and per-address counts of connections in their head phase.
#[derive(Default)]
pub struct Pending {
    global: Arc<Gauge>,
    per_ip: Arc<DashMap<IpAddr, u32>>,
}

/// Why a connection was turned away before its head was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingRefusal {
    /// `server.max_pending` reached.
    Global,
    /// `server.max_pending_per_client` reached for this address.
    Client,
}

impl Pending {
    /// Counts one more connection from `ip`, or says which bound it would cross.
    pub fn enter(&self, ip: IpAddr, global_cap: u32, per_ip_cap: u32) -> Result<PendingPermit, PendingRefusal> {
        let global = self.global.try_acquire(Some(global_cap)).ok_or(PendingRefusal::Global)?;
        let ip = ip.to_canonical();
        {
            let mut n = self.per_ip.entry(ip).or_insert(0);
            if *n >= per_ip_cap {
                drop(n);
                self.per_ip.remove_if(&ip, |_, v| *v == 0);
                return Err(PendingRefusal::Client);
            }
            *n += 1;
        }
        Ok(PendingPermit { _global: global, per_ip: Arc::clone(&self.per_ip), ip })
    }

    /// Connections in their head phase now.
    pub fn count(&self) -> u32 {
        self.global.active()
    }
}

/// One connection in its head phase; dropping it ends that phase.
pub struct PendingPermit {
    _global: GaugePermit,
    per_ip: Arc<DashMap<IpAddr, u32>>,
    ip: IpAddr,
}

impl Drop for PendingPermit {
    fn drop(&mut self) {
        if let Some(mut n) = self.per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
        }
        self.per_ip.remove_if(&self.ip, |_, v| *v == 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_and_release() {
        let p = Pending::default();
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let a1 = p.enter(a, 3, 2).unwrap();
        let _a2 = p.enter(a, 3, 2).unwrap();
        assert_eq!(p.enter(a, 3, 2).err(), Some(PendingRefusal::Client));
        let _b1 = p.enter(b, 3, 2).unwrap();
        assert_eq!(p.enter(b, 3, 2).err(), Some(PendingRefusal::Global));
        drop(a1);
        assert!(p.enter(a, 4, 2).is_ok());
        drop(_b1);
        assert!(!p.per_ip.contains_key(&b), "an address with nothing pending is forgotten");
    }
}
