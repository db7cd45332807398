//! Destination access control: ports, host patterns, CIDRs and the non-public address ranges.
//!
//! Checked twice: on the literal target before any DNS ([`Acl::check_target`]) and on every
//! address a name resolves to ([`Acl::check_addr`]). The dialer connects only to addresses
//! that passed, so a name cannot be re-pointed between check and connect (DNS rebinding).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

use super::pattern::{HostPattern, any_matches};
use crate::config::{PolicyConfig, PortRange};
use crate::error::Refusal;
use crate::target::{Host, Target};

/// The compiled `[policy]` section plus the proxy's own listen addresses.
#[derive(Debug, Clone)]
pub struct Acl {
    ports: Vec<PortRange>,
    deny_private: bool,
    allow_hosts: Vec<HostPattern>,
    deny_hosts: Vec<HostPattern>,
    allow_cidrs: Vec<IpNet>,
    deny_cidrs: Vec<IpNet>,
    own: Vec<SocketAddr>,
}

impl Acl {
    /// Builds the ACL. `own` are the proxy's listen addresses, never dialled (no loops).
    pub fn new(policy: &PolicyConfig, own: Vec<SocketAddr>) -> Acl {
        Acl {
            ports: policy.allowed_ports.clone(),
            deny_private: policy.deny_private,
            allow_hosts: policy.allow_hosts.clone(),
            deny_hosts: policy.deny_hosts.clone(),
            allow_cidrs: policy.allow_cidrs.clone(),
            deny_cidrs: policy.deny_cidrs.clone(),
            own,
        }
    }

    /// Pre-DNS: port, host patterns, and the address itself when the target is a literal.
    pub fn check_target(&self, target: &Target) -> Result<(), Refusal> {
        if !self.ports.iter().any(|r| r.contains(target.port)) {
            return Err(Refusal::PortDenied);
        }
        let host = target.host_str();
        if any_matches(&self.deny_hosts, &host) {
            return Err(Refusal::HostDenied);
        }
        if !self.allow_hosts.is_empty() && !any_matches(&self.allow_hosts, &host) {
            return Err(Refusal::HostDenied);
        }
        if let Host::Ip(ip) = target.host {
            self.check_addr(SocketAddr::new(ip, target.port))?;
        }
        Ok(())
    }

    /// Post-DNS: one resolved (or literal) address.
    ///
    /// An unspecified address (`0.0.0.0/8`, `::`) is refused whatever the rest says: Linux
    /// takes a connect to it as a connect to this host, so it would reach the proxy's own
    /// listeners (and the admin port) under a name no own-address rule lists. An IPv6 address
    /// that embeds an IPv4 one (NAT64, SIIT, 6to4, IPv4-compatible) is judged by CIDR rules
    /// as itself and as the IPv4 address it carries, because a translator on the path
    /// delivers it there.
    pub fn check_addr(&self, addr: SocketAddr) -> Result<(), Refusal> {
        let ip = addr.ip().to_canonical();
        let embedded = match ip {
            IpAddr::V4(_) => None,
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
        };
        if is_unspecified(ip) || embedded.is_some_and(is_unspecified) {
            return Err(Refusal::AddressDenied);
        }
        let listed = |nets: &[IpNet]| nets.iter().any(|n| n.contains(&ip) || embedded.is_some_and(|e| n.contains(&e)));
        if listed(&self.deny_cidrs) {
            return Err(Refusal::AddressDenied);
        }
        if self.is_own(SocketAddr::new(ip, addr.port())) {
            return Err(Refusal::AddressDenied);
        }
        if !self.allow_cidrs.is_empty() {
            return if listed(&self.allow_cidrs) { Ok(()) } else { Err(Refusal::AddressDenied) };
        }
        if self.deny_private && !is_public(ip) {
            return Err(Refusal::AddressDenied);
        }
        Ok(())
    }

    /// One of our own listeners, including a wildcard listener reached through loopback.
    fn is_own(&self, addr: SocketAddr) -> bool {
        self.own.iter().any(|own| {
            own.port() == addr.port()
                && (own.ip().to_canonical() == addr.ip()
                    || (own.ip().is_unspecified() && (addr.ip().is_loopback() || addr.ip().is_unspecified())))
        })
    }
}

