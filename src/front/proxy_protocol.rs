//! PROXY protocol inbound (HAProxy's proxy-protocol.txt, v1 text and v2 binary): behind an L4
//! balancer, the client is the header's source address, not the TCP peer.
//!
//! With `server.proxy_protocol = "required"` a connection on a proxy listener goes through
//! here before its CONNECT head:
//!
//! 1. At accept, a peer outside `proxy_protocol_from` is closed at once: only a trusted
//!    balancer may claim an address for someone else. Only the global bound of unfinished
//!    connections applies now (`limits::pending`): the peer is the balancer, and charging it a
//!    client's share would make every client behind it one client.
//! 2. The header is read within `header_timeout` from accept, split across any number of
//!    reads. Its framing is checked here (v1: one line ending in CRLF within 107 bytes, the
//!    specification's "wait for the CRLF before decoding"; v2: 16 bytes and the length they
//!    give); its contents are decoded by the `ppp` crate.
//! 3. The source address becomes the connection's [`ClientId`], and the connection is counted
//!    against that client's share of the bound; from then on it is an HTTP/1 connection like
//!    any other ([`h1::serve_after`]), whose head gets what is left of `header_timeout`. Bytes
//!    read past the header (a CONNECT head in the same segment) start the head's buffer.
//!
//! What a header says, and what is done (the specification's words in quotes):
//! - v2 PROXY with TCP over IPv4 or IPv6, v1 TCP4 or TCP6: the source is the client.
//! - v2 LOCAL: "the connection was established on purpose by the proxy without being relayed"
//!   (a health check). Accepted, counted, closed: the check's success is the accept itself,
//!   and veilgate's own health is on the admin listener.
//! - v1 UNKNOWN, v2 UNSPEC, and v2 UDP or unix (a TCP listener cannot carry them; "a receiver
//!   is not required to implement other ones, provided that it automatically falls back to
//!   the UNSPEC mode"): "accept the connection and use the real connection's parameters", so
//!   the balancer is the client. Nothing is guessed, and such clients share the balancer's
//!   budget, which errs towards less.
//! - No signature, a header that breaks the specification, or none within the deadline: the
//!   connection "must be discarded": closed with no answer ([`Unanswered`]), counted, logged.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BufMut;
use futures_util::FutureExt;
use futures_util::future::OptionFuture;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span};

use super::{ClientId, h1};
use crate::config::proxy_protocol::trusted;
use crate::context::{Context, Shared};
use crate::error::Unanswered;
use crate::limits::pending::PendingPermit;
use crate::tunnel::client_field;

/// The v2 signature: 12 bytes no other protocol starts with.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// What a v1 header starts with.
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// The longest v1 line, CRLF included ("PROXY UNKNOWN" with two IPv6 addresses and ports).
const V1_MAX: usize = 107;
/// The fixed part of a v2 header.
const V2_FIXED: usize = 16;
/// What one read may take past a header whose end is not known yet: enough for a CONNECT head
/// in the same segment, whose bytes become the start of the head's buffer.
const READ_AHEAD: usize = 1024;
/// Bytes of a header-less connection's start shown in its log line (escaped).
const SHOWN: usize = 16;

/// What a complete header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// Relayed for this client (its source address and port).
    Proxied(SocketAddr),
    /// The balancer's own connection (a health check).
    Local,
    /// Relayed, for a source the header cannot name: the balancer stands for the client.
    Unknown,
}

impl Header {
    /// Label of `proxy_protocol_headers_total{kind}` (one of [`crate::metrics::PROXY_HEADERS`]).
    pub fn kind(self) -> &'static str {
        match self {
            Header::Proxied(_) => "proxied",
            Header::Local => "local",
            Header::Unknown => "unknown",
        }
    }
}

/// The verdict on the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A header can still come: read more.
    Partial,
    /// A header of `len` bytes; what follows belongs to the client.
    Complete {
        /// The header's length.
        len: usize,
        /// What it says.
        header: Header,
    },
}

