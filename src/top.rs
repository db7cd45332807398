//! `veilgate top`: the admin listener's live view (`GET /clients`, `admin.inspect`) redrawn
//! in the terminal, fastest clients first. Plain redraws rather than a TUI: the view is one
//! table, and plain output also pipes into a file or a test.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why the view could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    /// Not `http://HOST:PORT`.
    #[error("--admin must be http://HOST:PORT, got {0:?}")]
    Url(String),
    /// The admin listener could not be reached or answered badly.
    #[error("admin listener: {0}")]
    Io(#[from] std::io::Error),
    /// An answer other than 200.
    #[error("admin listener answered: {0}")]
    Status(String),
    /// The body was not the JSON expected.
    #[error("admin listener sent something that is not the /clients JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Longest a fetch may take.
const FETCH_DEADLINE: Duration = Duration::from_secs(5);
/// Largest answer read.
const MAX_BODY: usize = 4 << 20;

/// `GET path` from the admin listener at `admin` (`http://HOST:PORT`); the body.
pub async fn fetch(admin: &str, path: &str) -> Result<String, TopError> {
    let hostport = admin
        .strip_prefix("http://")
        .map(|r| r.trim_end_matches('/'))
        .filter(|r| !r.is_empty() && !r.contains('/'))
        .ok_or_else(|| TopError::Url(admin.to_string()))?;
    let get = async {
        let mut s = TcpStream::connect(hostport).await?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
        let mut buf = Vec::new();
        (&mut s).take(MAX_BODY as u64).read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(FETCH_DEADLINE, get)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 5 s"))??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("");
    if !status.starts_with("HTTP/1.1 200") {
        return Err(TopError::Status(format!("{status}: {}", body.trim())));
    }
    Ok(body.to_string())
}

/// The table for a `/clients` answer.
pub fn render(clients: &str) -> Result<String, TopError> {
    let v: Value = serde_json::from_str(clients)?;
    let rows = v["clients"].as_array().cloned().unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(out, "veilgate top: {} client(s), fastest first", v["total"].as_u64().unwrap_or(0));
    let _ = writeln!(
        out,
        "{:<28} {:>7} {:>11} {:>11} {:>11} {:>11} {:>8} {:>11}",
        "CLIENT", "TUNNELS", "DOWN/s", "UP/s", "DOWN", "UP", "REFUSED", "LIMIT DOWN"
    );
    for r in rows {
        let who = r["user"]
            .as_str()
            .map(|u| format!("user {u}"))
            .or_else(|| r["client"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("id {}", r["id"].as_str().unwrap_or("?")));
        let n = |k: &str| r[k].as_u64().unwrap_or(0);
        let limit = r["limits"]["bandwidth_down"].as_u64().map_or_else(|| "-".to_string(), bytes);
        let _ = writeln!(
            out,
            "{:<28} {:>7} {:>11} {:>11} {:>11} {:>11} {:>8} {:>11}",
            clip(&who, 28),
            n("tunnels"),
            bytes(n("rate_down")),
            bytes(n("rate_up")),
            bytes(n("bytes_down")),
            bytes(n("bytes_up")),
            n("refusals"),
            limit
        );
    }
    Ok(out)
}

fn clip(s: &str, width: usize) -> String {
    if s.chars().count() <= width { s.to_string() } else { s.chars().take(width - 1).collect::<String>() + "…" }
}

/// Bytes in binary units, three significant digits.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_renders_fastest_first_with_privacy_kept() {
        let json = r#"{"total":2,"offset":0,"clients":[
            {"id":"0a1b2c3d4e5f","user":null,"client":null,"tunnels":2,"bytes_up":10,"bytes_down":3145728,
             "rate_up":0,"rate_down":1048576,"refusals":1,"limits":{"max_tunnels":4,"new_tunnels_per_second":null,"bandwidth_up":null,"bandwidth_down":1048576}},
            {"id":"ffffffffffff","user":"alice","client":null,"tunnels":1,"bytes_up":0,"bytes_down":0,
             "rate_up":0,"rate_down":0,"refusals":0,"limits":{"max_tunnels":4,"new_tunnels_per_second":null,"bandwidth_up":null,"bandwidth_down":null}}]}"#;
        let out = render(json).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].contains("2 client(s)"));
        assert!(lines[2].starts_with("id 0a1b2c3d4e5f"), "{out}");
        assert!(lines[2].contains("1.0 MiB") && lines[2].contains("3.0 MiB"), "{out}");
        assert!(lines[3].starts_with("user alice"), "{out}");
        assert_eq!(bytes(1023), "1023 B");
        assert!(matches!(render("not json"), Err(TopError::Json(_))));
    }
}
