//! `veilgate probe`: the interception control test as a command. It handshakes with an
//! origin directly and through a proxy, and compares what each path presents: the same leaf
//! means a blind tunnel; a different one means the proxy intercepts, and whether the client's
//! roots trust it says whether a browser would notice.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use base64::Engine as _;

use crate::config::DnsConfig;
use crate::dial::{Resolver, Source, connect_one};
use crate::mitm::ca::read_pem_certs;
use crate::target::{Host, Target};

/// Deadline for each network step.
const STEP: Duration = Duration::from_secs(10);

/// What one path presented.
#[derive(Debug, Clone)]
pub struct Seen {
    /// SHA-256 of the leaf certificate, hex.
    pub fingerprint: String,
    /// The leaf's issuer.
    pub issuer: String,
    /// `Ok` when the chain verified against the roots, else why not.
    pub verified: Result<(), String>,
}

/// The probe's findings.
#[derive(Debug, Clone)]
pub struct Report {
    /// Direct to the origin.
    pub direct: Seen,
    /// Through the proxy.
    pub proxied: Seen,
    /// The origin's Strict-Transport-Security header, if any.
    pub hsts: Option<String>,
}

/// The verdict and its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Same leaf both ways (exit 0).
    BlindTunnel,
    /// Different leaf, and the roots trust it (exit 3).
    InterceptedTrusted,
    /// Different leaf, and the roots reject it (exit 3).
    InterceptedRejected,
}

impl Verdict {
    /// Process exit code.
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::BlindTunnel => 0,
            _ => 3,
        }
    }
    /// Text.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::BlindTunnel => "blind tunnel: the proxy relays the origin's own certificate",
            Verdict::InterceptedTrusted => {
                "intercepted and trusted: the proxy presents its own certificate and these roots accept it"
            }
            Verdict::InterceptedRejected => {
                "intercepted and rejected: the proxy presents its own certificate and these roots refuse it"
            }
        }
    }
}

impl Report {
    /// Compares the two paths.
    pub fn verdict(&self) -> Verdict {
        if self.direct.fingerprint == self.proxied.fingerprint {
            Verdict::BlindTunnel
        } else if self.proxied.verified.is_ok() {
            Verdict::InterceptedTrusted
        } else {
            Verdict::InterceptedRejected
        }
    }

    /// The human report.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, s) in [("direct ", &self.direct), ("proxied", &self.proxied)] {
            let v = match &s.verified {
                Ok(()) => "verified".to_string(),
                Err(e) => format!("NOT verified ({e})"),
            };
            let _ = writeln!(out, "{name}: leaf sha256 {}\n         issuer {}\n         {v}", s.fingerprint, s.issuer);
        }
        let _ = writeln!(
            out,
            "hsts:    {}",
            self.hsts.as_deref().unwrap_or("none (the origin sends no Strict-Transport-Security)")
        );
        let _ = writeln!(out, "verdict: {}", self.verdict().as_str());
        out
    }
}

/// Why the probe could not finish.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ProbeError(String);

fn fail(msg: impl Into<String>) -> ProbeError {
    ProbeError(msg.into())
}

/// Deadline for the whole probe.
const TOTAL: Duration = Duration::from_secs(60);

/// What a real deployment adds to the bare probe.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `user:password` for the proxy (`--proxy-user`), sent as Basic `Proxy-Authorization`;
    /// the proxy URL's own userinfo is the other way to give them.
    pub proxy_user: Option<String>,
    /// The configuration's `[dns]` (`-c`): the direct path then resolves the origin as the
    /// proxy does (static `hosts` first), so both paths reach the same machine.
    pub dns: Option<DnsConfig>,
    /// Roots the proxy's own certificate must chain to, for an `https://` proxy URL
    /// (`--proxy-ca-file`); without, the system's roots.
    pub proxy_ca: Option<PathBuf>,
}

/// Runs the probe. `proxy` is `http://HOST:PORT`; `origin` is `https://HOST[:PORT][/...]`.
pub async fn probe(proxy: &str, origin: &str, ca_file: Option<&PathBuf>) -> Result<Report, ProbeError> {
    probe_with(proxy, origin, ca_file, &Options::default()).await
}

/// [`probe`] with credentials and the configuration's name resolution.
pub async fn probe_with(
    proxy: &str,
    origin: &str,
    ca_file: Option<&PathBuf>,
    opts: &Options,
) -> Result<Report, ProbeError> {
    tokio::time::timeout(TOTAL, run(proxy, origin, ca_file, opts))
        .await
        .map_err(|_| fail("the probe took longer than 60 s"))?
}

/// A proxy URL taken apart: where to connect, and the credentials it carries.
#[derive(Debug, PartialEq, Eq)]
pub struct ProxyUrl {
    /// `HOST:PORT`.
    pub addr: String,
    /// `user:password`, percent-decoded, from the URL's userinfo.
    pub credentials: Option<String>,
    /// `https://`: TLS to the proxy (veilgate's `server.tls_listen`), CONNECT inside it.
    pub tls: bool,
}

