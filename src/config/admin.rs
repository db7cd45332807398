//! `[admin]`: what the admin listener offers beyond health and metrics.

use serde::{Deserialize, Serialize};

/// `[admin]`
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `GET /clients` and `GET /tunnels` (JSON, paginated) on the admin listener, and the
    /// per-tunnel byte counts behind them. Off by default: the admin listener is often
    /// reachable by more people than should see who uses the proxy, and off costs nothing.
    pub inspect: bool,
}
