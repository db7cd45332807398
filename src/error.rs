//! Why a tunnel was refused. Each refusal has one HTTP status, one metric label and one
//! short text; the table in README.md ("Answers on the wire") is this file in prose.

use std::time::Duration;

/// A request veilgate answers with an error status instead of a tunnel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Malformed request line, headers or target (400).
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    /// Any method but CONNECT (405).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// Proxy authentication missing or wrong (407).
    #[error("proxy authentication required")]
    AuthRequired,
    /// Too many authentication attempts that need a hash from this address (429 with
    /// Retry-After); no hash was computed.
    #[error("too many authentication attempts from this address")]
    AuthAttempts {
        /// When the next attempt will be counted.
        retry_after: Duration,
    },
    /// No credential-verification slot came free in time (503): says nothing about the password.
    #[error("too busy to verify credentials")]
    AuthBusy,
    /// The head did not arrive within `header_timeout` (408).
    #[error("request head timed out")]
    HeaderTimeout,
    /// The head is larger than `max_header_bytes` or has too many headers (431).
    #[error("request head too large")]
    HeaderTooLarge,
    /// Port not in `allowed_ports` (403).
    #[error("port not allowed")]
    PortDenied,
    /// Host matched `deny_hosts`, or missed a non-empty `allow_hosts` (403).
    #[error("host not allowed")]
    HostDenied,
    /// Address private, denied by CIDR, or one of the proxy's own (403).
    #[error("address not allowed")]
    AddressDenied,
    /// A route with `mode = "deny"` (403).
    #[error("route denies this destination")]
    RouteDenied,
    /// Per-client concurrent tunnel cap (429).
    #[error("too many tunnels for this client")]
    ClientCap,
    /// A route's per-client tunnel cap (429).
    #[error("too many tunnels for this client on this route")]
    RouteCap,
    /// Per-client new-tunnel rate (429 with Retry-After).
    #[error("new tunnels arriving too fast for this client")]
    ClientRate {
        /// When the client may try again.
        retry_after: Duration,
    },
    /// Global tunnel cap (503).
    #[error("proxy at its tunnel capacity")]
    GlobalCap,
    /// `server.max_pending` connections are in their head phase already (503).
    #[error("proxy at its capacity for unfinished requests")]
    PendingCap,
    /// This client holds too many unfinished heads: its share of `max_pending` at accept, or
    /// `max_pending_per_client` heads past `head_grace` (429).
    #[error("too many unfinished requests from this client")]
    ClientPendingCap,
    /// The name does not resolve, or the lookup failed (502).
    #[error("name does not resolve")]
    DnsFailed,
    /// Upstream refused or unreachable (502).
    #[error("upstream connection failed")]
    UpstreamFailed,
    /// Upstream connect did not finish within `connect_timeout` (504).
    #[error("upstream connection timed out")]
    UpstreamTimeout,
    /// The parent proxy could not be reached, failed its handshake or refused our
    /// credentials (502); the log line's cause says which.
    #[error("parent proxy failed")]
    ParentFailed,
    /// Every parent proxy the route may use is marked down (502).
    #[error("every parent proxy of this route is down")]
    ParentsDown,
    /// A TLS handshake arrived on a plaintext listener (400, which the client's TLS stack
    /// reports as a protocol error): the client was set up for an HTTPS proxy.
    #[error("TLS handshake on the plaintext listener; an HTTPS proxy client needs server.tls_listen")]
    TlsOnPlaintext,
    /// Plaintext arrived on a TLS listener (400, in plaintext, so the client can read it).
    #[error("plaintext request on the TLS listener; use an HTTPS proxy URL (https://) for this port")]
    PlaintextOnTls,
    /// `auth.require_tls`: a plaintext listener never asks for or takes credentials (403).
    #[error("credentials are accepted only on the TLS listener (auth.require_tls)")]
    TlsRequired,
    /// The cluster backend's Redis did not answer and `cluster.fail_mode = "closed"` (503).
    #[error("cluster limits unavailable")]
    ClusterUnavailable,
    /// A user name with an egress parameter `[auth.sessions]` does not know, or one
    /// malformed (407): refused, never ignored, and before any password is checked.
    #[error("unknown or malformed parameter in the user name")]
    AuthSessionParam,
    /// The egress pool has no source address of the target's family and its
    /// `family_fallback` is `refuse` (502).
    #[error("egress pool has no source address of the target's family")]
    EgressFamily,
}

