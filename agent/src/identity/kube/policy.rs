//! The matching policy: which identities a pod gets. This is the security-critical part of Kubernetes mode; it reads
//! the CRD stores and nothing else, and every refusal says why.
//!
//! For one pod, in this order:
//! 1. An AzurePodIdentityException in the pod's namespace whose `podLabels` share a label with the pod: the pod
//!    talks to IMDS as the node itself ([`Binding::NodeException`]).
//! 2. The pod's `aadpodidbinding` label; none (or empty): unbound.
//! 3. AzureIdentityBindings whose `selector` equals that label: in the pod's namespace only, unless matching is
//!    cluster-wide. Namespaced matching closes aad-pod-identity's "label self-assignment" hole: outside
//!    `--forceNamespaced`, any pod that could set a label got any binding's identity.
//! 4. The AzureIdentity each binding names, in the binding's namespace. An identity annotated
//!    `aadpodidentity.k8s.io/Behavior: namespaced` serves only its own namespace even when matching is cluster-wide.
//!    A service principal's Secret must be in the identity's own namespace unless matching is cluster-wide.
//!
//! Bindings that lead nowhere (no such identity, an unsupported type, ...) are skipped with a warning; if none is
//! left, the pod is unbound and the reasons go to the audit line.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    ResourceExt,
    runtime::reflector::{ObjectRef, Store},
};

use super::crd::{self, AzureIdentity, AzureIdentityBinding, AzurePodIdentityException};
use crate::identity::{
    azure_id,
    binding::{Binding, Identity, IdentityKind, Workload},
    secrets::SecretRef,
};

/// The Secret key read for a service principal's client secret. NMI used the first value in the Secret whatever
/// its key (Go map order, so in practice Secrets with one key); see [`super::KubeSecrets`] for how this is honoured.
pub const CLIENT_SECRET_KEY: &str = "clientSecret";

/// The policy over the three CRD stores the reflectors keep current.
pub struct Policy {
    /// Let a binding match pods in every namespace (see [`super::KubeConfig::cluster_wide`]).
    pub cluster_wide: bool,
    pub identities: Store<AzureIdentity>,
    pub bindings: Store<AzureIdentityBinding>,
    pub exceptions: Store<AzurePodIdentityException>,
}

impl Policy {
    /// What `pod` is bound to. `workload` is carried into the answer for the audit line.
    pub fn bind_pod(&self, pod: &Pod, workload: Workload) -> Binding {
        let ns = pod.namespace().unwrap_or_default();
        let pod_name = format!("{ns}/{}", pod.name_any());
        let labels = pod.labels();

        if let Some(e) = self.exception_for(&ns, labels) {
            tracing::debug!(pod = %pod_name, exception = %e.name_any(), "pod matches an AzurePodIdentityException");
            return Binding::NodeException { workload };
        }

        let Some(selector) = labels.get(crd::BINDING_LABEL).filter(|s| !s.is_empty()) else {
            return Binding::Unbound {
                workload: Some(workload),
                reason: format!("pod {pod_name} has no {} label", crd::BINDING_LABEL),
            };
        };
        let matched = self.bindings_selecting(&ns, selector);
        if matched.is_empty() {
            return Binding::Unbound {
                workload: Some(workload),
                reason: format!(
                    "no AzureIdentityBinding {} has selector {selector:?} (pod {pod_name})",
                    if self.cluster_wide {
                        "in any namespace".to_owned()
                    } else {
                        format!("in namespace {ns}")
                    }
                ),
            };
        }

        let mut identities: Vec<Arc<Identity>> = Vec::new();
        let mut problems: Vec<String> = Vec::new();
        for b in &matched {
            match self.identity_of(b, &ns, &pod_name) {
                Ok(id) => {
                    // Two bindings naming one AzureIdentity bind it once.
                    if !identities
                        .iter()
                        .any(|have| have.name == id.name && have.namespace == id.namespace)
                    {
                        identities.push(Arc::new(id));
                    }
                }
                Err(p) => problems.push(p),
            }
        }
        if identities.is_empty() {
            return Binding::Unbound {
                workload: Some(workload),
                reason: problems.join("; "),
            };
        }
        for p in &problems {
            tracing::warn!(pod = %pod_name, "{p}");
        }
        Binding::Bound {
            workload,
            identities,
        }
    }

    /// An exception in the pod's own namespace that shares at least one label (key and value) with the pod.
    fn exception_for(
        &self,
        ns: &str,
        labels: &BTreeMap<String, String>,
    ) -> Option<Arc<AzurePodIdentityException>> {
        self.exceptions.find(|e| {
            e.namespace().as_deref() == Some(ns)
                && e.spec
                    .pod_labels
                    .as_ref()
                    .is_some_and(|want| want.iter().any(|(k, v)| labels.get(k) == Some(v)))
        })
    }

    /// The bindings whose selector is `selector`: in namespace `ns` only, unless cluster-wide. Sorted by namespace and
    /// name, since store order is a hash order and logs and identity order should be stable.
    fn bindings_selecting(&self, ns: &str, selector: &str) -> Vec<Arc<AzureIdentityBinding>> {
        let mut matched = self.bindings.state_filter(|b| {
            (self.cluster_wide || b.namespace().as_deref() == Some(ns))
                && b.spec.selector.as_deref() == Some(selector)
        });
        matched.sort_by_key(|b| (b.namespace(), b.name_any()));
        matched
    }

