//! Which identity a caller may use: the binding sources (a bindings file, or Kubernetes) and the policy that picks one
//! identity for one request.

pub mod file;
pub mod kube;
pub mod podcgroup;

use std::{collections::BTreeSet, sync::Arc};

use tokio::sync::watch;

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

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretRef {
    pub namespace: String,
    pub name: String,
    pub key: String,
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
    /// Nothing bound; `reason` says why, for the audit log.
    Unbound {
        workload: Option<Workload>,
        reason: String,
    },
}

/// The workload behind a cgroup, for audit lines.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub pod_uid: Option<String>,
    pub container: Option<String>,
}

/// The identity a request asks for (`client_id`, `object_id`, `msi_res_id` / `mi_res_id`), or none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    Default,
    ClientId(String),
    ObjectId(String),
    ResourceId(String),
}

/// Why [`select`] refused a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error("no identity is bound to this workload")]
    NothingBound,
    #[error("the requested identity is not bound to this workload")]
    NotBound,
    #[error("{0} identities are bound to this workload and the request names none; pass client_id")]
    Ambiguous(usize),
}

/// Picks the identity for one request from those bound to the caller.
///
/// With a selector, the identity must be bound (ids compare case-insensitively, as Azure's GUIDs and ARM ids do).
/// Without one, a single bound identity is used; several are refused as ambiguous. That is what IMDS itself answers a
/// VM with several user-assigned identities and no system identity, and it never depends on list order.
pub fn select(bound: &[Arc<Identity>], selector: &Selector) -> Result<Arc<Identity>, Denial> {
    let matches = |id: &Identity| match selector {
        Selector::Default => true,
        Selector::ClientId(want) => id.client_id.eq_ignore_ascii_case(want),
        Selector::ObjectId(want) => id
            .object_id
            .as_deref()
            .is_some_and(|o| o.eq_ignore_ascii_case(want)),
        Selector::ResourceId(want) => id.resource_id.as_deref().is_some_and(|r| {
            r.trim_end_matches('/')
                .eq_ignore_ascii_case(want.trim_end_matches('/'))
        }),
    };
    if bound.is_empty() {
        return Err(Denial::NothingBound);
    }
    let found: Vec<&Arc<Identity>> = bound.iter().filter(|id| matches(id)).collect();
    match found.as_slice() {
        [] => Err(Denial::NotBound),
        // The same identity bound twice (two bindings, one identity) is not ambiguous.
        [first, rest @ ..]
            if rest.iter().all(|id| {
                id.client_id.eq_ignore_ascii_case(&first.client_id) && id.kind == first.kind
            }) =>
        {
            Ok(Arc::clone(first))
        }
        many => Err(Denial::Ambiguous(many.len())),
    }
}

/// Resolves callers to bindings. `Attestation` is what the kernel told us; the source maps it to a workload.
pub trait Resolve {
    fn resolve(&self, caller: &Attestation) -> impl std::future::Future<Output = Binding> + Send;
}

/// The binding source the agent runs with: a bindings file (standalone) or Kubernetes.
#[derive(Clone, Debug)]
pub enum Source {
    File(Arc<file::FileSource>),
    Kube(Arc<self::kube::KubeSource>),
}

impl Source {
    /// Whether the source can answer yet: a file source is ready once loaded; Kubernetes once every reflector has
    /// finished its initial list.
    pub fn ready(&self) -> bool {
        match self {
            Source::File(_) => true,
            Source::Kube(k) => k.ready(),
        }
    }

    /// The client ids (lower case) currently bound to some workload. The token cache watches this and drops
    /// tokens of identities that leave the set.
    pub fn bound_client_ids(&self) -> watch::Receiver<Arc<BTreeSet<String>>> {
        match self {
            Source::File(f) => f.bound_client_ids(),
            Source::Kube(k) => k.bound_client_ids(),
        }
    }
}

impl Resolve for Source {
    async fn resolve(&self, caller: &Attestation) -> Binding {
        match self {
            Source::File(f) => f.resolve_cgroup(caller.cgroup.as_deref()),
            Source::Kube(k) => k.resolve_cgroup(caller.cgroup.as_deref()).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mi(name: &str, client_id: &str) -> Arc<Identity> {
        Arc::new(Identity {
            name: name.into(),
            namespace: None,
            client_id: client_id.into(),
            resource_id: Some(format!(
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
            )),
            object_id: None,
            kind: IdentityKind::UserAssigned,
        })
    }

    #[test]
    fn one_bound_identity_serves_default_requests() {
        let a = mi("a", "AAAA");
        assert_eq!(select(std::slice::from_ref(&a), &Selector::Default), Ok(a));
    }

    #[test]
    fn several_bound_and_none_requested_is_ambiguous_whatever_the_order() {
        let (a, b) = (mi("a", "aaaa"), mi("b", "bbbb"));
        assert_eq!(
            select(&[a.clone(), b.clone()], &Selector::Default),
            Err(Denial::Ambiguous(2))
        );
        assert_eq!(
            select(&[b, a], &Selector::Default),
            Err(Denial::Ambiguous(2))
        );
    }

    #[test]
    fn selectors_pick_only_bound_identities() {
        let (a, b) = (mi("a", "aaaa"), mi("b", "bbbb"));
        let bound = [a.clone(), b.clone()];
        assert_eq!(
            select(&bound, &Selector::ClientId("BBBB".into())),
            Ok(b.clone())
        );
        assert_eq!(
            select(&bound, &Selector::ClientId("cccc".into())),
            Err(Denial::NotBound)
        );
        let res = a.resource_id.clone().unwrap_or_default().to_uppercase();
        assert_eq!(select(&bound, &Selector::ResourceId(res)), Ok(a));
        assert_eq!(
            select(&bound, &Selector::ObjectId("x".into())),
            Err(Denial::NotBound)
        );
        assert_eq!(
            select(&[], &Selector::ClientId("aaaa".into())),
            Err(Denial::NothingBound)
        );
    }

    #[test]
    fn one_identity_bound_twice_is_not_ambiguous() {
        let a = mi("a", "aaaa");
        assert_eq!(
            select(&[a.clone(), mi("a-again", "AAAA")], &Selector::Default),
            Ok(a)
        );
    }
}
