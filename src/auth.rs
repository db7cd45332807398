//! Proxy authentication: `Proxy-Authorization: Basic` against a file of bcrypt hashes
//! (`htpasswd -B`).
//!
//! bcrypt is slow on purpose, which makes it a lever for whoever sends credentials, with or
//! without a right to. So a hash is computed only when nothing cheaper can answer, and the
//! hashes a client can cause are bounded:
//! - a header verified before is answered from a cache keyed by its SHA-256 (never the header
//!   itself), and a header that failed within [`FAILED_TTL`] is refused from a second one;
//! - a client address may cause `auth.attempts_per_second` hashes (burst `attempts_burst`),
//!   counted before the hash: past that it gets 429 and no hash;
//! - the hashes run on a few verification slots (`slots`), of which one client holds at most
//!   half, and a request that gets none within [`VERIFY_WAIT`] is told the proxy is busy
//!   (503), never that its password is wrong;
//! - an unknown user costs as much as the most expensive known one (a dummy hash at the
//!   highest cost in the file), so timing does not tell which names exist.

mod slots;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use dashmap::DashMap;
use sha2::{Digest, Sha256};

use crate::config::SessionsConfig;
use crate::egress::Ask;
use crate::limits::{ClientKey, Governor};
use slots::Slots;

/// Most cached successful headers; past it the cache starts over.
const CACHE_MAX: usize = 10_000;
/// Most cached failed headers; past it expired ones go, then all.
const FAILED_MAX: usize = 10_000;
/// How long a failed header is refused without a second hash. Short, because the cache is
/// for hammering, and a user who fixes a typo sends a different header anyway.
pub const FAILED_TTL: Duration = Duration::from_secs(30);
/// Longest session identifier in a user name (`alice-session-ID`).
const MAX_SESSION_ID: usize = 64;
/// Longest header value considered; real Basic credentials are far shorter.
const MAX_HEADER: usize = 1024;
/// How long a request may wait for a verification slot before it is told the proxy is busy.
/// A hash takes well under a second at sane costs, so a longer wait means overload, and
/// holding the client longer would only pile up connections.
pub const VERIFY_WAIT: Duration = Duration::from_secs(2);
/// Highest bcrypt cost accepted: `htpasswd -B -C` allows 4 to 17, and one hash at 18 takes
/// tens of seconds, which no proxy client waits for (and the dummy hash at load would too).
const MAX_COST: u32 = 17;
/// Dummy cost for a file with no users.
const EMPTY_FILE_COST: u32 = 10;

/// Loaded credentials and what is cached about them.
pub struct Auth {
    users: HashMap<String, String>,
    dummy: String,
    realm: String,
    /// `[auth.sessions]` when enabled: user names carry egress parameters.
    sessions: Option<SessionsConfig>,
    verified: DashMap<[u8; 32], (Arc<str>, Ask)>,
    failed: DashMap<[u8; 32], Instant>,
    slots: Slots,
    verify_wait: Duration,
}

/// What [`Auth::check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Valid credentials of this user.
    User(Arc<str>),
    /// Valid credentials of this user, whose name asked for a session or a fresh egress
    /// address (`[auth.sessions]`).
    Session(Arc<str>, Ask),
    /// The user name carries a parameter `[auth.sessions]` does not know, or a malformed
    /// one (407, `auth_session_param`); no hash was computed.
    BadParameter,
    /// Missing, malformed or wrong credentials (407).
    Denied,
    /// No verification slot came free in time (503): nothing is known about the password.
    Busy,
    /// The client address used up its hashes (429); no hash was computed.
    TooManyAttempts {
        /// When the next attempt will be counted.
        retry_after: Duration,
    },
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
        problem: String,
    },
}

impl Auth {
    /// Loads `user:hash` lines; blank lines and `#` comments are skipped.
    pub fn load(path: &Path, realm: &str) -> Result<Auth, AuthError> {
        Auth::load_with(path, realm, None)
    }

