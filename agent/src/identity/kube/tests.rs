//! Tests of Kubernetes mode: AzureIdentity conversion, the matching policy, redaction.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Pod, SecretReference};
use kube::{
    Resource,
    runtime::{
        reflector::{self, Store},
        watcher,
    },
};

use super::{
    policy::{Policy, to_identity},
    source::redact,
    *,
};
use crate::identity::{Binding, IdentityKind, SecretRef, Workload};

const CLIENT_A: &str = "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa";
const CLIENT_B: &str = "bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb";
const CLIENT_C: &str = "cccccccc-cccc-4ccc-8ccc-cccccccccccc";

fn az(ns: &str, name: &str, spec: crd::AzureIdentitySpec) -> AzureIdentity {
    let mut a = AzureIdentity::new(name, spec);
    a.metadata.namespace = Some(ns.into());
    a
}

#[test]
fn identity_types() {
    let mi = az(
        "a",
        "mi",
        crd::AzureIdentitySpec {
            type_: Some(0),
            client_id: Some(CLIENT_C.into()),
            resource_id: Some("/subscriptions/x".into()),
            ..Default::default()
        },
    );
    let got = to_identity(&mi, false).expect("mi");
    assert_eq!(got.kind, IdentityKind::UserAssigned);
    assert_eq!(got.namespace.as_deref(), Some("a"));
    assert_eq!(got.resource_id.as_deref(), Some("/subscriptions/x"));

    let sp = |secret_ns: Option<&str>| {
        az(
            "a",
            "sp",
            crd::AzureIdentitySpec {
                type_: Some(1),
                client_id: Some(CLIENT_C.into()),
                tenant_id: Some("T".into()),
                client_password: Some(SecretReference {
                    name: Some("s".into()),
                    namespace: secret_ns.map(Into::into),
                }),
                ..Default::default()
            },
        )
    };
    let want = IdentityKind::ServicePrincipal {
        tenant_id: "T".into(),
        secret: SecretRef {
            namespace: "a".into(),
            name: "s".into(),
            key: CLIENT_SECRET_KEY.into(),
        },
    };
    assert_eq!(
        to_identity(&sp(None), false).map(|i| i.kind),
        Ok(want.clone())
    );
    assert_eq!(to_identity(&sp(Some("a")), false).map(|i| i.kind), Ok(want));
    assert!(
        to_identity(&sp(Some("b")), false).is_err(),
        "cross-namespace secret refused when namespaced"
    );
    assert!(to_identity(&sp(Some("b")), true).is_ok());

    let cert = az(
        "a",
        "cert",
        crd::AzureIdentitySpec {
            type_: Some(2),
            client_id: Some(CLIENT_C.into()),
            ..Default::default()
        },
    );
    assert!(to_identity(&cert, false).is_err_and(|e| e.contains("type 2")));
    let no_client = az("a", "x", crd::AzureIdentitySpec::default());
    assert!(to_identity(&no_client, false).is_err_and(|e| e.contains("no clientID")));
    // Anything but a GUID is refused with what to do, whatever it holds (separators of old cache keys, paths, ...).
    for bad in [
        "C",
        "aaaa|sp|t",
        "../x",
        "11111111-1111-1111-1111-11111111111g",
        " ",
    ] {
        let odd = az(
            "a",
            "odd",
            crd::AzureIdentitySpec {
                client_id: Some(bad.into()),
                ..Default::default()
            },
        );
        let got = to_identity(&odd, false);
        assert!(
            got.as_ref()
                .is_err_and(|e| e.contains("not a GUID") || e.contains("no clientID")),
            "{bad:?}: {got:?}"
        );
    }
    let spaced = az(
        "a",
        "spaced",
        crd::AzureIdentitySpec {
            client_id: Some(format!(" {CLIENT_A} ")),
            ..Default::default()
        },
    );
    assert_eq!(
        to_identity(&spaced, false).map(|i| i.client_id),
        Ok(CLIENT_A.to_owned())
    );
}

fn apply<K>(objs: Vec<K>) -> Store<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    let (store, mut writer) = reflector::store::<K>();
    for o in objs {
        writer.apply_watcher_event(&watcher::Event::Apply(o));
    }
    // Dropping the writer leaves the store's contents readable (it only fails `wait_until_ready`).
    store
}

