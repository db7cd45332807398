//! The way out: resolve at the proxy, check every address, connect to a checked one.
//!
//! A [`Dialer`] is built with each configuration snapshot, next to the ACL and the resolver,
//! and the tunnel reaches the outside only through [`Dialer::dial`]. The route chooses an
//! [`Egress`]: today the direct way (optionally from a chosen source address); a parent
//! proxy is one more variant, which is why a failure says which [`Hop`] failed, so a
//! parent's failure is never mistaken for the origin's. [`DialError::refusal`] is the one
//! place a failure becomes an answer on the wire.

mod connect;
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

/// How a tunnel leaves the proxy. A parent proxy (SOCKS5, HTTP) will be a second variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// Connect to the origin ourselves, from `bind` when set (an egress pool's address), else
    /// from whatever address the kernel picks.
    Direct {
        /// Source address.
        bind: Option<IpAddr>,
    },
}

impl Default for Egress {
    fn default() -> Egress {
        Egress::Direct { bind: None }
    }
}

/// Which step of the way out failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// Resolving the target's name.
    Resolve,
    /// Every address was refused by policy.
    Policy,
    /// Connecting to the origin.
    Origin,
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
}

/// A failed dial: the hop and what happened there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{hop:?}: {kind:?}")]
pub struct DialError {
    /// Where.
    pub hop: Hop,
    /// What.
    pub kind: DialErrorKind,
}

impl DialError {
    fn no_name() -> DialError {
        DialError { hop: Hop::Resolve, kind: DialErrorKind::NoAddress }
    }

    /// The answer on the wire (DESIGN §5): an address policy refuses is 403, a name with no
    /// usable answer 502, a connect that fails 502 and one that times out 504.
    pub fn refusal(&self) -> Refusal {
        match (self.hop, self.kind) {
            (_, DialErrorKind::Denied) => Refusal::AddressDenied,
            (Hop::Resolve, _) | (_, DialErrorKind::NoAddress) => Refusal::DnsFailed,
            (_, DialErrorKind::Timeout) => Refusal::UpstreamTimeout,
            (_, DialErrorKind::Failed) => Refusal::UpstreamFailed,
        }
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
    /// by `egress`.
    pub async fn dial(&self, target: &Target, egress: Egress) -> Result<Dialed, DialError> {
        let (ips, lookup_time) = match &target.host {
            Host::Ip(ip) => (vec![*ip], None),
            Host::Name(name) => {
                let r = self.resolver.resolve(name).await?;
                (r.addrs, r.lookup_time)
            }
        };
        let mut refused = false;
        let allowed: Vec<SocketAddr> = ips
            .into_iter()
            .map(|ip| SocketAddr::new(ip.to_canonical(), target.port))
            .filter(|a| {
                let ok = self.acl.check_addr(*a).is_ok();
                refused |= !ok;
                ok
            })
            .collect();
        if allowed.is_empty() {
            let kind = if refused { DialErrorKind::Denied } else { DialErrorKind::NoAddress };
            return Err(DialError { hop: Hop::Policy, kind });
        }
        let Egress::Direct { bind } = egress;
        let started = Instant::now();
        let (stream, addr) = connect::connect_happy(connect::interleave(allowed), bind, self.connect_timeout).await?;
        tune(&stream);
        Ok(Dialed { stream, addr, connect_time: started.elapsed(), lookup_time })
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
        let e = |hop, kind| DialError { hop, kind }.refusal();
        assert_eq!(e(Hop::Resolve, DialErrorKind::NoAddress), Refusal::DnsFailed);
        assert_eq!(e(Hop::Resolve, DialErrorKind::Timeout), Refusal::DnsFailed, "a DNS timeout is a 502");
        assert_eq!(e(Hop::Policy, DialErrorKind::Denied), Refusal::AddressDenied);
        assert_eq!(e(Hop::Policy, DialErrorKind::NoAddress), Refusal::DnsFailed);
        assert_eq!(e(Hop::Origin, DialErrorKind::Failed), Refusal::UpstreamFailed);
        assert_eq!(e(Hop::Origin, DialErrorKind::Timeout), Refusal::UpstreamTimeout);
    }
}
