//! The proxy as a whole: bind listeners, accept, hand each connection to its front (which
//! runs one [`Tunnel`](crate::tunnel::Tunnel) per connection), and drain on shutdown.
//! [`Proxy::run`] is what `main` and the tests both call.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::context::{Context, LoadError, Shared};
use crate::{admin, dial, front};

/// How long tunnels get after the drain deadline to notice they were closed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Backlog of each listener.
const BACKLOG: i32 = 4096;

/// A proxy that could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// `[auth]` or `[mitm]` files could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
}

/// A bound proxy, ready to run.
pub struct Proxy {
    listeners: Vec<(SocketAddr, TcpListener, Kind)>,
    admin: Option<(SocketAddr, TcpListener)>,
    ctx: Arc<Context>,
}

/// Which front a proxy listener's connections start in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `server.listen`: HTTP/1 in the clear.
    Plain,
    /// `server.tls_listen`: TLS, then HTTP/1 inside it.
    Tls,
}

/// A handle to a running proxy: reload it, look at its state.
#[derive(Clone)]
pub struct Controller {
    ctx: Arc<Context>,
}

impl Proxy {
    /// Binds every listener in `config` (port 0 picks a free port) and compiles the config.
    pub async fn bind(config: Config) -> Result<Proxy, StartError> {
        let mut listeners = Vec::new();
        for addr in &config.server.listen {
            let l = listen(*addr).map_err(|source| StartError::Bind { addr: *addr, source })?;
            listeners.push((l.local_addr().unwrap_or(*addr), l, Kind::Plain));
        }
        for addr in &config.server.tls_listen {
            let l = listen(*addr).map_err(|source| StartError::Bind { addr: *addr, source })?;
            listeners.push((l.local_addr().unwrap_or(*addr), l, Kind::Tls));
        }
        let admin = match config.server.admin_listen {
            Some(addr) => {
                let l = listen(addr).map_err(|source| StartError::Bind { addr, source })?;
                Some((l.local_addr().unwrap_or(addr), l))
            }
            None => None,
        };
        let bound: Vec<SocketAddr> = listeners.iter().map(|(a, _, _)| *a).collect();
        let mut own = bound.clone();
        own.extend(admin.as_ref().map(|(a, _)| *a));
        // A wildcard listener is reachable through every local address, not only loopback.
        let wildcard_ports: Vec<u16> = own.iter().filter(|a| a.ip().is_unspecified()).map(SocketAddr::port).collect();
        if !wildcard_ports.is_empty() {
            for ip in interface_addresses() {
                own.extend(wildcard_ports.iter().map(|p| SocketAddr::new(ip, *p)));
            }
        }
        let shared = Shared::build(config, &own)?;
        let mut ctx = Context::new(shared, own, &bound);
        ctx.tls_listeners = listeners.iter().filter(|(_, _, k)| *k == Kind::Tls).map(|(a, _, _)| *a).collect();
        let ctx = Arc::new(ctx);
        Ok(Proxy { listeners, admin, ctx })
    }

    /// The plaintext proxy listeners' bound addresses.
    pub fn proxy_addrs(&self) -> Vec<SocketAddr> {
        self.addrs(Kind::Plain)
    }

    /// The TLS (HTTPS proxy) listeners' bound addresses.
    pub fn tls_addrs(&self) -> Vec<SocketAddr> {
        self.addrs(Kind::Tls)
    }

    fn addrs(&self, kind: Kind) -> Vec<SocketAddr> {
        self.listeners.iter().filter(|(_, _, k)| *k == kind).map(|(a, _, _)| *a).collect()
    }

