//! What a refusal's log line says beyond its reason: the facts an operator needs to act on
//! it (the kernel's or the resolver's word for a failed dial; the method and destination of
//! a request that was not a CONNECT). Kept apart from [`crate::error::Refusal`], which is the
//! answer on the wire and the metric label and must stay the same for every client.
//!
//! Values from the request are the peer's: they are bounded here, and logged as string
//! fields, which the text format quotes and escapes and the JSON format encodes.

/// Longest method logged; a longer one is cut (it is not a method anyone serves).
const MAX_METHOD: usize = 32;
/// Longest host logged (a DNS name is at most 253 bytes; a port and brackets fit too).
const MAX_HOST: usize = 262;

/// Optional fields of a refusal's log line; the empty default logs none of them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Detail {
    /// Why a dial failed ("connection refused", "NXDOMAIN").
    pub cause: Option<String>,
    /// The request's method, when it was not CONNECT.
    pub method: Option<String>,
    /// For an absolute-form target (`GET http://host/...`), its scheme.
    pub scheme: Option<String>,
    /// For an absolute-form target, its authority without userinfo; never path or query.
    pub host: Option<String>,
}

impl Detail {
    /// A dial's cause.
    pub fn cause(cause: impl std::fmt::Display) -> Detail {
        Detail { cause: Some(cause.to_string()), ..Detail::default() }
    }

    /// Method, scheme and host from the request line at the start of `head`, which may be
    /// incomplete (a 405 is answered as soon as the method is known). Only the first line is
    /// read; the path and the query string are never kept.
    pub fn request_line(head: &[u8]) -> Detail {
        let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
        let mut words = line.split(|&b| b == b' ').filter(|w| !w.is_empty());
        let method = words.next().map(|m| bounded(m, MAX_METHOD));
        let (scheme, host) = match words.next().and_then(absolute_form) {
            Some((s, h)) => (Some(bounded(s, MAX_METHOD)), Some(bounded(h, MAX_HOST))),
            None => (None, None),
        };
        Detail { cause: None, method, scheme, host }
    }
}

/// `scheme://authority...` split into the scheme and the authority's host part (userinfo
/// dropped: it can carry a password).
fn absolute_form(target: &[u8]) -> Option<(&[u8], &[u8])> {
    let sep = target.windows(3).position(|w| w == b"://")?;
    let (scheme, rest) = (&target[..sep], &target[sep + 3..]);
    if scheme.is_empty() || !scheme.iter().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(b)) {
        return None;
    }
    let end = rest.iter().position(|b| b"/?#".contains(b)).unwrap_or(rest.len());
    let authority = &rest[..end];
    let host = match authority.iter().rposition(|&b| b == b'@') {
        Some(at) => &authority[at + 1..],
        None => authority,
    };
    Some((scheme, host))
}

fn bounded(bytes: &[u8], max: usize) -> String {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    String::from_utf8_lossy(&bytes[..bytes.len().min(max)]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absolute_form_request_gives_method_scheme_and_host_but_no_query() {
        let d = Detail::request_line(b"GET http://user:pw@a.invalid:8080/x?secret=1 HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(d.method.as_deref(), Some("GET"));
        assert_eq!(d.scheme.as_deref(), Some("http"));
        assert_eq!(d.host.as_deref(), Some("a.invalid:8080"));
        assert!(!format!("{d:?}").contains("secret") && !format!("{d:?}").contains("pw"));
    }

    #[test]
    fn origin_form_and_partial_lines_give_the_method_only() {
        assert_eq!(Detail::request_line(b"GET / HTTP/1.1\r\n\r\n").method.as_deref(), Some("GET"));
        assert_eq!(Detail::request_line(b"POST /a?b=1 HTTP/1.1").host, None);
        assert_eq!(Detail::request_line(b"DELETE ").method.as_deref(), Some("DELETE"));
        let long = Detail::request_line(&[b'A'; 100]);
        assert_eq!(long.method.map(|m| m.len()), Some(MAX_METHOD));
    }
}
