//! `[limits]` and `[limits.per_client]`: the global and per-client caps, rates and bandwidth.

use std::num::NonZeroU32;

use serde::{Deserialize, Serialize};

use super::{ByteRate, ConfigError};

/// `[limits]`: every limit is optional; absent means unlimited.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Global cap on concurrent tunnels (503 past it).
    pub max_tunnels: Option<u32>,
    /// Global bandwidth, each direction.
    pub bandwidth: Option<ByteRate>,
    /// Limits applied to each client separately.
    pub per_client: PerClientLimits,
}

/// `[limits.per_client]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PerClientLimits {
    /// Concurrent tunnels per client (429 past it).
    pub max_tunnels: Option<u32>,
    /// New tunnels per second per client (GCRA; 429 with Retry-After past it).
    pub new_tunnels_per_second: Option<NonZeroU32>,
    /// Burst for `new_tunnels_per_second`; defaults to the rate itself.
    pub new_tunnels_burst: Option<NonZeroU32>,
    /// Client to origin, shared by all of the client's tunnels.
    pub bandwidth_up: Option<ByteRate>,
    /// Origin to client, shared by all of the client's tunnels.
    pub bandwidth_down: Option<ByteRate>,
    /// An IPv6 client is identified by this prefix so one host cannot mint fresh buckets.
    pub ipv6_prefix: u8,
}

impl LimitsConfig {
    /// The `[limits]` rules serde cannot express, `[limits.per_client]`'s included.
    pub(super) fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: String| ConfigError::invalid(origin, key, problem);
        if self.max_tunnels == Some(0) {
            return Err(invalid("limits.max_tunnels", "0 would refuse every tunnel; remove the key for no cap".into()));
        }
        self.per_client.validate(origin)
    }
}

impl PerClientLimits {
    /// The `[limits.per_client]` rules serde cannot express.
    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: String| ConfigError::invalid(origin, key, problem);
        if self.max_tunnels == Some(0) {
            return Err(invalid(
                "limits.per_client.max_tunnels",
                "0 would refuse every tunnel; remove the key for no cap".into(),
            ));
        }
        if self.new_tunnels_burst.is_some() && self.new_tunnels_per_second.is_none() {
            return Err(invalid(
                "limits.per_client.new_tunnels_burst",
                "needs limits.per_client.new_tunnels_per_second".into(),
            ));
        }
        if !(1..=128).contains(&self.ipv6_prefix) {
            return Err(invalid("limits.per_client.ipv6_prefix", format!("{} is outside 1..=128", self.ipv6_prefix)));
        }
        Ok(())
    }
}

impl Default for PerClientLimits {
    fn default() -> Self {
        PerClientLimits {
            max_tunnels: None,
            new_tunnels_per_second: None,
            new_tunnels_burst: None,
            bandwidth_up: None,
            bandwidth_down: None,
            ipv6_prefix: 64,
        }
    }
}
