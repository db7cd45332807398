//! `/proxy.pac`: one URL that points a browser at veilgate's TLS listener.
//!
//! Browsers take `HTTPS host:port` only from a PAC file (Firefox has no other way to speak TLS
//! to a proxy), so this is how most users will reach the TLS listener. The file is rendered
//! from the configuration in force on every request: it is a few hundred bytes, asked for
//! rarely, and a reload that changes `[pac]` applies at once.

use std::fmt::Write;
use std::net::SocketAddr;

use crate::config::PacConfig;

/// The PAC file's media type; browsers ignore a PAC file served as anything else.
pub const CONTENT_TYPE: &str = "application/x-ns-proxy-autoconfig";

/// The file for `pac`, or `None` when `[pac]` is off. `tls_listeners` are the bound TLS
/// listener addresses: the first is announced when `pac.announce` is unset (validation made
/// sure it is not a wildcard then).
pub fn render(pac: &PacConfig, tls_listeners: &[SocketAddr]) -> Option<String> {
    if !pac.enabled {
        return None;
    }
    let mut entries = Vec::new();
    if let Some(a) = &pac.announce {
        entries.push(format!("HTTPS {a}"));
    } else if let Some(a) = tls_listeners.first().filter(|a| !a.ip().is_unspecified()) {
        // SocketAddr's Display brackets IPv6, which is what the PAC syntax wants.
        entries.push(format!("HTTPS {a}"));
    }
    if let Some(a) = &pac.fallback {
        entries.push(format!("PROXY {a}"));
    }
    // Validation refuses a configuration that leaves nothing to announce.
    let proxies = entries.join("; ");
    let mut f = String::from("// veilgate: generated from [pac]. No DIRECT fallback: if the proxy is down, nothing\n");
    f.push_str("// reaches an origin with the client's own address.\nfunction FindProxyForURL(url, host) {\n");
    for pattern in &pac.bypass {
        // Validated: names, *.suffix and IP literals only, so nothing here needs escaping.
        let test = match pattern.strip_prefix("*.") {
            Some(suffix) => format!("dnsDomainIs(host, \".{suffix}\")"),
            None => format!("host == \"{pattern}\""),
        };
        let _ = writeln!(f, "  if ({test}) return \"DIRECT\";");
    }
    let _ = writeln!(f, "  return \"{proxies}\";\n}}");
    Some(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announces_the_tls_listener_then_the_fallback_and_never_direct() {
        let mut pac = PacConfig { enabled: true, ..PacConfig::default() };
        assert_eq!(render(&PacConfig::default(), &[]), None);
        let tls = ["[::1]:8443".parse().unwrap()];
        let f = render(&pac, &tls).unwrap();
        assert!(f.ends_with("  return \"HTTPS [::1]:8443\";\n}\n"), "{f}");
        pac.announce = Some("proxy.example.com:443".into());
        pac.fallback = Some("proxy.example.com:3128".into());
        pac.bypass = vec!["*.corp.example".into(), "printer".into()];
        let f = render(&pac, &tls).unwrap();
        assert!(f.contains("  if (dnsDomainIs(host, \".corp.example\")) return \"DIRECT\";\n"), "{f}");
        assert!(f.contains("  if (host == \"printer\") return \"DIRECT\";\n"), "{f}");
        assert!(f.ends_with("  return \"HTTPS proxy.example.com:443; PROXY proxy.example.com:3128\";\n}\n"), "{f}");
        assert_eq!(f.matches("DIRECT\"").count(), 2, "only the bypass entries go direct");
    }
}
