//! Zero-copy relay for blind tunnels on Linux: bytes go socket → pipe → socket with
//! splice(2) and never enter user space. Same contract as [`crate::relay::relay`]: the
//! [`Flow`] is asked for a chunk limit and waited on before each chunk leaves (so throttling
//! works unchanged: each splice into the pipe is bounded by the budget granted), half-close
//! is kept, and idle/stop end the tunnel.
//!
//! A direction starts with plain reads and writes through a pooled buffer (cheapest for
//! small exchanges) and moves to a pipe once a read fills the buffer, so an idle tunnel holds
//! two sockets and nothing else. A kernel that refuses splice for a socket pair (EINVAL)
//! makes that direction fall back to an ordinary read/write loop.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::relay::{Activity, BUF_SIZE, End, Flow, pass, supervise};

/// Bytes moved per splice when no budget limits the chunk, and the pipe capacity asked for:
/// fewer, larger splices cost less CPU per byte. A pipe's capacity counts against the user's
/// pipe quota from its creation, which is why pipes are made only for bulk directions and a
/// direction falls back to copying when the quota is spent.
const PIPE_CHUNK: usize = 256 * 1024;

/// Buffer for the copy phase before a direction turns out to be bulk.
const COPY_BUF: usize = 16 * 1024;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array we own.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let pipe = unsafe { Pipe { read: OwnedFd::from_raw_fd(fds[0]), write: OwnedFd::from_raw_fd(fds[1]) } };
        // SAFETY: fcntl on a descriptor we own, with an integer argument.
        let grown = unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_CHUNK as libc::c_int) };
        if grown < 0 {
            // Over the per-user pipe quota (pipe-user-pages-soft) the kernel hands out tiny
            // pipes; a plain copy is then the better path for this direction.
            // SAFETY: as above.
            let size = unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_GETPIPE_SZ) };
            if size < 64 * 1024 {
                return Err(io::Error::other("pipe quota exhausted"));
            }
        }
        Ok(pipe)
    }
}

fn splice(from: i32, to: i32, len: usize) -> io::Result<usize> {
    // SAFETY: plain descriptors, no offsets (null), and a length; the kernel validates all.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Moves up to `len` bytes from the socket `src` into the empty pipe `pipe_w`.
///
/// splice(2) from TCP stops at the urgent mark (the kernel's `tcp_read_sock` will not step
/// over it) and, with nothing moved, says EAGAIN there for as long as the mark is unread,
/// while epoll has already reported the socket readable: a bulk direction would wait for an
/// event that never comes. If the peer's FIN is already queued behind the mark, it says 0
/// instead, and the bytes from the mark on would be lost. An ordinary read goes past the
/// mark, and SO_OOBINLINE (set on both sockets) keeps the urgent byte in the stream, so on
/// EAGAIN or 0 one read is tried and what it returns is written into the pipe. On a drained
/// socket that read says EAGAIN too, and at a true end of stream 0: it costs one system call
/// per wait and one per direction at the end, not one per byte.
fn splice_in(src: i32, pipe_w: i32, len: usize) -> io::Result<usize> {
    match splice(src, pipe_w, len) {
        Ok(0) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        moved => return moved,
    }
    read_into_pipe(src, pipe_w, len)
}

/// Bytes read past an urgent mark at once: at most PIPE_BUF (4,096), which a pipe takes
/// whole or not at all, and the pipe is empty here and at least 64 KiB.
const PAST_MARK: usize = 512;

fn read_into_pipe(src: i32, pipe_w: i32, len: usize) -> io::Result<usize> {
    let mut buf = [0u8; PAST_MARK];
    let want = len.min(PAST_MARK);
    // SAFETY: reads at most `want` bytes into a buffer of PAST_MARK >= want bytes we own.
    let n = unsafe { libc::recv(src, buf.as_mut_ptr().cast(), want, libc::MSG_DONTWAIT) };
    if n <= 0 {
        return if n == 0 { Ok(0) } else { Err(io::Error::last_os_error()) };
    }
    let n = n as usize;
    // SAFETY: writes `n` initialised bytes from our buffer to a pipe descriptor we own.
    let w = unsafe { libc::write(pipe_w, buf.as_ptr().cast(), n) };
    // The pipe is empty here (each chunk is drained before the next is read) and at least
    // 64 KiB, and writes of at most PIPE_BUF bytes are all-or-nothing: anything else is a bug
    // worth ending the tunnel over rather than a loss of bytes.
    if w != n as isize {
        // Never WouldBlock (the caller would wait and the bytes already read would be gone)
        // nor EINVAL (taken as "splice unsupported"): this ends the tunnel.
        let why = if w < 0 { io::Error::last_os_error().to_string() } else { format!("{w} of {n} bytes") };
        return Err(io::Error::other(format!("write into an empty pipe failed: {why}")));
    }
    Ok(n)
}

/// Relays between two TCP sockets until the tunnel ends. The caller must close both sockets
/// as soon as this returns: the direction that ends last leaves its FIN to that close.
pub async fn relay_tcp<FU: Flow, FD: Flow>(
    client: &TcpStream,
    upstream: &TcpStream,
    first_up: Vec<u8>,
    up: &mut FU,
    down: &mut FD,
    idle_timeout: Duration,
    stop: &CancellationToken,
) -> End {
    let activity = Activity::new();
    let ended = AtomicBool::new(false);
    let both = async {
        // Bytes that came with the CONNECT head go upstream before the client's next ones,
        // while the downstream direction already runs (an origin may talk first).
        let upward = async {
            for piece in first_up.chunks(up.max_chunk().unwrap_or(BUF_SIZE).max(1)) {
                pass(up, &activity, piece.len(), || write_all(upstream, piece)).await?;
            }
            pump(client, upstream, up, &activity, &ended).await
        };
        tokio::try_join!(upward, pump(upstream, client, down, &activity, &ended)).map(|_| ())
    };
    supervise(pin!(both), &activity, idle_timeout, stop).await
}

async fn write_all(dst: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        let n = dst.async_io(Interest::WRITABLE, || dst.try_write(bytes)).await?;
        bytes = &bytes[n..];
    }
    Ok(())
}

