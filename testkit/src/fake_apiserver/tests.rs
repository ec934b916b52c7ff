use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::{query::Filter, query::query_pairs, *};
use crate::raw_http::{Reply, get};

fn pod(name: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "ns"},
           "spec": {"nodeName": node}})
}

async fn server_with_pods_on_two_nodes() -> Arc<FakeApiServer> {
    let server = Arc::new(
        FakeApiServer::start_with(Options {
            bookmark_interval: Duration::from_millis(200),
            ..Options::default()
        })
        .await,
    );
    server.create(pod("a", "n1"));
    server.create(pod("b", "n2"));
    server
}

fn ok(reply: &Reply) -> bool {
    reply.status == 200
}

#[test]
fn queries_are_percent_decoded_leniently() {
    let q = query_pairs("fieldSelector=spec.nodeName%3Dnode-a&watch=1&labelSelector=a%3Db%2Cc");
    assert_eq!(q["fieldSelector"], "spec.nodeName=node-a");
    assert_eq!(q["labelSelector"], "a=b,c");
    let lenient = query_pairs("a=50%&b=%4&c=%41&d=x+y");
    assert_eq!(lenient["a"], "50%");
    assert_eq!(lenient["b"], "%4");
    assert_eq!(lenient["c"], "A");
    assert_eq!(lenient["d"], "x y");
}

#[tokio::test]
async fn created_objects_get_a_uid_and_a_resource_version() {
    let server = FakeApiServer::start().await;
    let a = server.create(pod("a", "n1"));
    assert!(a["metadata"]["uid"].is_string() && a["metadata"]["resourceVersion"].is_string());
}

#[tokio::test]
async fn a_list_is_filtered_by_field_selector_and_carries_the_resource_version() {
    let server = server_with_pods_on_two_nodes().await;
    let list = get(
        server.addr(),
        "/api/v1/pods?fieldSelector=spec.nodeName%3Dn1&limit=500",
    )
    .await;
    assert!(ok(&list), "{list:?}");
    assert!(
        list.body.contains(r#""kind":"PodList""#) && list.body.contains(r#""name":"a""#),
        "{list:?}"
    );
    assert!(!list.body.contains(r#""name":"b""#), "{list:?}");
    let rv = server.resource_version();
    assert!(
        list.body.contains(&format!(r#""resourceVersion":"{rv}""#)),
        "{list:?}"
    );
}

#[tokio::test]
async fn a_watch_sees_later_changes_through_its_selector_and_bookmarks_and_ends_at_its_timeout() {
    let server = server_with_pods_on_two_nodes().await;
    let rv = server.resource_version();
    let writer = Arc::clone(&server);
    let later = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        writer.create(pod("c", "n1"));
        writer.create(pod("d", "n2"));
    });
    let started = Instant::now();
    let watch = get(
        server.addr(),
        &format!(
            "/api/v1/pods?watch=true&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=1&fieldSelector=spec.nodeName%3Dn1"
        ),
    )
    .await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(
        watch.body.contains(r#""type":"ADDED""#) && watch.body.contains(r#""name":"c""#),
        "{watch:?}"
    );
    assert!(
        !watch.body.contains(r#""name":"d""#),
        "field selector on watch: {watch:?}"
    );
    assert!(watch.body.contains(r#""type":"BOOKMARK""#), "{watch:?}");
    later.await.expect("writer task");
    assert_eq!(
        server.request_log().iter().filter(|r| r.is_watch()).count(),
        1
    );
}

#[tokio::test]
async fn after_compaction_a_watch_from_an_old_version_gets_410_expired() {
    let server = server_with_pods_on_two_nodes().await;
    let rv = server.resource_version();
    server.compact();
    let gone = get(
        server.addr(),
        &format!("/api/v1/pods?watch=1&resourceVersion={rv}"),
    )
    .await;
    assert!(
        gone.body.contains(r#""type":"ERROR""#) && gone.body.contains(r#""code":410"#),
        "{gone:?}"
    );
    assert!(gone.body.contains(r#""reason":"Expired""#), "{gone:?}");
    assert_eq!(server.expired_watches(), 1);
}

#[tokio::test]
async fn a_single_object_is_served_or_a_404_status() {
    let server = FakeApiServer::start().await;
    server.create(json!({"apiVersion": "v1", "kind": "Secret",
                         "metadata": {"name": "s", "namespace": "ns"}, "data": {"k": "dg=="}}));
    let secret = get(server.addr(), "/api/v1/namespaces/ns/secrets/s").await;
    assert!(
        ok(&secret) && secret.body.contains(r#""k":"dg==""#),
        "{secret:?}"
    );
    let missing = get(server.addr(), "/api/v1/namespaces/ns/secrets/nope").await;
    assert!(
        missing.status == 404 && missing.body.contains(r#""reason":"NotFound""#),
        "{missing:?}"
    );
}

#[test]
fn label_and_field_selectors_filter_objects() {
    let mut p = HashMap::new();
    p.insert("fieldSelector".to_owned(), "spec.nodeName=n1".to_owned());
    p.insert(
        "labelSelector".to_owned(),
        "app=x,!skip,tier!=db".to_owned(),
    );
    let f = Filter::parse(&p, None).expect("filter");
    let obj = |node: &str, labels: Value| json!({"metadata": {"labels": labels}, "spec": {"nodeName": node}});
    assert!(f.matches(&obj("n1", json!({"app": "x"}))));
    assert!(!f.matches(&obj("n2", json!({"app": "x"}))));
    assert!(!f.matches(&obj("n1", json!({"app": "x", "skip": "1"}))));
    assert!(!f.matches(&obj("n1", json!({"app": "x", "tier": "db"}))));
    assert!(!f.matches(&obj("n1", json!({}))));
}
