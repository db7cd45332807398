//! Name resolution at the proxy. Special-use names are answered here without a query
//! (RFC 6761): `localhost` and `*.localhost` are loopback, `*.invalid` never exists. Static
//! `[dns] hosts` come next, then hickory-resolver with its cache, created on first use so a
//! proxy that only ever sees literals and static names never reads resolv.conf or sends a
//! query.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use tokio::sync::OnceCell;

use super::{Cause, DialError, DialErrorKind, Hop};
use crate::config::DnsConfig;

/// Name resolution as configured in `[dns]`.
pub struct Resolver {
    hosts: HashMap<String, Vec<IpAddr>>,
    servers: Vec<SocketAddr>,
    timeout: Duration,
    cache_size: u64,
    hickory: OnceCell<Result<TokioResolver, String>>,
}

/// A lookup's result with the time it took (for the DNS histogram), when a query was made.
pub struct Resolved {
    /// Addresses in the order the resolver gave them.
    pub addrs: Vec<IpAddr>,
    /// Time spent asking a resolver; `None` when answered locally.
    pub lookup_time: Option<Duration>,
}

impl Resolver {
    /// A resolver for `[dns]`.
    pub fn new(dns: &DnsConfig) -> Resolver {
        Resolver {
            hosts: dns.hosts.iter().map(|(k, v)| (k.trim_end_matches('.').to_ascii_lowercase(), v.to_vec())).collect(),
            servers: dns.servers.clone(),
            timeout: dns.timeout.0,
            cache_size: dns.cache_size,
            hickory: OnceCell::new(),
        }
    }

    /// Resolves a normalised host name.
    pub async fn resolve(&self, name: &str) -> Result<Resolved, DialError> {
        if name == "localhost" || name.ends_with(".localhost") {
            let addrs = vec![IpAddr::V6(Ipv6Addr::LOCALHOST), IpAddr::V4(Ipv4Addr::LOCALHOST)];
            return Ok(Resolved { addrs, lookup_time: None });
        }
        if name == "invalid" || name.ends_with(".invalid") {
            return Err(DialError::no_name());
        }
        if let Some(addrs) = self.hosts.get(name) {
            return Ok(Resolved { addrs: addrs.clone(), lookup_time: None });
        }
        let resolver = self.hickory.get_or_init(|| async { self.build_hickory() }).await.as_ref().map_err(|e| {
            tracing::error!(error = %e, "no DNS resolver available");
            DialError { cause: Cause::NoResolver, ..DialError::no_name() }
        })?;
        let started = Instant::now();
        let lookup = tokio::time::timeout(self.timeout, resolver.lookup_ip(format!("{name}.")))
            .await
            .map_err(|_| DialError { hop: Hop::Resolve, kind: DialErrorKind::Timeout, cause: Cause::DnsTimeout })?
            .map_err(|e| {
                // A string field, so text logs quote it: a resolver's answer can carry names.
                tracing::debug!(error = e.to_string(), "lookup failed");
                DialError { cause: dns_cause(&e), ..DialError::no_name() }
            })?;
        let addrs: Vec<IpAddr> = lookup.iter().collect();
        if addrs.is_empty() {
            return Err(DialError { cause: Cause::NoRecords, ..DialError::no_name() });
        }
        Ok(Resolved { addrs, lookup_time: Some(started.elapsed()) })
    }

    fn build_hickory(&self) -> Result<TokioResolver, String> {
        let mut builder = if self.servers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| format!("cannot read the system resolver configuration: {e}"))?
        } else {
            let servers = self
                .servers
                .iter()
                .map(|s| {
                    let mut ns = NameServerConfig::udp_and_tcp(s.ip());
                    for c in &mut ns.connections {
                        c.port = s.port();
                    }
                    ns
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts = builder.options_mut();
        opts.timeout = self.timeout;
        opts.cache_size = self.cache_size;
        builder.build().map_err(|e| format!("cannot build the DNS resolver: {e}"))
    }
}

/// The class of a resolver's failure: NXDOMAIN, an empty answer, an error code (SERVFAIL,
/// REFUSED), or no answer in time.
fn dns_cause(e: &NetError) -> Cause {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(nr)) if nr.response_code == ResponseCode::NXDomain => Cause::NxDomain,
        NetError::Dns(DnsError::NoRecordsFound(_)) => Cause::NoRecords,
        NetError::Dns(DnsError::ResponseCode(code)) => Cause::DnsCode(*code),
        NetError::Timeout => Cause::DnsTimeout,
        NetError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => Cause::DnsTimeout,
        _ => Cause::DnsOther,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn special_use_names_are_answered_locally() {
        let r = Resolver::new(&DnsConfig::default());
        assert!(r.resolve("localhost").await.unwrap().addrs.iter().all(IpAddr::is_loopback));
        assert!(r.resolve("a.b.localhost").await.unwrap().lookup_time.is_none());
        assert_eq!(r.resolve("nothing.invalid").await.err(), Some(DialError::no_name()));
        assert!(r.hickory.get().is_none(), "no resolver was built");
    }
}
