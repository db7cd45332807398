//! The interception CA: created by `veilgate ca init`, loaded at start, and used to mint one
//! short-lived leaf per destination host, cached.
//!
//! Choices, each against a known failure of other MITM proxies: the leaf key is never the
//! CA's key (mitmproxy and hudsucker reuse it); serials are random (g3#157: a reused
//! issuer+serial breaks Firefox); an IP-literal target gets an IP SAN, not a DNS one
//! (hudsucker always writes DNS); leaves live 30 days, backdated an hour for clock skew, and
//! are reused for less than that.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;

/// Leaf validity.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);
/// Leaves start this long before they are minted, so a client whose clock is behind accepts them.
pub const BACKDATE: Duration = Duration::from_secs(3600);

/// Why the CA cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The key file may be read by group or others.
    #[error("{path}: the CA key is readable by group or others (mode {mode:o}); chmod 600 it")]
    KeyExposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A certificate or key could not be parsed or made.
    #[error("{what}: {source}")]
    Cert {
        /// What was being done.
        what: String,
        /// rcgen's reason.
        source: rcgen::Error,
    },
    /// rustls rejected a key.
    #[error("{0}")]
    Tls(String),
}

/// A loaded CA with its leaf cache.
pub struct CertAuthority {
    issuer: Issuer<'static, KeyPair>,
    provider: Arc<CryptoProvider>,
    cache: Mutex<LeafCache>,
}

struct LeafCache {
    capacity: usize,
    ttl: Duration,
    entries: HashMap<String, (Instant, Arc<CertifiedKey>)>,
}

/// A leaf and whether it was minted just now (for the metrics).
pub struct Leaf {
    /// Chain and key for rustls.
    pub key: Arc<CertifiedKey>,
    /// False when it came from the cache.
    pub minted: bool,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io { path: path.to_path_buf(), source }
}

fn cert_err(what: &str) -> impl FnOnce(rcgen::Error) -> CaError + '_ {
    move |source| CaError::Cert { what: what.to_string(), source }
}

impl CertAuthority {
    /// Loads the CA, refusing a key file others can read.
    pub fn load(cert: &Path, key: &Path, cache_capacity: usize, cache_ttl: Duration) -> Result<CertAuthority, CaError> {
        let key_pem = read_private(key)?;
        let cert_pem = std::fs::read_to_string(cert).map_err(io_err(cert))?;
        let key_pair = KeyPair::from_pem(&key_pem).map_err(cert_err("reading the CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key_pair).map_err(cert_err("reading the CA certificate"))?;
        let provider = CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
        Ok(CertAuthority {
            issuer,
            provider,
            cache: Mutex::new(LeafCache { capacity: cache_capacity, ttl: cache_ttl, entries: HashMap::new() }),
        })
    }

    /// The leaf for `host` (a normalised name or an IP literal's text), from the cache or new.
    pub fn leaf_for(&self, host: &str) -> Result<Leaf, CaError> {
        let now = Instant::now();
        if let Ok(cache) = self.cache.lock() {
            if let Some((at, key)) = cache.entries.get(host) {
                if now.duration_since(*at) < cache.ttl {
                    return Ok(Leaf { key: Arc::clone(key), minted: false });
                }
            }
        }
        let key = Arc::new(self.mint(host)?);
        if let Ok(mut cache) = self.cache.lock() {
            if cache.entries.len() >= cache.capacity {
                // Expired entries first; if none, the oldest goes.
                let ttl = cache.ttl;
                cache.entries.retain(|_, (at, _)| now.duration_since(*at) < ttl);
                if cache.entries.len() >= cache.capacity {
                    if let Some(oldest) = cache.entries.iter().min_by_key(|(_, (at, _))| *at).map(|(k, _)| k.clone()) {
                        cache.entries.remove(&oldest);
                    }
                }
            }
            cache.entries.insert(host.to_string(), (now, Arc::clone(&key)));
        }
        Ok(Leaf { key, minted: true })
    }

    /// Mints one throwaway leaf (not cached), so first-use costs are paid at load time.
    pub fn warm_up(&self) -> Result<(), CaError> {
        self.mint("warm-up.invalid").map(drop)
    }

    fn mint(&self, host: &str) -> Result<CertifiedKey, CaError> {
        let leaf_key = KeyPair::generate().map_err(cert_err("generating a leaf key"))?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.try_into().map_err(cert_err("leaf name"))?),
        }];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        let start = OffsetDateTime::now_utc() - BACKDATE;
        params.not_before = start;
        params.not_after = start + LEAF_VALIDITY;
        params.serial_number = Some(SerialNumber::from_slice(&self.random_serial()?));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&leaf_key, &self.issuer).map_err(cert_err("signing a leaf"))?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let signing = self
            .provider
            .key_provider
            .load_private_key(der)
            .map_err(|_| CaError::Tls("the system random source failed".into()))?;
        Ok(CertifiedKey::new(vec![cert.der().clone()], signing))
    }

    fn random_serial(&self) -> Result<[u8; 16], CaError> {
        let mut serial = [0u8; 16];
        self.provider
            .secure_random
            .fill(&mut serial)
            .map_err(|_| CaError::Tls("the system random source failed".into()))?;
        serial[0] &= 0x7f; // positive
        serial[0] |= 0x01; // and 16 bytes long
        Ok(serial)
    }
}

