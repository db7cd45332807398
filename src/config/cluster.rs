//! `[cluster]`: where admission caps are decided when several instances share one budget
//! (DESIGN §4b), and what to do when that place cannot answer.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, HumanDuration};

/// Shortest lease accepted: renewals run every third of it, and a lease must outlive a
/// renewal that comes late by one Redis timeout and a scheduling hiccup.
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);
/// Longest lease accepted: a dead instance's slots stay taken this long.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(3600);
/// Longest decision budget accepted: a tunnel waits this long before the fail mode answers.
pub const MAX_DECISION_TIMEOUT: Duration = Duration::from_secs(5);

/// `[cluster]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Who decides the tunnel caps and the new-tunnel rate.
    pub backend: ClusterBackend,
    /// `redis://[user:password@]host:port[/db]` or `rediss://` (TLS); needed with `redis`.
    pub redis_url: Option<RedisUrl>,
    /// A Redis Cluster instead of one node: URLs of some of its masters (`redis://` or
    /// `rediss://`, one scheme for all), the rest found from them. Empty = not a cluster.
    pub redis_cluster_nodes: Vec<RedisUrl>,
    /// How long a tunnel's lease lives in Redis without a renewal: a killed instance's slots
    /// come back within it. Renewed every third of it.
    pub lease_ttl: HumanDuration,
    /// What admission does while Redis does not answer.
    pub fail_mode: FailMode,
    /// Longest wait for one Redis decision; past it the fail mode answers.
    pub timeout: HumanDuration,
}

/// `cluster.backend`
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ClusterBackend {
    /// This process's own counters: every instance has its own budget.
    #[default]
    Local,
    /// Caps and new-tunnel rate shared by every instance through one Redis.
    Redis,
}

/// `cluster.fail_mode`
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// Local limits with caps and rates divided by the live instances last counted, so the
    /// fleet together stays near the shared budget.
    #[default]
    Local,
    /// Local limits as configured: each instance grants the whole budget.
    Open,
    /// Refuse new tunnels with 503 (`cluster_unavailable`).
    Closed,
}

impl FailMode {
    /// Metric label (`cluster_mode{mode}`) and log field.
    pub fn as_str(self) -> &'static str {
        match self {
            FailMode::Local => "local",
            FailMode::Open => "open",
            FailMode::Closed => "closed",
        }
    }
}

/// A Redis URL. Its `Debug` and [`RedisUrl::redacted`] hide the password, so a log line or
/// a panic message that shows the config never carries it.
#[derive(Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct RedisUrl(pub String);

