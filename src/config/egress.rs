//! `[egress]`: the source addresses tunnels leave from (`[[egress.pools]]`), which pool a
//! route uses when it names none (`default_pool`). With no pools, tunnels leave from the
//! address the kernel picks, as before this section existed.

use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Shortest IPv6 prefix host part worth drawing from: a /120 still leaves 256 addresses.
const MAX_V6_PREFIX_LEN: u8 = 120;
/// Same for IPv4: a /30 leaves 4.
const MAX_V4_PREFIX_LEN: u8 = 30;

/// `[egress]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// The pool for tunnels whose route names none (`routes.egress`), if any.
    pub default_pool: Option<String>,
    /// The pools, by name.
    pub pools: Vec<PoolConfig>,
}

/// How a pool picks an address for a tunnel.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Select {
    /// A different address for each tunnel (round robin over `addresses`, random from `prefix`).
    #[default]
    Rotate,
    /// One address per client identity, by a stable hash: the same after a restart and on
    /// every instance with the same pool.
    Sticky,
}

/// What a pool does for a target whose address family it has no source for.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum FamilyFallback {
    /// Refuse with 502 (`egress_family`): the tunnel never leaves from an address the
    /// operator did not choose.
    #[default]
    Refuse,
    /// Leave from whatever address the kernel picks for that family.
    Direct,
}

/// One `[[egress.pools]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Name routes refer to; also the `pool` label of the egress metrics.
    pub name: String,
    /// Source addresses, IPv4 and/or IPv6; each must be configured on the host.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// A prefix to draw source addresses from (bound with IP_FREEBIND / IPV6_FREEBIND); the
    /// host needs a local route for it (`ip -6 route add local PREFIX dev lo`). Its family may
    /// not also have `addresses`.
    #[serde(default)]
    pub prefix: Option<IpNet>,
    /// `rotate` (default) or `sticky`.
    #[serde(default)]
    pub select: Select,
    /// Two client identities never share an address at the same time while the pool has a
    /// free one.
    #[serde(default)]
    pub isolate: bool,
    /// For a target of a family the pool has no source for: `refuse` (502, default) or `direct`.
    #[serde(default)]
    pub family_fallback: FamilyFallback,
}

impl EgressConfig {
    /// The `[egress]` rules serde cannot express.
    pub(super) fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: String, problem: String| ConfigError::invalid(origin, &key, problem);
        let mut names = HashSet::new();
        for (i, p) in self.pools.iter().enumerate() {
            let key = |k: &str| format!("egress.pools[{i}].{k}");
            if p.name.is_empty()
                || p.name.len() > 64
                || !p.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(invalid(key("name"), "1 to 64 characters of A-Z, a-z, 0-9, '-' and '_'".into()));
            }
            if !names.insert(p.name.as_str()) {
                return Err(invalid(key("name"), format!("{:?} names two pools", p.name)));
            }
            if p.addresses.is_empty() && p.prefix.is_none() {
                return Err(invalid(key("addresses"), "a pool needs addresses, a prefix, or both".into()));
            }
            let mut seen = HashSet::new();
            for a in &p.addresses {
                if a.is_unspecified() || a.is_multicast() || a.to_canonical() != *a {
                    return Err(invalid(
                        key("addresses"),
                        format!("{a} is not a source address (unspecified, multicast or IPv4-mapped)"),
                    ));
                }
                if !seen.insert(*a) {
                    return Err(invalid(key("addresses"), format!("{a} is listed twice")));
                }
            }
            if let Some(net) = p.prefix {
                let (longest, v6) = match net {
                    IpNet::V4(_) => (MAX_V4_PREFIX_LEN, false),
                    IpNet::V6(_) => (MAX_V6_PREFIX_LEN, true),
                };
                if net.prefix_len() > longest {
                    return Err(invalid(key("prefix"), format!("at most /{longest}: too few addresses to draw from")));
                }
                if p.addresses.iter().any(|a| a.is_ipv6() == v6) {
                    return Err(invalid(
                        key("prefix"),
                        "a pool draws one family from either addresses or a prefix, not both".into(),
                    ));
                }
            }
        }
        if let Some(name) = &self.default_pool {
            if !names.contains(name.as_str()) {
                return Err(invalid("egress.default_pool".into(), format!("no pool is named {name:?}")));
            }
        }
        Ok(())
    }

    /// Whether a pool of this name exists (for `routes.egress`).
    pub fn has_pool(&self, name: &str) -> bool {
        self.pools.iter().any(|p| p.name == name)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn err(text: &str) -> String {
        Config::from_toml(text, "t.toml").unwrap_err().to_string()
    }

    #[test]
    fn pools_are_checked_naming_the_key() {
        let pool = "[[egress.pools]]\nname = \"p\"\naddresses = [\"127.0.0.51\"]\n";
        assert!(Config::from_toml(pool, "t").is_ok());
        assert!(err("[[egress.pools]]\nname = \"p\"\n").contains("egress.pools[0].addresses"));
        assert!(err(&format!("{pool}{pool}")).contains("egress.pools[1].name"));
        assert!(err("[[egress.pools]]\nname = \"a b\"\naddresses = [\"127.0.0.1\"]").contains("egress.pools[0].name"));
        assert!(err("[[egress.pools]]\nname = \"p\"\naddresses = [\"0.0.0.0\"]").contains("addresses"));
        assert!(err("[[egress.pools]]\nname = \"p\"\naddresses = [\"::ffff:127.0.0.1\"]").contains("IPv4-mapped"));
        assert!(err("[[egress.pools]]\nname = \"p\"\nprefix = \"2001:db8::/124\"").contains("egress.pools[0].prefix"));
        assert!(
            err("[[egress.pools]]\nname = \"p\"\naddresses = [\"::1\"]\nprefix = \"2001:db8::/48\"")
                .contains("not both")
        );
        assert!(err("[[egress.pools]]\nname = \"p\"\naddresses = [\"::1\"]\nselect = \"random\"").contains("select"));
        assert!(err(&format!("[egress]\ndefault_pool = \"q\"\n{pool}")).contains("egress.default_pool"));
        assert!(
            err(&format!("{pool}[[routes]]\nhosts = [\"a.example\"]\negress = \"q\"\n")).contains("routes[0].egress")
        );
    }
}
