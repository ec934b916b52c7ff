//! Tests of the bindings file: parsing, validation with line numbers, lookups, reloads.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use super::*;
use crate::{
    attest::Attestation,
    identity::{Binding, BindingSource, IdentityKind, Resolve},
};

const A: &str = "11111111-1111-1111-1111-111111111111";
const B: &str = "22222222-2222-2222-2222-222222222222";

fn parse(text: &str) -> Result<Bindings, FileError> {
    validate::parse(Path::new("bindings.yaml"), text)
}

fn names(b: &Bindings, cgroup: &str) -> Option<(String, Vec<String>)> {
    b.lookup(Path::new(cgroup)).map(|(p, ids)| {
        (
            p.display().to_string(),
            ids.iter().map(|i| i.name.clone()).collect(),
        )
    })
}

fn problems(text: &str) -> Vec<Problem> {
    match parse(text) {
        Err(FileError::Invalid { problems, .. }) => problems,
        other => panic!("expected validation problems, got {other:?}"),
    }
}

const GOOD: &str = r#"
identities:
  - name: orders
    clientID: "11111111-1111-1111-1111-111111111111"
    resourceID: "/subscriptions/0000/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/orders"
  - name: payments
    clientID: "22222222-2222-2222-2222-222222222222"
    objectID: "33333333-3333-3333-3333-333333333333"
  - name: audit
    clientID: "44444444-4444-4444-4444-444444444444"
bindings:
  - cgroup: "orders"
    identity: orders
  - cgroup: "orders/api/payments"
    identity: payments
  - cgroup: "shared"
    identity: orders
  - cgroup: "shared"
    identity: payments
  - cgroup: "shared/"
    identity: payments
  - cgroup: "./batch/nightly"
    identity: audit
"#;

#[test]
fn parses_and_matches_longest_prefix() {
    let b = parse(GOOD).expect("valid");
    assert_eq!(b.identity_count(), 3);
    assert_eq!(b.binding_count(), 6);
    let orders = Some(("/orders".to_owned(), vec!["orders".to_owned()]));
    assert_eq!(names(&b, "/orders"), orders);
    assert_eq!(names(&b, "/orders/api"), orders);
    assert_eq!(names(&b, "/orders/api/x/y"), orders);
    assert_eq!(
        names(&b, "/orders/api/payments/worker"),
        Some((
            "/orders/api/payments".to_owned(),
            vec!["payments".to_owned()]
        ))
    );
    // Component-wise, not string prefix.
    assert_eq!(names(&b, "/orders2"), None);
    assert_eq!(names(&b, "/"), None);
    assert_eq!(names(&b, "/batch"), None);
    assert_eq!(
        names(&b, "batch/nightly/run-1"),
        Some(("/batch/nightly".to_owned(), vec!["audit".to_owned()]))
    );
    // Several bindings for one path bind several identities, each once.
    assert_eq!(
        names(&b, "/shared/x"),
        Some((
            "/shared".to_owned(),
            vec!["orders".to_owned(), "payments".to_owned()]
        ))
    );
    let ids = b.bound_client_ids();
    assert_eq!(ids.len(), 3);
    assert!(ids.contains(A) && ids.contains(B));
    assert!(
        b.warnings()
            .iter()
            .any(|w| w.contains("/shared has 2 identities")),
        "{:?}",
        b.warnings()
    );
}

#[test]
fn fields_are_parsed() {
    let b = parse(GOOD).expect("valid");
    let (_, ids) = b.lookup(Path::new("/orders/api/payments")).expect("bound");
    assert_eq!(ids[0].client_id, B);
    assert_eq!(
        ids[0].object_id.as_deref(),
        Some("33333333-3333-3333-3333-333333333333")
    );
    assert_eq!(ids[0].resource_id, None);
    assert_eq!(ids[0].kind, IdentityKind::UserAssigned);
    let (_, ids) = b.lookup(Path::new("/orders")).expect("bound");
    assert!(
        ids[0]
            .resource_id
            .as_deref()
            .is_some_and(|r| r.ends_with("/orders"))
    );
}

#[test]
fn root_binding_and_empty_file() {
    let b = parse(&format!(
        "identities:\n  - name: a\n    clientID: \"{A}\"\nbindings:\n  - cgroup: .\n    identity: a\n"
    ))
    .expect("valid");
    assert_eq!(
        names(&b, "/anything/below"),
        Some(("/".to_owned(), vec!["a".to_owned()]))
    );
    assert_eq!(names(&b, "/"), Some(("/".to_owned(), vec!["a".to_owned()])));

    let empty = parse("# nothing yet\n\n").expect("empty file is valid");
    let keys_only =
        parse("identities:\nbindings:\n").expect("keys with nothing under them are valid");
    assert_eq!((keys_only.identities, keys_only.bindings), (0, 0));
    assert_eq!(empty.binding_count(), 0);
    assert!(empty.warnings().iter().any(|w| w.contains("binds nothing")));
    assert!(parse("identities: []\nbindings: []\n").is_ok());
}

