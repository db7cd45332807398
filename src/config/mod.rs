//! Configuration: one typed tree, parsed from TOML with `deny_unknown_fields`, then checked
//! once by [`Config::validate`] for the rules that span several keys. Every later stage reads
//! typed values; nothing re-parses strings at run time.
//!
//! Each section is a module of its own holding its types, their defaults and its checks
//! (`server`, `limits`, `policy`, `dns`, `auth`, `routes`, `mitm`, `log`, `cluster`, `admin`, `pac`), re-exported here so
//! every path stays `crate::config::X`. A new key goes in its section's struct, with its rule
//! in that section's `validate`; this module keeps only what spans sections.
//!
//! With no file veilgate runs on [`DEFAULT_CONFIG`], the documented file shipped as
//! `config/veilgate.toml`. Missing keys in a user's file take the same defaults.

mod admin;
mod auth;
mod cluster;
pub mod diff;
mod dns;
mod egress;
mod limits;
mod log;
mod mitm;
mod pac;
mod policy;
pub mod proxy_protocol;
mod routes;
mod server;
pub mod units;
mod upstreams;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use admin::AdminConfig;
pub use auth::{AuthConfig, SessionsConfig};
pub use cluster::{ClusterBackend, ClusterConfig, FailMode, RedisUrl};
pub use dns::{DnsConfig, HostAddrs};
pub use egress::{EgressConfig, FamilyFallback, PoolConfig, Select};
pub use limits::{LimitsConfig, PerClientLimits};
pub use log::{ClientAddressLog, LogConfig, LogFormat};
pub use mitm::MitmConfig;
pub use pac::PacConfig;
pub use policy::PolicyConfig;
pub use proxy_protocol::{ProxyProtocol, validate_proxy_protocol};
pub use routes::{Mode, RouteConfig, RouteLimits};
pub use server::{ServerConfig, TlsClientAuth};
pub use units::{ByteRate, HumanDuration, PortRange};
pub use upstreams::{ParentScheme, Strategy, UpstreamConfig, UpstreamGroupConfig, UpstreamUrl};

/// Longest timeout accepted: longer ones are mistakes, and far longer ones overflow clocks.
const MAX_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);

/// The documented default configuration, compiled in so `veilgate` runs with no file.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/veilgate.toml");

/// A configuration that could not be loaded. The message names the key and the problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The path given.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed, a key is unknown, or a value has the wrong type or form.
    #[error("{origin}: {message}")]
    Parse {
        /// The file, or "embedded defaults".
        origin: String,
        /// The parser's message, which points at the key's line.
        message: String,
    },
    /// A value is well-formed but not acceptable.
    #[error("{origin}: key `{key}`: {problem}")]
    Invalid {
        /// The file, or "embedded defaults".
        origin: String,
        /// Dotted key path, e.g. `limits.per_client.new_tunnels_burst`.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
}

impl ConfigError {
    /// Every section's check builds its errors here, so they all name the source and the
    /// dotted key the same way.
    fn invalid(origin: &str, key: &str, problem: String) -> ConfigError {
        ConfigError::Invalid { origin: origin.to_string(), key: key.to_string(), problem }
    }
}

/// Rejects a zero or over-long deadline (`key` is the dotted path named in the message).
fn check_timeout(origin: &str, key: &str, d: HumanDuration) -> Result<(), ConfigError> {
    if d.0.is_zero() {
        return Err(ConfigError::invalid(origin, key, "must be longer than zero".into()));
    }
    if d.0 > MAX_TIMEOUT {
        return Err(ConfigError::invalid(origin, key, "must be at most 30 days".into()));
    }
    Ok(())
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listeners, timeouts and size caps.
    pub server: ServerConfig,
    /// Tunnel caps, rates and bandwidth.
    pub limits: LimitsConfig,
    /// Which destinations may be reached.
    pub policy: PolicyConfig,
    /// How target names are resolved.
    pub dns: DnsConfig,
    /// Optional proxy authentication.
    pub auth: Option<AuthConfig>,
    /// Per-destination mode and limits; first match wins, default mode `tunnel`.
    pub routes: Vec<RouteConfig>,
    /// The CA and upstream trust for `mitm` routes.
    pub mitm: Option<MitmConfig>,
    /// Log format and privacy.
    pub log: LogConfig,
    /// Where caps are decided when several instances share them.
    pub cluster: ClusterConfig,
    /// What the admin listener offers beyond health and metrics.
    pub admin: AdminConfig,
    /// Parent proxies routes can send tunnels through (`routes.upstream`).
    pub upstreams: Vec<UpstreamConfig>,
    /// Parents chosen among by a strategy, named like an upstream.
    pub upstream_groups: Vec<UpstreamGroupConfig>,
    /// The proxy auto-config file served at `/proxy.pac`.
    pub pac: PacConfig,
    /// Source address pools tunnels leave from.
    pub egress: EgressConfig,
}

