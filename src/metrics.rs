//! Prometheus metrics (DESIGN §6). Each proxy owns its recorder, so two proxies in one
//! process (tests) never share counters. Every label comes from a small closed set and every
//! handle is registered at start-up: the hot path only increments atomics, and dashboards see
//! zeros instead of missing series.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

mod process;

pub use process::ProcessMetrics;

use crate::config::Mode;
use crate::error::{Refusal, Unanswered};
use crate::limits::{Direction, Scope};

/// Modes that carry traffic (a `deny` route never makes a tunnel).
pub const MODES: [Mode; 2] = [Mode::Tunnel, Mode::Mitm];
/// Tunnel outcomes (`tunnels_total{outcome}`), registered at zero: every label the
/// tunnel's `Outcome` gives (a test in `tunnel` keeps the two equal); `tls_failed` is an
/// interception whose handshakes did not complete.
pub const OUTCOMES: [&str; 5] = ["closed", "idle_timeout", "error", "shutdown", "tls_failed"];
/// Outcomes of a dial through a parent (`upstream_tunnels_total{outcome}`), in the order of
/// `dial::parent::Outcome::ALL` (a test there keeps the two equal).
pub const UPSTREAM_OUTCOMES: [&str; 4] = ["connected", "parent_failed", "origin_failed", "timeout"];
/// Accepted PROXY protocol headers (`proxy_protocol_headers_total{kind}`): `proxied` carried
/// the client's address; `local` was a balancer's health check (closed, and not a refusal, so
/// a check every few seconds does not look like trouble); `unknown` (v1 UNKNOWN, v2 UNSPEC,
/// UDP or unix) was served as the balancer's own connection, as the specification says.
pub const PROXY_HEADERS: [&str; 3] = ["proxied", "local", "unknown"];

const DURATION_BUCKETS: &[f64] = &[0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0];
const CONNECT_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The handles of one proxy instance: one struct per subsystem, each registering its own
/// series in its `new`. A new series goes in the struct of the subsystem that counts it; a new
/// refusal reason needs only [`Refusal::REASONS`], which registers it at zero here.
pub struct Metrics {
    handle: PrometheusHandle,
    /// Kept for the series whose labels come from the config and may change on reload (the
    /// parents' names, [`Metrics::upstream`]; the pools', [`Metrics::config_counter`]).
    rec: std::sync::Arc<PrometheusRecorder>,
    /// Accepts on the listeners (the proxy's and the admin one).
    pub listeners: ListenerMetrics,
    /// Tunnels: open, ended, bytes relayed, lifetime.
    pub tunnels: TunnelMetrics,
    /// Requests answered with an error status.
    pub refusals: RefusalMetrics,
    /// Reaching the upstream: name lookups and connects.
    pub dial: DialMetrics,
    /// The governor: bandwidth waits and the per-client state it tracks.
    pub limits: LimitMetrics,
    /// Proxy authentication.
    pub auth: AuthMetrics,
    /// The admin listener.
    pub admin: AdminMetrics,
    /// Interception: minted leaves and failed handshakes.
    pub mitm: MitmMetrics,
    /// Reloads and the configured limits operators compare usage against.
    pub config: ConfigMetrics,
    /// The process: CPU, memory, descriptors, threads (`process_*`, read at each scrape).
    pub process: ProcessMetrics,
    /// The cluster backend's decisions in Redis (all zero with `backend = "local"`).
    pub cluster: ClusterMetrics,
}

struct Reg<'a> {
    rec: &'a PrometheusRecorder,
}

impl Reg<'_> {
    fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
        Key::from_parts(name, labels.iter().map(|(k, v)| Label::new(*k, *v)).collect::<Vec<_>>())
    }
    fn meta() -> Metadata<'static> {
        Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()))
    }
    fn counter(&self, name: &'static str, help: &'static str, labels: &[(&'static str, &'static str)]) -> Counter {
        self.rec.describe_counter(KeyName::from_const_str(name), None, SharedString::const_str(help));
        self.rec.register_counter(&Self::key(name, labels), &Self::meta())
    }
    fn counter_owned(&self, name: &'static str, help: &'static str, label: (&'static str, String)) -> Counter {
        self.rec.describe_counter(KeyName::from_const_str(name), None, SharedString::const_str(help));
        self.rec.register_counter(&Key::from_parts(name, vec![Label::new(label.0, label.1)]), &Self::meta())
    }
    fn gauge(&self, name: &'static str, help: &'static str, labels: &[(&'static str, &'static str)]) -> Gauge {
        self.rec.describe_gauge(KeyName::from_const_str(name), None, SharedString::const_str(help));
        self.rec.register_gauge(&Self::key(name, labels), &Self::meta())
    }
    fn histogram(&self, name: &'static str, help: &'static str) -> Histogram {
        self.rec.describe_histogram(KeyName::from_const_str(name), Some(Unit::Seconds), SharedString::const_str(help));
        self.rec.register_histogram(&Self::key(name, &[]), &Self::meta())
    }
}

