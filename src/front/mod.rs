//! Fronts: how a client connection arrives, up to and including its CONNECT head.
//!
//! A front yields three things: the [`ConnectRequest`](crate::connect::ConnectRequest), who
//! the client is ([`ClientId`]), and a [`ClientConn`] that answers in the front's own
//! protocol. [`Tunnel::run`](crate::tunnel::Tunnel::run) starts from there and never sees
//! the protocol the head came in, so an HTTP/1 front over TLS or a CONNECT stream of an
//! HTTP/2 connection (DESIGN §1) is one more front, not a change to the tunnel. Today there
//! is the plain HTTP/1 front, [`h1`].

pub mod h1;
pub mod h2;
pub mod proxy_protocol;
pub mod tls;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::error::Refusal;

/// A client's byte stream, as the relay sees it once the tunnel is established (one IO
/// trait for every front, as in pingora's `protocols/mod.rs`). The relay is chosen by it:
/// a bare TCP socket on both ends can be spliced in the kernel; anything else (TLS, an
/// HTTP/2 stream) goes through the portable relay.
pub trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The socket itself, when the stream is a bare TCP connection.
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }

    /// Whether the stream is encrypted between the client and veilgate (`auth.require_tls`).
    fn secure(&self) -> bool {
        false
    }
}

impl ClientIo for TcpStream {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

/// Who the client is, as its front established it: what limits, authentication attempts
/// and logs go by. Made in one of three places: the TCP peer at accept (`h1::accepted`), the
/// source a balancer's PROXY header carries ([`proxy_protocol`]), or a TLS listener's
/// handshake, which adds a verified client certificate's identity ([`tls`]); everything after
/// reads it from here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientId {
    /// The client's address (never a metric label; logged only as `log.client_address` allows).
    pub addr: SocketAddr,
    /// A verified client certificate's identity (`server.tls_client_ca`): what limits key the
    /// client by when no `[auth]` user names it.
    pub identity: Option<Arc<str>>,
}

impl ClientId {
    /// A client known by its address alone.
    pub fn at(addr: SocketAddr) -> ClientId {
        ClientId { addr, identity: None }
    }
}

/// A client connection past its head: it answers the request in its front's protocol, then
/// becomes the tunnel's client stream.
pub trait ClientConn: Send {
    /// The stream the relay gets.
    type Io: ClientIo;

    /// Whether the connection is encrypted between the client and veilgate.
    fn secure(&self) -> bool;

    /// The TCP socket under the connection, when it has one of its own (an HTTP/2 stream
    /// shares its connection's socket, so it must not be tuned per tunnel).
    fn tcp(&self) -> Option<&TcpStream>;

    /// Says the tunnel is open: `200 Connection Established` in the request's HTTP minor
    /// version (an HTTP/2 stream would send `:status 200`).
    fn established(&mut self, minor_version: u8) -> impl Future<Output = io::Result<()>> + Send;

    /// Answers a refusal and closes; errors are ignored, since the client may be gone and
    /// there is nobody left to tell. `realm` is for `407`'s challenge. Borrows rather than
    /// consumes: a moved connection would be one more copy in every tunnel's state.
    fn refuse(&mut self, refusal: &Refusal, realm: Option<&str>) -> impl Future<Output = ()> + Send;

    /// The stream to relay, once [`ClientConn::established`] has been sent.
    fn into_io(self) -> Self::Io;
}

/// A fresh id for a connection's log span.
pub(crate) fn next_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