/// Why no header came out of the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// The connection does not start with a signature (a client that bypassed the balancer,
    /// or a balancer not configured to send one). `start`: its first bytes, for the log.
    Missing {
        /// Up to 16 bytes (escape before showing).
        start: Vec<u8>,
    },
    /// A header that breaks the specification: why, in words that carry no peer bytes.
    Malformed(String),
    /// The peer closed before a complete header (a balancer's bare TCP check does this).
    Closed,
}

/// Parses a header from the start of `buf`. Pure, so every split of a header can be tested.
pub fn parse(buf: &[u8]) -> Result<Parsed, HeaderError> {
    if starts_like(buf, V2_SIGNATURE) {
        parse_v2(buf)
    } else if starts_like(buf, V1_PREFIX) {
        parse_v1(buf)
    } else {
        Err(HeaderError::Missing { start: buf[..buf.len().min(SHOWN)].to_vec() })
    }
}

/// `buf` is `sig`, or a start of it, or starts with it.
fn starts_like(buf: &[u8], sig: &[u8]) -> bool {
    let n = buf.len().min(sig.len());
    buf[..n] == sig[..n]
}

fn malformed(why: impl Into<String>) -> HeaderError {
    HeaderError::Malformed(why.into())
}

/// v1: the line is decoded only once its CRLF is in (`ppp` guesses about lines it has not
/// seen the end of, and takes some proper prefixes of a valid line for invalid ones).
fn parse_v1(buf: &[u8]) -> Result<Parsed, HeaderError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.iter().position(|&b| b == b'\r' || b == b'\n') else {
        return if buf.len() >= V1_MAX {
            Err(malformed("v1 line has no CRLF within 107 bytes"))
        } else {
            Ok(Parsed::Partial)
        };
    };
    if window[end] == b'\n' {
        return Err(malformed("v1 line ends in LF without CR"));
    }
    if end + 2 > V1_MAX {
        return Err(malformed("v1 line has no CRLF within 107 bytes"));
    }
    match buf.get(end + 1) {
        None => return Ok(Parsed::Partial),
        Some(b'\n') => {}
        Some(_) => return Err(malformed("v1 line has a CR without LF")),
    }
    let len = end + 2;
    let line = ppp::v1::Header::try_from(&buf[..len]).map_err(|e| malformed(format!("v1: {e}")))?;
    let header = match line.addresses {
        ppp::v1::Addresses::Tcp4(a) => Header::Proxied(SocketAddr::new(a.source_address.into(), a.source_port)),
        ppp::v1::Addresses::Tcp6(a) => Header::Proxied(SocketAddr::new(a.source_address.into(), a.source_port)),
        ppp::v1::Addresses::Unknown => Header::Unknown,
    };
    Ok(Parsed::Complete { len, header })
}

/// v2: the fixed 16 bytes say how long the rest is; version, command, family and transport
/// are checked as soon as they are in, so a bad header is dropped without waiting for a
/// length that may never come.
fn parse_v2(buf: &[u8]) -> Result<Parsed, HeaderError> {
    if buf.len() < V2_FIXED {
        return Ok(Parsed::Partial);
    }
    let (ver_cmd, fam) = (buf[12], buf[13]);
    let len = V2_FIXED + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if ver_cmd >> 4 != 2 {
        return Err(malformed(format!("v2: version {} (only 2 exists)", ver_cmd >> 4)));
    }
    match ver_cmd & 0x0f {
        // LOCAL: "discard the protocol block including the family which is ignored", but
        // "always consider [the length] to skip the appropriate number of bytes".
        0 if buf.len() < len => return Ok(Parsed::Partial),
        0 => return Ok(Parsed::Complete { len, header: Header::Local }),
        1 => {}
        c => return Err(malformed(format!("v2: command {c} (LOCAL 0 and PROXY 1 exist)"))),
    }
    if fam >> 4 > 3 || fam & 0x0f > 2 {
        return Err(malformed(format!("v2: address family and transport byte {fam:#04x}")));
    }
    if buf.len() < len {
        return Ok(Parsed::Partial);
    }
    let h = ppp::v2::Header::try_from(&buf[..len]).map_err(|e| malformed(format!("v2: {e}")))?;
    let stream = h.protocol == ppp::v2::Protocol::Stream;
    let header = match h.addresses {
        ppp::v2::Addresses::IPv4(a) if stream => {
            Header::Proxied(SocketAddr::new(a.source_address.into(), a.source_port))
        }
        ppp::v2::Addresses::IPv6(a) if stream => {
            Header::Proxied(SocketAddr::new(a.source_address.into(), a.source_port))
        }
        _ => Header::Unknown,
    };
    Ok(Parsed::Complete { len, header })
}

