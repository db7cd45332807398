//! One client connection, from accept to close. [`Tunnel::run`] reads as the phase list of
//! DESIGN §1; each phase lives in its own module, and this file only sequences them, answers
//! refusals, and reports the outcome once.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::auth::Verdict;
use crate::config::{ClientAddressLog, Mode};
use crate::connect::ConnectRequest;
use crate::context::{Context, Shared};
use crate::dial::{self, Egress, Stream};
use crate::egress::Ask;
use crate::error::Refusal;
use crate::front::{ClientConn, ClientId, ClientIo};
use crate::limits::pending::PendingPermit;
use crate::limits::{AdmitRequest, ClientKey, Direction, Lease, bandwidth};
use crate::meter::{ActiveGuard, Meter};
use crate::mitm::observe::Observer;
use crate::policy::route;
use crate::relay::{self, End};
use crate::target::Target;

/// A client connection whose head has been read, being served.
pub struct Tunnel<C> {
    ctx: Arc<Context>,
    conn: C,
    client: ClientId,
    /// Held while the connection is in its head phase (until admission).
    pending: Option<PendingPermit>,
}

impl<C: ClientConn> Tunnel<C> {
    /// Takes over a connection from its front, after the head.
    pub fn new(ctx: Arc<Context>, conn: C, client: ClientId, pending: Option<PendingPermit>) -> Tunnel<C> {
        Tunnel { ctx, conn, client, pending }
    }

