//! Connecting: RFC 8305 (happy eyeballs) over the addresses that passed policy, a new
//! attempt every [`ATTEMPT_DELAY`] or as soon as one fails, the first to connect wins, all
//! under one deadline; every attempt is one [`connect_one`], which is where a source address
//! (an egress pool's) is bound.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

use super::{Cause, DialError, DialErrorKind, Hop, Source, Sources};

/// RFC 8305's recommended "Connection Attempt Delay".
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// One connection attempt from `source` to `addr`.
pub async fn connect_one(addr: SocketAddr, source: Source) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    match source {
        Source::Kernel => {}
        Source::Bind(ip) => socket.bind(SocketAddr::new(ip, 0))?,
        Source::Freebind(ip) => {
            freebind(&socket, ip.is_ipv6())?;
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        // The dialer drops such addresses before connecting; fail closed if one gets here.
        Source::Refuse => return Err(io::ErrorKind::AddrNotAvailable.into()),
    }
    socket.connect(addr).await
}

/// Lets the socket bind an address the host does not have: one drawn from a pool's prefix,
/// which a local route delivers to this host.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn freebind(socket: &TcpSocket, v6: bool) -> io::Result<()> {
    let sock = socket2::SockRef::from(socket);
    if v6 { sock.set_freebind_v6(true) } else { sock.set_freebind_v4(true) }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn freebind(_: &TcpSocket, _: bool) -> io::Result<()> {
    Err(io::ErrorKind::Unsupported.into())
}

/// RFC 8305 §4: alternate address families, starting with the first family the resolver gave.
pub fn interleave(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
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

pub async fn connect_happy(
    addrs: Vec<SocketAddr>,
    sources: Sources,
    deadline: Duration,
) -> Result<(TcpStream, SocketAddr), DialError> {
    if let [addr] = addrs[..] {
        // One address: nothing to race, so no task to spawn.
        return match tokio::time::timeout(deadline, connect_one(addr, sources.to(&addr))).await {
            Ok(Ok(s)) => Ok((s, addr)),
            Ok(Err(e)) => Err(connect_error(Some(&e))),
            Err(_) => Err(DialError { hop: Hop::Origin, kind: DialErrorKind::Timeout, cause: Cause::Deadline }),
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
                        attempts.spawn(async move { (a, connect_one(a, sources.to(&a)).await) });
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
                            attempts.spawn(async move { (a, connect_one(a, sources.to(&a)).await) });
                        }
                    }
                    Some(Err(_)) | None => {}
                },
                _ = tokio::time::sleep(ATTEMPT_DELAY), if pending.len() > 0 => {
                    if let Some(a) = pending.next() {
                        attempts.spawn(async move { (a, connect_one(a, sources.to(&a)).await) });
                    }
                }
            }
        }
    };
    match tokio::time::timeout(deadline, race).await {
        Ok(Ok(won)) => Ok(won),
        Ok(Err(e)) => Err(connect_error(e.as_ref())),
        Err(_) => Err(DialError { hop: Hop::Origin, kind: DialErrorKind::Timeout, cause: Cause::Deadline }),
    }
}

/// What a failed connect says: the kernel's own timeout is a timeout like ours; anything
/// else (refused, unreachable) is a failure to connect.
fn connect_error(e: Option<&io::Error>) -> DialError {
    let kind = if e.is_some_and(|e| e.kind() == io::ErrorKind::TimedOut) {
        DialErrorKind::Timeout
    } else {
        DialErrorKind::Failed
    };
    let cause = e.map_or(Cause::Io(io::ErrorKind::Other), |e| Cause::Io(e.kind()));
    DialError { hop: Hop::Origin, kind, cause }
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
    async fn an_attempt_leaves_from_the_bound_source() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = connect_one(l.local_addr().unwrap(), Source::Bind("127.0.0.7".parse().unwrap())).await.unwrap();
        let (_, peer) = l.accept().await.unwrap();
        assert_eq!(peer.ip(), "127.0.0.7".parse::<std::net::IpAddr>().unwrap());
        assert_eq!(s.local_addr().unwrap().ip(), peer.ip());
    }
}
