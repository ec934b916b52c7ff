//! What the agent answers, shaped as IMDS answers: tokens, `{"error": .., "error_description": ..}` bodies, IMDS's
//! own answers passed through, and the answer for each way a token fetch fails.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use serde::Serialize;

use super::token::{FetchError, Token, UpstreamResponse};

/// IMDS's content type for every JSON answer (seen in live responses).
pub const JSON: &str = "application/json; charset=utf-8";

/// IMDS's success body. All values are strings, in IMDS's field order.
#[derive(Serialize)]
struct TokenBody<'a> {
    access_token: &'a str,
    client_id: &'a str,
    expires_in: String,
    expires_on: String,
    ext_expires_in: String,
    not_before: String,
    resource: &'a str,
    token_type: &'a str,
}

/// The 200 answer for `token`, with `expires_in` and `ext_expires_in` counted from `now` (epoch seconds), so a cached
/// token never claims more life than it has left.
pub fn token(token: &Token, resource: &str, now: u64) -> Response<Full<Bytes>> {
    let body = TokenBody {
        access_token: &token.access_token,
        client_id: &token.client_id,
        expires_in: token.expires_on.saturating_sub(now).to_string(),
        expires_on: token.expires_on.to_string(),
        ext_expires_in: token.ext_expires_on.saturating_sub(now).to_string(),
        not_before: token.not_before.to_string(),
        resource,
        token_type: &token.token_type,
    };
    match serde_json::to_vec(&body) {
        Ok(bytes) => json(StatusCode::OK, Bytes::from(bytes)),
        // Serialising a struct of strings cannot fail; answer as IMDS does for an internal failure rather than panic.
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "unknown",
            "Failed to encode the token response",
        ),
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    error_description: &'a str,
}

/// An IMDS-shaped error: `{"error":"<code>","error_description":"<text>"}`.
pub fn error(status: StatusCode, code: &str, description: &str) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&ErrorBody {
        error: code,
        error_description: description,
    })
    // Two strings always serialise; the fallback keeps the answer JSON without a panic path.
    .unwrap_or_else(|_| br#"{"error":"unknown","error_description":""}"#.to_vec());
    json(status, Bytes::from(body))
}

/// A JSON answer with IMDS's content type.
pub fn json(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    with_content_type(status, HeaderValue::from_static(JSON), body)
}

pub fn with_content_type(
    status: StatusCode,
    content_type: HeaderValue,
    body: Bytes,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    response
}

/// 400 `bad_request_102`: IMDS's answer to a request without `Metadata: true`.
pub fn missing_metadata_header() -> Response<Full<Bytes>> {
    error(
        StatusCode::BAD_REQUEST,
        "bad_request_102",
        "Required metadata header not specified",
    )
}

/// 400 `Identity not found`: IMDS's answer for an identity the VM does not have. SDKs read it as "this credential is
/// unavailable here" and stop retrying, which is right for a workload that is not bound to the identity.
pub fn identity_not_found() -> Response<Full<Bytes>> {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "Identity not found",
    )
}

/// 400 for several bound identities and none named: IMDS's own words for a VM with several user-assigned identities
/// and no system identity. SDKs show the description as it is, which tells the developer what to add.
pub fn several_identities() -> Response<Full<Bytes>> {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "Multiple user assigned identities exist, please specify the clientId / resourceId of the identity in the token request",
    )
}

/// 400 for a request carrying `X-Forwarded-For`: IMDS refuses those (a proxy in front of the caller added it, so the
/// request may be a user's, relayed: server-side request forgery), and so do we, on every path.
pub fn forwarded_request() -> Response<Full<Bytes>> {
    error(
        StatusCode::BAD_REQUEST,
        "bad_request",
        "Requests with an X-Forwarded-For header are not accepted: the metadata service must be called directly, not through a proxy",
    )
}

/// 429 with `Retry-After: 1` for a caller that already has its share of requests to IMDS in flight (SDKs retry it).
pub fn caller_busy(description: &str) -> Response<Full<Bytes>> {
    let mut response = error(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_requests",
        description,
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(1u32));
    response
}

/// 403 for paths the agent does not serve. Never forwarded: IMDS must not see a path we did not check.
pub fn forbidden() -> Response<Full<Bytes>> {
    error(
        StatusCode::FORBIDDEN,
        "forbidden",
        "This metadata path is not available to workloads on this node",
    )
}

/// 405 for a token request that is not a GET.
pub fn method_not_allowed() -> Response<Full<Bytes>> {
    let mut response = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request",
        "Only GET is supported",
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET"));
    response
}

/// How long a client is asked to wait when IMDS could not be reached.
pub const UNAVAILABLE_RETRY_AFTER_SECS: u64 = 2;

/// 503 with `Retry-After`: IMDS (or Entra ID, or the secret store) could not be reached. Every SDK reviewed retries a
/// 503 with backoff, and none reads it as "identity unavailable", which is what a transient outage is.
pub fn unavailable(description: &str) -> Response<Full<Bytes>> {
    let mut response = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "temporarily_unavailable",
        description,
    );
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(UNAVAILABLE_RETRY_AFTER_SECS),
    );
    response
}

/// IMDS's own answer, status and body unchanged, with its content type (JSON if it sent none) and `Retry-After`.
pub fn passthrough(r: &UpstreamResponse) -> Response<Full<Bytes>> {
    let content_type = r
        .content_type
        .clone()
        .unwrap_or_else(|| HeaderValue::from_static(JSON));
    let mut out = with_content_type(r.status, content_type, r.body.clone());
    if let Some(retry_after) = &r.retry_after {
        out.headers_mut()
            .insert(header::RETRY_AFTER, retry_after.clone());
    }
    out
}

