//! The admin listener: `GET /healthz` (alive), `GET /readyz` (accepting; 503 while draining)
//! and `GET /metrics` (Prometheus text). A deliberately tiny HTTP/1.1 server: one request per
//! connection, a bounded head and a deadline, so a scraper or a probe can never pin it.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::context::Context;

const MAX_HEAD: usize = 4096;
const DEADLINE: Duration = Duration::from_secs(5);

/// Serves the admin listener until `stop` fires.
pub async fn serve(listener: TcpListener, ctx: Arc<Context>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.cancelled() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let ctx = Arc::clone(&ctx);
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(DEADLINE, answer(stream, &ctx)).await;
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, ctx: &Context) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    let (method, path) = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                break (req.method.unwrap_or("").to_string(), req.path.unwrap_or("").to_string());
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => continue,
            _ => return respond(&mut stream, 400, "text/plain", "bad request\n").await,
        }
    };
    if method != "GET" && method != "HEAD" {
        return respond(&mut stream, 405, "text/plain", "only GET\n").await;
    }
    let path = path.split('?').next().unwrap_or("");
    match path {
        "/healthz" => respond(&mut stream, 200, "text/plain", "ok\n").await,
        "/readyz" if ctx.draining.is_cancelled() => respond(&mut stream, 503, "text/plain", "draining\n").await,
        "/readyz" => respond(&mut stream, 200, "text/plain", "ready\n").await,
        "/metrics" => {
            let (clients, rate) = ctx.governor.tracked_keys();
            ctx.metrics.limiter_keys(clients, rate);
            ctx.metrics.auth_attempt_keys(ctx.governor.auth_attempt_keys());
            let body = ctx.metrics.render();
            respond(&mut stream, 200, "text/plain; version=0.0.4; charset=utf-8", &body).await
        }
        _ => respond(&mut stream, 404, "text/plain", "not found\n").await,
    }
}

async fn respond(stream: &mut TcpStream, status: u16, content_type: &str, body: &str) -> std::io::Result<()> {
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
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
