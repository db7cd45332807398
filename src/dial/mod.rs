//! The way out: resolve at the proxy, check every address, connect to a checked one.
//!
//! A [`Dialer`] is built with each configuration snapshot, next to the ACL and the resolver,
//! and the tunnel reaches the outside only through [`Dialer::dial`]. The route chooses an
//! [`Egress`]: the direct way (optionally from a chosen source address), or a parent proxy
//! ([`parent`]), which is why a failure says which [`Hop`] failed, so a parent's failure is
//! never mistaken for the origin's. [`DialError::refusal`] is the one place a failure
//! becomes an answer on the wire.

mod connect;
pub mod parent;
mod resolve;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

pub use connect::{ATTEMPT_DELAY, connect_one};

pub use resolve::{Resolved, Resolver};

use crate::error::Refusal;
use crate::policy::Acl;
use crate::target::{Host, Target};

/// How a tunnel leaves the proxy.
#[derive(Debug, Clone)]
pub enum Egress {
    /// Connect to the origin ourselves, from `bind` when set, else from whatever address the
    /// kernel picks.
    Direct {
        /// Source address.
        bind: Option<IpAddr>,
    },
    /// Through a parent proxy, or one of a group's (`routes.upstream`). Boxed, so the
    /// direct way does not pay for it in every tunnel's state.
    Parent(Box<parent::ParentEgress>),
    /// Connect to the origin ourselves, from an egress pool's choice for each address
    /// family (see [`crate::egress`]): which family a name's answer brings is known only here.
    Pool(Sources),
}

impl Default for Egress {
    fn default() -> Egress {
        Egress::Direct { bind: None }
    }
}

/// A source for each address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sources {
    /// For IPv4 targets.
    pub v4: Source,
    /// For IPv6 targets.
    pub v6: Source,
}

impl Sources {
    /// The source for a connection to `addr`.
    pub fn to(&self, addr: &SocketAddr) -> Source {
        if addr.is_ipv4() { self.v4 } else { self.v6 }
    }
}

/// Where one connection leaves from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Source {
    /// The kernel's choice.
    #[default]
    Kernel,
    /// This address, configured on the host.
    Bind(IpAddr),
    /// This address, not configured on the host but routed to it (a pool's prefix): bound
    /// with IP_FREEBIND / IPV6_FREEBIND.
    Freebind(IpAddr),
    /// None: the pool has no address of this family and refuses to leave from another.
    Refuse,
}

/// Which step of the way out failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// Resolving the target's name.
    Resolve,
    /// Every address was refused by policy.
    Policy,
    /// Connecting to the origin (ourselves, or as a parent reports it).
    Origin,
    /// Reaching a parent proxy or its handshake (connect, TLS, greeting, credentials): the
    /// parent is marked down.
    Parent,
    /// Choosing the source: the egress pool has no address of the target's family.
    Source,
}

/// What went wrong at that step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialErrorKind {
    /// The name has no address.
    NoAddress,
    /// Policy refused every address (private range, CIDR rule, unspecified, our own).
    Denied,
    /// Refused, unreachable, reset.
    Failed,
    /// Did not finish in time.
    Timeout,
    /// Every parent the route may use is marked down.
    Unavailable,
    /// No source address of the target's family (the pool's `family_fallback = "refuse"`).
    NoSource,
}

/// A failed dial: the hop and what happened there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{hop:?}: {kind:?} ({cause})")]
pub struct DialError {
    /// Where.
    pub hop: Hop,
    /// What.
    pub kind: DialErrorKind,
    /// Why, as the system or the resolver said it: the refusal's log line carries it, so an
    /// operator can tell a closed port from a missing route or a name that does not exist.
    pub cause: Cause,
}

