//! Configuration: one typed tree, parsed from TOML with `deny_unknown_fields`, then checked
//! once by [`Config::validate`] for the rules that span several keys. Every later stage reads
//! typed values; nothing re-parses strings at run time.
//!
//! With no file veilgate runs on [`DEFAULT_CONFIG`], the documented file shipped as
//! `config/veilgate.toml`. Missing keys in a user's file take the same defaults.

pub mod proxy_protocol;
pub mod units;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::policy::pattern::HostPattern;
pub use proxy_protocol::{ProxyProtocol, validate_proxy_protocol};
pub use units::{ByteRate, HumanDuration, PortRange};

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
}

/// `[server]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Proxy listeners (IPv4 or IPv6).
    pub listen: Vec<SocketAddr>,
    /// Admin listener for /healthz, /readyz and /metrics; never the proxy port.
    pub admin_listen: Option<SocketAddr>,
    /// Cap on the CONNECT head; past it the client gets 431.
    pub max_header_bytes: usize,
    /// Deadline for the whole CONNECT head (slowloris guard); past it, 408.
    pub header_timeout: HumanDuration,
    /// Deadline to connect upstream, all addresses together; past it, 504.
    pub connect_timeout: HumanDuration,
    /// A tunnel that moves no byte either way for this long is closed.
    pub idle_timeout: HumanDuration,
    /// On SIGTERM, how long running tunnels may finish before they are closed.
    pub drain_timeout: HumanDuration,
    /// Connections still sending their CONNECT head, all clients together; past it new
    /// connections get 503 at once. One client may hold at most half of them.
    pub max_pending: u32,
    /// Heads of one client (address, or IPv6 prefix) still incomplete after `head_grace`;
    /// past it the next late head gets 429. Heads that complete in time never count, so a
    /// burst of fast clients behind one NAT is not mistaken for a slowloris.
    pub max_pending_per_client: u32,
    /// How long a head may take before it counts as late (slowloris guard); at most half of
    /// `header_timeout` takes effect (see [`ServerConfig::late_head_after`]).
    pub head_grace: HumanDuration,
    /// `"required"`: every connection starts with a PROXY protocol header (v1 or v2) from a
    /// balancer in `proxy_protocol_from`, and its source address is the client.
    pub proxy_protocol: ProxyProtocol,
    /// The balancers allowed to send a PROXY header; every other peer is closed.
    pub proxy_protocol_from: Vec<IpNet>,
}

impl ServerConfig {
    /// When a head becomes late: `head_grace`, but never past half of `header_timeout`, so a
    /// short header timeout (set on its own) still leaves the per-client bound room to act.
    pub fn late_head_after(&self) -> Duration {
        self.head_grace.0.min(self.header_timeout.0 / 2)
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 8080))],
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
            max_header_bytes: 8192,
            header_timeout: HumanDuration(Duration::from_secs(10)),
            connect_timeout: HumanDuration(Duration::from_secs(5)),
            idle_timeout: HumanDuration(Duration::from_secs(300)),
            drain_timeout: HumanDuration(Duration::from_secs(30)),
            max_pending: 10_000,
            max_pending_per_client: 64,
            head_grace: HumanDuration(Duration::from_secs(1)),
            proxy_protocol: ProxyProtocol::Off,
            proxy_protocol_from: Vec::new(),
        }
    }
}

/// `[limits]`: every limit is optional; absent means unlimited.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Global cap on concurrent tunnels (503 past it).
    pub max_tunnels: Option<u32>,
    /// Global bandwidth, each direction.
    pub bandwidth: Option<ByteRate>,
    /// Limits applied to each client separately.
    pub per_client: PerClientLimits,
}

/// `[limits.per_client]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PerClientLimits {
    /// Concurrent tunnels per client (429 past it).
    pub max_tunnels: Option<u32>,
    /// New tunnels per second per client (GCRA; 429 with Retry-After past it).
    pub new_tunnels_per_second: Option<NonZeroU32>,
    /// Burst for `new_tunnels_per_second`; defaults to the rate itself.
    pub new_tunnels_burst: Option<NonZeroU32>,
    /// Client to origin, shared by all of the client's tunnels.
    pub bandwidth_up: Option<ByteRate>,
    /// Origin to client, shared by all of the client's tunnels.
    pub bandwidth_down: Option<ByteRate>,
    /// An IPv6 client is identified by this prefix so one host cannot mint fresh buckets.
    pub ipv6_prefix: u8,
}

impl Default for PerClientLimits {
    fn default() -> Self {
        PerClientLimits {
            max_tunnels: None,
            new_tunnels_per_second: None,
            new_tunnels_burst: None,
            bandwidth_up: None,
            bandwidth_down: None,
            ipv6_prefix: 64,
        }
    }
}

