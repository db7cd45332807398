//! What interception can see: HTTP/1.1 exchanges, recorded as one log event each (method,
//! host, path, status, body bytes). This is the point of the comparison: a blind tunnel can
//! report none of it.
//!
//! Each direction has a framing parser that finds message heads (httparse) and skips bodies
//! by `Content-Length` or chunked encoding, so requests pair with responses in order. It never
//! changes or holds back a byte: it only reads copies of what the relay already forwarded.
//! Anything it cannot follow (a protocol upgrade, a malformed head) turns it off for the rest
//! of the tunnel instead of guessing.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tracing::info;

/// Largest head the observer buffers; a larger one stops observation (never forwarding).
const MAX_HEAD: usize = 64 * 1024;
/// Most requests waiting for their response; a client pipelining more stops observation
/// rather than growing memory.
const MAX_PENDING: usize = 256;

#[derive(Debug)]
struct Request {
    id: u64,
    method: String,
    host: String,
    path: String,
    body: u64,
}

#[derive(Debug, Default)]
struct Exchanges {
    pending: VecDeque<Request>,
    next_id: u64,
    observed: u64,
    off: bool,
    /// The client has begun a request head that is not complete yet.
    request_partial: bool,
}

/// The two directions' parsers share the queue of requests waiting for their response.
#[derive(Clone)]
pub struct Observer {
    shared: Arc<Mutex<Exchanges>>,
    target: Arc<str>,
    log_query: bool,
}

impl Observer {
    /// An observer for the tunnel to `target`.
    pub fn new(target: &str, log_query: bool) -> Observer {
        Observer { shared: Arc::new(Mutex::new(Exchanges::default())), target: Arc::from(target), log_query }
    }

    /// The parser for one direction (`requests`: client to origin). Each side keeps its own
    /// parse state; they meet only in the queue of requests awaiting a response, which is how
    /// a response is paired with its request.
    pub fn side(&self, requests: bool) -> Side {
        Side { observer: self.clone(), requests, phase: Phase::Head(Vec::new()), current: None }
    }

    /// Exchanges recorded so far.
    pub fn observed(&self) -> u64 {
        self.shared.lock().map(|s| s.observed).unwrap_or(0)
    }

    /// The tunnel ended: a response delimited by the close is complete now; requests still
    /// waiting are recorded without a status.
    pub fn finish(&self, down: &Side) {
        let Ok(mut ex) = self.shared.lock() else { return };
        if let Phase::Body(Body::Close, n) = down.phase {
            if let Some(req) = ex.pending.pop_front() {
                self.record(&mut ex, &req, down.current.map(|(s, _)| s), n);
            }
        }
        while let Some(req) = ex.pending.pop_front() {
            self.record(&mut ex, &req, None, 0);
        }
    }

