//! `[[routes]]`: per-destination mode and limits.

use serde::{Deserialize, Serialize};

use super::{ByteRate, ConfigError};
use crate::policy::pattern::HostPattern;

/// What veilgate does with a destination.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Blind byte relay: the default.
    #[default]
    Tunnel,
    /// Terminate TLS with a minted leaf, re-originate verified TLS upstream, observe.
    Mitm,
    /// Refuse with 403.
    Deny,
}

impl Mode {
    /// Metric and log label.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Tunnel => "tunnel",
            Mode::Mitm => "mitm",
            Mode::Deny => "deny",
        }
    }
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Destinations this route covers.
    pub hosts: Vec<HostPattern>,
    /// What to do with them.
    #[serde(default)]
    pub mode: Mode,
    /// Per-client limits for these destinations, counted apart from the client's others.
    #[serde(default)]
    pub per_client: Option<RouteLimits>,
    /// The `[[upstreams]]` or `[[upstream_groups]]` entry these destinations go through;
    /// none: veilgate dials them itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// The `[[egress.pools]]` entry these destinations leave from (else `egress.default_pool`).
    #[serde(default)]
    pub egress: Option<String>,
}

impl RouteConfig {
    /// The route's identity: its normalised patterns. Per-route limit state is keyed by it,
    /// so reordering routes on reload does not hand one route's counts to another.
    pub fn key(&self) -> String {
        self.hosts.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
    }

    /// The rules for one `[[routes]]` entry serde cannot express; `i` is its place in the
    /// list, which the key in the message names.
    pub(super) fn validate(&self, origin: &str, i: usize) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: String| ConfigError::invalid(origin, key, problem);
        if self.hosts.is_empty() {
            return Err(invalid(&format!("routes[{i}].hosts"), "a route needs at least one host pattern".into()));
        }
        if let Some(rl) = &self.per_client {
            if rl.max_tunnels == Some(0) {
                return Err(invalid(
                    &format!("routes[{i}].per_client.max_tunnels"),
                    "0 would refuse every tunnel; use mode = \"deny\"".into(),
                ));
            }
        }
        Ok(())
    }
}

/// `[routes.per_client]`: limits a route sets for its own destinations.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RouteLimits {
    /// Concurrent tunnels per client to this route's destinations.
    pub max_tunnels: Option<u32>,
    /// Client to origin, per client, for this route.
    pub bandwidth_up: Option<ByteRate>,
    /// Origin to client, per client, for this route.
    pub bandwidth_down: Option<ByteRate>,
}