/// The underlying reason for a failed dial, in the words an operator would search for.
/// Copy and allocation-free: it rides in every [`DialError`], which is on the refusal path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The connect failed with this error from the kernel.
    Io(std::io::ErrorKind),
    /// Our own deadline (`connect_timeout` or `dns.timeout`) passed first.
    Deadline,
    /// The name does not exist (NXDOMAIN, or a special-use name that never exists).
    NxDomain,
    /// The name exists but has no address records.
    NoRecords,
    /// The resolver answered with this error code (SERVFAIL, REFUSED, ...).
    DnsCode(hickory_resolver::proto::op::ResponseCode),
    /// The resolver could not be reached or gave no answer in its own time.
    DnsTimeout,
    /// Any other resolver failure (I/O, protocol).
    DnsOther,
    /// No resolver could be built (unreadable resolv.conf).
    NoResolver,
    /// Policy refused every address the name has.
    Policy,
    /// A SOCKS5 parent answered with this reply code (RFC 1928 §6).
    Socks(u8),
    /// An HTTP parent answered its CONNECT with this status.
    ParentStatus(u16),
    /// The parent refused our credentials (or wants some and we have none).
    ParentAuth,
    /// The parent's answer does not follow the protocol of its URL.
    ParentProtocol,
    /// The TLS handshake with an `https://` parent failed (its certificate, most often).
    ParentTls,
    /// Every parent of the route is down until a health check passes.
    AllDown,
    /// The egress pool has no source address of the target's family.
    NoSourceFamily,
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::io::ErrorKind as K;
        let s = match self {
            Cause::Io(K::ConnectionRefused) => "connection refused",
            Cause::Io(K::ConnectionReset) => "connection reset",
            Cause::Io(K::HostUnreachable) => "host unreachable",
            Cause::Io(K::NetworkUnreachable) => "network unreachable",
            Cause::Io(K::TimedOut) => "connect timed out (kernel)",
            Cause::Io(K::AddrNotAvailable) => "source address not available",
            Cause::Io(K::PermissionDenied) => "connect not permitted",
            Cause::Io(kind) => return write!(f, "{kind}"),
            Cause::Deadline => "deadline passed",
            Cause::NxDomain => "NXDOMAIN",
            Cause::NoRecords => "no address records",
            // The mnemonic operators know (SERVFAIL, REFUSED), not hickory's prose.
            Cause::DnsCode(code) => return write!(f, "{}", format!("{code:?}").to_ascii_uppercase()),
            Cause::DnsTimeout => "DNS timeout",
            Cause::DnsOther => "DNS error",
            Cause::NoResolver => "no DNS resolver",
            Cause::Policy => "every address denied by policy",
            Cause::Socks(code) => return write!(f, "parent: {} (SOCKS reply {code})", socks_reply(*code)),
            Cause::ParentStatus(code) => return write!(f, "parent answered {code}"),
            Cause::ParentAuth => "the parent refused our credentials",
            Cause::ParentProtocol => "the parent does not speak the protocol of its URL",
            Cause::ParentTls => "TLS with the parent failed",
            Cause::AllDown => "every parent of the route is down until a health check passes",
            Cause::NoSourceFamily => "egress pool has no source address of the target's family",
        };
        f.write_str(s)
    }
}

/// RFC 1928 §6's words for a SOCKS5 reply code.
fn socks_reply(code: u8) -> &'static str {
    match code {
        1 => "general SOCKS server failure",
        2 => "connection not allowed by ruleset",
        3 => "network unreachable",
        4 => "host unreachable",
        5 => "connection refused",
        6 => "TTL expired",
        7 => "command not supported",
        8 => "address type not supported",
        _ => "unassigned reply code",
    }
}

impl DialError {
    fn no_name() -> DialError {
        DialError { hop: Hop::Resolve, kind: DialErrorKind::NoAddress, cause: Cause::NxDomain }
    }

