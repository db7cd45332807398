//! The HTTPS proxy front (`server.tls_listen`): the client speaks TLS to veilgate, and inside
//! the session the same HTTP/1 CONNECT as on the plaintext listener ([`super::h1`] on the TLS
//! stream), so targets and credentials never cross the client's network in the clear.
//!
//! The connection enters the same head-phase bound as a plaintext one at accept, and the
//! handshake and the head together must finish within `header_timeout` (a slow handshake is
//! a slowloris too). The first byte tells a TLS client from a plaintext one before any TLS
//! work: plaintext gets a readable 400 that says to use an `https://` proxy URL, as nginx
//! does for plain HTTP on its HTTPS port.
//!
//! The certificate is part of the configuration snapshot, so a reload (SIGHUP) that loads a
//! new pair serves it to the next handshake while running tunnels keep their sessions; a pair
//! that does not load fails the reload, and the old one stays.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span};

use super::{ClientId, ClientIo};
use crate::config::TlsClientAuth;
use crate::context::Context;
use crate::error::{Refusal, Unanswered};
use crate::mitm::ca::{self, CaError};
use crate::tunnel::client_field;

/// First byte of a TLS record carrying a handshake message (a ClientHello, here).
pub(crate) const TLS_HANDSHAKE: u8 = 0x16;

impl ClientIo for TlsStream<TcpStream> {
    fn secure(&self) -> bool {
        true
    }
}

/// Loads the listener's certificate chain and key into a server configuration: TLS 1.2 and
/// 1.3 (rustls offers nothing older), ALPN `h2` (HTTP/2 CONNECT, [`super::h2`]) and
/// `http/1.1`.
pub fn load(
    cert: &Path,
    key: &Path,
    client_ca: Option<(&Path, TlsClientAuth)>,
) -> Result<Arc<rustls::ServerConfig>, CaError> {
    let chain = ca::read_pem_certs(cert)?;
    if chain.is_empty() {
        return Err(CaError::Tls(format!("{}: no certificate in the file", cert.display())));
    }
    let pem = ca::read_private(key)?;
    let key_der = PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| CaError::Tls(format!("{}: no usable private key: {e}", key.display())))?;
    let builder = rustls::ServerConfig::builder();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some((path, auth)) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in ca::read_pem_certs(path)? {
                roots.add(c).map_err(|e| CaError::Tls(format!("{}: {e}", path.display())))?;
            }
            if roots.is_empty() {
                return Err(CaError::Tls(format!("{}: no certificate in the file", path.display())));
            }
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots));
            let verifier = match auth {
                TlsClientAuth::Required => verifier,
                TlsClientAuth::Optional => verifier.allow_unauthenticated(),
            };
            let verifier = verifier.build().map_err(|e| CaError::Tls(format!("{}: {e}", path.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder
        .with_single_cert(chain, key_der)
        .map_err(|e| CaError::Tls(format!("{} and {}: {e}", cert.display(), key.display())))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Takes a connection accepted on a TLS listener into its head phase, as
/// [`super::h1::accepted`] does for a plaintext one, with the handshake first.
pub(crate) fn accepted(ctx: &Arc<Context>, tracker: &TaskTracker, stream: TcpStream, peer: std::net::SocketAddr) {
    let shared = ctx.shared();
    let Some(tls) = shared.tls.clone() else {
        // Validation makes this unreachable: a TLS listener is bound only with a certificate.
        return;
    };
    match ctx.pending.enter(shared.client_key(peer.ip()), shared.config.server.max_pending) {
        Ok(permit) => {
            let span = info_span!("conn", id = super::next_id(), tls = true);
            let client = ClientId::at(peer);
            let ctx = Arc::clone(ctx);
            tracker.spawn(
                async move {
                    let started = Instant::now();
                    let deadline = ctx.shared().config.server.header_timeout.0;
                    let handshake = tokio::select! {
                        r = tokio::time::timeout(deadline, handshake(&ctx, stream, &client, tls)) => r,
                        () = ctx.draining.cancelled() => return,
                    };
                    match handshake {
                        Ok(Some(tls)) => {
                            let client = ClientId { identity: identity(&tls), ..client };
                            if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                                ctx.metrics.listeners.tls_sessions_h2.increment(1);
                                // Past the handshake the connection is no longer one head in
                                // flight: each stream is admitted on its own.
                                drop(permit);
                                let left = deadline.saturating_sub(started.elapsed());
                                return super::h2::serve(ctx, tls, client, left).await;
                            }
                            ctx.metrics.listeners.tls_sessions_h1.increment(1);
                            super::h1::serve_after(ctx, tls, client, Some(permit), Vec::new(), started.elapsed()).await
                        }
                        Ok(None) => {}
                        Err(_) => failed(&ctx, &client, "no complete handshake within server.header_timeout"),
                    }
                }
                .instrument(span),
            );
        }
        Err(why) => super::h1::turn_away(ctx, &stream, why),
    }
}

/// Tells TLS from plaintext by the first byte, then shakes hands. `None` when the connection
/// ended here (answered, failed, or closed).
async fn handshake(
    ctx: &Context,
    stream: TcpStream,
    client: &ClientId,
    tls: Arc<rustls::ServerConfig>,
) -> Option<TlsStream<TcpStream>> {
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(1) => {}
        _ => return None,
    }
    if first[0] != TLS_HANDSHAKE {
        let refusal = Refusal::PlaintextOnTls;
        let mut conn = super::h1::H1::new(stream);
        crate::tunnel::refuse(ctx, &mut conn, client, refusal, None).await;
        return None;
    }
    match TlsAcceptor::from(tls).accept(stream).await {
        Ok(s) => Some(s),
        Err(e) => {
            failed(ctx, client, &handshake_error(&e));
            None
        }
    }
}

/// The identity of the client's verified certificate, if it sent one: the subject's common
/// name, else its first email or URI name. rustls has verified the chain before this runs
/// (a certificate it could not verify ends the handshake), so what is read here is trusted.
fn identity(tls: &TlsStream<TcpStream>) -> Option<Arc<str>> {
    let leaf: &CertificateDer = tls.get_ref().1.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    if let Some(cn) = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()) {
        return Some(Arc::from(cn));
    }
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::RFC822Name(s) | x509_parser::extensions::GeneralName::URI(s) => {
            Some(Arc::from(*s))
        }
        _ => None,
    })
}

/// Counts and logs (within the refusal log's rate) a handshake that did not complete.
fn failed(ctx: &Context, client: &ClientId, detail: &str) {
    let why = Unanswered::TlsHandshake;
    ctx.metrics.unanswered(why);
    if ctx.refusal_log.allow(why.reason()) {
        info!(
            client = client_field(client.addr.ip(), ctx.log_client()).as_deref(),
            reason = why.reason(),
            detail,
            "closed: {why}"
        );
    }
}

/// What a failed handshake says, for its log line: the TLS layer's own words (an alert, a
/// protocol error), which name no peer-controlled bytes.
fn handshake_error(e: &io::Error) -> String {
    e.get_ref().map_or_else(|| e.kind().to_string(), ToString::to_string)
}
