//! HTTP/2 CONNECT (RFC 9113 §8.5) on the TLS listener, when the client negotiates `h2`: each
//! CONNECT stream is one tunnel with its own admission, policy, limits and counters, and the
//! local network sees one TLS connection rather than one per site.
//!
//! A refusal is the stream's own answer (`:status` and the reason as a body, then the end of
//! the stream); the connection stays up for the other streams. A stream the client resets
//! ends its tunnel's relay with an error, which drops its lease and gives its permits back.
//! Streams per connection are bounded by `server.h2_max_streams` (SETTINGS_MAX_CONCURRENT_
//! STREAMS), and every stream is also under the client's tunnel caps.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as Cx, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tracing::{Instrument, debug, info_span};

use super::{ClientConn, ClientId, ClientIo};
use crate::connect::ConnectRequest;
use crate::context::Context;
use crate::error::Refusal;
use crate::relay::PeerEnded;
use crate::target::Target;
use crate::tunnel::{self, Tunnel};

/// Flow-control window of one stream. A tunnel's throughput over HTTP/2 is bounded by its
/// window over the round trip; at 4 MiB one stream keeps up with the TLS relay on loopback and
/// on paths of tens of milliseconds at hundreds of Mbit/s.
const STREAM_WINDOW: u32 = 4 << 20;
/// Flow-control window of the whole connection: room for several busy streams at once.
const CONNECTION_WINDOW: u32 = 16 << 20;
/// Largest DATA frame sent.
const MAX_FRAME: u32 = 64 << 10;

/// Serves an HTTP/2 connection until the client closes it or the drain ends it.
pub(crate) async fn serve(ctx: Arc<Context>, tls: TlsStream<TcpStream>, client: ClientId, deadline: Duration) {
    let max_streams = ctx.shared().config.server.h2_max_streams;
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(max_streams)
        .handshake::<_, Bytes>(tls);
    let mut conn = match tokio::time::timeout(deadline, handshake).await {
        Ok(Ok(c)) => c,
        _ => {
            debug!("HTTP/2 preface did not complete");
            return;
        }
    };
    // The streams' tunnels run inside this task, next to the connection they write into:
    // spawned apart, every chunk crossed threads twice (the relay wakes the connection to send
    // it, the connection wakes the relay for more) and they contended for h2's stream lock,
    // which cost an HTTP/2 download a third of its throughput against HTTP/1.1 inside TLS.
    let mut streams = FuturesUnordered::new();
    loop {
        let next = tokio::select! {
            n = conn.accept() => n,
            Some(()) = streams.next(), if !streams.is_empty() => continue,
            () = ctx.draining.cancelled() => {
                conn.graceful_shutdown();
                break;
            }
        };
        match next {
            Some(Ok((req, respond))) => {
                let span = info_span!("stream", id = super::next_id());
                let tunnel: Pin<Box<dyn Future<Output = ()> + Send>> =
                    Box::pin(stream(Arc::clone(&ctx), req, respond, client.clone()).instrument(span));
                streams.push(tunnel);
            }
            Some(Err(e)) => {
                debug!(error = %e, "HTTP/2 connection ended");
                break;
            }
            None => break,
        }
    }
    // Keep driving the connection (its frames carry every stream's bytes) until the last
    // stream's tunnel has ended.
    let all_ended = async { while streams.next().await.is_some() {} };
    tokio::select! {
        () = all_ended => {}
        _ = std::future::poll_fn(|cx| conn.poll_closed(cx)) => {}
    }
}

/// One stream: a CONNECT becomes a tunnel; anything else is answered on the stream.
async fn stream(ctx: Arc<Context>, req: Request<RecvStream>, respond: SendResponse<Bytes>, client: ClientId) {
    let shared = ctx.shared();
    let (parts, body) = req.into_parts();
    let mut conn = H2Conn { respond: Some(respond), send: None, recv: Some(body) };
    let head = if parts.method != Method::CONNECT {
        Err(Refusal::MethodNotAllowed)
    } else {
        // RFC 9113 §8.5: :authority is the target; no :scheme or :path (extended CONNECT,
        // which has them, is not a tunnel).
        match parts.uri.authority() {
            Some(a) if parts.uri.scheme().is_none() && parts.uri.path_and_query().is_none() => {
                Target::parse(a.as_str()).map_err(|e| Refusal::BadRequest(e.reason()))
            }
            _ => Err(Refusal::BadRequest("CONNECT needs :authority and no :scheme or :path")),
        }
    };
    let target = match head {
        Ok(t) => t,
        Err(r) => return tunnel::refuse(&ctx, &mut conn, &client, r, None).await,
    };
    let proxy_authorization = parts.headers.get(http::header::PROXY_AUTHORIZATION).map(|v| v.as_bytes().to_vec());
    let req = ConnectRequest { target, minor_version: 1, proxy_authorization, leftover: Vec::new() };
    Tunnel::new(ctx, conn, client, None).run(shared, req).await;
}

