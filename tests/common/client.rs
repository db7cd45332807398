//! Clients that speak CONNECT to a proxy listener. [`Client`] is one type over every front a
//! listener can speak, so a test sends the same exchange to a plaintext or a TLS listener and
//! reads and writes the tunnel the same way; [`connect_via`] and [`connect_from`] are its
//! plaintext case, as most tests want a bare `TcpStream`.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

use super::bounded;

/// A reply head read byte by byte, so nothing after it is consumed.
pub struct ReplyHead {
    pub status: u16,
    pub text: String,
}

impl ReplyHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
        })
    }
}

/// Reads a response head (up to and including the blank line) from any stream.
pub async fn read_reply_head<S: AsyncRead + Unpin>(s: &mut S) -> ReplyHead {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    bounded(async {
        while !head.ends_with(b"\r\n\r\n") {
            match s.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&head).to_string();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    ReplyHead { status, text }
}

/// Connects to the proxy from `from` (a loopback address such as 127.0.0.5) or the default.
pub async fn dial_proxy(proxy: SocketAddr, from: Option<IpAddr>) -> TcpStream {
    match from {
        None => bounded(TcpStream::connect(proxy)).await.expect("proxy accepts"),
        Some(ip) => {
            let sock = TcpSocket::new_v4().unwrap();
            sock.bind(SocketAddr::new(ip, 0)).expect("bind client address");
            bounded(sock.connect(proxy)).await.expect("proxy accepts")
        }
    }
}

/// What a client speaks to a proxy listener.
#[derive(Clone)]
pub enum Front {
    /// HTTP/1 over plain TCP.
    Plain,
    /// HTTP/1 over TLS: trusts `config`'s roots and sends `name` as SNI.
    Tls { config: Arc<rustls::ClientConfig>, name: ServerName<'static> },
    // H2 comes with the TLS listener issue: `H2 { config, name }`, ALPN "h2", each CONNECT one
    // stream of a shared connection.
}

/// A client's connection to a proxy listener, whichever front it speaks. It reads and writes
/// the tunnel once [`Client::connect`] got a 200.
pub enum Client {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    // H2 comes with the TLS listener issue: the CONNECT stream's halves (h2 `SendStream` and
    // `RecvStream`) as one AsyncRead + AsyncWrite, its `:status` turned into the ReplyHead
    // by `connect`.
}

impl Client {
    /// Dials `proxy` from `from` (or the default address) and completes the front's handshake.
    /// A failed TLS handshake is the error; a proxy that does not accept TCP fails the test.
    pub async fn open(proxy: SocketAddr, from: Option<IpAddr>, front: &Front) -> io::Result<Client> {
        let tcp = dial_proxy(proxy, from).await;
        match front {
            Front::Plain => Ok(Client::Plain(tcp)),
            Front::Tls { config, name } => {
                let tls =
                    bounded(tokio_rustls::TlsConnector::from(Arc::clone(config)).connect(name.clone(), tcp)).await?;
                Ok(Client::Tls(Box::new(tls)))
            }
        }
    }

    /// Sends `CONNECT target` and reads the reply head.
    pub async fn connect(&mut self, target: &str) -> ReplyHead {
        self.connect_as(target, None).await
    }

    /// Sends `CONNECT target` with Basic `credentials` ("user:password") when given, and reads
    /// the reply head.
    pub async fn connect_as(&mut self, target: &str, credentials: Option<&str>) -> ReplyHead {
        use base64::Engine;
        let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(c) = credentials {
            req += &format!("Proxy-Authorization: Basic {}\r\n", base64::engine::general_purpose::STANDARD.encode(c));
        }
        req += "\r\n";
        self.write_all(req.as_bytes()).await.unwrap();
        // TLS holds records until flushed; plain TCP has nothing to flush.
        self.flush().await.unwrap();
        read_reply_head(self).await
    }

    /// The TCP socket under any front, for socket options and urgent data.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Client::Plain(s) => s,
            Client::Tls(s) => s.get_ref().0,
        }
    }

    /// The plain TCP stream; panics for any other front.
    pub fn into_tcp(self) -> TcpStream {
        match self {
            Client::Plain(s) => s,
            Client::Tls(_) => panic!("into_tcp on a TLS client"),
        }
    }
}

impl AsyncRead for Client {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Client::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Client::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Client {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Client::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Client::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Client::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Client::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Client::Plain(s) => s.is_write_vectored(),
            Client::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Client::Plain(s) => Pin::new(s).poll_flush(cx),
            Client::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Client::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Client::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Opens a client over `front` from `from` (or the default) and sends `CONNECT target`.
pub async fn connect_over(front: &Front, proxy: SocketAddr, from: Option<IpAddr>, target: &str) -> (ReplyHead, Client) {
    let mut client = Client::open(proxy, from, front).await.expect("front handshake");
    let head = client.connect(target).await;
    (head, client)
}

/// Sends `CONNECT target` and reads the reply head.
pub async fn connect_via(proxy: SocketAddr, target: &str) -> (ReplyHead, TcpStream) {
    connect_from(proxy, None, target).await
}

/// Sends `CONNECT target` from a chosen client address.
pub async fn connect_from(proxy: SocketAddr, from: Option<IpAddr>, target: &str) -> (ReplyHead, TcpStream) {
    let (head, client) = connect_over(&Front::Plain, proxy, from, target).await;
    (head, client.into_tcp())
}

/// Sends raw bytes and returns everything the proxy answers until it closes.
pub async fn raw_exchange(proxy: SocketAddr, bytes: &[u8]) -> String {
    let mut s = dial_proxy(proxy, None).await;
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = bounded(s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}