/// True for addresses on the public internet; false for every special-purpose range an SSRF
/// could use to reach the proxy's own network, including IPv6 forms that carry such an IPv4.
pub fn is_public(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0                                   // "this network", incl. 0.0.0.0
        || a == 10                             // RFC 1918
        || a == 127                            // loopback
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64/10
        || (a == 169 && b == 254)              // link-local
        || (a == 172 && (16..32).contains(&b)) // RFC 1918
        || (a == 192 && b == 168)              // RFC 1918
        || (a == 192 && b == 0 && c == 0)      // IETF protocol assignments
        || (a == 192 && b == 0 && c == 2)      // TEST-NET-1
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || (a == 198 && b == 51 && c == 100)   // TEST-NET-2
        || (a == 203 && b == 0 && c == 113)    // TEST-NET-3
        || a >= 224) // multicast 224/4, reserved 240/4, broadcast
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
        return false;
    }
    let s = ip.segments();
    if s[0..4] == [0; 4] {
        // ::/64 holds no global unicast: IPv4-compatible (::a.b.c.d, deprecated), SIIT's
        // IPv4-translated (::ffff:0:a.b.c.d) and whatever else is unassigned there.
        return false;
    }
    if let Some(v4) = embedded_v4(ip) {
        return is_public_v4(v4);
    }
    match s[0] {
        0x64 if s[1] == 0xff9b && s[2] == 1 => false, // local-use NAT64 64:ff9b:1::/48
        0x100 if s[1..4] == [0; 3] => false,          // discard-only 100::/64
        0x2001 if s[1] == 0 => false,                 // Teredo (embeds an obfuscated IPv4)
        0x2001 if s[1] == 0xdb8 => false,             // documentation
        x if x & 0xfe00 == 0xfc00 => false,           // ULA fc00::/7
        x if x & 0xffc0 == 0xfe80 => false,           // link-local fe80::/10
        x if x & 0xffc0 == 0xfec0 => false,           // site-local fec0::/10 (deprecated)
        _ => true,
    }
}

/// The IPv4 address an IPv6 address carries in a standard place: IPv4-mapped
/// (`::ffff:0:0/96`), SIIT IPv4-translated (`::ffff:0:0:0/96`), IPv4-compatible (`::/96`,
/// deprecated), the NAT64 well-known prefix (`64:ff9b::/96`) and 6to4 (`2002::/16`).
pub fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    match s {
        [0, 0, 0, 0, 0, 0xffff, hi, lo] | [0, 0, 0, 0, 0xffff, 0, hi, lo] => Some(v4(hi, lo)),
        // `::` and `::1` are IPv6's own unspecified and loopback addresses, not compatible forms.
        [0, 0, 0, 0, 0, 0, hi, lo] if (hi, lo) != (0, 0) && (hi, lo) != (0, 1) => Some(v4(hi, lo)),
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(v4(hi, lo)),
        [0x2002, hi, lo, ..] => Some(v4(hi, lo)),
        _ => None,
    }
}