/// Reads one header, and no more than [`READ_AHEAD`] past it: returns the header and the
/// bytes read after it, which belong to the client (the start of its CONNECT head). Bounded
/// in size by the protocol (107 bytes, or 16 + 65535); the caller bounds it in time.
pub async fn read_header<R: AsyncRead + Unpin>(io: &mut R) -> Result<(Header, Vec<u8>), HeaderError> {
    // The same buffer carries on as the head's, so a connection allocates one, as without
    // the PROXY protocol.
    let mut buf: Vec<u8> = Vec::with_capacity(READ_AHEAD);
    loop {
        let known = if starts_like(&buf, V2_SIGNATURE) && buf.len() >= V2_FIXED {
            V2_FIXED + usize::from(u16::from_be_bytes([buf[14], buf[15]]))
        } else {
            0
        };
        let room = known.max(READ_AHEAD).saturating_sub(buf.len()).max(1);
        buf.reserve(room);
        match io.read_buf(&mut (&mut buf).limit(room)).await {
            Ok(0) | Err(_) => return Err(HeaderError::Closed),
            Ok(_) => {}
        }
        match parse(&buf)? {
            Parsed::Partial => {}
            Parsed::Complete { len, header } => {
                buf.drain(..len);
                return Ok((header, buf));
            }
        }
    }
}

/// Reads one header and not one byte past it, so the stream is left at the first byte the
/// client sent: the TLS listener hands it to the TLS handshake as it is. Each read takes only
/// what a peek showed to be header (all of a partial header, or up to a complete one's end),
/// so a header split across segments waits for the next one instead of spinning on the peek.
pub async fn read_header_exact(stream: &mut TcpStream) -> Result<Header, HeaderError> {
    let mut got: Vec<u8> = Vec::with_capacity(V1_MAX);
    let mut peeked = vec![0u8; READ_AHEAD];
    loop {
        let n = match stream.peek(&mut peeked).await {
            Ok(0) | Err(_) => return Err(HeaderError::Closed),
            Ok(n) => n,
        };
        let mut seen = got.clone();
        seen.extend_from_slice(&peeked[..n]);
        let take = match parse(&seen)? {
            Parsed::Partial => n,
            Parsed::Complete { len, header } => {
                let rest = len - got.len();
                stream.read_exact(&mut peeked[..rest]).await.map_err(|_| HeaderError::Closed)?;
                return Ok(header);
            }
        };
        stream.read_exact(&mut peeked[..take]).await.map_err(|_| HeaderError::Closed)?;
        got.extend_from_slice(&peeked[..take]);
    }
}

/// Takes an accepted connection on a listener that requires the header: closes an untrusted
/// peer at once, turns a connection away over the global bound, or reads the header on the
/// connection's own task and serves it from there.
pub(crate) fn accepted(
    ctx: &Arc<Context>,
    shared: &Shared,
    tracker: &TaskTracker,
    stream: TcpStream,
    peer: SocketAddr,
) {
    accepted_then(ctx, shared, tracker, stream, peer, serve);
}