fn meta<K: Resource>(mut k: K, ns: &str, labels: &[(&str, &str)]) -> K {
    k.meta_mut().namespace = Some(ns.into());
    k.meta_mut().labels = Some(
        labels
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
    );
    k
}

fn policy(cluster_wide: bool) -> Policy {
    let mi = |ns: &str, name: &str, client: &str| {
        meta(
            AzureIdentity::new(
                name,
                crd::AzureIdentitySpec {
                    client_id: Some(client.into()),
                    ..Default::default()
                },
            ),
            ns,
            &[],
        )
    };
    let bind = |ns: &str, name: &str, id: &str, sel: &str| {
        meta(
            AzureIdentityBinding::new(
                name,
                crd::AzureIdentityBindingSpec {
                    azure_identity: Some(id.into()),
                    selector: Some(sel.into()),
                    weight: None,
                },
            ),
            ns,
            &[],
        )
    };
    Policy {
        cluster_wide,
        identities: apply(vec![
            mi("a", "id1", &CLIENT_A.to_ascii_uppercase()),
            mi("b", "id1", CLIENT_A),
            mi("b", "id2", CLIENT_B),
        ]),
        bindings: apply(vec![
            bind("a", "b1", "id1", "web"),
            bind("b", "b2", "id1", "web"),
            bind("b", "b3", "id2", "web"),
            bind("b", "dangling", "missing", "other"),
        ]),
        exceptions: apply(Vec::<AzurePodIdentityException>::new()),
    }
}

#[test]
fn bound_summary_spots_identities_bound_in_several_namespaces() {
    let (ids, spread) = policy(false).bound_summary();
    assert_eq!(
        ids,
        BTreeSet::from([CLIENT_A.to_owned(), CLIENT_B.to_owned()])
    );
    assert_eq!(
        spread[CLIENT_A],
        BTreeSet::from(["a".to_owned(), "b".to_owned()])
    );
    assert_eq!(spread[CLIENT_B].len(), 1);
}

#[test]
fn pod_policy() {
    let pod = |ns: &str, labels: &[(&str, &str)]| {
        let mut p = meta(Pod::default(), ns, labels);
        p.metadata.name = Some("p".into());
        p
    };
    let names = |b: Binding| match b {
        Binding::Bound { identities, .. } => identities
            .iter()
            .map(|i| format!("{}/{}", i.namespace.as_deref().unwrap_or(""), i.name))
            .collect::<Vec<_>>(),
        Binding::Unbound { reason, .. } => vec![format!("unbound: {reason}")],
        Binding::NodeException { .. } => vec!["exception".into()],
        Binding::NotReady { reason } => vec![format!("not ready: {reason}")],
        Binding::Refused { reason, .. } => vec![format!("refused: {reason}")],
    };
    let ns = policy(false);
    assert_eq!(
        names(ns.bind_pod(
            &pod("a", &[("aadpodidbinding", "web")]),
            Workload::default()
        )),
        ["a/id1"]
    );
    assert_eq!(
        names(ns.bind_pod(
            &pod("b", &[("aadpodidbinding", "web")]),
            Workload::default()
        )),
        ["b/id1", "b/id2"]
    );
    let unlabelled = names(ns.bind_pod(&pod("a", &[("app", "x")]), Workload::default()));
    assert!(
        unlabelled[0].contains("no aadpodidbinding label"),
        "{unlabelled:?}"
    );
    let empty = names(ns.bind_pod(&pod("a", &[("aadpodidbinding", "")]), Workload::default()));
    assert!(
        empty[0].starts_with("unbound"),
        "an empty selector never matches: {empty:?}"
    );
    let dangling = names(ns.bind_pod(
        &pod("b", &[("aadpodidbinding", "other")]),
        Workload::default(),
    ));
    assert!(dangling[0].contains("does not exist"), "{dangling:?}");
    let cw = policy(true);
    assert_eq!(
        names(cw.bind_pod(
            &pod("c", &[("aadpodidbinding", "web")]),
            Workload::default()
        )),
        ["a/id1", "b/id1", "b/id2"]
    );
}

#[test]
fn redaction() {
    assert_eq!(redact("11112222-3333"), "1111##### REDACTED #####3333");
    assert_eq!(redact("short"), "##### REDACTED #####");
}
