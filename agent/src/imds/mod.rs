//! The IMDS look-alike: answers a redirected caller exactly as the Azure Instance Metadata Service would, with the
//! identity the caller is bound to.
//!
//! # Use
//! ```ignore
//! use nmi_agent::imds::{self, Config, NoSecretStore};
//!
//! // At start-up (inside the Tokio runtime): one service for the process.
//! let service = Arc::new(imds::Service::new(Config::default(), resolver, NoSecretStore)?);
//! service.spawn_refresher();                        // background refresh of tokens in use
//!
//! // Per request, once the connection is attested (the server enforces header, body and time limits):
//! let response = service.handle(&attestation, request).await;   // http::Response<Full<Bytes>>
//!
//! // When a binding or identity goes away: follow the binding source's set of bound client ids...
//! service.spawn_binding_watch(source.bound_client_ids());
//! // ...or purge one identity by hand:
//! service.purge_identity(&client_id);
//! ```
//!
//! # Contract
//! - The path is normalised first ([`path`]): percent-decoding until stable, `\` as `/`, duplicate slashes and dot
//!   segments resolved, case folded for matching. `/metadata/identity/oauth2/token` is the token endpoint;
//!   `/metadata/instance[/..]` and `/metadata/versions` are forwarded to IMDS as the node (canonical path, caller's
//!   query, only the `Metadata` header) when [`Config::forward_instance_metadata`] is set; everything else is 403 and
//!   never forwarded.
//! - Token requests: without exactly `Metadata: true`, 400 `bad_request_102` at once, before any identity lookup (SDK
//!   probes get a fast answer). Then GET only (405), `resource` required, at most one of `client_id`, `object_id`,
//!   `msi_res_id`, `mi_res_id` (400 `invalid_request`).
//! - The caller's binding picks the identity ([`crate::identity::select`]). Unbound, not bound or ambiguous: 400
//!   `Identity not found`, IMDS's own answer for an identity the VM lacks, so SDKs treat the credential as
//!   unavailable; nothing goes upstream. A node exception is forwarded unchanged, as the node.
//! - Tokens come from the cache ([`cache`]), else one single-flight fetch: IMDS by the identity's `client_id` for
//!   user-assigned identities ([`source`]), Entra ID client credentials for service principals ([`sp`]).
//! - IMDS's failures pass through with its status and body (404/410/429/5xx keep their SDK retry meaning) after
//!   bounded retries of 429/5xx/connect errors/timeouts ([`upstream::RetryPolicy`]: 3 attempts within 10 s by
//!   default). **IMDS unreachable** (connect error or timeout on the last attempt): **503**
//!   `{"error":"temporarily_unavailable",..}` with `Retry-After: 2`; every SDK reviewed retries a 503, and none reads
//!   it as "identity unavailable".
//! - One audit event per token decision: `tracing` target `audit`, `event = "token"`, with `pid, cgroup, namespace,
//!   pod, pod_uid, container, identity, resource, outcome (granted|denied|error|forwarded), reason, cache
//!   (hit|miss|none), latency_ms`.

pub mod cache;
pub mod path;
pub mod request;
pub mod response;
pub mod source;
pub mod sp;
pub mod upstream;

use std::{
    collections::BTreeSet,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, request::Parts};
use http_body_util::Full;
use tokio::sync::watch;

pub use cache::{CacheConfig, CacheOutcome, CacheStats, TokenCache};
pub use path::Route;
pub use response::Token;
pub use source::{FetchError, TokenSource};
pub use sp::{NoSecretStore, SecretStore};
pub use upstream::{HttpUpstream, RetryPolicy, Upstream, UpstreamResponse};

use crate::{
    attest::Attestation,
    identity::{Binding, Resolve, Workload, select},
    telemetry::metrics::{Metrics, StatusLabels, TokenLabels},
};

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
    /// Token fetches to IMDS in flight at once, across all identities (IMDS throttles per VM).
    pub max_concurrent_fetches: usize,
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
        }
    }
}

/// Why a [`Config`] was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("imds_url: {0}")]
    ImdsUrl(#[from] upstream::UrlError),
    #[error("authority_host `{0}` must be an https:// URL")]
    AuthorityHost(String),
}

/// The service: one per process, shared by all connections.
pub struct Service<R> {
    config: Config,
    resolver: R,
    cache: TokenCache,
    upstream: Arc<dyn Upstream>,
    metrics: Arc<Metrics>,
}

