//! Proxy authentication: `Proxy-Authorization: Basic` against a file of bcrypt hashes
//! (`htpasswd -B`). The password is checked once per distinct header value; later tunnels
//! with the same header are answered from a small cache, so bcrypt's deliberate slowness
//! does not become a per-tunnel cost or a CPU lever for clients that authenticate correctly.
//! Failed attempts are never cached.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use base64::Engine;
use dashmap::DashMap;

/// Most cached successful header values; past it the cache starts over.
const CACHE_MAX: usize = 10_000;

/// Loaded credentials.
pub struct Auth {
    users: HashMap<String, String>,
    realm: String,
    verified: DashMap<Vec<u8>, Arc<str>>,
}

/// A credentials file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file cannot be read.
    #[error("auth.credentials_file {path}: {source}")]
    Read {
        /// Path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not `user:bcrypt-hash`.
    #[error("auth.credentials_file {path}: line {line}: {problem}")]
    Line {
        /// Path.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong (never the hash itself).
        problem: &'static str,
    },
}

impl Auth {
    /// Loads `user:hash` lines; blank lines and `#` comments are skipped.
    pub fn load(path: &Path, realm: &str) -> Result<Auth, AuthError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read { path: shown.clone(), source })?;
        let mut users = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |problem| AuthError::Line { path: shown.clone(), line: i + 1, problem };
            let (user, hash) = line.split_once(':').ok_or_else(|| bad("expected user:hash"))?;
            if user.is_empty() {
                return Err(bad("empty user name"));
            }
            if !(hash.starts_with("$2a$") || hash.starts_with("$2b$") || hash.starts_with("$2y$")) {
                return Err(bad("only bcrypt hashes ($2y$, $2b$, $2a$) are accepted; create them with htpasswd -B"));
            }
            users.insert(user.to_string(), hash.to_string());
        }
        Ok(Auth { users, realm: realm.to_string(), verified: DashMap::new() })
    }

    /// The realm for `Proxy-Authenticate`.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// The user named by a valid `Proxy-Authorization` value, or `None`.
    pub async fn check(&self, header: Option<&[u8]>) -> Option<Arc<str>> {
        let header = header?;
        if let Some(user) = self.verified.get(header) {
            return Some(Arc::clone(user.value()));
        }
        let text = std::str::from_utf8(header).ok()?.trim();
        let (scheme, b64) = text.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (user, password) = decoded.split_once(':')?;
        let hash = self.users.get(user)?.clone();
        let password = password.to_string();
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false)).await.ok()?;
        if !ok {
            return None;
        }
        let user: Arc<str> = Arc::from(user);
        if self.verified.len() >= CACHE_MAX {
            self.verified.clear();
        }
        self.verified.insert(header.to_vec(), Arc::clone(&user));
        Some(user)
    }
}
