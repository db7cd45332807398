//! The byte-copy hot path: two pumps, one per direction, and nothing else.
//!
//! The relay knows no policy and no metrics. What it needs from the layers around it comes
//! through [`Flow`]: how large a chunk may be, a wait before each chunk is written (the
//! throttle) and a note after it is written (the counters). With [`Flow`] implemented by a
//! type that does nothing, that costs nothing.
//!
//! Half-close is kept: when one side stops sending, the other side's write half is shut down
//! and the opposite direction carries on until it ends too. A tunnel ends when both
//! directions have ended, when either fails, when nothing has moved for the idle timeout, or
//! when `stop` fires (the end of a drain).

use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Default chunk: large enough that bulk transfers make few system calls, small enough that
/// an idle-then-busy tunnel does not hold much.
pub const BUF_SIZE: usize = 64 * 1024;

/// What one direction of the relay asks of, and reports to, the layers around it.
pub trait Flow: Send {
    /// Largest chunk to read and write at once; `None` means [`BUF_SIZE`].
    fn max_chunk(&self) -> Option<usize> {
        None
    }
    /// Called with each chunk's size after it is read and before it is written; a throttle
    /// waits here, which in turn stops reading and lets TCP push back on the sender.
    fn before_write(&mut self, n: usize) -> impl Future<Output = ()> + Send;
    /// Sees a copy of each chunk before it is written (MITM observation); by default nothing.
    fn inspect(&mut self, _chunk: &[u8]) {}
    /// Called after a chunk is fully written.
    fn written(&mut self, n: usize);
    /// Whether `e`, from reading this direction or from shutting its writer down, is the
    /// stream's end rather than a failure (an abrupt close that lost nothing, which only an
    /// observer of the protocol can tell); by default every error is a failure.
    fn clean_end(&self, _e: &io::Error) -> bool {
        false
    }
}

/// The error a stream gives when its peer ended it in a way its protocol calls normal but a
/// byte stream cannot express: an HTTP/2 client resets a CONNECT stream with `CANCEL` when
/// the page that used it goes away, and says goodbye to the whole connection with `GOAWAY`
/// (`NO_ERROR`). The relay ends that direction as it would at EOF, so the tunnel is counted
/// `closed`, not `error`, and the error rate stays a signal.
#[derive(Debug, thiserror::Error)]
#[error("the peer ended the stream")]
pub struct PeerEnded;

impl PeerEnded {
    /// As an I/O error, which is what readers and writers return.
    pub fn io() -> io::Error {
        io::Error::new(io::ErrorKind::ConnectionAborted, PeerEnded)
    }

    fn is(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<PeerEnded>())
    }
}

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides finished sending.
    Done,
    /// Nothing moved either way for the idle timeout.
    Idle,
    /// A read or write failed (usually a reset).
    Error,
    /// Closed by the proxy (end of drain).
    Stopped,
}

impl End {
    /// Log and metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            End::Done => "closed",
            End::Idle => "idle_timeout",
            End::Error => "error",
            End::Stopped => "shutdown",
        }
    }
}

/// Last time a byte moved, in milliseconds since the relay began; both pumps touch it.
pub(crate) struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Activity {
        Activity { start: Instant::now(), last_ms: AtomicU64::new(0) }
    }
    pub(crate) fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// Relays between a client and an upstream, each given as its read and write halves (split
/// a `TcpStream` with `split()`, which costs nothing; a TLS stream with `tokio::io::split`),
/// until the tunnel ends. `first_up` are bytes the client sent along with its CONNECT head;
/// they go upstream before anything else.
#[allow(clippy::too_many_arguments)]
pub async fn relay<CR, CW, UR, UW, FU, FD>(
    (mut client_r, mut client_w): (CR, CW),
    (mut up_r, mut up_w): (UR, UW),
    first_up: Vec<u8>,
    up: &mut FU,
    down: &mut FD,
    idle_timeout: Duration,
    stop: &CancellationToken,
) -> End
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    UR: AsyncRead + Unpin,
    UW: AsyncWrite + Unpin,
    FU: Flow,
    FD: Flow,
{
    let activity = Activity::new();
    let both = async {
        tokio::try_join!(
            pump(&mut client_r, &mut up_w, first_up, up, &activity),
            pump(&mut up_r, &mut client_w, Vec::new(), down, &activity),
        )
        .map(|_| ())
    };
    supervise(pin!(both), &activity, idle_timeout, stop).await
}