impl ProxyUrl {
    /// Parses `http[s]://[user[:password]@]HOST:PORT[/]`. Userinfo is percent-decoded (a `@`
    /// or `:` in a password is written `%40`, `%3A`).
    pub fn parse(url: &str) -> Result<ProxyUrl, ProbeError> {
        let (tls, rest) = match url.strip_prefix("https://") {
            Some(rest) => (true, rest),
            None => (false, url.strip_prefix("http://").unwrap_or(url)),
        };
        let rest = rest.trim_end_matches('/');
        let (userinfo, addr) = match rest.rsplit_once('@') {
            Some((u, a)) => (Some(u), a),
            None => (None, rest),
        };
        if addr.is_empty() || addr.contains('/') {
            return Err(fail(format!("the proxy must be http[s]://[user:password@]HOST:PORT, not {url:?}")));
        }
        let credentials = match userinfo {
            None => None,
            Some(u) => {
                let (user, pass) = u.split_once(':').unwrap_or((u, ""));
                Some(format!("{}:{}", percent_decode(user)?, percent_decode(pass)?))
            }
        };
        Ok(ProxyUrl { addr: addr.to_string(), credentials, tls })
    }
}

fn percent_decode(s: &str) -> Result<String, ProbeError> {
    let bad = || fail("the proxy URL's userinfo has a malformed %-escape");
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next().ok_or_else(bad)?, bytes.next().ok_or_else(bad)?];
            let hex = std::str::from_utf8(&hex).map_err(|_| bad())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).map_err(|_| fail("the proxy URL's userinfo is not UTF-8"))
}

async fn run(proxy: &str, origin: &str, ca_file: Option<&PathBuf>, opts: &Options) -> Result<Report, ProbeError> {
    let proxy = ProxyUrl::parse(proxy)?;
    let credentials = match (&opts.proxy_user, &proxy.credentials) {
        (Some(_), Some(_)) => return Err(fail("credentials given twice: in the proxy URL and with --proxy-user")),
        (Some(c), None) | (None, Some(c)) => Some(c.as_str()),
        (None, None) => None,
    };
    let rest = origin.strip_prefix("https://").ok_or_else(|| fail("the origin must be an https:// URL"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let has_port = if authority.starts_with('[') { authority.contains("]:") } else { authority.contains(':') };
    let authority = if has_port { authority.to_string() } else { format!("{authority}:443") };
    let target = Target::parse(&authority).map_err(|e| fail(format!("origin {authority}: {e}")))?;
    let roots = Arc::new(load_roots(ca_file)?);
    let name = match &target.host {
        Host::Ip(ip) => ServerName::IpAddress((*ip).into()),
        Host::Name(n) => ServerName::try_from(n.clone()).map_err(|e| fail(format!("{n}: {e}")))?,
    };
    let host = target.host_str();

    let direct_tcp = connect_direct(&target, opts.dns.as_ref()).await?;
    let (seen_direct, mut tls) = handshake(direct_tcp, name.clone(), &roots).await?;
    let hsts = fetch_hsts(&mut tls, &host).await;

    let tcp = timed(TcpStream::connect(proxy.addr.as_str()), "connecting to the proxy").await?;
    let mut tcp: Box<dyn Io> = if proxy.tls { Box::new(to_proxy(tcp, &proxy, opts).await?) } else { Box::new(tcp) };
    let auth = credentials
        .map(|c| format!("Proxy-Authorization: Basic {}\r\n", base64::engine::general_purpose::STANDARD.encode(c)))
        .unwrap_or_default();
    let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n");
    timed(tcp.write_all(req.as_bytes()), "sending CONNECT").await?;
    let head = read_head(&mut tcp).await?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        let status = head.lines().next().unwrap_or("");
        let hint = match (status.split(' ').nth(1), credentials) {
            (Some("407"), None) => {
                " (the proxy wants credentials: --proxy-user USER:PASS or http://USER:PASS@HOST:PORT)"
            }
            (Some("407"), Some(_)) => " (the proxy did not accept these credentials)",
            _ => "",
        };
        return Err(fail(format!("the proxy refused CONNECT: {status}{hint}")));
    }
    let (seen_proxied, _) = handshake(tcp, name, &roots).await?;
    Ok(Report { direct: seen_direct, proxied: seen_proxied, hsts })
}

/// Any stream the probe speaks through: TCP to the proxy, or TLS to it.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// TLS to an `https://` proxy, verified against `--proxy-ca-file` or the system's roots.
async fn to_proxy(
    tcp: TcpStream,
    proxy: &ProxyUrl,
    opts: &Options,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ProbeError> {
    let roots = Arc::new(load_roots(opts.proxy_ca.as_ref())?);
    let host = proxy.addr.rsplit_once(':').map_or(proxy.addr.as_str(), |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = match host.parse::<std::net::IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(host.to_string()).map_err(|e| fail(format!("proxy {host}: {e}")))?,
    };
    let mut cfg = ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    timed(TlsConnector::from(Arc::new(cfg)).connect(name, tcp), "TLS handshake with the proxy").await
}

/// The direct path: with `[dns]`, resolved as the proxy resolves (special-use names, static
/// hosts, the configured servers) and each address tried in turn; without, the system's
/// resolver.
async fn connect_direct(target: &Target, dns: Option<&DnsConfig>) -> Result<TcpStream, ProbeError> {
    let (Some(dns), Host::Name(name)) = (dns, &target.host) else {
        return timed(TcpStream::connect((target.host_str().as_str(), target.port)), "connecting to the origin").await;
    };
    let resolved = Resolver::new(dns)
        .resolve(name)
        .await
        .map_err(|e| fail(format!("resolving {name} with the configuration's [dns]: {}", e.cause)))?;
    let mut last = fail(format!("{name} has no address"));
    for ip in resolved.addrs {
        match timed(connect_one(SocketAddr::new(ip, target.port), Source::Kernel), "connecting to the origin").await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn timed<T, E: std::fmt::Display>(f: impl Future<Output = Result<T, E>>, what: &str) -> Result<T, ProbeError> {
    tokio::time::timeout(STEP, f)
        .await
        .map_err(|_| fail(format!("{what}: timed out")))?
        .map_err(|e| fail(format!("{what}: {e}")))
}

fn load_roots(ca_file: Option<&PathBuf>) -> Result<RootCertStore, ProbeError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for c in read_pem_certs(path).map_err(|e| fail(e.to_string()))? {
                roots.add(c).map_err(|e| fail(format!("{}: {e}", path.display())))?;
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
    }
    if roots.is_empty() {
        return Err(fail("no root certificates to verify against (pass --ca-file)"));
    }
    Ok(roots)
}

async fn handshake<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    tcp: S,
    name: ServerName<'static>,
    roots: &Arc<RootCertStore>,
) -> Result<(Seen, tokio_rustls::client::TlsStream<S>), ProbeError> {
    let inner = WebPkiServerVerifier::builder(Arc::clone(roots)).build().map_err(|e| fail(e.to_string()))?;
    let recorder = Arc::new(Recorder { inner, seen: Mutex::new(None) });
    let mut cfg =
        ClientConfig::builder().dangerous().with_custom_certificate_verifier(recorder.clone()).with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = timed(TlsConnector::from(Arc::new(cfg)).connect(name, tcp), "TLS handshake").await?;
    let seen = recorder.seen.lock().ok().and_then(|s| s.clone()).ok_or_else(|| fail("no certificate was presented"))?;
    Ok((seen, tls))
}

async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Result<String, ProbeError> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
        let n = timed(s.read(&mut b), "reading a reply").await?;
        if n == 0 {
            break;
        }
        head.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&head).to_string())
}

