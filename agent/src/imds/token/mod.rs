//! Where tokens come from, behind the face callers see (`imds::service`): the token cache, the two token sources
//! (IMDS for user-assigned identities, Entra ID for service principals) and the HTTP client to the real IMDS.
//!
//! - `source`: the contract: [`Token`], [`TokenSource`], [`FetchError`].
//! - `cache`: [`TokenCache`], single-flight per key, refreshed ahead of expiry, bounded.
//! - `fetcher`: [`Fetcher`], the source the service runs with, by identity kind.
//! - `imds`: [`ImdsTokenSource`], a token from IMDS by client id.
//! - `entra`: [`EntraTokenSource`], a client-credentials token from Entra ID.
//! - `upstream`: [`HttpUpstream`], one GET to IMDS; `retry`: [`get_with_retry`] within a [`RetryPolicy`].

mod cache;
mod entra;
mod fetcher;
mod imds;
mod retry;
mod source;
mod upstream;

pub use cache::{CacheConfig, CacheOutcome, CacheStats, Clock, SystemClock, TokenCache};
pub use entra::{EntraTokenSource, scope_for};
pub use fetcher::Fetcher;
pub use imds::{IMDS_API_VERSION, ImdsTokenSource, parse_imds_token, query_encode};
pub use retry::{RetryPolicy, get_with_retry, is_retryable};
pub use source::{FetchError, Token, TokenSource, unix_now};
pub use upstream::{
    HttpUpstream, MAX_UPSTREAM_BODY, TransportError, Upstream, UpstreamResponse, UrlError,
};

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;
