//! `[[upstreams]]` and `[[upstream_groups]]`: parent proxies a route can send its tunnels
//! through (SOCKS5, HTTP or HTTPS CONNECT), alone or as a group with a selection strategy.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ConfigError, HumanDuration, check_timeout};

/// Longest name accepted: names are metric labels and log fields.
const MAX_NAME: usize = 64;

/// One `[[upstreams]]` entry: a parent proxy.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// What routes and groups call it; the `upstream` label of its metrics.
    pub name: String,
    /// `socks5h://`, `socks5://`, `http://` or `https://` with `HOST:PORT`; no credentials
    /// (they go in `credentials_file`, so the config can be shown and logged).
    pub url: UpstreamUrl,
    /// One line `user:password` for the parent (SOCKS5 RFC 1929, or Basic
    /// Proxy-Authorization); readable by the owner only, like the other secrets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    /// A username per client identity (an opaque token, never the client's address or
    /// user name), so a parent that isolates by credentials (Tor's IsolateSOCKSAuth) never
    /// puts two clients on one circuit.
    #[serde(default)]
    pub isolate_by_client: bool,
    /// How often a TCP connect and a protocol greeting check the parent; a parent marked
    /// down comes back at the first check that passes.
    #[serde(default = "default_health_check")]
    pub health_check: HumanDuration,
    /// For `https://`: PEM roots to verify the parent's certificate by, instead of the
    /// system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

fn default_health_check() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

/// The protocol spoken to a parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParentScheme {
    /// SOCKS5 with the name sent unresolved: the parent resolves, veilgate asks no DNS.
    Socks5h,
    /// SOCKS5 with an address veilgate resolved and checked against `[policy]`.
    Socks5,
    /// HTTP CONNECT in plaintext.
    Http,
    /// HTTP CONNECT inside TLS to the parent.
    Https,
}

impl ParentScheme {
    fn as_str(self) -> &'static str {
        match self {
            ParentScheme::Socks5h => "socks5h",
            ParentScheme::Socks5 => "socks5",
            ParentScheme::Http => "http",
            ParentScheme::Https => "https",
        }
    }
}

/// A parent's URL: scheme, host and port (path, query and userinfo refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// How to speak to it.
    pub scheme: ParentScheme,
    /// Host name or address literal (IPv6 without brackets); for `https://` also the name
    /// its certificate is verified for.
    pub host: String,
    /// Port.
    pub port: u16,
}

impl UpstreamUrl {
    /// Parses `SCHEME://HOST:PORT[/]`.
    pub fn parse(s: &str) -> Result<UpstreamUrl, String> {
        let (scheme, rest) = s.split_once("://").ok_or("expected SCHEME://HOST:PORT")?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "socks5h" => ParentScheme::Socks5h,
            "socks5" => ParentScheme::Socks5,
            "http" => ParentScheme::Http,
            "https" => ParentScheme::Https,
            other => return Err(format!("scheme {other:?} is not one of socks5h, socks5, http, https")),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('@') {
            return Err("credentials do not go in the URL (it is logged and shown); use credentials_file".into());
        }
        if rest.contains(['/', '?', '#']) {
            return Err("a parent URL has no path, query or fragment".into());
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, p) = v6.split_once(']').ok_or("unclosed [ in the host")?;
            (h, p.strip_prefix(':').ok_or("expected :PORT after the host")?)
        } else {
            rest.rsplit_once(':').ok_or("expected :PORT after the host")?
        };
        if host.is_empty() {
            return Err("the host is empty".into());
        }
        let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or("the port is not in 1-65535")?;
        Ok(UpstreamUrl { scheme, host: host.to_ascii_lowercase(), port })
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "{}://[{}]:{}", self.scheme.as_str(), self.host, self.port)
        } else {
            write!(f, "{}://{}:{}", self.scheme.as_str(), self.host, self.port)
        }
    }
}

impl<'de> Deserialize<'de> for UpstreamUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        UpstreamUrl::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for UpstreamUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `upstream_groups.strategy`
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// The first member that is up, in the order listed.
    #[default]
    Failover,
    /// Members in turn, skipping those that are down.
    RoundRobin,
    /// The member a stable hash of the client identity picks (rendezvous hashing: when a
    /// member goes down only its own clients move), so a client keeps its parent across
    /// restarts and instances.
    Hash,
}

/// One `[[upstream_groups]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamGroupConfig {
    /// What routes call it.
    pub name: String,
    /// Names of `[[upstreams]]` (not groups), in failover order.
    pub members: Vec<String>,
    /// How a member is chosen for a tunnel.
    #[serde(default)]
    pub strategy: Strategy,
}

fn check_name(origin: &str, key: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(origin, key, format!("1-{MAX_NAME} of A-Z a-z 0-9 - _ . (it is a metric label)")))
    }
}

