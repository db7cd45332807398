//! Parent proxies (`[[upstreams]]`, `[[upstream_groups]]`, `routes.upstream`): a tunnel
//! leaves through a SOCKS5 or HTTP(S) CONNECT parent instead of being dialled here.
//!
//! [`Parents`] is compiled with each configuration snapshot: the upstreams with their
//! credentials and TLS settings, and for each route the [`Via`] (one upstream or a group)
//! it names. A member whose dial fails at [`Hop::Parent`] is marked down and skipped until
//! its health check ([`health`]) passes; the next member is tried within the same
//! `connect_timeout`. What the parent reports about the origin (refused, unreachable) is
//! the origin's failure, not the parent's, and leaves the parent up.
//!
//! The target was checked before DNS (ports, host patterns, literal addresses) before any
//! of this runs, so a denied target never reaches a parent. With `socks5://` veilgate
//! resolves the name and checks every address as for a direct dial; with `socks5h://`,
//! `http://` and `https://` the name goes to the parent unresolved and veilgate asks no DNS.

mod health;
mod http;
mod socks5;

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Cause, DialError, DialErrorKind, Dialed, Dialer, Egress, Hop, Stream};
use crate::config::{Config, ParentScheme, Strategy, UpstreamConfig, UpstreamUrl};
use crate::limits::ClientKey;
use crate::metrics::{Metrics, UpstreamMetrics};
use crate::target::{Host, Target};

/// A parent's configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ParentError {
    /// `credentials_file`: unreadable, readable by others, or not `user:password`.
    #[error("upstreams {name:?}: credentials_file {path}: {problem}")]
    Credentials {
        /// The upstream.
        name: String,
        /// The file.
        path: PathBuf,
        /// What is wrong (never the file's content).
        problem: String,
    },
    /// `ca_file`, or the system's roots, for an `https://` parent.
    #[error("upstreams {name:?}: {problem}")]
    Tls {
        /// The upstream.
        name: String,
        /// What is wrong.
        problem: String,
    },
}

/// Credentials for a parent. Its `Debug` hides both halves, so no log line or panic
/// message carries them.
#[derive(Clone)]
pub struct Credentials {
    user: String,
    password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(***)")
    }
}

/// Reads `user:password` (one line) through the same owner-only check as the other secrets
/// in the config; RFC 1929 allows 1-255 bytes for each.
fn load_credentials(name: &str, path: &Path) -> Result<Credentials, ParentError> {
    let fail = |problem: String| ParentError::Credentials { name: name.to_string(), path: path.to_path_buf(), problem };
    let text = crate::mitm::ca::read_private(path).map_err(|e| fail(e.to_string()))?;
    let line = text.lines().next().unwrap_or_default();
    let (user, password) = line.split_once(':').ok_or_else(|| fail("expected one line user:password".into()))?;
    for (what, v) in [("user", user), ("password", password)] {
        if v.is_empty() || v.len() > 255 {
            return Err(fail(format!("the {what} must be 1-255 bytes")));
        }
    }
    Ok(Credentials { user: user.to_string(), password: password.to_string() })
}

/// Who a tunnel is for, as a parent needs to know it and no more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientTag {
    /// A stable hash of the client identity (FNV-1a, the same in every process), for the
    /// `hash` strategy.
    stable: u64,
    /// A keyed hash of it, random per process: the isolation username, which a parent
    /// cannot turn back into an address or a user name by trying them all.
    isolation: u64,
}

impl ClientTag {
    /// The tag of the client limits are keyed by (user, certificate identity, or address).
    pub fn of(key: &ClientKey) -> ClientTag {
        let mut bytes = Vec::with_capacity(20);
        match key {
            ClientKey::V4(ip) => {
                bytes.push(4);
                bytes.extend_from_slice(&ip.octets());
            }
            ClientKey::V6(ip) => {
                bytes.push(6);
                bytes.extend_from_slice(&ip.octets());
            }
            ClientKey::User(user) => {
                bytes.push(b'u');
                bytes.extend_from_slice(user.as_bytes());
            }
        }
        static KEY: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
        let mut keyed = KEY.get_or_init(Default::default).build_hasher();
        keyed.write(&bytes);
        ClientTag { stable: fnv1a(&bytes), isolation: keyed.finish() }
    }
}