    /// [`Auth::load`], with egress parameters in user names when `sessions` is enabled. A
    /// user name containing the separator is refused then: it could never be told apart from
    /// a name with parameters.
    pub fn load_with(path: &Path, realm: &str, sessions: Option<&SessionsConfig>) -> Result<Auth, AuthError> {
        let sessions = sessions.filter(|s| s.enabled).cloned();
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read { path: shown.clone(), source })?;
        let mut users = HashMap::new();
        let mut highest = None;
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |problem: &str| AuthError::Line { path: shown.clone(), line: i + 1, problem: problem.into() };
            let (user, hash) = line.split_once(':').ok_or_else(|| bad("expected user:hash"))?;
            if user.is_empty() {
                return Err(bad("empty user name"));
            }
            if sessions.as_ref().is_some_and(|s| user.contains(s.separator.as_str())) {
                return Err(bad("user name contains auth.sessions.separator"));
            }
            let cost = bcrypt_cost(hash).map_err(|p| bad(&p))?;
            highest = highest.max(Some(cost));
            users.insert(user.to_string(), hash.to_string());
        }
        // As slow as the slowest real hash, so no cost in the file singles out real names.
        let dummy = bcrypt::hash("veilgate-dummy", highest.unwrap_or(EMPTY_FILE_COST)).unwrap_or_default();
        // At least two, so that one client's half still leaves a slot for everyone else.
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get()).max(2);
        Ok(Auth {
            users,
            dummy,
            realm: realm.to_string(),
            sessions,
            verified: DashMap::new(),
            failed: DashMap::new(),
            slots: Slots::new(cpus),
            verify_wait: VERIFY_WAIT,
        })
    }

    /// The realm for `Proxy-Authenticate`.
    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// Judges a `Proxy-Authorization` value sent by `client`. A hash is computed only for a
    /// well-formed header neither cache knows, after the client's attempt budget in
    /// `governor` allowed it; `hashes` counts each one.
    pub async fn check(
        &self,
        header: Option<&[u8]>,
        client: &ClientKey,
        governor: &Governor,
        hashes: &metrics::Counter,
    ) -> Verdict {
        let Some(header) = header.filter(|h| h.len() <= MAX_HEADER) else {
            return Verdict::Denied;
        };
        let digest: [u8; 32] = Sha256::digest(header).into();
        if let Some(known) = self.cached(&digest) {
            return known;
        }
        let Some((name, password)) = basic_credentials(header) else {
            return Verdict::Denied;
        };
        // Before any budget or hash: a bad parameter is the same answer whatever the password.
        let (user, ask) = match &self.sessions {
            None => (name, Ask::default()),
            Some(s) => match parameters(&name, s) {
                Some((user, ask)) => (user.to_string(), ask),
                None => return Verdict::BadParameter,
            },
        };
        if let Err(retry_after) = governor.auth_attempt(client) {
            return Verdict::TooManyAttempts { retry_after };
        }
        let Some(slot) = self.slots.acquire(client, self.verify_wait).await else {
            return Verdict::Busy;
        };
        // The same header (a browser opening several connections) may have been verified
        // while this one waited for its turn.
        if let Some(known) = self.cached(&digest) {
            return known;
        }
        let (hash, known) = match self.users.get(&user) {
            Some(h) => (h.clone(), true),
            None => (self.dummy.clone(), false),
        };
        hashes.increment(1);
        let verified = tokio::task::spawn_blocking(move || {
            let ok = bcrypt::verify(password, &hash).unwrap_or(false);
            drop(slot);
            ok
        })
        .await;
        match verified {
            Ok(true) if known => {
                let user: Arc<str> = Arc::from(user);
                if self.verified.len() >= CACHE_MAX {
                    self.verified.clear();
                }
                self.verified.insert(digest, (Arc::clone(&user), ask));
                verdict(user, ask)
            }
            Ok(_) => {
                self.remember_failure(digest);
                Verdict::Denied
            }
            // The hash did not finish (a panic): nothing is known about the password.
            Err(_) => Verdict::Busy,
        }
    }

    /// What the caches say about a header, if anything.
    fn cached(&self, digest: &[u8; 32]) -> Option<Verdict> {
        if let Some(known) = self.verified.get(digest) {
            let (user, ask) = known.value();
            return Some(verdict(Arc::clone(user), *ask));
        }
        let failed_at = self.failed.get(digest).map(|at| *at)?;
        (failed_at.elapsed() < FAILED_TTL).then_some(Verdict::Denied)
    }

    fn remember_failure(&self, digest: [u8; 32]) {
        if self.failed.len() >= FAILED_MAX {
            self.failed.retain(|_, at| at.elapsed() < FAILED_TTL);
            if self.failed.len() >= FAILED_MAX {
                self.failed.clear();
            }
        }
        self.failed.insert(digest, Instant::now());
    }
}

fn verdict(user: Arc<str>, ask: Ask) -> Verdict {
    if ask == Ask::default() { Verdict::User(user) } else { Verdict::Session(user, ask) }
}

