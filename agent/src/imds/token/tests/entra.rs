//! Tests of the Entra ID source against a fake Entra ID transport.

use std::sync::{Arc, Mutex};

use azure_core::http::{
    AsyncRawResponse, HttpClient, Request, StatusCode, Transport, headers::Headers,
};
use futures_util::future::BoxFuture;

use crate::{
    identity::{Identity, IdentityKind, SecretRef, SecretStore},
    imds::token::{
        FetchError, RetryPolicy,
        entra::{EntraTokenSource, scope_for},
        source::unix_now,
    },
};

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
    ) -> BoxFuture<'c, azure_core::Result<AsyncRawResponse>>
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

fn source(fake: Arc<FakeEntra>) -> EntraTokenSource {
    let retry = RetryPolicy {
        max_attempts: 1,
        ..RetryPolicy::default()
    };
    EntraTokenSource::new("https://login.test", Arc::new(OneSecret), retry)
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
    let s = EntraTokenSource::new(
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
    let s = EntraTokenSource::new("https://127.0.0.1:1", Arc::new(OneSecret), retry);
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