impl RedisUrl {
    /// The URL with any password replaced by `***`, for logs.
    pub fn redacted(&self) -> String {
        let s = &self.0;
        let Some((scheme, rest)) = s.split_once("://") else { return "***".into() };
        let authority_end = rest.find('/').unwrap_or(rest.len());
        match rest[..authority_end].rfind('@') {
            Some(at) => {
                let userinfo = &rest[..at];
                let user = userinfo.split_once(':').map_or("", |(u, _)| u);
                let user = if userinfo.contains(':') { format!("{user}:***") } else { "***".to_string() };
                format!("{scheme}://{user}@{}", &rest[at + 1..])
            }
            None => s.clone(),
        }
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl ClusterConfig {
    /// The `[cluster]` rules serde cannot express.
    pub(super) fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: String| ConfigError::invalid(origin, key, problem);
        if let Some(url) = &self.redis_url {
            let scheme = url.0.split_once("://").map(|(s, _)| s);
            if !matches!(scheme, Some("redis" | "rediss")) {
                return Err(invalid("cluster.redis_url", "must start with redis:// or rediss://".into()));
            }
            if redis::IntoConnectionInfo::into_connection_info(url.0.as_str()).is_err() {
                // The parser's message may quote the URL, password and all: say only where.
                return Err(invalid("cluster.redis_url", format!("{} is not a valid Redis URL", url.redacted())));
            }
        }
        let mut schemes = self.redis_cluster_nodes.iter().map(|u| u.0.split_once("://").map(|(s, _)| s));
        if let Some(first) = schemes.next() {
            if !matches!(first, Some("redis" | "rediss")) || schemes.any(|s| s != first) {
                return Err(invalid(
                    "cluster.redis_cluster_nodes",
                    "every node must start with redis://, or every node with rediss://".into(),
                ));
            }
        }
        for url in &self.redis_cluster_nodes {
            if redis::IntoConnectionInfo::into_connection_info(url.0.as_str()).is_err() {
                return Err(invalid(
                    "cluster.redis_cluster_nodes",
                    format!("{} is not a valid Redis URL", url.redacted()),
                ));
            }
        }
        if self.redis_url.is_some() && !self.redis_cluster_nodes.is_empty() {
            return Err(invalid(
                "cluster.redis_cluster_nodes",
                "set redis_url (one Redis) or redis_cluster_nodes (a Redis Cluster), not both".into(),
            ));
        }
        if self.backend == ClusterBackend::Redis && self.redis_url.is_none() && self.redis_cluster_nodes.is_empty() {
            return Err(invalid(
                "cluster.redis_url",
                "backend = \"redis\" needs a redis_url or redis_cluster_nodes".into(),
            ));
        }
        if !(MIN_LEASE_TTL..=MAX_LEASE_TTL).contains(&self.lease_ttl.0) {
            return Err(invalid(
                "cluster.lease_ttl",
                format!("must be between {}s and {}s", MIN_LEASE_TTL.as_secs(), MAX_LEASE_TTL.as_secs()),
            ));
        }
        if self.timeout.0.is_zero() || self.timeout.0 > MAX_DECISION_TIMEOUT {
            return Err(invalid(
                "cluster.timeout",
                format!("must be longer than zero and at most {}s", MAX_DECISION_TIMEOUT.as_secs()),
            ));
        }
        if self.timeout.0 * 3 > self.lease_ttl.0 {
            return Err(invalid("cluster.timeout", "must be under a third of cluster.lease_ttl".into()));
        }
        Ok(())
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            backend: ClusterBackend::Local,
            redis_url: None,
            redis_cluster_nodes: Vec::new(),
            lease_ttl: HumanDuration(Duration::from_secs(15)),
            fail_mode: FailMode::Local,
            timeout: HumanDuration(Duration::from_millis(50)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn err(text: &str) -> String {
        Config::from_toml(text, "t.toml").unwrap_err().to_string()
    }

    #[test]
    fn redis_needs_a_url_and_the_url_a_redis_scheme() {
        assert!(err("[cluster]\nbackend = \"redis\"").contains("cluster.redis_url"));
        assert!(err("[cluster]\nredis_url = \"http://x:6379\"").contains("redis:// or rediss://"));
        assert!(err("[cluster]\nbackend = \"memcached\"").contains("backend"));
        let ok = Config::from_toml(
            "[cluster]\nbackend = \"redis\"\nredis_url = \"rediss://u:pw@127.0.0.1:6380/2\"\nfail_mode = \"closed\"",
            "t",
        )
        .unwrap();
        assert_eq!(ok.cluster.backend, ClusterBackend::Redis);
        assert_eq!(ok.cluster.fail_mode, FailMode::Closed);
    }

    #[test]
    fn cluster_nodes_one_scheme_no_url_beside_them_and_no_password_shown() {
        let ok = Config::from_toml(
            "[cluster]\nbackend = \"redis\"\nredis_cluster_nodes = [\"redis://127.0.0.1:7000\", \"redis://127.0.0.1:7001\"]",
            "t",
        )
        .unwrap();
        assert_eq!(ok.cluster.redis_cluster_nodes.len(), 2);
        assert!(
            Config::from_toml("[cluster]\nredis_cluster_nodes = [\"rediss://u:pw@10.0.0.1:7000\"]", "t").is_ok(),
            "rediss:// too"
        );
        assert!(
            err("[cluster]\nredis_cluster_nodes = [\"redis://127.0.0.1:7000\", \"rediss://127.0.0.1:7001\"]")
                .contains("every node")
        );
        assert!(err("[cluster]\nredis_cluster_nodes = [\"http://127.0.0.1:7000\"]").contains("every node"));
        let both = err(
            "[cluster]\nredis_url = \"redis://127.0.0.1:6379\"\nredis_cluster_nodes = [\"redis://127.0.0.1:7000\"]",
        );
        assert!(both.contains("not both"), "{both}");
        let bad = err("[cluster]\nredis_cluster_nodes = [\"redis://u:s3cret@127.0.0.1:notaport\"]");
        assert!(bad.contains("cluster.redis_cluster_nodes") && !bad.contains("s3cret"), "{bad}");
        let c =
            Config::from_toml("[cluster]\nredis_cluster_nodes = [\"redis://u:s3cret@127.0.0.1:7000\"]", "t").unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn lease_and_timeout_bounds() {
        assert!(err("[cluster]\nlease_ttl = \"1s\"").contains("cluster.lease_ttl"));
        assert!(err("[cluster]\nlease_ttl = \"2h\"").contains("cluster.lease_ttl"));
        assert!(err("[cluster]\ntimeout = \"0s\"").contains("cluster.timeout"));
        assert!(err("[cluster]\ntimeout = \"6s\"").contains("cluster.timeout"));
        assert!(err("[cluster]\nlease_ttl = \"3s\"\ntimeout = \"1500ms\"").contains("a third of cluster.lease_ttl"));
        assert!(Config::from_toml("[cluster]\nlease_ttl = \"3s\"\ntimeout = \"20ms\"", "t").is_ok());
    }

    #[test]
    fn the_password_never_shows() {
        let url = RedisUrl("redis://user:s3cret@127.0.0.1:6379/0".into());
        assert_eq!(url.redacted(), "redis://user:***@127.0.0.1:6379/0");
        assert!(!format!("{url:?}").contains("s3cret"));
        assert_eq!(RedisUrl("redis://:s3cret@h:1".into()).redacted(), "redis://:***@h:1");
        assert_eq!(RedisUrl("redis://s3cret@h:1".into()).redacted(), "redis://***@h:1");
        assert_eq!(RedisUrl("redis://h:1/0".into()).redacted(), "redis://h:1/0");
        let c = Config::from_toml("[cluster]\nredis_url = \"redis://u:s3cret@127.0.0.1:6379\"", "t").unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
        assert!(!err("[cluster]\nredis_url = \"redis://u:s3cret@127.0.0.1:notaport\"").contains("s3cret"));
    }
}