/// FNV-1a 64: stable across processes and versions, unlike std's seeded hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Set once a request has gone to the parent: a deadline that passes after it is the
/// origin's (the parent is working on it), before it the parent's.
#[derive(Default)]
pub struct Progress(AtomicBool);

impl Progress {
    fn asked(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
    fn was_asked(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A tunnel's way out through a parent: what the route names and who the tunnel is for.
#[derive(Debug, Clone)]
pub struct ParentEgress {
    /// The upstream or group the route names.
    pub via: Arc<Via>,
    /// Who the tunnel is for, as the group's hash and the isolation username need it.
    pub client: ClientTag,
}

/// How a tunnel's dial through a parent went (`upstream_tunnels_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The parent connected the tunnel.
    Connected,
    /// The parent could not be reached or failed its handshake (marked down).
    ParentFailed,
    /// The parent answered that the origin failed (refused, unreachable, not allowed).
    OriginFailed,
    /// The deadline passed, at the parent or while it worked on the origin.
    Timeout,
}

impl Outcome {
    /// Every label, registered at zero.
    pub const ALL: [Outcome; 4] = [Outcome::Connected, Outcome::ParentFailed, Outcome::OriginFailed, Outcome::Timeout];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Connected => "connected",
            Outcome::ParentFailed => "parent_failed",
            Outcome::OriginFailed => "origin_failed",
            Outcome::Timeout => "timeout",
        }
    }

    /// The outcome of a failed dial, when the parent was asked at all (a local lookup or
    /// policy failure for `socks5://` never reached it).
    fn of(e: &DialError) -> Option<Outcome> {
        match (e.hop, e.kind) {
            (Hop::Resolve | Hop::Policy | Hop::Source, _) | (_, DialErrorKind::Unavailable) => None,
            (_, DialErrorKind::Timeout) => Some(Outcome::Timeout),
            (Hop::Parent, _) => Some(Outcome::ParentFailed),
            (Hop::Origin, _) => Some(Outcome::OriginFailed),
        }
    }
}

/// One parent proxy and its health.
pub struct Upstream {
    name: Arc<str>,
    url: UpstreamUrl,
    auth: Option<Credentials>,
    isolate: bool,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    health_every: Duration,
    /// The deadline of a health check: the same `connect_timeout` a tunnel has.
    probe_timeout: Duration,
    up: AtomicBool,
    metrics: OnceLock<UpstreamMetrics>,
}

impl Upstream {
    fn load(u: &UpstreamConfig, connect_timeout: Duration) -> Result<Upstream, ParentError> {
        let auth = u.credentials_file.as_deref().map(|p| load_credentials(&u.name, p)).transpose()?;
        let tls = match u.url.scheme {
            ParentScheme::Https => Some(tls_connector(u)?),
            _ => None,
        };
        Ok(Upstream {
            name: Arc::from(u.name.as_str()),
            url: u.url.clone(),
            auth,
            isolate: u.isolate_by_client,
            tls,
            health_every: u.health_check.0,
            probe_timeout: connect_timeout,
            up: AtomicBool::new(true),
            metrics: OnceLock::new(),
        })
    }