async fn fetch_hsts(tls: &mut tokio_rustls::client::TlsStream<TcpStream>, host: &str) -> Option<String> {
    let req = format!("HEAD / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: veilgate-probe\r\n\r\n");
    tls.write_all(req.as_bytes()).await.ok()?;
    let head = read_head(tls).await.ok()?;
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case("strict-transport-security").then(|| v.trim().to_string())
    })
}

/// Accepts every chain so the probe can look at it, and records whether real verification
/// would have passed. Only the probe uses it; it carries no secrets.
#[derive(Debug)]
struct Recorder {
    inner: Arc<WebPkiServerVerifier>,
    seen: Mutex<Option<Seen>>,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            .map(|_| ())
            .map_err(|e| e.to_string());
        let fingerprint = Sha256::digest(end_entity.as_ref()).iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        });
        let issuer = x509_parser::parse_x509_certificate(end_entity.as_ref())
            .map(|(_, c)| c.issuer().to_string())
            .unwrap_or_else(|_| "(unparseable certificate)".into());
        if let Ok(mut s) = self.seen.lock() {
            *s = Some(Seen { fingerprint, issuer, verified });
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_carry_percent_decoded_credentials() {
        let u = ProxyUrl::parse("http://alice:p%40ss%3Aword@127.0.0.1:8080/").unwrap();
        assert_eq!(
            u,
            ProxyUrl { addr: "127.0.0.1:8080".into(), credentials: Some("alice:p@ss:word".into()), tls: false }
        );
        assert_eq!(ProxyUrl::parse("127.0.0.1:8080").unwrap().credentials, None);
        assert_eq!(ProxyUrl::parse("http://bob@[::1]:3128").unwrap().credentials.as_deref(), Some("bob:"));
        assert!(ProxyUrl::parse("http://a:%4@h:1").is_err());
        let t = ProxyUrl::parse("https://carol:x@localhost:8443").unwrap();
        assert_eq!((t.addr.as_str(), t.credentials.as_deref(), t.tls), ("localhost:8443", Some("carol:x"), true));
        assert!(ProxyUrl::parse("http://h:1/path").is_err());
    }
}
