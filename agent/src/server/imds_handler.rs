//! The IMDS look-alike as the server's [`Handler`]: the one place the server meets `imds`, so that the arrow points
//! from the front door to the service and not back.

use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming};

use super::Handler;
use crate::{attest::Attestation, identity::Resolve, imds};

impl<R: Resolve + Send + Sync + 'static> Handler for imds::Service<R> {
    async fn handle(
        &self,
        caller: Arc<Attestation>,
        req: Request<Incoming>,
    ) -> Response<Full<Bytes>> {
        imds::Service::handle(self, &caller, req).await
    }

    /// IMDS's own error shape, so SDKs parse a refusal as they parse IMDS's 4xx.
    fn refusal(&self, status: StatusCode, reason: &'static str) -> Response<Full<Bytes>> {
        imds::response::error(status, "invalid_request", reason)
    }
}
