//! The cluster backend (DESIGN §4b): tunnel caps and the new-tunnel rate shared by every
//! instance through one Redis, as leases with expiry.
//!
//! A tunnel's place is a lease `instance:seq` in the sorted set of each scope it counts in,
//! scored by its expiry on the Redis clock. One script per client decides the client's cap,
//! the route's cap and the new-tunnel GCRA, all in the client's hash slot, before it writes
//! anything. The global cap is a second set in a slot of its own: a Redis Cluster cannot run
//! one script over both, so the global lease is taken first (the cheaper refusal, 503, as on
//! the local backend) and given back when the client's script then refuses. A tunnel refused
//! by the client's script held a global place for one round trip at most, which only ever
//! errs towards refusing; a refusal by the global cap never spends a client's rate token.
//!
//! The local backend still runs for every tunnel, with no caps ([`Share::Pools`]): it makes
//! the pools the byte budgets live in, and keeps the counts the fail mode needs. Dropping
//! a lease cannot await Redis: it hands the lease to the background task ([`leases`]),
//! which batches releases and renews every live lease in one pipeline per third of
//! `lease_ttl`. A killed instance renews nothing, so its leases expire within `lease_ttl`.
//!
//! Every decision waits at most `cluster.timeout`. After [`ERRORS_TO_BACK_OFF`] failures in
//! a row (or one failed renewal) the backend stops asking and the fail mode answers; the
//! background task tries Redis again every [`BACK_OFF`], re-registers every live lease
//! (those admitted by the fail mode too) and only then lets admissions ask Redis again.
//! Running tunnels are never cut.
//!
//! Redis is one node (`cluster.redis_url`) or a Redis Cluster (`cluster.redis_cluster_nodes`):
//! every script touches one slot, and the batches of the background task are split by slot
//! on a cluster ([`conn`]).

mod conn;
mod grants;
mod keys;
mod leases;
mod scripts;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use conn::{Conn, LazyCluster};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::local::{Local, Share};
use super::{AdmitRequest, Lease};
use crate::config::{ClusterConfig, FailMode};
use crate::error::Refusal;
use crate::metrics::ClusterMetrics;
use keys::ClientKeys;
use leases::Msg;

/// Failed decisions in a row that make the backend stop asking Redis.
pub const ERRORS_TO_BACK_OFF: u32 = 3;
/// How long the backend stops asking after that, between two tries of the background task.
pub const BACK_OFF: Duration = Duration::from_secs(1);

/// A tunnel's leases in Redis: its id and every set it is in.
#[derive(Debug, Clone)]
pub(super) struct LeaseKeys {
    id: String,
    client: Option<ClientKeys>,
    global: bool,
}

/// A lease held in Redis; dropping it hands the release to the background task.
pub(super) struct Held {
    seq: u64,
    tx: mpsc::UnboundedSender<Msg>,
}

impl Drop for Held {
    fn drop(&mut self) {
        // Fails only when the backend is gone, and then its leases expire on their own.
        let _ = self.tx.send(Msg::Release(self.seq));
    }
}

/// What the admission path and the background task share.
pub(super) struct Inner {
    conn: Conn,
    config: ClusterConfig,
    instance: String,
    seq: AtomicU64,
    /// True while the fail mode answers: from start until Redis first answers, and after
    /// repeated errors until the background task has re-registered the leases.
    down: AtomicBool,
    errors: AtomicU32,
    /// Live instances at the last heartbeat (at least 1): the N of fail mode `local`.
    instances: AtomicU32,
    tx: mpsc::UnboundedSender<Msg>,
    metrics: ClusterMetrics,
}

/// The Redis-backed backend, with the local one it keeps for pools and the fail mode.
pub struct Cluster {
    pub(super) local: Arc<Local>,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
    feeder: tokio::task::JoinHandle<()>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.task.abort();
        self.feeder.abort();
    }
}