/// One parent proxy's series ([`Metrics::upstream`]).
#[derive(Clone)]
pub struct UpstreamMetrics {
    tunnels: [Counter; 4],
    /// `upstream_up`: 1 taken, 0 marked down.
    pub up: Gauge,
}

impl UpstreamMetrics {
    /// Counts one dial; `outcome` is one of [`UPSTREAM_OUTCOMES`].
    pub fn tunnel(&self, outcome: &str) {
        if let Some(i) = UPSTREAM_OUTCOMES.iter().position(|o| *o == outcome) {
            self.tunnels[i].increment(1);
        }
    }
}

/// Accepts, by listener; the listener's own failures.
pub struct ListenerMetrics {
    accepted: HashMap<SocketAddr, Counter>,
    /// Accepts that failed for want of a resource (EMFILE, ENFILE, ENOBUFS): the listener
    /// backs off and keeps serving, and this says it had to.
    pub accept_errors: Counter,
    /// PROXY protocol headers accepted, by kind ([`PROXY_HEADERS`]).
    proxy_headers: HashMap<&'static str, Counter>,
    /// TLS sessions established on the TLS listeners, by the protocol ALPN chose: how many
    /// clients speak HTTP/2 to the proxy (one connection for all their tunnels) and how many
    /// open one connection per tunnel.
    pub tls_sessions_h2: Counter,
    /// The same, HTTP/1.1 (or no ALPN, which means HTTP/1.1).
    pub tls_sessions_h1: Counter,
}

impl ListenerMetrics {
    fn new(r: &Reg, listeners: &[SocketAddr]) -> ListenerMetrics {
        ListenerMetrics {
            accepted: listeners
                .iter()
                .map(|l| {
                    (
                        *l,
                        r.counter_owned(
                            "veilgate_connections_accepted_total",
                            "Client connections accepted, by listener.",
                            ("listener", l.to_string()),
                        ),
                    )
                })
                .collect(),
            accept_errors: r.counter(
                "veilgate_accept_errors_total",
                "Accepts that failed for want of a resource (descriptors, buffers); the listener backs off.",
                &[],
            ),
            proxy_headers: PROXY_HEADERS
                .iter()
                .map(|kind| {
                    let help =
                        "PROXY protocol headers accepted, by kind (proxied, local health check, unknown source).";
                    (*kind, r.counter("veilgate_proxy_protocol_headers_total", help, &[("kind", kind)]))
                })
                .collect(),
            tls_sessions_h2: r.counter(TLS_SESSIONS, TLS_SESSIONS_HELP, &[("protocol", "h2")]),
            tls_sessions_h1: r.counter(TLS_SESSIONS, TLS_SESSIONS_HELP, &[("protocol", "http/1.1")]),
        }
    }
}

const TLS_SESSIONS: &str = "veilgate_tls_sessions_total";
const TLS_SESSIONS_HELP: &str = "TLS sessions established on the TLS listeners, by protocol (h2, http/1.1).";

/// Tunnels by mode: open now, ended by outcome, bytes by direction, lifetime.
pub struct TunnelMetrics {
    active: HashMap<&'static str, Gauge>,
    ended: HashMap<(&'static str, &'static str), Counter>,
    bytes: HashMap<(&'static str, &'static str), Counter>,
    /// Tunnel lifetime in seconds.
    pub duration: Histogram,
}

