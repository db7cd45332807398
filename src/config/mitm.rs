//! `[mitm]`: the CA, the leaf cache and the upstream trust that `mode = "mitm"` routes need.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, HumanDuration};

/// `[mitm]`: what `mode = "mitm"` routes need.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MitmConfig {
    /// CA certificate (PEM) that signs the minted leaves; made by `veilgate ca init`.
    pub ca_cert: PathBuf,
    /// CA private key (PEM); refused when group or others may read it.
    pub ca_key: PathBuf,
    /// Roots for verifying upstream certificates: `"system"` or a PEM bundle's path.
    #[serde(default = "default_roots")]
    pub upstream_roots: String,
    /// Minted leaves kept in memory.
    #[serde(default = "default_leaf_cache_size")]
    pub leaf_cache_size: usize,
    /// How long a minted leaf is reused; below the leaves' 30-day validity.
    #[serde(default = "default_leaf_cache_ttl")]
    pub leaf_cache_ttl: HumanDuration,
    /// Record the query string of observed request paths (off: it often carries secrets).
    #[serde(default)]
    pub log_query: bool,
}

impl MitmConfig {
    /// The `[mitm]` rules serde cannot express.
    pub(super) fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: String| ConfigError::invalid(origin, key, problem);
        if !(1..=1_000_000).contains(&self.leaf_cache_size) {
            return Err(invalid("mitm.leaf_cache_size", "must be between 1 and 1000000".into()));
        }
        if self.leaf_cache_ttl.0 >= Duration::from_secs(29 * 24 * 3600) || self.leaf_cache_ttl.0.is_zero() {
            return Err(invalid("mitm.leaf_cache_ttl", "must be between 0 and 29 days (leaves live 30)".into()));
        }
        Ok(())
    }
}

fn default_roots() -> String {
    "system".to_string()
}

fn default_leaf_cache_size() -> usize {
    1000
}

fn default_leaf_cache_ttl() -> HumanDuration {
    HumanDuration(Duration::from_secs(24 * 3600))
}
