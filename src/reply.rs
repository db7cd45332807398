//! Status lines veilgate writes to clients. Refusals close the connection; the only success
//! is `200 Connection Established`, written after the upstream is connected.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::Refusal;

/// The success reply, in the client's HTTP minor version.
pub fn established(minor_version: u8) -> &'static [u8] {
    if minor_version == 0 {
        b"HTTP/1.0 200 Connection Established\r\n\r\n"
    } else {
        b"HTTP/1.1 200 Connection Established\r\n\r\n"
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// Renders a refusal: status line, `Connection: close`, the headers its status calls for,
/// and a one-line text body saying why.
pub fn refusal(refusal: &Refusal, realm: Option<&str>) -> Vec<u8> {
    let status = refusal.status();
    let body = format!("{status} {}: {refusal}\n", reason_phrase(status));
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n",
        reason_phrase(status),
        body.len()
    );
    match refusal {
        Refusal::MethodNotAllowed => head.push_str("Allow: CONNECT\r\n"),
        Refusal::ClientRate { retry_after } | Refusal::AuthAttempts { retry_after } => {
            // Whole seconds, rounded up, never 0: "retry now" would only be refused again.
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            head.push_str(&format!("Retry-After: {}\r\n", secs.max(1)));
        }
        Refusal::AuthRequired | Refusal::AuthSessionParam => {
            head.push_str(&format!("Proxy-Authenticate: Basic realm=\"{}\"\r\n", realm.unwrap_or("veilgate")));
        }
        _ => {}
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// Most bytes read and discarded after a refusal, and for how long.
const LINGER_BYTES: usize = 64 * 1024;
const LINGER: std::time::Duration = std::time::Duration::from_millis(500);

/// Writes a refusal and closes our write side; errors are ignored because the client may
/// already be gone and there is nobody left to tell. Then reads (and drops) what the client
/// is still sending for a moment: closing a socket with unread input sends a reset, which
/// can destroy the refusal before the client reads it (a POST body after a 405, say).
pub async fn send_refusal<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, r: &Refusal, realm: Option<&str>) {
    let bytes = refusal(r, realm);
    if s.write_all(&bytes).await.is_err() || s.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 1024];
    let mut left = LINGER_BYTES;
    let _ = tokio::time::timeout(LINGER, async {
        while left > 0 {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn retry_after_rounds_up() {
        let text = String::from_utf8(refusal(&Refusal::ClientRate { retry_after: Duration::from_millis(1200) }, None))
            .unwrap();
        assert!(text.starts_with("HTTP/1.1 429 Too Many Requests\r\n"));
        assert!(text.contains("Retry-After: 2\r\n"));
        let text =
            String::from_utf8(refusal(&Refusal::ClientRate { retry_after: Duration::from_millis(5) }, None)).unwrap();
        assert!(text.contains("Retry-After: 1\r\n"));
    }

    #[test]
    fn method_refusal_names_connect() {
        let text = String::from_utf8(refusal(&Refusal::MethodNotAllowed, None)).unwrap();
        assert!(text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
        assert!(text.contains("Allow: CONNECT\r\n"));
        assert!(text.contains("Connection: close\r\n"));
    }
}
