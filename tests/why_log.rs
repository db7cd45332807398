//! The real binary's log says why: a 502's line carries the kernel's cause, and a 405's line
//! the method and the absolute-form destination, never its query string.

mod common;

use common::child::{Veilgate, exchange, free_port};
use common::eventually_blocking;

#[test]
fn a_502_says_the_cause_and_a_405_says_method_and_host_without_the_query() {
    // A loopback port nobody listens on: bound, then released.
    let closed = free_port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("veilgate.toml");
    std::fs::write(&file, format!("[policy]\ndeny_private = false\nallowed_ports = [{closed}]\n")).unwrap();
    let (mut vg, proxy, _admin) = Veilgate::run_logged(Some(&file));
    let (log, reader) = vg.gather_log();

    let reply = exchange(proxy, format!("CONNECT 127.0.0.1:{closed} HTTP/1.1\r\n\r\n").as_bytes()).unwrap();
    assert!(reply.starts_with("HTTP/1.1 502 "), "{reply}");
    let line = eventually_blocking(
        "the 502's line",
        || log.lock().unwrap().iter().find(|l| l.contains("reason=\"upstream_failed\"")).cloned(),
        Option::is_some,
    )
    .unwrap();
    assert!(line.contains("cause=\"connection refused\""), "{line}");

    let reply = exchange(proxy, b"GET http://a.invalid/x?secret=1 HTTP/1.1\r\nHost: a.invalid\r\n\r\n").unwrap();
    assert!(reply.starts_with("HTTP/1.1 405 "), "{reply}");
    let line = eventually_blocking(
        "the 405's line",
        || log.lock().unwrap().iter().find(|l| l.contains("reason=\"method_not_allowed\"")).cloned(),
        Option::is_some,
    )
    .unwrap();
    assert!(line.contains("method=\"GET\""), "{line}");
    assert!(line.contains("scheme=\"http\""), "{line}");
    assert!(line.contains("host=\"a.invalid\""), "{line}");
    assert!(!line.contains("secret"), "{line}");

    let _ = vg.0.kill();
    let _ = vg.0.wait();
    let _ = reader.join();
}
