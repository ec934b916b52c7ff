//! Service-principal identities (AzureIdentity type 1): a client-credentials token from Entra ID, through
//! `azure_identity`'s `ClientSecretCredential`, with the client secret read from the [`DynSecretStore`] on every
//! fetch (so a rotated Secret is picked up). Shaped as IMDS's answer by the caller.

use std::sync::Arc;

use azure_core::{
    cloud::{CloudConfiguration, CustomConfiguration},
    credentials::{Secret, TokenCredential},
    error::ErrorKind,
    http::{ClientOptions, ExponentialRetryOptions, RetryOptions, Transport},
};
use azure_identity::{ClientSecretCredential, ClientSecretCredentialOptions};
use futures_util::future::BoxFuture;

use super::{
    retry::RetryPolicy,
    source::{FetchError, Token, unix_now},
};
use crate::identity::{DynSecretStore, Identity, IdentityKind};

/// Client-credentials tokens for service principals.
pub struct EntraTokenSource {
    authority_host: String,
    secrets: Arc<dyn DynSecretStore>,
    retry: RetryPolicy,
    /// Replaces the HTTP transport (tests); `None` uses azure_core's default (reqwest with rustls).
    transport: Option<Transport>,
}

impl EntraTokenSource {
    /// `authority_host` is e.g. `https://login.microsoftonline.com` (azure_identity requires https). The retry bounds
    /// are mapped onto azure_core's retry policy.
    pub fn new(
        authority_host: impl Into<String>,
        secrets: Arc<dyn DynSecretStore>,
        retry: RetryPolicy,
    ) -> Self {
        EntraTokenSource {
            authority_host: authority_host.into(),
            secrets,
            retry,
            transport: None,
        }
    }

    /// Sends Entra ID requests through `transport` instead of the default HTTP client.
    pub fn with_transport(mut self, transport: Transport) -> Self {
        self.transport = Some(transport);
        self
    }

    pub fn fetch<'a>(
        &'a self,
        identity: &'a Identity,
        resource: &'a str,
    ) -> BoxFuture<'a, Result<Token, FetchError>> {
        Box::pin(self.fetch_sp(identity, resource))
    }

    async fn fetch_sp(&self, identity: &Identity, resource: &str) -> Result<Token, FetchError> {
        let IdentityKind::ServicePrincipal { tenant_id, secret } = &identity.kind else {
            return Err(FetchError::Unsupported(format!(
                "{} is not a service principal",
                identity.name
            )));
        };
        let secret = self
            .secrets
            .secret_dyn(secret)
            .await
            .map_err(FetchError::Secret)?;
        let credential = ClientSecretCredential::new(
            tenant_id,
            identity.client_id.clone(),
            Secret::new(secret),
            Some(self.options()),
        )
        .map_err(|e| FetchError::EntraUnavailable(e.to_string()))?;
        let scope = scope_for(resource);
        let token = credential
            .get_token(&[&scope], None)
            .await
            .map_err(entra_error)?;
        let now = unix_now();
        let expires_on = u64::try_from(token.expires_on.unix_timestamp()).unwrap_or(0);
        Ok(Token {
            access_token: token.token.secret().to_owned(),
            client_id: identity.client_id.clone(),
            expires_on,
            // Entra ID does not return nbf in the token response; the token is valid from issuance.
            not_before: now,
            // azure_identity drops ext_expires_in; the ordinary lifetime is the safe value.
            ext_expires_on: expires_on,
            token_type: "Bearer".to_owned(),
        })
    }

    fn options(&self) -> ClientSecretCredentialOptions {
        let mut cloud = CustomConfiguration::default();
        cloud.authority_host = self.authority_host.clone();
        let mut client_options = ClientOptions {
            cloud: Some(Arc::new(CloudConfiguration::from(cloud))),
            retry: RetryOptions::exponential(ExponentialRetryOptions {
                initial_delay: time_duration(self.retry.base_delay),
                max_retries: self.retry.max_attempts.saturating_sub(1),
                max_total_elapsed: time_duration(self.retry.total),
                max_delay: time_duration(self.retry.max_retry_after),
            }),
            ..ClientOptions::default()
        };
        client_options.transport = self.transport.clone();
        ClientSecretCredentialOptions { client_options }
    }
}

fn time_duration(d: std::time::Duration) -> azure_core::time::Duration {
    azure_core::time::Duration::try_from(d).unwrap_or(azure_core::time::Duration::MAX)
}

/// The v2 scope for a v1 resource: `<resource>/.default`. A resource ending in `/` gives `//.default`, which Entra ID
/// reads as "audience with the trailing slash", matching what IMDS puts in `aud`.
pub fn scope_for(resource: &str) -> String {
    format!("{resource}/.default")
}

/// Finds the HTTP status in azure_identity's error (it wraps the HTTP error in a credential error).
fn entra_error(e: azure_core::Error) -> FetchError {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = current {
        if let Some(ErrorKind::HttpResponse { status, .. }) =
            err.downcast_ref::<azure_core::Error>().map(|e| e.kind())
        {
            return FetchError::Entra {
                status: u16::from(*status),
                message: e.to_string(),
            };
        }
        current = err.source();
    }
    FetchError::EntraUnavailable(e.to_string())
}
