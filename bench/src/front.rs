//! The client's leg to the proxy: the same load over the plaintext listener, over TLS to the
//! proxy (HTTP/1.1 CONNECT inside TLS, one connection per tunnel) and over HTTP/2 CONNECT
//! (one stream per tunnel, many streams per TLS connection). `front-throughput`,
//! `front-connrate` and `front-idle` measure what `throughput`, `connrate` and `idle` measure,
//! so the three fronts can be put side by side (`bench/front.sh`).

use crate::common::*;
use crate::load::{
    BulkOpts, Dir, IdleOpts, Rate, bulk_report, check_byte, echo_byte, run_bulk, run_connrate, run_idle,
};
use crate::pki;
use crate::servers::tcp_sink_query;
use bytes::{Buf, Bytes};
use clap::{Args, ValueEnum};
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use serde_json::json;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

/// How the client reaches the proxy.
#[derive(Copy, Clone, ValueEnum, PartialEq, Eq, Debug)]
pub enum FrontKind {
    /// Plaintext HTTP/1.1 CONNECT.
    Plain,
    /// HTTP/1.1 CONNECT inside TLS (ALPN http/1.1): one TLS connection per tunnel.
    Tls,
    /// HTTP/2 CONNECT (ALPN h2): one stream per tunnel.
    H2,
}

#[derive(Args, Clone)]
pub struct FrontOpts {
    /// plain, tls or h2.
    #[arg(long, value_enum)]
    pub front: FrontKind,
    /// PEM CA the proxy's TLS certificate chains to (tls and h2).
    #[arg(long)]
    pub proxy_ca: Option<PathBuf>,
    /// Name to check the proxy's certificate against.
    #[arg(long, default_value = "localhost")]
    pub proxy_name: String,
    /// h2: CONNECT streams per TLS connection (the proxy's h2_max_streams bounds it).
    #[arg(long, default_value_t = 100)]
    pub streams_per_conn: usize,
}

/// A tunnel over any front.
pub type Tunnel = Pin<Box<dyn AsyncReadWrite>>;
pub trait AsyncReadWrite: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> AsyncReadWrite for T {}

/// Opens tunnels over one front. For h2 it keeps connections and puts `streams_per_conn`
/// streams on each, opening a new connection when one is full.
pub struct Opener {
    ctx: Ctx,
    kind: FrontKind,
    tls: Option<(TlsConnector, rustls::pki_types::ServerName<'static>)>,
    per_conn: usize,
    h2: tokio::sync::Mutex<Vec<(SendRequest<Bytes>, usize)>>,
}

impl Opener {
    pub fn new(c: &Common, f: &FrontOpts, alpn: &[u8]) -> io::Result<Opener> {
        let ctx = Ctx::new(c)?;
        let tls = match f.front {
            FrontKind::Plain => None,
            _ => {
                let ca = f.proxy_ca.as_ref().ok_or_else(|| err("--proxy-ca is needed for tls and h2"))?;
                let mut cfg = (*pki::client_config(ca, true, &[])?).clone();
                cfg.alpn_protocols = vec![alpn.to_vec()];
                Some((TlsConnector::from(Arc::new(cfg)), pki::server_name(&f.proxy_name)?))
            }
        };
        Ok(Opener { ctx, kind: f.front, tls, per_conn: f.streams_per_conn.max(1), h2: Default::default() })
    }

    pub fn op(&self) -> Duration {
        self.ctx.op
    }

    /// One tunnel to the target, within the operation timeout.
    pub async fn open(&self) -> io::Result<Tunnel> {
        timeout(self.ctx.op, self.open_now()).await.map_err(|_| err("tunnel open timed out"))?
    }

    async fn open_now(&self) -> io::Result<Tunnel> {
        let proxy = self.ctx.proxy.ok_or_else(|| err("a front needs --proxy"))?;
        match self.kind {
            FrontKind::Plain => {
                let (s, rest) = open_tunnel(Some(proxy), &self.ctx.target, self.ctx.target_addr).await?;
                no_rest(&rest)?;
                Ok(Box::pin(s))
            }
            FrontKind::Tls => {
                let mut tls = self.handshake(proxy).await?;
                let rest = connect_answer(&mut tls, &self.ctx.target).await?;
                no_rest(&rest)?;
                Ok(Box::pin(tls))
            }
            FrontKind::H2 => self.stream(proxy).await,
        }
    }

    async fn handshake(&self, proxy: std::net::SocketAddr) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let (connector, name) = self.tls.as_ref().ok_or_else(|| err("no TLS"))?;
        let tcp = TcpStream::connect(proxy).await?;
        tcp.set_nodelay(true)?;
        connector.connect(name.clone(), tcp).await.map_err(|e| err(format!("TLS to the proxy: {e}")))
    }

