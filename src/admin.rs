//! The admin listener: `GET /healthz` (alive), `GET /readyz` (accepting; 503 while draining),
//! `GET /metrics` (Prometheus text), and with their sections on `/clients`, `/tunnels` and
//! `/proxy.pac`; `HEAD` for each. A deliberately tiny HTTP/1.1 server:
//! one request per connection, a bounded head and deadlines, and a bound on connections held,
//! so a scraper, a probe or a flood can never pin it, nor take the descriptors the proxy
//! listener needs (the process has one descriptor table for both).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::limits::ClientKey;

const MAX_HEAD: usize = 4096;
/// Admin connections held at once, all clients together. Scrapers and probes make a handful
/// of short requests, so 64 is ample for them and nothing next to the proxy's descriptors.
const MAX_CONNECTIONS: u32 = 64;
/// The same per client (an IPv4 address or an IPv6 prefix, as every limit keys clients), so
/// one flooding address cannot take the global bound from the monitoring system.
const MAX_PER_CLIENT: u32 = 8;
/// The request head must arrive within this. A scraper sends its head at once; a connection
/// that has not is idle and holds a slot, so it is closed early.
const HEAD_DEADLINE: Duration = Duration::from_secs(2);
/// The whole exchange, head and answer (a slow reader of a large exposition included).
const DEADLINE: Duration = Duration::from_secs(5);
/// Written (without waiting) to a connection over a bound before it is closed.
const BUSY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: close\r\n\r\nbusy\n";

/// Serves the admin listener until `stop` fires.
pub async fn serve(listener: TcpListener, ctx: Arc<Context>, stop: CancellationToken) {
    let held = Arc::new(Held::default());
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                match held.enter(ctx.shared().client_key(peer.ip())) {
                    Some(slot) => {
                        let ctx = Arc::clone(&ctx);
                        tokio::spawn(async move {
                            let _ = tokio::time::timeout(DEADLINE, answer(stream, &ctx)).await;
                            drop(slot);
                        });
                    }
                    None => {
                        // Accepted and closed at once, so the kernel's backlog never fills
                        // with connections nobody will serve. Counted, not logged: a log line
                        // per connection would amplify the flood.
                        let _ = stream.try_write(BUSY);
                        ctx.metrics.admin.refused.increment(1);
                    }
                }
            }
            Err(e) if crate::server::is_per_connection(&e) => {}
            Err(e) => {
                // As on the proxy listener: the process is short of descriptors or buffers.
                ctx.metrics.listeners.accept_errors.increment(1);
                tracing::warn!(error = %e, backoff = ?backoff, "admin accept failed; backing off");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Admin connections held now, in all and per client. A mutex is enough: the admin listener
/// takes it twice per connection, and a connection over a bound never gets further.
#[derive(Default)]
struct Held {
    counts: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    total: u32,
    per_client: HashMap<ClientKey, u32>,
}

/// One held admin connection; dropping it frees the slot.
struct Slot {
    held: Arc<Held>,
    key: ClientKey,
}

impl Held {
    fn enter(self: &Arc<Self>, key: ClientKey) -> Option<Slot> {
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = c.per_client.get(&key).copied().unwrap_or(0);
        if c.total >= MAX_CONNECTIONS || mine >= MAX_PER_CLIENT {
            return None;
        }
        c.total += 1;
        c.per_client.insert(key.clone(), mine + 1);
        Some(Slot { held: Arc::clone(self), key })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.held.counts.lock().unwrap_or_else(PoisonError::into_inner);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_client.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_client.remove(&self.key);
            }
        }
    }
}

/// Reads the request head (within [`HEAD_DEADLINE`]): `None` when the client closed, sent
/// nothing in time, or sent a head too large or malformed (`Some(Err(()))`).
async fn read_request(stream: &mut TcpStream) -> Option<Result<(String, String), ()>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    let read = async {
        loop {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(_)) => {
                    let method = req.method.unwrap_or("").to_string();
                    return Some(Ok((method, req.path.unwrap_or("").to_string())));
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
                _ => return Some(Err(())),
            }
        }
    };
    tokio::time::timeout(HEAD_DEADLINE, read).await.ok().flatten()
}

