//! What a binding source answers: the identities a caller is bound to ([`Identity`]), the verdict for one caller
//! ([`Binding`], with its [`Workload`] for the audit trail), and the [`Resolve`] trait every source implements.

use std::{collections::BTreeSet, sync::Arc};

use tokio::sync::watch;

use super::secrets::SecretRef;
use crate::attest::Attestation;

/// An identity a workload can be bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The identity's name: the AzureIdentity object's name, or the `name` in the bindings file.
    pub name: String,
    /// Namespace of the AzureIdentity (Kubernetes mode only).
    pub namespace: Option<String>,
    /// The managed identity's (or service principal's) client id, as sent to IMDS.
    pub client_id: String,
    /// ARM resource id of a user-assigned identity, when known; `msi_res_id` / `mi_res_id` match against it.
    pub resource_id: Option<String>,
    /// Object (principal) id, when known; `object_id` matches against it.
    pub object_id: Option<String>,
    pub kind: IdentityKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityKind {
    /// AzureIdentity type 0: a user-assigned managed identity, fetched from IMDS with its client id.
    UserAssigned,
    /// AzureIdentity type 1: a service principal whose secret is in a Kubernetes Secret.
    ServicePrincipal {
        tenant_id: String,
        secret: SecretRef,
    },
}

/// Who the caller is, as far as bindings are concerned, and what it is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Binding {
    /// Identities bound to the caller's workload (possibly several).
    Bound {
        workload: Workload,
        identities: Vec<Arc<Identity>>,
    },
    /// An AzurePodIdentityException pod: forwarded to IMDS as the node itself.
    NodeException { workload: Workload },
    /// The source has not loaded its bindings yet (Kubernetes: a reflector has not listed once), so it cannot tell
    /// "unbound" from "not known yet". Answered with a retryable error, never with "Identity not found", which SDKs
    /// treat as final.
    NotReady { reason: String },
    /// The caller is known but refused before any binding is looked at (Kubernetes mode: its connection does not come
    /// from its own address). Answered 403; `reason` goes to the audit log.
    Refused { workload: Workload, reason: String },
    /// Nothing bound; `reason` says why, for the audit log.
    Unbound {
        workload: Option<Workload>,
        reason: String,
    },
}

impl Binding {
    /// The answer for a caller whose cgroup was gone by the time it was looked up.
    pub(super) fn cgroup_gone() -> Binding {
        Binding::Unbound {
            workload: None,
            reason: "the caller's cgroup no longer exists".to_owned(),
        }
    }
}

/// The workload behind a cgroup, for audit lines.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub pod_uid: Option<String>,
    pub container: Option<String>,
}

/// Resolves callers to bindings. `Attestation` is what the kernel told us; the source maps it to a workload.
pub trait Resolve {
    fn resolve(&self, caller: &Attestation) -> impl std::future::Future<Output = Binding> + Send;
}

/// The lower-case client ids of every identity some workload is bound to, as each source publishes them: the token
/// cache drops tokens of identities that leave the set.
pub type BoundIds = Arc<BTreeSet<String>>;

/// Publishes `ids` if they differ from what `tx` holds, so that watchers wake only for a real change.
pub(super) fn publish_bound(tx: &watch::Sender<BoundIds>, ids: BTreeSet<String>) {
    tx.send_if_modified(|cur| {
        let changed = **cur != ids;
        if changed {
            *cur = Arc::new(ids);
        }
        changed
    });
}