    /// The identity binding `b` names for a pod in namespace `ns`, or why it serves none.
    fn identity_of(
        &self,
        b: &AzureIdentityBinding,
        ns: &str,
        pod_name: &str,
    ) -> Result<Identity, String> {
        let b_ns = b.namespace().unwrap_or_default();
        let Some(id_name) = b.spec.azure_identity.as_deref().filter(|n| !n.is_empty()) else {
            return Err(format!(
                "AzureIdentityBinding {b_ns}/{} names no azureIdentity",
                b.name_any()
            ));
        };
        let Some(az) = self.identities.get(&ObjectRef::new(id_name).within(&b_ns)) else {
            return Err(format!(
                "AzureIdentityBinding {b_ns}/{} names AzureIdentity {b_ns}/{id_name}, which does not exist",
                b.name_any()
            ));
        };
        if az
            .annotations()
            .get(crd::BEHAVIOR_ANNOTATION)
            .map(String::as_str)
            == Some(crd::BEHAVIOR_NAMESPACED)
            && b_ns != ns
        {
            return Err(format!(
                "AzureIdentity {b_ns}/{id_name} is namespaced and pod {pod_name} is not in {b_ns}"
            ));
        }
        to_identity(&az, self.cluster_wide)
    }

    /// Client ids referenced by some binding, and for each the namespaces of the bindings that reference it.
    pub fn bound_summary(&self) -> (BTreeSet<String>, BTreeMap<String, BTreeSet<String>>) {
        let mut ids = BTreeSet::new();
        let mut spread: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for b in self.bindings.state() {
            let b_ns = b.namespace().unwrap_or_default();
            let Some(name) = b.spec.azure_identity.as_deref() else {
                continue;
            };
            let Some(az) = self.identities.get(&ObjectRef::new(name).within(&b_ns)) else {
                continue;
            };
            let Some(client_id) = az.spec.client_id.as_deref().filter(|c| !c.is_empty()) else {
                continue;
            };
            let client_id = client_id.to_ascii_lowercase();
            spread.entry(client_id.clone()).or_default().insert(b_ns);
            ids.insert(client_id);
        }
        (ids, spread)
    }
}

/// AzureIdentity -> [`Identity`]. `cluster_wide` allows a service principal's Secret to live in another namespace;
/// namespaced, it must be the identity's own, or whoever may create an AzureIdentity in one namespace could spend
/// another namespace's client secret.
pub fn to_identity(az: &AzureIdentity, cluster_wide: bool) -> Result<Identity, String> {
    let ns = az.namespace().unwrap_or_default();
    let name = az.name_any();
    let client_id = az
        .spec
        .client_id
        .clone()
        .filter(|c| !c.trim().is_empty())
        .ok_or_else(|| format!("AzureIdentity {ns}/{name} has no clientID"))?;
    // As the bindings file does: a client id is what IMDS is asked for and half of the token cache's key, so only the
    // shape Azure gives them (a GUID) gets that far.
    if !azure_id::is_guid(client_id.trim()) {
        return Err(format!(
            "AzureIdentity {ns}/{name} has clientID {client_id:?}, which is not a GUID (8-4-4-4-12 hex digits, as the \
             Azure portal and `az identity show --query clientId` print it)"
        ));
    }
    let client_id = client_id.trim().to_owned();
    let kind = match az.spec.type_.unwrap_or(crd::TYPE_USER_ASSIGNED_MSI) {
        crd::TYPE_USER_ASSIGNED_MSI => IdentityKind::UserAssigned,
        crd::TYPE_SERVICE_PRINCIPAL => {
            let tenant_id = az
                .spec
                .tenant_id
                .clone()
                .filter(|t| !t.trim().is_empty())
                .ok_or_else(|| {
                    format!("AzureIdentity {ns}/{name} is a service principal without tenantID")
                })?;
            let pw = az.spec.client_password.clone().unwrap_or_default();
            let secret_name = pw.name.filter(|n| !n.is_empty()).ok_or_else(|| {
                format!(
                    "AzureIdentity {ns}/{name} is a service principal without clientPassword.name"
                )
            })?;
            let secret_ns = pw
                .namespace
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| ns.clone());
            if !cluster_wide && secret_ns != ns {
                return Err(format!(
                    "AzureIdentity {ns}/{name} refers to a Secret in namespace {secret_ns}; namespaced mode allows only {ns}"
                ));
            }
            IdentityKind::ServicePrincipal {
                tenant_id,
                secret: SecretRef {
                    namespace: secret_ns,
                    name: secret_name,
                    key: CLIENT_SECRET_KEY.to_owned(),
                },
            }
        }
        crd::TYPE_SERVICE_PRINCIPAL_CERTIFICATE => {
            return Err(format!(
                "AzureIdentity {ns}/{name} has type 2 (service principal certificate), which nmi-agent does not support"
            ));
        }
        other => {
            return Err(format!(
                "AzureIdentity {ns}/{name} has unknown type {other}"
            ));
        }
    };
    Ok(Identity {
        name,
        namespace: Some(ns),
        client_id,
        resource_id: az.spec.resource_id.clone().filter(|r| !r.is_empty()),
        object_id: None,
        kind,
    })
}
