//! Proxy authentication: `Proxy-Authorization: Basic` against a file of bcrypt hashes
//! (`htpasswd -B`).
//!
//! bcrypt is slow on purpose, which makes it a lever for whoever sends credentials. So: a
//! correct header is verified once and then answered from a cache keyed by its SHA-256 (never
//! the header itself); at most a few verifications run at once, each waiting a bounded time
//! for its turn; an unknown user costs the same as a known one (a dummy hash is checked), so
//! timing does not tell which names exist; and failed attempts are never cached.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use dashmap::DashMap;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

/// Most cached successful headers; past it the cache starts over.
const CACHE_MAX: usize = 10_000;
/// Longest header value considered; real Basic credentials are far shorter.
const MAX_HEADER: usize = 1024;
/// How long a request may wait for a verification slot before it is refused.
const VERIFY_WAIT: Duration = Duration::from_secs(5);

/// Loaded credentials.
pub struct Auth {
    users: HashMap<String, String>,
    dummy: String,
    realm: String,
    verified: DashMap<[u8; 32], Arc<str>>,
    slots: Arc<Semaphore>,
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
        // Same cost as the real hashes, so an unknown name takes as long as a wrong password.
        let cost = users.values().next().and_then(|h| h.get(4..6)).and_then(|c| c.parse().ok()).unwrap_or(10);
        let dummy = bcrypt::hash("veilgate-dummy", cost).unwrap_or_default();
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Auth {
            users,
            dummy,
            realm: realm.to_string(),
            verified: DashMap::new(),
            slots: Arc::new(Semaphore::new(cpus)),
        })
    }

    /// The realm for `Proxy-Authenticate`.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// The user named by a valid `Proxy-Authorization` value, or `None`.
    pub async fn check(&self, header: Option<&[u8]>) -> Option<Arc<str>> {
        let header = header.filter(|h| h.len() <= MAX_HEADER)?;
        let digest: [u8; 32] = Sha256::digest(header).into();
        if let Some(user) = self.verified.get(&digest) {
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
        let (hash, known) = match self.users.get(user) {
            Some(h) => (h.clone(), true),
            None => (self.dummy.clone(), false),
        };
        let password = password.to_string();
        let slot = tokio::time::timeout(VERIFY_WAIT, Arc::clone(&self.slots).acquire_owned()).await.ok()?.ok()?;
        let ok = tokio::task::spawn_blocking(move || {
            let ok = bcrypt::verify(password, &hash).unwrap_or(false);
            drop(slot);
            ok
        })
        .await
        .ok()?;
        if !(ok && known) {
            return None;
        }
        let user: Arc<str> = Arc::from(user);
        if self.verified.len() >= CACHE_MAX {
            self.verified.clear();
        }
        self.verified.insert(digest, Arc::clone(&user));
        Some(user)
    }
}
