//! Running out of file descriptors must not kill a listener: accept backs off, and serving
//! resumes as soon as descriptors are free. This file is its own test process, so lowering
//! RLIMIT_NOFILE here touches no other test.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test]
async fn accept_survives_descriptor_exhaustion() {
    let origin = Origin::echo().await;
    let proxy = TestProxy::start(&loopback_policy(&[origin.port()])).await;
    // Use up the descriptor table: with the limit just above what is open now, client
    // sockets (in this process) and the proxy's accepted sockets compete for the rest.
    let open_now = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(64);
    set_nofile(open_now + 24);
    let mut hogs = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        hogs.push(f);
    }
    // Free one descriptor for a client socket: its connect completes in the kernel's
    // backlog, and the proxy's accept of it fails with EMFILE while the table is full.
    hogs.pop();
    let stuck = tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect(proxy.addr)).await;
    // Read in-process: a scrape would need a descriptor, and there is none.
    eventually(
        "the listener to hit EMFILE",
        async || metric_value(&proxy.controller.render_metrics(), "veilgate_accept_errors_total"),
        |errors| errors.is_some_and(|n| n >= 1.0),
    )
    .await;
    // Give the descriptors back; the listener must still be alive and serve a new tunnel.
    drop(hogs);
    drop(stuck);
    set_nofile(4096);
    still_serves(&proxy, &origin).await;
    assert!(proxy.metric("veilgate_accept_errors_total").await >= 1.0, "the listener did hit EMFILE and backed off");
}
