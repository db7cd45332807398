//! Resolve at the proxy, check every address, connect to a checked one.
//!
//! Special-use names are answered here without a query (RFC 6761): `localhost` and
//! `*.localhost` are loopback, `*.invalid` never exists. Static `[dns] hosts` come next, then
//! hickory-resolver with its cache, created on first use so a proxy that only ever sees
//! literals and static names never reads resolv.conf or sends a query.
//!
//! Connecting follows RFC 8305 (happy eyeballs): addresses interleaved IPv6/IPv4, a new
//! attempt every [`ATTEMPT_DELAY`] or as soon as one fails, the first to connect wins, all
//! under one `connect_timeout`.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use tokio::net::TcpStream;
use tokio::sync::OnceCell;
use tokio::task::JoinSet;

use crate::config::DnsConfig;
use crate::error::Refusal;
use crate::policy::Acl;
use crate::target::{Host, Target};

/// RFC 8305's recommended "Connection Attempt Delay".
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// Name resolution as configured in `[dns]`.
pub struct Resolver {
    hosts: HashMap<String, Vec<IpAddr>>,
    servers: Vec<SocketAddr>,
    timeout: Duration,
    cache_size: u64,
    hickory: OnceCell<Result<TokioResolver, String>>,
}

/// A lookup's result with the time it took (for the DNS histogram), when a query was made.
pub struct Resolved {
    /// Addresses in the order the resolver gave them.
    pub addrs: Vec<IpAddr>,
    /// Time spent asking a resolver; `None` when answered locally.
    pub lookup_time: Option<Duration>,
}

impl Resolver {
    /// A resolver for `[dns]`.
    pub fn new(dns: &DnsConfig) -> Resolver {
        Resolver {
            hosts: dns.hosts.iter().map(|(k, v)| (k.trim_end_matches('.').to_ascii_lowercase(), v.to_vec())).collect(),
            servers: dns.servers.clone(),
            timeout: dns.timeout.0,
            cache_size: dns.cache_size,
            hickory: OnceCell::new(),
        }
    }

    /// Resolves a normalised host name.
    pub async fn resolve(&self, name: &str) -> Result<Resolved, Refusal> {
        if name == "localhost" || name.ends_with(".localhost") {
            let addrs = vec![IpAddr::V6(Ipv6Addr::LOCALHOST), IpAddr::V4(Ipv4Addr::LOCALHOST)];
            return Ok(Resolved { addrs, lookup_time: None });
        }
        if name == "invalid" || name.ends_with(".invalid") {
            return Err(Refusal::DnsFailed);
        }
        if let Some(addrs) = self.hosts.get(name) {
            return Ok(Resolved { addrs: addrs.clone(), lookup_time: None });
        }
        let resolver = self.hickory.get_or_init(|| async { self.build_hickory() }).await.as_ref().map_err(|e| {
            tracing::error!(error = %e, "no DNS resolver available");
            Refusal::DnsFailed
        })?;
        let started = Instant::now();
        let lookup = tokio::time::timeout(self.timeout, resolver.lookup_ip(format!("{name}.")))
            .await
            .map_err(|_| Refusal::DnsFailed)?
            .map_err(|e| {
                // A string field, so text logs quote it: a resolver's answer can carry names.
                tracing::debug!(error = e.to_string(), "lookup failed");
                Refusal::DnsFailed
            })?;
        let addrs: Vec<IpAddr> = lookup.iter().collect();
        if addrs.is_empty() {
            return Err(Refusal::DnsFailed);
        }
        Ok(Resolved { addrs, lookup_time: Some(started.elapsed()) })
    }

