//! The test origin's PKI: a private CA and a leaf for `localhost`, `127.0.0.1` and `::1`,
//! made once in a directory and reused after; and the client side's trust and names.

use crate::common::err;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sha2::{Digest, Sha256};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

pub const CA_PEM: &str = "origin-ca.pem";
pub const CA_KEY: &str = "origin-ca.key";
pub const LEAF_PEM: &str = "origin-leaf.pem";
pub const LEAF_KEY: &str = "origin-leaf.key";

/// The origin's certificate chain and key: loaded from `dir` when all three files exist,
/// otherwise freshly made (and written, keys with mode 0600).
pub fn origin_identity(dir: &Path) -> io::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>, bool)> {
    std::fs::create_dir_all(dir)?;
    let (ca, leaf, key) = (dir.join(CA_PEM), dir.join(LEAF_PEM), dir.join(LEAF_KEY));
    let made = !(ca.exists() && leaf.exists() && key.exists());
    if made {
        generate(dir)?;
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&leaf)
        .map_err(|e| err(format!("{}: {e}", leaf.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("{}: {e}", leaf.display())))?;
    if chain.is_empty() {
        return Err(err(format!("{}: no certificate", leaf.display())));
    }
    let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| err(format!("{}: {e}", key.display())))?;
    Ok((chain, key, made))
}

fn generate(dir: &Path) -> io::Result<()> {
    let rc = |e: rcgen::Error| err(format!("certificate generation: {e}"));
    let ca_key = KeyPair::generate().map_err(rc)?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name.push(DnType::CommonName, "vgbench test origin CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key).map_err(rc)?;

    let leaf_key = KeyPair::generate().map_err(rc)?;
    let mut leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()])
        .map_err(rc)?;
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name.push(DnType::CommonName, "localhost");
    leaf.is_ca = IsCa::NoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let issuer = Issuer::new(ca, &ca_key);
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).map_err(rc)?;

    write_file(&dir.join(CA_KEY), ca_key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&dir.join(LEAF_KEY), leaf_key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&dir.join(LEAF_PEM), leaf_cert.pem().as_bytes(), 0o644)?;
    // The CA last: its presence means the set is complete.
    write_file(&dir.join(CA_PEM), ca_cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(path)?;
    f.write_all(data)
}

/// Roots from one PEM file: the only certificates a `tls-*` client trusts.
pub fn roots(ca_file: &Path) -> io::Result<rustls::RootCertStore> {
    let mut store = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_file).map_err(|e| err(format!("{}: {e}", ca_file.display())))? {
        let c = c.map_err(|e| err(format!("{}: {e}", ca_file.display())))?;
        store.add(c).map_err(|e| err(format!("{}: {e}", ca_file.display())))?;
    }
    if store.is_empty() {
        return Err(err(format!("{}: no certificate", ca_file.display())));
    }
    Ok(store)
}

/// A client config trusting only `ca_file`, offering ALPN `http/1.1`. Resumption is off unless
/// asked for, so every handshake is a full one. `suites` (names as rustls prints them, e.g.
/// `TLS13_AES_128_GCM_SHA256`) replaces the offered cipher suites and their order; only the
/// protocol versions those suites belong to are offered.
pub fn client_config(ca_file: &Path, resume: bool, suites: &[String]) -> io::Result<Arc<rustls::ClientConfig>> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if !suites.is_empty() {
        let all = provider.cipher_suites.clone();
        provider.cipher_suites = suites
            .iter()
            .map(|name| {
                all.iter().find(|s| s.suite().as_str() == Some(name.as_str())).copied().ok_or_else(|| {
                    let known: Vec<&str> = all.iter().filter_map(|s| s.suite().as_str()).collect();
                    err(format!("unknown cipher suite {name}; known: {}", known.join(", ")))
                })
            })
            .collect::<io::Result<_>>()?;
    }
    let mut versions: Vec<&'static rustls::SupportedProtocolVersion> = Vec::new();
    if provider.cipher_suites.iter().any(|s| s.tls13().is_some()) {
        versions.push(&rustls::version::TLS13);
    }
    if provider.cipher_suites.iter().any(|s| s.tls13().is_none()) {
        versions.push(&rustls::version::TLS12);
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&versions)
        .map_err(|e| err(format!("client TLS config: {e}")))?
        .with_root_certificates(roots(ca_file)?)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    if !resume {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    Ok(Arc::new(cfg))
}

/// The name a client verifies: an IP address for IP literals (no SNI is sent then), else a DNS name.
pub fn server_name(host: &str) -> io::Result<ServerName<'static>> {
    match host.parse::<IpAddr>() {
        Ok(ip) => Ok(ServerName::IpAddress(ip.into())),
        Err(_) => ServerName::try_from(host.to_string()).map_err(|e| err(format!("{host}: {e}"))),
    }
}

/// SHA-256 of a DER certificate as colon-separated upper-case hex (the usual fingerprint form).
pub fn cert_sha256(der: &[u8]) -> String {
    Sha256::digest(der).iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// (subject, issuer) of a DER certificate, as RFC 4514-like strings.
pub fn cert_names(der: &[u8]) -> (String, String) {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, c)) => (c.subject().to_string(), c.issuer().to_string()),
        Err(e) => (format!("unparsable: {e}"), String::new()),
    }
}