async fn answer(mut stream: TcpStream, ctx: &Context) -> std::io::Result<()> {
    let (method, path) = match read_request(&mut stream).await {
        None => return Ok(()),
        Some(Err(())) => return respond(&mut stream, 400, "text/plain", "bad request\n", false).await,
        Some(Ok(req)) => req,
    };
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return respond(&mut stream, 405, "text/plain", "only GET\n", false).await;
    }
    let (path, query) = path.split_once('?').unwrap_or((path.as_str(), ""));
    let s = &mut stream;
    match path {
        "/healthz" => respond(s, 200, "text/plain", "ok\n", head_only).await,
        "/readyz" if ctx.unready.is_cancelled() || ctx.draining.is_cancelled() => {
            respond(s, 503, "text/plain", "draining\n", head_only).await
        }
        // A balancer should send no one to an instance that would refuse every tunnel.
        "/readyz" if ctx.governor.cluster().is_some_and(|c| c.refuses_all()) => {
            respond(s, 503, "text/plain", "cluster limits unavailable\n", head_only).await
        }
        "/readyz" => respond(s, 200, "text/plain", "ready\n", head_only).await,
        "/metrics" => {
            let (clients, rate) = ctx.governor.local().tracked_keys();
            ctx.metrics.limiter_keys(clients, rate);
            ctx.metrics.auth_attempt_keys(ctx.governor.local().auth_attempt_keys());
            let body = ctx.metrics.render();
            respond(s, 200, "text/plain; version=0.0.4; charset=utf-8", &body, head_only).await
        }
        "/clients" | "/tunnels" => {
            let shared = ctx.shared();
            if !shared.config.admin.inspect {
                return respond(s, 404, "text/plain", "inspection is off (admin.inspect)\n", head_only).await;
            }
            let (offset, limit) = crate::inspect::page(query);
            let body = if path == "/clients" {
                serde_json::to_string(&ctx.inspect.clients(&shared.config, offset, limit))
            } else {
                serde_json::to_string(&ctx.inspect.tunnels(&shared.config, offset, limit))
            };
            let body = body.unwrap_or_else(|_| "{}".into()) + "\n";
            respond(s, 200, "application/json", &body, head_only).await
        }
        "/proxy.pac" => match crate::pac::render(&ctx.shared().config.pac, &ctx.tls_listeners) {
            Some(body) => respond(s, 200, crate::pac::CONTENT_TYPE, &body, head_only).await,
            None => respond(s, 404, "text/plain", "no PAC file (pac.enabled)\n", head_only).await,
        },
        _ => respond(s, 404, "text/plain", "not found\n", head_only).await,
    }
}

/// Writes the answer. `head_only` (a HEAD request): the same head, with the length the body
/// would have (RFC 9110 §9.3.2), and no body.
async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if !head_only {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_per_client_and_in_all_and_slots_come_back() {
        let held = Arc::new(Held::default());
        let key = |i: u32| ClientKey::V4(std::net::Ipv4Addr::from(0x7f00_0000 + i));
        let mut slots: Vec<Slot> = (0..MAX_PER_CLIENT).map(|_| held.enter(key(1)).unwrap()).collect();
        assert!(held.enter(key(1)).is_none(), "per client");
        for i in 2.. {
            match held.enter(key(i)) {
                Some(s) => slots.push(s),
                None => break,
            }
        }
        assert_eq!(slots.len(), MAX_CONNECTIONS as usize, "in all");
        slots.clear();
        let c = held.counts.lock().unwrap();
        assert_eq!((c.total, c.per_client.len()), (0, 0), "nothing held, nobody remembered");
    }
}