impl Config {
    /// Parses and validates TOML text. `origin` names the source in error messages.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        config.validate(origin)?;
        Ok(config)
    }

    /// Reads, parses and validates a file. Relative file paths in it (`auth.credentials_file`,
    /// `server.tls_cert`, `server.tls_key`, `mitm.ca_cert`, `mitm.ca_key`, a `mitm.upstream_roots` bundle) are made relative to the
    /// file's folder, so the proxy reads the same files whatever its working directory, on
    /// start-up and on every reload.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let mut config = Config::from_toml(&text, &path.display().to_string())?;
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        config.resolve_paths(absolute.parent().unwrap_or(Path::new("")));
        Ok(config)
    }

    fn resolve_paths(&mut self, dir: &Path) {
        let under = |p: &Path| if p.is_relative() { dir.join(p) } else { p.to_path_buf() };
        if let Some(a) = &mut self.auth {
            a.credentials_file = under(&a.credentials_file);
        }
        for p in
            [&mut self.server.tls_cert, &mut self.server.tls_key, &mut self.server.tls_client_ca].into_iter().flatten()
        {
            *p = under(p);
        }
        if let Some(m) = &mut self.mitm {
            m.ca_cert = under(&m.ca_cert);
            m.ca_key = under(&m.ca_key);
            if m.upstream_roots != "system" {
                m.upstream_roots = under(Path::new(&m.upstream_roots)).display().to_string();
            }
        }
        for u in &mut self.upstreams {
            for p in [&mut u.credentials_file, &mut u.ca_file].into_iter().flatten() {
                *p = under(p);
            }
        }
    }

    /// The embedded defaults.
    pub fn embedded() -> Config {
        // The embedded file is checked by a unit test, so this cannot fail in a release.
        Config::from_toml(DEFAULT_CONFIG, "embedded defaults").expect("embedded default config is valid")
    }

    /// The rules that span keys or that serde cannot express. Each section checks its own keys
    /// (a new key's rule goes in its section's `validate`, next to the key); only the rules
    /// that read two sections are written here. The first error found is returned.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        self.server.validate(origin)?;
        self.dns.validate(origin)?;
        self.limits.validate(origin)?;
        self.policy.validate(origin)?;
        self.cluster.validate(origin)?;
        self.egress.validate(origin)?;
        for (i, route) in self.routes.iter().enumerate() {
            route.validate(origin, i)?;
            // Cross-section: a route's pool must exist.
            if let Some(name) = route.egress.as_deref().filter(|n| !self.egress.has_pool(n)) {
                return Err(ConfigError::invalid(
                    origin,
                    &format!("routes[{i}].egress"),
                    format!("no [[egress.pools]] entry is named {name:?}"),
                ));
            }
        }
        upstreams::validate(origin, &self.upstreams, &self.upstream_groups)?;
        self.validate_route_upstreams(origin)?;
        // Cross-section: a `mitm` route is checked against `[mitm]` here, because without the
        // CA neither section alone is wrong, but the route could never be served.
        if let Some(i) = self.routes.iter().position(|r| r.mode == Mode::Mitm) {
            if self.mitm.is_none() {
                return Err(ConfigError::invalid(
                    origin,
                    &format!("routes[{i}].mode"),
                    "\"mitm\" needs a [mitm] section with ca_cert and ca_key (veilgate ca init --dir DIR makes them)"
                        .into(),
                ));
            }
        }
        if let Some(m) = &self.mitm {
            m.validate(origin)?;
        }
        if let Some(auth) = &self.auth {
            auth.validate(origin)?;
            // Cross-section: with credentials only under TLS and no TLS listener, nobody
            // could ever authenticate.
            if auth.require_tls && self.server.tls_listen.is_empty() {
                return Err(ConfigError::invalid(
                    origin,
                    "auth.require_tls",
                    "needs a TLS listener (server.tls_listen, tls_cert, tls_key)".into(),
                ));
            }
        }
        self.log.validate(origin)?;
        self.pac.validate(origin, &self.server.tls_listen)?;
        Ok(())
    }

    /// Cross-section: each `routes.upstream` names an upstream or a group, and the route can
    /// use it.
    fn validate_route_upstreams(&self, origin: &str) -> Result<(), ConfigError> {
        for (i, route) in self.routes.iter().enumerate() {
            let Some(name) = &route.upstream else { continue };
            let key = format!("routes[{i}].upstream");
            let members: Vec<&UpstreamConfig> = match self.upstreams.iter().find(|u| &u.name == name) {
                Some(u) => vec![u],
                None => match self.upstream_groups.iter().find(|g| &g.name == name) {
                    Some(g) => self.upstreams.iter().filter(|u| g.members.contains(&u.name)).collect(),
                    None => {
                        return Err(ConfigError::invalid(
                            origin,
                            &key,
                            format!("{name:?} is not an [[upstreams]] or [[upstream_groups]] name"),
                        ));
                    }
                },
            };
            if route.mode == Mode::Deny {
                return Err(ConfigError::invalid(origin, &key, "a deny route never dials; remove upstream".into()));
            }
            // The parent dials the origin, from its own address: a source pool cannot apply.
            if route.egress.is_some() {
                return Err(ConfigError::invalid(
                    origin,
                    &key,
                    "a route goes through a parent (upstream) or leaves from a pool (egress), not both".into(),
                ));
            }
            // The interception's upstream handshake runs on a TCP stream; an https:// parent's
            // tunnel is inside TLS already.
            if route.mode == Mode::Mitm && members.iter().any(|u| u.url.scheme == ParentScheme::Https) {
                return Err(ConfigError::invalid(
                    origin,
                    &key,
                    "a mitm route cannot go through an https:// parent (use http:// or socks5h://)".into(),
                ));
            }
        }
        Ok(())
    }

    /// The effective configuration as TOML (for `check-config`).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_file_equals_the_code_defaults() {
        let from_file = Config::from_toml(DEFAULT_CONFIG, "embedded").unwrap();
        assert_eq!(from_file, Config::default());
    }

    #[test]
    fn effective_config_round_trips() {
        let c = Config::embedded();
        let again = Config::from_toml(&c.to_toml(), "rendered").unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn relative_paths_resolve_against_the_files_folder() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("veilgate.toml");
        let text = "[auth]\ncredentials_file = \"users\"\n[mitm]\nca_cert = \"ca/c.pem\"\nca_key = \"/abs/c.key\"\nupstream_roots = \"../roots.pem\"\n";
        std::fs::write(&file, text).unwrap();
        let c = Config::load(&file).unwrap();
        assert_eq!(c.auth.unwrap().credentials_file, dir.path().join("users"));
        let m = c.mitm.unwrap();
        assert_eq!(m.ca_cert, dir.path().join("ca/c.pem"));
        assert_eq!(m.ca_key, PathBuf::from("/abs/c.key"), "absolute paths stay");
        assert_eq!(m.upstream_roots, dir.path().join("../roots.pem").display().to_string());
        std::fs::write(&file, text.replace("\"../roots.pem\"", "\"system\"")).unwrap();
        assert_eq!(Config::load(&file).unwrap().mitm.unwrap().upstream_roots, "system");
    }

    fn err(text: &str) -> String {
        Config::from_toml(text, "t.toml").unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err("[server]\nheader_timeout = \"10x\"").contains("header_timeout"));
        assert!(err("[server]\nlisten = []").contains("server.listen"));
        assert!(err("[server]\nbogus = 1").contains("bogus"));
        assert!(err("[limits.per_client]\nnew_tunnels_burst = 5").contains("limits.per_client.new_tunnels_burst"));
        assert!(err("[limits.per_client]\nbandwidth_up = \"5 furlongs\"").contains("bandwidth_up"));
        assert!(err("[policy]\nallowed_ports = [70000]").contains("allowed_ports"));
        assert!(err("[policy]\ndeny_cidrs = [\"10.0.0.0/33\"]").contains("deny_cidrs"));
    }
}
