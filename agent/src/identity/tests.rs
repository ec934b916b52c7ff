//! Tests of the identity vocabulary: request selection and Azure id shapes.

use std::sync::Arc;

use super::{
    azure_id::{is_guid, is_uami_resource_id},
    *,
};

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

#[test]
fn guid_and_resource_id_shapes() {
    assert!(is_guid("11111111-1111-1111-1111-111111111111"));
    assert!(is_guid("abcdefab-ABCD-0123-4567-89abcdef0123"));
    assert!(!is_guid("11111111111111111111111111111111"));
    assert!(!is_guid("{11111111-1111-1111-1111-111111111111}"));
    assert!(is_uami_resource_id(
        "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/x"
    ));
    assert!(!is_uami_resource_id(
        "/subscriptions/s/resourcegroups/rg/providers/Microsoft.Compute/vm/x"
    ));
}
