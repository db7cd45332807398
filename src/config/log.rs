//! `[log]`: line format and how much of a client's address logs carry.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[log]`
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// How much of the client's address logs may carry.
    pub client_address: ClientAddressLog,
    /// Which events are logged, as an env-filter (`info`, `warn,veilgate=debug`). When set it
    /// replaces `VEILGATE_LOG`, so a SIGHUP can change the level of a running proxy; unset,
    /// `VEILGATE_LOG` (or `info`) applies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
}

impl LogConfig {
    pub(super) fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        if let Some(level) = &self.level {
            tracing_subscriber::EnvFilter::builder().parse(level).map_err(|e| {
                ConfigError::invalid(
                    origin,
                    "log.level",
                    format!("{level:?} is not an env-filter (such as \"info\" or \"warn,veilgate=debug\"): {e}"),
                )
            })?;
        }
        Ok(())
    }
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
