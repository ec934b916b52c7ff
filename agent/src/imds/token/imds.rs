//! User-assigned identities: a token from the real IMDS, asked for by the identity's `client_id`, as the node.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderValue, StatusCode};
use serde_json::Value;

use super::{
    retry::{RetryPolicy, get_with_retry},
    source::{FetchError, Token, TokenSource, unix_now},
    upstream::{TransportError, Upstream},
};
use crate::identity::Identity;

/// The api-version the agent uses towards IMDS, whatever the caller sent (as NMI did); the token is the same.
pub const IMDS_API_VERSION: &str = "2018-02-01";

/// User-assigned identities: `GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=..&client_id=..`
/// with `Metadata: true`, as the node, with bounded retries, and at most `max_concurrent` such calls at once.
pub struct ImdsTokenSource {
    upstream: Arc<dyn Upstream>,
    retry: RetryPolicy,
    permits: Arc<tokio::sync::Semaphore>,
    headers: HeaderMap,
}

impl ImdsTokenSource {
    /// `max_concurrent` keeps a burst of distinct cache misses (a node full of pods starting) under IMDS's throttle
    /// limit; identical misses are already merged by the cache.
    pub fn new(upstream: Arc<dyn Upstream>, retry: RetryPolicy, max_concurrent: usize) -> Self {
        let permits = Arc::new(tokio::sync::Semaphore::new(max_concurrent.max(1)));
        Self::sharing(upstream, retry, permits)
    }

    /// With the permits of a budget shared with other calls to IMDS (the service's forwarded requests).
    pub fn sharing(
        upstream: Arc<dyn Upstream>,
        retry: RetryPolicy,
        permits: Arc<tokio::sync::Semaphore>,
    ) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert("metadata", HeaderValue::from_static("true"));
        ImdsTokenSource {
            upstream,
            retry,
            permits,
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

/// Everything but RFC 3986 unreserved characters (`A-Z a-z 0-9 - . _ ~`).
const QUERY_COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Encodes a query component: everything but RFC 3986 unreserved characters is percent-encoded.
pub fn query_encode(value: &str) -> String {
    percent_encoding::utf8_percent_encode(value, QUERY_COMPONENT).to_string()
}
