//! Redis key names. Every key of one client carries the client in a hash tag (`{...}`), so a
//! client's leases, rate and route leases sit in one slot of a Redis Cluster and one script
//! may touch them all atomically. The tag is a stable text for the [`ClientKey`]: addresses
//! in their canonical text, users hashed (a user name may hold any byte, braces included,
//! and need not be stored in Redis in the clear).

use std::fmt::Write;

use sha2::{Digest, Sha256};

use crate::limits::ClientKey;

/// The global leases: one key, one slot (it cannot share a client's; see `cluster` docs).
pub(super) const GLOBAL_CONN: &str = "vg:{global}:conn";
/// Live instances, scored by heartbeat expiry: the N of fail mode `local`.
pub(super) const INSTANCES: &str = "vg:instances";

/// The keys of one client (and route) for one admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ClientKeys {
    /// Sorted set of the client's leases (`vg:{tag}:conn`).
    pub(super) conn: String,
    /// The client's new-tunnel GCRA state (`vg:{tag}:rate`).
    pub(super) rate: String,
    /// Sorted set of the client's leases on a route with a cap (`vg:{tag}:route:<hash>:conn`).
    pub(super) route: Option<String>,
}

impl ClientKeys {
    pub(super) fn new(client: &ClientKey, route: Option<&str>) -> ClientKeys {
        let tag = tag(client);
        ClientKeys {
            conn: format!("vg:{{{tag}}}:conn"),
            rate: format!("vg:{{{tag}}}:rate"),
            route: route.map(|r| format!("vg:{{{tag}}}:route:{}:conn", hex16(r.as_bytes()))),
        }
    }
}

/// A client's fleet-wide byte bucket for one direction (`vg:{tag}:bw:up|down`).
pub(super) fn bandwidth(client: &ClientKey, dir: crate::limits::Direction) -> String {
    format!("vg:{{{}}}:bw:{}", tag(client), dir.as_str())
}

/// The hash tag's text: `v4:ADDR`, `v6:PREFIX-ADDR`, or `u:` and the first 16 bytes of the
/// user's SHA-256 in hex. The prefixes keep the three apart and away from `global`.
pub(super) fn tag(client: &ClientKey) -> String {
    match client {
        ClientKey::V4(a) => format!("v4:{a}"),
        ClientKey::V6(a) => format!("v6:{a}"),
        ClientKey::User(u) => format!("u:{}", hex16(u.as_bytes())),
    }
}

fn hex16(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(32);
    for b in &digest[..16] {
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn keys_are_stable_tagged_and_escape_users() {
        let k = ClientKeys::new(&ClientKey::V4("10.1.2.3".parse().unwrap()), None);
        assert_eq!(k.conn, "vg:{v4:10.1.2.3}:conn");
        assert_eq!(k.rate, "vg:{v4:10.1.2.3}:rate");
        assert_eq!(k.route, None);
        let v6 = ClientKey::from_ip("2001:db8:1:2::9".parse().unwrap(), 64);
        assert_eq!(tag(&v6), "v6:2001:db8:1:2::");
        let evil = ClientKey::User(Arc::from("a}b{c:\u{0}\n"));
        let t = tag(&evil);
        assert!(t.starts_with("u:") && t.len() == 34 && t[2..].bytes().all(|b| b.is_ascii_hexdigit()), "{t}");
        assert_eq!(t, tag(&ClientKey::User(Arc::from("a}b{c:\u{0}\n"))), "stable");
        let r = ClientKeys::new(&evil, Some("*.a.example,b.example")).route.unwrap();
        assert!(r.starts_with(&format!("vg:{{{t}}}:route:")) && r.ends_with(":conn"), "{r}");
    }
}