/// [`accepted`], with `serve` for what follows: the plaintext front reads the header and the
/// head on one buffer; the TLS front reads the header exactly, then shakes hands.
pub(crate) fn accepted_then<F: Future<Output = ()> + Send + 'static>(
    ctx: &Arc<Context>,
    shared: &Shared,
    tracker: &TaskTracker,
    stream: TcpStream,
    peer: SocketAddr,
    serve: impl FnOnce(Arc<Context>, TcpStream, SocketAddr, PendingPermit) -> F,
) {
    let server = &shared.config.server;
    if !trusted(&server.proxy_protocol_from, peer.ip()) {
        // Logged as a client: nobody vouches for this peer, so it may be one.
        closed(ctx, Unanswered::ProxyProtocolUntrusted, Peer::Client(peer), None);
        return;
    }
    match ctx.pending.enter_unknown(server.max_pending) {
        Ok(permit) => {
            let span = info_span!("conn", id = super::next_id());
            tracker.spawn(serve(Arc::clone(ctx), stream, peer, permit).instrument(span));
        }
        Err(why) => h1::turn_away(ctx, &stream, why),
    }
}

/// The header phase, then the HTTP/1 connection. Chained like [`h1::serve`], so the header
/// phase's state is gone when the head's begins.
fn serve(
    ctx: Arc<Context>,
    stream: TcpStream,
    peer: SocketAddr,
    pending: PendingPermit,
) -> impl Future<Output = ()> + Send {
    let started = Instant::now();
    header_phase(ctx, stream, peer, pending, false)
        .then(move |next| {
            OptionFuture::from(next.map(|(ctx, stream, client, pending, early)| {
                h1::serve_after(ctx, stream, client, Some(pending), early, started.elapsed())
            }))
        })
        .map(drop)
}

/// A connection past its header: the context, the stream, its client, its pending permit
/// (charged to that client now) and the bytes read past the header.
type Identified = (Arc<Context>, TcpStream, ClientId, PendingPermit, Vec<u8>);

/// Reads the header within the head deadline and charges the pending permit to the client it
/// names. `exact`: read nothing past the header (the TLS listener's handshake reads the rest).
pub(super) async fn header_phase(
    ctx: Arc<Context>,
    mut stream: TcpStream,
    peer: SocketAddr,
    mut pending: PendingPermit,
    exact: bool,
) -> Option<Identified> {
    let shared = ctx.shared();
    let server = &shared.config.server;
    let header = async {
        if exact {
            read_header_exact(&mut stream).await.map(|h| (h, Vec::new()))
        } else {
            read_header(&mut stream).await
        }
    };
    let read = tokio::select! {
        r = tokio::time::timeout(server.header_timeout.0, header) => r,
        () = ctx.draining.cancelled() => return None,
    };
    let (header, early) = match read {
        Ok(Ok(done)) => done,
        Ok(Err(HeaderError::Closed)) => {
            debug!("balancer closed before a complete PROXY header");
            return None;
        }
        Ok(Err(HeaderError::Missing { start })) => {
            let start = format!("starts with \"{}\"", start.escape_ascii());
            closed(&ctx, Unanswered::ProxyProtocolMissing, Peer::Balancer(peer), Some(start));
            return None;
        }
        Ok(Err(HeaderError::Malformed(why))) => {
            closed(&ctx, Unanswered::ProxyProtocolMalformed, Peer::Balancer(peer), Some(why));
            return None;
        }
        Err(_) => {
            closed(&ctx, Unanswered::ProxyProtocolTimeout, Peer::Balancer(peer), None);
            return None;
        }
    };
    ctx.metrics.proxy_header(header.kind());
    let client = match header {
        Header::Proxied(addr) => ClientId::at(addr),
        Header::Unknown => {
            debug!("PROXY header names no address (UNKNOWN or UNSPEC): the balancer is the client");
            ClientId::at(peer)
        }
        Header::Local => {
            debug!("PROXY LOCAL (a balancer's health check): closed");
            return None;
        }
    };
    if let Err(why) = pending.identify(shared.client_key(client.addr.ip()), server.max_pending) {
        h1::turn_away(&ctx, &stream, why);
        return None;
    }
    drop(shared);
    Some((ctx, stream, client, pending, early))
}