impl Cluster {
    /// Starts the backend: no connection is awaited here (a Redis that is down at start-up
    /// only means the fail mode answers until it is up), the background task connects.
    ///
    /// Must run inside a tokio runtime. Fails only for a URL that `Config::validate` let
    /// through but the client cannot use.
    pub fn start(
        local: Arc<Local>,
        config: &ClusterConfig,
        metrics: ClusterMetrics,
    ) -> Result<Cluster, redis::RedisError> {
        // Decisions are bounded by `timeout` around each call; the connection's own deadline
        // is the background chores', which send larger pipelines.
        let chore = chore_deadline(config);
        let conn = if config.redis_cluster_nodes.is_empty() {
            let url = config.redis_url.as_ref().map_or("", |u| u.0.as_str());
            let client = redis::Client::open(url)?;
            Conn::Single(ConnectionManager::new_lazy_with_config(
                client,
                ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(chore))
                    .set_response_timeout(Some(chore))
                    .set_number_of_retries(1)
                    .set_max_delay(BACK_OFF),
            )?)
        } else {
            let nodes: Vec<&str> = config.redis_cluster_nodes.iter().map(|u| u.0.as_str()).collect();
            Conn::Cluster(Arc::new(LazyCluster::new(conn::cluster_client(&nodes, chore)?)))
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            conn,
            config: config.clone(),
            instance: instance_id(),
            seq: AtomicU64::new(0),
            down: AtomicBool::new(true),
            errors: AtomicU32::new(0),
            instances: AtomicU32::new(1),
            tx,
            metrics,
        });
        inner.metrics.mode(config.fail_mode.as_str());
        info!(
            redis = %config.redis_url.as_ref().map(|u| u.redacted()).unwrap_or_default(),
            redis_cluster_nodes = ?config.redis_cluster_nodes,
            instance = %inner.instance,
            fail_mode = config.fail_mode.as_str(),
            "cluster backend starting; the fail mode answers until Redis does"
        );
        let task = tokio::spawn(leases::run(Arc::clone(&inner), rx));
        let feeder = tokio::spawn(grants::run(Arc::clone(&inner), Arc::downgrade(&local)));
        Ok(Cluster { local, inner, task, feeder })
    }

    /// The configuration it was started with; a reload cannot change it.
    pub(super) fn config(&self) -> &ClusterConfig {
        &self.inner.config
    }

    /// Admits one tunnel: Redis decides the caps and rate, the local backend makes the pools.
    pub(super) async fn admit(&self, req: &AdmitRequest<'_>) -> Result<Lease, Refusal> {
        let inner = &self.inner;
        if inner.down.load(Ordering::Relaxed) {
            inner.metrics.decided("skipped");
            return self.fallback(req);
        }
        let mut lease = self.local.admit_with(req, Share::Pools)?;
        let settings = self.local.settings.load();
        let limits = &settings.limits;
        let route_cap = req.route.and_then(|r| settings.routes.get(r)).and_then(|l| l.max_tunnels);
        let pc = &limits.per_client;
        let rate = pc.new_tunnels_per_second.map(|r| (r, pc.new_tunnels_burst.unwrap_or(r)));
        let client_limited = pc.max_tunnels.is_some() || rate.is_some() || route_cap.is_some();
        if limits.max_tunnels.is_none() && !client_limited {
            return Ok(lease);
        }
        let seq = inner.seq.fetch_add(1, Ordering::Relaxed);
        let keys = LeaseKeys {
            id: format!("{}:{seq}", inner.instance),
            client: client_limited.then(|| ClientKeys::new(req.client, route_cap.and(req.route.map(|r| &**r)))),
            global: limits.max_tunnels.is_some(),
        };
        let ask = Ask {
            global_cap: limits.max_tunnels,
            client_cap: pc.max_tunnels,
            route_cap,
            rate: rate.map(|(r, b)| (1000.0 / f64::from(r.get()), b.get())),
        };
        let started = Instant::now();
        let answer = tokio::time::timeout(inner.config.timeout.0, inner.decide(&keys, &ask)).await;
        inner.metrics.decision_duration.record(started.elapsed());
        match answer {
            Ok(Ok(None)) => {
                inner.answered();
                inner.metrics.decided("admitted");
                let _ = inner.tx.send(Msg::Held(seq, keys));
                lease.cluster = Some(Held { seq, tx: inner.tx.clone() });
                Ok(lease)
            }
            Ok(Ok(Some(refusal))) => {
                inner.answered();
                inner.metrics.decided("refused");
                Err(refusal)
            }
            Ok(Err(e)) => self.failed(req, keys, lease, error_kind(&e), &e),
            Err(_) => self.failed(req, keys, lease, "timeout", &"no answer within cluster.timeout"),
        }
    }

    /// A decision Redis did not give: counted, its possible leases forgotten (the script may
    /// have run after the deadline), and the fail mode answers.
    fn failed(
        &self,
        req: &AdmitRequest<'_>,
        keys: LeaseKeys,
        lease: Lease,
        kind: &'static str,
        error: &dyn std::fmt::Display,
    ) -> Result<Lease, Refusal> {
        drop(lease);
        let _ = self.inner.tx.send(Msg::Forget(keys));
        self.inner.metrics.decided("failed");
        self.inner.failed(kind, error);
        self.fallback(req)
    }

    /// The fail mode's answer. A tunnel it admits gets a lease too (not yet in Redis): the
    /// background task writes it when Redis is back, so recovered counts include it.
    fn fallback(&self, req: &AdmitRequest<'_>) -> Result<Lease, Refusal> {
        let inner = &self.inner;
        let share = match inner.config.fail_mode {
            FailMode::Closed => return Err(Refusal::ClusterUnavailable),
            FailMode::Open => Share::Whole,
            FailMode::Local => {
                Share::Part(NonZeroU32::new(inner.instances.load(Ordering::Relaxed)).unwrap_or(NonZeroU32::MIN))
            }
        };
        let mut lease = self.local.admit_with(req, share)?;
        let settings = self.local.settings.load();
        let limits = &settings.limits;
        let route_cap = req.route.and_then(|r| settings.routes.get(r)).and_then(|l| l.max_tunnels);
        let pc = &limits.per_client;
        let client_capped = pc.max_tunnels.is_some() || route_cap.is_some();
        if client_capped || limits.max_tunnels.is_some() {
            let seq = inner.seq.fetch_add(1, Ordering::Relaxed);
            let keys = LeaseKeys {
                id: format!("{}:{seq}", inner.instance),
                client: client_capped.then(|| ClientKeys::new(req.client, route_cap.and(req.route.map(|r| &**r)))),
                global: limits.max_tunnels.is_some(),
            };
            let _ = inner.tx.send(Msg::Held(seq, keys));
            lease.cluster = Some(Held { seq, tx: inner.tx.clone() });
        }
        Ok(lease)
    }

    /// Live instances at the last heartbeat.
    pub fn instances(&self) -> u32 {
        self.inner.instances.load(Ordering::Relaxed)
    }

    /// Whether Redis decides now (false while the fail mode answers).
    pub fn answering(&self) -> bool {
        !self.inner.down.load(Ordering::Relaxed)
    }

    /// Whether every new tunnel is refused now: Redis does not answer and the fail mode is
    /// `closed`. `/readyz` says so, so a balancer takes the instance out of its pool.
    pub fn refuses_all(&self) -> bool {
        !self.answering() && self.inner.config.fail_mode == FailMode::Closed
    }
}

