//! Bounded waits. A test never sleeps to wait for a state: it looks at the state until it
//! holds, within a deadline, and a failure names what it waited for and what it saw last.
//! One scheme for both worlds: [`eventually`] in async tests (the proxy in-process),
//! [`eventually_blocking`] in sync ones (the binary as a child process).

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

/// Upper bound for any single step of a test, and for every wait.
pub const STEP: Duration = Duration::from_secs(10);

/// How often a wait looks again: short next to the states tests wait for (a task ending, a
/// counter moving), long enough that looking costs the proxy nothing measurable.
pub const POLL: Duration = Duration::from_millis(10);

/// Awaits `f` for at most [`STEP`].
pub async fn bounded<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, f).await.expect("test step timed out")
}

/// Looks at `observe` every [`POLL`] until `done` holds for what it saw, for at most [`STEP`],
/// and returns that value.
pub async fn eventually<T: Debug>(what: &str, observe: impl AsyncFnMut() -> T, done: impl Fn(&T) -> bool) -> T {
    eventually_within(STEP, what, observe, done).await
}

/// [`eventually`] with its own bound; panics naming `what` and the last value seen, so a
/// failure says how far the state got.
pub async fn eventually_within<T: Debug>(
    limit: Duration,
    what: &str,
    mut observe: impl AsyncFnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        // A look that hangs (a connect, a scrape) counts against the same deadline.
        let seen = tokio::time::timeout_at(deadline, observe())
            .await
            .unwrap_or_else(|_| panic!("timed out after {limit:?} waiting for {what}: the last look never finished"));
        if done(&seen) {
            return seen;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}; last seen: {seen:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// [`eventually`] for sync tests: looks at `observe` every [`POLL`], blocking the thread, until
/// `done` holds, for at most [`STEP`]; panics naming `what` and the last value seen.
pub fn eventually_blocking<T: Debug>(what: &str, mut observe: impl FnMut() -> T, done: impl Fn(&T) -> bool) -> T {
    let started = std::time::Instant::now();
    loop {
        let seen = observe();
        if done(&seen) {
            return seen;
        }
        if started.elapsed() >= STEP {
            panic!("timed out after {STEP:?} waiting for {what}; last seen: {seen:?}");
        }
        std::thread::sleep(POLL);
    }
}
