//! Health checks: every `health_check` interval, a TCP connect and the protocol's greeting
//! (SOCKS5 method negotiation and credentials; the TLS handshake for `https://`; the connect
//! alone for `http://`, whose only request is a CONNECT), bounded by `connect_timeout`. A
//! check that fails marks the parent down, one that passes brings it back. The first check
//! runs at once, so a parent that is down at start-up is known before a tunnel tries it.

use std::sync::Arc;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::{Credentials, Upstream, socks5};
use crate::config::ParentScheme;
use crate::dial::{Cause, DialError, DialErrorKind, Hop};

/// Checks `up` until `stop` is cancelled (the snapshot was replaced or dropped).
pub(super) async fn watch(up: Arc<Upstream>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(up.health_every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = probe(&up) => r,
        };
        match result {
            Ok(()) => up.mark_up(),
            Err(e) => up.mark_down(&e),
        }
    }
}

/// One check, within the parent's `connect_timeout`.
async fn probe(up: &Upstream) -> Result<(), DialError> {
    let check = async {
        let (mut tcp, _) = up.connect_tcp().await?;
        match up.url.scheme {
            ParentScheme::Socks5 | ParentScheme::Socks5h => {
                // With isolate_by_client, a username of the check's own (no client's).
                let probe_auth = up
                    .isolate
                    .then(|| Credentials { user: "vg-health".into(), password: "veilgate".into() })
                    .or_else(|| up.auth.clone());
                socks5::greet(&mut tcp, probe_auth.as_ref()).await
            }
            ParentScheme::Http => Ok(()),
            ParentScheme::Https => up.tls_handshake(tcp).await.map(drop),
        }
    };
    tokio::time::timeout(up.probe_timeout, check).await.unwrap_or(Err(DialError {
        hop: Hop::Parent,
        kind: DialErrorKind::Timeout,
        cause: Cause::Deadline,
    }))
}