#[test]
fn unknown_identity_names_the_line() {
    let text = format!(
        "identities:\n  - name: a\n    clientID: \"{A}\"\nbindings:\n  - cgroup: x\n    identity: a\n  - cgroup: y\n    identity: nope\n"
    );
    let p = problems(&text);
    assert_eq!(
        p,
        vec![Problem {
            line: 7,
            kind: ProblemKind::UnknownIdentity {
                identity: "nope".into()
            }
        }]
    );
    let msg = parse(&text).expect_err("invalid").to_string();
    assert!(
        msg.contains("bindings.yaml: line 7: binding names unknown identity `nope`"),
        "{msg}"
    );
}

#[test]
fn duplicate_names_and_bad_ids() {
    let text = format!(
        "identities:
  - name: a
    clientID: \"{A}\"
  - name: a
    clientID: \"{B}\"
  - name: b
    clientID: \"\"
  - name: c
    clientID: not-a-guid
  - name: d
    clientID: \"{A}\"
    objectID: xyz
  - name: e
    clientID: \"{B}\"
    resourceID: /subscriptions/s/resourceGroups/rg
bindings: []
"
    );
    let p = problems(&text);
    let kinds: Vec<(u32, &ProblemKind)> = p.iter().map(|p| (p.line, &p.kind)).collect();
    assert_eq!(
        kinds,
        vec![
            (
                4,
                &ProblemKind::DuplicateIdentity {
                    name: "a".into(),
                    first_line: 2
                }
            ),
            (6, &ProblemKind::EmptyClientId { name: "b".into() }),
            (
                8,
                &ProblemKind::InvalidClientId {
                    name: "c".into(),
                    value: "not-a-guid".into()
                }
            ),
            (
                10,
                &ProblemKind::InvalidObjectId {
                    name: "d".into(),
                    value: "xyz".into()
                }
            ),
            (
                13,
                &ProblemKind::InvalidResourceId {
                    name: "e".into(),
                    value: "/subscriptions/s/resourceGroups/rg".into()
                }
            ),
        ]
    );
}

#[test]
fn cgroup_paths_must_stay_inside() {
    let text = format!(
        "identities:
  - name: a
    clientID: \"{A}\"
bindings:
  - cgroup: /abs
    identity: a
  - cgroup: ok/../../escape
    identity: a
  - cgroup: \"\"
    identity: a
"
    );
    let p = problems(&text);
    assert_eq!(
        p,
        vec![
            Problem {
                line: 5,
                kind: ProblemKind::AbsoluteCgroup("/abs".into())
            },
            Problem {
                line: 7,
                kind: ProblemKind::ParentCgroup("ok/../../escape".into())
            },
            Problem {
                line: 9,
                kind: ProblemKind::EmptyCgroup
            },
        ]
    );
}

