//! `[log]`: line format and how much of a client's address logs carry.

use serde::{Deserialize, Serialize};

/// `[log]`
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// How much of the client's address logs may carry.
    pub client_address: ClientAddressLog,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Client address in logs: privacy by default.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClientAddressLog {
    /// Never logged.
    #[default]
    Omit,
    /// IPv4 cut to /24, IPv6 to /48.
    Truncate,
    /// Logged as is.
    Full,
}
