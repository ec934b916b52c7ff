//! Kubernetes mode end to end, without a cluster: kube-rs's real reflectors against the fake API server
//! (`nmi_testkit::fake_apiserver`), resolving callers by cgroup path as the agent does.

use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use nmi_agent::{
    attest::Attestation,
    identity::{
        Binding, BindingSource, IdentityKind, Resolve, SecretRef, SecretStore,
        kube::{KubeConfig, KubeSecrets, KubeSource, MAX_POD_WAIT, SourceCheck},
    },
};
use nmi_testkit::fake_apiserver::FakeApiServer;
use serde_json::{Value, json};

const NODE: &str = "node-a";
const ORDERS_ID: &str = "11111111-1111-1111-1111-111111111111";
const PAYMENTS_ID: &str = "22222222-2222-2222-2222-222222222222";
const CID: &str = "4c2b0c6f0d8a5bcf27d1e9d4b0f3f9a36f5e2d1c0b9a8f7e6d5c4b3a2f1e0d9c";

/// The address the pods' connections come from, and the one their `status.podIP` says.
const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 7);

/// Resolution as the agent does it for a connection from [`POD_IP`].
trait ResolveFromPodIp {
    async fn resolve_cgroup(&self, cgroup: Option<&Path>) -> Binding;
}

impl ResolveFromPodIp for KubeSource {
    async fn resolve_cgroup(&self, cgroup: Option<&Path>) -> Binding {
        self.resolve_caller(cgroup, IpAddr::V4(POD_IP)).await
    }
}

fn client(server: &FakeApiServer) -> kube::Client {
    let url = server.url().parse().expect("server url");
    kube::Client::try_from(kube::Config::new(url)).expect("kube client")
}

async fn source(server: &FakeApiServer, cluster_wide: bool) -> KubeSource {
    let mut config = KubeConfig::new(NODE);
    config.cluster_wide = cluster_wide;
    source_with(server, config).await
}

async fn source_with(server: &FakeApiServer, config: KubeConfig) -> KubeSource {
    let src = KubeSource::start(client(server), config).expect("start");
    tokio::time::timeout(Duration::from_secs(10), src.wait_ready())
        .await
        .expect("reflectors synced");
    assert!(src.ready());
    src
}

fn uid(n: u32) -> String {
    format!("0f3a4b5c-6d7e-4f80-91a2-{n:012x}")
}

/// The cgroup a container of pod `uid` runs in, relative to kubepods.slice (the agent's default --cgroup).
fn cgroup_of(uid: &str) -> PathBuf {
    PathBuf::from(format!(
        "/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{CID}.scope",
        uid.replace('-', "_")
    ))
}

fn pod(ns: &str, name: &str, uid: &str, node: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": POD_IP.to_string(), "podIPs": [{"ip": POD_IP.to_string()}]}
    })
}

fn identity(ns: &str, name: &str, client_id: &str) -> Value {
    json!({
        "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "type": 0, "clientID": client_id,
            "resourceID": format!("/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}")
        }
    })
}

fn binding(ns: &str, name: &str, identity: &str, selector: &str) -> Value {
    json!({
        "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentityBinding",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"azureIdentity": identity, "selector": selector}
    })
}

fn exception(ns: &str, name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzurePodIdentityException",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"podLabels": labels}
    })
}

fn caller(cgroup: PathBuf) -> Attestation {
    Attestation {
        peer: SocketAddrV4::new(POD_IP, 40000),
        cgroup_id: 4242,
        cgroup: Some(cgroup),
        pid: 1,
        original_dst: SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 254), 80),
    }
}

/// Client ids bound, or `None` when the binding is not `Bound`.
fn bound_ids(b: &Binding) -> Option<Vec<String>> {
    match b {
        Binding::Bound { identities, .. } => {
            Some(identities.iter().map(|i| i.client_id.clone()).collect())
        }
        _ => None,
    }
}

