//! The policy for one request: which of the identities bound to the caller it gets, given what it asked for.

use std::sync::Arc;

use super::binding::Identity;

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