/// The rules for `[[upstreams]]` and `[[upstream_groups]]` together: names unique across
/// both (a route names either), members existing upstreams.
pub(super) fn validate(
    origin: &str,
    upstreams: &[UpstreamConfig],
    groups: &[UpstreamGroupConfig],
) -> Result<(), ConfigError> {
    let invalid = |key: String, problem: String| ConfigError::invalid(origin, &key, problem);
    let mut seen: Vec<&str> = Vec::new();
    for (i, u) in upstreams.iter().enumerate() {
        check_name(origin, &format!("upstreams[{i}].name"), &u.name)?;
        if seen.contains(&u.name.as_str()) {
            return Err(invalid(format!("upstreams[{i}].name"), format!("{:?} is used twice", u.name)));
        }
        seen.push(&u.name);
        check_timeout(origin, &format!("upstreams[{i}].health_check"), u.health_check)?;
        if u.isolate_by_client && u.credentials_file.is_some() {
            return Err(invalid(
                format!("upstreams[{i}].isolate_by_client"),
                "sends its own username per client, so it cannot be combined with credentials_file".into(),
            ));
        }
        if u.ca_file.is_some() && u.url.scheme != ParentScheme::Https {
            return Err(invalid(format!("upstreams[{i}].ca_file"), "is used only with an https:// parent".into()));
        }
    }
    for (i, g) in groups.iter().enumerate() {
        check_name(origin, &format!("upstream_groups[{i}].name"), &g.name)?;
        if seen.contains(&g.name.as_str()) {
            return Err(invalid(
                format!("upstream_groups[{i}].name"),
                format!("{:?} is already an upstream or group name", g.name),
            ));
        }
        seen.push(&g.name);
        if g.members.is_empty() {
            return Err(invalid(format!("upstream_groups[{i}].members"), "a group needs at least one member".into()));
        }
        for (j, m) in g.members.iter().enumerate() {
            if !upstreams.iter().any(|u| &u.name == m) {
                return Err(invalid(
                    format!("upstream_groups[{i}].members[{j}]"),
                    format!("{m:?} is not an [[upstreams]] name (groups do not nest)"),
                ));
            }
            if g.members[..j].contains(m) {
                return Err(invalid(format!("upstream_groups[{i}].members[{j}]"), format!("{m:?} is listed twice")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_print() {
        let u = UpstreamUrl::parse("socks5h://127.0.0.1:9050").unwrap();
        assert_eq!((u.scheme, u.host.as_str(), u.port), (ParentScheme::Socks5h, "127.0.0.1", 9050));
        assert_eq!(u.to_string(), "socks5h://127.0.0.1:9050");
        let u = UpstreamUrl::parse("HTTPS://[::1]:8443/").unwrap();
        assert_eq!((u.scheme, u.host.as_str()), (ParentScheme::Https, "::1"));
        assert_eq!(u.to_string(), "https://[::1]:8443");
        for bad in ["socks4://a:1", "http://a", "http://a:0", "http://u:p@a:1", "http://a:1/x", "a:1", "http://:1"] {
            assert!(UpstreamUrl::parse(bad).is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod validation {
    use crate::config::Config;

    fn err(text: &str) -> String {
        Config::from_toml(text, "t.toml").unwrap_err().to_string()
    }

    const TOR: &str = "[[upstreams]]\nname = \"tor\"\nurl = \"socks5h://127.0.0.1:9050\"\n";

    #[test]
    fn names_members_and_routes_are_checked() {
        let ok = format!(
            "{TOR}[[upstream_groups]]\nname = \"g\"\nmembers = [\"tor\"]\nstrategy = \"hash\"\n[[routes]]\nhosts = [\"*.onion\"]\nupstream = \"g\"\n"
        );
        let c = Config::from_toml(&ok, "t.toml").unwrap();
        assert_eq!(Config::from_toml(&c.to_toml(), "again").unwrap(), c, "round trip");
        assert!(err(&format!("{TOR}{TOR}")).contains("upstreams[1].name"));
        assert!(err(&TOR.replace("tor\"", "a b\"")).contains("upstreams[0].name"));
        assert!(err(&TOR.replace("socks5h", "socks4")).contains("socks4"));
        assert!(err(&TOR.replace("127.0.0.1", "u:p@127.0.0.1")).contains("credentials_file"));
        assert!(
            err(&format!("{TOR}[[upstream_groups]]\nname = \"tor\"\nmembers = [\"tor\"]\n"))
                .contains("upstream_groups[0].name")
        );
        assert!(err(&format!("{TOR}[[upstream_groups]]\nname = \"g\"\nmembers = [\"nope\"]\n")).contains("members[0]"));
        assert!(err(&format!("{TOR}[[upstream_groups]]\nname = \"g\"\nmembers = []\n")).contains("members"));
        assert!(
            err(&format!("{TOR}[[upstream_groups]]\nname = \"g\"\nmembers = [\"tor\"]\nstrategy = \"random\"\n"))
                .contains("strategy")
        );
        assert!(
            err(&format!("{TOR}[[routes]]\nhosts = [\"a\"]\nupstream = \"nope\"\n")).contains("routes[0].upstream")
        );
        assert!(
            err(&format!("{TOR}[[routes]]\nhosts = [\"a\"]\nmode = \"deny\"\nupstream = \"tor\"\n"))
                .contains("routes[0].upstream")
        );
        assert!(
            err(&format!("{TOR}isolate_by_client = true\ncredentials_file = \"c\"\n")).contains("isolate_by_client")
        );
        assert!(err(&format!("{TOR}ca_file = \"ca.pem\"\n")).contains("ca_file"));
        assert!(err(&format!("{TOR}health_check = \"0s\"\n")).contains("health_check"));
    }

    #[test]
    fn a_mitm_route_cannot_use_an_https_parent() {
        let text = "[[upstreams]]\nname = \"p\"\nurl = \"https://127.0.0.1:8443\"\n[[routes]]\nhosts = [\"a\"]\nmode = \"mitm\"\nupstream = \"p\"\n[mitm]\nca_cert = \"c\"\nca_key = \"k\"\n";
        assert!(err(text).contains("https:// parent"), "{}", err(text));
    }

    #[test]
    fn outcome_labels_match_the_registered_ones() {
        let labels: Vec<_> = crate::dial::parent::Outcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(labels, crate::metrics::UPSTREAM_OUTCOMES);
    }
}