    /// Serves `req` to the tunnel's end, under the snapshot `shared` the head was read with.
    pub async fn run(mut self, shared: Arc<Shared>, req: ConnectRequest) {
        let ctx = Arc::clone(&self.ctx);
        let server = &shared.config.server;
        let (key, ask) = match &shared.auth {
            // A verified client certificate names the client when no [auth] user does.
            None => match &self.client.identity {
                Some(id) => (ClientKey::User(Arc::clone(id)), Ask::default()),
                None => (shared.client_key(self.client.addr.ip()), Ask::default()),
            },
            Some(auth) => {
                // Before the credentials are even looked at: they have crossed in the clear
                // already, and a 407 would only ask for them again.
                if !self.conn.secure() && shared.config.auth.as_ref().is_some_and(|a| a.require_tls) {
                    return self.refuse(Refusal::TlsRequired, &req).await;
                }
                let from = shared.client_key(self.client.addr.ip());
                let hashes = &ctx.metrics.auth.hashes;
                match auth.check(req.proxy_authorization.as_deref(), &from, &ctx.governor, hashes).await {
                    Verdict::User(user) => (ClientKey::User(user), Ask::default()),
                    Verdict::Session(user, ask) => (ClientKey::User(user), ask),
                    Verdict::Denied => return self.refuse(Refusal::AuthRequired, &req).await,
                    Verdict::BadParameter => return self.refuse(Refusal::AuthSessionParam, &req).await,
                    Verdict::Busy => return self.refuse(Refusal::AuthBusy, &req).await,
                    Verdict::TooManyAttempts { retry_after } => {
                        return self.refuse(Refusal::AuthAttempts { retry_after }, &req).await;
                    }
                }
            }
        };
        let route = route::lookup(&shared.config.routes, &req.target);
        // Decided here, so a denied route never gets as far as a relay.
        let intercept = match route.mode {
            Mode::Deny => return self.refuse(Refusal::RouteDenied, &req).await,
            Mode::Tunnel => false,
            Mode::Mitm => true,
        };
        // Before admission: a target policy refuses costs the client no rate token and no
        // place under its cap, and the cluster backend is not asked about it.
        if let Err(r) = shared.acl.check_target(&req.target) {
            return self.refuse(r, &req).await;
        }
        let admit = AdmitRequest { client: &key, route: route.index.and_then(|i| shared.route_ids.get(i)) };
        let lease = match ctx.governor.admit(admit).await {
            Ok(lease) => lease,
            Err(r) => return self.refuse(r, &req).await,
        };
        // Admitted: from here on the tunnel caps count this connection.
        self.pending = None;
        // The route's way out, while the client's key is at hand (the live view takes it): its
        // parent proxy when it names one (validation keeps pools off such routes), else a
        // source from its egress pool, else the kernel's.
        let parent = shared.parents.egress(route.index, &key);
        let choice = match parent {
            Egress::Parent(_) => None,
            _ => shared.egress.choose(&ctx.egress, route.index, &key, ask, &req.target).boxed(),
        };
        // In the live view from admission on (a failed dial leaves it again). The key moves
        // in here, so it is not carried through the dial and the relay.
        let live = shared
            .config
            .admin
            .inspect
            .then(|| ctx.inspect.register(key, self.client.addr.ip(), req.target.to_string(), route.mode));
        let egress = choice.as_ref().map_or(parent, |c| c.egress.clone());
        let dialed = shared.dialer.dial(&req.target, egress).await;
        shared.egress.dialed(choice.as_deref(), dialed.is_ok());
        let upstream = match dialed {
            Ok(d) => d,
            Err(e) => {
                let detail = crate::detail::Detail::cause(e.cause);
                return refuse_with(&self.ctx, &mut self.conn, &self.client, e.refusal(), Some(&req), &detail).await;
            }
        };
        if let (Some(bytes), Some(tcp)) = (receive_window(&lease, Direction::Up), self.conn.tcp()) {
            dial::set_receive_buffer(tcp, bytes);
        }
        if let Some(bytes) = receive_window(&lease, Direction::Down) {
            dial::set_receive_buffer(upstream.stream.tcp(), bytes);
        }
        ctx.metrics.dial.upstream_connect.record(upstream.connect_time.as_secs_f64());
        if let Some(t) = upstream.lookup_time {
            ctx.metrics.dial.dns_lookup.record(t.as_secs_f64());
        }
        if self.conn.established(req.minor_version).await.is_err() {
            debug!("client left before the 200");
            return;
        }
        let idle = server.idle_timeout.0;
        let handshake_deadline = server.header_timeout.0;
        let Tunnel { conn, client, .. } = self;
        let client_io = conn.into_io();
        let client = client.addr.ip();
        let report = Report {
            ctx: Arc::clone(&ctx),
            client,
            target: req.target.clone(),
            mode: route.mode,
            live,
            _egress: choice,
        };
        if intercept {
            // Validation keeps mitm routes off https:// parents, so this is a TCP stream.
            let Stream::Tcp(upstream) = upstream.stream else { return };
            // Boxed: the TLS handshakes' state is large, and a blind tunnel should not carry
            // room for it for its whole life.
            let conn = (client_io, req.leftover, upstream);
            Box::pin(report.intercept(shared, conn, lease, idle, handshake_deadline)).await;
        } else {
            drop(shared);
            match upstream.stream {
                Stream::Tcp(tcp) => report.relay_blind(client_io, tcp, req.leftover, lease, idle).await,
                // Inside TLS to an https:// parent: the portable relay, boxed so a plain tunnel
                // carries no room for it.
                Stream::Tls(tls) => {
                    let (client, upstream) = (tokio::io::split(client_io), tokio::io::split(*tls));
                    Box::pin(report.relay(client, upstream, req.leftover, lease, idle, None)).await;
                }
            }
        }
    }

    async fn refuse(&mut self, refusal: Refusal, req: &ConnectRequest) {
        refuse(&self.ctx, &mut self.conn, &self.client, refusal, Some(req)).await;
    }
}

