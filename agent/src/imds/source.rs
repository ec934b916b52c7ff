//! Where fresh tokens come from: IMDS for user-assigned identities, Entra ID for service principals ([`super::sp`]).

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use serde_json::Value;

use super::{
    request::query_encode,
    response::{self, Token},
    sp::SpTokenSource,
    upstream::{
        BoxFuture, RetryPolicy, TransportError, Upstream, UpstreamResponse, get_with_retry,
    },
};
use crate::identity::{Identity, IdentityKind};

/// Fetches a fresh token for one identity and resource. The cache calls it at most once per key at a time.
pub trait TokenSource: Send + Sync + 'static {
    fn fetch<'a>(
        &'a self,
        identity: &'a Identity,
        resource: &'a str,
    ) -> BoxFuture<'a, Result<Token, FetchError>>;
}

/// Why no token could be had. Each variant knows the IMDS-shaped answer it becomes ([`FetchError::to_response`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// IMDS answered, but not 200 (after the retries that apply). Passed back as it is: 400/404/410/429/5xx keep
    /// their meaning to the SDK.
    #[error("IMDS answered {}", .0.status)]
    Upstream(UpstreamResponse),
    /// IMDS could not be reached or did not answer in time (after the retries).
    #[error("IMDS unreachable: {0}")]
    Unreachable(TransportError),
    /// IMDS answered 200 with a body that is not a usable token, or a token for another identity.
    #[error("IMDS answered 200 with an unusable token: {0}")]
    InvalidResponse(String),
    /// The service principal's secret could not be read.
    #[error("reading the service principal's secret: {0}")]
    Secret(String),
    /// Entra ID answered with an error status.
    #[error("Entra ID answered {status}: {message}")]
    Entra { status: u16, message: String },
    /// Entra ID could not be reached, or the credential could not be built.
    #[error("Entra ID token request failed: {0}")]
    EntraUnavailable(String),
    /// The identity's kind is not served (service principals without a secret store).
    #[error("{0}")]
    Unsupported(String),
    /// The fetch ended without a result (its task panicked or was cancelled).
    #[error("internal error: {0}")]
    Internal(String),
}

impl FetchError {
    /// The answer the caller gets.
    pub fn to_response(&self) -> Response<Full<Bytes>> {
        match self {
            FetchError::Upstream(r) => passthrough(r),
            // The cause (addresses, OS errors) goes to the audit line, not to the workload.
            FetchError::Unreachable(_) => {
                response::unavailable("The metadata service is unreachable")
            }
            // A 502 is retried by every SDK that retries 5xx, and a bad body is most likely a transient upstream fault.
            FetchError::InvalidResponse(_) => response::error(
                StatusCode::BAD_GATEWAY,
                "unknown",
                "The metadata service returned an unusable token",
            ),
            FetchError::Secret(_) => {
                response::unavailable("The service principal's secret could not be read")
            }
            // Entra ID refused the credentials (bad secret, unknown tenant or app): retrying will not help, and 400 is
            // what tells SDKs to stop. 429 and 5xx stay transient.
            FetchError::Entra { status, message }
                if (400..500).contains(status) && *status != 429 =>
            {
                response::error(StatusCode::BAD_REQUEST, "invalid_client", message)
            }
            FetchError::Entra { status, message } => response::error(
                StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                "unknown",
                message,
            ),
            FetchError::EntraUnavailable(_) => response::unavailable("Entra ID is unreachable"),
            FetchError::Unsupported(message) => {
                response::error(StatusCode::BAD_REQUEST, "invalid_request", message)
            }
            FetchError::Internal(_) => response::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "unknown",
                "Internal error",
            ),
        }
    }

    /// A short, stable reason for audit lines and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            FetchError::Upstream(_) => "upstream_status",
            FetchError::Unreachable(_) => "upstream_unreachable",
            FetchError::InvalidResponse(_) => "upstream_invalid_response",
            FetchError::Secret(_) => "secret_unavailable",
            FetchError::Entra { .. } => "entra_error",
            FetchError::EntraUnavailable(_) => "entra_unreachable",
            FetchError::Unsupported(_) => "unsupported_identity",
            FetchError::Internal(_) => "internal",
        }
    }
}

/// IMDS's own answer, status and body unchanged, with its content type (JSON if it sent none) and `Retry-After`.
pub fn passthrough(r: &UpstreamResponse) -> Response<Full<Bytes>> {
    let content_type = r
        .content_type
        .clone()
        .unwrap_or_else(|| HeaderValue::from_static(response::JSON));
    let mut out = response::with_content_type(r.status, content_type, r.body.clone());
    if let Some(retry_after) = &r.retry_after {
        out.headers_mut()
            .insert(header::RETRY_AFTER, retry_after.clone());
    }
    out
}

/// The api-version the agent uses towards IMDS, whatever the caller sent (as NMI did); the token is the same.
pub const IMDS_API_VERSION: &str = "2018-02-01";

/// User-assigned identities: `GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=..&client_id=..`
/// with `Metadata: true`, as the node, with bounded retries, and at most `max_concurrent` such calls at once.
pub struct ImdsTokenSource {
    upstream: Arc<dyn Upstream>,
    retry: RetryPolicy,
    permits: tokio::sync::Semaphore,
    headers: HeaderMap,
}

