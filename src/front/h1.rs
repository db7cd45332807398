//! The plain HTTP/1 front: a connection whose first bytes are a CONNECT head, answered with
//! HTTP/1 status lines. Generic over the stream, so HTTP/1 over TLS is this front on a TLS
//! stream.
//!
//! The head phase is bounded here (see `limits::pending`): a connection enters it at accept
//! or is turned away at once, and a head still incomplete after the grace counts against
//! the client's bound of late heads.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::OptionFuture;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span};

use super::{ClientConn, ClientId, ClientIo};
use crate::config::{ProxyProtocol, ServerConfig};
use crate::connect::{self, ConnectRequest, HeadError};
use crate::context::{Context, Shared};
use crate::error::Refusal;
use crate::limits::pending::{PendingPermit, PendingRefusal};
use crate::reply;
use crate::tunnel::{self, Tunnel};

/// An HTTP/1 client connection past its head.
pub struct H1<S> {
    stream: S,
}

impl<S> H1<S> {
    /// A connection whose head has not been read (or need not be, to answer it).
    pub(crate) fn new(stream: S) -> H1<S> {
        H1 { stream }
    }
}

impl<S: ClientIo> ClientConn for H1<S> {
    type Io = S;

    fn secure(&self) -> bool {
        self.stream.secure()
    }

    fn tcp(&self) -> Option<&TcpStream> {
        self.stream.tcp()
    }

    async fn established(&mut self, minor_version: u8) -> std::io::Result<()> {
        self.stream.write_all(reply::established(minor_version)).await
    }

    async fn refuse(&mut self, refusal: &Refusal, realm: Option<&str>) {
        reply::send_refusal(&mut self.stream, refusal, realm).await;
    }

    fn into_io(self) -> S {
        self.stream
    }
}

/// Takes an accepted connection into its head phase on its own task, or, over the
/// head-phase bounds, turns it away at once.
pub(crate) fn accepted(ctx: &Arc<Context>, tracker: &TaskTracker, stream: TcpStream, peer: SocketAddr) {
    let shared = ctx.shared();
    if shared.config.server.proxy_protocol == ProxyProtocol::Required {
        return super::proxy_protocol::accepted(ctx, &shared, tracker, stream, peer);
    }
    match ctx.pending.enter(shared.client_key(peer.ip()), shared.config.server.max_pending) {
        Ok(permit) => {
            let span = info_span!("conn", id = super::next_id());
            let client = ClientId::at(peer);
            tracker.spawn(serve(Arc::clone(ctx), stream, client, Some(permit)).instrument(span));
        }
        Err(why) => turn_away(ctx, &stream, why),
    }
}

/// Reads the CONNECT head, then hands the connection to the tunnel (or answers the head's
/// refusal). `pending` is the connection's head-phase permit; the tunnel holds it until
/// admission.
///
/// Two futures chained (`then`), not one `async fn`: an `async fn` keeps its arguments for
/// its whole life, so the stream, the client and the permit would sit in every tunnel's
/// state twice, once here and once in the tunnel that took them over. Chained, the head
/// phase's state is gone when the tunnel's begins.
pub fn serve<S: ClientIo>(
    ctx: Arc<Context>,
    stream: S,
    client: ClientId,
    pending: Option<PendingPermit>,
) -> impl Future<Output = ()> + Send {
    serve_after(ctx, stream, client, pending, Vec::new(), Duration::ZERO)
}

/// [`serve`] for a connection that has been read from already (a PROXY protocol header):
/// `early` are the bytes read past that, the start of the head; `spent` is the time taken
/// from `header_timeout`, which bounds everything before the tunnel from accept on.
pub(crate) fn serve_after<S: ClientIo>(
    ctx: Arc<Context>,
    stream: S,
    client: ClientId,
    pending: Option<PendingPermit>,
    early: Vec<u8>,
    spent: Duration,
) -> impl Future<Output = ()> + Send {
    head_phase(ctx, stream, client, pending, early, spent)
        .then(|next| OptionFuture::from(next.map(|(tunnel, shared, req)| tunnel.run(shared, req))))
        .map(drop)
}

/// The head phase: the tunnel with what it serves, or `None` when the connection ended here.
async fn head_phase<S: ClientIo>(
    ctx: Arc<Context>,
    stream: S,
    client: ClientId,
    mut pending: Option<PendingPermit>,
    early: Vec<u8>,
    spent: Duration,
) -> Option<(Tunnel<H1<S>>, Arc<Shared>, ConnectRequest)> {
    let mut conn = H1 { stream };
    let shared = ctx.shared();
    let head = tokio::select! {
        head = read_head(&mut conn.stream, pending.as_mut(), &shared.config.server, early, spent) => head,
        // Draining: a client that has not finished its head has been promised nothing.
        () = ctx.draining.cancelled() => return None,
    };
    match head {
        Ok(req) => Some((Tunnel::new(ctx, conn, client, pending), shared, req)),
        Err(HeadError::Closed) => {
            debug!("client closed before a complete head");
            None
        }
        Err(HeadError::Refuse(r)) => {
            drop(shared);
            tunnel::refuse(&ctx, &mut conn, &client, r, None).await;
            None
        }
        Err(HeadError::NotConnect(detail)) => {
            drop(shared);
            tunnel::refuse_with(&ctx, &mut conn, &client, Refusal::MethodNotAllowed, None, &detail).await;
            None
        }
    }
}

/// Reads the CONNECT head. A head still incomplete after the grace is late and counts
/// against the client's bound of late heads (see `limits::pending`), which refuses it when
/// the client is at that bound. The grace timer is never registered when the head is
/// already there on the first read, which is the common case.
async fn read_head<S: ClientIo>(
    stream: &mut S,
    pending: Option<&mut PendingPermit>,
    server: &ServerConfig,
    early: Vec<u8>,
    spent: Duration,
) -> Result<ConnectRequest, HeadError> {
    let deadline = server.header_timeout.0.saturating_sub(spent);
    let read = connect::read_head_after(stream, early, server.max_header_bytes, deadline);
    tokio::pin!(read);
    if let Ok(head) = tokio::time::timeout(server.late_head_after(), &mut read).await {
        return head;
    }
    if let Some(pending) = pending {
        pending.late(server.max_pending_per_client).map_err(|_| HeadError::Refuse(Refusal::ClientPendingCap))?;
    }
    read.await
}

/// Over the head-phase bounds: answer at once without reading (a non-blocking write into an
/// empty socket buffer) and close. Counted; logged at debug only, because this is the path a
/// flood takes and a log line per connection would be its amplifier.
pub(crate) fn turn_away(ctx: &Context, stream: &TcpStream, why: PendingRefusal) {
    let refusal = match why {
        PendingRefusal::Global => Refusal::PendingCap,
        PendingRefusal::ClientShare | PendingRefusal::ClientLate => Refusal::ClientPendingCap,
    };
    let _ = stream.try_write(&reply::refusal(&refusal, None));
    ctx.metrics.refused(&refusal);
    debug!(pending = ctx.pending.count(), reason = refusal.reason(), "turned away before the head");
}