/// The receive buffer to give the socket that `dir` reads from, when a budget applies.
///
/// A throttle pushes back on the sender by not reading. With the kernel's autotuned buffer
/// (megabytes on a fast path) the sender would first fill that buffer and feel no push-back
/// for seconds, so its own view of the rate, and the fairness among its tunnels, would be
/// off by whatever fit. About 1/16 s of the tightest rate is asked for (the kernel doubles
/// it for its overhead), and never less than this tunnel's chunk
/// ([`bandwidth::chunk_for`]), so one read finds a whole chunk waiting; fast budgets keep
/// autotuning.
///
/// The origin's side gets two chunks. With one, the buffer sat at the edge of full: the
/// origin's last segment before a zero window went unacknowledged past its loss probe, and
/// about half of all reads found half a chunk (strace: 1,034 of 2,158 reads were 64 KiB of
/// 128 KiB at 100 clients x 1 MiB/s), which doubles the chunks and their wake-ups. Nobody
/// watches the origin's progress, so the second chunk costs no accuracy; the client's side
/// keeps one, because what a client has sent into our buffer is what its upload meter shows.
fn receive_window(lease: &Lease, dir: Direction) -> Option<usize> {
    let tightest = lease.tightest_rate(dir)?;
    let chunks = match dir {
        Direction::Up => 1,
        Direction::Down => 2,
    };
    let chunk = lease.throttle(dir).max_chunk().unwrap_or(0) * chunks;
    let window = usize::try_from(tightest.bytes_per_sec() / 16).unwrap_or(usize::MAX).max(chunk);
    (window < bandwidth::AUTOTUNE_ABOVE).then(|| window.max(bandwidth::MIN_RCVBUF))
}

/// Answers a refusal in the client's front protocol, counts it and logs it once (within the
/// refusal log's rate limit). The one way a refusal reaches a client once its connection has
/// a task: the head phase and the tunnel's phases both come here.
pub(crate) async fn refuse<C: ClientConn>(
    ctx: &Context,
    conn: &mut C,
    client: &ClientId,
    refusal: Refusal,
    req: Option<&ConnectRequest>,
) {
    refuse_with(ctx, conn, client, refusal, req, &crate::detail::Detail::default()).await;
}

/// [`refuse`], with the facts that say why (see [`crate::detail`]) in its log line.
pub(crate) async fn refuse_with<C: ClientConn>(
    ctx: &Context,
    conn: &mut C,
    client: &ClientId,
    refusal: Refusal,
    req: Option<&ConnectRequest>,
    detail: &crate::detail::Detail,
) {
    let shared = ctx.shared();
    // Counted before the answer is written, so whoever has read the answer finds it counted
    // (a scrape right after a refusal, the tests).
    ctx.metrics.refused(&refusal);
    if shared.config.admin.inspect {
        ctx.inspect.refused(shared.client_key(client.addr.ip()));
    }
    conn.refuse(&refusal, shared.auth.as_ref().map(|a| a.realm())).await;
    if !ctx.refusal_log.allow(refusal.reason()) {
        return;
    }
    info!(
        client = client_field(client.addr.ip(), ctx.log_client()).as_deref(),
        target = req.map(|r| r.target.to_string()).as_deref(),
        status = refusal.status(),
        reason = refusal.reason(),
        cause = detail.cause.as_deref(),
        method = detail.method.as_deref(),
        scheme = detail.scheme.as_deref(),
        host = detail.host.as_deref(),
        "refused: {refusal}"
    );
}

/// Reports a tunnel's relay and its end, once.
struct Report {
    ctx: Arc<Context>,
    /// The client's address, for the log lines (the whole `ClientId` is three times its size,
    /// and every relay carries the report).
    client: IpAddr,
    target: Target,
    mode: Mode,
    /// The tunnel's place in the live view (`admin.inspect`); leaves it when the report goes.
    live: Option<crate::inspect::Registered>,
    /// The tunnel's egress pool choice, with the addresses an isolating pool lent it (free
    /// again when the report goes). Boxed: one pointer in every tunnel's state, and no
    /// allocation for a tunnel through no pool.
    _egress: Option<Box<crate::egress::Choice>>,
}

impl Report {
    /// Relays until the tunnel ends, then reports it. `watch` observes HTTP/1.1 (MITM only).
    async fn relay<CR, CW, UR, UW>(
        self,
        client: (CR, CW),
        upstream: (UR, UW),
        first_up: Vec<u8>,
        lease: Lease,
        idle: Duration,
        watch: Option<Observer>,
    ) where
        CR: AsyncRead + Unpin,
        CW: AsyncWrite + Unpin,
        UR: AsyncRead + Unpin,
        UW: AsyncWrite + Unpin,
    {
        let mut m = self.instruments(&lease, watch);
        let end = relay::relay(client, upstream, first_up, &mut m.up, &mut m.down, idle, &self.ctx.stop).await;
        self.finish(m, end);
        drop(lease);
    }

