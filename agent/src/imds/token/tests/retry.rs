//! Tests of the retry loop against a scripted upstream.

use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use http::HeaderMap;

use crate::imds::token::{
    fake::{FakeUpstream, Scripted},
    retry::{RetryPolicy, get_with_retry},
    upstream::{TransportError, UpstreamResponse},
};

fn fast() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        total: Duration::from_secs(2),
        attempt_timeout: Duration::from_millis(300),
        base_delay: Duration::from_millis(10),
        max_retry_after: Duration::from_secs(1),
    }
}

async fn run(up: &FakeUpstream, policy: &RetryPolicy) -> Result<UpstreamResponse, TransportError> {
    get_with_retry(up, policy, "/x", &HeaderMap::new()).await
}

#[tokio::test]
async fn success_and_client_errors_are_not_retried() {
    for status in [200, 400, 401, 403, 404, 410] {
        let up = FakeUpstream::new(vec![Scripted::Status(status, "{}", None)]);
        let r = run(&up, &fast()).await.expect("an answer");
        assert_eq!((r.status.as_u16(), up.calls()), (status, 1));
    }
}

#[tokio::test]
async fn transient_errors_are_retried_up_to_the_attempt_bound() {
    let up = FakeUpstream::new(vec![
        Scripted::Status(429, "{}", None),
        Scripted::Status(500, "{}", None),
        Scripted::Status(200, "ok", None),
    ]);
    assert_eq!(run(&up, &fast()).await.map(|r| r.status.as_u16()), Ok(200));
    assert_eq!(up.calls(), 3);

    // Always failing: exactly max_attempts calls, and the last answer (status and body) comes back.
    let up = FakeUpstream::new(vec![Scripted::Status(503, "busy", None)]);
    let r = run(&up, &fast()).await.expect("an answer");
    assert_eq!(
        (r.status.as_u16(), &r.body[..], up.calls()),
        (503, &b"busy"[..], 3)
    );

    let up = FakeUpstream::new(vec![Scripted::Fail(TransportError::Connect(
        "refused".into(),
    ))]);
    assert_eq!(
        run(&up, &fast()).await,
        Err(TransportError::Connect("refused".into()))
    );
    assert_eq!(up.calls(), 3);

    let up = FakeUpstream::new(vec![Scripted::Fail(TransportError::TooLarge(1))]);
    assert!(run(&up, &fast()).await.is_err());
    assert_eq!(up.calls(), 1, "a body too large is not transient");
}

#[tokio::test]
async fn hanging_upstream_is_bounded_per_attempt_and_in_total() {
    let up = FakeUpstream::new(vec![Scripted::Hang]);
    let started = Instant::now();
    let r = run(&up, &fast()).await;
    let took = started.elapsed();
    assert!(matches!(r, Err(TransportError::Timeout(_))), "{r:?}");
    assert_eq!(up.calls(), 3);
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2000),
        "{took:?}"
    );

    // The total budget wins over the attempt count.
    let policy = RetryPolicy {
        max_attempts: 100,
        total: Duration::from_millis(700),
        ..fast()
    };
    let started = Instant::now();
    let r = run(&up, &policy).await;
    let took = started.elapsed();
    assert!(matches!(r, Err(TransportError::Timeout(_))));
    assert!(took < Duration::from_millis(1200), "{took:?}");
}

#[tokio::test]
async fn retry_after_is_honoured_only_when_short() {
    let up = FakeUpstream::new(vec![
        Scripted::Status(429, "{}", Some("0")),
        Scripted::Status(200, "ok", None),
    ]);
    assert_eq!(run(&up, &fast()).await.map(|r| r.status.as_u16()), Ok(200));
    assert_eq!(up.calls(), 2);

    let up = FakeUpstream::new(vec![
        Scripted::Status(429, "slow down", Some("30")),
        Scripted::Status(200, "ok", None),
    ]);
    let started = Instant::now();
    let r = run(&up, &fast()).await.expect("an answer");
    assert_eq!(
        (r.status.as_u16(), r.retry_after_secs(), up.calls()),
        (429, Some(30), 1)
    );
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "a 30 s Retry-After is not waited for"
    );

    let up = FakeUpstream::new(vec![
        Scripted::Status(503, "{}", Some("1")),
        Scripted::Status(200, "ok", None),
    ]);
    let started = Instant::now();
    assert_eq!(run(&up, &fast()).await.map(|r| r.status.as_u16()), Ok(200));
    assert!(started.elapsed() >= Duration::from_millis(1000));
}

#[tokio::test]
async fn no_budget_no_call() {
    let up = FakeUpstream::new(vec![Scripted::Status(200, "ok", None)]);
    let policy = RetryPolicy {
        total: Duration::ZERO,
        ..fast()
    };
    assert!(matches!(
        run(&up, &policy).await,
        Err(TransportError::Timeout(_))
    ));
    assert_eq!(up.calls(), 0);
}

#[test]
fn waits_double_from_the_base_delay_with_jitter_of_up_to_as_much_again() {
    let policy = RetryPolicy {
        max_attempts: 4,
        total: Duration::from_secs(60),
        base_delay: Duration::from_millis(1000),
        ..RetryPolicy::default()
    };
    for _ in 0..100 {
        let waits: Vec<Duration> = policy.backoff().build().collect();
        assert_eq!(waits.len(), 3, "one wait between each pair of attempts");
        for (i, wait) in waits.iter().enumerate() {
            let floor = Duration::from_millis(1000 << i);
            assert!(*wait >= floor && *wait <= floor * 2, "wait {i}: {wait:?}");
        }
    }
}