    async fn stream(&self, proxy: std::net::SocketAddr) -> io::Result<Tunnel> {
        let send = {
            let mut conns = self.h2.lock().await;
            match conns.iter_mut().find(|(_, n)| *n < self.per_conn) {
                Some((send, n)) => {
                    *n += 1;
                    send.clone()
                }
                None => {
                    let tls = self.handshake(proxy).await?;
                    if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                        return Err(err("the proxy did not agree to h2"));
                    }
                    // Chrome's windows: 6 MiB per stream, 15 MiB per connection.
                    let (send, conn) = h2::client::Builder::new()
                        .initial_window_size(6 << 20)
                        .initial_connection_window_size(15 << 20)
                        .handshake(tls)
                        .await
                        .map_err(|e| err(format!("h2 handshake: {e}")))?;
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    conns.push((send.clone(), 1));
                    send
                }
            }
        };
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(self.ctx.target.as_str())
            .body(())
            .map_err(|e| err(e.to_string()))?;
        let mut send = send.ready().await.map_err(|e| err(format!("h2: {e}")))?;
        let (resp, body) = send.send_request(req, false).map_err(|e| err(format!("h2 request: {e}")))?;
        let resp = resp.await.map_err(|e| err(format!("h2 response: {e}")))?;
        if resp.status() != 200 {
            return Err(err(format!("CONNECT refused: {}", resp.status())));
        }
        Ok(Box::pin(H2Tunnel { send: body, recv: resp.into_body(), unread: Bytes::new() }))
    }
}

fn no_rest(rest: &[u8]) -> io::Result<()> {
    if rest.is_empty() { Ok(()) } else { Err(err("unexpected bytes after the CONNECT answer")) }
}

/// One HTTP/2 CONNECT stream as a byte stream.
struct H2Tunnel {
    send: SendStream<Bytes>,
    recv: RecvStream,
    unread: Bytes,
}

impl AsyncRead for H2Tunnel {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.unread.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    this.unread = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = this.unread.len().min(buf.remaining());
        buf.put_slice(&this.unread[..n]);
        this.unread.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Tunnel {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.send;
        send.reserve_capacity(data.len());
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(n)) => {
                let n = n.min(data.len());
                send.send_data(Bytes::copy_from_slice(&data[..n]), false).map_err(io::Error::other)?;
                Poll::Ready(Ok(n))
            }
            Some(Err(e)) => Poll::Ready(Err(io::Error::other(e))),
            None => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = self.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}

fn alpn(kind: FrontKind) -> &'static [u8] {
    if kind == FrontKind::H2 { b"h2" } else { b"http/1.1" }
}

fn front_json(test: &str, c: &Common, f: &FrontOpts) -> Json {
    let mut m = base_json(test, c);
    m.insert("front".into(), json!(format!("{:?}", f.front).to_lowercase()));
    m
}

#[derive(Args)]
pub struct FrontThroughputArgs {
    #[command(flatten)]
    pub c: Common,
    #[command(flatten)]
    pub f: FrontOpts,
    #[command(flatten)]
    pub b: BulkOpts,
}

pub async fn throughput(a: FrontThroughputArgs) -> io::Result<()> {
    let opener = Opener::new(&a.c, &a.f, alpn(a.f.front))?;
    let mut streams = Vec::with_capacity(a.b.conns);
    for _ in 0..a.b.conns {
        streams.push(opener.open().await?);
    }
    let hello = if a.b.dir == Dir::Up { b'D' } else { b'G' };
    let sink = Ctx::new(&a.c)?.target_addr;
    let r = run_bulk(streams, &a.b, hello, opener.op(), &a.c.pid, || tcp_sink_query(sink)).await?;
    let mut m = front_json("front-throughput", &a.c, &a.f);
    let human = bulk_report(&mut m, "front-throughput", &who(&a.c), &a.b, &r);
    emit(m, human);
    Ok(())
}

#[derive(Args)]
pub struct FrontConnrateArgs {
    #[command(flatten)]
    pub c: Common,
    #[command(flatten)]
    pub f: FrontOpts,
    /// Concurrent workers.
    #[arg(long, default_value_t = 50)]
    pub conns: usize,
    /// Tunnels in all.
    #[arg(long, default_value_t = 3000)]
    pub total: usize,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 60)]
    pub max_secs: u64,
}

/// New tunnels per second: open, one byte echoed, close. Over tls each tunnel is a new TLS
/// connection (sessions resumed, as browsers do); over h2 a new stream on a kept connection.
pub async fn connrate(a: FrontConnrateArgs) -> io::Result<()> {
    let opener = Arc::new(Opener::new(&a.c, &a.f, alpn(a.f.front))?);
    let mut m = front_json("front-connrate", &a.c, &a.f);
    let op = opener.op();
    let rate = Rate { conns: a.conns, total: a.total, max_secs: a.max_secs, op, pids: &a.c.pid };
    let human = run_connrate(rate, &mut m, move |i| {
        let opener = opener.clone();
        async move {
            let mut s = opener.open().await?;
            echo_byte(&mut s, check_byte(i)).await?;
            Ok(s)
        }
    })
    .await?;
    emit(m, format!("front-connrate {:?} {}: {human}", a.f.front, who(&a.c)));
    Ok(())
}

#[derive(Args)]
pub struct FrontIdleArgs {
    #[command(flatten)]
    pub c: Common,
    #[command(flatten)]
    pub f: FrontOpts,
    #[command(flatten)]
    pub i: IdleOpts,
}

pub async fn idle(a: FrontIdleArgs) -> io::Result<()> {
    let opener = Arc::new(Opener::new(&a.c, &a.f, alpn(a.f.front))?);
    let mut m = front_json("front-idle", &a.c, &a.f);
    let op = opener.op();
    let human = run_idle(&a.i, op, &a.c.pid, "front-idle", &who(&a.c), &mut m, move |_| {
        let opener = opener.clone();
        async move { opener.open().await }
    })
    .await;
    emit(m, human);
    Ok(())
}
