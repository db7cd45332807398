//! The SOCKS5 client side (RFC 1928), with username/password authentication (RFC 1929).
//!
//! Every read is of a length the protocol fixes, so no byte of the tunnel is ever read here:
//! what the origin sends after the reply stays in the socket for the relay.

use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{Credentials, Progress};
use crate::dial::{Cause, DialError, DialErrorKind, Hop};

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0x00;
const USER_PASS: u8 = 0x02;
const NO_ACCEPTABLE: u8 = 0xff;
const CONNECT: u8 = 0x01;

/// What the parent is asked to connect to.
pub enum Dest<'a> {
    /// A name, sent unresolved (`socks5h`): the parent resolves it.
    Name(&'a str, u16),
    /// An address (a literal target, or one veilgate resolved and checked).
    Addr(SocketAddr),
}

fn parent(cause: Cause) -> DialError {
    DialError { hop: Hop::Parent, kind: DialErrorKind::Failed, cause }
}

fn io(e: std::io::Error) -> DialError {
    // A parent that closes mid-handshake is a parent failing (or not speaking SOCKS5).
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => parent(Cause::ParentProtocol),
        kind => parent(Cause::Io(kind)),
    }
}

/// The method negotiation and, when `auth` is given, the RFC 1929 exchange: what the health
/// check runs, and the first half of [`connect`].
pub async fn greet<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, auth: Option<&Credentials>) -> Result<(), DialError> {
    let method = if auth.is_some() { USER_PASS } else { NO_AUTH };
    s.write_all(&[VERSION, 1, method]).await.map_err(io)?;
    let mut reply = [0u8; 2];
    s.read_exact(&mut reply).await.map_err(io)?;
    if reply[0] != VERSION {
        return Err(parent(Cause::ParentProtocol));
    }
    if reply[1] == NO_ACCEPTABLE {
        // It wants credentials we have not got, or will not take the kind we offer.
        return Err(parent(Cause::ParentAuth));
    }
    if reply[1] != method {
        return Err(parent(Cause::ParentProtocol));
    }
    let Some(auth) = auth else { return Ok(()) };
    let (user, pass) = (auth.user.as_bytes(), auth.password.as_bytes());
    // Lengths are checked when the credentials are loaded (1-255 bytes each).
    let mut msg = Vec::with_capacity(3 + user.len() + pass.len());
    msg.push(1);
    msg.push(user.len() as u8);
    msg.extend_from_slice(user);
    msg.push(pass.len() as u8);
    msg.extend_from_slice(pass);
    s.write_all(&msg).await.map_err(io)?;
    let mut status = [0u8; 2];
    s.read_exact(&mut status).await.map_err(io)?;
    if status[1] != 0 {
        return Err(parent(Cause::ParentAuth));
    }
    Ok(())
}

/// The whole client handshake: greeting, credentials, CONNECT, reply. `progress` is told
/// when the request is out, so a deadline that passes while the parent works on the origin
/// is not blamed on the parent.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    auth: Option<&Credentials>,
    dest: Dest<'_>,
    progress: &Progress,
) -> Result<(), DialError> {
    greet(s, auth).await?;
    let mut req = vec![VERSION, CONNECT, 0];
    let port = match dest {
        Dest::Name(name, port) => {
            // Target names are at most 253 bytes (checked when the CONNECT head was parsed);
            // a longer one cannot be said in SOCKS5.
            let len = u8::try_from(name.len()).map_err(|_| parent(Cause::ParentProtocol))?;
            req.push(3);
            req.push(len);
            req.extend_from_slice(name.as_bytes());
            port
        }
        Dest::Addr(addr) => {
            match addr.ip().to_canonical() {
                IpAddr::V4(v4) => {
                    req.push(1);
                    req.extend_from_slice(&v4.octets());
                }
                IpAddr::V6(v6) => {
                    req.push(4);
                    req.extend_from_slice(&v6.octets());
                }
            }
            addr.port()
        }
    };
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await.map_err(io)?;
    progress.asked();
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await.map_err(io)?;
    if head[0] != VERSION {
        return Err(parent(Cause::ParentProtocol));
    }
    if head[1] != 0 {
        return Err(reply_error(head[1]));
    }
    // The bound address: read and dropped (its length depends on its type).
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len).await.map_err(io)?;
            usize::from(len[0]) + 2
        }
        _ => return Err(parent(Cause::ParentProtocol)),
    };
    let mut skip = [0u8; 257];
    s.read_exact(&mut skip[..rest]).await.map_err(io)?;
    Ok(())
}

/// A reply code as a failure. The parent answered, so it is up: what it reports is the
/// origin's failure, except a command or address type it cannot serve, which no retry of
/// ours will change.
fn reply_error(code: u8) -> DialError {
    let (hop, kind) = match code {
        6 => (Hop::Origin, DialErrorKind::Timeout),
        7 | 8 => (Hop::Parent, DialErrorKind::Failed),
        _ => (Hop::Origin, DialErrorKind::Failed),
    };
    DialError { hop, kind, cause: Cause::Socks(code) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_codes_name_the_hop() {
        assert_eq!(reply_error(5).hop, Hop::Origin);
        assert_eq!(reply_error(4).refusal(), crate::error::Refusal::UpstreamFailed);
        assert_eq!(reply_error(6).refusal(), crate::error::Refusal::UpstreamTimeout);
        assert_eq!(reply_error(8).refusal(), crate::error::Refusal::ParentFailed);
    }

    #[tokio::test]
    async fn a_name_goes_unresolved_and_bytes_after_the_reply_stay() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let server = tokio::spawn(async move {
            let mut g = [0u8; 3];
            b.read_exact(&mut g).await.unwrap();
            assert_eq!(g, [5, 1, 0]);
            b.write_all(&[5, 0]).await.unwrap();
            let mut r = [0u8; 5 + 9 + 2];
            b.read_exact(&mut r).await.unwrap();
            assert_eq!(&r[..5], &[5, 1, 0, 3, 9]);
            assert_eq!(&r[5..14], b"a.example");
            assert_eq!(&r[14..], &443u16.to_be_bytes());
            b.write_all(&[5, 0, 0, 1, 127, 0, 0, 1, 0, 80, b'h', b'i']).await.unwrap();
            b
        });
        let progress = Progress::default();
        connect(&mut a, None, Dest::Name("a.example", 443), &progress).await.unwrap();
        assert!(progress.was_asked());
        let mut hi = [0u8; 2];
        a.read_exact(&mut hi).await.unwrap();
        assert_eq!(&hi, b"hi");
        drop(server.await.unwrap());
    }

    #[tokio::test]
    async fn refused_credentials_say_so() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        tokio::spawn(async move {
            let mut g = [0u8; 3];
            b.read_exact(&mut g).await.unwrap();
            b.write_all(&[5, 2]).await.unwrap();
            let mut r = [0u8; 1 + 1 + 1 + 1 + 1];
            b.read_exact(&mut r).await.unwrap();
            b.write_all(&[1, 1]).await.unwrap();
        });
        let creds = Credentials { user: "u".into(), password: "p".into() };
        let e = greet(&mut a, Some(&creds)).await.unwrap_err();
        assert_eq!((e.hop, e.cause), (Hop::Parent, Cause::ParentAuth));
    }
}
