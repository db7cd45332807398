//! `[auth]`: proxy authentication and the bound on the bcrypt work it may cost.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, HumanDuration};

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
    /// `[auth.sessions]`: egress parameters in the user name (`alice-session-abc123`).
    #[serde(default)]
    pub sessions: SessionsConfig,
}

/// `[auth.sessions]`: the convention of commercial rotating proxies, opt-in. With it a user
/// name is `USER[SEP KEY [SEP VALUE]]...`: `alice-session-abc123` authenticates as `alice`
/// (the password is alice's, limits are alice's) and pins session `abc123` to one egress
/// address for `session_ttl`; `alice-rotate` draws a fresh one. Any other parameter is
/// refused (407, `auth_session_param`), never ignored, so a typo does not silently share an
/// address the client meant to keep apart.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    /// Off by default: without it a user name is taken whole.
    pub enabled: bool,
    /// Between the user and each parameter. User names may not contain it.
    pub separator: String,
    /// The key before a session identifier.
    pub session_key: String,
    /// The key that draws a fresh address (and re-pins the session, if one is named).
    pub rotate_key: String,
    /// How long a session keeps its address after it was pinned.
    pub session_ttl: HumanDuration,
}

impl Default for SessionsConfig {
    fn default() -> SessionsConfig {
        SessionsConfig {
            enabled: false,
            separator: "-".into(),
            session_key: "session".into(),
            rotate_key: "rotate".into(),
            session_ttl: HumanDuration(Duration::from_secs(600)),
        }
    }
}

impl AuthConfig {
    /// The `[auth]` rules serde cannot express.
    pub(super) fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: String| ConfigError::invalid(origin, key, problem);
        if self.realm.contains('"') || self.realm.chars().any(|c| c.is_control()) {
            return Err(invalid("auth.realm", "may not contain quotes or control characters".into()));
        }
        let s = &self.sessions;
        // Basic credentials end the user name at the first ':'; an alphanumeric separator
        // would cut ordinary names apart.
        if s.separator.is_empty()
            || s.separator.len() > 4
            || s.separator.chars().any(|c| c == ':' || c.is_alphanumeric() || c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                "auth.sessions.separator",
                "1 to 4 characters, none of them a letter, digit, ':' or whitespace".into(),
            ));
        }
        for (key, value) in [("auth.sessions.session_key", &s.session_key), ("auth.sessions.rotate_key", &s.rotate_key)]
        {
            if value.is_empty() || value.contains(s.separator.as_str()) || value.contains(':') {
                return Err(invalid(key, "non-empty, without the separator or ':'".into()));
            }
        }
        if s.session_key == s.rotate_key {
            return Err(invalid("auth.sessions.rotate_key", "must differ from session_key".into()));
        }
        super::check_timeout(origin, "auth.sessions.session_ttl", s.session_ttl)?;
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
