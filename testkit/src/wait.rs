//! Waiting for something another process or thread does: poll it until it holds or a timeout passes.
//!
//! Tests poll instead of sleeping a fixed time, so a slow machine makes them slower, not flaky.

use std::{
    thread,
    time::{Duration, Instant},
};

/// Calls `probe` every `every` until it returns `Some`, and returns that; `None` when `timeout` passed first.
/// `probe` runs at least once, and once more at the deadline, so a condition that holds at the last moment counts.
pub fn poll<T>(
    timeout: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = probe() {
            return Some(found);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        thread::sleep(every.min(left));
    }
}

/// Polls `cond` every 20 ms for up to `timeout`; panics with `what` (the condition, in words) if it never holds.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    if poll(timeout, Duration::from_millis(20), || cond().then_some(())).is_none() {
        panic!("timed out after {timeout:?} waiting until {what}");
    }
}

#[cfg(test)]
mod tests;
