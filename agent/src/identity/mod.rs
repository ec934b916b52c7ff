//! Which identity a caller may use: the binding sources (a bindings file, or Kubernetes) and the policy that picks one
//! identity for one request.
//!
//! - `binding`: the vocabulary every source answers in ([`Identity`], [`Binding`], [`Resolve`]).
//! - `select`: one request's identity among those bound to the caller.
//! - `source`: [`BindingSource`], the file or Kubernetes source the agent runs with.
//! - [`file`](mod@file), [`kube`](mod@kube): the two sources; `podcgroup` reads a pod out of a cgroup path for both.
//! - `secrets`: where service principals' secrets live and who may read them.
//! - `azure_id`: the shapes of Azure's identifiers.

pub mod azure_id;
pub mod binding;
pub mod file;
pub mod kube;
pub mod podcgroup;
pub mod secrets;
pub mod select;
pub mod source;

pub use binding::{Binding, BoundIds, Identity, IdentityKind, Resolve, Workload};
pub use secrets::{DynSecretStore, NoSecretStore, NoSecretStoreError, SecretRef, SecretStore};
pub use select::{Denial, Selector, select};
pub use source::BindingSource;

#[cfg(test)]
mod tests;
