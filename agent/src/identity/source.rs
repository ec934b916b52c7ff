//! The binding source the agent runs with: a bindings file (standalone) or Kubernetes. Not to be confused with the
//! token sources in `imds::token`, which say where tokens come from; this says who is bound to what.

use std::sync::Arc;

use tokio::sync::watch;

use super::{
    binding::{Binding, BoundIds, Resolve},
    file::FileSource,
    kube::KubeSource,
};
use crate::attest::Attestation;

/// One of the two binding sources, behind one type so the rest of the agent need not be generic over it.
#[derive(Clone, Debug)]
pub enum BindingSource {
    File(Arc<FileSource>),
    Kube(Arc<KubeSource>),
}

impl BindingSource {
    /// Whether the source can answer yet: a file source is ready once loaded; Kubernetes once every reflector has
    /// finished its initial list.
    pub fn ready(&self) -> bool {
        match self {
            BindingSource::File(_) => true,
            BindingSource::Kube(k) => k.ready(),
        }
    }

    /// The client ids (lower case) currently bound to some workload. The token cache watches this and drops
    /// tokens of identities that leave the set.
    pub fn bound_client_ids(&self) -> watch::Receiver<BoundIds> {
        match self {
            BindingSource::File(f) => f.bound_client_ids(),
            BindingSource::Kube(k) => k.bound_client_ids(),
        }
    }
}

impl Resolve for BindingSource {
    async fn resolve(&self, caller: &Attestation) -> Binding {
        match self {
            BindingSource::File(f) => f.resolve_cgroup(caller.cgroup.as_deref()),
            BindingSource::Kube(k) => k.resolve(caller).await,
        }
    }
}
