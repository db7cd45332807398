//! `[server]`: listeners, deadlines and the bounds on connections still sending their head.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{ConfigError, HumanDuration, MAX_TIMEOUT, ProxyProtocol, check_timeout, validate_proxy_protocol};

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
    /// On SIGTERM, how long `/readyz` answers 503 while the listeners still accept, before
    /// they close and the drain begins: a balancer checking `/readyz` takes the instance out
    /// of its pool in that time, so no client meets a closed port. 0: close at once.
    pub drain_delay: HumanDuration,
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
    /// HTTPS proxy listeners: the client speaks TLS to veilgate, then the same CONNECT, so
    /// nobody between them reads the targets or the credentials.
    pub tls_listen: Vec<SocketAddr>,
    /// PEM certificate chain for `tls_listen` (leaf first).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`; refused when group or others may read it.
    pub tls_key: Option<PathBuf>,
    /// PEM roots that client certificates on `tls_listen` must chain to. A verified
    /// certificate's identity (its subject CN, else an email or URI name) keys the client's
    /// limits when no `[auth]` user does.
    pub tls_client_ca: Option<PathBuf>,
    /// With `tls_client_ca`: `"required"` refuses a handshake without a valid certificate;
    /// `"optional"` also serves clients without one (by address), and still refuses a bad one.
    pub tls_client_auth: TlsClientAuth,
    /// Concurrent CONNECT streams on one HTTP/2 connection to the TLS listener
    /// (SETTINGS_MAX_CONCURRENT_STREAMS); every stream is also under the client's caps.
    pub h2_max_streams: u32,
}

/// `server.tls_client_auth`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TlsClientAuth {
    /// Every client presents a certificate that chains to `tls_client_ca`.
    #[default]
    Required,
    /// A client may present one; without one it is known by its address.
    Optional,
}

impl ServerConfig {
    /// When a head becomes late: `head_grace`, but never past half of `header_timeout`, so a
    /// short header timeout (set on its own) still leaves the per-client bound room to act.
    pub fn late_head_after(&self) -> Duration {
        self.head_grace.0.min(self.header_timeout.0 / 2)
    }

    /// The `[server]` rules serde cannot express.
    pub(super) fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: String| ConfigError::invalid(origin, key, problem);
        if self.listen.is_empty() {
            return Err(invalid("server.listen", "at least one listen address is needed".into()));
        }
        for (i, a) in self.listen.iter().enumerate() {
            if self.listen[..i].contains(a) && a.port() != 0 {
                return Err(invalid("server.listen", format!("{a} is listed twice")));
            }
            if Some(*a) == self.admin_listen && a.port() != 0 {
                return Err(invalid(
                    "server.admin_listen",
                    format!("{a} is also a proxy listener; the admin listener must be separate"),
                ));
            }
        }
        if !(256..=1 << 20).contains(&self.max_header_bytes) {
            return Err(invalid(
                "server.max_header_bytes",
                format!("{} is outside 256..=1048576", self.max_header_bytes),
            ));
        }
        for (key, d) in [
            ("server.header_timeout", self.header_timeout),
            ("server.connect_timeout", self.connect_timeout),
            ("server.idle_timeout", self.idle_timeout),
        ] {
            check_timeout(origin, key, d)?;
        }
        if self.max_pending == 0 || self.max_pending_per_client == 0 {
            return Err(invalid(
                "server.max_pending",
                "max_pending and max_pending_per_client must be at least 1".into(),
            ));
        }
        if self.head_grace.0.is_zero() {
            return Err(invalid("server.head_grace", "must be longer than zero".into()));
        }
        if self.drain_timeout.0 > MAX_TIMEOUT {
            return Err(invalid("server.drain_timeout", "must be at most 30 days".into()));
        }
        if self.drain_delay.0 > Duration::from_secs(300) {
            return Err(invalid("server.drain_delay", "must be at most 5 minutes".into()));
        }
        validate_proxy_protocol(self).map_err(|(key, problem)| invalid(key, problem))?;
        self.validate_tls(origin)
    }

    /// `tls_listen` needs a certificate and key, and they mean nothing without it; its
    /// addresses are distinct from every other listener's.
    fn validate_tls(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: String| ConfigError::invalid(origin, key, problem);
        if self.tls_listen.is_empty() {
            if self.tls_client_ca.is_some() {
                return Err(invalid(
                    "server.tls_client_ca",
                    "client certificates need a TLS listener (tls_listen)".into(),
                ));
            }
            if self.tls_cert.is_some() || self.tls_key.is_some() {
                return Err(invalid("server.tls_cert", "tls_cert and tls_key are used only with tls_listen".into()));
            }
            return Ok(());
        }
        if self.tls_cert.is_none() || self.tls_key.is_none() {
            return Err(invalid("server.tls_listen", "a TLS listener needs tls_cert and tls_key".into()));
        }
        for (i, a) in self.tls_listen.iter().enumerate() {
            if a.port() == 0 {
                continue;
            }
            if self.tls_listen[..i].contains(a) || self.listen.contains(a) || Some(*a) == self.admin_listen {
                return Err(invalid("server.tls_listen", format!("{a} is already a listener")));
            }
        }
        if self.h2_max_streams == 0 {
            return Err(invalid("server.h2_max_streams", "must be at least 1".into()));
        }
        Ok(())
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
            drain_delay: HumanDuration(Duration::ZERO),
            max_pending: 10_000,
            max_pending_per_client: 64,
            head_grace: HumanDuration(Duration::from_secs(1)),
            proxy_protocol: ProxyProtocol::Off,
            proxy_protocol_from: Vec::new(),
            tls_listen: Vec::new(),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_client_auth: TlsClientAuth::Required,
            h2_max_streams: 100,
        }
    }
}
