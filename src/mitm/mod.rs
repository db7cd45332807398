//! MITM mode, per route: terminate the client's TLS with a leaf minted for the CONNECT host,
//! re-originate verified TLS upstream, and relay the plaintext (with the same throttling and
//! counting as a tunnel) while [`observe`] records what interception can see.
//!
//! The order is deliberate. The ClientHello is read first (its SNI must name the CONNECT host,
//! or the handshake fails closed; its ALPN offer is passed upstream); the upstream handshake
//! completes and verifies next; only then is the client's handshake finished, with the
//! protocol the upstream chose. An upstream certificate that does not verify therefore fails
//! the client's handshake too: veilgate never turns a bad certificate into a trusted one.

pub mod ca;
pub mod observe;
pub mod tls;

use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::{LazyConfigAcceptor, TlsConnector};

use crate::config::MitmConfig;
use crate::io::PrefixedIo;
use crate::target::{Host, Target};
use ca::{CaError, CertAuthority};
use tls::UpstreamTls;

/// The client-facing TLS stream, over whatever stream the client's front handed over.
pub type ClientTls<C> = tokio_rustls::server::TlsStream<PrefixedIo<C>>;
/// The TLS session to the origin: always over TCP, since veilgate dials the origin itself.
pub type UpstreamTlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// Everything `mitm` routes need, loaded once per configuration.
pub struct Interceptor {
    ca: CertAuthority,
    upstream: UpstreamTls,
    /// Record query strings of observed paths.
    pub log_query: bool,
}

/// Why an interception did not get to relaying.
#[derive(Debug, thiserror::Error)]
pub enum MitmError {
    /// The client's handshake failed or was refused (SNI mismatch, no TLS, timeout).
    #[error("client TLS: {0}")]
    Client(String, Option<String>),
    /// The upstream handshake failed: unreachable, untrusted, expired or wrong-name certificate.
    #[error("upstream TLS: {0}")]
    Upstream(String, Option<String>),
}

impl MitmError {
    fn client(why: impl Into<String>) -> MitmError {
        MitmError::Client(why.into(), None)
    }

    fn upstream(why: impl Into<String>) -> MitmError {
        MitmError::Upstream(why.into(), None)
    }

    /// Metric label `side`.
    pub fn side(&self) -> &'static str {
        match self {
            MitmError::Client(..) => "client",
            MitmError::Upstream(..) => "upstream",
        }
    }

    /// The TLS alert that ended the handshake, when one did ("received bad_certificate",
    /// "sent unknown_ca"): what the operator compares with the peer's own log.
    pub fn alert(&self) -> Option<&str> {
        match self {
            MitmError::Client(_, a) | MitmError::Upstream(_, a) => a.as_deref(),
        }
    }
}

/// Both TLS sessions, ready to relay.
pub struct Intercepted<C> {
    /// The client's session, terminated here.
    pub client: ClientTls<C>,
    /// The session to the origin.
    pub upstream: UpstreamTlsStream,
    /// The application protocol both sides agreed on.
    pub alpn: Option<Vec<u8>>,
    /// Whether the leaf was minted for this connection (else it came from the cache).
    pub minted: bool,
}

impl Interceptor {
    /// Loads the CA (refusing an exposed key) and the upstream roots.
    pub fn load(cfg: &MitmConfig) -> Result<Interceptor, CaError> {
        let interceptor = Interceptor {
            ca: CertAuthority::load(&cfg.ca_cert, &cfg.ca_key, cfg.leaf_cache_size, cfg.leaf_cache_ttl.0)?,
            upstream: UpstreamTls::load(&cfg.upstream_roots)?,
            log_query: cfg.log_query,
        };
        // The crypto library seeds its random generator on first use, which costs tens of
        // milliseconds; pay it here rather than in the first client's handshake.
        interceptor.ca.warm_up()?;
        Ok(interceptor)
    }

    /// Runs both handshakes. `leftover` are bytes the client sent with its CONNECT head.
    pub async fn intercept<C: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: C,
        leftover: Vec<u8>,
        upstream: TcpStream,
        target: &Target,
        deadline: Duration,
    ) -> Result<Intercepted<C>, MitmError> {
        let host = target.host_str();
        let t0 = std::time::Instant::now();
        let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), PrefixedIo::new(leftover, client));
        let start = tokio::time::timeout(deadline, acceptor)
            .await
            .map_err(|_| MitmError::client("no ClientHello in time"))?
            .map_err(|e| MitmError::Client(format!("not a TLS ClientHello: {e}"), tls::alert(&e)))?;
        let t_hello = t0.elapsed();
        let hello = start.client_hello();
        if let Some(sni) = hello.server_name() {
            if !sni.trim_end_matches('.').eq_ignore_ascii_case(&host) {
                let why = format!("SNI {sni:?} does not match the CONNECT host {host:?}");
                let _ = start.into_stream(tls::refusing_config()).await;
                return Err(MitmError::client(why));
            }
        }
        let offer: Vec<Vec<u8>> = hello.alpn().map(|it| it.map(<[u8]>::to_vec).collect()).unwrap_or_default();
        let name = match &target.host {
            Host::Ip(ip) => ServerName::IpAddress((*ip).into()),
            Host::Name(n) => match ServerName::try_from(n.clone()) {
                Ok(sn) => sn,
                Err(e) => return Err(MitmError::upstream(format!("{n}: {e}"))),
            },
        };
        let connector = TlsConnector::from(self.upstream.config(offer));
        let upstream = match tokio::time::timeout(deadline, connector.connect(name, upstream)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let _ = start.into_stream(tls::refusing_config()).await;
                return Err(MitmError::Upstream(e.to_string(), tls::alert(&e)));
            }
            Err(_) => {
                let _ = start.into_stream(tls::refusing_config()).await;
                return Err(MitmError::upstream("handshake timed out"));
            }
        };
        let t_upstream = t0.elapsed();
        let alpn = upstream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let leaf = self.ca.leaf_for(&host).map_err(|e| MitmError::client(format!("minting a leaf: {e}")))?;
        let client = tokio::time::timeout(deadline, start.into_stream(tls::server_config(leaf.key, alpn.clone())))
            .await
            .map_err(|_| MitmError::client("handshake timed out"))?
            .map_err(|e| MitmError::Client(e.to_string(), tls::alert(&e)))?;
        tracing::debug!(
            hello_us = t_hello.as_micros() as u64,
            upstream_us = (t_upstream - t_hello).as_micros() as u64,
            client_us = (t0.elapsed() - t_upstream).as_micros() as u64,
            minted = leaf.minted,
            "interception handshakes"
        );
        Ok(Intercepted { client, upstream, alpn, minted: leaf.minted })
    }
}
