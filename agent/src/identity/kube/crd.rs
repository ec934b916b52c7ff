//! The `aadpodidentity.k8s.io/v1` custom resources, with the field names of aad-pod-identity's manifests (v1.6+,
//! camelCase), so that existing AzureIdentity / AzureIdentityBinding / AzurePodIdentityException YAML works as is.
//!
//! aad-pod-identity decoded these with Go's encoding/json, which matches field names case-insensitively, and before
//! v1.6 its own tags were lower case (`clientid`, `resourceid`, ...). Clusters whose CRDs predate structural schemas
//! keep such fields unpruned, so the old spellings are accepted as aliases. Every field is optional here: one odd
//! object must not make the whole list undecodable, which would stall the reflector for every other object.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::SecretReference;
use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// The pod label whose value selects bindings (`AzureIdentityBinding.spec.selector`).
pub const BINDING_LABEL: &str = "aadpodidbinding";
/// AzureIdentity annotation that makes one identity namespaced even when matching is cluster-wide.
pub const BEHAVIOR_ANNOTATION: &str = "aadpodidentity.k8s.io/Behavior";
pub const BEHAVIOR_NAMESPACED: &str = "namespaced";

/// `AzureIdentity.spec.type` 0.
pub const TYPE_USER_ASSIGNED_MSI: i64 = 0;
/// `AzureIdentity.spec.type` 1.
pub const TYPE_SERVICE_PRINCIPAL: i64 = 1;
/// `AzureIdentity.spec.type` 2 (certificate); not supported by nmi-agent.
pub const TYPE_SERVICE_PRINCIPAL_CERTIFICATE: i64 = 2;

#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzureIdentity",
    plural = "azureidentities",
    namespaced,
    schema = "disabled"
)]
pub struct AzureIdentitySpec {
    /// 0 user-assigned MSI, 1 service principal (secret), 2 service principal (certificate).
    #[serde(rename = "type", alias = "Type", default)]
    pub type_: Option<i64>,
    #[serde(
        rename = "resourceID",
        alias = "resourceid",
        alias = "ResourceID",
        default
    )]
    pub resource_id: Option<String>,
    #[serde(rename = "clientID", alias = "clientid", alias = "ClientID", default)]
    pub client_id: Option<String>,
    #[serde(
        rename = "clientPassword",
        alias = "clientpassword",
        alias = "ClientPassword",
        default
    )]
    pub client_password: Option<SecretReference>,
    #[serde(rename = "tenantID", alias = "tenantid", alias = "TenantID", default)]
    pub tenant_id: Option<String>,
    #[serde(rename = "auxiliaryTenantIDs", alias = "auxiliarytenantids", default)]
    pub auxiliary_tenant_ids: Option<Vec<String>>,
    #[serde(rename = "adResourceID", alias = "adresourceid", default)]
    pub ad_resource_id: Option<String>,
    #[serde(rename = "adEndpoint", alias = "adendpoint", default)]
    pub ad_endpoint: Option<String>,
    #[serde(default)]
    pub replicas: Option<i32>,
}

#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzureIdentityBinding",
    plural = "azureidentitybindings",
    namespaced,
    schema = "disabled"
)]
pub struct AzureIdentityBindingSpec {
    /// Name of the AzureIdentity (in the binding's namespace).
    #[serde(
        rename = "azureIdentity",
        alias = "azureidentity",
        alias = "AzureIdentity",
        default
    )]
    pub azure_identity: Option<String>,
    /// Matched against the pod label `aadpodidbinding`.
    #[serde(alias = "Selector", default)]
    pub selector: Option<String>,
    /// Unused by NMI and by nmi-agent; kept so that objects round-trip.
    #[serde(default)]
    pub weight: Option<i64>,
}

#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[kube(
    group = "aadpodidentity.k8s.io",
    version = "v1",
    kind = "AzurePodIdentityException",
    plural = "azurepodidentityexceptions",
    namespaced,
    schema = "disabled"
)]
pub struct AzurePodIdentityExceptionSpec {
    /// A pod in the exception's namespace with any one of these labels (key and value) is an exception.
    #[serde(
        rename = "podLabels",
        alias = "podlabels",
        alias = "PodLabels",
        default
    )]
    pub pod_labels: Option<BTreeMap<String, String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_aad_pod_identity_manifests() {
        let id: AzureIdentity = serde_json::from_value(serde_json::json!({
            "apiVersion": "aadpodidentity.k8s.io/v1",
            "kind": "AzureIdentity",
            "metadata": {"name": "sp", "namespace": "team-a"},
            "spec": {
                "type": 1,
                "clientID": "11111111-1111-1111-1111-111111111111",
                "tenantID": "22222222-2222-2222-2222-222222222222",
                "clientPassword": {"name": "sp-secret", "namespace": "team-a"},
                "adEndpoint": "https://login.example/",
                "replicas": null
            }
        }))
        .expect("AzureIdentity");
        assert_eq!(id.spec.type_, Some(TYPE_SERVICE_PRINCIPAL));
        assert_eq!(
            id.spec.client_password.and_then(|p| p.name).as_deref(),
            Some("sp-secret")
        );

        let old: AzureIdentity = serde_json::from_value(serde_json::json!({
            "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
            "metadata": {"name": "mi", "namespace": "default"},
            "spec": {"type": 0, "clientid": "abc", "resourceid": "/subscriptions/x"}
        }))
        .expect("pre-1.6 spelling");
        assert_eq!(old.spec.client_id.as_deref(), Some("abc"));
        assert_eq!(old.spec.resource_id.as_deref(), Some("/subscriptions/x"));

        let b: AzureIdentityBinding = serde_json::from_value(serde_json::json!({
            "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentityBinding",
            "metadata": {"name": "b", "namespace": "default"},
            "spec": {"azureIdentity": "mi", "selector": "orders", "weight": 0}
        }))
        .expect("binding");
        assert_eq!(b.spec.selector.as_deref(), Some("orders"));

        let e: AzurePodIdentityException = serde_json::from_value(serde_json::json!({
            "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzurePodIdentityException",
            "metadata": {"name": "mic-exception", "namespace": "default"},
            "spec": {"podLabels": {"app": "mic", "component": "mic"}}
        }))
        .expect("exception");
        assert_eq!(e.spec.pod_labels.map(|l| l.len()), Some(2));
    }
}
