//! rustls configurations for interception: the client-facing server config (one minted leaf,
//! the ALPN the upstream chose) and the upstream client config (verified against the system
//! roots or a configured bundle; one per ALPN offer so sessions resume).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::ca::{CaError, read_pem_certs};

/// The alert behind a failed handshake's error: the one the peer sent, or the one rustls
/// sends for a certificate or message it rejects. `None` for errors without one (I/O, EOF).
pub fn alert(e: &std::io::Error) -> Option<String> {
    let tls = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    let (dir, desc) = match tls {
        rustls::Error::AlertReceived(d) => ("received", *d),
        rustls::Error::InvalidCertificate(c) => ("sent", rustls::AlertDescription::from(c.clone())),
        rustls::Error::InvalidMessage(m) => ("sent", rustls::AlertDescription::from(*m)),
        rustls::Error::NoApplicationProtocol => ("sent", rustls::AlertDescription::NoApplicationProtocol),
        rustls::Error::PeerIncompatible(_) => ("sent", rustls::AlertDescription::HandshakeFailure),
        _ => return None,
    };
    Some(format!("{dir} {}", alert_name(desc)))
}

/// RFC 8446 §6's name for an alert (`bad_certificate`), from rustls's `BadCertificate`.
fn alert_name(desc: rustls::AlertDescription) -> String {
    let camel = format!("{desc:?}");
    let mut out = String::with_capacity(camel.len() + 4);
    let mut prev_lower = false;
    for c in camel.chars() {
        if c.is_ascii_uppercase() && prev_lower {
            out.push('_');
        }
        prev_lower = c.is_ascii_lowercase();
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// Upstream trust: where the roots come from, and client configs per ALPN offer.
pub struct UpstreamTls {
    roots: Arc<RootCertStore>,
    configs: Mutex<HashMap<Vec<Vec<u8>>, Arc<ClientConfig>>>,
}

impl UpstreamTls {
    /// `"system"` loads the platform's bundle (honouring SSL_CERT_FILE/SSL_CERT_DIR); anything
    /// else is a PEM file of roots.
    pub fn load(spec: &str) -> Result<UpstreamTls, CaError> {
        let mut roots = RootCertStore::empty();
        if spec == "system" {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(CaError::Tls(format!(
                    "mitm.upstream_roots = \"system\" found no root certificates ({} errors); install ca-certificates or name a PEM bundle",
                    found.errors.len()
                )));
            }
        } else {
            for cert in read_pem_certs(Path::new(spec))? {
                roots.add(cert).map_err(|e| CaError::Tls(format!("{spec}: {e}")))?;
            }
            if roots.is_empty() {
                return Err(CaError::Tls(format!("{spec}: no certificates")));
            }
        }
        Ok(UpstreamTls { roots: Arc::new(roots), configs: Mutex::new(HashMap::new()) })
    }

    /// The client config offering `alpn` upstream.
    pub fn config(&self, alpn: Vec<Vec<u8>>) -> Arc<ClientConfig> {
        if let Ok(map) = self.configs.lock() {
            if let Some(c) = map.get(&alpn) {
                return Arc::clone(c);
            }
        }
        let mut cfg = ClientConfig::builder().with_root_certificates(Arc::clone(&self.roots)).with_no_client_auth();
        cfg.alpn_protocols = alpn.clone();
        // Shared configs would resume one client's upstream session for another, and a
        // session ticket is an identifier the origin could use to link them.
        cfg.resumption = rustls::client::Resumption::disabled();
        let cfg = Arc::new(cfg);
        if let Ok(mut map) = self.configs.lock() {
            if map.len() < 64 {
                map.insert(alpn, Arc::clone(&cfg));
            }
        }
        cfg
    }
}

/// Serves one leaf, whatever the ClientHello says (the SNI was checked before).
#[derive(Debug)]
struct OneLeaf(Option<Arc<CertifiedKey>>);

impl ResolvesServerCert for OneLeaf {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.clone()
    }
}

/// The client-facing config: `leaf`, and `alpn` (the protocol the upstream chose, if any).
pub fn server_config(leaf: Arc<CertifiedKey>, alpn: Option<Vec<u8>>) -> Arc<ServerConfig> {
    let mut cfg = ServerConfig::builder().with_no_client_auth().with_cert_resolver(Arc::new(OneLeaf(Some(leaf))));
    cfg.alpn_protocols = alpn.into_iter().collect();
    Arc::new(cfg)
}

/// A config with no certificate: finishing a handshake with it makes rustls send the client
/// a `handshake_failure` alert, which is how an interception that must not proceed (SNI
/// mismatch, untrusted upstream) fails closed.
pub fn refusing_config() -> Arc<ServerConfig> {
    Arc::new(ServerConfig::builder().with_no_client_auth().with_cert_resolver(Arc::new(OneLeaf(None))))
}

#[cfg(test)]
mod alert_tests {
    use super::*;

    #[test]
    fn alerts_are_named_as_in_the_rfc_with_their_direction() {
        let e = |tls: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        let got = alert(&e(rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate)));
        assert_eq!(got.as_deref(), Some("received bad_certificate"));
        let got = alert(&e(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)));
        assert_eq!(got.as_deref(), Some("sent unknown_ca"));
        assert_eq!(alert(&std::io::Error::from(std::io::ErrorKind::UnexpectedEof)), None);
    }
}