/// Who a closed connection came from, as its log line may show it.
enum Peer {
    /// Not a trusted balancer: maybe a client, so `log.client_address` applies.
    Client(SocketAddr),
    /// A trusted balancer: infrastructure, logged whole.
    Balancer(SocketAddr),
}

/// Counts and logs (within the refusal log's rate) a connection closed with no answer.
/// `detail` is free of peer bytes or escaped.
fn closed(ctx: &Context, why: Unanswered, peer: Peer, detail: Option<String>) {
    ctx.metrics.unanswered(why);
    if !ctx.refusal_log.allow(why.reason()) {
        return;
    }
    let (client, balancer) = match peer {
        Peer::Client(a) => (client_field(a.ip(), ctx.log_client()), None),
        Peer::Balancer(a) => (None, Some(a.to_string())),
    };
    info!(
        client = client.as_deref(),
        balancer = balancer.as_deref(),
        reason = why.reason(),
        detail = detail.as_deref(),
        "closed: {why}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &[u8] = b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 8080\r\n";
    const V1_6: &[u8] = b"PROXY TCP6 2001:db8::7 ::1 5555 8080\r\n";

    fn v2(cmd: u8, fam: u8, addrs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | cmd);
        h.push(fam);
        h.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
        h.extend_from_slice(addrs);
        h
    }

    fn v2_tcp4() -> Vec<u8> {
        v2(1, 0x11, &[192, 0, 2, 7, 127, 0, 0, 1, 0x15, 0xb3, 0x1f, 0x90])
    }

    fn complete(buf: &[u8]) -> (usize, Header) {
        match parse(buf) {
            Ok(Parsed::Complete { len, header }) => (len, header),
            other => panic!("expected a header from {:?}, got {other:?}", buf.escape_ascii().to_string()),
        }
    }

    fn is_malformed(buf: &[u8]) -> bool {
        matches!(parse(buf), Err(HeaderError::Malformed(_)))
    }

    #[test]
    fn every_proper_prefix_of_a_valid_header_asks_for_more() {
        let mut tlv = v2_tcp4();
        // A TLV (type 0x04 NOOP, 3 bytes) after the addresses, counted in the length.
        tlv.extend_from_slice(&[0x04, 0, 3, 1, 2, 3]);
        let n = tlv.len() - 16;
        tlv[14..16].copy_from_slice(&(n as u16).to_be_bytes());
        let headers: Vec<Vec<u8>> = vec![
            V1.to_vec(),
            V1_6.to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n".to_vec(),
            v2_tcp4(),
            tlv,
            v2(0, 0x00, &[]),
            v2(1, 0x00, &[]),
        ];
        for h in headers {
            for cut in 1..h.len() {
                assert_eq!(parse(&h[..cut]), Ok(Parsed::Partial), "{:?} cut at {cut}", h.escape_ascii().to_string());
            }
            let mut more = h.clone();
            more.extend_from_slice(b"CONNECT a:443 HTTP/1.1\r\n\r\n");
            assert_eq!(complete(&more).0, h.len(), "the header ends where it says");
        }
    }

    #[test]
    fn what_each_header_says() {
        assert_eq!(complete(V1).1, Header::Proxied("192.0.2.7:5555".parse().unwrap()));
        assert_eq!(complete(V1_6).1, Header::Proxied("[2001:db8::7]:5555".parse().unwrap()));
        assert_eq!(complete(b"PROXY UNKNOWN\r\n").1, Header::Unknown);
        assert_eq!(complete(&v2_tcp4()).1, Header::Proxied("192.0.2.7:5555".parse().unwrap()));
        let mut six = [0u8; 36];
        six[..16].copy_from_slice(&"2001:db8::7".parse::<std::net::Ipv6Addr>().unwrap().octets());
        six[15 + 16] = 1;
        six[32..34].copy_from_slice(&5555u16.to_be_bytes());
        assert_eq!(complete(&v2(1, 0x21, &six)).1, Header::Proxied("[2001:db8::7]:5555".parse().unwrap()));
        // LOCAL: family and addresses ignored, length honoured.
        assert_eq!(complete(&v2(0, 0x00, &[])), (16, Header::Local));
        assert_eq!(complete(&v2(0, 0x11, &[9; 12])), (28, Header::Local));
        // UNSPEC, UDP and unix fall back to the real connection.
        assert_eq!(complete(&v2(1, 0x00, &[])).1, Header::Unknown);
        assert_eq!(complete(&v2(1, 0x12, &[192, 0, 2, 7, 127, 0, 0, 1, 0, 1, 0, 2])).1, Header::Unknown);
        assert_eq!(complete(&v2(1, 0x10, &[192, 0, 2, 7, 127, 0, 0, 1, 0, 1, 0, 2])).1, Header::Unknown);
        assert_eq!(complete(&v2(1, 0x31, &[0; 216])).1, Header::Unknown);
    }

    #[test]
    fn missing_and_malformed() {
        let missing = |b: &[u8]| matches!(parse(b), Err(HeaderError::Missing { .. }));
        assert_eq!(
            parse(b"CONNECT a:443 HTTP/1.1\r\n"),
            Err(HeaderError::Missing { start: b"CONNECT a:443 HT".to_vec() }),
            "the log shows 16 bytes"
        );
        assert!(missing(b"\x16\x03\x01"));
        assert!(missing(b"PROXYX"));
        assert!(missing(b"\r\n\r\nX"));
        assert!(is_malformed(b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 8080\n"), "bare LF");
        assert!(is_malformed(b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 8080\rX"), "CR without LF");
        assert!(is_malformed(b"PROXY TCP4 192.0.2.07 127.0.0.1 5555 8080\r\n"), "leading zero");
        assert!(is_malformed(b"PROXY TCP4 192.0.2.7 127.0.0.1 05555 8080\r\n"), "leading zero port");
        assert!(is_malformed(b"PROXY TCP4 ::1 127.0.0.1 5555 8080\r\n"), "family mismatch");
        assert!(is_malformed(b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 70000\r\n"), "port range");
        assert!(is_malformed(b"PROXY TCP5 192.0.2.7 127.0.0.1 5555 8080\r\n"));
        assert!(is_malformed(b"PROXY TCP4 192.0.2.7  127.0.0.1 5555 8080\r\n"), "two spaces");
        assert!(is_malformed(format!("PROXY UNKNOWN {}\r\n", "x".repeat(100)).as_bytes()), "over 107");
        assert!(is_malformed(format!("PROXY UNKNOWN {}", "x".repeat(100)).as_bytes()), "no CRLF in 107");
        let mut bad = v2_tcp4();
        bad[12] = 0x11;
        assert!(is_malformed(&bad), "version 1 in a v2 header");
        bad[12] = 0x22;
        assert!(is_malformed(&bad), "command 2");
        assert!(is_malformed(&v2(1, 0x41, &[0; 12])), "family 4");
        assert!(is_malformed(&v2(1, 0x13, &[0; 12])), "transport 3");
        assert!(is_malformed(&v2(1, 0x11, &[0; 8])), "too short for IPv4 addresses");
        // Checked before the announced length arrives.
        let mut early = v2(1, 0x41, &[]);
        early[14..16].copy_from_slice(&[0xff, 0xff]);
        assert!(is_malformed(&early));
    }

    #[test]
    fn never_panics_on_noise() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let v2 = v2_tcp4();
        let seeds: [&[u8]; 4] = [V1, V1_6, &v2, b"PROXY UNKNOWN\r\n"];
        for i in 0..20_000 {
            let mut b = seeds[i % seeds.len()].to_vec();
            for _ in 0..(next() % 4) {
                let at = (next() as usize) % b.len();
                b[at] = next() as u8;
            }
            b.truncate(1 + (next() as usize) % b.len());
            if let Ok(Parsed::Complete { len, .. }) = parse(&b) {
                assert!(len <= b.len());
            }
        }
    }

    /// The header phase chained before the tunnel must not grow an idle tunnel's task past
    /// the budget `tunnel::size` guards (its state is gone when the head's begins).
    #[tokio::test]
    async fn a_tunnel_task_behind_a_header_stays_small() {
        use crate::config::Config;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let ctx = Arc::new(Context::new(Shared::build(Config::default(), &[]).unwrap(), vec![], &[]));
        let permit = ctx.pending.enter_unknown(10).unwrap();
        let fut = serve(Arc::clone(&ctx), c, "127.0.0.1:1".parse().unwrap(), permit);
        let size = std::mem::size_of_val(&fut);
        let c2 = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let plain = std::mem::size_of_val(&h1::serve(ctx, c2, ClientId::at("127.0.0.1:1".parse().unwrap()), None));
        eprintln!("tunnel future behind a PROXY header: {size} bytes (plain: {plain})");
        assert!(size < 4 * 1024, "tunnel future is {size} bytes");
    }

    #[tokio::test]
    async fn reads_a_header_split_anyhow_and_keeps_what_follows() {
        let mut whole = v2_tcp4();
        whole.extend_from_slice(b"CONNECT a:443 HTTP/1.1\r\n\r\n");
        for cut in [1, 5, 12, 15, 16, 20, 27, 28, 29] {
            let mut io = tokio_test_reader(&[&whole[..cut], &whole[cut..]]);
            let (h, early) = read_header(&mut io).await.unwrap();
            assert_eq!(h, Header::Proxied("192.0.2.7:5555".parse().unwrap()));
            // A read that ends with the header is the last: the rest waits in the socket.
            let expected = if cut >= 28 { &whole[28..cut] } else { &whole[28..] };
            assert_eq!(early, expected, "cut at {cut}");
        }
        let mut io = tokio_test_reader(&[b"PROX", b"Y TCP4 192.0.2.7 127.0.0.1 5555 ", b"8080\r", b"\nCONN"]);
        let (h, early) = read_header(&mut io).await.unwrap();
        assert_eq!(h, Header::Proxied("192.0.2.7:5555".parse().unwrap()));
        assert_eq!(early, b"CONN");
        let mut io = tokio_test_reader(&[b"PROXY TCP4 192.0.2.7"]);
        assert_eq!(read_header(&mut io).await, Err(HeaderError::Closed));
    }

    #[tokio::test]
    async fn the_exact_reader_leaves_every_byte_after_the_header_in_the_socket() {
        use tokio::io::AsyncWriteExt;
        let mut whole = v2_tcp4();
        whole.extend_from_slice(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]);
        let v1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 8080\r\n\x16\x03\x01".to_vec();
        for (bytes, cut, at) in [(&whole, 5, 28), (&whole, 20, 28), (&whole, 30, 28), (&v1, 10, 42), (&v1, 41, 42)] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
            let (mut server, _) = listener.accept().await.unwrap();
            let sent = bytes.clone();
            let writer = tokio::spawn(async move {
                client.write_all(&sent[..cut]).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                client.write_all(&sent[cut..]).await.unwrap();
                client
            });
            let h = read_header_exact(&mut server).await.unwrap();
            assert_eq!(h, Header::Proxied("192.0.2.7:5555".parse().unwrap()), "cut at {cut}");
            let _client = writer.await.unwrap();
            let mut rest = vec![0u8; bytes.len() - at];
            server.read_exact(&mut rest).await.unwrap();
            assert_eq!(rest, &bytes[at..], "cut at {cut}: the client's bytes are all still there");
        }
    }

    /// A reader that yields `parts` one read each (a part larger than the reader's room
    /// over several), then end of file.
    fn tokio_test_reader(parts: &[&[u8]]) -> Parts {
        Parts(parts.iter().map(|p| p.to_vec()).collect())
    }

    struct Parts(std::collections::VecDeque<Vec<u8>>);

    impl AsyncRead for Parts {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if let Some(mut p) = self.0.pop_front() {
                let n = p.len().min(buf.remaining());
                buf.put_slice(&p[..n]);
                if n < p.len() {
                    self.0.push_front(p.split_off(n));
                }
            }
            std::task::Poll::Ready(Ok(()))
        }
    }
}
