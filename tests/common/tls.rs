//! A test CA and TLS origins, made fresh by each test.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A CA and one leaf for `localhost` and 127.0.0.1.
pub struct TestPki {
    pub ca_pem: String,
    pub ca_der: CertificateDer<'static>,
    pub leaf_chain: Vec<CertificateDer<'static>>,
    pub leaf_key: PrivatePkcs8KeyDer<'static>,
    /// The leaf and its key as PEM, for a listener configured by file.
    pub leaf_pem: String,
    pub leaf_key_pem: String,
    /// The CA, to sign client certificates.
    issuer: Issuer<'static, KeyPair>,
}

impl TestPki {
    pub fn new() -> TestPki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.distinguished_name.push(DnType::CommonName, "veilgate test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf_params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
        TestPki {
            issuer,
            leaf_pem: leaf.pem(),
            leaf_key_pem: leaf_key.serialize_pem(),
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().clone(),
            leaf_chain: vec![leaf.der().clone()],
            leaf_key: PrivatePkcs8KeyDer::from(leaf_key.serialize_der()),
        }
    }

    /// Writes the leaf's chain and key (mode 0600) into `dir` as `proxy.pem` and `proxy.key`,
    /// replacing what is there; their paths.
    pub fn write_pair(&self, dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let (cert, key) = (dir.join("proxy.pem"), dir.join("proxy.key"));
        std::fs::write(&cert, &self.leaf_pem).unwrap();
        let _ = std::fs::remove_file(&key);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&key).unwrap();
        f.write_all(self.leaf_key_pem.as_bytes()).unwrap();
        (cert, key)
    }

    /// A veilgate config with a TLS listener serving this leaf (written into `dir`), the
    /// loopback policy for `origin_port`, and `extra` appended.
    pub fn listener_config(&self, dir: &std::path::Path, origin_port: u16, extra: &str) -> String {
        let (cert, key) = self.write_pair(dir);
        format!(
            "[server]\ntls_listen = [\"127.0.0.1:0\"]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n{}\n{extra}",
            cert.display(),
            key.display(),
            super::loopback_policy(&[origin_port])
        )
    }

    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        Self::http1_server(self.leaf_chain.clone(), PrivateKeyDer::Pkcs8(self.leaf_key.clone_key()))
    }

    /// A server configuration (ALPN http/1.1) with a fresh leaf, signed by this CA, for
    /// `names`: for an origin a browser must reach by a name that is not loopback (a browser
    /// never sends loopback names to a proxy configured by PAC).
    pub fn server_config_for(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let leaf = params.signed_by(&key, &self.issuer).unwrap();
        Self::http1_server(
            vec![leaf.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }

    fn http1_server(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Arc<rustls::ServerConfig> {
        let mut cfg = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(chain, key).unwrap();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(cfg)
    }

    /// A client configuration that trusts this CA and presents a client certificate, signed
    /// by it, whose subject CN is `cn`.
    pub fn client_config_as(&self, cn: &str) -> Arc<rustls::ClientConfig> {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_client_auth_cert(
                    vec![cert.der().clone()],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
                )
                .unwrap(),
        )
    }

    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        Arc::new(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())
    }
}

/// An HTTPS origin on 127.0.0.1 answering every request with `body`.
pub struct TlsOrigin {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl TlsOrigin {
    pub async fn start(pki: &TestPki, body: &'static str) -> TlsOrigin {
        TlsOrigin::start_with(pki.server_config(), body).await
    }

    /// The same origin with its own server configuration (another leaf).
    pub async fn start_with(config: Arc<rustls::ServerConfig>, body: &'static str) -> TlsOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(s).await else { return };
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let reply =
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                    let _ = tls.write_all(reply.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        TlsOrigin { addr, task }
    }
}

impl Drop for TlsOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTPS origin on 127.0.0.1 that answers every request head on a connection (keep-alive)
/// with a 200, `hello` and an HSTS header, records every byte it got, and answers a clean
/// close with close_notify.
pub struct RecordingOrigin {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<u8>>>,
    task: JoinHandle<()>,
}

impl RecordingOrigin {
    pub async fn start(pki: &TestPki) -> RecordingOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config());
        let received = Arc::new(Mutex::new(Vec::new()));
        let rec = Arc::clone(&received);
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let (acceptor, rec) = (acceptor.clone(), Arc::clone(&rec));
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(s).await else { return };
                    let mut pending = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        let n = match tls.read(&mut buf).await {
                            Ok(0) => {
                                // A clean close: close_notify back, as a well-behaved origin does.
                                let _ = tls.shutdown().await;
                                return;
                            }
                            Err(_) => return,
                            Ok(n) => n,
                        };
                        rec.lock().unwrap().extend_from_slice(&buf[..n]);
                        pending.extend_from_slice(&buf[..n]);
                        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            pending.drain(..end + 4);
                            let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nStrict-Transport-Security: max-age=60\r\n\r\nhello";
                            if tls.write_all(reply).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        RecordingOrigin { addr, received, task }
    }
}

impl Drop for RecordingOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}
