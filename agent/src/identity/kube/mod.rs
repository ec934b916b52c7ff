//! Kubernetes mode: reflectors on this node's pods and on aad-pod-identity's CRDs, and the matching policy.
//!
//! cgroup path -> pod UID ([`podcgroup`](crate::identity::podcgroup)) -> pod (reflector store; a pod not seen yet is
//! waited for, at most [`MAX_POD_WAIT`]) -> AzurePodIdentityException in the pod's namespace with a matching label:
//! node exception; otherwise AzureIdentityBindings whose `selector` equals the pod's `aadpodidbinding` label -> the
//! AzureIdentity each names, in the binding's namespace. Before any of that, the connection's source address must be
//! one of the pod's (`--check-source-address`).
//!
//! Matching is namespaced by default: a binding serves only pods of its own namespace, so a pod cannot pick up
//! another team's identity by setting a label (aad-pod-identity's "label self-assignment" hole outside
//! `--forceNamespaced`). [`KubeConfig::cluster_wide`] restores NMI's default for clusters that depend on it.
//!
//! - `policy`: which identities a pod gets (the security-critical part; read it first).
//! - `source`: [`KubeSource`]: the reflectors, readiness, the bound-client-id set, cgroup -> pod.
//! - `address`: the connection's source address must be one of the attested pod's.
//! - `pods`: this node's pods by UID, waiting briefly for one not delivered yet.
//! - `reflect`: a watcher driven into a store.
//! - `crd`: the aadpodidentity.k8s.io/v1 kinds; `secrets`: service principals' Secrets.

mod address;
pub mod crd;
mod pods;
mod policy;
mod reflect;
pub mod secrets;
mod source;

pub use address::SourceCheck;
pub use crd::{AzureIdentity, AzureIdentityBinding, AzurePodIdentityException};
pub use policy::CLIENT_SECRET_KEY;
pub use secrets::{KubeSecrets, SecretError};
pub use source::{KubeConfig, KubeError, KubeSource, MAX_POD_WAIT};

#[cfg(test)]
mod tests;