async fn pump<F: Flow>(
    src: &TcpStream,
    dst: &TcpStream,
    flow: &mut F,
    activity: &Activity,
    ended: &AtomicBool,
) -> io::Result<()> {
    // Small exchanges (a handshake, an interactive protocol) are cheapest as a plain read and
    // write through a pooled buffer held only while the bytes are in flight. A read that
    // fills its buffer marks a bulk transfer, and the direction moves to splice for good.
    if copy(src, dst, flow, activity, ended, true).await? == Copied::Eof {
        return Ok(());
    }
    let pipe = match Pipe::new() {
        Ok(p) => p,
        Err(_) => return copy_to_end(src, dst, flow, activity, ended).await,
    };
    let src_fd = src.as_raw_fd();
    let (pipe_r, pipe_w) = (pipe.read.as_raw_fd(), pipe.write.as_raw_fd());
    loop {
        let want = flow.max_chunk().map_or(PIPE_CHUNK, |c| c.clamp(1, PIPE_CHUNK));
        let n = match src.async_io(Interest::READABLE, || splice_in(src_fd, pipe_w, want)).await {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return copy_to_end(src, dst, flow, activity, ended).await;
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            return pass_eof(dst, ended);
        }
        pass(flow, activity, n, || drain_pipe(pipe_r, dst, n)).await?;
    }
}

/// Splices the `n` bytes waiting in the pipe `pipe_r` out to `dst`.
async fn drain_pipe(pipe_r: i32, dst: &TcpStream, n: usize) -> io::Result<()> {
    let dst_fd = dst.as_raw_fd();
    let mut left = n;
    while left > 0 {
        match dst.async_io(Interest::WRITABLE, || splice(pipe_r, dst_fd, left)).await? {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            m => left -= m,
        }
    }
    Ok(())
}

/// Half-close: pass the EOF on and let the other direction finish. The direction that ends
/// last skips the shutdown: the relay is over, and closing both sockets (which follows at
/// once, with nothing left unread) sends the same FIN for one system call less.
fn pass_eof(dst: &TcpStream, ended: &AtomicBool) -> io::Result<()> {
    if ended.swap(true, Ordering::Relaxed) {
        return Ok(());
    }
    socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write)
}

/// How a copy phase ended.
#[derive(Debug, PartialEq, Eq)]
enum Copied {
    /// The source ended (and the EOF was passed on).
    Eof,
    /// A read filled the buffer: the direction is bulk.
    Bulk,
}

/// Read into a pooled buffer, write it out, until the source ends (and the EOF was passed on)
/// or, with `until_bulk`, a read fills the buffer.
async fn copy<F: Flow>(
    src: &TcpStream,
    dst: &TcpStream,
    flow: &mut F,
    activity: &Activity,
    ended: &AtomicBool,
    until_bulk: bool,
) -> io::Result<Copied> {
    loop {
        let want = flow.max_chunk().map_or(COPY_BUF, |c| c.clamp(1, COPY_BUF));
        src.readable().await?;
        let mut buf = pool::take();
        // `try_read`, not `AsyncRead::poll_read`: tokio's poll_read takes a short read as
        // proof the socket is drained and clears readiness, but Linux also ends a read at the
        // urgent mark, and the bytes behind it would then wait for the peer's next segment.
        let n = match src.try_read(&mut buf[..want]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pool::give(buf);
                continue;
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            pool::give(buf);
            pass_eof(dst, ended)?;
            return Ok(Copied::Eof);
        }
        pass(flow, activity, n, || write_all(dst, &buf[..n])).await?;
        pool::give(buf);
        if until_bulk && n == want {
            return Ok(Copied::Bulk);
        }
    }
}

/// The portable path for a direction splice cannot serve; boxed, because it is rare and its
/// state would otherwise enlarge every tunnel.
async fn copy_to_end<F: Flow>(
    src: &TcpStream,
    dst: &TcpStream,
    flow: &mut F,
    activity: &Activity,
    ended: &AtomicBool,
) -> io::Result<()> {
    Box::pin(copy(src, dst, flow, activity, ended, false)).await.map(drop)
}

/// Per-thread pool of copy buffers, so a tunnel holds one only while its bytes are in flight.
mod pool {
    use std::cell::RefCell;

    use super::COPY_BUF;

    /// Buffers kept per thread; more are freed.
    const KEEP: usize = 64;

    thread_local! {
        static FREE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn take() -> Box<[u8]> {
        FREE.with(|f| f.borrow_mut().pop()).unwrap_or_else(|| vec![0u8; COPY_BUF].into_boxed_slice())
    }

    pub(super) fn give(buf: Box<[u8]>) {
        FREE.with(|f| {
            let mut f = f.borrow_mut();
            if f.len() < KEEP {
                f.push(buf);
            }
        });
    }
}
