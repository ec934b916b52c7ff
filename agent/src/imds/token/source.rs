//! The contract between the token cache and where tokens come from: a [`Token`], the [`TokenSource`] trait both
//! sources (IMDS, Entra ID) implement, and the [`FetchError`] they fail with. How each error is answered to the caller
//! is the face's business (`imds::response`), not this file's.

use futures_util::future::BoxFuture;

use super::upstream::{TransportError, UpstreamResponse};
use crate::identity::Identity;

/// A token as the cache keeps it. Times are Unix epoch seconds; relative fields are recomputed when served.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub access_token: String,
    /// Client id of the identity the token was issued to.
    pub client_id: String,
    /// `exp`.
    pub expires_on: u64,
    /// `nbf`.
    pub not_before: u64,
    /// The end of the extended lifetime (`ext_expires_in` added to the time the token was fetched).
    pub ext_expires_on: u64,
    pub token_type: String,
}

// Tokens are bearer credentials: Debug must never print one, even in an error path's log line.
impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field(
                "access_token",
                &format_args!("<{} bytes>", self.access_token.len()),
            )
            .field("client_id", &self.client_id)
            .field("expires_on", &self.expires_on)
            .field("not_before", &self.not_before)
            .field("ext_expires_on", &self.ext_expires_on)
            .field("token_type", &self.token_type)
            .finish()
    }
}

/// Fetches a fresh token for one identity and resource. The cache calls it at most once per key at a time.
pub trait TokenSource: Send + Sync + 'static {
    fn fetch<'a>(
        &'a self,
        identity: &'a Identity,
        resource: &'a str,
    ) -> BoxFuture<'a, Result<Token, FetchError>>;
}

/// Why no token could be had. Each variant knows the IMDS-shaped answer it becomes (`FetchError::to_response`, in
/// `imds::response`).
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

/// Seconds since the Unix epoch. A clock before 1970 reads as 0, which only makes tokens look older.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