    /// Whether the parent is taken for new tunnels.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn count(&self, outcome: Outcome) {
        if let Some(m) = self.metrics.get() {
            m.tunnel(outcome.as_str());
        }
    }

    /// Takes the parent out of use until a health check passes; logs the change once.
    fn mark_down(&self, e: &DialError) {
        if self.up.swap(false, Ordering::Relaxed) {
            warn!(upstream = &*self.name, url = %self.url, cause = %e.cause, "parent proxy marked down");
        }
        if let Some(m) = self.metrics.get() {
            m.up.set(0.0);
        }
    }

    fn mark_up(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            info!(upstream = &*self.name, url = %self.url, "parent proxy back up (health check passed)");
        }
        if let Some(m) = self.metrics.get() {
            m.up.set(1.0);
        }
    }

    /// The credentials this client's tunnel presents: the configured ones, or with
    /// `isolate_by_client` a username of its own.
    fn credentials(&self, client: ClientTag) -> Option<Credentials> {
        if self.isolate {
            return Some(Credentials { user: format!("vg-{:016x}", client.isolation), password: "veilgate".into() });
        }
        self.auth.clone()
    }

    /// TCP to the parent (its name, if it has one, looked up by the system: it is the
    /// operator's address, not a client's target), with the tunnel's socket options.
    async fn connect_tcp(&self) -> Result<(TcpStream, SocketAddr), DialError> {
        let fail = |kind| DialError { hop: Hop::Parent, kind: DialErrorKind::Failed, cause: Cause::Io(kind) };
        let addrs: Vec<SocketAddr> = match self.url.host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, self.url.port)],
            Err(_) => tokio::net::lookup_host((self.url.host.as_str(), self.url.port))
                .await
                .map_err(|e| fail(e.kind()))?
                .collect(),
        };
        let mut last = std::io::ErrorKind::NotFound;
        for addr in addrs {
            match super::connect_one(addr, super::Source::Kernel).await {
                Ok(s) => {
                    super::tune(&s);
                    return Ok((s, addr));
                }
                Err(e) => last = e.kind(),
            }
        }
        Err(fail(last))
    }

    async fn tls_handshake(&self, tcp: TcpStream) -> Result<tokio_rustls::client::TlsStream<TcpStream>, DialError> {
        let Some((connector, name)) = &self.tls else {
            return Err(DialError { hop: Hop::Parent, kind: DialErrorKind::Failed, cause: Cause::ParentTls });
        };
        connector.connect(name.clone(), tcp).await.map_err(|e| {
            tracing::debug!(upstream = &*self.name, error = %e, "TLS with the parent failed");
            DialError { hop: Hop::Parent, kind: DialErrorKind::Failed, cause: Cause::ParentTls }
        })
    }

    /// One tunnel through this parent: the local lookup for `socks5://`, then the whole
    /// handshake under `deadline`.
    async fn dial(
        &self,
        dialer: &Dialer,
        target: &Target,
        client: ClientTag,
        deadline: tokio::time::Instant,
    ) -> Result<Dialed, DialError> {
        let (resolved, lookup_time) = match (self.url.scheme, &target.host) {
            (ParentScheme::Socks5, Host::Name(_)) => {
                let (addrs, t) = dialer.resolve_checked(target).await?;
                (addrs.first().copied(), t)
            }
            _ => (None, None),
        };
        let auth = self.credentials(client);
        let progress = Progress::default();
        let started = Instant::now();
        let handshake = self.handshake(target, resolved, auth.as_ref(), &progress);
        match tokio::time::timeout_at(deadline, handshake).await {
            Ok(Ok((stream, addr))) => Ok(Dialed { stream, addr, connect_time: started.elapsed(), lookup_time }),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                let hop = if progress.was_asked() { Hop::Origin } else { Hop::Parent };
                Err(DialError { hop, kind: DialErrorKind::Timeout, cause: Cause::Deadline })
            }
        }
    }

    async fn handshake(
        &self,
        target: &Target,
        resolved: Option<SocketAddr>,
        auth: Option<&Credentials>,
        progress: &Progress,
    ) -> Result<(Stream, SocketAddr), DialError> {
        let (mut tcp, addr) = self.connect_tcp().await?;
        match self.url.scheme {
            ParentScheme::Socks5 | ParentScheme::Socks5h => {
                let dest = match (resolved, &target.host) {
                    (Some(a), _) => socks5::Dest::Addr(a),
                    (None, Host::Ip(ip)) => socks5::Dest::Addr(SocketAddr::new(*ip, target.port)),
                    (None, Host::Name(name)) => socks5::Dest::Name(name, target.port),
                };
                socks5::connect(&mut tcp, auth, dest, progress).await?;
                Ok((Stream::Tcp(tcp), addr))
            }
            ParentScheme::Http => {
                http::connect(&mut tcp, target, auth, progress).await?;
                Ok((Stream::Tcp(tcp), addr))
            }
            ParentScheme::Https => {
                let mut tls = self.tls_handshake(tcp).await?;
                http::connect(&mut tls, target, auth, progress).await?;
                Ok((Stream::Tls(Box::new(tls)), addr))
            }
        }
    }
}

