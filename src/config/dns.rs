//! `[dns]`: the resolvers, the static host entries and the lookup deadline.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, HumanDuration, check_timeout};
use crate::policy::pattern::HostPattern;

/// `[dns]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Resolvers to ask (UDP then TCP). Empty: the system's resolver configuration.
    pub servers: Vec<SocketAddr>,
    /// Static entries answered without a query: name to one address or a list.
    pub hosts: BTreeMap<String, HostAddrs>,
    /// Deadline for one name lookup; past it, 502.
    pub timeout: HumanDuration,
    /// Entries in the resolver's cache.
    pub cache_size: u64,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            servers: Vec::new(),
            hosts: BTreeMap::new(),
            timeout: HumanDuration(Duration::from_secs(5)),
            cache_size: 4096,
        }
    }
}

impl DnsConfig {
    /// The `[dns]` rules serde cannot express.
    pub(super) fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: String| ConfigError::invalid(origin, key, problem);
        check_timeout(origin, "dns.timeout", self.timeout)?;
        if let Some(a) = self.servers.iter().find(|a| a.port() == 0) {
            return Err(invalid("dns.servers", format!("{a} has port 0")));
        }
        for name in self.hosts.keys() {
            if HostPattern::parse(name).map(|p| !matches!(p, HostPattern::Exact(_))).unwrap_or(true) {
                return Err(invalid("dns.hosts", format!("{name:?} is not a host name")));
            }
        }
        Ok(())
    }
}

/// A static `[dns] hosts` value: one address or several.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum HostAddrs {
    /// `"127.0.0.1"`
    One(IpAddr),
    /// `["127.0.0.1", "::1"]`
    Many(Vec<IpAddr>),
}

impl HostAddrs {
    /// The addresses in order.
    pub fn to_vec(&self) -> Vec<IpAddr> {
        match self {
            HostAddrs::One(ip) => vec![*ip],
            HostAddrs::Many(ips) => ips.clone(),
        }
    }
}