impl<R: Resolve + Send + Sync + 'static> Service<R> {
    /// The production service: hyper client to `config.imds_url`, IMDS and Entra ID token sources.
    pub fn new<S: SecretStore>(
        config: Config,
        resolver: R,
        secrets: S,
    ) -> Result<Self, ConfigError> {
        if !config.authority_host.starts_with("https://") {
            return Err(ConfigError::AuthorityHost(config.authority_host.clone()));
        }
        let upstream: Arc<dyn Upstream> = Arc::new(HttpUpstream::new(
            &config.imds_url,
            config.retry.attempt_timeout,
        )?);
        let fetcher = source::Fetcher {
            imds: source::ImdsTokenSource::new(
                Arc::clone(&upstream),
                config.retry.clone(),
                config.max_concurrent_fetches,
            ),
            sp: sp::SpTokenSource::new(
                config.authority_host.clone(),
                Arc::new(secrets),
                config.retry.clone(),
            ),
            // azure_core's own retries are bounded by the same policy; this also covers reading the secret.
            sp_timeout: config.retry.total + Duration::from_secs(2),
        };
        Ok(Self::with_parts(
            config,
            resolver,
            upstream,
            Arc::new(fetcher),
        ))
    }

    /// A service over given parts: `upstream` for forwarded requests, `tokens` for token fetches (tests use fakes).
    pub fn with_parts(
        config: Config,
        resolver: R,
        upstream: Arc<dyn Upstream>,
        tokens: Arc<dyn TokenSource>,
    ) -> Self {
        Service {
            cache: TokenCache::new(config.cache.clone(), tokens),
            config,
            resolver,
            upstream,
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// Counts decisions, latencies and upstream errors into `metrics` (the process-wide registry).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn cache(&self) -> &TokenCache {
        &self.cache
    }

    /// Drops cached tokens of `client_id` (a binding or identity went away). Returns the entries dropped.
    pub fn purge_identity(&self, client_id: &str) -> usize {
        self.cache.purge_identity(client_id)
    }

    /// Follows the set of bound client ids (lower case; `identity::Source::bound_client_ids`) and drops cached tokens
    /// of identities that leave it. Ends when the sender is dropped. Call once, inside the runtime.
    pub fn spawn_binding_watch(
        &self,
        mut bound: watch::Receiver<Arc<BTreeSet<String>>>,
    ) -> tokio::task::JoinHandle<()> {
        let cache = self.cache.clone();
        tokio::spawn(async move {
            loop {
                let keep = Arc::clone(&bound.borrow_and_update());
                let dropped = cache.retain_client_ids(&keep);
                if dropped > 0 {
                    tracing::info!(target: "imds", dropped, "cached tokens of unbound identities dropped");
                }
                if bound.changed().await.is_err() {
                    return;
                }
            }
        })
    }

    /// Starts the background refresher of the token cache. Call once, inside the runtime.
    pub fn spawn_refresher(&self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.cache.clone().run_refresher())
    }

    /// Answers one request from an attested caller. The body is ignored (IMDS's GETs have none) and dropped before
    /// anything is awaited, so `B` need not be `Send`.
    pub fn handle<'a, B>(
        &'a self,
        caller: &'a Attestation,
        req: Request<B>,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send + 'a {
        let (parts, _body) = req.into_parts();
        self.handle_parts(caller, parts)
    }

    async fn handle_parts(&self, caller: &Attestation, parts: Parts) -> Response<Full<Bytes>> {
        let started = Instant::now();
        match path::route(parts.uri.path()) {
            Route::Token => self.token(caller, &parts, started).await,
            Route::Instance(path) if self.config.forward_instance_metadata => {
                let response = self.forward(&path, parts.uri.query(), &parts.headers).await;
                tracing::debug!(
                    target: "imds",
                    pid = caller.pid,
                    path,
                    status = response.status().as_u16(),
                    "instance metadata forwarded"
                );
                response
            }
            Route::Instance(path) => {
                tracing::info!(target: "imds", pid = caller.pid, path, "instance metadata refused by configuration");
                response::forbidden()
            }
            Route::Forbidden(refusal) => {
                tracing::info!(
                    target: "imds",
                    pid = caller.pid,
                    cgroup = %cgroup_of(caller),
                    path = parts.uri.path(),
                    ?refusal,
                    "metadata path refused"
                );
                response::forbidden()
            }
        }
    }

    async fn token(
        &self,
        caller: &Attestation,
        parts: &Parts,
        started: Instant,
    ) -> Response<Full<Bytes>> {
        let mut audit = Audit::new(caller, started, &self.metrics);
        // First, before anything that can wait: SDK availability probes omit the header and need an answer at once.
        if !request::has_metadata_header(&parts.headers) {
            audit.emit("denied", "metadata_header_missing");
            return response::missing_metadata_header();
        }
        if parts.method != Method::GET {
            audit.emit("denied", "method_not_allowed");
            return response::method_not_allowed();
        }
        let query = match request::parse_token_query(parts.uri.query()) {
            Ok(query) => query,
            Err(e) => {
                audit.emit("denied", &format!("invalid_request: {e}"));
                return response::error(StatusCode::BAD_REQUEST, "invalid_request", &e.to_string());
            }
        };
        audit.resource = query.resource.clone();
        match self.resolver.resolve(caller).await {
            Binding::NodeException { workload } => {
                audit.workload = workload;
                let path = "/metadata/identity/oauth2/token";
                let response = self.forward(path, parts.uri.query(), &parts.headers).await;
                tracing::info!(target: "imds", pid = caller.pid, status = response.status().as_u16(), "node exception forwarded");
                audit.emit("forwarded", "node_exception");
                response
            }
            Binding::NotReady { reason } => {
                audit.emit("error", &format!("not_ready: {reason}"));
                response::unavailable("the identity bindings are still loading; retry")
            }
            Binding::Unbound { workload, reason } => {
                audit.workload = workload.unwrap_or_default();
                audit.emit("denied", &format!("unbound: {reason}"));
                response::identity_not_found()
            }
            Binding::Bound {
                workload,
                identities,
            } => {
                audit.workload = workload;
                let identity = match select(&identities, &query.selector) {
                    Ok(identity) => identity,
                    Err(denial) => {
                        audit.emit("denied", &denial.to_string());
                        return response::identity_not_found();
                    }
                };
                audit.identity = identity.client_id.clone();
                let fetch_started = Instant::now();
                let fetched = self.cache.get(&identity, &query.resource).await;
                if !matches!(fetched, Ok((_, CacheOutcome::Hit))) {
                    self.metrics
                        .upstream_seconds
                        .observe(fetch_started.elapsed().as_secs_f64());
                }
                match fetched {
                    Ok((token, outcome)) => {
                        audit.cache = outcome.as_str();
                        audit.emit("granted", "bound");
                        response::token(&token, &query.resource, self.cache.now_secs())
                    }
                    Err(e) => {
                        audit.cache = CacheOutcome::Miss.as_str();
                        audit.emit("error", &e.to_string());
                        let response = e.to_response();
                        self.metrics
                            .upstream_errors
                            .get_or_create(&StatusLabels {
                                status: response.status().as_str().to_owned(),
                            })
                            .inc();
                        response
                    }
                }
            }
        }
    }

    /// One GET to IMDS as the node: `path` is canonical; the caller's query is passed as it came (it cannot change the
    /// path); of the caller's headers only `Metadata` goes along (IMDS refuses `X-Forwarded-For`, and nothing else
    /// is needed).
    async fn forward(
        &self,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Response<Full<Bytes>> {
        let target = match query {
            Some(q) => format!("{path}?{q}"),
            None => path.to_owned(),
        };
        let headers = forward_headers(headers);
        match self.upstream.get(&target, &headers).await {
            Ok(answer) => source::passthrough(&answer),
            Err(e) => {
                tracing::warn!(target: "imds", error = %e, path, "forwarding to IMDS failed");
                response::unavailable("The metadata service is unreachable")
            }
        }
    }
}