/// The limits one admission asks Redis about.
struct Ask {
    global_cap: Option<u32>,
    client_cap: Option<u32>,
    route_cap: Option<u32>,
    /// GCRA emission interval (ms) and burst.
    rate: Option<(f64, u32)>,
}

impl Inner {
    /// Asks Redis: the global lease first, then the client's script. `Ok(None)` = admitted.
    async fn decide(&self, keys: &LeaseKeys, ask: &Ask) -> Result<Option<Refusal>, redis::RedisError> {
        let mut conn = self.conn.clone();
        let ttl_ms = self.config.lease_ttl.0.as_millis() as u64;
        if let Some(cap) = ask.global_cap {
            let taken: i64 =
                scripts::TAKE.key(keys::GLOBAL_CONN).arg(&keys.id).arg(ttl_ms).arg(cap).invoke_async(&mut conn).await?;
            if taken == 0 {
                return Ok(Some(Refusal::GlobalCap));
            }
        }
        let Some(client) = &keys.client else { return Ok(None) };
        let mut call = scripts::ADMIT.key(&client.conn);
        call.key(&client.rate);
        if let Some(route) = &client.route {
            call.key(route);
        }
        let (interval, burst) = ask.rate.unwrap_or((0.0, 0));
        call.arg(&keys.id)
            .arg(ttl_ms)
            .arg(ask.client_cap.unwrap_or(0))
            .arg(ask.route_cap.unwrap_or(0))
            .arg(interval)
            .arg(burst);
        let (code, retry_ms): (i64, i64) = call.invoke_async(&mut conn).await?;
        let refusal = match code {
            scripts::code::ADMITTED => return Ok(None),
            scripts::code::CLIENT_CAP => Refusal::ClientCap,
            scripts::code::ROUTE_CAP => Refusal::RouteCap,
            scripts::code::RATE => {
                Refusal::ClientRate { retry_after: Duration::from_millis(u64::try_from(retry_ms).unwrap_or(0)) }
            }
            other => {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "admit script answered an unknown code",
                    other.to_string(),
                )));
            }
        };
        if keys.global {
            // The global place was taken for a tunnel the client's script refused.
            let _ = self.tx.send(Msg::Forget(LeaseKeys { id: keys.id.clone(), client: None, global: true }));
        }
        Ok(Some(refusal))
    }

    /// Redis answered: the run of errors is over.
    fn answered(&self) {
        if self.errors.load(Ordering::Relaxed) != 0 {
            self.errors.store(0, Ordering::Relaxed);
        }
    }

    /// One failed Redis call on the admission path; repeated ones start the back-off.
    fn failed(&self, kind: &'static str, error: &dyn std::fmt::Display) {
        self.metrics.error(kind);
        if self.errors.fetch_add(1, Ordering::Relaxed) + 1 >= ERRORS_TO_BACK_OFF {
            self.go_down(error);
        }
    }

    /// Stops asking Redis; logs once per change.
    fn go_down(&self, error: &dyn std::fmt::Display) {
        if !self.down.swap(true, Ordering::AcqRel) {
            warn!(
                %error,
                fail_mode = self.config.fail_mode.as_str(),
                "cluster backend: Redis is not answering; the fail mode admits until it does (running tunnels are kept)"
            );
            self.metrics.mode(self.config.fail_mode.as_str());
        }
    }

    /// Asks Redis again, after the background task re-registered the leases; logs once.
    fn go_up(&self, leases: usize, instances: u32) {
        self.errors.store(0, Ordering::Relaxed);
        if self.down.swap(false, Ordering::AcqRel) {
            info!(leases, instances, "cluster backend: Redis answers; cluster limits in force");
            self.metrics.mode("redis");
        }
    }
}

/// The label of a Redis error (`cluster_errors_total{kind}`).
fn error_kind(e: &redis::RedisError) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        "connection"
    } else {
        "response"
    }
}

/// Deadline of the background chores (renewal, releases): long enough for a large pipeline,
/// short enough that a stalled Redis delays the next renewal by a fraction of the lease.
fn chore_deadline(config: &ClusterConfig) -> Duration {
    (config.lease_ttl.0 / 6).max(config.timeout.0)
}

/// A random id for this instance's leases, new at every start, so a restarted instance never
/// renews a dead one's leases.
fn instance_id() -> String {
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    format!("{:016x}", h.finish())
}