impl TunnelMetrics {
    fn new(r: &Reg) -> TunnelMetrics {
        let modes: Vec<&'static str> = MODES.iter().map(|m| m.as_str()).collect();
        let dirs = [Direction::Up.as_str(), Direction::Down.as_str()];
        let mut t = TunnelMetrics {
            active: modes
                .iter()
                .map(|m| (*m, r.gauge("veilgate_tunnels_active", "Tunnels open now, by mode.", &[("mode", m)])))
                .collect(),
            ended: HashMap::new(),
            bytes: HashMap::new(),
            duration: r.histogram("veilgate_tunnel_duration_seconds", "Tunnel lifetime from 200 to close."),
        };
        for mode in &modes {
            for outcome in OUTCOMES {
                let c = r.counter(
                    "veilgate_tunnels_total",
                    "Tunnels ended, by mode and outcome.",
                    &[("mode", mode), ("outcome", outcome)],
                );
                t.ended.insert((mode, outcome), c);
            }
            for dir in dirs {
                let c = r.counter(
                    "veilgate_tunnel_bytes_total",
                    "Bytes relayed through tunnels, by mode and direction (up = client to origin).",
                    &[("mode", mode), ("direction", dir)],
                );
                t.bytes.insert((mode, dir), c);
            }
        }
        t
    }
}

/// Refusals by reason, every reason in [`Refusal::REASONS`].
pub struct RefusalMetrics {
    by_reason: HashMap<&'static str, Counter>,
}

impl RefusalMetrics {
    fn new(r: &Reg) -> RefusalMetrics {
        RefusalMetrics {
            by_reason: Refusal::REASONS
                .iter()
                .map(|reason| {
                    (
                        *reason,
                        r.counter(
                            "veilgate_refusals_total",
                            "Requests refused, by reason: with an error status, or closed unanswered (proxy_protocol_*).",
                            &[("reason", reason)],
                        ),
                    )
                })
                .collect(),
        }
    }
}

/// Time to reach the upstream.
pub struct DialMetrics {
    /// Upstream connect time in seconds.
    pub upstream_connect: Histogram,
    /// DNS lookup time in seconds (only lookups that asked a resolver).
    pub dns_lookup: Histogram,
}

impl DialMetrics {
    fn new(r: &Reg) -> DialMetrics {
        DialMetrics {
            upstream_connect: r.histogram(
                "veilgate_upstream_connect_duration_seconds",
                "Time to connect to the upstream (happy eyeballs, all attempts).",
            ),
            dns_lookup: r
                .histogram("veilgate_dns_lookup_duration_seconds", "Time of DNS lookups that asked a resolver."),
        }
    }
}

/// The governor: time spent waiting for bandwidth, keys its limiters track.
pub struct LimitMetrics {
    throttle_wait: HashMap<(&'static str, &'static str), Gauge>,
    /// By limiter; `auth_attempts` is the authentication-attempt limiter's, set by the server
    /// with the others.
    keys: HashMap<&'static str, Gauge>,
}

impl LimitMetrics {
    fn new(r: &Reg) -> LimitMetrics {
        let dirs = [Direction::Up.as_str(), Direction::Down.as_str()];
        let mut l = LimitMetrics {
            throttle_wait: HashMap::new(),
            keys: ["clients", "new_tunnel_rate", "auth_attempts"]
                .iter()
                .map(|l| {
                    (
                        *l,
                        r.gauge(
                            "veilgate_limiter_keys",
                            "Keys tracked by a limiter (per-client state).",
                            &[("limiter", l)],
                        ),
                    )
                })
                .collect(),
        };
        for scope in Scope::ALL {
            for dir in dirs {
                // Seconds are fractional and `metrics` counters are integers, so this is a gauge
                // that only grows: use rate() on it like a counter.
                let c = r.gauge(
                    "veilgate_throttle_wait_seconds",
                    "Cumulative seconds tunnels spent waiting for bandwidth budget, by scope and direction (only grows).",
                    &[("scope", scope.as_str()), ("direction", dir)],
                );
                l.throttle_wait.insert((scope.as_str(), dir), c);
            }
        }
        l
    }
}

/// Proxy authentication's cost.
pub struct AuthMetrics {
    /// bcrypt verifications computed (each a slow hash; cache answers are not counted).
    pub hashes: Counter,
}

impl AuthMetrics {
    fn new(r: &Reg) -> AuthMetrics {
        AuthMetrics {
            hashes: r.counter(
                "veilgate_auth_hashes_total",
                "bcrypt verifications computed for proxy authentication (cache answers not counted).",
                &[],
            ),
        }
    }
}

/// The admin listener's own bounds.
pub struct AdminMetrics {
    /// Admin connections over the admin listener's bounds, closed at once.
    pub refused: Counter,
}