/// A CONNECT stream before and after its answer.
struct H2Conn {
    respond: Option<SendResponse<Bytes>>,
    send: Option<SendStream<Bytes>>,
    recv: Option<RecvStream>,
}

impl ClientConn for H2Conn {
    type Io = H2Stream;

    fn secure(&self) -> bool {
        true
    }

    /// None: the stream shares its connection's socket, which must not be tuned per tunnel.
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }

    async fn established(&mut self, _minor_version: u8) -> io::Result<()> {
        let respond = self.respond.as_mut().ok_or_else(|| io::Error::other("answered already"))?;
        let send = respond.send_response(Response::new(()), false).map_err(io::Error::other)?;
        self.send = Some(send);
        Ok(())
    }

    async fn refuse(&mut self, refusal: &Refusal, realm: Option<&str>) {
        let Some(mut respond) = self.respond.take() else { return };
        let mut res = Response::builder()
            .status(StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::BAD_GATEWAY))
            .header("content-type", "text/plain; charset=utf-8");
        match refusal {
            Refusal::MethodNotAllowed => res = res.header("allow", "CONNECT"),
            Refusal::ClientRate { retry_after } | Refusal::AuthAttempts { retry_after } => {
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                res = res.header("retry-after", secs.max(1));
            }
            Refusal::AuthRequired | Refusal::AuthSessionParam => {
                res = res.header("proxy-authenticate", format!("Basic realm=\"{}\"", realm.unwrap_or("veilgate")));
            }
            _ => {}
        }
        let Ok(res) = res.body(()) else { return };
        if let Ok(mut send) = respond.send_response(res, false) {
            let body = format!("{} {}: {refusal}\n", refusal.status(), refusal.reason());
            let _ = send.send_data(Bytes::from(body), true);
        }
    }

    fn into_io(self) -> H2Stream {
        H2Stream { send: self.send, recv: self.recv, unread: Bytes::new(), ended: false, peer_ended: false }
    }
}

/// An established CONNECT stream as a byte stream: DATA frames in and out.
pub struct H2Stream {
    send: Option<SendStream<Bytes>>,
    recv: Option<RecvStream>,
    /// What the last DATA frame left over after a short read.
    unread: Bytes,
    /// END_STREAM sent.
    ended: bool,
    /// The client cancelled the stream or closed the connection politely: the other
    /// direction ends quietly too instead of failing on a stream that is gone.
    peer_ended: bool,
}

impl ClientIo for H2Stream {
    fn secure(&self) -> bool {
        true
    }
}

impl H2Stream {
    /// A stream error as the relay should see it: the client cancelling the stream or closing
    /// the connection politely is the tunnel's normal end ([`PeerEnded`]); anything else
    /// fails it.
    fn stream_error(&mut self, e: h2::Error) -> io::Error {
        let polite = matches!(e.reason(), Some(h2::Reason::NO_ERROR | h2::Reason::CANCEL));
        if self.peer_ended || (polite && e.is_remote() && (e.is_reset() || e.is_go_away())) {
            self.peer_ended = true;
            PeerEnded::io()
        } else {
            io::Error::other(e)
        }
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Cx<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.unread.is_empty() {
            let Some(recv) = this.recv.as_mut() else { return Poll::Ready(Ok(())) };
            match ready!(recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Give the window back as the bytes are taken, so the client keeps sending
                    // while the relay keeps reading (and stops when it stops: the throttle's
                    // push-back reaches the client through the window).
                    let _ = recv.flow_control().release_capacity(data.len());
                    this.unread = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(this.stream_error(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = this.unread.len().min(buf.remaining());
        buf.put_slice(&this.unread[..n]);
        this.unread.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Cx<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.peer_ended {
            return Poll::Ready(Err(PeerEnded::io()));
        }
        let Some(send) = this.send.as_mut() else { return Poll::Ready(Err(io::ErrorKind::NotConnected.into())) };
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        send.reserve_capacity(data.len());
        let sent = match ready!(send.poll_capacity(cx)) {
            Some(Ok(n)) => {
                let n = n.min(data.len());
                send.send_data(Bytes::copy_from_slice(&data[..n]), false).map(|()| n)
            }
            Some(Err(e)) => Err(e),
            None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        };
        Poll::Ready(sent.map_err(|e| this.stream_error(e)))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Cx<'_>) -> Poll<io::Result<()>> {
        // Frames are queued on the connection, which its own task writes out.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Cx<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.ended && !this.peer_ended {
            this.ended = true;
            if let Some(send) = this.send.as_mut() {
                if let Err(e) = send.send_data(Bytes::new(), true) {
                    return Poll::Ready(Err(this.stream_error(e)));
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}