    fn record(&self, ex: &mut Exchanges, req: &Request, status: Option<u16>, response_bytes: u64) {
        ex.observed += 1;
        // Method, Host and path come from the client: recorded as strings, never with `%`,
        // so the text format quotes and escapes them (JSON escapes by itself) and a value such
        // as `x status=999` cannot pass for fields of its own. The tunnel's target was parsed.
        info!(
            target: "veilgate::observed",
            tunnel = %self.target,
            method = req.method.as_str(),
            host = req.host.as_str(),
            path = req.path.as_str(),
            status = status,
            request_bytes = req.body,
            response_bytes,
            "http exchange"
        );
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading the hex size line; (size so far, digits seen, in an extension).
    Size(u64, bool, bool),
    /// The CR of the size line was seen.
    SizeLf(u64),
    /// Bytes of chunk data left.
    Data(u64),
    /// CRLF after data; how many of its bytes are left.
    DataEnd(u8),
    /// Trailer section; length of the current line.
    Trailer(usize),
    /// CR seen in the trailer; the line had this length.
    TrailerLf(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    Length(u64),
    Chunked(Chunk),
    Close,
}

#[derive(Debug)]
enum Phase {
    Head(Vec<u8>),
    /// A body being skipped, and the body bytes counted so far.
    Body(Body, u64),
    /// Not following this stream any more.
    Off,
}

/// One direction's parser.
pub struct Side {
    observer: Observer,
    requests: bool,
    phase: Phase,
    /// Responses: (status, request id) of the message in flight. Requests: (0, id).
    current: Option<(u16, u64)>,
}

impl Side {
    /// Reads a copy of forwarded bytes.
    pub fn feed(&mut self, mut input: &[u8]) {
        while !input.is_empty() {
            match &mut self.phase {
                Phase::Off => return,
                Phase::Head(buf) => {
                    // Take up to the end of the head, or all of the input.
                    let take = head_end(buf, input).unwrap_or(input.len());
                    if self.requests && buf.is_empty() && take > 0 {
                        if let Ok(mut ex) = self.observer.shared.lock() {
                            ex.request_partial = true;
                        }
                    }
                    buf.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    if buf.len() > MAX_HEAD {
                        self.turn_off();
                        return;
                    }
                    if buf.ends_with(b"\r\n\r\n") {
                        let head = std::mem::take(buf);
                        self.on_head(&head);
                    }
                }
                Phase::Body(body, count) => {
                    let used = step_body(body, input);
                    *count += used.counted;
                    input = &input[used.consumed..];
                    if used.done {
                        self.on_message_end();
                    }
                }
            }
        }
    }

    /// Whether the tunnel is between exchanges as far as this side and the shared queue
    /// know: this side's stream is at a message boundary, every request has had its whole
    /// response, no request head is half-sent, and observation is still following. A close
    /// here loses nothing, with or without TLS close_notify (RFC 9112 §9.8: a response
    /// complete by its length or its last chunk is complete); a close-delimited body or a
    /// stream observation gave up on is never settled, since there truncation cannot be told
    /// from the end.
    pub fn settled(&self) -> bool {
        if !matches!(&self.phase, Phase::Head(b) if b.is_empty()) {
            return false;
        }
        self.observer.shared.lock().is_ok_and(|ex| !ex.off && ex.pending.is_empty() && !ex.request_partial)
    }

    fn turn_off(&mut self) {
        self.phase = Phase::Off;
        if let Ok(mut ex) = self.observer.shared.lock() {
            ex.off = true;
        }
    }

    fn on_head(&mut self, head: &[u8]) {
        let mut headers = [httparse::EMPTY_HEADER; 100];
        if self.requests {
            let mut req = httparse::Request::new(&mut headers);
            let Ok(httparse::Status::Complete(_)) = req.parse(head) else { return self.turn_off() };
            let method = req.method.unwrap_or("").to_string();
            let mut path = req.path.unwrap_or("").to_string();
            if !self.observer.log_query {
                if let Some(q) = path.find('?') {
                    path.truncate(q);
                }
            }
            let host = header(req.headers, "host").unwrap_or_default();
            let body = match framing(req.headers) {
                Some(Body::Close | Body::Length(0)) | None => None,
                other => other,
            };
            let Ok(mut ex) = self.observer.shared.lock() else { return };
            ex.request_partial = false;
            if ex.off || ex.pending.len() >= MAX_PENDING {
                drop(ex);
                return self.turn_off();
            }
            let id = ex.next_id;
            ex.next_id += 1;
            ex.pending.push_back(Request { id, method, host, path, body: 0 });
            drop(ex);
            self.current = Some((0, id));
            match body {
                Some(b) => self.phase = Phase::Body(b, 0),
                None => self.on_message_end(),
            }
        } else {
            let mut resp = httparse::Response::new(&mut headers);
            let Ok(httparse::Status::Complete(_)) = resp.parse(head) else { return self.turn_off() };
            let status = resp.code.unwrap_or(0);
            let Ok(ex) = self.observer.shared.lock() else { return };
            let Some(req) = ex.pending.front() else {
                drop(ex);
                return self.turn_off();
            };
            let (id, head_request) = (req.id, req.method == "HEAD");
            drop(ex);
            self.current = Some((status, id));
            if status == 101 {
                // The connection now speaks another protocol: record and stop.
                self.phase = Phase::Body(Body::Close, 0);
                self.on_message_end();
                return self.turn_off();
            }
            if (100..200).contains(&status) {
                self.phase = Phase::Head(Vec::new());
                return;
            }
            // An empty body ends with its head; waiting for a byte that never comes would
            // record the last exchange of a tunnel without its status.
            let body = if head_request || status == 204 || status == 304 {
                None
            } else {
                Some(framing(resp.headers).unwrap_or(Body::Close)).filter(|b| *b != Body::Length(0))
            };
            match body {
                Some(b) => self.phase = Phase::Body(b, 0),
                None => {
                    self.phase = Phase::Body(Body::Length(0), 0);
                    self.on_message_end();
                }
            }
        }
    }

    fn on_message_end(&mut self) {
        let count = match self.phase {
            Phase::Body(_, n) => n,
            _ => 0,
        };
        self.phase = Phase::Head(Vec::new());
        let Some((status, id)) = self.current.take() else { return };
        let Ok(mut ex) = self.observer.shared.lock() else { return };
        if self.requests {
            if let Some(r) = ex.pending.iter_mut().rev().find(|r| r.id == id) {
                r.body = count;
            }
        } else if let Some(req) = ex.pending.pop_front() {
            self.observer.record(&mut ex, &req, Some(status), count);
        }
    }
}

/// Where the head ends within `input`, given what `buf` already holds.
fn head_end(buf: &[u8], input: &[u8]) -> Option<usize> {
    let keep = buf.len().min(3);
    let mut joined = Vec::with_capacity(keep + input.len().min(MAX_HEAD));
    joined.extend_from_slice(&buf[buf.len() - keep..]);
    joined.extend_from_slice(&input[..input.len().min(MAX_HEAD)]);
    joined.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4 - keep)
}

fn header(headers: &[httparse::Header<'_>], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
}

/// Body framing from the headers: chunked wins over a length (RFC 9112 §6.3).
fn framing(headers: &[httparse::Header<'_>]) -> Option<Body> {
    if header(headers, "transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        return Some(Body::Chunked(Chunk::Size(0, false, false)));
    }
    header(headers, "content-length").and_then(|v| v.parse().ok()).map(Body::Length)
}

struct Used {
    consumed: usize,
    counted: u64,
    done: bool,
}

fn step_body(body: &mut Body, input: &[u8]) -> Used {
    match body {
        Body::Close => Used { consumed: input.len(), counted: input.len() as u64, done: false },
        Body::Length(left) => {
            let n = (*left).min(input.len() as u64);
            *left -= n;
            Used { consumed: n as usize, counted: n, done: *left == 0 }
        }
        Body::Chunked(state) => {
            let mut i = 0;
            let mut counted = 0;
            while i < input.len() {
                let b = input[i];
                match *state {
                    Chunk::Size(n, digits, ext) => {
                        i += 1;
                        *state = match b {
                            b'\r' => Chunk::SizeLf(n),
                            _ if ext => Chunk::Size(n, digits, true),
                            b';' | b' ' | b'\t' => Chunk::Size(n, digits, true),
                            _ => match (b as char).to_digit(16) {
                                Some(d) if n < (1 << 56) => Chunk::Size(n * 16 + u64::from(d), true, false),
                                _ => return Used { consumed: input.len(), counted, done: true },
                            },
                        };
                    }
                    Chunk::SizeLf(n) => {
                        i += 1;
                        *state = if n == 0 { Chunk::Trailer(0) } else { Chunk::Data(n) };
                    }
                    Chunk::Data(left) => {
                        let n = left.min((input.len() - i) as u64);
                        i += n as usize;
                        counted += n;
                        *state = if left == n { Chunk::DataEnd(2) } else { Chunk::Data(left - n) };
                    }
                    Chunk::DataEnd(left) => {
                        i += 1;
                        *state = if left <= 1 { Chunk::Size(0, false, false) } else { Chunk::DataEnd(left - 1) };
                    }
                    Chunk::Trailer(len) => {
                        i += 1;
                        *state = if b == b'\r' { Chunk::TrailerLf(len) } else { Chunk::Trailer(len + 1) };
                    }
                    Chunk::TrailerLf(len) => {
                        i += 1;
                        if len == 0 {
                            return Used { consumed: i, counted, done: true };
                        }
                        *state = Chunk::Trailer(0);
                    }
                }
            }
            Used { consumed: i, counted, done: false }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(up: &[&[u8]], down: &[&[u8]]) -> Observer {
        let o = Observer::new("t:443", false);
        let mut u = o.side(true);
        let mut d = o.side(false);
        for c in up {
            u.feed(c);
        }
        for c in down {
            d.feed(c);
        }
        o.finish(&d);
        o
    }

    #[test]
    fn pipelined_requests_pair_with_responses_across_any_split() {
        let up = b"GET /a?secret=1 HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloHEAD /c HTTP/1.1\r\nHost: x\r\n\r\n";
        let down = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcHTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n4;x=y\r\nwxyz\r\n0\r\nT: v\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n";
        for split in [1, 2, 3, 7, 64] {
            let ups: Vec<&[u8]> = up.chunks(split).collect();
            let downs: Vec<&[u8]> = down.chunks(split).collect();
            let o = run(&ups, &downs);
            assert_eq!(o.observed(), 3, "split {split}");
            assert!(o.shared.lock().unwrap().pending.is_empty());
        }
    }

    #[test]
    fn a_response_ended_by_close_is_recorded_at_the_end() {
        let o = run(&[b"GET / HTTP/1.0\r\n\r\n"], &[b"HTTP/1.0 200 OK\r\n\r\nbody until close"]);
        assert_eq!(o.observed(), 1);
    }

    #[test]
    fn non_http_turns_observation_off() {
        let o = run(&[b"\x16\x03\x01 binary junk\r\n\r\n"], &[b"whatever"]);
        assert_eq!(o.observed(), 0);
    }

    #[test]
    fn an_empty_body_completes_the_exchange_at_its_head() {
        let o = Observer::new("t:443", false);
        let (mut u, mut d) = (o.side(true), o.side(false));
        u.feed(b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n");
        d.feed(b"HTTP/1.1 302 Found\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(o.observed(), 1, "recorded with its status, not at the tunnel's end without one");
    }

    #[test]
    fn settled_only_between_whole_exchanges() {
        let o = Observer::new("t:443", false);
        let (mut u, mut d) = (o.side(true), o.side(false));
        assert!(u.settled() && d.settled(), "nothing sent yet");
        u.feed(b"GET / HTTP/1.1\r\nHo");
        assert!(!d.settled(), "a request head half-sent");
        u.feed(b"st: h\r\n\r\n");
        assert!(!d.settled(), "a request awaiting its response");
        d.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel");
        assert!(!d.settled(), "inside a body");
        d.feed(b"lo");
        assert!(u.settled() && d.settled());
        u.feed(b"GET / HTTP/1.1\r\n\r\n");
        d.feed(b"HTTP/1.1 200 OK\r\n\r\nto the close");
        assert!(!d.settled(), "a close-delimited body cannot be told from a truncated one");
    }

    use crate::testlog::Capture;

    /// One exchange recorded through the binary's formatter (text or JSON, as main.rs sets it up).
    fn logged(json: bool, request: &[u8]) -> String {
        let out = Capture::default();
        let w = out.clone();
        let builder = tracing_subscriber::fmt().with_writer(move || w.clone()).with_target(false).with_ansi(false);
        let exchange = || {
            let o = run(&[request], &[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]);
            assert_eq!(o.observed(), 1, "the exchange was recorded");
        };
        if json {
            tracing::subscriber::with_default(builder.json().flatten_event(true).finish(), exchange);
        } else {
            tracing::subscriber::with_default(builder.finish(), exchange);
        }
        out.text()
    }

    /// The `key=value` fields of a text line as a reader (or a log shipper) splits them: at
    /// spaces outside double quotes, a backslash escaping the next character inside them.
    fn text_fields(line: &str) -> Vec<(String, String)> {
        let (mut fields, mut token, mut quoted, mut escaped) = (Vec::new(), String::new(), false, false);
        for c in line.trim_end().chars().chain([' ']) {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                ' ' if !quoted => {
                    if let Some((k, v)) = std::mem::take(&mut token).split_once('=') {
                        fields.push((k.to_string(), v.to_string()));
                    }
                    continue;
                }
                _ => {}
            }
            token.push(c);
        }
        fields
    }

    #[test]
    fn peer_controlled_values_cannot_forge_log_fields() {
        for host in [
            "x status=999 path=/forged",
            "x\" status=999 path=\"/forged",
            "x\\\" status=999 path=/forged",
            "x\tstatus=999\u{e9} method=PUT",
        ] {
            let request = format!("GET /real?status=999 HTTP/1.1\r\nHost: {host}\r\n\r\n");
            let text = logged(false, request.as_bytes());
            assert_eq!(text.lines().count(), 1, "{text}");
            let fields = text_fields(&text);
            let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(
                keys,
                ["tunnel", "method", "host", "path", "status", "request_bytes", "response_bytes"],
                "{text}"
            );
            let value = |k: &str| fields.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap();
            assert_eq!(value("status"), "200", "{text}");
            assert_eq!(value("host"), format!("{host:?}"), "quoted and escaped: {text}");
            assert_eq!(value("path"), "\"/real\"", "{text}");

            let json = logged(true, request.as_bytes());
            assert!(json.contains(",\"status\":200,"), "{json}");
            assert_eq!(json.matches("\"status\":").count(), 1, "{json}");
            let escaped = host.replace('\\', "\\\\").replace('"', "\\\"").replace('\t', "\\t");
            assert!(json.contains(&format!("\"host\":\"{escaped}\"")), "{json}");
        }
    }

    #[test]
    fn interim_responses_do_not_complete_the_exchange() {
        let o = run(
            &[b"PUT /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok"],
            &[b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"],
        );
        assert_eq!(o.observed(), 1);
    }
}
