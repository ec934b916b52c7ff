//! Bounded retries of one token fetch from IMDS: exponential backoff with jitter (backon), a short `Retry-After`
//! honoured in its place, and one deadline that bounds the attempts and the waits between them.

use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use http::{HeaderMap, StatusCode};

use super::upstream::{TransportError, Upstream, UpstreamResponse};

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
    /// First backoff; doubled per retry, and each wait lengthened by a random jitter of up to as much again.
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

impl RetryPolicy {
    /// The waits between attempts: at most `max_attempts - 1` of them, from `base_delay` doubling, with jitter so that
    /// fetches that failed together do not retry in lockstep. No wait can usefully exceed the whole budget.
    pub fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::new()
            .with_min_delay(self.base_delay)
            .with_factor(2.0)
            .with_max_delay(self.total)
            .with_max_times(
                usize::try_from(self.max_attempts.saturating_sub(1)).unwrap_or(usize::MAX),
            )
            .with_jitter()
    }
}

/// IMDS's transient answers: throttling and server errors. 404 and 410 ("IMDS is updating", up to 70 s) are passed
/// back at once instead: every SDK retries them on its own schedule, which outlasts any budget we could hold a request.
pub fn is_retryable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// The outcome of one attempt: an answer (of any status) or no answer.
type Attempt = Result<UpstreamResponse, TransportError>;

/// An attempt worth repeating, and the wait its answer asked for.
struct Transient {
    result: Attempt,
    retry_after: Option<Duration>,
}

/// `Ok`: final, whatever it holds; `Err`: transient (connect errors, timeouts, 429, 5xx).
fn classify(result: Attempt) -> Result<Attempt, Box<Transient>> {
    let retry_after = match &result {
        Ok(response) if !is_retryable(response.status) => return Ok(result),
        Ok(response) => response.retry_after_secs().map(Duration::from_secs),
        Err(TransportError::BadRequest(_) | TransportError::TooLarge(_)) => return Ok(result),
        Err(_) => None,
    };
    Err(Box::new(Transient {
        result,
        retry_after,
    }))
}

/// GETs `path_and_query` with retries on connect errors, timeouts, 429 and 5xx, within `policy`. Returns the last
/// answer (possibly a non-success status, for the caller to pass through) or the last transport error.
pub async fn get_with_retry(
    upstream: &dyn Upstream,
    policy: &RetryPolicy,
    path_and_query: &str,
    headers: &HeaderMap,
) -> Result<UpstreamResponse, TransportError> {
    let deadline = Instant::now() + policy.total;
    let attempt = || async {
        let budget = deadline
            .saturating_duration_since(Instant::now())
            .min(policy.attempt_timeout);
        // Only the first attempt can find the budget spent (retries are only scheduled with time left): a caller that
        // queued for its whole budget gets a timeout without bothering IMDS.
        if budget.is_zero() {
            return Ok(Err(TransportError::Timeout(policy.total)));
        }
        // The budget applies to the attempt too: a slow upstream cannot stretch the total past `policy.total`.
        let result = tokio::time::timeout(budget, upstream.get(path_and_query, headers))
            .await
            .unwrap_or(Err(TransportError::Timeout(budget)));
        classify(result)
    };
    let mut retries = 0u32;
    let outcome = attempt
        .retry(policy.backoff())
        .adjust(|transient, backoff| {
            // No backoff left: the attempts are spent.
            let backoff = backoff?;
            let delay = match transient.retry_after {
                Some(wait) if wait > policy.max_retry_after => return None,
                Some(wait) => wait,
                None => backoff,
            };
            // Waiting only to be cut off by the deadline would waste the wait; a fresh attempt needs some time too.
            (Instant::now() + delay + Duration::from_millis(50) < deadline).then_some(delay)
        })
        .notify(|transient, delay| {
            retries += 1;
            tracing::debug!(attempt = retries, ?delay, outcome = %describe(&transient.result), "retrying IMDS");
        })
        .await;
    outcome.unwrap_or_else(|transient| transient.result)
}

fn describe(result: &Attempt) -> String {
    match result {
        Ok(response) => response.status.to_string(),
        Err(e) => e.to_string(),
    }
}