/// `[policy]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Ports a CONNECT may name; a port or `"FIRST-LAST"`.
    pub allowed_ports: Vec<PortRange>,
    /// Deny loopback, private, CGNAT, link-local, ULA, multicast and IPv4-embedding forms.
    pub deny_private: bool,
    /// When not empty, only names matching one of these may be reached.
    pub allow_hosts: Vec<HostPattern>,
    /// Names never reached.
    pub deny_hosts: Vec<HostPattern>,
    /// When not empty, only addresses inside these are reached; they are exempt from
    /// `deny_private`, so this is how an operator opens one internal range on purpose.
    pub allow_cidrs: Vec<IpNet>,
    /// Addresses never reached, whatever else says.
    pub deny_cidrs: Vec<IpNet>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            allowed_ports: vec![PortRange { start: 443, end: 443 }],
            deny_private: true,
            allow_hosts: Vec::new(),
            deny_hosts: Vec::new(),
            allow_cidrs: Vec::new(),
            deny_cidrs: Vec::new(),
        }
    }
}

/// `[dns]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Resolvers to ask (UDP then TCP). Empty: the system's resolver configuration.
    pub servers: Vec<SocketAddr>,
    /// Static entries answered without a query: name to one address or a list.
    pub hosts: BTreeMap<String, HostAddrs>,
    /// Deadline for one name lookup; past it, 502.
    pub timeout: HumanDuration,
    /// Entries in the resolver's cache.
    pub cache_size: u64,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            servers: Vec::new(),
            hosts: BTreeMap::new(),
            timeout: HumanDuration(Duration::from_secs(5)),
            cache_size: 4096,
        }
    }
}

/// A static `[dns] hosts` value: one address or several.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum HostAddrs {
    /// `"127.0.0.1"`
    One(IpAddr),
    /// `["127.0.0.1", "::1"]`
    Many(Vec<IpAddr>),
}

impl HostAddrs {
    /// The addresses in order.
    pub fn to_vec(&self) -> Vec<IpAddr> {
        match self {
            HostAddrs::One(ip) => vec![*ip],
            HostAddrs::Many(ips) => ips.clone(),
        }
    }
}

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

/// What veilgate does with a destination.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Blind byte relay: the default.
    #[default]
    Tunnel,
    /// Terminate TLS with a minted leaf, re-originate verified TLS upstream, observe.
    Mitm,
    /// Refuse with 403.
    Deny,
}

impl Mode {
    /// Metric and log label.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Tunnel => "tunnel",
            Mode::Mitm => "mitm",
            Mode::Deny => "deny",
        }
    }
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Destinations this route covers.
    pub hosts: Vec<HostPattern>,
    /// What to do with them.
    #[serde(default)]
    pub mode: Mode,
    /// Per-client limits for these destinations, counted apart from the client's others.
    #[serde(default)]
    pub per_client: Option<RouteLimits>,
}

impl RouteConfig {
    /// The route's identity: its normalised patterns. Per-route limit state is keyed by it,
    /// so reordering routes on reload does not hand one route's counts to another.
    pub fn key(&self) -> String {
        self.hosts.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
    }
}

/// `[routes.per_client]`: limits a route sets for its own destinations.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RouteLimits {
    /// Concurrent tunnels per client to this route's destinations.
    pub max_tunnels: Option<u32>,
    /// Client to origin, per client, for this route.
    pub bandwidth_up: Option<ByteRate>,
    /// Origin to client, per client, for this route.
    pub bandwidth_down: Option<ByteRate>,
}

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

fn default_roots() -> String {
    "system".to_string()
}

fn default_leaf_cache_size() -> usize {
    1000
}

