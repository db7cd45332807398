//! The veilgate binary as a child process, for tests of what only the whole program shows
//! (exit codes, signals, its log).

use std::process::Child;
use std::time::{Duration, Instant};

/// Polls `f` every 20 ms until it holds, for at most 10 s.
pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let started = Instant::now();
    while !f() {
        assert!(started.elapsed() < Duration::from_secs(10), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One series' value in a Prometheus scrape, by its name with labels as rendered.
pub fn series(scrape: &str, name: &str) -> Option<f64> {
    scrape.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

/// A running veilgate, killed and reaped when dropped.
pub struct Veilgate(pub Child);

impl Drop for Veilgate {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