    /// The answer on the wire (DESIGN §5): an address policy refuses is 403, a name with no
    /// usable answer 502, a connect that fails 502 and one that times out 504; a parent that
    /// fails is 502 under its own reason, and so is a route whose parents are all down.
    pub fn refusal(&self) -> Refusal {
        match (self.hop, self.kind) {
            (_, DialErrorKind::NoSource) => Refusal::EgressFamily,
            (_, DialErrorKind::Denied) => Refusal::AddressDenied,
            (_, DialErrorKind::Unavailable) => Refusal::ParentsDown,
            (Hop::Resolve, _) | (_, DialErrorKind::NoAddress) => Refusal::DnsFailed,
            (_, DialErrorKind::Timeout) => Refusal::UpstreamTimeout,
            (Hop::Parent, DialErrorKind::Failed) => Refusal::ParentFailed,
            (_, DialErrorKind::Failed) => Refusal::UpstreamFailed,
        }
    }
}

/// The stream a tunnel's upstream side relays on.
pub enum Stream {
    /// The origin's socket, or a parent's once its handshake is done: spliceable.
    Tcp(TcpStream),
    /// The tunnel inside TLS to an `https://` parent (boxed: its session state is large,
    /// and the plain case should not carry room for it).
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    /// The TCP socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Tcp(s) => s,
            Stream::Tls(t) => t.get_ref().0,
        }
    }
}

/// A connected upstream.
pub struct Dialed {
    /// The socket (TCP_NODELAY and keepalive set), or the TLS session to a parent on it.
    pub stream: Stream,
    /// The address it is connected to: one that passed the ACL, or the parent's.
    pub addr: SocketAddr,
    /// Time spent connecting.
    pub connect_time: Duration,
    /// Time spent in DNS, when a query was made.
    pub lookup_time: Option<Duration>,
}

/// Resolves, checks and connects, under one configuration snapshot.
pub struct Dialer {
    resolver: Resolver,
    acl: Arc<Acl>,
    connect_timeout: Duration,
}

impl Dialer {
    /// A dialer that resolves with `resolver`, admits addresses by `acl`, and gives every
    /// dial `connect_timeout` for all its attempts together.
    pub fn new(resolver: Resolver, acl: Arc<Acl>, connect_timeout: Duration) -> Dialer {
        Dialer { resolver, acl, connect_timeout }
    }

    /// Resolves `target`, drops every address the ACL refuses, and connects to what is left
    /// by `egress`; or has a parent proxy do it.
    pub async fn dial(&self, target: &Target, egress: Egress) -> Result<Dialed, DialError> {
        let sources = match egress {
            Egress::Direct { bind: None } => Sources { v4: Source::Kernel, v6: Source::Kernel },
            Egress::Direct { bind: Some(ip) } => Sources { v4: Source::Bind(ip), v6: Source::Bind(ip) },
            Egress::Pool(sources) => sources,
            // Boxed: a direct tunnel should not carry room for a parent's handshake.
            Egress::Parent(p) => return Box::pin(parent::dial(self, target, &p.via, p.client)).await,
        };
        // The lookup inline (not through `resolve_checked`): one less future nested in every
        // tunnel's state.
        let (ips, lookup_time) = match &target.host {
            Host::Ip(ip) => (vec![*ip], None),
            Host::Name(name) => {
                let r = self.resolver.resolve(name).await?;
                (r.addrs, r.lookup_time)
            }
        };
        let mut allowed = self.checked(ips, target.port)?;
        // Only an egress pool refuses a family (`family_fallback = "refuse"`).
        allowed.retain(|a| sources.to(a) != Source::Refuse);
        if allowed.is_empty() {
            return Err(DialError { hop: Hop::Source, kind: DialErrorKind::NoSource, cause: Cause::NoSourceFamily });
        }
        self.connect(allowed, sources, lookup_time).await
    }

