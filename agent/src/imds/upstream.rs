//! The agent's calls to the real IMDS: a small trait (so tests use a fake), the hyper-based client, and the bounded
//! retry loop used for token fetches.

use std::{
    future::Future,
    hash::BuildHasher,
    pin::Pin,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

/// A boxed, sendable future: the upstream traits are used as trait objects, so that tests and the two token sources
/// can be swapped in without making the service generic over them.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An answer from IMDS, reduced to what is passed back to callers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamResponse {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub retry_after: Option<HeaderValue>,
    pub body: Bytes,
}

impl UpstreamResponse {
    /// `Retry-After` as delta-seconds; the HTTP-date form is not used by IMDS and is ignored.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after
            .as_ref()?
            .to_str()
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

/// Why no answer came back from IMDS.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("connecting to IMDS: {0}")]
    Connect(String),
    #[error("no answer from IMDS within {0:?}")]
    Timeout(Duration),
    #[error("talking to IMDS: {0}")]
    Io(String),
    #[error("IMDS's answer is larger than {0} bytes")]
    TooLarge(usize),
    #[error("building the upstream request: {0}")]
    BadRequest(String),
}

/// One GET to IMDS. `path_and_query` starts with `/`. Implementations bound each call by their own timeout.
pub trait Upstream: Send + Sync + 'static {
    fn get<'a>(
        &'a self,
        path_and_query: &'a str,
        headers: &'a HeaderMap,
    ) -> BoxFuture<'a, Result<UpstreamResponse, TransportError>>;
}

/// Why an upstream URL was refused at start-up.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("`{0}` is not a URL: {1}")]
    Parse(String, String),
    #[error("`{0}`: only http:// with a host and no path is supported for IMDS")]
    Unsupported(String),
}

/// Larger than any IMDS answer (tokens are a few KiB; instance metadata with user data stays well under this), small
/// enough that a misbehaving upstream cannot make the agent buffer much.
pub const MAX_UPSTREAM_BODY: usize = 1 << 20;

/// The real upstream: hyper-util's pooled client, plain HTTP only (IMDS is `http://169.254.169.254`).
pub struct HttpUpstream {
    base: String,
    client: Client<HttpConnector, Empty<Bytes>>,
    attempt_timeout: Duration,
}

impl HttpUpstream {
    /// `base` is `http://host[:port]` (a trailing `/` is allowed); `attempt_timeout` bounds one call, connect to last
    /// body byte.
    pub fn new(base: &str, attempt_timeout: Duration) -> Result<Self, UrlError> {
        let uri: Uri = base
            .parse()
            .map_err(|e: http::uri::InvalidUri| UrlError::Parse(base.into(), e.to_string()))?;
        let plain_http = uri.scheme_str() == Some("http");
        let no_path = matches!(
            uri.path_and_query().map(|p| p.as_str()),
            None | Some("/") | Some("")
        );
        let Some(authority) = uri.authority().filter(|_| plain_http && no_path) else {
            return Err(UrlError::Unsupported(base.into()));
        };
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(attempt_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            // IMDS closes idle connections itself; keeping a few warm saves a handshake per cache miss.
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(8)
            .build(connector);
        Ok(HttpUpstream {
            base: format!("http://{authority}"),
            client,
            attempt_timeout,
        })
    }

    async fn get_once(
        &self,
        path_and_query: &str,
        headers: &HeaderMap,
    ) -> Result<UpstreamResponse, TransportError> {
        let uri: Uri = format!("{}{}", self.base, path_and_query)
            .parse()
            .map_err(|e: http::uri::InvalidUri| TransportError::BadRequest(e.to_string()))?;
        let mut request = Request::get(uri)
            .body(Empty::new())
            .map_err(|e| TransportError::BadRequest(e.to_string()))?;
        request.headers_mut().extend(headers.clone());
        let response = self.client.request(request).await.map_err(|e| {
            if e.is_connect() {
                TransportError::Connect(error_chain(&e))
            } else {
                TransportError::Io(error_chain(&e))
            }
        })?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_UPSTREAM_BODY)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    TransportError::TooLarge(MAX_UPSTREAM_BODY)
                } else {
                    TransportError::Io(e.to_string())
                }
            })?
            .to_bytes();
        Ok(UpstreamResponse {
            status: parts.status,
            content_type: parts.headers.get(header::CONTENT_TYPE).cloned(),
            retry_after: parts.headers.get(header::RETRY_AFTER).cloned(),
            body,
        })
    }
}

