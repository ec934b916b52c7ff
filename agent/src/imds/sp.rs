//! Service-principal identities (AzureIdentity type 1): a client-credentials token from Entra ID, through
//! `azure_identity`'s `ClientSecretCredential`, shaped as IMDS's answer by the caller.

use std::{future::Future, sync::Arc};

use azure_core::{
    cloud::{CloudConfiguration, CustomConfiguration},
    credentials::{Secret, TokenCredential},
    error::ErrorKind,
    http::{ClientOptions, ExponentialRetryOptions, RetryOptions, Transport},
};
use azure_identity::{ClientSecretCredential, ClientSecretCredentialOptions};

use super::{
    response::Token,
    source::{FetchError, unix_now},
    upstream::{BoxFuture, RetryPolicy},
};
use crate::identity::{Identity, IdentityKind, SecretRef};

/// Where service-principal secrets come from (a Kubernetes Secret, in Kubernetes mode).
///
/// Implementations may be written with `async fn secret(..)`.
pub trait SecretStore: Send + Sync + 'static {
    type Error: std::error::Error + Send + Sync + 'static;
    fn secret(&self, r: &SecretRef) -> impl Future<Output = Result<String, Self::Error>> + Send;
}

/// The object-safe form of [`SecretStore`], so the service need not be generic over it. Implemented for every
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

/// Client-credentials tokens for service principals.
pub struct SpTokenSource {
    authority_host: String,
    secrets: Arc<dyn DynSecretStore>,
    retry: RetryPolicy,
    /// Replaces the HTTP transport (tests); `None` uses azure_core's default (reqwest with rustls).
    transport: Option<Transport>,
}

impl SpTokenSource {
    /// `authority_host` is e.g. `https://login.microsoftonline.com` (azure_identity requires https). The retry bounds
    /// are mapped onto azure_core's retry policy.
    pub fn new(
        authority_host: impl Into<String>,
        secrets: Arc<dyn DynSecretStore>,
        retry: RetryPolicy,
    ) -> Self {
        SpTokenSource {
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

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core::http::{AsyncRawResponse, HttpClient, Request, StatusCode, headers::Headers};
    use std::sync::Mutex;

    #[derive(Debug)]
    struct FakeEntra {
        status: u16,
        body: &'static str,
        seen: Mutex<Vec<(String, String)>>,
    }

    // Written out instead of using `#[async_trait]`, which azure_core does not re-export.
    impl HttpClient for FakeEntra {
        fn execute_request<'a, 'b, 'c>(
            &'a self,
            request: &'b Request,
        ) -> std::pin::Pin<Box<dyn Future<Output = azure_core::Result<AsyncRawResponse>> + Send + 'c>>
        where
            'a: 'c,
            'b: 'c,
            Self: 'c,
        {
            let body = bytes::Bytes::from(request.body());
            if let Ok(mut seen) = self.seen.lock() {
                seen.push((
                    request.url().to_string(),
                    String::from_utf8_lossy(&body).into_owned(),
                ));
            }
            let response = AsyncRawResponse::from_bytes(
                StatusCode::from(self.status),
                Headers::new(),
                self.body.as_bytes(),
            );
            Box::pin(async move { Ok(response) })
        }
    }

    struct OneSecret;
    #[derive(Debug, thiserror::Error)]
    #[error("no such secret")]
    struct Missing;
    impl SecretStore for OneSecret {
        type Error = Missing;
        async fn secret(&self, r: &SecretRef) -> Result<String, Missing> {
            if r.name == "sp-secret" {
                Ok("s3cr3t&=".into())
            } else {
                Err(Missing)
            }
        }
    }

    fn sp(secret_name: &str) -> Identity {
        Identity {
            name: "sp".into(),
            namespace: Some("ns".into()),
            client_id: "00000000-0000-0000-0000-0000000000aa".into(),
            resource_id: None,
            object_id: None,
            kind: IdentityKind::ServicePrincipal {
                tenant_id: "tenant-1".into(),
                secret: SecretRef {
                    namespace: "ns".into(),
                    name: secret_name.into(),
                    key: "clientSecret".into(),
                },
            },
        }
    }

    fn source(fake: Arc<FakeEntra>) -> SpTokenSource {
        let retry = RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        };
        SpTokenSource::new("https://login.test", Arc::new(OneSecret), retry)
            .with_transport(Transport::new(fake))
    }

