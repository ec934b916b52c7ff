//! The IMDS look-alike: answers a redirected caller exactly as the Azure Instance Metadata Service would, with the
//! identity the caller is bound to.
//!
//! # Use
//! ```ignore
//! use nmi_agent::{identity::NoSecretStore, imds::{self, Config}};
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
//! - The caller's binding picks the identity ([`crate::identity::select()`]). Unbound, not bound or ambiguous: 400
//!   `Identity not found`, IMDS's own answer for an identity the VM lacks, so SDKs treat the credential as
//!   unavailable; nothing goes upstream. A node exception is forwarded unchanged, as the node.
//! - Tokens come from the cache ([`TokenCache`]), else one single-flight fetch: IMDS by the identity's `client_id` for
//!   user-assigned identities ([`ImdsTokenSource`]), Entra ID client credentials for service principals
//!   ([`EntraTokenSource`]).
//! - IMDS's failures pass through with its status and body (404/410/429/5xx keep their SDK retry meaning) after
//!   bounded retries of 429/5xx/connect errors/timeouts ([`RetryPolicy`]: 3 attempts within 10 s by
//!   default). **IMDS unreachable** (connect error or timeout on the last attempt): **503**
//!   `{"error":"temporarily_unavailable",..}` with `Retry-After: 2`; every SDK reviewed retries a 503, and none reads
//!   it as "identity unavailable".
//! - One audit event per token decision: `tracing` target `audit`, `event = "token"`, with `pid, cgroup, namespace,
//!   pod, pod_uid, container, identity, resource, outcome (granted|denied|error|forwarded), reason, cache
//!   (hit|miss|none), latency_ms`.
//!
//! # Layout
//! The face callers see, and where tokens come from below it:
//! - `service`: [`Service`], one request in, one answer out; `audit`: one event per token decision.
//! - [`path`], [`request`], [`response`]: the wire format (normalised paths, token queries, IMDS-shaped answers).
//! - `config`: [`Config`].
//! - `token`: the token cache, the IMDS and Entra ID token sources, and the HTTP client to IMDS. Nothing in it
//!   knows about callers or HTTP answers.

mod audit;
pub mod budget;
pub mod config;
pub mod path;
pub mod request;
pub mod response;
pub mod service;
pub mod token;

pub use config::{Config, ConfigError};
pub use path::Route;
pub use service::Service;
pub use token::{
    CacheConfig, CacheOutcome, CacheStats, EntraTokenSource, FetchError, HttpUpstream,
    ImdsTokenSource, RetryPolicy, Token, TokenCache, TokenSource, Upstream, UpstreamResponse,
};
