//! Where a service principal's client secret lives ([`SecretRef`]) and who can read it ([`SecretStore`]): in
//! Kubernetes mode a Secret read through the API server ([`super::kube::KubeSecrets`]); standalone, nobody
//! ([`NoSecretStore`]). The token sources upstream only see these traits.

use std::future::Future;

use futures_util::future::BoxFuture;

/// A key in a Kubernetes Secret.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SecretRef {
    pub namespace: String,
    pub name: String,
    pub key: String,
}

/// Where service-principal secrets come from (a Kubernetes Secret, in Kubernetes mode).
///
/// Implementations may be written with `async fn secret(..)`.
pub trait SecretStore: Send + Sync + 'static {
    type Error: std::error::Error + Send + Sync + 'static;
    fn secret(&self, r: &SecretRef) -> impl Future<Output = Result<String, Self::Error>> + Send;
}

/// The object-safe form of [`SecretStore`], so that its users need not be generic over it. Implemented for every
/// `SecretStore`.
pub trait DynSecretStore: Send + Sync + 'static {
    fn secret_dyn<'a>(&'a self, r: &'a SecretRef) -> BoxFuture<'a, Result<String, String>>;
}

impl<S: SecretStore> DynSecretStore for S {
    fn secret_dyn<'a>(&'a self, r: &'a SecretRef) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move { self.secret(r).await.map_err(|e| e.to_string()) })
    }
}

/// For deployments without service-principal identities (standalone mode): every lookup fails.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoSecretStore;

#[derive(Debug, thiserror::Error)]
#[error("no secret store is configured, so service-principal identities cannot be served")]
pub struct NoSecretStoreError;

impl SecretStore for NoSecretStore {
    type Error = NoSecretStoreError;
    async fn secret(&self, _: &SecretRef) -> Result<String, NoSecretStoreError> {
        Err(NoSecretStoreError)
    }
}