/// Polls `check` until it returns true; changes travel API -> watch -> store asynchronously.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_created_and_deleted_at_run_time() {
    let server = FakeApiServer::start().await;
    let src = Arc::new(source(&server, false).await);
    let source = BindingSource::Kube(Arc::clone(&src));
    let mut bound = source.bound_client_ids();
    let u = uid(1);
    let who = caller(cgroup_of(&u));

    server.create(pod(
        "shop",
        "orders-0",
        &u,
        NODE,
        json!({"aadpodidbinding": "orders"}),
    ));
    eventually("pod seen, nothing bound yet", || async {
        matches!(source.resolve(&who).await, Binding::Unbound { workload: Some(ref w), .. } if w.pod.as_deref() == Some("orders-0"))
    })
    .await;

    server.create(identity("shop", "orders-id", ORDERS_ID));
    let b = server.create(binding("shop", "orders-binding", "orders-id", "orders"));
    eventually("binding resolves", || async {
        bound_ids(&source.resolve(&who).await) == Some(vec![ORDERS_ID.to_owned()])
    })
    .await;
    match source.resolve(&who).await {
        Binding::Bound {
            workload,
            identities,
        } => {
            assert_eq!(workload.namespace.as_deref(), Some("shop"));
            assert_eq!(workload.pod.as_deref(), Some("orders-0"));
            assert_eq!(workload.pod_uid.as_deref(), Some(u.as_str()));
            assert_eq!(workload.container.as_deref(), Some(CID));
            assert_eq!(identities[0].name, "orders-id");
            assert_eq!(identities[0].namespace.as_deref(), Some("shop"));
            assert_eq!(identities[0].kind, IdentityKind::UserAssigned);
            assert!(
                identities[0]
                    .resource_id
                    .as_deref()
                    .is_some_and(|r| r.ends_with("/orders-id"))
            );
        }
        other => panic!("{other:?}"),
    }
    eventually("bound set has the client id", || {
        let ok = bound.borrow_and_update().contains(ORDERS_ID);
        async move { ok }
    })
    .await;

    server.delete(&b);
    eventually("binding removal unbinds", || async {
        matches!(source.resolve(&who).await, Binding::Unbound { .. })
    })
    .await;
    eventually("bound set drops the client id", || {
        let ok = bound.borrow_and_update().is_empty();
        async move { ok }
    })
    .await;

    // Pods are listed and watched for this node only.
    let log = server.request_log();
    let pod_requests: Vec<_> = log.iter().filter(|r| r.path == "/api/v1/pods").collect();
    assert!(
        pod_requests.iter().any(|r| !r.is_watch()) && pod_requests.iter().any(|r| r.is_watch())
    );
    assert!(
        pod_requests
            .iter()
            .all(|r| r.param("fieldSelector").as_deref() == Some("spec.nodeName=node-a")),
        "{pod_requests:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bindings_are_namespaced_unless_cluster_wide() {
    let server = FakeApiServer::start().await;
    let u = uid(2);
    server.create(pod(
        "team-a",
        "app",
        &u,
        NODE,
        json!({"aadpodidbinding": "shared"}),
    ));
    server.create(identity("team-b", "b-id", PAYMENTS_ID));
    server.create(binding("team-b", "b-binding", "b-id", "shared"));

    let namespaced = source(&server, false).await;
    let cluster = source(&server, true).await;
    let path = cgroup_of(&u);
    match namespaced.resolve_cgroup(Some(&path)).await {
        Binding::Unbound { reason, .. } => {
            assert!(reason.contains("in namespace team-a"), "{reason}")
        }
        other => panic!("a binding in another namespace matched: {other:?}"),
    }
    assert_eq!(
        bound_ids(&cluster.resolve_cgroup(Some(&path)).await),
        Some(vec![PAYMENTS_ID.to_owned()])
    );

    // An identity annotated namespaced stays in its namespace even cluster-wide.
    let mut annotated = identity("team-b", "b-id", PAYMENTS_ID);
    annotated["metadata"]["annotations"] = json!({"aadpodidentity.k8s.io/Behavior": "namespaced"});
    server.update(annotated);
    eventually("namespaced annotation applies", || async {
        matches!(
            cluster.resolve_cgroup(Some(&path)).await,
            Binding::Unbound { .. }
        )
    })
    .await;

    // The same binding in the pod's own namespace matches in both modes; two identities bound at once.
    server.create(identity("team-a", "a-id", ORDERS_ID));
    server.create(binding("team-a", "a-binding", "a-id", "shared"));
    server.create(binding("team-a", "a-binding-2", "a-id", "shared"));
    eventually("own-namespace binding matches", || async {
        bound_ids(&namespaced.resolve_cgroup(Some(&path)).await) == Some(vec![ORDERS_ID.to_owned()])
    })
    .await;
    server.update(identity("team-b", "b-id", PAYMENTS_ID));
    eventually("cluster-wide sees both namespaces", || async {
        bound_ids(&cluster.resolve_cgroup(Some(&path)).await)
            .is_some_and(|ids| ids.len() == 2 && ids.contains(&ORDERS_ID.to_owned()))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exception_pods_go_to_the_node_identity() {
    let server = FakeApiServer::start().await;
    let (u1, u2, u3) = (uid(3), uid(4), uid(5));
    server.create(pod(
        "kube-system",
        "mic",
        &u1,
        NODE,
        json!({"app": "mic", "aadpodidbinding": "x"}),
    ));
    server.create(pod(
        "kube-system",
        "other",
        &u2,
        NODE,
        json!({"app": "other"}),
    ));
    server.create(pod(
        "default",
        "mic-elsewhere",
        &u3,
        NODE,
        json!({"app": "mic"}),
    ));
    server.create(exception(
        "kube-system",
        "mic-exception",
        json!({"app": "mic", "component": "mic"}),
    ));
    let src = source(&server, false).await;

    assert!(matches!(
        src.resolve_cgroup(Some(&cgroup_of(&u1))).await,
        Binding::NodeException { .. }
    ));
    assert!(matches!(
        src.resolve_cgroup(Some(&cgroup_of(&u2))).await,
        Binding::Unbound { .. }
    ));
    // Exceptions are per namespace.
    assert!(matches!(
        src.resolve_cgroup(Some(&cgroup_of(&u3))).await,
        Binding::Unbound { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_appears_late_is_waited_for() {
    let server = Arc::new(FakeApiServer::start().await);
    server.create(identity("shop", "orders-id", ORDERS_ID));
    server.create(binding("shop", "orders-binding", "orders-id", "orders"));
    let src = source(&server, false).await;
    let u = uid(6);

    let later = Arc::clone(&server);
    let u2 = u.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        later.create(pod(
            "shop",
            "late",
            &u2,
            NODE,
            json!({"aadpodidbinding": "orders"}),
        ));
    });
    let start = Instant::now();
    let got = src.resolve_cgroup(Some(&cgroup_of(&u))).await;
    let took = start.elapsed();
    assert_eq!(bound_ids(&got), Some(vec![ORDERS_ID.to_owned()]), "{got:?}");
    assert!(
        took >= Duration::from_millis(250) && took < MAX_POD_WAIT,
        "took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_never_appears_is_unbound_after_a_bounded_wait() {
    let server = FakeApiServer::start().await;
    // A pod of another node is not this node's pod, even though it exists.
    let other = uid(8);
    server.create(pod(
        "shop",
        "elsewhere",
        &other,
        "node-b",
        json!({"aadpodidbinding": "orders"}),
    ));
    let src = source(&server, false).await;

    for u in [uid(7), other] {
        let start = Instant::now();
        let got = src.resolve_cgroup(Some(&cgroup_of(&u))).await;
        let took = start.elapsed();
        match got {
            Binding::Unbound {
                workload: Some(w),
                reason,
            } => {
                assert_eq!(w.pod_uid.as_deref(), Some(u.as_str()));
                assert!(reason.contains("not among this node's pods"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            took >= MAX_POD_WAIT - Duration::from_millis(50),
            "gave up early: {took:?}"
        );
        assert!(
            took < MAX_POD_WAIT + Duration::from_millis(750),
            "waited too long: {took:?}"
        );
    }

    // Not a pod at all: answered at once.
    let start = Instant::now();
    assert!(matches!(
        src.resolve_cgroup(Some(&PathBuf::from("/system.slice/sshd.service")))
            .await,
        Binding::Unbound { workload: None, .. }
    ));
    assert!(matches!(
        src.resolve_cgroup(None).await,
        Binding::Unbound { workload: None, .. }
    ));
    assert!(start.elapsed() < Duration::from_millis(100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_forces_a_relist_and_the_result_stays_correct() {
    let server = FakeApiServer::start().await;
    let u = uid(9);
    server.create(pod(
        "shop",
        "orders-0",
        &u,
        NODE,
        json!({"aadpodidbinding": "orders"}),
    ));
    server.create(identity("shop", "orders-id", ORDERS_ID));
    server.create(identity("shop", "payments-id", PAYMENTS_ID));
    let old = server.create(binding("shop", "b", "orders-id", "orders"));
    let src = source(&server, false).await;
    let path = cgroup_of(&u);
    assert_eq!(
        bound_ids(&src.resolve_cgroup(Some(&path)).await),
        Some(vec![ORDERS_ID.to_owned()])
    );
    let lists_before = binding_lists(&server);

    // Every client's resourceVersion is now too old; the changes below happen while the watches are down.
    server.compact();
    server.delete(&old);
    server.create(binding("shop", "b2", "payments-id", "orders"));

    eventually("re-listed state is served", || async {
        bound_ids(&src.resolve_cgroup(Some(&path)).await) == Some(vec![PAYMENTS_ID.to_owned()])
    })
    .await;
    assert!(
        binding_lists(&server) > lists_before,
        "no re-list after 410"
    );
    // Every reflector resumed from a version older than the compaction and was told 410 Gone.
    assert!(
        server.expired_watches() >= 4,
        "410s served: {}",
        server.expired_watches()
    );
    assert!(src.ready(), "a re-list keeps the source ready");
}

fn binding_lists(server: &FakeApiServer) -> usize {
    server
        .request_log()
        .iter()
        .filter(|r| {
            !r.is_watch() && r.path == "/apis/aadpodidentity.k8s.io/v1/azureidentitybindings"
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_principal_identities_and_their_secrets() {
    let server = FakeApiServer::start().await;
    let u = uid(10);
    server.create(pod(
        "shop",
        "sp-user",
        &u,
        NODE,
        json!({"aadpodidbinding": "sp"}),
    ));
    server.create(json!({
        "apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
        "metadata": {"name": "sp-id", "namespace": "shop"},
        "spec": {"type": 1, "clientID": ORDERS_ID, "tenantID": "tenant-1",
                 "clientPassword": {"name": "sp-secret", "namespace": "shop"}}
    }));
    server.create(binding("shop", "sp-binding", "sp-id", "sp"));
    server.create(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "sp-secret", "namespace": "shop"},
        // base64("s3cr3t")
        "data": {"clientSecret": "czNjcjN0"}
    }));
    let src = source(&server, false).await;
    let identity = match src.resolve_cgroup(Some(&cgroup_of(&u))).await {
        Binding::Bound { identities, .. } => Arc::clone(&identities[0]),
        other => panic!("{other:?}"),
    };
    let IdentityKind::ServicePrincipal { tenant_id, secret } = &identity.kind else {
        panic!("{identity:?}");
    };
    assert_eq!(tenant_id, "tenant-1");
    assert_eq!(
        secret,
        &SecretRef {
            namespace: "shop".into(),
            name: "sp-secret".into(),
            key: "clientSecret".into()
        }
    );
    let secrets = KubeSecrets::new(client(&server));
    assert_eq!(secrets.secret(secret).await.expect("secret"), "s3cr3t");
    // The same through the trait the IMDS service uses.
    assert_eq!(
        <KubeSecrets as SecretStore>::secret(&secrets, secret)
            .await
            .expect("secret via SecretStore"),
        "s3cr3t"
    );
    let missing = SecretRef {
        name: "nope".into(),
        ..secret.clone()
    };
    assert!(secrets.secret(&missing).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_pods_resolve_through_their_mirror_pod() {
    let server = FakeApiServer::start().await;
    let hash = "6a3e4c2f0b9d8e7f6a5b4c3d2e1f0a9b";
    let mut mirror = pod(
        "kube-system",
        &format!("static-web-{NODE}"),
        &uid(11),
        NODE,
        json!({"aadpodidbinding": "web"}),
    );
    mirror["metadata"]["annotations"] = json!({"kubernetes.io/config.mirror": hash});
    // What the kubelet writes on the mirror pods it creates.
    mirror["metadata"]["ownerReferences"] = json!([{
        "apiVersion": "v1", "kind": "Node", "name": NODE,
        "uid": "5e1f0a9b-0000-4000-8000-000000000001", "controller": true
    }]);
    server.create(mirror);
    server.create(identity("kube-system", "web-id", ORDERS_ID));
    server.create(binding("kube-system", "web-binding", "web-id", "web"));
    let src = source(&server, false).await;
    let path = PathBuf::from(format!(
        "/kubepods-burstable.slice/kubepods-burstable-pod{hash}.slice/cri-containerd-{CID}.scope"
    ));
    assert_eq!(
        bound_ids(&src.resolve_cgroup(Some(&path)).await),
        Some(vec![ORDERS_ID.to_owned()])
    );
}

/// Anyone who may create a pod can write the mirror annotation: it must not let a pod claim another pod's cgroup.
/// The exact UID wins, and the annotation counts only on a pod its Node owns (a kubelet-made mirror pod).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_cannot_claim_another_pods_cgroup_with_a_mirror_annotation() {
    let server = FakeApiServer::start().await;
    let (victim, orphan_hash) = (uid(31), "7b4f5d3a1c0e9f8a7b6c5d4e3f2a1b0c");
    server.create(pod(
        "shop",
        "victim",
        &victim,
        NODE,
        json!({"aadpodidbinding": "orders"}),
    ));
    for (name, claimed) in [
        ("claims-victim", victim.as_str()),
        ("claims-static", orphan_hash),
    ] {
        let mut claimer = pod(
            "ops",
            name,
            &uid(if claimed == orphan_hash { 33 } else { 32 }),
            NODE,
            json!({"aadpodidbinding": "payments"}),
        );
        claimer["metadata"]["annotations"] = json!({"kubernetes.io/config.mirror": claimed});
        server.create(claimer);
    }
    server.create(identity("shop", "orders-id", ORDERS_ID));
    server.create(binding("shop", "orders-binding", "orders-id", "orders"));
    server.create(identity("ops", "payments-id", PAYMENTS_ID));
    server.create(binding(
        "ops",
        "payments-binding",
        "payments-id",
        "payments",
    ));
    let src = source(&server, false).await;

    assert_eq!(
        bound_ids(&src.resolve_cgroup(Some(&cgroup_of(&victim))).await),
        Some(vec![ORDERS_ID.to_owned()]),
        "the victim is resolved by its own UID, not by a pod that claims it"
    );
    let static_path = PathBuf::from(format!(
        "/kubepods-burstable.slice/kubepods-burstable-pod{orphan_hash}.slice/cri-containerd-{CID}.scope"
    ));
    match src.resolve_cgroup(Some(&static_path)).await {
        Binding::Unbound { reason, .. } => {
            assert!(reason.contains("not among this node's pods"), "{reason}")
        }
        other => {
            panic!("a pod that is not a mirror pod must not stand for a static pod: {other:?}")
        }
    }

    // A forged owner reference and name: one claimant alone would pass for the mirror pod (the API server checks
    // neither), so while the real mirror pod exists as well, the two claims cancel out and nobody is served as it.
    let owner = |node: &str| json!([{"apiVersion": "v1", "kind": "Node", "name": node, "uid": "5e1f0a9b-0000-4000-8000-000000000002", "controller": true}]);
    let mut other_node = pod(
        "ops",
        "forged-elsewhere",
        &uid(34),
        NODE,
        json!({"aadpodidbinding": "payments"}),
    );
    other_node["metadata"]["annotations"] = json!({"kubernetes.io/config.mirror": orphan_hash});
    other_node["metadata"]["ownerReferences"] = owner("node-b");
    server.create(other_node.clone());
    let rejected = src.resolve_cgroup(Some(&static_path)).await;
    assert!(
        matches!(rejected, Binding::Unbound { .. }),
        "a mirror pod of another node stood for this node's static pod: {rejected:?}"
    );
    server.delete(&other_node);
    let mut real = pod(
        "shop",
        &format!("static-db-{NODE}"),
        &uid(35),
        NODE,
        json!({"aadpodidbinding": "orders"}),
    );
    real["metadata"]["annotations"] = json!({"kubernetes.io/config.mirror": orphan_hash});
    real["metadata"]["ownerReferences"] = owner(NODE);
    server.create(real.clone());
    eventually("the real mirror pod serves its static pod", || async {
        bound_ids(&src.resolve_cgroup(Some(&static_path)).await) == Some(vec![ORDERS_ID.to_owned()])
    })
    .await;
    let mut forged = pod(
        "ops",
        &format!("forged-{NODE}"),
        &uid(36),
        NODE,
        json!({"aadpodidbinding": "payments"}),
    );
    forged["metadata"]["annotations"] = json!({"kubernetes.io/config.mirror": orphan_hash});
    forged["metadata"]["ownerReferences"] = owner(NODE);
    server.create(forged);
    eventually("two claimants cancel out", || async {
        matches!(
            src.resolve_cgroup(Some(&static_path)).await,
            Binding::Unbound { .. }
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_api_server_is_not_ready_and_answers_in_bounded_time() {
    // Bind and drop a listener to get a port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!("http://127.0.0.1:{port}").parse().expect("url");
    let client = kube::Client::try_from(kube::Config::new(url)).expect("client");
    let src = KubeSource::start(client, KubeConfig::new(NODE)).expect("start");
    let start = Instant::now();
    // Not "unbound" (final for SDKs) but "not ready" (a retryable 503), after at most the pod wait.
    assert!(matches!(
        src.resolve_cgroup(Some(&cgroup_of(&uid(12)))).await,
        Binding::NotReady { .. }
    ));
    assert!(start.elapsed() < MAX_POD_WAIT + Duration::from_millis(500));
    assert!(!src.ready());
    assert!(KubeSource::start(client_for_empty_node(), KubeConfig::new(" ")).is_err());
}

fn client_for_empty_node() -> kube::Client {
    kube::Client::try_from(kube::Config::new(
        "http://127.0.0.1:1".parse().expect("url"),
    ))
    .expect("client")
}

/// A pod that speaks from another pod's address (a secondary address on its own interface, `IP_TRANSPARENT`) is
/// refused even though the kernel attested its cgroup; `audit` serves it and says so, `off` does not look.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_not_from_the_pods_own_address_is_refused() {
    let server = FakeApiServer::start().await;
    let u = uid(21);
    server.create(pod(
        "shop",
        "orders",
        &u,
        NODE,
        json!({"aadpodidbinding": "orders"}),
    ));
    let mut host = pod(
        "kube-system",
        "hostnet",
        &uid(22),
        NODE,
        json!({"aadpodidbinding": "orders"}),
    );
    host["metadata"]["namespace"] = json!("shop");
    host["spec"]["hostNetwork"] = json!(true);
    host["status"] =
        json!({"podIP": "10.224.0.4", "podIPs": [{"ip": "10.224.0.4"}], "hostIP": "10.224.0.4"});
    server.create(host);
    server.create(identity("shop", "orders-id", ORDERS_ID));
    server.create(binding("shop", "orders-binding", "orders-id", "orders"));
    let spoofed: IpAddr = "10.244.0.8".parse().expect("address");
    let node: IpAddr = "10.224.0.4".parse().expect("address");

    let enforce = source(&server, false).await;
    match enforce.resolve_caller(Some(&cgroup_of(&u)), spoofed).await {
        Binding::Refused { workload, reason } => {
            assert_eq!(workload.pod.as_deref(), Some("orders"));
            assert!(
                reason.starts_with("source_address_mismatch") && reason.contains("10.244.0.8"),
                "{reason}"
            );
        }
        other => panic!("a spoofed source must be refused: {other:?}"),
    }
    assert_eq!(
        bound_ids(
            &enforce
                .resolve_caller(Some(&cgroup_of(&u)), IpAddr::V4(POD_IP))
                .await
        ),
        Some(vec![ORDERS_ID.to_owned()]),
        "the pod's own address is served"
    );
    // A hostNetwork pod speaks from the node's address, never from a pod address.
    assert!(
        bound_ids(
            &enforce
                .resolve_caller(Some(&cgroup_of(&uid(22))), node)
                .await
        )
        .is_some()
    );
    assert!(matches!(
        enforce
            .resolve_caller(Some(&cgroup_of(&uid(22))), IpAddr::V4(POD_IP))
            .await,
        Binding::Refused { .. }
    ));

    for (mode, served) in [(SourceCheck::Audit, true), (SourceCheck::Off, true)] {
        let config = KubeConfig {
            source_check: mode,
            ..KubeConfig::new(NODE)
        };
        let src = source_with(&server, config).await;
        let got = src.resolve_caller(Some(&cgroup_of(&u)), spoofed).await;
        assert_eq!(bound_ids(&got).is_some(), served, "{mode:?}: {got:?}");
    }
}

/// The kubelet reports a pod's address moments after its sandbox starts; a first request in between waits for it
/// (bounded), and a pod that never gets one is told to retry, never refused or served unchecked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_without_an_address_yet_is_waited_for_then_told_to_retry() {
    let server = Arc::new(FakeApiServer::start().await);
    server.create(identity("shop", "orders-id", ORDERS_ID));
    server.create(binding("shop", "orders-binding", "orders-id", "orders"));
    let (late, never) = (uid(23), uid(24));
    for (u, name) in [(&late, "late-ip"), (&never, "no-ip")] {
        let mut p = pod("shop", name, u, NODE, json!({"aadpodidbinding": "orders"}));
        p["status"] = json!({"phase": "Pending"});
        server.create(p);
    }
    let src = source(&server, false).await;

    let later = Arc::clone(&server);
    let u2 = late.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        later.update(pod(
            "shop",
            "late-ip",
            &u2,
            NODE,
            json!({"aadpodidbinding": "orders"}),
        ));
    });
    let start = Instant::now();
    let got = src.resolve_cgroup(Some(&cgroup_of(&late))).await;
    assert_eq!(bound_ids(&got), Some(vec![ORDERS_ID.to_owned()]), "{got:?}");
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "{:?}",
        start.elapsed()
    );

    let start = Instant::now();
    match src.resolve_cgroup(Some(&cgroup_of(&never))).await {
        Binding::NotReady { reason } => {
            assert!(reason.contains("no address for pod shop/no-ip"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    let took = start.elapsed();
    assert!(
        took >= MAX_POD_WAIT - Duration::from_millis(50)
            && took < MAX_POD_WAIT + Duration::from_millis(750),
        "{took:?}"
    );
}