    /// An interception: both handshakes, then the plaintext relay with observation.
    async fn intercept<Io: ClientIo>(
        self,
        shared: Arc<Shared>,
        (client, leftover, upstream): (Io, Vec<u8>, TcpStream),
        lease: Lease,
        idle: Duration,
        deadline: Duration,
    ) {
        let ctx = Arc::clone(&self.ctx);
        let Some(interceptor) = shared.interceptor.as_ref() else {
            // Validation makes this unreachable; fail closed if it ever is not.
            return self.ended(Outcome::Relayed(End::Error), Instant::now(), 0, 0);
        };
        let started = Instant::now();
        match interceptor.intercept(client, leftover, upstream, &self.target, deadline).await {
            Ok(tls) => {
                if tls.minted {
                    ctx.metrics.mitm.certs_minted.increment(1);
                } else {
                    ctx.metrics.mitm.cert_cache_hits.increment(1);
                }
                // HTTP/2 is relayed and recorded as one opaque stream (the tunnel's own event).
                let h2 = tls.alpn.as_deref() == Some(b"h2");
                let watch = (!h2).then(|| Observer::new(&self.target.to_string(), interceptor.log_query));
                drop(shared);
                let (client, upstream) = (tokio::io::split(tls.client), tokio::io::split(tls.upstream));
                self.relay(client, upstream, Vec::new(), lease, idle, watch).await;
            }
            Err(e) => {
                ctx.metrics.tls_handshake_failed(e.side());
                warn!(
                    client = client_field(self.client, ctx.log_client()).as_deref(),
                    target = %self.target,
                    side = e.side(),
                    // Quoted in text logs: it can carry the client's SNI or the origin's names.
                    error = e.to_string(),
                    alert = e.alert(),
                    "interception refused"
                );
                self.ended(Outcome::TlsFailed, started, 0, 0);
            }
        }
    }

    /// A blind tunnel. The IO types choose the relay: a bare TCP client on Linux is spliced
    /// (zero-copy), any other client stream (or platform) goes through the portable relay.
    async fn relay_blind<Io: ClientIo>(
        self,
        client: Io,
        upstream: TcpStream,
        first_up: Vec<u8>,
        lease: Lease,
        idle: Duration,
    ) {
        #[cfg(target_os = "linux")]
        if let Some(tcp) = client.tcp() {
            let mut m = self.instruments(&lease, None);
            let stop = &self.ctx.stop;
            let end = crate::splice::relay_tcp(tcp, &upstream, first_up, &mut m.up, &mut m.down, idle, stop).await;
            self.finish(m, end);
            drop(lease);
            return;
        }
        let mut upstream = upstream;
        // Boxed: on TCP clients this path is never taken, and inline it would grow every
        // tunnel's state by its size.
        Box::pin(self.relay(tokio::io::split(client), upstream.split(), first_up, lease, idle, None)).await;
    }

    /// What a relay runs with: the active-tunnel guard and both directions' meters (with
    /// observers, in MITM mode). Every relay starts here and ends in [`Report::finish`].
    fn instruments(&self, lease: &Lease, watch: Option<Observer>) -> Instruments {
        let ctx = &self.ctx;
        Instruments {
            started: Instant::now(),
            _active: ActiveGuard::new(ctx.metrics.tunnels_active(self.mode)),
            up: Meter::new(ctx, lease, self.mode, Direction::Up, watch.as_ref().map(|o| o.side(true)), self.live()),
            down: Meter::new(
                ctx,
                lease,
                self.mode,
                Direction::Down,
                watch.as_ref().map(|o| o.side(false)),
                self.live(),
            ),
            watch,
        }
    }

    fn live(&self) -> Option<&Arc<crate::inspect::Live>> {
        self.live.as_ref().map(|l| l.live())
    }

    /// Closes the observation (MITM) and reports the relay's end.
    fn finish(&self, m: Instruments, end: End) {
        if let (Some(o), Some(d)) = (&m.watch, &m.down.observe) {
            o.finish(d);
        }
        self.ended(Outcome::Relayed(end), m.started, m.up.total, m.down.total);
    }