    /// The admin listener's bound address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(a, _)| *a)
    }

    /// A handle for reloads and inspection.
    pub fn controller(&self) -> Controller {
        Controller { ctx: Arc::clone(&self.ctx) }
    }

    /// Serves until `shutdown` completes, then drains: stop accepting, let tunnels run up to
    /// `drain_timeout`, close the rest, return.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let ctx = self.ctx;
        let tracker = TaskTracker::new();
        let admin_stop = tokio_util::sync::CancellationToken::new();
        if let Some((addr, l)) = self.admin {
            info!(%addr, "admin listener up (/healthz /readyz /metrics)");
            tokio::spawn(admin::serve(l, Arc::clone(&ctx), admin_stop.clone()));
        }
        let sweeper = {
            let ctx2 = Arc::clone(&ctx);
            ctx.governor.local().start_sweeper(move |clients, rate| {
                ctx2.metrics.limiter_keys(clients, rate);
                ctx2.metrics.auth_attempt_keys(ctx2.governor.local().auth_attempt_keys());
            })
        };
        let upkeep = {
            let ctx2 = Arc::clone(&ctx);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    ctx2.metrics.upkeep();
                }
            })
        };
        // Summaries of refusal lines left out, once a flood of them has stopped.
        let refusal_log = {
            let ctx2 = Arc::clone(&ctx);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    ctx2.refusal_log.flush(false);
                }
            })
        };
        let mut accept_loops = Vec::new();
        for (addr, l, kind) in self.listeners {
            info!(%addr, tls = kind == Kind::Tls, "proxy listener up");
            accept_loops.push(tokio::spawn(accept_loop(l, addr, kind, Arc::clone(&ctx), tracker.clone())));
        }

        shutdown.await;
        ctx.unready.cancel();
        let delay = ctx.shared().config.server.drain_delay.0;
        if !delay.is_zero() {
            // Still accepting, but no longer ready: a balancer's health check sees the 503 and
            // moves new clients elsewhere before the port closes.
            info!(drain_delay = ?delay, "not ready; listeners close after drain_delay");
            tokio::time::sleep(delay).await;
        }
        let drain = ctx.shared().config.server.drain_timeout.0;
        info!(active = ctx.governor.active_tunnels(), drain_timeout = ?drain, "draining");
        ctx.draining.cancel();
        for l in accept_loops {
            let _ = l.await;
        }
        tracker.close();
        if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
            warn!(active = ctx.governor.active_tunnels(), "drain deadline passed; closing remaining tunnels");
            ctx.stop.cancel();
            let _ = tokio::time::timeout(STOP_GRACE, tracker.wait()).await;
        }
        admin_stop.cancel();
        upkeep.abort();
        refusal_log.abort();
        ctx.refusal_log.flush(true);
        drop(sweeper);
        info!("stopped");
    }
}

impl Controller {
    /// Applies a new configuration (see [`Context::reload`]) and says which keys changed;
    /// counted either way.
    pub fn reload(&self, config: Config) -> Result<crate::config::diff::Changes, LoadError> {
        let result = self.ctx.reload(config);
        self.ctx.metrics.config_reloaded(result.is_ok());
        result
    }

    /// Counts a reload that failed before it reached the proxy (the file did not parse).
    pub fn reload_failed(&self) {
        self.ctx.metrics.config_reloaded(false);
    }

    /// Tunnels admitted and not yet closed.
    pub fn active_tunnels(&self) -> u32 {
        self.ctx.governor.active_tunnels()
    }

    /// Active tunnels of the client at `ip` (under the current `ipv6_prefix`).
    pub fn active_for_ip(&self, ip: std::net::IpAddr) -> u32 {
        self.ctx.governor.local().active_for(&self.ctx.shared().client_key(ip))
    }

    /// Connections still in their head phase.
    pub fn pending_heads(&self) -> u32 {
        self.ctx.pending.count()
    }

    /// Connections of the client at `ip` in their head phase (counted once the client is
    /// known: at accept, or after its PROXY header).
    pub fn pending_for_ip(&self, ip: std::net::IpAddr) -> u32 {
        self.ctx.pending.for_client(&self.ctx.shared().client_key(ip))
    }

    /// Tracked per-client keys (client states, rate-limiter keys) after a sweep.
    pub fn sweep(&self) -> (usize, usize) {
        self.ctx.governor.local().sweep()
    }

    /// The metrics exposition, as `/metrics` serves it.
    pub fn render_metrics(&self) -> String {
        self.ctx.metrics.render()
    }
}

async fn accept_loop(listener: TcpListener, addr: SocketAddr, kind: Kind, ctx: Arc<Context>, tracker: TaskTracker) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = ctx.draining.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                ctx.metrics.accepted(addr);
                match kind {
                    Kind::Plain => front::h1::accepted(&ctx, &tracker, stream, peer),
                    Kind::Tls => front::tls::accepted(&ctx, &tracker, stream, peer),
                }
            }
            Err(e) if is_per_connection(&e) => {}
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS: the listener is fine; the process is short of
                // something. Back off so the loop does not spin, and keep serving.
                ctx.metrics.listeners.accept_errors.increment(1);
                error!(%addr, error = %e, backoff = ?backoff, "accept failed; backing off");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = ctx.draining.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// An accept error that concerns one connection only (the listener needs no back-off).
pub(crate) fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// The addresses of this host's interfaces (getifaddrs), for the never-dial-yourself check.
fn interface_addresses() -> Vec<std::net::IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we own until freeifaddrs; every node and
    // address pointer is checked for null and read according to its family.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut cur = head;
        while !cur.is_null() {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(addr as *const libc::sockaddr_in);
                        out.push(std::net::IpAddr::V4(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr as *const libc::sockaddr_in6);
                        out.push(std::net::IpAddr::V6(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
}

/// A listening socket with SO_REUSEADDR, IPV6_V6ONLY for IPv6 (so `[::]` and `0.0.0.0` can
/// both be listed) and a deep backlog. TCP_NODELAY, keepalive and SO_OOBINLINE (which the
/// splice relay needs to step over an urgent mark) are set here because accepted sockets
/// inherit them, which saves five system calls per tunnel.
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_tcp_nodelay(true)?;
    socket.set_tcp_keepalive(&dial::keepalive())?;
    socket.set_out_of_band_inline(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}
