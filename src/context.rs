//! What every tunnel of one proxy shares: the current configuration and what is compiled
//! from it (swapped whole on reload), the governor, the metrics, and the shutdown tokens.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::auth::{Auth, AuthError};
use crate::config::diff::Changes;
use crate::config::{ClientAddressLog, Config};
use crate::dial::parent::{ParentError, Parents};
use crate::dial::{Dialer, Resolver};
use crate::error::Refusal;
use crate::limits::pending::Pending;
use crate::limits::{ClientKey, Governor};
use crate::logthrottle::{LogThrottle, REFUSAL_LINES_PER_SECOND};
use crate::metrics::Metrics;
use crate::mitm::Interceptor;
use crate::mitm::ca::CaError;
use crate::policy::Acl;

/// The configuration and what is compiled from it. Tunnels take one snapshot when they
/// start; a reload builds a new one and never changes a snapshot in use.
pub struct Shared {
    /// The configuration in force.
    pub config: Config,
    /// `[policy]` compiled, with the proxy's own addresses: the pre-DNS check.
    pub acl: Arc<Acl>,
    /// The only way out: `[dns]`, the post-DNS check with the same ACL, `connect_timeout`.
    pub dialer: Dialer,
    /// `[auth]`, when configured.
    pub auth: Option<Auth>,
    /// `[mitm]`, when configured.
    pub interceptor: Option<Interceptor>,
    /// The TLS listeners' certificate and key, when `server.tls_listen` is set: part of the
    /// snapshot, so a reload serves a new pair to the next handshake.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Each route's identity ([`RouteConfig::key`](crate::config::RouteConfig::key)) by
    /// route index: per-route limit state is keyed by it, and building it here spares every
    /// tunnel to such a route a string.
    pub route_ids: Vec<Arc<str>>,
    /// `[[upstreams]]` and `[[upstream_groups]]` with their health, and each route's parent.
    pub parents: Parents,
    /// `[egress]` compiled: the source address pools.
    pub egress: crate::egress::Pools,
}

