//! What a cached token is for. A struct, not a joined string: two different identities can never share a key,
//! whatever their strings hold (a client id containing `|`, a Secret name containing `/`).

use crate::identity::{Identity, IdentityKind, SecretRef};

/// The credential a token was fetched with and the resource (`aud`) it was asked for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub credential: Credential,
    /// Kept exactly, since `aud` is what was asked: a trailing slash is another resource.
    pub resource: String,
}

/// Everything a fetched token depends on besides the resource.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Credential {
    /// A user-assigned managed identity, by client id (lower case: GUIDs compare case-insensitively).
    ManagedIdentity { client_id: String },
    /// A service principal: client id and tenant (lower case), and the Secret its token is fetched with. Two
    /// AzureIdentities that share a client id but not a secret (say, in two namespaces) must never share a token: the
    /// secret is what proves the right to it.
    ServicePrincipal {
        client_id: String,
        tenant_id: String,
        secret: SecretRef,
    },
}

impl CacheKey {
    pub fn new(identity: &Identity, resource: &str) -> Self {
        let client_id = identity.client_id.to_ascii_lowercase();
        let credential = match &identity.kind {
            IdentityKind::UserAssigned => Credential::ManagedIdentity { client_id },
            IdentityKind::ServicePrincipal { tenant_id, secret } => Credential::ServicePrincipal {
                client_id,
                tenant_id: tenant_id.to_ascii_lowercase(),
                secret: secret.clone(),
            },
        };
        CacheKey {
            credential,
            resource: resource.to_owned(),
        }
    }

    /// The client id (lower case) the token belongs to, whatever the kind: bindings are tracked by client id.
    pub fn client_id(&self) -> &str {
        match &self.credential {
            Credential::ManagedIdentity { client_id }
            | Credential::ServicePrincipal { client_id, .. } => client_id,
        }
    }
}