/// The TLS client for an `https://` parent: verified against `ca_file` or the system's
/// roots, for the URL's host; HTTP/1.1 by ALPN (CONNECT is spoken as HTTP/1.1).
fn tls_connector(u: &UpstreamConfig) -> Result<(TlsConnector, ServerName<'static>), ParentError> {
    let fail = |problem: String| ParentError::Tls { name: u.name.clone(), problem };
    let mut roots = rustls::RootCertStore::empty();
    match &u.ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| fail(format!("ca_file {}: {e}", path.display())))?;
            for cert in rustls_pemfile_certs(&pem) {
                roots.add(cert).map_err(|e| fail(format!("ca_file {}: {e}", path.display())))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    if roots.is_empty() {
        return Err(fail("no root certificates to verify the parent by (set ca_file)".into()));
    }
    let mut cfg = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from(u.url.host.clone()).map_err(|e| fail(format!("url host: {e}")))?;
    Ok((TlsConnector::from(Arc::new(cfg)), name))
}

/// The certificates in a PEM bundle.
fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem).filter_map(Result::ok).collect()
}

/// What a route names: one upstream, or a group's members and how to choose among them.
pub struct Via {
    members: Vec<Arc<Upstream>>,
    strategy: Strategy,
    next: AtomicUsize,
}

impl std::fmt::Debug for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.members.iter().map(|m| &*m.name).collect();
        f.debug_struct("Via").field("members", &names).field("strategy", &self.strategy).finish()
    }
}

impl Via {
    /// The members in the order this tunnel tries them (those down are skipped later).
    fn order(&self, client: ClientTag) -> Vec<&Arc<Upstream>> {
        let n = self.members.len();
        match self.strategy {
            Strategy::Failover => self.members.iter().collect(),
            Strategy::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
                self.members[start..].iter().chain(&self.members[..start]).collect()
            }
            Strategy::Hash => {
                // Rendezvous hashing: the highest score wins, and a member going down moves
                // only the clients it had.
                let mut scored: Vec<(u64, &Arc<Upstream>)> = self
                    .members
                    .iter()
                    .map(|m| {
                        let mut bytes = client.stable.to_le_bytes().to_vec();
                        bytes.extend_from_slice(m.name.as_bytes());
                        (mix(fnv1a(&bytes)), m)
                    })
                    .collect();
                scored.sort_by_key(|s| std::cmp::Reverse(s.0));
                scored.into_iter().map(|(_, m)| m).collect()
            }
        }
    }
}

