//! The destination a client names: `host:port` from the CONNECT request line.
//!
//! Parsing is strict because the target decides policy: anything ambiguous is refused with
//! 400 rather than guessed at. Host names are normalised (lower case, no trailing dot), and
//! every spelling a resolver would read as an IPv4 address (`127.1`, `2130706433`,
//! `0x7f000001`, `0177.0.0.1`) becomes that address here, and so does an IPv4-mapped IPv6
//! literal (`[::ffff:127.0.0.1]`, `[::ffff:7f00:1]`): the dialler connects to the mapped
//! IPv4 address, so host patterns, routes and CIDR rules must see that same address, or a
//! second spelling of one origin would escape every rule written for the first.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A target host.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name, lower case, without a trailing dot.
    Name(String),
    /// An address literal.
    Ip(IpAddr),
}

/// A parsed CONNECT target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// Host name or address.
    pub host: Host,
    /// Port, never 0.
    pub port: u16,
}

/// Why an authority was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// No `:port`.
    #[error("target has no port")]
    MissingPort,
    /// Port not a number in 1..=65535.
    #[error("target port is not in 1-65535")]
    BadPort,
    /// `user@host` forms are not allowed.
    #[error("target carries userinfo")]
    Userinfo,
    /// Empty host, bad characters, or a malformed address.
    #[error("target host is malformed")]
    BadHost,
}

impl TargetError {
    /// The text of the 400 a bad target gets (a fixed string: the target itself is the
    /// peer's and is not echoed).
    pub fn reason(&self) -> &'static str {
        match self {
            TargetError::MissingPort => "target has no port",
            TargetError::BadPort => "target port is not in 1-65535",
            TargetError::Userinfo => "target carries userinfo",
            TargetError::BadHost => "target host is malformed",
        }
    }
}

impl Target {
    /// Parses an authority-form request target such as `example.com:443` or `[::1]:443`.
    pub fn parse(authority: &str) -> Result<Target, TargetError> {
        if authority.contains('@') {
            return Err(TargetError::Userinfo);
        }
        if authority.bytes().any(|b| b.is_ascii_control() || b == b' ' || !b.is_ascii()) {
            return Err(TargetError::BadHost);
        }
        let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
            let (inside, after) = rest.split_once(']').ok_or(TargetError::BadHost)?;
            let port = after.strip_prefix(':').ok_or(if after.is_empty() {
                TargetError::MissingPort
            } else {
                TargetError::BadHost
            })?;
            let ip: Ipv6Addr = inside.parse().map_err(|_| TargetError::BadHost)?;
            (Host::Ip(IpAddr::V6(ip).to_canonical()), port)
        } else {
            let (host, port) = authority.rsplit_once(':').ok_or(TargetError::MissingPort)?;
            if host.contains(':') || host.contains('[') || host.contains(']') {
                return Err(TargetError::BadHost);
            }
            (parse_host(host)?, port)
        };
        Ok(Target { host, port: parse_port(port)? })
    }

    /// The host as text: names as normalised, IPv6 without brackets.
    pub fn host_str(&self) -> String {
        match &self.host {
            Host::Name(n) => n.clone(),
            Host::Ip(ip) => ip.to_string(),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Name(n) => write!(f, "{n}:{}", self.port),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}:{}", self.port),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
        }
    }
}

fn parse_port(s: &str) -> Result<u16, TargetError> {
    if s.is_empty() {
        return Err(TargetError::MissingPort);
    }
    if s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TargetError::BadPort);
    }
    match s.parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        _ => Err(TargetError::BadPort),
    }
}

