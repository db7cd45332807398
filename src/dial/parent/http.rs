//! HTTP CONNECT to a parent proxy, in plaintext or inside TLS (`https://`).
//!
//! The reply head is read a byte at a time: the parent may send the origin's first bytes in
//! the same segment as its `200`, and those belong to the relay. A head is a few dozen
//! bytes, and over TLS each byte comes from the session's buffer, not a system call.

use base64::Engine;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{Credentials, Progress};
use crate::dial::{Cause, DialError, DialErrorKind, Hop};
use crate::target::Target;

/// Longest reply head accepted from a parent.
const MAX_HEAD: usize = 8192;

fn parent(cause: Cause) -> DialError {
    DialError { hop: Hop::Parent, kind: DialErrorKind::Failed, cause }
}

/// Sends `CONNECT target` with Proxy-Authorization from `auth`, and reads the parent's
/// answer: 200 is a tunnel; 407 means our credentials were refused; any other status is the
/// parent's report on the origin (it answered, so it is up).
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    target: &Target,
    auth: Option<&Credentials>,
    progress: &Progress,
) -> Result<(), DialError> {
    let authority = target.to_string();
    let mut req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(c) = auth {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.user, c.password));
        req.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.map_err(io)?;
    s.flush().await.map_err(io)?;
    progress.asked();
    let head = read_head(s).await?;
    match status(&head)? {
        200..=299 => Ok(()),
        407 => Err(parent(Cause::ParentAuth)),
        code @ (504 | 408) => {
            Err(DialError { hop: Hop::Origin, kind: DialErrorKind::Timeout, cause: Cause::ParentStatus(code) })
        }
        code => Err(DialError { hop: Hop::Origin, kind: DialErrorKind::Failed, cause: Cause::ParentStatus(code) }),
    }
}

fn io(e: std::io::Error) -> DialError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => parent(Cause::ParentProtocol),
        kind => parent(Cause::Io(kind)),
    }
}

async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> Result<Vec<u8>, DialError> {
    let mut head = Vec::with_capacity(128);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return Err(parent(Cause::ParentProtocol));
        }
        head.push(s.read_u8().await.map_err(io)?);
    }
    Ok(head)
}

/// The status code of `HTTP/1.x NNN ...`.
fn status(head: &[u8]) -> Result<u16, DialError> {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let bad = || parent(Cause::ParentProtocol);
    if !line.starts_with(b"HTTP/1.") || line.len() < 12 || line[8] != b' ' {
        return Err(bad());
    }
    std::str::from_utf8(&line[9..12]).ok().and_then(|c| c.parse().ok()).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn statuses_map_to_hops_and_bytes_after_the_head_stay() {
        async fn answer(reply: &'static [u8]) -> (Result<(), DialError>, Vec<u8>) {
            let (mut a, mut b) = tokio::io::duplex(4096);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 512];
                let n = b.read(&mut buf).await.unwrap();
                assert!(buf[..n].starts_with(b"CONNECT a.example:443 HTTP/1.1\r\n"));
                b.write_all(reply).await.unwrap();
            });
            let t = Target::parse("a.example:443").unwrap();
            let r = connect(&mut a, &t, None, &Progress::default()).await;
            let mut rest = Vec::new();
            let _ = a.read_to_end(&mut rest).await;
            (r, rest)
        }
        let (r, rest) = answer(b"HTTP/1.1 200 Connection Established\r\n\r\nbanner").await;
        assert!(r.is_ok());
        assert_eq!(rest, b"banner");
        assert_eq!(answer(b"HTTP/1.1 407 Proxy Auth\r\n\r\n").await.0.unwrap_err().cause, Cause::ParentAuth);
        let e = answer(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await.0.unwrap_err();
        assert_eq!((e.hop, e.refusal().status()), (Hop::Origin, 502));
        assert_eq!(answer(b"HTTP/1.1 504 Gateway Timeout\r\n\r\n").await.0.unwrap_err().refusal().status(), 504);
        assert_eq!(answer(b"SSH-2.0-x\r\n\r\n").await.0.unwrap_err().hop, Hop::Parent);
    }
}