/// A finaliser (splitmix64's), so scores of near-equal inputs spread over the range.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Dials `target` through the first member of `via` that is up, in the strategy's order,
/// all members together within one `connect_timeout`. A member that fails at the parent is
/// marked down and the next one tried; a failure the parent reports about the origin is
/// the answer.
pub(super) async fn dial(dialer: &Dialer, target: &Target, via: &Via, client: ClientTag) -> Result<Dialed, DialError> {
    let deadline = tokio::time::Instant::now() + dialer.connect_timeout;
    let mut last = None;
    for up in via.order(client) {
        if !up.is_up() {
            continue;
        }
        match up.dial(dialer, target, client, deadline).await {
            Ok(d) => {
                up.count(Outcome::Connected);
                return Ok(d);
            }
            Err(e) => {
                if let Some(o) = Outcome::of(&e) {
                    up.count(o);
                }
                if e.hop != Hop::Parent {
                    return Err(e);
                }
                up.mark_down(&e);
                let out_of_time = e.kind == DialErrorKind::Timeout;
                last = Some(e);
                if out_of_time {
                    break;
                }
            }
        }
    }
    Err(last.unwrap_or(DialError { hop: Hop::Parent, kind: DialErrorKind::Unavailable, cause: Cause::AllDown }))
}

/// The parents of one configuration snapshot: each upstream with its health, each route's
/// [`Via`]. Health checks run from [`Parents::start`] until [`Parents::stop`] (a reload) or
/// until the snapshot is dropped.
pub struct Parents {
    upstreams: Vec<Arc<Upstream>>,
    by_route: Vec<Option<Arc<Via>>>,
    stop: CancellationToken,
}

impl Parents {
    /// Loads every upstream's credentials and TLS roots and resolves each route's name.
    pub fn build(config: &Config) -> Result<Parents, ParentError> {
        let connect_timeout = config.server.connect_timeout.0;
        let upstreams: Vec<Arc<Upstream>> = config
            .upstreams
            .iter()
            .map(|u| Upstream::load(u, connect_timeout).map(Arc::new))
            .collect::<Result<_, _>>()?;
        let by_name = |n: &str| upstreams.iter().find(|u| &*u.name == n).cloned();
        let mut vias: HashMap<&str, Arc<Via>> = HashMap::new();
        for u in &upstreams {
            let via = Via { members: vec![Arc::clone(u)], strategy: Strategy::Failover, next: AtomicUsize::new(0) };
            vias.insert(&u.name, Arc::new(via));
        }
        for g in &config.upstream_groups {
            let members = g.members.iter().filter_map(|m| by_name(m)).collect();
            vias.insert(&g.name, Arc::new(Via { members, strategy: g.strategy, next: AtomicUsize::new(0) }));
        }
        // Validation makes every name resolve; a route whose name did not would go direct,
        // which is why it is checked there and not guessed at here.
        let by_route = config.routes.iter().map(|r| r.upstream.as_deref().and_then(|n| vias.get(n).cloned())).collect();
        Ok(Parents { upstreams, by_route, stop: CancellationToken::new() })
    }

    /// The way out for a tunnel on route `index` (from [`crate::policy::route::lookup`]).
    pub fn egress(&self, index: Option<usize>, client: &ClientKey) -> Egress {
        match index.and_then(|i| self.by_route.get(i)).and_then(Option::as_ref) {
            Some(via) => Egress::Parent(Box::new(ParentEgress { via: Arc::clone(via), client: ClientTag::of(client) })),
            None => Egress::default(),
        }
    }