/// `0.0.0.0/8` ("this network") and `::`: never a destination, always this host to Linux.
fn is_unspecified(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[0] == 0,
        IpAddr::V6(v6) => v6.is_unspecified(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_ranges_are_not_public() {
        for s in [
            "127.0.0.1",
            "127.255.0.9",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "169.254.169.254",
            "224.0.0.1",
            "239.1.1.1",
            "255.255.255.255",
            "240.0.0.1",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
            "2002:c0a8:101::1",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "2001::1",
            "2001:db8::1",
            "64:ff9b:1::1",
            "::ffff:0:127.0.0.1",
            "::ffff:0:10.0.0.1",
            "::ffff:0:8.8.8.8",
            "::8.8.8.8",
        ] {
            assert!(!is_public(s.parse().unwrap()), "{s} should not be public");
        }
        for s in [
            "1.1.1.1",
            "8.8.8.8",
            "100.128.0.1",
            "172.32.0.1",
            "2606:4700::1111",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(s.parse().unwrap()), "{s} should be public");
        }
    }

    fn acl(policy: PolicyConfig) -> Acl {
        Acl::new(&policy, vec!["127.0.0.1:8080".parse().unwrap(), "0.0.0.0:9000".parse().unwrap()])
    }

    #[test]
    fn own_listeners_are_never_targets() {
        let a = acl(PolicyConfig { deny_private: false, ..PolicyConfig::default() });
        assert_eq!(a.check_addr("127.0.0.1:8080".parse().unwrap()), Err(Refusal::AddressDenied));
        assert_eq!(a.check_addr("127.0.0.2:9000".parse().unwrap()), Err(Refusal::AddressDenied));
        assert_eq!(a.check_addr("[::ffff:127.0.0.1]:8080".parse().unwrap()), Err(Refusal::AddressDenied));
        assert_eq!(a.check_addr("127.0.0.1:8081".parse().unwrap()), Ok(()));
    }

    #[test]
    fn unspecified_targets_are_never_dialled() {
        let open = acl(PolicyConfig {
            deny_private: false,
            allow_cidrs: vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()],
            ..PolicyConfig::default()
        });
        for s in ["0.0.0.0:9090", "0.1.2.3:443", "[::]:9090", "[::ffff:0.0.0.0]:9090", "[::ffff:0:0.0.0.0]:1"] {
            assert_eq!(open.check_addr(s.parse().unwrap()), Err(Refusal::AddressDenied), "{s}");
        }
    }

    #[test]
    fn embedded_ipv4_meets_the_cidr_rules() {
        let a = acl(PolicyConfig {
            deny_private: false,
            deny_cidrs: vec!["127.0.0.0/8".parse().unwrap()],
            ..PolicyConfig::default()
        });
        for s in ["[::ffff:0:7f00:1]:443", "[64:ff9b::7f00:1]:443", "[2002:7f00:1::1]:443", "[::7f00:1]:443"] {
            assert_eq!(a.check_addr(s.parse().unwrap()), Err(Refusal::AddressDenied), "{s}");
        }
        assert_eq!(a.check_addr("[64:ff9b::808:808]:443".parse().unwrap()), Ok(()));
        let only = acl(PolicyConfig { allow_cidrs: vec!["8.8.8.0/24".parse().unwrap()], ..PolicyConfig::default() });
        assert_eq!(only.check_addr("[64:ff9b::808:808]:443".parse().unwrap()), Ok(()), "judged as what it carries");
        assert_eq!(only.check_addr("[64:ff9b::909:909]:443".parse().unwrap()), Err(Refusal::AddressDenied));
    }

    #[test]
    fn cidr_lists() {
        let a = acl(PolicyConfig {
            allow_cidrs: vec!["127.0.0.0/24".parse().unwrap()],
            deny_cidrs: vec!["127.0.0.9/32".parse().unwrap()],
            ..PolicyConfig::default()
        });
        assert_eq!(a.check_addr("127.0.0.5:443".parse().unwrap()), Ok(()), "allow_cidrs exempts from deny_private");
        assert_eq!(a.check_addr("127.0.0.9:443".parse().unwrap()), Err(Refusal::AddressDenied), "deny wins");
        assert_eq!(
            a.check_addr("127.0.1.1:443".parse().unwrap()),
            Err(Refusal::AddressDenied),
            "outside the allow-list"
        );
    }

    #[test]
    fn ports_and_hosts() {
        let a = acl(PolicyConfig {
            allow_hosts: vec![HostPattern::parse("*.example.com").unwrap()],
            deny_hosts: vec![HostPattern::parse("bad.example.com").unwrap()],
            ..PolicyConfig::default()
        });
        let t = |s: &str| Target::parse(s).unwrap();
        assert_eq!(a.check_target(&t("www.example.com:443")), Ok(()));
        assert_eq!(a.check_target(&t("www.example.com:80")), Err(Refusal::PortDenied));
        assert_eq!(a.check_target(&t("bad.example.com:443")), Err(Refusal::HostDenied));
        assert_eq!(a.check_target(&t("other.org:443")), Err(Refusal::HostDenied));
    }
}
