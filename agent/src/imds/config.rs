//! The IMDS service's settings, and why a setting is refused.

use super::token::{CacheConfig, RetryPolicy, UrlError};

/// Settings of the IMDS service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The real IMDS, `http://host[:port]`. Default `http://169.254.169.254`; tests point it at an emulator.
    pub imds_url: String,
    /// Forward `/metadata/instance*` and `/metadata/versions` to IMDS (as the node). Default true.
    pub forward_instance_metadata: bool,
    /// Entra ID authority for service-principal identities. Default `https://login.microsoftonline.com`; must be
    /// https (azure_identity refuses anything else).
    pub authority_host: String,
    /// Token cache bounds and refresh margins.
    pub cache: CacheConfig,
    /// Retry bounds for token fetches; `retry.attempt_timeout` also bounds each forwarded request (one attempt: the
    /// caller's SDK retries those itself).
    pub retry: RetryPolicy,
    /// Requests to IMDS in flight at once (token fetches and forwarded metadata), across all callers (IMDS throttles
    /// per VM).
    pub max_concurrent_fetches: usize,
    /// Of those, how many one caller (one cgroup) may have in flight; its further requests wait for its own.
    pub max_upstream_per_caller: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            imds_url: "http://169.254.169.254".to_owned(),
            forward_instance_metadata: true,
            authority_host: "https://login.microsoftonline.com".to_owned(),
            cache: CacheConfig::default(),
            retry: RetryPolicy::default(),
            max_concurrent_fetches: 5,
            max_upstream_per_caller: 2,
        }
    }
}

/// Why a [`Config`] was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("imds_url: {0}")]
    ImdsUrl(#[from] UrlError),
    #[error("authority_host `{0}` must be an https:// URL")]
    AuthorityHost(String),
}