impl AdminMetrics {
    fn new(r: &Reg) -> AdminMetrics {
        AdminMetrics {
            refused: r.counter(
                "veilgate_admin_connections_refused_total",
                "Admin connections closed at once because the admin listener held its most, in all or for that client.",
                &[],
            ),
        }
    }
}

/// Interception: leaves minted or reused, handshakes that failed.
pub struct MitmMetrics {
    /// MITM leaf certificates minted.
    pub certs_minted: Counter,
    /// MITM leaf certificates served from the cache.
    pub cert_cache_hits: Counter,
    tls_handshake_failures: HashMap<&'static str, Counter>,
}

impl MitmMetrics {
    fn new(r: &Reg) -> MitmMetrics {
        MitmMetrics {
            certs_minted: r.counter(
                "veilgate_mitm_certs_minted_total",
                "Leaf certificates minted for MITM routes.",
                &[],
            ),
            cert_cache_hits: r.counter(
                "veilgate_mitm_cert_cache_hits_total",
                "MITM leaf certificates served from the cache.",
                &[],
            ),
            tls_handshake_failures: ["client", "upstream"]
                .iter()
                .map(|side| {
                    let help = "TLS handshakes that failed in MITM mode, by side.";
                    (*side, r.counter("veilgate_tls_handshake_failures_total", help, &[("side", side)]))
                })
                .collect(),
        }
    }
}

/// Reloads by result, and the configured limits.
pub struct ConfigMetrics {
    reloads: HashMap<&'static str, Counter>,
    max_tunnels: Gauge,
}

impl ConfigMetrics {
    fn new(r: &Reg) -> ConfigMetrics {
        ConfigMetrics {
            reloads: ["ok", "error"]
                .iter()
                .map(|res| {
                    (
                        *res,
                        r.counter(
                            "veilgate_config_reloads_total",
                            "Configuration reloads, by result.",
                            &[("result", res)],
                        ),
                    )
                })
                .collect(),
            max_tunnels: r.gauge(
                "veilgate_config_max_tunnels",
                "Configured global tunnel cap (limits.max_tunnels); 0 when unlimited.",
                &[],
            ),
        }
    }
}

/// The cluster backend (DESIGN §4b): its decisions, their latency, Redis errors, the mode in
/// force. Cloned into the backend, which counts without going through [`Metrics`].
#[derive(Clone)]
pub struct ClusterMetrics {
    decisions: [Counter; 4],
    errors: [Counter; 3],
    /// Time of one admission decision in Redis, answered or not.
    pub decision_duration: Histogram,
    mode: [Gauge; 4],
    /// Leases renewed in Redis (each tunnel's lease, every third of `lease_ttl`).
    pub lease_renewals: Counter,
    /// Live instances at the last heartbeat: the N that fail mode `local` divides by.
    pub instances: Gauge,
    /// Bandwidth grants taken from Redis (about 100 ms of a client's rate each).
    pub grants: Counter,
}