impl Upstream for HttpUpstream {
    fn get<'a>(
        &'a self,
        path_and_query: &'a str,
        headers: &'a HeaderMap,
    ) -> BoxFuture<'a, Result<UpstreamResponse, TransportError>> {
        Box::pin(async move {
            tokio::time::timeout(self.attempt_timeout, self.get_once(path_and_query, headers))
                .await
                .unwrap_or(Err(TransportError::Timeout(self.attempt_timeout)))
        })
    }
}

/// hyper's errors say little at the top level ("client error (Connect)"); the cause is further down.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Bounds on the retries of one token fetch. Both the attempt count and the total time are bounded, so a caller never
/// waits longer than `total` plus one scheduling delay, whatever IMDS does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Wall-clock budget for all attempts and the waits between them.
    pub total: Duration,
    /// Bound on one attempt (connect to last body byte).
    pub attempt_timeout: Duration,
    /// First backoff; doubled per retry, with ±20 % jitter.
    pub base_delay: Duration,
    /// The longest `Retry-After` honoured. A longer one ends the retries and is passed to the caller, whose SDK honours
    /// it, rather than holding the request open.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            total: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(5),
            base_delay: Duration::from_millis(250),
            max_retry_after: Duration::from_secs(2),
        }
    }
}

/// IMDS's transient answers: throttling and server errors. 404 and 410 ("IMDS is updating", up to 70 s) are passed
/// back at once instead: every SDK retries them on its own schedule, which outlasts any budget we could hold a request.
pub fn is_retryable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// GETs `path_and_query` with retries on connect errors, timeouts, 429 and 5xx, within `policy`. Returns the last
/// answer (possibly a non-success status, for the caller to pass through) or the last transport error.
pub async fn get_with_retry(
    upstream: &dyn Upstream,
    policy: &RetryPolicy,
    path_and_query: &str,
    headers: &HeaderMap,
) -> Result<UpstreamResponse, TransportError> {
    let started = Instant::now();
    let deadline = started + policy.total;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let budget = remaining.min(policy.attempt_timeout);
        // Only the first attempt can find the budget spent (retries are only scheduled with time left): a caller that
        // queued for its whole budget gets a timeout without bothering IMDS.
        if budget.is_zero() {
            return Err(TransportError::Timeout(policy.total));
        }
        // The budget applies to the attempt too: a slow upstream cannot stretch the total past `policy.total`.
        let result = tokio::time::timeout(budget, upstream.get(path_and_query, headers))
            .await
            .unwrap_or(Err(TransportError::Timeout(budget)));
        let retry_after = match &result {
            Ok(response) if !is_retryable(response.status) => return result,
            Ok(response) => response.retry_after_secs().map(Duration::from_secs),
            Err(TransportError::BadRequest(_) | TransportError::TooLarge(_)) => return result,
            Err(_) => None,
        };
        if attempt >= policy.max_attempts {
            return result;
        }
        let delay = match retry_after {
            Some(wait) if wait > policy.max_retry_after => return result,
            Some(wait) => wait,
            None => jitter(policy.base_delay.saturating_mul(1 << (attempt - 1).min(16))),
        };
        // Waiting only to be cut off by the deadline would waste the wait; a fresh attempt needs some time too.
        if Instant::now() + delay + Duration::from_millis(50) >= deadline {
            return result;
        }
        tracing::debug!(attempt, ?delay, outcome = %describe(&result), "retrying IMDS");
        tokio::time::sleep(delay).await;
    }
}