/// Reads the key through one open file, refusing it when group or others may read it or
/// when another user owns it (checked on the open file, so it cannot change in between).
pub(crate) fn read_private(key: &Path) -> Result<String, CaError> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let mut file = std::fs::File::open(key).map_err(io_err(key))?;
    let meta = file.metadata().map_err(io_err(key))?;
    let mode = meta.mode();
    if mode & 0o077 != 0 {
        return Err(CaError::KeyExposed { path: key.to_path_buf(), mode: mode & 0o777 });
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(CaError::Tls(format!(
            "{}: owned by uid {}, not by this process (uid {me})",
            key.display(),
            meta.uid()
        )));
    }
    let mut pem = String::new();
    file.read_to_string(&mut pem).map_err(io_err(key))?;
    Ok(pem)
}

/// `veilgate ca init --dir DIR`: a new ECDSA P-256 CA, `veilgate-ca.pem` and
/// `veilgate-ca.key` (mode 0600, created so, never widened). Refuses to overwrite.
pub fn init(dir: &Path) -> Result<(PathBuf, PathBuf), CaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let cert_path = dir.join("veilgate-ca.pem");
    let key_path = dir.join("veilgate-ca.key");
    let key = KeyPair::generate().map_err(cert_err("generating the CA key"))?;
    let mut params = CertificateParams::default();
    let mut suffix = [0u8; 4];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut suffix)
        .map_err(|_| CaError::Tls("the system random source failed".into()))?;
    let suffix: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("veilgate interception CA {suffix}"));
    dn.push(DnType::OrganizationName, "veilgate");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::from_secs(5 * 365 * 24 * 3600);
    let cert = params.self_signed(&key).map_err(cert_err("self-signing the CA"))?;
    let mut key_file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(io_err(&key_path))?;
    key_file.write_all(key.serialize_pem().as_bytes()).map_err(io_err(&key_path))?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&cert_path)
        .and_then(|mut f| f.write_all(cert.pem().as_bytes()))
        .map_err(io_err(&cert_path))?;
    Ok((cert_path, key_path))
}

/// The CA certificate's DER, for tests and the probe.
pub fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_file_iter(path)
        .map_err(|e| CaError::Tls(format!("{}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::Tls(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_a_private_key_and_leaves_are_cached() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = init(dir.path()).unwrap();
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(init(dir.path()).is_err(), "never overwrites a CA");
        let ca = CertAuthority::load(&cert, &key, 2, Duration::from_secs(60)).unwrap();
        let a = ca.leaf_for("a.example").unwrap();
        assert!(a.minted);
        assert!(!ca.leaf_for("a.example").unwrap().minted);
        let _ = ca.leaf_for("b.example").unwrap();
        let _ = ca.leaf_for("c.example").unwrap();
        assert!(ca.leaf_for("a.example").unwrap().minted, "bounded: the oldest was evicted");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            CertAuthority::load(&cert, &key, 2, Duration::from_secs(60)),
            Err(CaError::KeyExposed { .. })
        ));
    }
}
