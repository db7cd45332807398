//! The CONNECT head: read under a size cap and a deadline, parse with `httparse`, and keep
//! every byte read past the head (a pipelined ClientHello) so it goes upstream first.
//!
//! [`parse_head`] is pure (bytes in, verdict out) so it can be fuzzed and property-tested;
//! [`read_head`] adds the socket, the cap and the clock.

use std::time::Duration;

use bytes::BufMut;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::error::Refusal;
use crate::target::Target;

/// Most header lines accepted; more is treated like an oversized head (431).
pub const MAX_HEADERS: usize = 64;

/// A complete, valid CONNECT request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// Where the client wants to go.
    pub target: Target,
    /// HTTP minor version (0 or 1), echoed in our reply.
    pub minor_version: u8,
    /// The raw `Proxy-Authorization` value, if any. Never forwarded, never logged.
    pub proxy_authorization: Option<Vec<u8>>,
    /// Bytes the client sent after the head; they go upstream before anything else.
    pub leftover: Vec<u8>,
}

/// The outcome of parsing the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Partial,
    /// A CONNECT request; its head was this many bytes long.
    Complete(ConnectRequest),
}

/// Parses a head from `buf`. `Partial` means "read more"; refusals carry their status.
pub fn parse_head(buf: &[u8]) -> Result<Parsed, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            // A method we will refuse anyway is refused as soon as it is known, so a client
            // that sends a GET without finishing its head still gets its 405 now.
            return match req.method {
                Some(m) if m != "CONNECT" && buf.contains(&b' ') => Err(Refusal::MethodNotAllowed),
                _ => Ok(Parsed::Partial),
            };
        }
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::HeaderTooLarge),
        Err(e) => {
            return Err(Refusal::BadRequest(match e {
                httparse::Error::Version => "unsupported HTTP version",
                httparse::Error::Token | httparse::Error::HeaderName => "malformed header name or method",
                httparse::Error::HeaderValue => "malformed header value",
                httparse::Error::NewLine => "malformed line ending",
                _ => "malformed request line",
            }));
        }
    };
    let method = req.method.unwrap_or_default();
    if method != "CONNECT" {
        return Err(Refusal::MethodNotAllowed);
    }
    let authority = req.path.unwrap_or_default();
    let target = Target::parse(authority).map_err(|e| Refusal::BadRequest(e.reason()))?;
    let proxy_authorization =
        req.headers.iter().find(|h| h.name.eq_ignore_ascii_case("proxy-authorization")).map(|h| h.value.to_vec());
    Ok(Parsed::Complete(ConnectRequest {
        target,
        minor_version: req.version.unwrap_or(1),
        proxy_authorization,
        leftover: buf[head_len..].to_vec(),
    }))
}

/// Why no request came out of the socket.
#[derive(Debug)]
pub enum HeadError {
    /// Answer the client with this refusal.
    Refuse(Refusal),
    /// Not a CONNECT (405): what the request line said, for the log.
    NotConnect(crate::detail::Detail),
    /// The client went away before a complete head; there is nobody to answer.
    Closed,
}

/// Reads one CONNECT head: at most `max_bytes` bytes, all within `deadline`.
pub async fn read_head<R: AsyncRead + Unpin>(
    io: &mut R,
    max_bytes: usize,
    deadline: Duration,
) -> Result<ConnectRequest, HeadError> {
    read_head_after(io, Vec::new(), max_bytes, deadline).await
}