fn describe(result: &Result<UpstreamResponse, TransportError>) -> String {
    match result {
        Ok(response) => response.status.to_string(),
        Err(e) => e.to_string(),
    }
}

/// ±20 % so that fetches that failed together do not retry in lockstep. `RandomState` is seeded per instance, which is
/// all the randomness this needs.
fn jitter(delay: Duration) -> Duration {
    let r = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    delay.mul_f64(0.8 + (r % 401) as f64 / 1000.0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    };

    /// A scripted upstream: answers from a queue (the last one repeats), counts calls, records what it was asked.
    pub(crate) struct FakeUpstream {
        pub script: Mutex<Vec<Scripted>>,
        pub calls: AtomicUsize,
        pub requests: Mutex<Vec<(String, HeaderMap)>>,
    }

    #[derive(Clone)]
    pub(crate) enum Scripted {
        Status(u16, &'static str, Option<&'static str>),
        Fail(TransportError),
        Hang,
    }

    impl FakeUpstream {
        pub(crate) fn new(script: Vec<Scripted>) -> Self {
            FakeUpstream {
                script: Mutex::new(script),
                calls: AtomicUsize::new(0),
                requests: Mutex::new(Vec::new()),
            }
        }
        pub(crate) fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    pub(crate) fn reply(
        status: u16,
        body: &'static str,
        retry_after: Option<&'static str>,
    ) -> UpstreamResponse {
        UpstreamResponse {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            content_type: Some(HeaderValue::from_static("application/json; charset=utf-8")),
            retry_after: retry_after.map(HeaderValue::from_static),
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    impl Upstream for FakeUpstream {
        fn get<'a>(
            &'a self,
            path_and_query: &'a str,
            headers: &'a HeaderMap,
        ) -> BoxFuture<'a, Result<UpstreamResponse, TransportError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if let Ok(mut r) = self.requests.lock() {
                r.push((path_and_query.to_owned(), headers.clone()));
            }
            let step = {
                let mut script = self.script.lock().unwrap_or_else(|p| p.into_inner());
                if script.len() > 1 {
                    script.remove(0)
                } else {
                    script[0].clone()
                }
            };
            Box::pin(async move {
                match step {
                    Scripted::Status(s, body, ra) => Ok(reply(s, body, ra)),
                    Scripted::Fail(e) => Err(e),
                    Scripted::Hang => std::future::pending().await,
                }
            })
        }
    }

    fn fast() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 3,
            total: Duration::from_secs(2),
            attempt_timeout: Duration::from_millis(300),
            base_delay: Duration::from_millis(10),
            max_retry_after: Duration::from_secs(1),
        }
    }

    async fn run(
        up: &FakeUpstream,
        policy: &RetryPolicy,
    ) -> Result<UpstreamResponse, TransportError> {
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
    fn jitter_stays_within_bounds() {
        for _ in 0..100 {
            let d = jitter(Duration::from_millis(1000));
            assert!(
                d >= Duration::from_millis(800) && d <= Duration::from_millis(1200),
                "{d:?}"
            );
        }
    }

    #[test]
    fn upstream_url_validation() {
        for ok in [
            "http://169.254.169.254",
            "http://169.254.169.254/",
            "http://127.0.0.1:8080",
            "http://imds.local",
        ] {
            assert!(
                HttpUpstream::new(ok, Duration::from_secs(1)).is_ok(),
                "{ok}"
            );
        }
        for bad in [
            "https://169.254.169.254",
            "169.254.169.254",
            "http://x/metadata",
            "http://x/?a=b",
            "",
            "ftp://x",
        ] {
            assert!(
                HttpUpstream::new(bad, Duration::from_secs(1)).is_err(),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn http_upstream_reports_connect_errors() {
        // Port 1 on loopback: nothing listens there, so the connect is refused at once.
        let up =
            HttpUpstream::new("http://127.0.0.1:1", Duration::from_secs(2)).expect("valid url");
        let r = up.get("/metadata/instance", &HeaderMap::new()).await;
        assert!(matches!(r, Err(TransportError::Connect(_))), "{r:?}");
    }
}
