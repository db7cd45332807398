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
