//! `[auth]`: proxy authentication and the bound on the bcrypt work it may cost.

use std::num::NonZeroU32;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[auth]`: with it, every client must send `Proxy-Authorization: Basic`, and per-client
/// limits are keyed by user instead of address.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// htpasswd-style file of `user:bcrypt-hash` lines.
    pub credentials_file: PathBuf,
    /// Realm named in `Proxy-Authenticate`.
    #[serde(default = "default_realm")]
    pub realm: String,
    /// Attempts that need a bcrypt hash (credentials no cache knows), per client address per
    /// second (GCRA); past it and the burst, 429 + Retry-After and no hash. Always on: bcrypt
    /// is slow on purpose, so unbounded attempts are a way to keep real users out.
    #[serde(default = "default_attempts_per_second")]
    pub attempts_per_second: NonZeroU32,
    /// Burst for `attempts_per_second`.
    #[serde(default = "default_attempts_burst")]
    pub attempts_burst: NonZeroU32,
    /// Take credentials only on TLS listeners: a plaintext listener answers 403 and never
    /// sends a 407 challenge, so a misconfigured client never sends a password in the clear.
    #[serde(default)]
    pub require_tls: bool,
}

impl AuthConfig {
    /// The `[auth]` rules serde cannot express.
    pub(super) fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: String| ConfigError::invalid(origin, key, problem);
        if self.realm.contains('"') || self.realm.chars().any(|c| c.is_control()) {
            return Err(invalid("auth.realm", "may not contain quotes or control characters".into()));
        }
        Ok(())
    }
}

fn default_realm() -> String {
    "veilgate".to_string()
}

fn default_attempts_per_second() -> NonZeroU32 {
    NonZeroU32::new(5).unwrap_or(NonZeroU32::MIN)
}

fn default_attempts_burst() -> NonZeroU32 {
    NonZeroU32::new(20).unwrap_or(NonZeroU32::MIN)
}
