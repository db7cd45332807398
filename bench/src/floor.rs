//! `vgbench floor`: the least a userspace relay can do per tunnel and per byte, run beside a
//! proxy so that its figures can be put in proportion on the machine at hand.
//!
//! No CONNECT, no policy, no metrics, no event loop: it accepts, dials one fixed target and
//! runs one blocking thread per direction, splice(2) socket → pipe → socket (`--copy`: read
//! and write through a 256 KiB buffer). A blocked thread is woken by the socket itself, so a
//! hop costs one wakeup and the two system calls that move the bytes; a CONNECT proxy does
//! strictly more. Threads make it a poor server for many tunnels: it is a yardstick, not a
//! proxy.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::common::{err, loopback_addr};

#[derive(clap::Args)]
pub struct FloorArgs {
    /// Loopback address to listen on.
    #[arg(long)]
    listen: String,
    /// Loopback address every accepted connection is relayed to.
    #[arg(long)]
    target: String,
    /// Read and write through a buffer instead of splicing.
    #[arg(long)]
    copy: bool,
    /// Exit by itself after this many seconds.
    #[arg(long, default_value_t = 7200)]
    max_secs: u64,
}

const CHUNK: usize = 256 * 1024;

pub fn floor(a: FloorArgs) -> io::Result<()> {
    let listen = loopback_addr(&a.listen)?;
    let target = loopback_addr(&a.target)?;
    let listener = TcpListener::bind(listen)?;
    let deadline = Instant::now() + Duration::from_secs(a.max_secs);
    let copy = a.copy;
    std::thread::spawn(move || {
        std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
        std::process::exit(0);
    });
    eprintln!("floor relay {listen} -> {target} ({})", if copy { "copy" } else { "splice" });
    for client in listener.incoming() {
        let Ok(client) = client else {
            // Out of descriptors or buffers: back off instead of spinning.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        std::thread::spawn(move || {
            let Ok(upstream) = TcpStream::connect(target) else { return };
            for s in [&client, &upstream] {
                let _ = s.set_nodelay(true);
            }
            let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else { return };
            // A failed direction shuts both sockets down fully, which also wakes the other.
            let up = std::thread::spawn(move || {
                if pump(&c2, &u2, copy).is_err() {
                    shut(&c2, &u2);
                }
            });
            if pump(&upstream, &client, copy).is_err() {
                shut(&client, &upstream);
            }
            let _ = up.join();
        });
    }
    Err(err("listener closed"))
}

fn shut(a: &TcpStream, b: &TcpStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}

/// One direction until EOF, then pass the EOF on.
fn pump(mut src: &TcpStream, mut dst: &TcpStream, copy: bool) -> io::Result<()> {
    if copy {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = src.read(&mut buf)?;
            if n == 0 {
                break;
            }
            dst.write_all(&buf[..n])?;
        }
    } else {
        let (pr, pw) = pipe()?;
        loop {
            let n = splice(src.as_raw_fd(), pw.as_raw_fd(), CHUNK)?;
            if n == 0 {
                break;
            }
            let mut left = n;
            while left > 0 {
                left -= splice(pr.as_raw_fd(), dst.as_raw_fd(), left)?;
            }
        }
    }
    dst.shutdown(Shutdown::Write)
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two new descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl with an integer argument on a descriptor we own; a refusal keeps 64 KiB.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
    Ok((r, w))
}

fn splice(from: i32, to: i32, len: usize) -> io::Result<usize> {
    // SAFETY: plain descriptors, null offsets, a length; the kernel checks them all.
    let n = unsafe { libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, libc::SPLICE_F_MOVE) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}
