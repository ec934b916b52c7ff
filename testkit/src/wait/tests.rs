use std::{
    cell::Cell,
    time::{Duration, Instant},
};

use super::*;

#[test]
fn poll_returns_the_first_value_the_probe_finds() {
    let calls = Cell::new(0);
    let found = poll(Duration::from_secs(5), Duration::from_millis(1), || {
        calls.set(calls.get() + 1);
        (calls.get() == 3).then_some("third")
    });
    assert_eq!((found, calls.get()), (Some("third"), 3));
}

#[test]
fn poll_gives_up_after_the_timeout_having_probed_at_the_deadline() {
    let started = Instant::now();
    let last_probe = Cell::new(started);
    let found: Option<()> = poll(
        Duration::from_millis(100),
        Duration::from_millis(30),
        || {
            last_probe.set(Instant::now());
            None
        },
    );
    assert_eq!(found, None);
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert!(last_probe.get() - started >= Duration::from_millis(100));
}

#[test]
fn wait_until_returns_once_the_condition_holds() {
    let calls = Cell::new(0);
    wait_until(Duration::from_secs(5), "the third call", || {
        calls.set(calls.get() + 1);
        calls.get() == 3
    });
    assert_eq!(calls.get(), 3);
}

#[test]
#[should_panic(expected = "waiting until the sky falls")]
fn wait_until_panics_naming_what_never_happened() {
    wait_until(Duration::from_millis(30), "the sky falls", || false);
}