impl FetchError {
    /// The answer the caller gets.
    pub fn to_response(&self) -> Response<Full<Bytes>> {
        match self {
            FetchError::Upstream(r) => passthrough(r),
            // The cause (addresses, OS errors) goes to the audit line, not to the workload.
            FetchError::Unreachable(_) => unavailable("The metadata service is unreachable"),
            // A 502 is retried by every SDK that retries 5xx, and a bad body is most likely a transient upstream fault.
            FetchError::InvalidResponse(_) => error(
                StatusCode::BAD_GATEWAY,
                "unknown",
                "The metadata service returned an unusable token",
            ),
            FetchError::Secret(_) => {
                unavailable("The service principal's secret could not be read")
            }
            // Entra ID refused the credentials (bad secret, unknown tenant or app): retrying will not help, and 400 is
            // what tells SDKs to stop. 429 and 5xx stay transient.
            FetchError::Entra { status, message }
                if (400..500).contains(status) && *status != 429 =>
            {
                error(StatusCode::BAD_REQUEST, "invalid_client", message)
            }
            FetchError::Entra { status, message } => error(
                StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                "unknown",
                message,
            ),
            FetchError::EntraUnavailable(_) => unavailable("Entra ID is unreachable"),
            FetchError::Unsupported(message) => {
                error(StatusCode::BAD_REQUEST, "invalid_request", message)
            }
            FetchError::Internal(_) => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "unknown",
                "Internal error",
            ),
        }
    }
}

/// Test helper: status, content type and body text of an answer.
#[cfg(test)]
pub(crate) async fn body_of(
    response: Response<Full<Bytes>>,
) -> (StatusCode, Option<String>, String) {
    let status = response.status();
    let ct = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = match http_body_util::BodyExt::collect(response.into_body()).await {
        Ok(collected) => collected.to_bytes(),
        Err(never) => match never {},
    };
    (status, ct, String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn error_bodies_have_imds_bytes() {
        let cases = [
            (
                missing_metadata_header(),
                400,
                r#"{"error":"bad_request_102","error_description":"Required metadata header not specified"}"#,
            ),
            (
                identity_not_found(),
                400,
                r#"{"error":"invalid_request","error_description":"Identity not found"}"#,
            ),
            (
                error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "Required audience parameter not specified",
                ),
                400,
                r#"{"error":"invalid_request","error_description":"Required audience parameter not specified"}"#,
            ),
            (
                error(StatusCode::BAD_REQUEST, "a\"b", "line\nbreak"),
                400,
                r#"{"error":"a\"b","error_description":"line\nbreak"}"#,
            ),
        ];
        for (response, status, body) in cases {
            assert_eq!(
                body_of(response).await,
                (
                    StatusCode::from_u16(status).expect("valid"),
                    Some(JSON.into()),
                    body.into()
                )
            );
        }
    }

    #[tokio::test]
    async fn unavailable_and_forbidden_shapes() {
        let r = unavailable("down");
        assert_eq!(
            r.headers()
                .get(header::RETRY_AFTER)
                .map(HeaderValue::as_bytes),
            Some(&b"2"[..])
        );
        let (status, ct, body) = body_of(r).await;
        assert_eq!(
            (status, ct.as_deref()),
            (StatusCode::SERVICE_UNAVAILABLE, Some(JSON))
        );
        assert_eq!(
            body,
            r#"{"error":"temporarily_unavailable","error_description":"down"}"#
        );
        let (status, _, body) = body_of(forbidden()).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["error"], "forbidden");
        let r = method_not_allowed();
        assert_eq!(
            r.headers().get(header::ALLOW).map(HeaderValue::as_bytes),
            Some(&b"GET"[..])
        );
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn token_body_is_all_strings_in_imds_order() {
        let t = Token {
            access_token: "eyJ0.x.y".into(),
            client_id: "cid".into(),
            expires_on: 1_000_000 + 86_400,
            not_before: 1_000_000 - 300,
            ext_expires_on: 1_000_000 + 86_399,
            token_type: "Bearer".into(),
        };
        let (status, ct, body) =
            body_of(token(&t, "https://management.azure.com/", 1_000_100)).await;
        assert_eq!((status, ct.as_deref()), (StatusCode::OK, Some(JSON)));
        assert_eq!(
            body,
            concat!(
                r#"{"access_token":"eyJ0.x.y","client_id":"cid","expires_in":"86300","expires_on":"1086400","#,
                r#""ext_expires_in":"86299","not_before":"999700","resource":"https://management.azure.com/","#,
                r#""token_type":"Bearer"}"#
            )
        );
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        let fields = v.as_object().expect("object");
        assert_eq!(fields.len(), 8);
        assert!(fields.values().all(serde_json::Value::is_string), "{body}");
        // A token past its expiry reports 0 seconds left, never a negative or wrapped number.
        let (_, _, body) = body_of(token(&t, "r", 2_000_000)).await;
        assert!(body.contains(r#""expires_in":"0""#), "{body}");
    }

    #[test]
    fn debug_never_prints_the_token() {
        let t = Token {
            access_token: "secret-token".into(),
            client_id: "c".into(),
            expires_on: 1,
            not_before: 0,
            ext_expires_on: 1,
            token_type: "Bearer".into(),
        };
        assert!(!format!("{t:?}").contains("secret-token"));
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