/// `USER[SEP KEY [SEP VALUE]]...` split into the user and what the parameters ask; `None`
/// for a parameter not known, given twice, or a session identifier that is missing, longer
/// than [`MAX_SESSION_ID`] or not of `A-Z a-z 0-9 _`.
fn parameters<'a>(name: &'a str, s: &SessionsConfig) -> Option<(&'a str, Ask)> {
    let mut parts = name.split(s.separator.as_str());
    let user = parts.next().unwrap_or_default();
    let mut ask = Ask::default();
    while let Some(key) = parts.next() {
        if key == s.session_key && ask.session().is_none() {
            let id = parts.next()?;
            let valid =
                (1..=MAX_SESSION_ID).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid {
                return None;
            }
            ask = ask.with_session(user, id);
        } else if key == s.rotate_key && !ask.rotate() {
            ask = ask.with_rotate();
        } else {
            return None;
        }
    }
    Some((user, ask))
}

/// The cost of a bcrypt hash in the forms `htpasswd -B` writes, or why it is not one.
fn bcrypt_cost(hash: &str) -> Result<u32, String> {
    if !(hash.starts_with("$2a$") || hash.starts_with("$2b$") || hash.starts_with("$2y$")) {
        return Err("only bcrypt hashes ($2y$, $2b$, $2a$) are accepted; create them with htpasswd -B".into());
    }
    let parts: bcrypt::HashParts =
        hash.parse().map_err(|_| "not a well-formed bcrypt hash ($2y$NN$ and 53 characters)".to_string())?;
    let cost = parts.get_cost();
    if !(4..=MAX_COST).contains(&cost) {
        return Err(format!("bcrypt cost {cost} is outside 4..={MAX_COST} (htpasswd -B -C accepts 4 to 17)"));
    }
    Ok(cost)
}

