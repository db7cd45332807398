//! The veilgate binary as a child process, for tests of what only the whole program shows
//! (exit codes, signals, its log). Waits on it use [`super::eventually_blocking`].

use std::process::Child;

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
