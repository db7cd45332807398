//! `[pac]`: the proxy auto-config file the admin listener serves at `/proxy.pac`.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[pac]`
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PacConfig {
    /// Serve `GET /proxy.pac` on the admin listener. Off by default: the file names the proxy's
    /// addresses, which the admin listener need not tell anyone who does not ask for it.
    pub enabled: bool,
    /// `host:port` announced as `HTTPS host:port` (TLS to the proxy). Unset: the first
    /// `server.tls_listen` address, unless it is a wildcard (0.0.0.0, ::), which no browser
    /// can dial; then it must be set.
    pub announce: Option<String>,
    /// `host:port` announced as `PROXY host:port` (plaintext to the proxy) after the HTTPS
    /// entry, for browsers or networks where TLS to the proxy fails. Plaintext shows every
    /// target to the local network, so it is only ever used when set here. Without a TLS
    /// listener it is the only entry, and then it is required.
    pub fallback: Option<String>,
    /// Hosts the browser reaches directly, bypassing the proxy: exact names, `*.suffix`
    /// patterns or IP literals. Empty by default. There is never a catch-all `DIRECT`: if the
    /// proxy is down the browser fails rather than showing the client's address to the origin.
    pub bypass: Vec<String>,
}

impl PacConfig {
    /// `tls_listen` is the server's TLS listeners, from which `announce` defaults.
    pub(super) fn validate(&self, origin: &str, tls_listen: &[std::net::SocketAddr]) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: String| ConfigError::invalid(origin, key, problem);
        for (key, value) in [("pac.announce", &self.announce), ("pac.fallback", &self.fallback)] {
            if let Some(v) = value {
                check_host_port(v).map_err(|p| invalid(key, p))?;
            }
        }
        for (i, host) in self.bypass.iter().enumerate() {
            check_pattern(host).map_err(|p| invalid(&format!("pac.bypass[{i}]"), p))?;
        }
        if !self.enabled {
            return Ok(());
        }
        if self.announce.is_some() && tls_listen.is_empty() {
            return Err(invalid("pac.announce", "announces a TLS listener, but server.tls_listen is empty".into()));
        }
        match tls_listen.first() {
            Some(a) if self.announce.is_none() && a.ip().is_unspecified() => Err(invalid(
                "pac.announce",
                format!(
                    "server.tls_listen {a} is a wildcard address no browser can dial: set the name or address to announce"
                ),
            )),
            None if self.fallback.is_none() => Err(invalid(
                "pac.enabled",
                "nothing to announce: add a TLS listener (server.tls_listen) or a plaintext pac.fallback".into(),
            )),
            _ => Ok(()),
        }
    }
}

/// `host:port`, where host is a DNS name, an IPv4 literal or a bracketed IPv6 literal. The
/// value is written into JavaScript, so only these characters ever reach the file.
fn check_host_port(v: &str) -> Result<(), String> {
    let (host, port) = v.rsplit_once(':').ok_or_else(|| format!("{v:?} is not host:port"))?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(format!("{v:?}: the port must be 1..65535")),
    }
    let ok = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        inner.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    };
    if ok { Ok(()) } else { Err(format!("{v:?}: the host must be a name, an IPv4 address or [IPv6]")) }
}

/// A bypass entry: a name, `*.suffix` or an IP literal (no other wildcards, no quotes).
fn check_pattern(v: &str) -> Result<(), String> {
    let body = v.strip_prefix("*.").unwrap_or(v);
    if v.parse::<std::net::IpAddr>().is_ok()
        || (!body.is_empty() && body.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-'))
    {
        Ok(())
    } else {
        Err(format!("{v:?}: expected a name, *.suffix or an IP address"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pac(announce: Option<&str>, fallback: Option<&str>) -> PacConfig {
        PacConfig {
            enabled: true,
            announce: announce.map(str::to_string),
            fallback: fallback.map(str::to_string),
            bypass: vec![],
        }
    }

    #[test]
    fn what_can_be_announced() {
        let tls = ["127.0.0.1:8443".parse().unwrap()];
        let wildcard = ["0.0.0.0:8443".parse().unwrap()];
        assert!(pac(None, None).validate("t", &tls).is_ok());
        assert!(pac(Some("proxy.example.com:8443"), None).validate("t", &wildcard).is_ok());
        assert!(pac(Some("[2001:db8::1]:8443"), None).validate("t", &wildcard).is_ok());
        assert!(pac(None, None).validate("t", &wildcard).unwrap_err().to_string().contains("wildcard"));
        assert!(pac(None, None).validate("t", &[]).unwrap_err().to_string().contains("nothing to announce"));
        assert!(pac(None, Some("proxy:8080")).validate("t", &[]).is_ok());
        assert!(pac(Some("proxy:8443"), None).validate("t", &[]).is_err());
        for bad in ["proxy", "proxy:0", "pro\"xy:80", "[::1:80", "a b:80", "');alert(1);//:80"] {
            assert!(pac(Some(bad), None).validate("t", &tls).is_err(), "{bad}");
        }
        let mut p = pac(None, None);
        p.bypass = vec!["intranet.example".into(), "*.corp.example".into(), "10.1.2.3".into()];
        assert!(p.validate("t", &tls).is_ok());
        p.bypass = vec!["*".into()];
        assert!(p.validate("t", &tls).is_err());
        p.bypass = vec!["a\"b".into()];
        assert!(p.validate("t", &tls).is_err());
    }
}