    #[tokio::test]
    async fn client_credentials_against_the_configured_authority() {
        let fake = Arc::new(FakeEntra {
            status: 200,
            body: r#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"sp-token"}"#,
            seen: Mutex::new(Vec::new()),
        });
        let before = unix_now();
        let token = source(fake.clone())
            .fetch(&sp("sp-secret"), "https://vault.azure.net")
            .await
            .expect("token");
        assert_eq!(token.access_token, "sp-token");
        assert_eq!(token.client_id, "00000000-0000-0000-0000-0000000000aa");
        assert!(
            token.expires_on >= before + 3598 && token.expires_on <= unix_now() + 3600,
            "{token:?}"
        );
        assert_eq!(token.token_type, "Bearer");
        let seen = fake.seen.lock().map(|s| s.clone()).unwrap_or_default();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0, "https://login.test/tenant-1/oauth2/v2.0/token");
        let form = &seen[0].1;
        assert!(form.contains("grant_type=client_credentials"), "{form}");
        assert!(
            form.contains("client_id=00000000-0000-0000-0000-0000000000aa"),
            "{form}"
        );
        assert!(form.contains("client_secret=s3cr3t%26%3D"), "{form}");
        assert!(
            form.contains("scope=https%3A%2F%2Fvault.azure.net%2F.default"),
            "{form}"
        );
    }

    #[tokio::test]
    async fn entra_refusal_carries_its_status() {
        let fake = Arc::new(FakeEntra {
            status: 401,
            body: r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.","error_codes":[7000215]}"#,
            seen: Mutex::new(Vec::new()),
        });
        let err = source(fake)
            .fetch(&sp("sp-secret"), "https://vault.azure.net")
            .await
            .expect_err("refused");
        assert!(
            matches!(&err, FetchError::Entra { status: 401, message } if message.contains("AADSTS7000215")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn missing_secret_and_wrong_kind() {
        let fake = Arc::new(FakeEntra {
            status: 200,
            body: "{}",
            seen: Mutex::new(Vec::new()),
        });
        let err = source(fake.clone())
            .fetch(&sp("other"), "r")
            .await
            .expect_err("no secret");
        assert_eq!(err, FetchError::Secret("no such secret".into()));
        let mut uami = sp("sp-secret");
        uami.kind = IdentityKind::UserAssigned;
        assert!(matches!(
            source(fake.clone()).fetch(&uami, "r").await,
            Err(FetchError::Unsupported(_))
        ));
        assert!(
            fake.seen.lock().map(|s| s.is_empty()).unwrap_or(false),
            "nothing was sent to Entra ID"
        );
    }

    #[tokio::test]
    async fn plain_http_authority_is_refused_by_azure_identity() {
        let fake = Arc::new(FakeEntra {
            status: 200,
            body: "{}",
            seen: Mutex::new(Vec::new()),
        });
        let s = SpTokenSource::new(
            "http://login.test",
            Arc::new(OneSecret),
            RetryPolicy::default(),
        )
        .with_transport(Transport::new(fake));
        assert!(matches!(
            s.fetch(&sp("sp-secret"), "r").await,
            Err(FetchError::EntraUnavailable(_))
        ));
    }

    /// The default transport (reqwest with rustls) is built and used: no TLS provider conflict with other rustls
    /// users in the binary (kube uses ring), and an unreachable authority is a transient error, not a panic.
    #[tokio::test]
    async fn default_transport_reports_unreachable_authority() {
        let retry = RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        };
        let s = SpTokenSource::new("https://127.0.0.1:1", Arc::new(OneSecret), retry);
        let err = s
            .fetch(&sp("sp-secret"), "https://vault.azure.net")
            .await
            .expect_err("nothing listens there");
        assert!(matches!(err, FetchError::EntraUnavailable(_)), "{err:?}");
    }

    #[test]
    fn scopes() {
        assert_eq!(
            scope_for("https://management.azure.com/"),
            "https://management.azure.com//.default"
        );
        assert_eq!(
            scope_for("https://vault.azure.net"),
            "https://vault.azure.net/.default"
        );
    }
}
