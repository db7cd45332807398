//! `[policy]`: which ports, names and addresses a CONNECT may reach.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{ConfigError, PortRange};
use crate::policy::pattern::HostPattern;

/// `[policy]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Ports a CONNECT may name; a port or `"FIRST-LAST"`.
    pub allowed_ports: Vec<PortRange>,
    /// Deny loopback, private, CGNAT, link-local, ULA, multicast and IPv4-embedding forms.
    pub deny_private: bool,
    /// When not empty, only names matching one of these may be reached.
    pub allow_hosts: Vec<HostPattern>,
    /// Names never reached.
    pub deny_hosts: Vec<HostPattern>,
    /// When not empty, only addresses inside these are reached; they are exempt from
    /// `deny_private`, so this is how an operator opens one internal range on purpose.
    pub allow_cidrs: Vec<IpNet>,
    /// Addresses never reached, whatever else says.
    pub deny_cidrs: Vec<IpNet>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            allowed_ports: vec![PortRange { start: 443, end: 443 }],
            deny_private: true,
            allow_hosts: Vec::new(),
            deny_hosts: Vec::new(),
            allow_cidrs: Vec::new(),
            deny_cidrs: Vec::new(),
        }
    }
}

impl PolicyConfig {
    /// The `[policy]` rules serde cannot express.
    pub(super) fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: String| ConfigError::invalid(origin, key, problem);
        if self.allowed_ports.is_empty() {
            return Err(invalid("policy.allowed_ports", "at least one port is needed, e.g. [443]".into()));
        }
        Ok(())
    }
}