fn forward_headers(from: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for value in from.get_all("metadata") {
        out.append("metadata", value.clone());
    }
    out
}

fn cgroup_of(caller: &Attestation) -> String {
    caller
        .cgroup
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// The fields of one audit event, filled in as the decision is made.
struct Audit<'a> {
    caller: &'a Attestation,
    metrics: &'a Metrics,
    started: Instant,
    workload: Workload,
    identity: String,
    resource: String,
    cache: &'static str,
}

impl<'a> Audit<'a> {
    fn new(caller: &'a Attestation, started: Instant, metrics: &'a Metrics) -> Self {
        Audit {
            caller,
            metrics,
            started,
            workload: Workload::default(),
            identity: String::new(),
            resource: String::new(),
            cache: "none",
        }
    }

    fn emit(&self, outcome: &'static str, reason: &str) {
        let elapsed = self.started.elapsed();
        self.metrics
            .token_requests
            .get_or_create(&TokenLabels {
                outcome,
                cache: self.cache,
            })
            .inc();
        self.metrics.request_seconds.observe(elapsed.as_secs_f64());
        let w = &self.workload;
        tracing::info!(
            target: "audit",
            event = "token",
            pid = self.caller.pid,
            cgroup = %cgroup_of(self.caller),
            namespace = w.namespace.as_deref().unwrap_or(""),
            pod = w.pod.as_deref().unwrap_or(""),
            pod_uid = w.pod_uid.as_deref().unwrap_or(""),
            container = w.container.as_deref().unwrap_or(""),
            identity = self.identity.as_str(),
            resource = self.resource.as_str(),
            outcome,
            reason,
            cache = self.cache,
            latency_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
        );
    }
}

#[cfg(test)]
mod tests;