impl ImdsTokenSource {
    /// `max_concurrent` keeps a burst of distinct cache misses (a node full of pods starting) under IMDS's throttle
    /// limit; identical misses are already merged by the cache.
    pub fn new(upstream: Arc<dyn Upstream>, retry: RetryPolicy, max_concurrent: usize) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert("metadata", HeaderValue::from_static("true"));
        ImdsTokenSource {
            upstream,
            retry,
            permits: tokio::sync::Semaphore::new(max_concurrent.max(1)),
            headers,
        }
    }

    async fn fetch_imds(&self, identity: &Identity, resource: &str) -> Result<Token, FetchError> {
        let path = format!(
            "/metadata/identity/oauth2/token?api-version={IMDS_API_VERSION}&resource={}&client_id={}",
            query_encode(resource),
            query_encode(&identity.client_id)
        );
        // Waiting for a permit counts against the same time budget as the attempts, so a queue behind a slow IMDS
        // cannot stretch a caller's wait past `retry.total`.
        let started = std::time::Instant::now();
        let Ok(permit) = tokio::time::timeout(self.retry.total, self.permits.acquire()).await
        else {
            return Err(FetchError::Unreachable(TransportError::Timeout(
                self.retry.total,
            )));
        };
        // The semaphore is never closed, so acquiring only fails if that invariant breaks; then go on unthrottled.
        let _permit = permit.ok();
        let retry = RetryPolicy {
            total: self.retry.total.saturating_sub(started.elapsed()),
            ..self.retry.clone()
        };
        let answer = get_with_retry(self.upstream.as_ref(), &retry, &path, &self.headers)
            .await
            .map_err(FetchError::Unreachable)?;
        if answer.status != StatusCode::OK {
            return Err(FetchError::Upstream(answer));
        }
        parse_imds_token(&answer.body, &identity.client_id, unix_now())
    }
}

impl TokenSource for ImdsTokenSource {
    fn fetch<'a>(
        &'a self,
        identity: &'a Identity,
        resource: &'a str,
    ) -> BoxFuture<'a, Result<Token, FetchError>> {
        Box::pin(self.fetch_imds(identity, resource))
    }
}

/// Reads IMDS's token JSON. Numbers are accepted as well as IMDS's numeric strings; `expires_on` may be derived from
/// `expires_in`. A token naming another client id than the one asked for is refused: it must never be served to a
/// workload bound to the one asked for.
pub fn parse_imds_token(body: &[u8], client_id: &str, now: u64) -> Result<Token, FetchError> {
    let invalid = |m: &str| FetchError::InvalidResponse(m.to_owned());
    let v: Value = serde_json::from_slice(body).map_err(|e| invalid(&format!("not JSON: {e}")))?;
    let access_token = v
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| invalid("no access_token"))?;
    let expires_in = number(&v, "expires_in");
    let expires_on = number(&v, "expires_on")
        .or_else(|| expires_in.map(|secs| now + secs))
        .ok_or_else(|| invalid("neither expires_on nor expires_in"))?;
    let answered_client_id = v
        .get("client_id")
        .and_then(Value::as_str)
        .filter(|c| !c.is_empty());
    if let Some(other) = answered_client_id.filter(|c| !c.eq_ignore_ascii_case(client_id)) {
        return Err(invalid(&format!(
            "token for client_id {other}, asked for {client_id}"
        )));
    }
    Ok(Token {
        access_token: access_token.to_owned(),
        client_id: answered_client_id.unwrap_or(client_id).to_owned(),
        expires_on,
        not_before: number(&v, "not_before").unwrap_or(now),
        ext_expires_on: number(&v, "ext_expires_in").map_or(expires_on, |secs| now + secs),
        token_type: v
            .get("token_type")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .unwrap_or("Bearer")
            .to_owned(),
    })
}

fn number(v: &Value, field: &str) -> Option<u64> {
    match v.get(field)? {
        Value::String(s) => s.trim().parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

/// Seconds since the Unix epoch. A clock before 1970 reads as 0, which only makes tokens look older.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Dispatches by identity kind: user-assigned identities to IMDS, service principals to Entra ID.
pub struct Fetcher {
    pub imds: ImdsTokenSource,
    pub sp: SpTokenSource,
    /// Bound on a whole service-principal fetch (Entra ID has no per-request timeout of its own here).
    pub sp_timeout: Duration,
}

impl TokenSource for Fetcher {
    fn fetch<'a>(
        &'a self,
        identity: &'a Identity,
        resource: &'a str,
    ) -> BoxFuture<'a, Result<Token, FetchError>> {
        match &identity.kind {
            IdentityKind::UserAssigned => self.imds.fetch(identity, resource),
            IdentityKind::ServicePrincipal { .. } => Box::pin(async move {
                tokio::time::timeout(self.sp_timeout, self.sp.fetch(identity, resource))
                    .await
                    .unwrap_or_else(|_| {
                        Err(FetchError::EntraUnavailable(format!(
                            "no answer within {:?}",
                            self.sp_timeout
                        )))
                    })
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imds::{
        response::body_of,
        upstream::tests::{FakeUpstream, Scripted},
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
        let t = parse_imds_token(br#"{"access_token":"x","expires_in":3600}"#, "c", 1000)
            .expect("valid");
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
                Ok(crate::imds::upstream::tests::reply(200, GOOD, None))
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

    #[tokio::test]
    async fn entra_error_mapping() {
        let refused = FetchError::Entra {
            status: 401,
            message: "AADSTS7000215: Invalid client secret provided.".into(),
        };
        let (status, _, body) = body_of(refused.to_response()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body.contains("invalid_client") && body.contains("AADSTS7000215"),
            "{body}"
        );
        let throttled = FetchError::Entra {
            status: 429,
            message: "slow".into(),
        };
        assert_eq!(
            throttled.to_response().status(),
            StatusCode::TOO_MANY_REQUESTS
        );
        let down = FetchError::Entra {
            status: 503,
            message: "down".into(),
        };
        assert_eq!(down.to_response().status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            FetchError::Secret("x".into()).to_response().status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            FetchError::EntraUnavailable("x".into())
                .to_response()
                .status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
