//! The real binary's log under a flood of refusals: a bounded number of lines per reason and
//! second, a summary with the exact count of those left out, and a metric that counts all.

mod common;

use common::child::{Veilgate, exchange, series};
use common::eventually_blocking;
use std::time::Instant;

/// Refusals in the flood, and the binary's budget of lines per reason and second
/// (src/logthrottle.rs).
const FLOOD: usize = 2_000;
const PER_SECOND: usize = 10;

/// The refusal lines and the summaries' counts for `reason` in the log so far.
fn tally(log: &[String], reason: &str) -> (usize, Vec<u64>) {
    let field = format!("reason=\"{reason}\"");
    let mine = log.iter().filter(|l| l.contains(&field));
    let (mut lines, mut summaries) = (0, Vec::new());
    for l in mine {
        match l.split_once(" suppressed=") {
            Some((_, n)) => summaries.push(n.split_whitespace().next().unwrap().parse().unwrap()),
            None if l.contains("refused: ") => lines += 1,
            None => {}
        }
    }
    (lines, summaries)
}

#[test]
fn a_flood_of_refusals_is_a_few_log_lines_and_an_exact_summary() {
    let (mut vg, proxy, admin) = Veilgate::run_logged(None);
    let (log, reader) = vg.gather_log();

    // 2,000 requests that are not CONNECT, 16 at a time (under the head-phase bound per client).
    let started = Instant::now();
    let clients: Vec<_> = (0..16)
        .map(|_| {
            std::thread::spawn(move || {
                (0..FLOOD / 16)
                    .filter(|_| {
                        exchange(proxy, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                            .is_some_and(|r| r.starts_with("HTTP/1.1 405 "))
                    })
                    .count()
            })
        })
        .collect();
    let answered: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    let flood_took = started.elapsed();
    assert_eq!(answered, FLOOD, "every request got its 405");

    let scrape = || exchange(admin, b"GET /metrics HTTP/1.1\r\n\r\n").unwrap_or_default();
    // Counted once the proxy is done with the connection (it reads what follows a refusal
    // for a moment), so just after the client saw its 405.
    eventually_blocking(
        "all refusals counted",
        || series(&scrape(), "veilgate_refusals_total{reason=\"method_not_allowed\"}"),
        |n| *n == Some(FLOOD as f64),
    );
    // Every refusal is in the log, as a line or in a summary (the tick writes the last one).
    eventually_blocking(
        "the summary of the lines left out",
        || tally(&log.lock().unwrap(), "method_not_allowed"),
        |(lines, summaries)| lines + summaries.iter().sum::<u64>() as usize == FLOOD,
    );
    let (lines, summaries) = tally(&log.lock().unwrap(), "method_not_allowed");
    // The refusals were logged over at most the flood's time and a moment (the last client's
    // close), so they touched at most this many one-second windows of the throttle.
    let windows = flood_took.as_secs() as usize + 3;
    assert!(lines >= PER_SECOND && lines <= PER_SECOND * windows, "{lines} lines in {flood_took:?}");
    assert!(!summaries.is_empty() && summaries.len() <= windows + 1, "summaries {summaries:?}");
    assert_eq!(summaries.iter().sum::<u64>() as usize, FLOOD - lines, "the exact count left out");

    let _ = vg.0.kill();
    let _ = vg.0.wait();
    let _ = reader.join();
}