fn parse_host(raw: &str) -> Result<Host, TargetError> {
    let host = raw.strip_suffix('.').unwrap_or(raw).to_ascii_lowercase();
    if host.is_empty() || host.len() > 253 {
        return Err(TargetError::BadHost);
    }
    // WHATWG URL host parsing: if the last label is numeric, the whole host is an IPv4
    // address in one of inet_aton's spellings, or it is invalid. Never a name.
    let last = host.rsplit('.').next().unwrap_or("");
    if ends_in_number(last) {
        return parse_ipv4_loose(&host).map(|ip| Host::Ip(IpAddr::V4(ip))).ok_or(TargetError::BadHost);
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !host.split('.').all(label_ok) {
        return Err(TargetError::BadHost);
    }
    Ok(Host::Name(host))
}

fn ends_in_number(label: &str) -> bool {
    !label.is_empty()
        && (label.bytes().all(|b| b.is_ascii_digit())
            || ((label.starts_with("0x") || label.starts_with("0X"))
                && label[2..].bytes().all(|b| b.is_ascii_hexdigit())))
}

/// inet_aton/WHATWG IPv4: 1 to 4 parts, each decimal, `0x` hex or `0`-prefixed octal; the last
/// part fills the remaining bytes.
fn parse_ipv4_loose(host: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = host.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut nums = Vec::with_capacity(4);
    for p in &parts {
        nums.push(parse_ipv4_number(p)?);
    }
    let (last, init) = nums.split_last()?;
    if init.iter().any(|&n| n > 255) {
        return None;
    }
    let remaining_bytes = 4 - init.len() as u32;
    if *last >= 1u64 << (8 * remaining_bytes) {
        return None;
    }
    let mut value: u64 = *last;
    for (i, n) in init.iter().enumerate() {
        value += n << (8 * (3 - i as u32));
    }
    Some(Ipv4Addr::from(u32::try_from(value).ok()?))
}

fn parse_ipv4_number(p: &str) -> Option<u64> {
    if p.is_empty() {
        return None;
    }
    let (digits, radix) = if let Some(h) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
        (h, 16)
    } else if p.len() > 1 && p.starts_with('0') {
        (&p[1..], 8)
    } else {
        (p, 10)
    };
    if digits.is_empty() {
        return Some(0);
    }
    if digits.len() > 12 {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Host {
        Host::Ip(s.parse().unwrap())
    }

    #[test]
    fn names_and_literals() {
        let t = Target::parse("Example.COM.:443").unwrap();
        assert_eq!(t.host, Host::Name("example.com".into()));
        assert_eq!(t.port, 443);
        assert_eq!(Target::parse("[::1]:8443").unwrap().host, ip("::1"));
        assert_eq!(Target::parse("[::ffff:127.0.0.1]:443").unwrap().host, ip("127.0.0.1"));
        assert_eq!(Target::parse("localhost:443").unwrap().to_string(), "localhost:443");
        assert_eq!(Target::parse("[::1]:443").unwrap().to_string(), "[::1]:443");
    }

    #[test]
    fn inet_aton_spellings_are_addresses() {
        for s in ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "0177.0.0.1", "127.0.1", "0x7f.1"] {
            assert_eq!(Target::parse(&format!("{s}:443")).unwrap().host, ip("127.0.0.1"), "{s}");
        }
        assert_eq!(Target::parse("0.0.0.0:443").unwrap().host, ip("0.0.0.0"));
        assert_eq!(Target::parse("0:443").unwrap().host, ip("0.0.0.0"));
    }

    #[test]
    fn ipv4_mapped_literals_are_the_ipv4_address() {
        for s in ["[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[0:0:0:0:0:ffff:7f00:1]", "[::FFFF:127.0.0.1]"] {
            let t = Target::parse(&format!("{s}:443")).unwrap();
            assert_eq!(t.host, ip("127.0.0.1"), "{s}");
            assert_eq!(t.to_string(), "127.0.0.1:443", "{s}");
        }
        // Other IPv6 forms that embed an IPv4 address are different addresses (they reach a
        // translator, not the IPv4 host); policy judges them by what they embed (acl.rs).
        assert_eq!(Target::parse("[::ffff:0:7f00:1]:443").unwrap().host, ip("::ffff:0:7f00:1"));
    }

    #[test]
    fn malformed_authorities() {
        use TargetError::*;
        let cases = [
            ("example.com", MissingPort),
            ("example.com:", MissingPort),
            ("example.com:0", BadPort),
            ("example.com:65536", BadPort),
            ("example.com:+443", BadPort),
            ("example.com:44a", BadPort),
            ("user@example.com:443", Userinfo),
            ("[::1:443", BadHost),
            ("[::1]443", BadHost),
            ("[::1]", MissingPort),
            ("::1:443", BadHost),
            ("[fe80::1%eth0]:443", BadHost),
            ("[127.0.0.1]:443", BadHost),
            ("exa\0mple.com:443", BadHost),
            ("exa\tmple.com:443", BadHost),
            (":443", BadHost),
            ("256.1.1.1:443", BadHost),
            ("1.2.3.4.5:443", BadHost),
            ("bad..name:443", BadHost),
            ("-bad.example:443", BadHost),
        ];
        for (input, want) in cases {
            assert_eq!(Target::parse(input), Err(want), "{input:?}");
        }
    }
}