/// [`read_head`] for a connection some of whose head has been read already: `early`, the
/// bytes that followed a PROXY protocol header in the same read. They are parsed before the
/// socket is read, since they may hold the whole head, and its client may be waiting for the
/// answer.
pub async fn read_head_after<R: AsyncRead + Unpin>(
    io: &mut R,
    early: Vec<u8>,
    max_bytes: usize,
    deadline: Duration,
) -> Result<ConnectRequest, HeadError> {
    let read = async {
        // One read may bring the head and the start of the client's payload (a ClientHello);
        // room is left past the cap so that payload is kept, not re-read. Reads go straight
        // into the growing buffer, so no scratch array lives in every connection's state.
        let limit = max_bytes + 2048;
        let mut buf = early;
        let mut unparsed = !buf.is_empty();
        if buf.capacity() == 0 {
            buf.reserve(1024);
        }
        loop {
            let before = if unparsed {
                unparsed = false;
                0
            } else {
                if buf.capacity() == buf.len() {
                    buf.reserve((buf.len()).clamp(1024, limit.saturating_sub(buf.len()).max(1)));
                }
                let room = limit.saturating_sub(buf.len());
                let before = buf.len();
                match io.read_buf(&mut (&mut buf).limit(room)).await {
                    Ok(0) | Err(_) => return Err(HeadError::Closed),
                    Ok(_) => {}
                }
                before
            };
            // A TLS record where a request line should be: the client was set up for an
            // HTTPS proxy. Said at once, since a ClientHello need not hold a line end and the
            // client waits for an answer to it, not for a timeout.
            if buf.first() == Some(&crate::front::tls::TLS_HANDSHAKE) {
                return Err(HeadError::Refuse(Refusal::TlsOnPlaintext));
            }
            // Every verdict needs a line end, so bytes without one (a trickle) are not worth
            // parsing the whole head again for: that would be quadratic in the head's size.
            if !buf[before..].contains(&b'\n') && buf.len() < max_bytes {
                continue;
            }
            match parse_head(&buf) {
                Ok(Parsed::Complete(req)) => {
                    let head_len = buf.len() - req.leftover.len();
                    if head_len > max_bytes {
                        return Err(HeadError::Refuse(Refusal::HeaderTooLarge));
                    }
                    return Ok(req);
                }
                Ok(Parsed::Partial) if buf.len() >= max_bytes => {
                    return Err(HeadError::Refuse(Refusal::HeaderTooLarge));
                }
                Ok(Parsed::Partial) => {}
                Err(Refusal::MethodNotAllowed) => {
                    return Err(HeadError::NotConnect(crate::detail::Detail::request_line(&buf)));
                }
                Err(refusal) => return Err(HeadError::Refuse(refusal)),
            }
        }
    };
    match tokio::time::timeout(deadline, read).await {
        Ok(result) => result,
        Err(_) => Err(HeadError::Refuse(Refusal::HeaderTimeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::Host;

    fn complete(buf: &[u8]) -> ConnectRequest {
        match parse_head(buf) {
            Ok(Parsed::Complete(r)) => r,
            other => panic!("expected a request, got {other:?}"),
        }
    }

    #[test]
    fn parses_connect_and_keeps_leftover() {
        let r = complete(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nProxy-Authorization: Basic abc\r\n\r\n\x16\x03\x01");
        assert_eq!(r.target.host, Host::Name("example.com".into()));
        assert_eq!(r.minor_version, 1);
        assert_eq!(r.proxy_authorization.as_deref(), Some(&b"Basic abc"[..]));
        assert_eq!(r.leftover, b"\x16\x03\x01");
        assert_eq!(complete(b"CONNECT [::1]:443 HTTP/1.0\r\n\r\n").minor_version, 0);
    }

    #[test]
    fn partial_heads_ask_for_more() {
        assert_eq!(parse_head(b"CONNECT example.com:443 HTTP/1.1\r\nHost: x"), Ok(Parsed::Partial));
        assert_eq!(parse_head(b"CONN"), Ok(Parsed::Partial));
    }

    #[test]
    fn refusals() {
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\n\r\n"), Err(Refusal::MethodNotAllowed));
        assert_eq!(parse_head(b"GET http://x/ HTTP/1.1\r\nHost: x"), Err(Refusal::MethodNotAllowed));
        assert!(matches!(parse_head(b"CONNECT example.com HTTP/1.1\r\n\r\n"), Err(Refusal::BadRequest(_))));
        assert!(matches!(parse_head(b"CONNECT a:1 HTTP/2.0\r\n\r\n"), Err(Refusal::BadRequest(_))));
        assert!(matches!(parse_head(b"CONNECT a:1 HTTP/1.1\r\nBad Header: x\r\n\r\n"), Err(Refusal::BadRequest(_))));
        assert!(matches!(parse_head(b"CONNECT a:1 HTTP/1.1\r\nX: a\0b\r\n\r\n"), Err(Refusal::BadRequest(_))));
        let many: String = (0..70).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(parse_head(format!("CONNECT a:1 HTTP/1.1\r\n{many}\r\n").as_bytes()), Err(Refusal::HeaderTooLarge));
    }

    #[tokio::test]
    async fn early_bytes_are_parsed_before_the_socket_is_read() {
        // The socket is at its end: a read would say the client left.
        let early = b"CONNECT a:443 HTTP/1.1\r\n\r\n\x16\x03".to_vec();
        let r = read_head_after(&mut tokio::io::empty(), early, 8192, Duration::from_secs(5)).await.unwrap();
        assert_eq!(r.leftover, b"\x16\x03");
        let mut rest: &[u8] = b"Host: a\r\n\r\nX";
        let r = read_head_after(&mut rest, b"CONNECT a:443 HTTP/1.1\r\n".to_vec(), 8192, Duration::from_secs(5));
        assert_eq!(r.await.unwrap().leftover, b"X", "a partial early head is completed from the socket");
    }

    #[tokio::test]
    async fn head_over_the_cap_is_431() {
        let big = format!("CONNECT a:443 HTTP/1.1\r\nX: {}\r\n\r\n", "v".repeat(9000));
        let mut io = big.as_bytes();
        let err = read_head(&mut io, 8192, Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, HeadError::Refuse(Refusal::HeaderTooLarge)));
    }
}
