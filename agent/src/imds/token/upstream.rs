//! The agent's calls to the real IMDS: a small trait (so tests use a fake) and the hyper-based client. Retries are
//! the caller's choice (`retry`): forwarded requests make one attempt, token fetches several.

use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

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

/// One GET to IMDS. `path_and_query` starts with `/`. Implementations bound each call by their own timeout. A trait
/// object (boxed futures), so that tests swap in a fake without making the service generic over it.
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
