//! The service callers talk to: one request from an attested caller in, an IMDS-exact answer out. The token path
//! checks the request, resolves the caller's binding, picks the identity and asks the token cache; other metadata
//! paths are forwarded as the node or refused. Every token decision is audited (`audit`).

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

use super::{
    audit::{Audit, cgroup_of},
    budget::{CallerBusy, UpstreamBudget},
    config::{Config, ConfigError},
    path::{self, Route},
    request, response,
    token::{
        CacheOutcome, EntraTokenSource, Fetcher, HttpUpstream, ImdsTokenSource, TokenCache,
        TokenSource, Upstream,
    },
};
use crate::{
    attest::Attestation,
    identity::{Binding, Denial, Resolve, SecretStore, select},
    telemetry::metrics::{Metrics, ReasonLabels, StatusLabels},
};

/// The service: one per process, shared by all connections.
pub struct Service<R> {
    config: Config,
    resolver: R,
    cache: TokenCache,
    upstream: Arc<dyn Upstream>,
    budget: Arc<UpstreamBudget>,
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
        let budget = UpstreamBudget::new(
            config.max_concurrent_fetches,
            config.max_upstream_per_caller,
        );
        let fetcher = Fetcher {
            imds: ImdsTokenSource::sharing(
                Arc::clone(&upstream),
                config.retry.clone(),
                budget.global(),
            ),
            entra: EntraTokenSource::new(
                config.authority_host.clone(),
                Arc::new(secrets),
                config.retry.clone(),
            ),
            // azure_core's own retries are bounded by the same policy; this also covers reading the secret.
            entra_timeout: config.retry.total + Duration::from_secs(2),
        };
        let mut service = Self::with_parts(config, resolver, upstream, Arc::new(fetcher));
        service.budget = budget;
        Ok(service)
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
            budget: UpstreamBudget::new(
                config.max_concurrent_fetches,
                config.max_upstream_per_caller,
            ),
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

    /// Follows the set of bound client ids (lower case; `identity::BindingSource::bound_client_ids`) and drops cached tokens
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
        let route = path::route(parts.uri.path());
        if request::is_forwarded(&parts.headers) {
            if matches!(route, Route::Token) {
                Audit::new(caller, started, &self.metrics).emit("denied", "x_forwarded_for");
            } else {
                // Debug: a pod can send these as fast as it likes; the token path's refusals are audited.
                tracing::debug!(target: "imds", pid = caller.pid, cgroup = %cgroup_of(caller), path = parts.uri.path(), "request with X-Forwarded-For refused");
            }
            return response::forwarded_request();
        }
        match route {
            Route::Token => self.token(caller, &parts, started).await,
            Route::Instance(path) if self.config.forward_instance_metadata => {
                let response = self
                    .forward(caller, &path, parts.uri.query(), &parts.headers)
                    .await;
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
        // They are how SDKs find IMDS, not attacks: counted and audited as probes, so that denials mean something.
        if !request::has_metadata_header(&parts.headers) {
            if parts.headers.contains_key("metadata") {
                audit.emit("denied", "metadata_header_invalid");
            } else {
                audit.emit("probe", "metadata_header_missing");
            }
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
                let response = self
                    .forward(caller, path, parts.uri.query(), &parts.headers)
                    .await;
                tracing::info!(target: "imds", pid = caller.pid, status = response.status().as_u16(), "node exception forwarded");
                audit.emit("forwarded", "node_exception");
                response
            }
            Binding::NotReady { reason } => {
                audit.emit("error", &format!("not_ready: {reason}"));
                response::unavailable("the identity bindings are still loading; retry")
            }
            Binding::Refused { workload, reason } => {
                audit.workload = workload;
                audit.emit("denied", &reason);
                response::error(
                    StatusCode::FORBIDDEN,
                    "access_denied",
                    "This connection does not come from the calling pod's own address; see the node agent's audit log",
                )
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
                        return match denial {
                            Denial::Ambiguous(_) => response::several_identities(),
                            Denial::NothingBound | Denial::NotBound => {
                                response::identity_not_found()
                            }
                        };
                    }
                };
                audit.identity = identity.client_id.clone();
                // The caller's own share of IMDS: its requests wait for its own earlier ones, not for other callers.
                let share = self
                    .budget
                    .caller_share(caller.cgroup_id, self.config.retry.total)
                    .await;
                let _share = match share {
                    Ok(share) => share,
                    Err(busy) => {
                        audit.emit("limited", "caller_busy");
                        return self.caller_busy(&busy);
                    }
                };
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
        caller: &Attestation,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Response<Full<Bytes>> {
        let wait = self.config.retry.total;
        let _share = match self.budget.caller_share(caller.cgroup_id, wait).await {
            Ok(share) => share,
            Err(busy) => return self.caller_busy(&busy),
        };
        // The global permit is waited for within the same bound; the semaphore is never closed.
        let Ok(Ok(_permit)) =
            tokio::time::timeout(wait, self.budget.global().acquire_owned()).await
        else {
            return response::unavailable("The metadata service is busy");
        };
        let target = match query {
            Some(q) => format!("{path}?{q}"),
            None => path.to_owned(),
        };
        let headers = forward_headers(headers);
        match self.upstream.get(&target, &headers).await {
            Ok(answer) => response::passthrough(&answer),
            Err(e) => {
                tracing::warn!(target: "imds", error = %e, path, "forwarding to IMDS failed");
                response::unavailable("The metadata service is unreachable")
            }
        }
    }

    /// The 429 for a caller over its share of requests to IMDS, counted.
    fn caller_busy(&self, busy: &CallerBusy) -> Response<Full<Bytes>> {
        self.metrics
            .caller_limited
            .get_or_create(&ReasonLabels { reason: "upstream" })
            .inc();
        response::caller_busy(&busy.to_string())
    }
}

fn forward_headers(from: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for value in from.get_all("metadata") {
        out.append("metadata", value.clone());
    }
    out
}

#[cfg(test)]
mod tests;