/// A configuration whose files could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// `[auth]`.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// `[mitm]`.
    #[error("mitm: {0}")]
    Mitm(#[from] CaError),
    /// `server.tls_cert` / `server.tls_key`.
    #[error("server TLS listener: {0}")]
    Tls(CaError),
    /// `[[upstreams]]`: credentials or TLS roots.
    #[error(transparent)]
    Parent(#[from] ParentError),
}

impl Shared {
    /// Compiles `config`, loading every file it names. `own` are the bound listener
    /// addresses (never dialled). Start-up, reload and `check-config` (through
    /// [`Shared::check`]) all come here, so no file passes one and fails another.
    pub fn build(config: Config, own: &[SocketAddr]) -> Result<Shared, LoadError> {
        let auth = match &config.auth {
            Some(a) => Some(Auth::load_with(&a.credentials_file, &a.realm, Some(&a.sessions))?),
            None => None,
        };
        let interceptor = match &config.mitm {
            Some(m) => Some(Interceptor::load(m)?),
            None => None,
        };
        let tls = match (&config.server.tls_cert, &config.server.tls_key) {
            (Some(cert), Some(key)) if !config.server.tls_listen.is_empty() => {
                let client_ca = config.server.tls_client_ca.as_deref().map(|p| (p, config.server.tls_client_auth));
                Some(crate::front::tls::load(cert, key, client_ca).map_err(LoadError::Tls)?)
            }
            _ => None,
        };
        let acl = Arc::new(Acl::new(&config.policy, own.to_vec()));
        let route_ids = config.routes.iter().map(|r| Arc::from(r.key())).collect();
        let parents = Parents::build(&config)?;
        Ok(Shared {
            route_ids,
            parents,
            egress: crate::egress::Pools::new(&config),
            dialer: Dialer::new(Resolver::new(&config.dns), Arc::clone(&acl), config.server.connect_timeout.0),
            acl,
            auth,
            interceptor,
            tls,
            config,
        })
    }

    /// The key limits count a client address under, by this configuration's `ipv6_prefix`.
    pub fn client_key(&self, ip: IpAddr) -> ClientKey {
        ClientKey::from_ip(ip, self.config.limits.per_client.ipv6_prefix)
    }

    /// What `check-config` runs: [`Shared::build`], with nothing kept.
    pub fn check(config: &Config) -> Result<(), LoadError> {
        Shared::build(config.clone(), &[]).map(drop)
    }
}

/// Per-proxy state.
pub struct Context {
    shared: ArcSwap<Shared>,
    own: Vec<SocketAddr>,
    /// Admission limits and byte budgets.
    pub governor: Arc<Governor>,
    /// Connections still in their head phase.
    pub pending: Pending,
    /// This proxy's own metrics registry.
    pub metrics: Metrics,
    /// The budget of refusal log lines, per reason.
    pub refusal_log: LogThrottle,
    /// Cancelled when a stop is asked for: `/readyz` answers 503 from then on, while the
    /// listeners accept until `server.drain_delay` has passed.
    pub unready: CancellationToken,
    /// Cancelled when the drain begins: stop accepting, close connections still in their head.
    pub draining: CancellationToken,
    /// Cancelled when the drain deadline passes: close every tunnel.
    pub stop: CancellationToken,
    /// Live tunnels and recent refusals per client, filled only with `admin.inspect`.
    pub inspect: Arc<crate::inspect::Registry>,
    /// The TLS listeners' bound addresses (ports chosen), which `/proxy.pac` announces by
    /// default.
    pub tls_listeners: Vec<SocketAddr>,
    /// Egress addresses held and sessions pinned: kept across reloads.
    pub egress: crate::egress::State,
}

impl Context {
    /// Builds the context for bound listeners.
    pub fn new(mut shared: Shared, own: Vec<SocketAddr>, listeners: &[SocketAddr]) -> Context {
        let metrics = Metrics::new(listeners);
        metrics.configured(&shared.config);
        shared.parents.start(&metrics);
        shared.egress.observe(&metrics);
        Context {
            governor: Governor::build(&shared.config, metrics.cluster.clone()),
            pending: Pending::default(),
            metrics,
            refusal_log: LogThrottle::new(&Refusal::REASONS, REFUSAL_LINES_PER_SECOND),
            shared: ArcSwap::from_pointee(shared),
            own,
            unready: CancellationToken::new(),
            draining: CancellationToken::new(),
            stop: CancellationToken::new(),
            inspect: Arc::default(),
            tls_listeners: Vec::new(),
            egress: crate::egress::State::default(),
        }
    }

    /// The snapshot in force now. A tunnel takes one and keeps it for its whole life, so a
    /// reload never changes the rules under a tunnel halfway through.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.load_full()
    }

    /// How much of a client's address logs may carry, as configured now (a reload that
    /// tightens it applies to the next log line).
    pub fn log_client(&self) -> ClientAddressLog {
        self.shared.load().config.log.client_address
    }

    /// Applies a new configuration to new tunnels at once and to running tunnels' byte
    /// budgets at their next chunk, and says which keys changed. Listener addresses cannot
    /// change without a restart ([`Changes::need_restart`] names them); the caller logs the
    /// reload's one line.
    pub fn reload(&self, config: Config) -> Result<Changes, LoadError> {
        let changes = Changes::between(&self.shared.load().config, &config);
        let mut next = Shared::build(config, &self.own)?;
        self.governor.update(&next.config);
        self.metrics.configured(&next.config);
        next.parents.carry_health(&self.shared.load().parents);
        next.parents.start(&self.metrics);
        next.egress.observe(&self.metrics);
        // The old snapshot's health checks stop here; its tunnels keep their parents.
        self.shared.swap(Arc::new(next)).parents.stop();
        Ok(changes)
    }
}