#[test]
fn unknown_fields_and_syntax_errors_name_the_line() {
    let err = parse(&format!(
        "identities:\n  - name: a\n    clientID: \"{A}\"\n    clientId: \"{A}\"\nbindings: []\n"
    ))
    .expect_err("unknown field");
    assert!(
        matches!(err, FileError::Syntax { line: Some(4), .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("clientId"), "{err}");

    let err = parse("identities: []\nbinding: []\n").expect_err("unknown top-level field");
    assert!(
        matches!(err, FileError::Syntax { line: Some(2), .. }),
        "{err:?}"
    );

    let err = parse("identities:\n  - name: [unclosed\n").expect_err("bad yaml");
    assert!(
        matches!(err, FileError::Syntax { line: Some(_), .. }),
        "{err:?}"
    );
    assert!(err.to_string().starts_with("bindings.yaml:"), "{err}");
}

#[test]
fn warnings() {
    let b = parse(&format!(
        "identities:
  - name: a
    clientID: \"{A}\"
  - name: unused
    clientID: \"{B}\"
  - name: a-again
    clientID: \"{}\"
bindings:
  - cgroup: x
    identity: a
  - cgroup: y
    identity: a
  - cgroup: z
    identity: a-again
",
        A.to_uppercase()
    ))
    .expect("valid");
    let w = b.warnings().join("\n");
    assert!(w.contains("identity `unused` is not bound"), "{w}");
    assert!(w.contains("same clientID"), "{w}");
    // One identity bound in two places is fine in a bindings file.
    assert!(!w.contains("`a` is"), "{w}");
}

/// A file that binds identity `a` (client id `A`) to cgroup `x`.
fn a_bound_to_x() -> String {
    format!(
        "identities:\n  - name: a\n    clientID: \"{A}\"\nbindings:\n  - cgroup: x\n    identity: a\n"
    )
}

/// Writes `text` to a bindings file in a fresh directory (kept as long as the first value lives) and loads it.
fn load(text: &str) -> (tempfile::TempDir, PathBuf, FileSource) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bindings.yaml");
    write(&path, text);
    let src = FileSource::load(&path).expect("load");
    (dir, path, src)
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write bindings file");
}

fn caller(cgroup: &str) -> Option<PathBuf> {
    Some(PathBuf::from(cgroup))
}

fn bound_names(b: &Binding) -> Vec<String> {
    match b {
        Binding::Bound { identities, .. } => identities.iter().map(|i| i.name.clone()).collect(),
        _ => Vec::new(),
    }
}

/// Waits (at most 5 s) until `cgroup` is bound, calling `nudge` before each look.
async fn wait_until_bound(
    src: &FileSource,
    cgroup: &str,
    every: Duration,
    nudge: impl Fn(),
    what: &str,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while bound_names(&src.resolve_cgroup(caller(cgroup).as_deref())).is_empty() {
        nudge();
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(every).await;
    }
}

#[test]
fn reload_swaps_and_a_bad_reload_keeps_the_old_table() {
    let (_dir, path, src) = load(&a_bound_to_x());
    let mut bound = src.bound_client_ids();
    assert_eq!(
        bound_names(&src.resolve_cgroup(caller("/x/y").as_deref())),
        vec!["a"]
    );
    assert!(matches!(
        src.resolve_cgroup(caller("/z").as_deref()),
        Binding::Unbound { .. }
    ));
    assert!(matches!(
        src.resolve_cgroup(None),
        Binding::Unbound { workload: None, .. }
    ));
    assert!(
        src.reload_if_changed().is_none(),
        "unchanged file is not reloaded"
    );

    // A broken edit: reported with its line, old table stays.
    write(
        &path,
        &format!(
            "identities:\n  - name: a\n    clientID: \"{A}\"\nbindings:\n  - cgroup: x\n    identity: b\n"
        ),
    );
    let err = src.reload().expect_err("bad file");
    assert_eq!(err.line(), Some(5));
    assert_eq!(
        bound_names(&src.resolve_cgroup(caller("/x").as_deref())),
        vec!["a"]
    );
    assert!(
        src.reload_if_changed().is_none(),
        "a failed version is tried once"
    );

    // A good edit takes effect and the bound set changes.
    let held = src.current();
    write(
        &path,
        &format!(
            "identities:\n  - name: b\n    clientID: \"{B}\"\nbindings:\n  - cgroup: z\n    identity: b\n"
        ),
    );
    assert!(src.reload().is_ok());
    assert!(matches!(
        src.resolve_cgroup(caller("/x").as_deref()),
        Binding::Unbound { .. }
    ));
    assert_eq!(
        bound_names(&src.resolve_cgroup(caller("/z/1").as_deref())),
        vec!["b"]
    );
    // A table taken before the swap stays whole for whoever holds it.
    assert!(held.lookup(Path::new("/x")).is_some());
    assert!(bound.has_changed().unwrap_or(false));
    assert_eq!(**bound.borrow_and_update(), BTreeSet::from([B.to_owned()]));
}

#[tokio::test]
async fn the_reloader_sees_a_replaced_file() {
    let v1 = a_bound_to_x();
    let (dir, path, src) = load(&v1);
    let src = Arc::new(src);
    let task = src.spawn_reloader(Duration::from_millis(50));

    // Replace through rename, as editors and ConfigMap updates do.
    let tmp = dir.path().join("new.yaml");
    write(&tmp, &v1.replace("cgroup: x", "cgroup: y"));
    std::fs::rename(&tmp, &path).expect("rename");
    wait_until_bound(
        &src,
        "/y",
        Duration::from_millis(20),
        || {},
        "poll reload did not happen",
    )
    .await;
    task.abort();
}

#[tokio::test]
async fn the_source_enum_dispatches_to_the_file() {
    use std::net::{Ipv4Addr, SocketAddrV4};
    let (_dir, _, src) = load(&a_bound_to_x());
    let source = BindingSource::File(Arc::new(src));
    assert!(source.ready());
    assert_eq!(
        **source.bound_client_ids().borrow(),
        BTreeSet::from([A.to_owned()])
    );
    let caller = Attestation {
        peer: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1),
        cgroup_id: 1,
        cgroup: caller("/x/worker"),
        pid: 1,
        original_dst: SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 254), 80),
    };
    assert_eq!(bound_names(&source.resolve(&caller).await), vec!["a"]);
}

#[test]
fn workload_carries_pod_and_container_when_the_path_is_a_pod() {
    let b = format!(
        "identities:\n  - name: a\n    clientID: \"{A}\"\nbindings:\n  - cgroup: kubepods-besteffort.slice\n    identity: a\n"
    );
    let (_dir, _, src) = load(&b);
    let cid = "ab".repeat(32);
    let got = src.resolve_cgroup(Some(Path::new(&format!(
        "/kubepods-besteffort.slice/kubepods-besteffort-pod0f3a4b5c_6d7e_4f80_91a2_b3c4d5e6f708.slice/cri-containerd-{cid}.scope"
    ))));
    match got {
        Binding::Bound {
            workload,
            identities,
        } => {
            assert_eq!(identities.len(), 1);
            assert_eq!(
                workload.pod_uid.as_deref(),
                Some("0f3a4b5c-6d7e-4f80-91a2-b3c4d5e6f708")
            );
            assert_eq!(workload.container.as_deref(), Some(cid.as_str()));
        }
        other => panic!("{other:?}"),
    }
}