/// A connection closed with no answer at all. Its peer is a balancer speaking the PROXY
/// protocol for a client, not the client: an HTTP status would be one more byte stream the
/// balancer did not expect, and the specification says to abort (proxy-protocol.txt §2.1).
/// Counted under `refusals_total{reason}` like a [`Refusal`], but with no status, so no
/// front can be asked to answer one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unanswered {
    /// The peer is not in `server.proxy_protocol_from`.
    #[error("PROXY protocol required, and the peer is not a trusted balancer")]
    ProxyProtocolUntrusted,
    /// The connection did not start with a PROXY protocol signature.
    #[error("PROXY protocol header missing")]
    ProxyProtocolMissing,
    /// A PROXY protocol header that breaks the specification.
    #[error("PROXY protocol header malformed")]
    ProxyProtocolMalformed,
    /// No complete PROXY protocol header within `header_timeout`.
    #[error("PROXY protocol header timed out")]
    ProxyProtocolTimeout,
    /// The TLS handshake on a TLS listener failed or did not finish within `header_timeout`:
    /// there is no session to answer in.
    #[error("TLS handshake with the client failed")]
    TlsHandshake,
}

impl Unanswered {
    /// Metric label (`refusals_total{reason}`) and log field; one of [`Refusal::REASONS`].
    pub fn reason(self) -> &'static str {
        match self {
            Unanswered::ProxyProtocolUntrusted => "proxy_protocol_untrusted",
            Unanswered::ProxyProtocolMissing => "proxy_protocol_missing",
            Unanswered::ProxyProtocolMalformed => "proxy_protocol_malformed",
            Unanswered::ProxyProtocolTimeout => "proxy_protocol_timeout",
            Unanswered::TlsHandshake => "tls_handshake_failed",
        }
    }
}

impl Refusal {
    /// Every `refusals_total` label, so counters can be registered (at zero) before the
    /// first refusal: the answered refusals', then the [`Unanswered`] closes'.
    pub const REASONS: [&'static str; 33] = [
        "bad_request",
        "method_not_allowed",
        "auth_required",
        "auth_attempts",
        "auth_busy",
        "header_timeout",
        "header_too_large",
        "port_denied",
        "host_denied",
        "address_denied",
        "route_denied",
        "client_cap",
        "route_cap",
        "client_rate",
        "global_cap",
        "pending_cap",
        "client_pending_cap",
        "dns_failed",
        "upstream_failed",
        "upstream_timeout",
        "tls_on_plaintext",
        "plaintext_on_tls",
        "tls_required",
        "cluster_unavailable",
        "parent_failed",
        "parents_down",
        "auth_session_param",
        "egress_family",
        "proxy_protocol_untrusted",
        "proxy_protocol_missing",
        "proxy_protocol_malformed",
        "proxy_protocol_timeout",
        "tls_handshake_failed",
    ];