    fn ended(&self, outcome: Outcome, started: Instant, bytes_up: u64, bytes_down: u64) {
        let duration = started.elapsed();
        self.ctx.metrics.tunnel_ended(self.mode, outcome.as_str(), duration);
        info!(
            client = client_field(self.client, self.ctx.log_client()).as_deref(),
            target = %self.target,
            mode = self.mode.as_str(),
            outcome = outcome.as_str(),
            bytes_up,
            bytes_down,
            duration_ms = duration.as_millis() as u64,
            "tunnel closed"
        );
    }
}

/// A running relay's instruments; see [`Report::instruments`].
struct Instruments {
    started: Instant,
    _active: ActiveGuard,
    up: Meter,
    down: Meter,
    watch: Option<Observer>,
}

/// How a tunnel ended: its relay's end, or, for an interception, that it never got to
/// relaying. Kept out of the relay's [`End`], which knows nothing of TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Relayed(End),
    /// The interception's TLS handshakes did not complete.
    TlsFailed,
}

impl Outcome {
    /// Metric label (`tunnels_total{outcome}`, one of [`crate::metrics::OUTCOMES`]) and log field.
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Relayed(end) => end.as_str(),
            Outcome::TlsFailed => "tls_failed",
        }
    }
}

/// The client's address as `log.client_address` allows: absent, truncated or whole.
pub(crate) fn client_field(ip: IpAddr, mode: ClientAddressLog) -> Option<String> {
    match (mode, ip.to_canonical()) {
        (ClientAddressLog::Omit, _) => None,
        (ClientAddressLog::Full, ip) => Some(ip.to_string()),
        (ClientAddressLog::Truncate, IpAddr::V4(v4)) => {
            let [a, b, c, _] = v4.octets();
            Some(format!("{a}.{b}.{c}.0/24"))
        }
        (ClientAddressLog::Truncate, IpAddr::V6(v6)) => {
            let masked = std::net::Ipv6Addr::from(u128::from(v6) & (u128::MAX << 80));
            Some(format!("{masked}/48"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_is_registered() {
        let all = [
            Outcome::Relayed(End::Done),
            Outcome::Relayed(End::Idle),
            Outcome::Relayed(End::Error),
            Outcome::Relayed(End::Stopped),
            Outcome::TlsFailed,
        ];
        let labels: Vec<_> = all.iter().map(|o| o.as_str()).collect();
        assert_eq!(labels, crate::metrics::OUTCOMES);
    }

    #[test]
    fn client_addresses_follow_the_privacy_setting() {
        let v4: IpAddr = "203.0.113.77".parse().unwrap();
        let v6: IpAddr = "2001:db8:aa:bb::1".parse().unwrap();
        assert_eq!(client_field(v4, ClientAddressLog::Omit), None);
        assert_eq!(client_field(v4, ClientAddressLog::Truncate).as_deref(), Some("203.0.113.0/24"));
        assert_eq!(client_field(v6, ClientAddressLog::Truncate).as_deref(), Some("2001:db8:aa::/48"));
        assert_eq!(client_field(v4, ClientAddressLog::Full).as_deref(), Some("203.0.113.77"));
    }
}
#[cfg(test)]
mod size {
    /// Every idle tunnel carries its task's state, so the state's size is memory per idle
    /// tunnel: this guards the ~6 KiB budget against a phase that grows the future (boxing
    /// the MITM branch and the throttle's wait path, and pinning the relay's directions in
    /// place rather than moving them into the supervisor, is what keeps it down: 3.6 KiB).
    #[tokio::test]
    async fn a_tunnel_task_stays_small() {
        use crate::config::Config;
        use crate::context::{Context, Shared};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let shared = Shared::build(Config::default(), &[]).unwrap();
        let ctx = std::sync::Arc::new(Context::new(shared, vec![], &[]));
        let client = crate::front::ClientId::at("127.0.0.1:1".parse().unwrap());
        let fut = crate::front::h1::serve(ctx, c, client, None);
        let size = std::mem::size_of_val(&fut);
        eprintln!("tunnel future: {size} bytes");
        assert!(size < 4 * 1024, "tunnel future is {size} bytes");
    }
}