/// Runs both directions (`both`) until they finish, fail, go idle, or `stop` fires.
///
/// `both` is borrowed, pinned in the caller's frame: taken by value, it would be stored twice
/// in the tunnel's state (once as the caller's local, once inside this future), and that
/// state is what every idle tunnel costs.
pub(crate) async fn supervise(
    both: Pin<&mut impl Future<Output = io::Result<()>>>,
    activity: &Activity,
    idle_timeout: Duration,
    stop: &CancellationToken,
) -> End {
    let idle = async {
        loop {
            let deadline = activity.last() + idle_timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        r = both => match r {
            Ok(()) => End::Done,
            Err(e) => {
                // The tunnel's `closed` line follows with outcome="error"; this says which.
                tracing::debug!(error = e.to_string(), kind = %e.kind(), "relay failed");
                End::Error
            }
        },
        () = idle => End::Idle,
        () = stop.cancelled() => End::Stopped,
    }
}

async fn pump<R, W, F>(r: &mut R, w: &mut W, first: Vec<u8>, flow: &mut F, activity: &Activity) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    F: Flow,
{
    for piece in first.chunks(flow.max_chunk().unwrap_or(BUF_SIZE).max(1)) {
        flow.inspect(piece);
        match pass(flow, activity, piece.len(), || write_out(w, piece)).await {
            Err(e) if PeerEnded::is(&e) => return Ok(()),
            r => r?,
        }
    }
    // Start small and grow when reads fill the buffer: an idle tunnel holds 4 KiB per
    // direction here, a busy one the full BUF_SIZE.
    let mut buf = vec![0u8; 4096];
    loop {
        let limit = flow.max_chunk().map_or(BUF_SIZE, |c| c.clamp(1, BUF_SIZE));
        let len = limit.min(buf.len());
        let n = match r.read(&mut buf[..len]).await {
            Ok(n) => n,
            Err(e) if flow.clean_end(&e) || PeerEnded::is(&e) => 0,
            Err(e) => return Err(e),
        };
        if n == buf.len() && buf.len() < BUF_SIZE {
            buf.resize(BUF_SIZE, 0);
        }
        if n == 0 {
            // Half-close: pass the EOF on and let the other direction finish.
            return match w.shutdown().await {
                Err(e) if !flow.clean_end(&e) && !PeerEnded::is(&e) => Err(e),
                _ => Ok(()),
            };
        }
        flow.inspect(&buf[..n]);
        match pass(flow, activity, n, || write_out(w, &buf[..n])).await {
            // The reader of this direction is gone; what is left unread was not wanted.
            Err(e) if PeerEnded::is(&e) => return Ok(()),
            r => r?,
        }
    }
}

async fn write_out<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    w.write_all(bytes).await?;
    // A TLS writer (MITM) may hold encrypted records back after accepting plaintext; without
    // a flush they would wait for the next write, which may never come.
    w.flush().await
}

/// One chunk of `n` bytes, read and not yet written, on its way through `flow`: the wait
/// before it is written (the throttle), the write, and the note after. Every relay loop
/// passes its chunks through here. The activity clock is touched on both sides of the wait,
/// so a tunnel held back by its own budget is never taken for idle.
pub(crate) async fn pass<F, W>(flow: &mut F, activity: &Activity, n: usize, write: impl FnOnce() -> W) -> io::Result<()>
where
    F: Flow,
    W: Future<Output = io::Result<()>>,
{
    activity.touch();
    flow.before_write(n).await;
    activity.touch();
    write().await?;
    flow.written(n);
    activity.touch();
    Ok(())
}

/// A [`Flow`] that only counts into a local total: for tests and plain relays.
#[derive(Debug, Default)]
pub struct Count(pub u64);

impl Flow for Count {
    async fn before_write(&mut self, _n: usize) {}
    fn written(&mut self, n: usize) {
        self.0 += n as u64;
    }
}