    /// HTTP status code.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::BadRequest(_) | Refusal::TlsOnPlaintext | Refusal::PlaintextOnTls => 400,
            Refusal::TlsRequired => 403,
            Refusal::MethodNotAllowed => 405,
            Refusal::AuthRequired | Refusal::AuthSessionParam => 407,
            Refusal::AuthAttempts { .. } => 429,
            Refusal::AuthBusy => 503,
            Refusal::HeaderTimeout => 408,
            Refusal::HeaderTooLarge => 431,
            Refusal::PortDenied | Refusal::HostDenied | Refusal::AddressDenied | Refusal::RouteDenied => 403,
            Refusal::ClientCap | Refusal::RouteCap | Refusal::ClientRate { .. } | Refusal::ClientPendingCap => 429,
            Refusal::GlobalCap | Refusal::PendingCap | Refusal::ClusterUnavailable => 503,
            Refusal::DnsFailed
            | Refusal::UpstreamFailed
            | Refusal::ParentFailed
            | Refusal::ParentsDown
            | Refusal::EgressFamily => 502,
            Refusal::UpstreamTimeout => 504,
        }
    }

    /// Metric label (`refusals_total{reason}`) and log field; one of [`Refusal::REASONS`].
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::BadRequest(_) => "bad_request",
            Refusal::MethodNotAllowed => "method_not_allowed",
            Refusal::AuthRequired => "auth_required",
            Refusal::AuthAttempts { .. } => "auth_attempts",
            Refusal::AuthBusy => "auth_busy",
            Refusal::HeaderTimeout => "header_timeout",
            Refusal::HeaderTooLarge => "header_too_large",
            Refusal::PortDenied => "port_denied",
            Refusal::HostDenied => "host_denied",
            Refusal::AddressDenied => "address_denied",
            Refusal::RouteDenied => "route_denied",
            Refusal::ClientCap => "client_cap",
            Refusal::RouteCap => "route_cap",
            Refusal::ClientRate { .. } => "client_rate",
            Refusal::GlobalCap => "global_cap",
            Refusal::PendingCap => "pending_cap",
            Refusal::ClientPendingCap => "client_pending_cap",
            Refusal::DnsFailed => "dns_failed",
            Refusal::UpstreamFailed => "upstream_failed",
            Refusal::UpstreamTimeout => "upstream_timeout",
            Refusal::TlsOnPlaintext => "tls_on_plaintext",
            Refusal::PlaintextOnTls => "plaintext_on_tls",
            Refusal::TlsRequired => "tls_required",
            Refusal::ClusterUnavailable => "cluster_unavailable",
            Refusal::ParentFailed => "parent_failed",
            Refusal::ParentsDown => "parents_down",
            Refusal::AuthSessionParam => "auth_session_param",
            Refusal::EgressFamily => "egress_family",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_listed() {
        let all = [
            Refusal::BadRequest("x"),
            Refusal::MethodNotAllowed,
            Refusal::AuthRequired,
            Refusal::AuthAttempts { retry_after: Duration::from_secs(1) },
            Refusal::AuthBusy,
            Refusal::HeaderTimeout,
            Refusal::HeaderTooLarge,
            Refusal::PortDenied,
            Refusal::HostDenied,
            Refusal::AddressDenied,
            Refusal::RouteDenied,
            Refusal::ClientCap,
            Refusal::RouteCap,
            Refusal::ClientRate { retry_after: Duration::from_secs(1) },
            Refusal::GlobalCap,
            Refusal::PendingCap,
            Refusal::ClientPendingCap,
            Refusal::DnsFailed,
            Refusal::UpstreamFailed,
            Refusal::UpstreamTimeout,
            Refusal::TlsOnPlaintext,
            Refusal::PlaintextOnTls,
            Refusal::TlsRequired,
            Refusal::ClusterUnavailable,
            Refusal::ParentFailed,
            Refusal::ParentsDown,
            Refusal::AuthSessionParam,
            Refusal::EgressFamily,
        ];
        let unanswered = [
            Unanswered::ProxyProtocolUntrusted,
            Unanswered::ProxyProtocolMissing,
            Unanswered::ProxyProtocolMalformed,
            Unanswered::ProxyProtocolTimeout,
            Unanswered::TlsHandshake,
        ];
        let mut labels: Vec<_> = all.iter().map(Refusal::reason).collect();
        labels.extend(unanswered.iter().map(|u| u.reason()));
        assert_eq!(labels, Refusal::REASONS);
    }
}
