//! The plain TCP servers tunnels end at: sink, source and echo. The wire protocol is
//! tunnelbench's, so either tool's client works against either tool's servers:
//!
//! - sink: first byte `D` = discard and count everything after it (on the client's half-close
//!   the connection's own count is written back, 8 bytes big-endian); first byte `Q` = answer
//!   16 bytes (total bytes received by all `D` connections, number of `D` connections).
//! - source: after the client's first byte (any), stream 128 KiB buffers until it closes.
//! - echo: write back whatever arrives.

use crate::common::{accept_forever, err, loopback_addr};
use clap::Args;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Args)]
pub struct ServeArgs {
    /// Sink address (e.g. 127.0.0.1:18901).
    #[arg(long)]
    pub sink: Option<String>,
    /// Source address (e.g. 127.0.0.1:18902).
    #[arg(long)]
    pub source: Option<String>,
    /// Echo address (e.g. 127.0.0.1:18903).
    #[arg(long)]
    pub echo: Option<String>,
    /// Exit by itself after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub max_secs: u64,
}

static SINK_BYTES: AtomicU64 = AtomicU64::new(0);
static SINK_CONNS: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy)]
enum Kind {
    Sink,
    Source,
    Echo,
}

pub async fn serve(a: ServeArgs) -> io::Result<()> {
    let mut tasks = Vec::new();
    for (addr, kind, name) in
        [(a.sink, Kind::Sink, "sink"), (a.source, Kind::Source, "source"), (a.echo, Kind::Echo, "echo")]
    {
        let Some(addr) = addr else { continue };
        let l = TcpListener::bind(loopback_addr(&addr)?).await?;
        eprintln!("{name} listening on {}", l.local_addr()?);
        tasks.push(tokio::spawn(accept_loop(l, kind)));
    }
    if tasks.is_empty() {
        return Err(err("nothing to serve: give --sink, --source and/or --echo"));
    }
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(a.max_secs)) => {
            eprintln!("serve: --max-secs reached, exiting");
            Ok(())
        }
        r = async {
            for t in tasks {
                t.await.map_err(|e| err(e.to_string()))??;
            }
            io::Result::Ok(())
        } => r,
    }
}

async fn accept_loop(l: TcpListener, kind: Kind) -> io::Result<()> {
    accept_forever(l, move |s| async move {
        let _ = match kind {
            Kind::Sink => sink_conn(s).await,
            Kind::Source => source_conn(s).await,
            Kind::Echo => echo_conn(s).await,
        };
    })
    .await;
    Ok(())
}

async fn sink_conn(mut s: TcpStream) -> io::Result<()> {
    let mut mode = [0u8; 1];
    s.read_exact(&mut mode).await?;
    if mode[0] == b'Q' {
        return s.write_all(&sink_totals()).await;
    }
    SINK_CONNS.fetch_add(1, Relaxed);
    let mut buf = vec![0u8; 256 * 1024];
    let mut mine = 0u64;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return s.write_all(&mine.to_be_bytes()).await;
        }
        mine += n as u64;
        SINK_BYTES.fetch_add(n as u64, Relaxed);
    }
}

fn sink_totals() -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&SINK_BYTES.load(Relaxed).to_be_bytes());
    out[8..].copy_from_slice(&SINK_CONNS.load(Relaxed).to_be_bytes());
    out
}

/// The pattern every source streams (bytes 0..=250 repeating).
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

async fn source_conn(mut s: TcpStream) -> io::Result<()> {
    let mut go = [0u8; 1];
    s.read_exact(&mut go).await?;
    let buf = pattern(128 * 1024);
    loop {
        s.write_all(&buf).await?;
    }
}

async fn echo_conn(mut s: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        s.write_all(&buf[..n]).await?;
    }
}

/// Ask a sink directly (never through the proxy) how many bytes it has received in total.
pub async fn tcp_sink_query(sink: std::net::SocketAddr) -> io::Result<u64> {
    let mut s = TcpStream::connect(sink).await?;
    s.write_all(b"Q").await?;
    let mut b = [0u8; 16];
    s.read_exact(&mut b).await?;
    Ok(u64::from_be_bytes(b[..8].try_into().expect("8 bytes")))
}
