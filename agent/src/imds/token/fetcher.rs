//! The token source the service runs with: by identity kind, IMDS for user-assigned identities and Entra ID for
//! service principals.

use std::time::Duration;

use futures_util::future::BoxFuture;

use super::{
    entra::EntraTokenSource,
    imds::ImdsTokenSource,
    source::{FetchError, Token, TokenSource},
};
use crate::identity::{Identity, IdentityKind};

/// Dispatches by identity kind: user-assigned identities to IMDS, service principals to Entra ID.
pub struct Fetcher {
    pub imds: ImdsTokenSource,
    pub entra: EntraTokenSource,
    /// Bound on a whole service-principal fetch (Entra ID has no per-request timeout of its own here).
    pub entra_timeout: Duration,
}

impl TokenSource for Fetcher {
    fn fetch<'a>(
        &'a self,
        identity: &'a Identity,
        resource: &'a str,
    ) -> BoxFuture<'a, Result<Token, FetchError>> {
        match &identity.kind {
            IdentityKind::UserAssigned => self.imds.fetch(identity, resource),
            IdentityKind::ServicePrincipal { .. } => Box::pin(async move {
                tokio::time::timeout(self.entra_timeout, self.entra.fetch(identity, resource))
                    .await
                    .unwrap_or_else(|_| {
                        Err(FetchError::EntraUnavailable(format!(
                            "no answer within {:?}",
                            self.entra_timeout
                        )))
                    })
            }),
        }
    }
}
