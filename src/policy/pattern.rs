//! Host patterns as operators write them in `allow_hosts`, `deny_hosts` and routes:
//! `example.com` (that name only), `*.example.com` (any name below it, not the name itself)
//! and `*` (everything). Names compare case-insensitively and without a trailing dot, because
//! `Example.COM.` and `example.com` reach the same origin.

use std::fmt;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

/// A validated, normalised host pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `*`: every host.
    Any,
    /// `example.com`: exactly this name (or IP literal in its canonical text form).
    Exact(String),
    /// `*.example.com`: names strictly below `example.com`; holds `.example.com`.
    Suffix(String),
}

impl HostPattern {
    /// Parses and normalises a pattern.
    pub fn parse(input: &str) -> Result<HostPattern, String> {
        let s = input.trim().to_ascii_lowercase();
        if s == "*" {
            return Ok(HostPattern::Any);
        }
        let s = s.strip_suffix('.').unwrap_or(&s).to_string();
        let (wild, name) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest.to_string()),
            None => (false, s),
        };
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b':')
            })
            && !name.contains('*');
        if !valid {
            return Err(format!("invalid host pattern {input:?}: write \"example.com\", \"*.example.com\" or \"*\""));
        }
        if wild {
            return Ok(HostPattern::Suffix(format!(".{name}")));
        }
        // An address is matched in the canonical form targets are normalised to, so
        // "127.1", "0x7f000001" or "0:0:0:0:0:0:0:1" mean what they say.
        if let Ok(ip) = name.parse::<std::net::Ipv6Addr>() {
            return Ok(HostPattern::Exact(std::net::IpAddr::V6(ip).to_canonical().to_string()));
        }
        if let Ok(crate::target::Target { host: crate::target::Host::Ip(ip), .. }) =
            crate::target::Target::parse(&format!("{name}:1"))
        {
            return Ok(HostPattern::Exact(ip.to_string()));
        }
        Ok(HostPattern::Exact(name))
    }

    /// True when the normalised host name `host` (lower case, no trailing dot) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(name) => host == name,
            HostPattern::Suffix(suffix) => host.len() > suffix.len() && host.ends_with(suffix.as_str()),
        }
    }
}

/// True when any pattern in `patterns` matches `host`.
pub fn any_matches(patterns: &[HostPattern], host: &str) -> bool {
    patterns.iter().any(|p| p.matches(host))
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Any => f.write_str("*"),
            HostPattern::Exact(name) => f.write_str(name),
            HostPattern::Suffix(suffix) => write!(f, "*{suffix}"),
        }
    }
}

impl<'de> Deserialize<'de> for HostPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        HostPattern::parse(&s).map_err(de::Error::custom)
    }
}

impl Serialize for HostPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_normalise_and_match() {
        let exact = HostPattern::parse("Example.COM.").unwrap();
        assert!(exact.matches("example.com"));
        assert!(!exact.matches("www.example.com"));
        let wild = HostPattern::parse("*.example.com").unwrap();
        assert!(wild.matches("www.example.com"));
        assert!(wild.matches("a.b.example.com"));
        assert!(!wild.matches("example.com"));
        assert!(!wild.matches("badexample.com"));
        assert!(HostPattern::parse("*").unwrap().matches("anything"));
        assert!(HostPattern::parse("0x7f000001").unwrap().matches("127.0.0.1"));
        assert!(HostPattern::parse("127.1").unwrap().matches("127.0.0.1"));
        assert!(HostPattern::parse("0:0:0:0:0:0:0:1").unwrap().matches("::1"));
        for bad in ["", "*.", "a..b", "foo.*.com", "exa mple.com", "*example.com"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