    /// The target's addresses that pass the ACL (post-DNS), never empty, with the lookup's
    /// time when a resolver was asked: what a `socks5://` parent is given.
    async fn resolve_checked(&self, target: &Target) -> Result<(Vec<SocketAddr>, Option<Duration>), DialError> {
        let (ips, lookup_time) = match &target.host {
            Host::Ip(ip) => (vec![*ip], None),
            Host::Name(name) => {
                let r = self.resolver.resolve(name).await?;
                (r.addrs, r.lookup_time)
            }
        };
        Ok((self.checked(ips, target.port)?, lookup_time))
    }

    /// The addresses the ACL admits; an error when none is left.
    fn checked(&self, ips: Vec<IpAddr>, port: u16) -> Result<Vec<SocketAddr>, DialError> {
        let mut refused = false;
        let allowed: Vec<SocketAddr> = ips
            .into_iter()
            .map(|ip| SocketAddr::new(ip.to_canonical(), port))
            .filter(|a| {
                let ok = self.acl.check_addr(*a).is_ok();
                refused |= !ok;
                ok
            })
            .collect();
        if allowed.is_empty() {
            let (kind, cause) = if refused {
                (DialErrorKind::Denied, Cause::Policy)
            } else {
                (DialErrorKind::NoAddress, Cause::NoRecords)
            };
            return Err(DialError { hop: Hop::Policy, kind, cause });
        }
        Ok(allowed)
    }

    async fn connect(
        &self,
        allowed: Vec<SocketAddr>,
        sources: Sources,
        lookup_time: Option<Duration>,
    ) -> Result<Dialed, DialError> {
        let started = Instant::now();
        let (stream, addr) =
            connect::connect_happy(connect::interleave(allowed), sources, self.connect_timeout).await?;
        tune(&stream);
        Ok(Dialed { stream: Stream::Tcp(stream), addr, connect_time: started.elapsed(), lookup_time })
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
    fn each_failure_has_one_answer() {
        let e = |hop, kind| DialError { hop, kind, cause: Cause::Deadline }.refusal();
        assert_eq!(e(Hop::Resolve, DialErrorKind::NoAddress), Refusal::DnsFailed);
        assert_eq!(e(Hop::Resolve, DialErrorKind::Timeout), Refusal::DnsFailed, "a DNS timeout is a 502");
        assert_eq!(e(Hop::Policy, DialErrorKind::Denied), Refusal::AddressDenied);
        assert_eq!(e(Hop::Policy, DialErrorKind::NoAddress), Refusal::DnsFailed);
        assert_eq!(e(Hop::Origin, DialErrorKind::Failed), Refusal::UpstreamFailed);
        assert_eq!(e(Hop::Origin, DialErrorKind::Timeout), Refusal::UpstreamTimeout);
        assert_eq!(e(Hop::Parent, DialErrorKind::Failed), Refusal::ParentFailed);
        assert_eq!(e(Hop::Parent, DialErrorKind::Timeout), Refusal::UpstreamTimeout);
        assert_eq!(e(Hop::Parent, DialErrorKind::Unavailable), Refusal::ParentsDown);
        assert_eq!(e(Hop::Source, DialErrorKind::NoSource), Refusal::EgressFamily);
    }

    #[test]
    fn causes_read_as_the_operator_searches_for_them() {
        use hickory_resolver::proto::op::ResponseCode;
        use std::io::ErrorKind;
        assert_eq!(Cause::Io(ErrorKind::ConnectionRefused).to_string(), "connection refused");
        assert_eq!(Cause::Io(ErrorKind::NetworkUnreachable).to_string(), "network unreachable");
        assert_eq!(Cause::DnsCode(ResponseCode::ServFail).to_string(), "SERVFAIL");
        assert_eq!(Cause::NxDomain.to_string(), "NXDOMAIN");
        assert_eq!(Cause::DnsTimeout.to_string(), "DNS timeout");
        assert_eq!(Cause::Socks(5).to_string(), "parent: connection refused (SOCKS reply 5)");
        assert_eq!(Cause::ParentAuth.to_string(), "the parent refused our credentials");
    }
}