    fn build_hickory(&self) -> Result<TokioResolver, String> {
        let mut builder = if self.servers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| format!("cannot read the system resolver configuration: {e}"))?
        } else {
            let servers = self
                .servers
                .iter()
                .map(|s| {
                    let mut ns = NameServerConfig::udp_and_tcp(s.ip());
                    for c in &mut ns.connections {
                        c.port = s.port();
                    }
                    ns
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts = builder.options_mut();
        opts.timeout = self.timeout;
        opts.cache_size = self.cache_size;
        builder.build().map_err(|e| format!("cannot build the DNS resolver: {e}"))
    }
}

/// A connected upstream.
pub struct Dialed {
    /// The socket, with TCP_NODELAY and keepalive set.
    pub stream: TcpStream,
    /// The address it is connected to (one that passed the ACL).
    pub addr: SocketAddr,
    /// Time spent connecting.
    pub connect_time: Duration,
    /// Time spent in DNS, when a query was made.
    pub lookup_time: Option<Duration>,
}

/// Resolves `target`, drops every address the ACL refuses, and connects to what is left.
pub async fn dial(
    target: &Target,
    resolver: &Resolver,
    acl: &Acl,
    connect_timeout: Duration,
) -> Result<Dialed, Refusal> {
    let (ips, lookup_time) = match &target.host {
        Host::Ip(ip) => (vec![*ip], None),
        Host::Name(name) => {
            let r = resolver.resolve(name).await?;
            (r.addrs, r.lookup_time)
        }
    };
    let mut first_refusal = None;
    let allowed: Vec<SocketAddr> = ips
        .into_iter()
        .map(|ip| SocketAddr::new(ip.to_canonical(), target.port))
        .filter(|a| match acl.check_addr(*a) {
            Ok(()) => true,
            Err(r) => {
                first_refusal.get_or_insert(r);
                false
            }
        })
        .collect();
    if allowed.is_empty() {
        return Err(first_refusal.unwrap_or(Refusal::DnsFailed));
    }
    let started = Instant::now();
    let (stream, addr) = connect_happy(interleave(allowed), connect_timeout).await?;
    tune(&stream);
    Ok(Dialed { stream, addr, connect_time: started.elapsed(), lookup_time })
}

/// RFC 8305 §4: alternate address families, starting with the first family the resolver gave.
fn interleave(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let first_v6 = addrs.first().is_some_and(SocketAddr::is_ipv6);
    let (mut a, mut b): (Vec<_>, Vec<_>) = addrs.into_iter().partition(|x| x.is_ipv6() == first_v6);
    a.reverse();
    b.reverse();
    let mut out = Vec::with_capacity(a.len() + b.len());
    while !a.is_empty() || !b.is_empty() {
        out.extend(a.pop());
        out.extend(b.pop());
    }
    out
}

async fn connect_happy(addrs: Vec<SocketAddr>, deadline: Duration) -> Result<(TcpStream, SocketAddr), Refusal> {
    if let [addr] = addrs[..] {
        // One address: nothing to race, so no task to spawn.
        return match tokio::time::timeout(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => Ok((s, addr)),
            Ok(Err(e)) => Err(connect_refusal(Some(&e))),
            Err(_) => Err(Refusal::UpstreamTimeout),
        };
    }
    let race = async {
        let mut pending = addrs.into_iter();
        let mut attempts: JoinSet<(SocketAddr, io::Result<TcpStream>)> = JoinSet::new();
        let mut last_err: Option<io::Error> = None;
        loop {
            if attempts.is_empty() {
                match pending.next() {
                    Some(a) => {
                        attempts.spawn(async move { (a, TcpStream::connect(a).await) });
                    }
                    None => return Err(last_err),
                }
            }
            tokio::select! {
                joined = attempts.join_next() => match joined {
                    Some(Ok((addr, Ok(stream)))) => return Ok((stream, addr)),
                    Some(Ok((addr, Err(e)))) => {
                        tracing::debug!(%addr, error = %e, "upstream attempt failed");
                        last_err = Some(e);
                        if let Some(a) = pending.next() {
                            attempts.spawn(async move { (a, TcpStream::connect(a).await) });
                        }
                    }
                    Some(Err(_)) | None => {}
                },
                _ = tokio::time::sleep(ATTEMPT_DELAY), if pending.len() > 0 => {
                    if let Some(a) = pending.next() {
                        attempts.spawn(async move { (a, TcpStream::connect(a).await) });
                    }
                }
            }
        }
    };
    match tokio::time::timeout(deadline, race).await {
        Ok(Ok(won)) => Ok(won),
        Ok(Err(e)) => Err(connect_refusal(e.as_ref())),
        Err(_) => Err(Refusal::UpstreamTimeout),
    }
}

/// The refusal for a failed connect: the kernel's own timeout is a 504 like ours; anything
/// else (refused, unreachable) is a 502.
fn connect_refusal(e: Option<&io::Error>) -> Refusal {
    if e.is_some_and(|e| e.kind() == io::ErrorKind::TimedOut) {
        Refusal::UpstreamTimeout
    } else {
        Refusal::UpstreamFailed
    }
}

/// TCP_NODELAY (a tunnel carries interactive protocols; the endpoints batch for themselves)
/// and keepalive (so a vanished peer does not pin a tunnel for ever).
/// Urgent data is kept inline (SO_OOBINLINE): a blind tunnel relays the urgent byte as one
/// more byte of the stream, where it was sent, instead of losing it to an out-of-band read;
/// the splice relay depends on this to step over the urgent mark (see `splice::splice_in`).
pub fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let sock = socket2::SockRef::from(stream);
    let _ = sock.set_tcp_keepalive(&keepalive());
    let _ = sock.set_out_of_band_inline(true);
}

/// Keepalive probes after a minute of silence, every 15 s.
pub fn keepalive() -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)).with_interval(Duration::from_secs(15))
}

/// Sets the receive buffer of a socket (the kernel doubles the value and stops autotuning).
pub fn set_receive_buffer(stream: &TcpStream, bytes: usize) {
    let _ = socket2::SockRef::from(stream).set_recv_buffer_size(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaves_families() {
        let a: Vec<SocketAddr> =
            ["[::1]:1", "[::2]:1", "127.0.0.1:1", "127.0.0.2:1"].iter().map(|s| s.parse().unwrap()).collect();
        let got: Vec<String> = interleave(a).iter().map(ToString::to_string).collect();
        assert_eq!(got, ["[::1]:1", "127.0.0.1:1", "[::2]:1", "127.0.0.2:1"]);
    }

    #[tokio::test]
    async fn special_use_names_are_answered_locally() {
        let r = Resolver::new(&DnsConfig::default());
        assert!(r.resolve("localhost").await.unwrap().addrs.iter().all(IpAddr::is_loopback));
        assert!(r.resolve("a.b.localhost").await.unwrap().lookup_time.is_none());
        assert_eq!(r.resolve("nothing.invalid").await.err(), Some(Refusal::DnsFailed));
        assert!(r.hickory.get().is_none(), "no resolver was built");
    }
}