    /// Gives every upstream its metrics and starts its health checks (on the current tokio
    /// runtime; none outside one, as in `check-config`).
    pub fn start(&self, metrics: &Metrics) {
        for up in &self.upstreams {
            let m = metrics.upstream(&up.name);
            m.up.set(if up.is_up() { 1.0 } else { 0.0 });
            let _ = up.metrics.set(m);
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(health::watch(Arc::clone(up), self.stop.clone()));
            }
        }
    }

    /// Takes over the health of the parents `old` had with the same name and URL, so a
    /// reload neither offers tunnels a parent known to be down nor flips its `upstream_up`
    /// to 1 until the new snapshot's first check.
    pub fn carry_health(&self, old: &Parents) {
        for up in &self.upstreams {
            if let Some(was) = old.upstreams.iter().find(|o| o.name == up.name && o.url == up.url) {
                up.up.store(was.is_up(), Ordering::Relaxed);
            }
        }
    }

    /// Stops the health checks (the snapshot was replaced).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Parents {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn via(strategy: Strategy, names: &[&str]) -> Via {
        let cfg = |n: &str| UpstreamConfig {
            name: n.into(),
            url: UpstreamUrl::parse("socks5h://127.0.0.1:9").unwrap(),
            credentials_file: None,
            isolate_by_client: false,
            health_check: crate::config::HumanDuration(Duration::from_secs(1)),
            ca_file: None,
        };
        let members =
            names.iter().map(|n| Arc::new(Upstream::load(&cfg(n), Duration::from_secs(1)).unwrap())).collect();
        Via { members, strategy, next: AtomicUsize::new(0) }
    }

    fn names(v: Vec<&Arc<Upstream>>) -> Vec<String> {
        v.iter().map(|u| u.name.to_string()).collect()
    }

    #[test]
    fn strategies_order_members() {
        let c = ClientTag::of(&ClientKey::User("alice".into()));
        assert_eq!(names(via(Strategy::Failover, &["a", "b", "c"]).order(c)), ["a", "b", "c"]);
        let rr = via(Strategy::RoundRobin, &["a", "b", "c"]);
        let firsts: Vec<String> = (0..4).map(|_| names(rr.order(c))[0].clone()).collect();
        assert_eq!(firsts, ["a", "b", "c", "a"]);
        let h = via(Strategy::Hash, &["a", "b", "c", "d"]);
        assert_eq!(names(h.order(c)), names(h.order(c)), "the same client, the same order");
        let picks: std::collections::HashSet<String> =
            (0..64u8).map(|i| names(h.order(ClientTag::of(&ClientKey::V4([10, 0, 0, i].into()))))[0].clone()).collect();
        assert_eq!(picks.len(), 4, "64 clients spread over all four members");
    }

    #[test]
    fn a_reload_keeps_a_parent_down_that_was_down() {
        let text = |port: u16| {
            format!(
                "[[upstreams]]\nname = \"a\"\nurl = \"socks5h://127.0.0.1:9\"\n[[upstreams]]\nname = \"b\"\nurl = \"socks5h://127.0.0.1:{port}\"\n"
            )
        };
        let build = |port| Parents::build(&Config::from_toml(&text(port), "t").unwrap()).unwrap();
        let old = build(10);
        let e = DialError { hop: Hop::Parent, kind: DialErrorKind::Failed, cause: Cause::Deadline };
        old.upstreams.iter().for_each(|u| u.mark_down(&e));
        let same = build(10);
        same.carry_health(&old);
        assert!(same.upstreams.iter().all(|u| !u.is_up()));
        let moved = build(11);
        moved.carry_health(&old);
        assert!(!moved.upstreams[0].is_up(), "same name and URL: still down");
        assert!(moved.upstreams[1].is_up(), "a new URL starts up, and its first check judges it");
    }

    #[test]
    fn the_stable_hash_is_fnv1a() {
        // Published FNV-1a 64 test vectors: the hash strategy agrees across processes.
        assert_eq!(fnv1a(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a(b"a"), 0xaf63dc4c8601ec8c);
        let a = ClientTag::of(&ClientKey::User("alice".into()));
        let b = ClientTag::of(&ClientKey::User("bob".into()));
        assert_eq!(a, ClientTag::of(&ClientKey::User("alice".into())));
        assert_ne!(a.isolation, b.isolation);
    }

    #[test]
    fn credentials_need_an_owner_only_file_and_never_print() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("parent.cred");
        std::fs::write(&p, "user:s3cret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_credentials("tor", &p).unwrap_err().to_string();
        assert!(e.contains("chmod 600") || e.contains("readable"), "{e}");
        assert!(!e.contains("s3cret"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = load_credentials("tor", &p).unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("user", "s3cret"));
        assert_eq!(format!("{c:?}"), "Credentials(***)");
        std::fs::write(&p, "no-colon\n").unwrap();
        assert!(load_credentials("tor", &p).is_err());
    }
}
