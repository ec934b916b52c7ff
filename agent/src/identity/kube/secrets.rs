//! Service-principal client secrets, read from Kubernetes Secrets on demand (never cached here: the token cache
//! upstream keeps tokens, not secrets, and a rotated Secret is picked up on the next token fetch).

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use crate::identity::secrets::{SecretRef, SecretStore};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("Secret {namespace}/{name} not found")]
    NotFound { namespace: String, name: String },
    #[error("Secret {namespace}/{name} has no data")]
    Empty { namespace: String, name: String },
    #[error(
        "Secret {namespace}/{name} has no key {key:?} and {count} others; put the client secret under {key:?}"
    )]
    NoKey {
        namespace: String,
        name: String,
        key: String,
        count: usize,
    },
    #[error("Secret {namespace}/{name} key {key:?} is not UTF-8")]
    NotUtf8 {
        namespace: String,
        name: String,
        key: String,
    },
    #[error("reading Secret {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// Reads Secrets through the API server.
#[derive(Clone)]
pub struct KubeSecrets {
    client: Client,
}

impl std::fmt::Debug for KubeSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubeSecrets")
    }
}

impl KubeSecrets {
    pub fn new(client: Client) -> Self {
        KubeSecrets { client }
    }

    /// The value under `r.key`. NMI took the first value of the Secret whatever its key; a Secret with exactly one
    /// key is therefore read whatever that key is called, so existing Secrets keep working, while a Secret with
    /// several keys must use `r.key` (Go's map order made NMI's choice there effectively random).
    pub async fn secret(&self, r: &SecretRef) -> Result<String, SecretError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &r.namespace);
        let secret = match api.get_opt(&r.name).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                return Err(SecretError::NotFound {
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                });
            }
            Err(source) => {
                return Err(SecretError::Api {
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                    source,
                });
            }
        };
        pick(r, secret)
    }
}

/// The token sources' view of secrets: service-principal identities get their client secret from here.
impl SecretStore for KubeSecrets {
    type Error = SecretError;

    async fn secret(&self, r: &SecretRef) -> Result<String, SecretError> {
        KubeSecrets::secret(self, r).await
    }
}

fn pick(r: &SecretRef, secret: Secret) -> Result<String, SecretError> {
    let mut data = secret.data.unwrap_or_default();
    let (key, value) = match data.remove_entry(&r.key) {
        Some(kv) => kv,
        None if data.len() == 1 => data.pop_first().ok_or_else(|| SecretError::Empty {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
        })?,
        None if data.is_empty() => {
            return Err(SecretError::Empty {
                namespace: r.namespace.clone(),
                name: r.name.clone(),
            });
        }
        None => {
            return Err(SecretError::NoKey {
                namespace: r.namespace.clone(),
                name: r.name.clone(),
                key: r.key.clone(),
                count: data.len(),
            });
        }
    };
    String::from_utf8(value.0).map_err(|_| SecretError::NotUtf8 {
        namespace: r.namespace.clone(),
        name: r.name.clone(),
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(pairs: &[(&str, &[u8])]) -> Secret {
        Secret {
            data: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    fn r() -> SecretRef {
        SecretRef {
            namespace: "ns".into(),
            name: "s".into(),
            key: "clientSecret".into(),
        }
    }

    #[test]
    fn picks_the_key_or_the_only_value() {
        assert_eq!(
            pick(&r(), secret(&[("clientSecret", b"pw"), ("other", b"x")])).ok(),
            Some("pw".into())
        );
        assert_eq!(
            pick(&r(), secret(&[("password", b"pw2")])).ok(),
            Some("pw2".into())
        );
        assert!(matches!(
            pick(&r(), secret(&[("a", b"1"), ("b", b"2")])),
            Err(SecretError::NoKey { count: 2, .. })
        ));
        assert!(matches!(
            pick(&r(), secret(&[])),
            Err(SecretError::Empty { .. })
        ));
        assert!(matches!(
            pick(&r(), secret(&[("clientSecret", &[0xff, 0xfe])])),
            Err(SecretError::NotUtf8 { .. })
        ));
    }
}
