//! Tests of the IMDS token source: token bodies, the request it makes, errors, and its concurrency bound.

use std::{sync::Arc, time::Duration};

use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderValue, StatusCode, header};

use crate::{
    identity::{Identity, IdentityKind},
    imds::{
        response::{self, body_of},
        token::{
            FetchError, RetryPolicy, TokenSource,
            fake::{FakeUpstream, Scripted, reply},
            imds::{ImdsTokenSource, parse_imds_token},
            upstream::{TransportError, Upstream, UpstreamResponse},
        },
    },
};

fn uami(client_id: &str) -> Identity {
    Identity {
        name: "id".into(),
        namespace: None,
        client_id: client_id.into(),
        resource_id: None,
        object_id: None,
        kind: IdentityKind::UserAssigned,
    }
}

const GOOD: &str = r#"{"access_token":"eyJ0.a.b","client_id":"CID-1","expires_in":"86400","expires_on":"1757695256","ext_expires_in":"86399","not_before":"1757608556","resource":"https://management.azure.com/","token_type":"Bearer"}"#;

#[test]
fn parses_imds_token_bodies() {
    let t = parse_imds_token(GOOD.as_bytes(), "cid-1", 1_757_608_856).expect("valid");
    assert_eq!(t.access_token, "eyJ0.a.b");
    assert_eq!(t.client_id, "CID-1");
    assert_eq!(
        (t.expires_on, t.not_before, t.ext_expires_on),
        (1_757_695_256, 1_757_608_556, 1_757_608_856 + 86_399)
    );
    // Numbers instead of strings, and expires_on derived from expires_in.
    let t =
        parse_imds_token(br#"{"access_token":"x","expires_in":3600}"#, "c", 1000).expect("valid");
    assert_eq!(
        (
            t.expires_on,
            t.not_before,
            t.ext_expires_on,
            t.token_type.as_str()
        ),
        (4600, 1000, 4600, "Bearer")
    );
    assert_eq!(t.client_id, "c");
    for bad in [
        &b"not json"[..],
        br#"{"expires_on":"1"}"#,
        br#"{"access_token":"x"}"#,
        br#"{"access_token":"","expires_on":"1"}"#,
    ] {
        assert!(matches!(
            parse_imds_token(bad, "c", 0),
            Err(FetchError::InvalidResponse(_))
        ));
    }
    assert!(
        matches!(parse_imds_token(GOOD.as_bytes(), "someone-else", 0), Err(FetchError::InvalidResponse(m)) if m.contains("CID-1"))
    );
}

#[tokio::test]
async fn imds_source_asks_by_client_id_with_the_metadata_header() {
    let fake = Arc::new(FakeUpstream::new(vec![Scripted::Status(200, GOOD, None)]));
    let source = ImdsTokenSource::new(fake.clone(), RetryPolicy::default(), 5);
    let t = source
        .fetch(&uami("CID-1"), "https://management.azure.com/")
        .await
        .expect("token");
    assert_eq!(t.access_token, "eyJ0.a.b");
    let requests = fake.requests.lock().map(|r| r.clone()).unwrap_or_default();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].0,
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com%2F&client_id=CID-1"
    );
    assert_eq!(
        requests[0].1.get("metadata").map(HeaderValue::as_bytes),
        Some(&b"true"[..])
    );
}

#[tokio::test]
async fn imds_errors_pass_through_unchanged() {
    let body = r#"{"error":"invalid_request","error_description":"Identity not found"}"#;
    for status in [400, 404, 410] {
        let fake = Arc::new(FakeUpstream::new(vec![Scripted::Status(
            status, body, None,
        )]));
        let source = ImdsTokenSource::new(fake.clone(), RetryPolicy::default(), 5);
        let err = source.fetch(&uami("c"), "r").await.expect_err("an error");
        assert_eq!(fake.calls(), 1);
        let (got_status, ct, got_body) = body_of(err.to_response()).await;
        assert_eq!((got_status.as_u16(), got_body.as_str()), (status, body));
        assert_eq!(ct.as_deref(), Some(response::JSON));
    }
}

#[tokio::test]
async fn unreachable_imds_is_a_503_with_retry_after() {
    let fake = Arc::new(FakeUpstream::new(vec![Scripted::Fail(
        TransportError::Connect("refused".into()),
    )]));
    let policy = RetryPolicy {
        base_delay: Duration::from_millis(1),
        ..RetryPolicy::default()
    };
    let source = ImdsTokenSource::new(fake.clone(), policy, 5);
    let err = source.fetch(&uami("c"), "r").await.expect_err("an error");
    assert_eq!(err.reason(), "upstream_unreachable");
    assert_eq!(fake.calls(), 3);
    let response = err.to_response();
    assert!(response.headers().contains_key(header::RETRY_AFTER));
    let (status, _, body) = body_of(response).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body.starts_with(r#"{"error":"temporarily_unavailable","#),
        "{body}"
    );
}

/// Answers 200 after `delay`, tracking how many calls are in flight at once.
struct Gate {
    delay: Duration,
    in_flight: std::sync::atomic::AtomicUsize,
    max: std::sync::atomic::AtomicUsize,
}

impl Upstream for Gate {
    fn get<'a>(
        &'a self,
        _: &'a str,
        _: &'a HeaderMap,
    ) -> BoxFuture<'a, Result<UpstreamResponse, TransportError>> {
        use std::sync::atomic::Ordering::SeqCst;
        Box::pin(async move {
            let now = self.in_flight.fetch_add(1, SeqCst) + 1;
            self.max.fetch_max(now, SeqCst);
            tokio::time::sleep(self.delay).await;
            self.in_flight.fetch_sub(1, SeqCst);
            Ok(reply(200, GOOD, None))
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fetches_are_bounded_and_queueing_counts_against_the_budget() {
    let run = |total_ms: u64| async move {
        let gate = Arc::new(Gate {
            delay: Duration::from_millis(100),
            in_flight: 0.into(),
            max: 0.into(),
        });
        let policy = RetryPolicy {
            max_attempts: 1,
            total: Duration::from_millis(total_ms),
            ..RetryPolicy::default()
        };
        let source = Arc::new(ImdsTokenSource::new(gate.clone(), policy, 2));
        let tasks: Vec<_> = (0..5)
            .map(|_| {
                let source = Arc::clone(&source);
                tokio::spawn(async move { source.fetch(&uami("cid-1"), "r").await.is_ok() })
            })
            .collect();
        let mut ok = 0;
        for task in tasks {
            ok += usize::from(task.await.expect("task"));
        }
        (ok, gate.max.load(std::sync::atomic::Ordering::SeqCst))
    };
    // Enough time for everyone, two at a time.
    assert_eq!(run(2000).await, (5, 2));
    // 150 ms: the first two get through; the others queue, and their wait is part of their budget.
    let started = std::time::Instant::now();
    assert_eq!(run(150).await, (2, 2));
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
}
