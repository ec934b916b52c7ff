//! The startup taint against the fake API server: the agent removes exactly its taint from exactly its node, once it
//! serves, and says what to do when RBAC forbids it.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use nmi_agent::{
    run::startup_taint::{self, DEFAULT_KEY, TaintError},
    telemetry::readiness::Readiness,
};
use nmi_testkit::fake_apiserver::{FakeApiServer, Options};
use serde_json::{Value, json};

fn client(server: &FakeApiServer) -> kube::Client {
    let url = server.url().parse().expect("server url");
    kube::Client::try_from(kube::Config::new(url)).expect("kube client")
}

fn node(name: &str, taints: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"agentpool": "nodepool1"}},
        "spec": {"providerID": format!("azure:///{name}"), "taints": taints},
    })
}

fn taints_of(server: &FakeApiServer, name: &str) -> Value {
    let stored = server
        .get(&node(name, json!([])))
        .unwrap_or_else(|| panic!("node {name} is gone"));
    stored["spec"]["taints"].clone()
}

fn patches(server: &FakeApiServer) -> Vec<String> {
    server
        .request_log()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .map(|r| r.path)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removes_every_startup_taint_of_its_own_node_and_nothing_else() {
    let server = FakeApiServer::start().await;
    let gpu = json!({"key": "sku", "value": "gpu", "effect": "NoSchedule"});
    let other_agent = json!({"key": "other.example/not-ready", "effect": "NoSchedule"});
    server.create(node(
        "node-a",
        json!([
            gpu,
            {"key": DEFAULT_KEY, "value": "true", "effect": "NoSchedule"},
            other_agent,
            {"key": DEFAULT_KEY, "effect": "NoExecute"},
        ]),
    ));
    let neighbour = json!([{"key": DEFAULT_KEY, "value": "true", "effect": "NoSchedule"}]);
    server.create(node("node-b", neighbour.clone()));
    let nodes: Api<Node> = Api::all(client(&server));

    let removed = startup_taint::remove(&nodes, "node-a", DEFAULT_KEY)
        .await
        .expect("removal");
    assert_eq!(removed, 2);
    assert_eq!(taints_of(&server, "node-a"), json!([gpu, other_agent]));
    assert_eq!(
        taints_of(&server, "node-b"),
        neighbour,
        "another node keeps its taint"
    );
    let stored = server.get(&node("node-a", json!([]))).expect("node-a");
    assert_eq!(
        stored["metadata"]["labels"],
        json!({"agentpool": "nodepool1"})
    );
    assert_eq!(patches(&server), ["/api/v1/nodes/node-a"], "one patch");

    // Again (an agent restart): nothing to remove, and no write.
    let again = startup_taint::remove(&nodes, "node-a", DEFAULT_KEY)
        .await
        .expect("second removal");
    assert_eq!(again, 0);
    assert_eq!(
        patches(&server).len(),
        1,
        "no patch without a taint to remove"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_taint_stays_until_the_agent_serves() {
    let server = Arc::new(FakeApiServer::start().await);
    let taint = json!([{"key": DEFAULT_KEY, "value": "true", "effect": "NoSchedule"}]);
    server.create(node("node-a", taint.clone()));
    let readiness = Arc::new(Readiness::default());
    let task = tokio::spawn(startup_taint::remove_when_serving(
        client(&server),
        "node-a".into(),
        DEFAULT_KEY.into(),
        Arc::clone(&readiness),
    ));

    // Programs attached but bindings not synced: not serving, the taint must stay.
    readiness.programs_attached.store(true, Ordering::Release);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(taints_of(&server, "node-a"), taint);
    assert!(patches(&server).is_empty());

    readiness.bindings_loaded.store(true, Ordering::Release);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("removed in time")
        .expect("task");
    assert_eq!(taints_of(&server, "node-a"), json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forbidden_patch_says_which_rbac_to_apply_and_how_to_untaint_by_hand() {
    let server = FakeApiServer::start_with(Options {
        forbid_writes: true,
        ..Options::default()
    })
    .await;
    server.create(node(
        "node-a",
        json!([{"key": DEFAULT_KEY, "effect": "NoSchedule"}]),
    ));
    let nodes: Api<Node> = Api::all(client(&server));
    let err = startup_taint::remove(&nodes, "node-a", DEFAULT_KEY)
        .await
        .expect_err("forbidden");
    assert!(
        matches!(err, TaintError::Forbidden { verb: "patch", .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("deploy/clusterrole.yaml")
            && message.contains(&format!("kubectl taint nodes node-a {DEFAULT_KEY}-")),
        "{message}"
    );
}