/// `Basic base64(user:password)`, decoded.
fn basic_credentials(header: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(header).ok()?.trim();
    let (scheme, b64) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn file(dir: &tempfile::TempDir, lines: &[String]) -> std::path::PathBuf {
        let path = dir.path().join("users.htpasswd");
        std::fs::write(&path, lines.join("\n")).unwrap();
        path
    }

    fn header(credentials: &str) -> Vec<u8> {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(credentials)).into_bytes()
    }

    fn governor() -> Arc<Governor> {
        let text = "[auth]\ncredentials_file = \"unused\"\nattempts_per_second = 1\nattempts_burst = 2\n";
        Governor::new(&Config::from_toml(text, "test").unwrap())
    }

    #[test]
    fn the_dummy_hash_takes_the_highest_cost_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        // Many cheap users and one dear one: any user's cost but the highest would give
        // unknown names away as faster than the dear one's wrong passwords.
        let mut lines: Vec<String> = (0..50).map(|i| format!("u{i}:{}", bcrypt::hash("p", 4).unwrap())).collect();
        lines.insert(17, format!("dear:{}", bcrypt::hash("p", 6).unwrap()));
        let auth = Auth::load(&file(&dir, &lines), "r").unwrap();
        assert_eq!(auth.dummy.parse::<bcrypt::HashParts>().unwrap().get_cost(), 6);
    }

    #[test]
    fn lines_that_are_not_bcrypt_are_refused_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let good = format!("a:{}", bcrypt::hash("p", 4).unwrap());
        for (bad, problem) in [
            ("b:{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=", "only bcrypt"),
            ("b:$2y$05$tooshort", "well-formed"),
            ("b:$2y$xx$abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyza", "well-formed"),
            ("b:$2y$31$abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyza", "cost 31"),
            ("nocolon", "user:hash"),
        ] {
            let err = Auth::load(&file(&dir, &[good.clone(), bad.to_string()]), "r").err().unwrap().to_string();
            assert!(err.contains("line 2") && err.contains(problem), "{bad}: {err}");
            assert!(err.contains("auth.credentials_file"), "{err}");
        }
    }

    #[test]
    fn user_names_carry_egress_parameters() {
        let s = SessionsConfig { enabled: true, ..SessionsConfig::default() };
        let session = |user: &str, id: &str| Ask::default().with_session(user, id);
        assert_eq!(parameters("alice", &s), Some(("alice", Ask::default())));
        assert_eq!(parameters("alice-session-abc123", &s), Some(("alice", session("alice", "abc123"))));
        assert_eq!(parameters("alice-rotate", &s), Some(("alice", Ask::default().with_rotate())));
        let both = parameters("alice-session-x_1-rotate", &s).unwrap();
        assert_eq!(both, ("alice", session("alice", "x_1").with_rotate()));
        assert_eq!((both.1.session(), both.1.rotate()), (session("alice", "x_1").session(), true));
        assert!(session("alice", "x_1").session().is_some() && !session("alice", "x_1").rotate());
        assert_ne!(session("alice", "a"), session("bob", "a"), "a session is the user's");
        for bad in [
            "alice-country-de",
            "alice-session",
            "alice-session-",
            "alice-session-a-session-b",
            "alice-rotate-rotate",
            "alice-session-a.b",
            "alice-",
            &format!("alice-session-{}", "x".repeat(65)),
        ] {
            assert_eq!(parameters(bad, &s), None, "{bad}");
        }
        let custom = SessionsConfig { separator: "__".into(), session_key: "sid".into(), ..s };
        assert_eq!(parameters("alice__sid__7", &custom), Some(("alice", session("alice", "7"))));
    }

    #[tokio::test]
    async fn sessions_authenticate_as_the_user_and_refuse_unknown_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let s = SessionsConfig { enabled: true, ..SessionsConfig::default() };
        let path = file(&dir, &[format!("alice:{}", bcrypt::hash("p", 4).unwrap())]);
        let auth = Auth::load_with(&path, "r", Some(&s)).unwrap();
        let (g, client, hashes) = (governor(), ClientKey::V4("127.0.0.2".parse().unwrap()), metrics::Counter::noop());
        let ask = Ask::default().with_session("alice", "abc");
        let want = Verdict::Session("alice".into(), ask);
        assert_eq!(auth.check(Some(&header("alice-session-abc:p")), &client, &g, &hashes).await, want);
        assert_eq!(auth.check(Some(&header("alice-session-abc:p")), &client, &g, &hashes).await, want, "cached");
        assert_eq!(auth.check(Some(&header("alice-session-abc:wrong")), &client, &g, &hashes).await, Verdict::Denied);
        assert_eq!(auth.check(Some(&header("alice-bogus:p")), &client, &g, &hashes).await, Verdict::BadParameter);
        // Without [auth.sessions] the name is taken whole: no such user.
        let plain = Auth::load(&path, "r").unwrap();
        let other = ClientKey::V4("127.0.0.3".parse().unwrap());
        assert_eq!(plain.check(Some(&header("alice-rotate:p")), &other, &g, &hashes).await, Verdict::Denied);
        // A user name with the separator cannot be told from parameters: refused at load.
        let dashed = file(&dir, &[format!("al-ice:{}", bcrypt::hash("p", 4).unwrap())]);
        let err = Auth::load_with(&dashed, "r", Some(&s)).err().unwrap().to_string();
        assert!(err.contains("line 1") && err.contains("separator"), "{err}");
    }

    #[tokio::test]
    async fn no_free_slot_is_busy_not_denied() {
        let dir = tempfile::tempdir().unwrap();
        let mut auth = Auth::load(&file(&dir, &[format!("a:{}", bcrypt::hash("p", 4).unwrap())]), "r").unwrap();
        auth.slots = Slots::new(0);
        auth.verify_wait = Duration::from_millis(20);
        let client = ClientKey::V4("127.0.0.2".parse().unwrap());
        let hashes = metrics::Counter::noop();
        assert_eq!(auth.check(Some(&header("a:p")), &client, &governor(), &hashes).await, Verdict::Busy);
        // Busy is not a failure: with a slot, the same header is verified.
        auth.slots = Slots::new(2);
        assert_eq!(auth.check(Some(&header("a:p")), &client, &governor(), &hashes).await, Verdict::User("a".into()));
    }

    #[tokio::test]
    async fn attempts_are_charged_only_for_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Auth::load(&file(&dir, &[format!("a:{}", bcrypt::hash("p", 4).unwrap())]), "r").unwrap();
        let (g, client, hashes) = (governor(), ClientKey::V4("127.0.0.2".parse().unwrap()), metrics::Counter::noop());
        let check = |h: Option<Vec<u8>>| {
            let (g, client, hashes, auth) = (&g, &client, &hashes, &auth);
            async move { auth.check(h.as_deref(), client, g, hashes).await }
        };
        // Nothing to hash: no header, another scheme, no colon. The budget (2) is untouched.
        assert_eq!(check(None).await, Verdict::Denied);
        assert_eq!(check(Some(b"Bearer abc".to_vec())).await, Verdict::Denied);
        assert_eq!(check(Some(header("no-colon"))).await, Verdict::Denied);
        assert_eq!(check(Some(header("a:wrong"))).await, Verdict::Denied);
        assert_eq!(check(Some(header("a:wrong"))).await, Verdict::Denied, "from the failure cache, no charge");
        assert_eq!(check(Some(header("a:p"))).await, Verdict::User("a".into()));
        assert_eq!(check(Some(header("a:p"))).await, Verdict::User("a".into()), "from the cache, no charge");
        assert!(matches!(check(Some(header("a:other"))).await, Verdict::TooManyAttempts { retry_after }
            if retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1)));
        // Another address has its own budget.
        let other = ClientKey::V4("127.0.0.3".parse().unwrap());
        assert_eq!(auth.check(Some(&header("a:other")), &other, &g, &hashes).await, Verdict::Denied);
    }
}