fn default_leaf_cache_ttl() -> HumanDuration {
    HumanDuration(Duration::from_secs(24 * 3600))
}

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
    /// `mitm.ca_cert`, `mitm.ca_key`, a `mitm.upstream_roots` bundle) are made relative to the
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
        if let Some(m) = &mut self.mitm {
            m.ca_cert = under(&m.ca_cert);
            m.ca_key = under(&m.ca_key);
            if m.upstream_roots != "system" {
                m.upstream_roots = under(Path::new(&m.upstream_roots)).display().to_string();
            }
        }
    }

    /// The embedded defaults.
    pub fn embedded() -> Config {
        // The embedded file is checked by a unit test, so this cannot fail in a release.
        Config::from_toml(DEFAULT_CONFIG, "embedded defaults").expect("embedded default config is valid")
    }

    /// The rules that span keys or that serde cannot express.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: String| ConfigError::Invalid {
            origin: origin.to_string(),
            key: key.to_string(),
            problem,
        };
        let s = &self.server;
        if s.listen.is_empty() {
            return Err(invalid("server.listen", "at least one listen address is needed".into()));
        }
        for (i, a) in s.listen.iter().enumerate() {
            if s.listen[..i].contains(a) && a.port() != 0 {
                return Err(invalid("server.listen", format!("{a} is listed twice")));
            }
            if Some(*a) == s.admin_listen && a.port() != 0 {
                return Err(invalid(
                    "server.admin_listen",
                    format!("{a} is also a proxy listener; the admin listener must be separate"),
                ));
            }
        }
        if !(256..=1 << 20).contains(&s.max_header_bytes) {
            return Err(invalid("server.max_header_bytes", format!("{} is outside 256..=1048576", s.max_header_bytes)));
        }
        for (key, d) in [
            ("server.header_timeout", s.header_timeout),
            ("server.connect_timeout", s.connect_timeout),
            ("server.idle_timeout", s.idle_timeout),
            ("dns.timeout", self.dns.timeout),
        ] {
            if d.0.is_zero() {
                return Err(invalid(key, "must be longer than zero".into()));
            }
            if d.0 > MAX_TIMEOUT {
                return Err(invalid(key, "must be at most 30 days".into()));
            }
        }
        let l = &self.limits;
        if s.max_pending == 0 || s.max_pending_per_client == 0 {
            return Err(invalid(
                "server.max_pending",
                "max_pending and max_pending_per_client must be at least 1".into(),
            ));
        }
        if s.head_grace.0.is_zero() {
            return Err(invalid("server.head_grace", "must be longer than zero".into()));
        }
        if s.drain_timeout.0 > MAX_TIMEOUT {
            return Err(invalid("server.drain_timeout", "must be at most 30 days".into()));
        }
        validate_proxy_protocol(s).map_err(|(key, problem)| invalid(key, problem))?;
        if let Some(a) = self.dns.servers.iter().find(|a| a.port() == 0) {
            return Err(invalid("dns.servers", format!("{a} has port 0")));
        }
        if l.max_tunnels == Some(0) {
            return Err(invalid("limits.max_tunnels", "0 would refuse every tunnel; remove the key for no cap".into()));
        }
        let pc = &l.per_client;
        if pc.max_tunnels == Some(0) {
            return Err(invalid(
                "limits.per_client.max_tunnels",
                "0 would refuse every tunnel; remove the key for no cap".into(),
            ));
        }
        if pc.new_tunnels_burst.is_some() && pc.new_tunnels_per_second.is_none() {
            return Err(invalid(
                "limits.per_client.new_tunnels_burst",
                "needs limits.per_client.new_tunnels_per_second".into(),
            ));
        }
        if !(1..=128).contains(&pc.ipv6_prefix) {
            return Err(invalid("limits.per_client.ipv6_prefix", format!("{} is outside 1..=128", pc.ipv6_prefix)));
        }
        if self.policy.allowed_ports.is_empty() {
            return Err(invalid("policy.allowed_ports", "at least one port is needed, e.g. [443]".into()));
        }
        for name in self.dns.hosts.keys() {
            if HostPattern::parse(name).map(|p| !matches!(p, HostPattern::Exact(_))).unwrap_or(true) {
                return Err(invalid("dns.hosts", format!("{name:?} is not a host name")));
            }
        }
        for (i, route) in self.routes.iter().enumerate() {
            if route.hosts.is_empty() {
                return Err(invalid(&format!("routes[{i}].hosts"), "a route needs at least one host pattern".into()));
            }
            if let Some(rl) = &route.per_client {
                if rl.max_tunnels == Some(0) {
                    return Err(invalid(
                        &format!("routes[{i}].per_client.max_tunnels"),
                        "0 would refuse every tunnel; use mode = \"deny\"".into(),
                    ));
                }
            }
        }
        if let Some(i) = self.routes.iter().position(|r| r.mode == Mode::Mitm) {
            if self.mitm.is_none() {
                return Err(invalid(
                    &format!("routes[{i}].mode"),
                    "\"mitm\" needs a [mitm] section with ca_cert and ca_key (veilgate ca init --dir DIR makes them)"
                        .into(),
                ));
            }
        }
        if let Some(m) = &self.mitm {
            if !(1..=1_000_000).contains(&m.leaf_cache_size) {
                return Err(invalid("mitm.leaf_cache_size", "must be between 1 and 1000000".into()));
            }
            if m.leaf_cache_ttl.0 >= Duration::from_secs(29 * 24 * 3600) || m.leaf_cache_ttl.0.is_zero() {
                return Err(invalid("mitm.leaf_cache_ttl", "must be between 0 and 29 days (leaves live 30)".into()));
            }
        }
        if let Some(auth) = &self.auth {
            if auth.realm.contains('"') || auth.realm.chars().any(|c| c.is_control()) {
                return Err(invalid("auth.realm", "may not contain quotes or control characters".into()));
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
