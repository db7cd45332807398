//! `server.proxy_protocol` and `server.proxy_protocol_from`: the keys, and their rules.
//!
//! Kept apart from the rest of `[server]` so the rules stay one function, called by
//! [`Config::validate`](super::Config::validate) with one line.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::ServerConfig;

/// Whether connections on the proxy listeners start with a PROXY protocol header.
///
/// There is no "optional": the specification forbids guessing whether a header is there,
/// because a client that may send one may claim any address (proxy-protocol.txt §2).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// Clients connect directly; the TCP peer is the client.
    #[default]
    Off,
    /// Every connection comes from a balancer in `proxy_protocol_from` and starts with a v1
    /// or v2 header, whose source address is the client.
    Required,
}

/// The rules of the two keys: the dotted key at fault and the problem, or nothing.
pub fn validate_proxy_protocol(s: &ServerConfig) -> Result<(), (&'static str, String)> {
    match s.proxy_protocol {
        ProxyProtocol::Required if s.proxy_protocol_from.is_empty() => Err((
            "server.proxy_protocol_from",
            "proxy_protocol = \"required\" needs the balancers' CIDRs, e.g. [\"10.0.0.0/8\"]; \
             with none, every connection would be closed"
                .into(),
        )),
        // Set without effect, every client would look like the balancer and share its
        // budget: more likely a forgotten `required` than an intent.
        ProxyProtocol::Off if !s.proxy_protocol_from.is_empty() => Err((
            "server.proxy_protocol_from",
            "has no effect while server.proxy_protocol = \"off\"; set proxy_protocol = \"required\" \
             or remove the list"
                .into(),
        )),
        _ => Ok(()),
    }
}

/// Whether `peer` may send a header: inside one of `from`. IPv4-mapped IPv6 peers match
/// IPv4 CIDRs.
pub fn trusted(from: &[IpNet], peer: std::net::IpAddr) -> bool {
    let ip = peer.to_canonical();
    from.iter().any(|net| net.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn err(text: &str) -> String {
        Config::from_toml(text, "t.toml").unwrap_err().to_string()
    }

    #[test]
    fn required_needs_cidrs_and_cidrs_need_required() {
        let e = err("[server]\nproxy_protocol = \"required\"");
        assert!(e.contains("server.proxy_protocol_from") && e.contains("balancers' CIDRs"), "{e}");
        let e = err("[server]\nproxy_protocol_from = [\"10.0.0.0/8\"]");
        assert!(e.contains("server.proxy_protocol_from") && e.contains("no effect"), "{e}");
        let e = err("[server]\nproxy_protocol = \"sometimes\"");
        assert!(e.contains("proxy_protocol") && e.contains("off") && e.contains("required"), "{e}");
        let e = err("[server]\nproxy_protocol = \"required\"\nproxy_protocol_from = [\"10.0.0.0/33\"]");
        assert!(e.contains("proxy_protocol_from"), "{e}");
        let ok = Config::from_toml(
            "[server]\nproxy_protocol = \"required\"\nproxy_protocol_from = [\"10.0.0.0/8\", \"::1/128\"]",
            "t.toml",
        )
        .unwrap();
        assert_eq!(ok.server.proxy_protocol, ProxyProtocol::Required);
    }

    #[test]
    fn trust_is_by_cidr_and_mapped_addresses_count_as_ipv4() {
        let from: Vec<IpNet> = vec!["127.0.0.2/32".parse().unwrap(), "fd00::/8".parse().unwrap()];
        assert!(trusted(&from, "127.0.0.2".parse().unwrap()));
        assert!(trusted(&from, "::ffff:127.0.0.2".parse().unwrap()));
        assert!(trusted(&from, "fd12::1".parse().unwrap()));
        assert!(!trusted(&from, "127.0.0.3".parse().unwrap()));
        assert!(!trusted(&from, "::1".parse().unwrap()));
    }
}