impl ClusterMetrics {
    /// Decision results (`cluster_decisions_total{result}`): Redis admitted or refused; Redis
    /// failed (error or timeout) and the fail mode answered; the backend was backing off and
    /// the fail mode answered without asking.
    pub const RESULTS: [&'static str; 4] = ["admitted", "refused", "failed", "skipped"];
    /// Error kinds (`cluster_errors_total{kind}`).
    pub const ERROR_KINDS: [&'static str; 3] = ["timeout", "connection", "response"];
    /// Modes (`cluster_mode{mode}`): `redis` while Redis answers, else the fail mode in force.
    pub const MODES: [&'static str; 4] = ["redis", "local", "open", "closed"];

    fn new(r: &Reg) -> ClusterMetrics {
        ClusterMetrics {
            decisions: Self::RESULTS.map(|res| {
                r.counter(
                    "veilgate_cluster_decisions_total",
                    "Admission decisions of the cluster backend, by result (failed and skipped were answered by the fail mode).",
                    &[("result", res)],
                )
            }),
            errors: Self::ERROR_KINDS.map(|kind| {
                r.counter("veilgate_cluster_errors_total", "Redis calls that failed, by kind.", &[("kind", kind)])
            }),
            decision_duration: r.histogram(
                "veilgate_cluster_decision_duration_seconds",
                "Time of one admission decision in Redis, answered or timed out.",
            ),
            mode: Self::MODES.map(|mode| {
                r.gauge(
                    "veilgate_cluster_mode",
                    "1 for the admission mode in force: redis, or the fail mode (local, open, closed); all 0 with backend local.",
                    &[("mode", mode)],
                )
            }),
            lease_renewals: r.counter(
                "veilgate_cluster_lease_renewals_total",
                "Tunnel leases renewed in Redis.",
                &[],
            ),
            instances: r.gauge(
                "veilgate_cluster_instances",
                "Live instances at the last heartbeat in Redis (fail mode local divides caps and rates by it).",
                &[],
            ),
            grants: r.counter(
                "veilgate_cluster_bandwidth_grants_total",
                "Bandwidth grants taken from Redis (about 100 ms of a client's rate each).",
                &[],
            ),
        }
    }

    /// Handles that count nothing, for a governor built without a registry (unit tests).
    pub fn noop() -> ClusterMetrics {
        ClusterMetrics {
            decisions: std::array::from_fn(|_| Counter::noop()),
            errors: std::array::from_fn(|_| Counter::noop()),
            decision_duration: Histogram::noop(),
            mode: std::array::from_fn(|_| Gauge::noop()),
            lease_renewals: Counter::noop(),
            instances: Gauge::noop(),
            grants: Counter::noop(),
        }
    }

    /// Counts one decision; `result` is one of [`ClusterMetrics::RESULTS`].
    pub fn decided(&self, result: &str) {
        if let Some(i) = Self::RESULTS.iter().position(|r| *r == result) {
            self.decisions[i].increment(1);
        }
    }

    /// Counts one failed Redis call; `kind` is one of [`ClusterMetrics::ERROR_KINDS`].
    pub fn error(&self, kind: &str) {
        if let Some(i) = Self::ERROR_KINDS.iter().position(|k| *k == kind) {
            self.errors[i].increment(1);
        }
    }

    /// Sets the mode in force; `mode` is one of [`ClusterMetrics::MODES`].
    pub fn mode(&self, mode: &str) {
        for (m, g) in Self::MODES.iter().zip(&self.mode) {
            g.set(if *m == mode { 1.0 } else { 0.0 });
        }
    }
}

impl Metrics {
    /// Builds the recorder and registers every series for these listeners.
    pub fn new(listeners: &[SocketAddr]) -> Metrics {
        let rec = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full("veilgate_tunnel_duration_seconds".into()), DURATION_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("connect_duration_seconds".into()), CONNECT_BUCKETS))
            .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("lookup_duration_seconds".into()), CONNECT_BUCKETS))
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Suffix("decision_duration_seconds".into()), CONNECT_BUCKETS)
            })
            .expect("bucket lists are not empty")
            .build_recorder();
        let rec = std::sync::Arc::new(rec);
        let r = Reg { rec: &rec };
        r.gauge(
            "veilgate_build_info",
            "Build information; the value is always 1.",
            &[("version", env!("CARGO_PKG_VERSION"))],
        )
        .set(1.0);
        Metrics {
            handle: rec.handle(),
            rec: std::sync::Arc::clone(&rec),
            listeners: ListenerMetrics::new(&r, listeners),
            tunnels: TunnelMetrics::new(&r),
            refusals: RefusalMetrics::new(&r),
            dial: DialMetrics::new(&r),
            limits: LimitMetrics::new(&r),
            auth: AuthMetrics::new(&r),
            admin: AdminMetrics::new(&r),
            mitm: MitmMetrics::new(&r),
            config: ConfigMetrics::new(&r),
            process: ProcessMetrics::new(&r),
            cluster: ClusterMetrics::new(&r),
        }
    }

    /// A counter labelled with a name the configuration gives (an egress pool's), registered
    /// at zero. Bounded: only the operator writes such names, never a client.
    pub fn config_counter(&self, name: &'static str, help: &'static str, label: (&'static str, String)) -> Counter {
        Reg { rec: &self.rec }.counter_owned(name, help, label)
    }

    /// The series of the parent proxy `name` (a name from `[[upstreams]]`, so the label set
    /// stays as small as the config): tunnels by outcome, registered at zero, and health.
    /// Registering again on reload returns the same series.
    pub fn upstream(&self, name: &str) -> UpstreamMetrics {
        let meta = Reg::meta();
        let tunnels = UPSTREAM_OUTCOMES.map(|outcome| {
            self.rec.describe_counter(
                KeyName::from_const_str("veilgate_upstream_tunnels_total"),
                None,
                SharedString::const_str("Tunnels dialled through a parent proxy, by parent and outcome."),
            );
            let labels = vec![Label::new("upstream", name.to_string()), Label::new("outcome", outcome)];
            self.rec.register_counter(&Key::from_parts("veilgate_upstream_tunnels_total", labels), &meta)
        });
        self.rec.describe_gauge(
            KeyName::from_const_str("veilgate_upstream_up"),
            None,
            SharedString::const_str("1 while a parent proxy is taken for tunnels, 0 while it is marked down."),
        );
        let up = self.rec.register_gauge(
            &Key::from_parts("veilgate_upstream_up", vec![Label::new("upstream", name.to_string())]),
            &meta,
        );
        UpstreamMetrics { tunnels, up }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        self.process.refresh();
        self.handle.render()
    }

    /// Periodic upkeep the exporter needs (histogram maintenance).
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// A connection was accepted on `listener`.
    pub fn accepted(&self, listener: SocketAddr) {
        if let Some(c) = self.listeners.accepted.get(&listener) {
            c.increment(1);
        }
    }

    /// A request was refused.
    pub fn refused(&self, r: &Refusal) {
        if let Some(c) = self.refusals.by_reason.get(r.reason()) {
            c.increment(1);
        }
    }

    /// A connection was closed unanswered.
    pub fn unanswered(&self, u: Unanswered) {
        if let Some(c) = self.refusals.by_reason.get(u.reason()) {
            c.increment(1);
        }
    }

    /// A PROXY protocol header was accepted (see [`PROXY_HEADERS`]).
    pub fn proxy_header(&self, kind: &'static str) {
        if let Some(c) = self.listeners.proxy_headers.get(kind) {
            c.increment(1);
        }
    }

    /// The active-tunnel gauge for a mode.
    pub fn tunnels_active(&self, mode: Mode) -> Gauge {
        self.tunnels.active.get(mode.as_str()).cloned().unwrap_or_else(Gauge::noop)
    }

    /// A tunnel ended.
    pub fn tunnel_ended(&self, mode: Mode, outcome: &'static str, duration: Duration) {
        if let Some(c) = self.tunnels.ended.get(&(mode.as_str(), outcome)) {
            c.increment(1);
        }
        self.tunnels.duration.record(duration.as_secs_f64());
    }

    /// The byte counter for a mode and direction (cloned into the tunnel's flows).
    pub fn bytes(&self, mode: Mode, dir: Direction) -> Counter {
        self.tunnels.bytes.get(&(mode.as_str(), dir.as_str())).cloned().unwrap_or_else(Counter::noop)
    }

    /// The throttle-wait accumulator for a scope and direction.
    pub fn throttle_wait(&self, scope: Scope, dir: Direction) -> Gauge {
        self.limits.throttle_wait.get(&(scope.as_str(), dir.as_str())).cloned().unwrap_or_else(Gauge::noop)
    }

    /// Sets the tracked-keys gauges.
    pub fn limiter_keys(&self, clients: usize, rate: usize) {
        if let Some(g) = self.limits.keys.get("clients") {
            g.set(clients as f64);
        }
        if let Some(g) = self.limits.keys.get("new_tunnel_rate") {
            g.set(rate as f64);
        }
    }

    /// Sets the tracked-keys gauge of the authentication-attempt limiter.
    pub fn auth_attempt_keys(&self, keys: usize) {
        if let Some(g) = self.limits.keys.get("auth_attempts") {
            g.set(keys as f64);
        }
    }

    /// Publishes the configured limits operators compare usage against.
    pub fn configured(&self, config: &crate::config::Config) {
        self.config.max_tunnels.set(f64::from(config.limits.max_tunnels.unwrap_or(0)));
    }

    /// A TLS handshake failed on `side` (`client` or `upstream`).
    pub fn tls_handshake_failed(&self, side: &'static str) {
        if let Some(c) = self.mitm.tls_handshake_failures.get(side) {
            c.increment(1);
        }
    }

    /// A reload finished.
    pub fn config_reloaded(&self, ok: bool) {
        if let Some(c) = self.config.reloads.get(if ok { "ok" } else { "error" }) {
            c.increment(1);
        }
    }
}
