//! The stable hash sticky selection is keyed by. Not std's `RandomState`: its keys are drawn
//! per process, and a client must land on the same address after a restart and on every
//! instance that has the same pool. FNV-1a over the identity's bytes, then a SplitMix64
//! finaliser so that `% n` over small pools uses all of the hash.

use crate::limits::ClientKey;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// A hash being built from parts.
#[derive(Clone, Copy)]
pub struct Stable(u64);

impl Stable {
    /// A hash of nothing yet, for one purpose (`domain` keeps, say, a session's hash apart
    /// from a client's with the same bytes).
    pub fn new(domain: u8) -> Stable {
        Stable(FNV_OFFSET).bytes(&[domain])
    }

    /// Adds bytes, then a separator, so ("ab","c") and ("a","bc") differ.
    pub fn part(self, bytes: &[u8]) -> Stable {
        self.bytes(bytes).bytes(&[0xff])
    }

    fn bytes(self, bytes: &[u8]) -> Stable {
        let mut h = self.0;
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(FNV_PRIME);
        }
        Stable(h)
    }

    /// The finished hash.
    pub fn finish(self) -> u64 {
        mix(self.0)
    }
}

/// SplitMix64's finaliser: every input bit reaches every output bit.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A client identity's hash: what sticky selection and isolation know a client by.
pub fn identity(key: &ClientKey) -> u64 {
    match key {
        ClientKey::V4(ip) => Stable::new(4).part(&ip.octets()),
        ClientKey::V6(ip) => Stable::new(6).part(&ip.octets()),
        ClientKey::User(name) => Stable::new(b'u').part(name.as_bytes()),
    }
    .finish()
}

/// A user's session: `user` and the identifier from the user name.
pub fn session(user: &str, id: &str) -> u64 {
    Stable::new(b's').part(user.as_bytes()).part(id.as_bytes()).finish()
}

/// Where a pinned session is kept: the pool's name and the session.
pub fn pin(pool: &str, session: u64) -> u64 {
    Stable::new(b'p').part(pool.as_bytes()).part(&session.to_le_bytes()).finish()
}

/// 128 bits from a 64-bit seed, for drawing from an IPv6 prefix.
pub fn wide(seed: u64) -> u128 {
    (u128::from(mix(seed)) << 64) | u128::from(mix(seed ^ 0x9e37_79b9_7f4a_7c15))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOLDEN_ALICE: u64 = 0xfaf0_caa6_7d38_0673;

    #[test]
    fn the_hash_is_the_same_in_every_process() {
        // Fixed values: a change here moves every sticky client to another address.
        let alice = identity(&ClientKey::User("alice".into()));
        assert_eq!(alice, identity(&ClientKey::User("alice".into())));
        assert_ne!(alice, identity(&ClientKey::User("alicf".into())));
        assert_ne!(session("ab", "c"), session("a", "bc"));
        assert_eq!(alice, GOLDEN_ALICE, "{alice:#x}");
    }
}
