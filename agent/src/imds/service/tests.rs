//! Service-level tests: the whole request path against a fake resolver and a scripted upstream.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use http::{HeaderValue, Request, StatusCode, header};
use tracing_subscriber::{Layer, Registry, layer::SubscriberExt};

use super::*;
use crate::{
    identity::{Identity, IdentityKind, NoSecretStore, Workload},
    imds::{
        response::{JSON, body_of},
        token::{
            RetryPolicy, TransportError,
            fake::{FakeUpstream, Scripted},
            unix_now,
        },
    },
};

struct FakeResolver {
    by_pid: HashMap<u32, Binding>,
    calls: Arc<AtomicUsize>,
}

impl Resolve for FakeResolver {
    fn resolve(&self, caller: &Attestation) -> impl Future<Output = Binding> + Send {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let binding = self
            .by_pid
            .get(&caller.pid)
            .cloned()
            .unwrap_or(Binding::Unbound {
                workload: None,
                reason: "no pod for this cgroup".into(),
            });
        async move { binding }
    }
}

const BOUND_ONE: u32 = 1;
const BOUND_TWO: u32 = 2;
const EXCEPTION: u32 = 3;
const UNBOUND: u32 = 4;
const NOT_READY: u32 = 5;

fn identity(name: &str, client_id: &str) -> Arc<Identity> {
    Arc::new(Identity {
        name: name.into(),
        namespace: Some("team-a".into()),
        client_id: client_id.into(),
        resource_id: Some(format!(
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
        )),
        object_id: Some(format!("oid-{name}")),
        kind: IdentityKind::UserAssigned,
    })
}

fn workload(pod: &str) -> Workload {
    Workload {
        namespace: Some("team-a".into()),
        pod: Some(pod.into()),
        pod_uid: Some(format!("uid-{pod}")),
        container: Some("app".into()),
    }
}

fn caller(pid: u32) -> Attestation {
    Attestation {
        peer: "10.0.0.5:40000".parse().expect("addr"),
        cgroup_id: 4242,
        cgroup: Some(PathBuf::from(
            "/kubepods.slice/pod-x/cri-containerd-c1.scope",
        )),
        pid,
        original_dst: "169.254.169.254:80".parse().expect("addr"),
    }
}

/// A far-future token from the fake IMDS (expires 2100-01-01).
const TOKEN_A: &str = r#"{"access_token":"tok-a","client_id":"client-a","expires_in":"86400","expires_on":"4102444800","ext_expires_in":"86399","not_before":"1700000000","resource":"https://management.azure.com/","token_type":"Bearer"}"#;

struct Harness {
    service: Service<FakeResolver>,
    upstream: Arc<FakeUpstream>,
    resolves: Arc<AtomicUsize>,
}

fn harness(script: Vec<Scripted>, config: Config) -> Harness {
    let (a, b) = (identity("a", "client-a"), identity("b", "client-b"));
    let by_pid = HashMap::from([
        (
            BOUND_ONE,
            Binding::Bound {
                workload: workload("web-1"),
                identities: vec![Arc::clone(&a)],
            },
        ),
        (
            BOUND_TWO,
            Binding::Bound {
                workload: workload("web-2"),
                identities: vec![a, b],
            },
        ),
        (
            EXCEPTION,
            Binding::NodeException {
                workload: workload("mic-1"),
            },
        ),
        (
            UNBOUND,
            Binding::Unbound {
                workload: Some(workload("lonely")),
                reason: "no binding selects this pod".into(),
            },
        ),
        (
            NOT_READY,
            Binding::NotReady {
                reason: "caches not synced".into(),
            },
        ),
    ]);
    let resolves = Arc::new(AtomicUsize::new(0));
    let resolver = FakeResolver {
        by_pid,
        calls: Arc::clone(&resolves),
    };
    let upstream = Arc::new(FakeUpstream::new(script));
    let retry = RetryPolicy {
        base_delay: Duration::from_millis(1),
        ..RetryPolicy::default()
    };
    let tokens = Arc::new(ImdsTokenSource::new(upstream.clone(), retry, 5));
    Harness {
        service: Service::with_parts(config, resolver, upstream.clone(), tokens),
        upstream,
        resolves,
    }
}

/// The usual harness: IMDS hands out `TOKEN_A`, default configuration.
fn serving_token_a() -> Harness {
    harness(
        vec![Scripted::Status(200, TOKEN_A, None)],
        Config::default(),
    )
}

fn get(uri: &str) -> Request<()> {
    Request::get(uri)
        .header("Metadata", "true")
        .body(())
        .expect("request")
}

const TOKEN_URI: &str = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com%2F";
const NOT_FOUND: &str = r#"{"error":"invalid_request","error_description":"Identity not found"}"#;
const SEVERAL: &str = r#"{"error":"invalid_request","error_description":"Multiple user assigned identities exist, please specify the clientId / resourceId of the identity in the token request"}"#;

impl Harness {
    async fn call(&self, pid: u32, req: Request<()>) -> (StatusCode, Option<String>, String) {
        body_of(self.service.handle(&caller(pid), req).await).await
    }
    fn upstream_paths(&self) -> Vec<String> {
        self.upstream
            .requests
            .lock()
            .map(|r| r.iter().map(|(p, _)| p.clone()).collect())
            .unwrap_or_default()
    }
}

#[tokio::test]
async fn missing_or_wrong_metadata_header_is_answered_before_any_lookup() {
    let h = serving_token_a();
    let bare = Request::get(TOKEN_URI).body(()).expect("request");
    let probe = Request::get("/metadata/identity/oauth2/token")
        .body(())
        .expect("request");
    let wrong = Request::get(TOKEN_URI)
        .header("Metadata", "True")
        .body(())
        .expect("request");
    let post = Request::post(TOKEN_URI).body(()).expect("request");
    for req in [bare, probe, wrong, post] {
        let (status, ct, body) = h.call(BOUND_ONE, req).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(ct.as_deref(), Some(JSON));
        assert_eq!(
            body,
            r#"{"error":"bad_request_102","error_description":"Required metadata header not specified"}"#
        );
    }
    assert_eq!(
        h.resolves.load(Ordering::SeqCst),
        0,
        "no identity resolution for probes"
    );
    assert_eq!(h.upstream.calls(), 0);
}

#[tokio::test]
async fn malformed_token_requests() {
    let h = serving_token_a();
    let (status, _, body) = h
        .call(
            BOUND_ONE,
            get("/metadata/identity/oauth2/token?api-version=2018-02-01"),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        r#"{"error":"invalid_request","error_description":"Required audience parameter not specified"}"#
    );
    let (status, _, body) = h
        .call(
            BOUND_ONE,
            get(&format!("{TOKEN_URI}&client_id=client-a&msi_res_id=x")),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.starts_with(r#"{"error":"invalid_request","#), "{body}");
    let post = Request::post(TOKEN_URI)
        .header("Metadata", "true")
        .body(())
        .expect("request");
    let (status, _, _) = h.call(BOUND_ONE, post).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        (h.resolves.load(Ordering::SeqCst), h.upstream.calls()),
        (0, 0)
    );
}

#[tokio::test]
async fn bound_caller_gets_its_token_then_from_the_cache() {
    let h = serving_token_a();
    let (status, ct, body) = h.call(BOUND_ONE, get(TOKEN_URI)).await;
    assert_eq!((status, ct.as_deref()), (StatusCode::OK, Some(JSON)));
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let fields = v.as_object().expect("object");
    let names: Vec<&str> = fields.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "access_token",
            "client_id",
            "expires_in",
            "expires_on",
            "ext_expires_in",
            "not_before",
            "resource",
            "token_type"
        ]
    );
    assert!(fields.values().all(serde_json::Value::is_string), "{body}");
    assert_eq!(
        (v["access_token"].as_str(), v["client_id"].as_str()),
        (Some("tok-a"), Some("client-a"))
    );
    assert_eq!(v["resource"], "https://management.azure.com/");
    let expires_in: u64 = v["expires_in"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("numeric expires_in");
    let now = unix_now();
    assert!(
        expires_in <= 4_102_444_800 - now && expires_in + 5 >= 4_102_444_800 - now,
        "recomputed: {expires_in}"
    );
    assert_eq!(
        h.upstream_paths(),
        [
            "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com%2F&client_id=client-a"
        ]
    );
    // The same caller again, and by explicit selectors: all served from the cache.
    for q in [
        "",
        "&client_id=CLIENT-A",
        "&object_id=oid-a",
        "&mi_res_id=/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/a",
    ] {
        let (status, _, _) = h.call(BOUND_ONE, get(&format!("{TOKEN_URI}{q}"))).await;
        assert_eq!(status, StatusCode::OK, "{q}");
    }
    assert_eq!(h.upstream.calls(), 1);
}

#[tokio::test]
async fn backslash_and_case_variants_reach_the_checked_token_endpoint() {
    let h = serving_token_a();
    for path in [
        "/metadata/identity\\oauth2\\token",
        "/METADATA/identity/oauth2/token",
        "//metadata/identity/%2e%2e/identity/oauth2/token",
    ] {
        let uri = format!("{path}?resource=https%3A%2F%2Fmanagement.azure.com%2F");
        let (status, _, body) = h.call(UNBOUND, get(&uri)).await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::BAD_REQUEST, NOT_FOUND),
            "{path}"
        );
        let bare = Request::get(uri.as_str()).body(()).expect("request");
        assert_eq!(
            h.call(BOUND_ONE, bare).await.0,
            StatusCode::BAD_REQUEST,
            "{path} still needs the header"
        );
        assert_eq!(
            h.call(BOUND_ONE, get(&uri)).await.0,
            StatusCode::OK,
            "{path}"
        );
    }
    assert_eq!(h.upstream.calls(), 1);
}

#[tokio::test]
async fn unbound_and_unassigned_callers_get_identity_not_found_ambiguous_ones_imds_own_words() {
    let h = serving_token_a();
    let cases = [
        (UNBOUND, TOKEN_URI.to_owned(), NOT_FOUND),
        (99, TOKEN_URI.to_owned(), NOT_FOUND),
        (
            BOUND_ONE,
            format!("{TOKEN_URI}&client_id=client-b"),
            NOT_FOUND,
        ),
        (BOUND_ONE, format!("{TOKEN_URI}&object_id=oid-b"), NOT_FOUND),
        (BOUND_TWO, TOKEN_URI.to_owned(), SEVERAL),
    ];
    for (pid, uri, want) in cases {
        let (status, ct, body) = h.call(pid, get(&uri)).await;
        assert_eq!(
            (status, ct.as_deref(), body.as_str()),
            (StatusCode::BAD_REQUEST, Some(JSON), want),
            "{pid} {uri}"
        );
    }
    assert_eq!(h.upstream.calls(), 0, "never forwarded upstream");
    // With a selector, the two-identity caller is served.
    let (status, _, _) = h
        .call(BOUND_TWO, get(&format!("{TOKEN_URI}&client_id=client-a")))
        .await;
    assert_eq!(status, StatusCode::OK);
}

/// IMDS refuses requests that went through a proxy (`X-Forwarded-For`), on every path: a pod's web proxy relaying a
/// user's URL must not reach a token, nor instance metadata.
#[tokio::test]
async fn a_request_through_a_proxy_is_refused_on_every_path_and_never_forwarded() {
    let (captured, _guard) = capture_audit();
    let h = serving_token_a();
    for uri in [TOKEN_URI, "/metadata/instance?api-version=2021-02-01"] {
        for value in ["10.0.0.1", ""] {
            let req = Request::get(uri)
                .header("Metadata", "true")
                .header("X-Forwarded-For", value)
                .body(())
                .expect("request");
            let (status, _, body) = h.call(BOUND_ONE, req).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{uri} {value:?}");
            assert!(body.contains("X-Forwarded-For"), "{body}");
        }
    }
    assert_eq!(h.upstream.calls(), 0, "nothing forwarded");
    assert_eq!(h.resolves.load(Ordering::SeqCst), 0, "nothing resolved");
    let events = captured.0.lock().map(|e| e.clone()).unwrap_or_default();
    let reasons: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e["outcome"].as_str(), e["reason"].as_str()))
        .collect();
    assert_eq!(
        reasons,
        [("denied", "x_forwarded_for"), ("denied", "x_forwarded_for")],
        "one audit per refused token request"
    );
}

#[tokio::test]
async fn a_source_still_loading_answers_a_retryable_503_not_identity_not_found() {
    let h = serving_token_a();
    let (status, _, body) = h.call(NOT_READY, get(TOKEN_URI)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("temporarily_unavailable"), "{body}");
    assert_eq!(h.upstream.calls(), 0, "never forwarded upstream");
}

#[tokio::test]
async fn node_exception_is_forwarded_unchanged() {
    let system = r#"{"access_token":"node","expires_on":"1","resource":"r","token_type":"Bearer"}"#;
    let h = harness(vec![Scripted::Status(200, system, None)], Config::default());
    let uri = format!("{TOKEN_URI}&client_id=anything");
    let req = Request::get(uri.as_str())
        .header("Metadata", "true")
        .header("X-Ms-Client-Request-Id", "1234")
        .body(())
        .expect("request");
    let (status, _, body) = h.call(EXCEPTION, req).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, system));
    let requests = h
        .upstream
        .requests
        .lock()
        .map(|r| r.clone())
        .unwrap_or_default();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].0, uri);
    let sent: Vec<_> = requests[0]
        .1
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.clone()))
        .collect();
    assert_eq!(
        sent,
        [("metadata".to_owned(), HeaderValue::from_static("true"))]
    );
    assert_eq!(
        h.service.cache().stats().entries,
        0,
        "forwarded answers are not cached"
    );
}

#[tokio::test]
async fn instance_metadata_is_forwarded_by_its_canonical_path() {
    let h = harness(
        vec![Scripted::Status(200, r#"{"compute":{}}"#, None)],
        Config::default(),
    );
    let (status, _, body) = h
        .call(
            UNBOUND,
            get("/METADATA//instance\\compute/vmId?api-version=2021-02-01&format=text"),
        )
        .await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, r#"{"compute":{}}"#)
    );
    h.call(UNBOUND, get("/metadata/versions")).await;
    h.call(
        UNBOUND,
        get("/metadata/identity/oauth2/token/..%2F..%2F..%2Finstance"),
    )
    .await;
    assert_eq!(
        h.upstream_paths(),
        [
            "/metadata/instance/compute/vmId?api-version=2021-02-01&format=text",
            "/metadata/versions",
            "/metadata/instance"
        ]
    );
    assert_eq!(h.resolves.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn other_paths_are_refused_and_never_forwarded() {
    let h = harness(vec![Scripted::Status(200, "{}", None)], Config::default());
    for path in [
        "/",
        "/metadata/identity/oauth2/token/../../instance",
        "/metadata/identity/oauth2/tokens",
        "/metadata/attested/document?api-version=2020-09-01",
        "/metadata/scheduledevents",
        "/metadata/instance/compute/vmId.",
        "/metadata/identity/oauth2/token%",
        "/host/token/?resource=x",
    ] {
        let (status, ct, body) = h.call(BOUND_ONE, get(path)).await;
        assert_eq!(
            (status, ct.as_deref()),
            (StatusCode::FORBIDDEN, Some(JSON)),
            "{path}"
        );
        assert!(body.contains(r#""error":"forbidden""#), "{body}");
    }
    let off = harness(
        vec![Scripted::Status(200, "{}", None)],
        Config {
            forward_instance_metadata: false,
            ..Config::default()
        },
    );
    assert_eq!(
        off.call(BOUND_ONE, get("/metadata/instance")).await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(h.upstream.calls() + off.upstream.calls(), 0);
}

#[tokio::test]
async fn upstream_failures_pass_through_and_are_not_cached() {
    let throttled = r#"{"error":"too_many_requests","error_description":"throttled"}"#;
    let h = harness(
        vec![
            Scripted::Status(429, throttled, Some("30")),
            Scripted::Status(200, TOKEN_A, None),
        ],
        Config::default(),
    );
    let response = h.service.handle(&caller(BOUND_ONE), get(TOKEN_URI)).await;
    assert_eq!(
        response
            .headers()
            .get(header::RETRY_AFTER)
            .map(HeaderValue::as_bytes),
        Some(&b"30"[..])
    );
    let (status, _, body) = body_of(response).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::TOO_MANY_REQUESTS, throttled)
    );
    assert_eq!(h.call(BOUND_ONE, get(TOKEN_URI)).await.0, StatusCode::OK);
    assert_eq!(h.upstream.calls(), 2);

    let down = harness(
        vec![Scripted::Fail(TransportError::Connect("refused".into()))],
        Config::default(),
    );
    let (status, _, body) = down.call(BOUND_ONE, get(TOKEN_URI)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("temporarily_unavailable"), "{body}");
    let (status, _, _) = down.call(UNBOUND, get("/metadata/instance")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn purge_identity_forgets_cached_tokens() {
    let h = serving_token_a();
    h.call(BOUND_ONE, get(TOKEN_URI)).await;
    assert_eq!(h.service.purge_identity("CLIENT-A"), 1);
    h.call(BOUND_ONE, get(TOKEN_URI)).await;
    assert_eq!(h.upstream.calls(), 2);
}

#[tokio::test]
async fn binding_watch_drops_tokens_of_unbound_identities() {
    let h = serving_token_a();
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(BTreeSet::from(["client-a".to_owned()])));
    let task = h.service.spawn_binding_watch(rx);
    h.call(BOUND_ONE, get(TOKEN_URI)).await;
    assert_eq!(h.service.cache().stats().entries, 1);
    tx.send_replace(Arc::new(BTreeSet::new()));
    for _ in 0..50 {
        if h.service.cache().stats().entries == 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(h.service.cache().stats().entries, 0);
    drop(tx);
    assert!(
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .is_ok(),
        "the watch ends with its sender"
    );
}

#[test]
fn config_defaults_and_validation() {
    let c = Config::default();
    assert_eq!(c.imds_url, "http://169.254.169.254");
    assert!(c.forward_instance_metadata);
    assert_eq!(
        (c.retry.max_attempts, c.retry.total),
        (3, Duration::from_secs(10))
    );
    let resolver = || FakeResolver {
        by_pid: HashMap::new(),
        calls: Arc::new(AtomicUsize::new(0)),
    };
    assert!(Service::new(Config::default(), resolver(), NoSecretStore).is_ok());
    let bad_url = Config {
        imds_url: "https://169.254.169.254".into(),
        ..Config::default()
    };
    assert!(matches!(
        Service::new(bad_url, resolver(), NoSecretStore),
        Err(ConfigError::ImdsUrl(_))
    ));
    let bad_authority = Config {
        authority_host: "http://login.test".into(),
        ..Config::default()
    };
    assert!(matches!(
        Service::new(bad_authority, resolver(), NoSecretStore),
        Err(ConfigError::AuthorityHost(_))
    ));
}

/// Collects `audit` events as field maps.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<BTreeMap<String, String>>>>);

struct Fields(BTreeMap<String, String>);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

thread_local! {
    static CAPTURE: std::cell::RefCell<Option<Captured>> = const { std::cell::RefCell::new(None) };
}

/// Hands `audit` events to the capture of the thread that emits them. It is the process's global subscriber, set
/// once and enabling every callsite: a scoped subscriber (`set_default`) loses events when tests on other threads
/// register callsites first, because tracing caches each callsite's interest process-wide.
struct ToThreadCapture;

impl<S: tracing::Subscriber> Layer<S> for ToThreadCapture {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() != "audit" {
            return;
        }
        CAPTURE.with(|c| {
            if let Some(captured) = c.borrow().as_ref() {
                let mut fields = Fields(BTreeMap::new());
                event.record(&mut fields);
                if let Ok(mut all) = captured.0.lock() {
                    all.push(fields.0);
                }
            }
        });
    }
}

/// Captures this thread's `audit` events until the guard drops.
fn capture_audit() -> (Captured, impl Drop) {
    static GLOBAL: std::sync::Once = std::sync::Once::new();
    GLOBAL.call_once(|| {
        let _ = tracing::subscriber::set_global_default(Registry::default().with(ToThreadCapture));
    });
    struct Release;
    impl Drop for Release {
        fn drop(&mut self) {
            CAPTURE.with(|c| c.borrow_mut().take());
        }
    }
    let captured = Captured::default();
    CAPTURE.with(|c| *c.borrow_mut() = Some(captured.clone()));
    (captured, Release)
}

#[tokio::test]
async fn one_audit_event_per_token_decision() {
    // Current-thread runtime: the service emits its audit events on this thread.
    let (captured, _guard) = capture_audit();
    let h = serving_token_a();
    let probe = Request::get(TOKEN_URI).body(()).expect("request");
    h.call(BOUND_ONE, probe).await;
    let wrong = Request::get(TOKEN_URI)
        .header("Metadata", "True")
        .body(())
        .expect("request");
    h.call(BOUND_ONE, wrong).await;
    h.call(BOUND_ONE, get(TOKEN_URI)).await;
    h.call(BOUND_ONE, get(TOKEN_URI)).await;
    h.call(BOUND_TWO, get(TOKEN_URI)).await;
    h.call(EXCEPTION, get(TOKEN_URI)).await;
    h.call(UNBOUND, get("/metadata/instance")).await; // not a token decision
    let events = captured.0.lock().map(|e| e.clone()).unwrap_or_default();
    let summary: Vec<(&str, &str, &str, &str)> = events
        .iter()
        .map(|e| {
            (
                e["outcome"].as_str(),
                e["cache"].as_str(),
                e["identity"].as_str(),
                e["pod"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("probe", "none", "", ""),
            ("denied", "none", "", ""),
            ("granted", "miss", "client-a", "web-1"),
            ("granted", "hit", "client-a", "web-1"),
            ("denied", "none", "", "web-2"),
            ("forwarded", "none", "", "mic-1"),
        ]
    );
    let granted = &events[2];
    for (field, want) in [
        ("event", "token"),
        ("pid", "1"),
        ("cgroup", "/kubepods.slice/pod-x/cri-containerd-c1.scope"),
        ("namespace", "team-a"),
        ("pod_uid", "uid-web-1"),
        ("container", "app"),
        ("resource", "https://management.azure.com/"),
        ("reason", "bound"),
    ] {
        assert_eq!(
            granted.get(field).map(String::as_str),
            Some(want),
            "{field}"
        );
    }
    assert!(granted.contains_key("latency_ms"));
    assert_eq!(events[0]["reason"], "metadata_header_missing");
    assert_eq!(events[1]["reason"], "metadata_header_invalid");
    assert!(
        events[4]["reason"].contains("pass client_id"),
        "{:?}",
        events[4]
    );
}

/// The real hyper upstream against the in-process IMDS emulator (`nmi_testkit`): tokens, single-flight, retries on
/// faults, pass-through, forwarding, and IMDS going away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_the_imds_emulator() {
    use nmi_testkit::imds_emulator::{
        EmulatedIdentity, Emulator, EmulatorConfig, Fault, jwt_claims,
    };

    let emu = Emulator::start(EmulatorConfig::new(vec![EmulatedIdentity::new(
        "client-a", "a",
    )]))
    .await
    .expect("emulator");
    let by_pid = HashMap::from([
        (
            BOUND_ONE,
            Binding::Bound {
                workload: workload("web-1"),
                identities: vec![identity("a", "client-a")],
            },
        ),
        // Bound here, but the VM (emulator) does not have it.
        (
            BOUND_TWO,
            Binding::Bound {
                workload: workload("web-2"),
                identities: vec![identity("x", "client-x")],
            },
        ),
        (
            EXCEPTION,
            Binding::NodeException {
                workload: workload("mic-1"),
            },
        ),
    ]);
    let resolver = FakeResolver {
        by_pid,
        calls: Arc::new(AtomicUsize::new(0)),
    };
    let mut config = Config {
        imds_url: emu.url(),
        ..Config::default()
    };
    config.retry.attempt_timeout = Duration::from_secs(1);
    let service = Arc::new(Service::new(config, resolver, NoSecretStore).expect("service"));
    let call = |pid: u32, uri: &'static str| {
        let service = Arc::clone(&service);
        async move { body_of(service.handle(&caller(pid), get(uri)).await).await }
    };

    let (status, _, body) = call(
        BOUND_ONE,
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let claims = v["access_token"]
        .as_str()
        .and_then(jwt_claims)
        .expect("jwt");
    assert_eq!(
        (claims["aud"].as_str(), claims["appid"].as_str()),
        (Some("https://vault.azure.net"), Some("client-a"))
    );

    // 500 concurrent requests for a new resource: one upstream call.
    emu.reset_calls();
    let tasks: Vec<_> = (0..500)
        .map(|_| {
            tokio::spawn(call(
                BOUND_ONE,
                "/metadata/identity/oauth2/token?resource=https://storage.azure.com/",
            ))
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.expect("task").0, StatusCode::OK);
    }
    assert_eq!(emu.calls().token, 1);

    // An identity the VM lacks: IMDS's own 400 passes through.
    let (status, _, body) = call(BOUND_TWO, "/metadata/identity/oauth2/token?resource=r").await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::BAD_REQUEST, NOT_FOUND)
    );

    // 429 then a dropped connection then success: retried within the bounds.
    emu.reset_calls();
    emu.push_faults([
        Fault::status(429),
        Fault {
            drop: true,
            ..Fault::default()
        },
    ]);
    assert_eq!(
        call(BOUND_ONE, "/metadata/identity/oauth2/token?resource=r1")
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(emu.calls().token, 3);
    // A slow answer: the 1 s attempt timeout cuts it and the retry succeeds.
    emu.push_faults([Fault::delay(3000)]);
    let started = Instant::now();
    assert_eq!(
        call(BOUND_ONE, "/metadata/identity/oauth2/token?resource=r2")
            .await
            .0,
        StatusCode::OK
    );
    assert!(
        started.elapsed() < Duration::from_millis(2900),
        "{:?}",
        started.elapsed()
    );
    // 410 passes through at once; a persistent 500 after three attempts.
    emu.push_faults([Fault::status(410)]);
    assert_eq!(
        call(BOUND_ONE, "/metadata/identity/oauth2/token?resource=r3")
            .await
            .0,
        StatusCode::GONE
    );
    emu.reset_calls();
    emu.push_faults([Fault::status(500), Fault::status(500), Fault::status(500)]);
    assert_eq!(
        call(BOUND_ONE, "/metadata/identity/oauth2/token?resource=r4")
            .await
            .0,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    assert_eq!(emu.calls().token, 3);

    // Forwarding: instance metadata by its canonical path, and a node exception's token request.
    let (status, _, body) = call(
        UNBOUND,
        "/Metadata//instance\\compute/vmId?api-version=2021-02-01&format=text",
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "00000000-0000-0000-0000-0000000000a1")
    );
    assert_eq!(
        call(
            EXCEPTION,
            "/metadata/identity/oauth2/token?resource=r&client_id=client-a"
        )
        .await
        .0,
        StatusCode::OK
    );
    assert_eq!(emu.calls().other, 0, "nothing unchecked reached IMDS");

    // IMDS gone: 503 with Retry-After, well within the retry budget.
    drop(emu);
    let started = Instant::now();
    let response = service
        .handle(
            &caller(BOUND_ONE),
            get("/metadata/identity/oauth2/token?resource=r9"),
        )
        .await;
    assert!(response.headers().contains_key(header::RETRY_AFTER));
    let (status, _, body) = body_of(response).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// One caller asking for many tokens at once against a slow IMDS waits for its own requests; another caller's request
/// takes one of the places of the global budget the first one cannot have, and is answered in one IMDS round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_flooding_imds_waits_for_itself_and_another_gets_through_at_once() {
    use nmi_testkit::imds_emulator::{EmulatedIdentity, Emulator, EmulatorConfig, Fault};

    const DELAY: Duration = Duration::from_millis(400);
    let emu = Emulator::start(EmulatorConfig::new(vec![
        EmulatedIdentity::new("client-a", "a"),
        EmulatedIdentity::new("client-b", "b"),
    ]))
    .await
    .expect("emulator");
    emu.push_faults((0..64).map(|_| Fault::delay(DELAY.as_millis() as u64)));
    let resolver = FakeResolver {
        by_pid: HashMap::from([
            (
                BOUND_ONE,
                Binding::Bound {
                    workload: workload("hostile"),
                    identities: vec![identity("a", "client-a")],
                },
            ),
            (
                BOUND_TWO,
                Binding::Bound {
                    workload: workload("victim"),
                    identities: vec![identity("b", "client-b")],
                },
            ),
        ]),
        calls: Arc::new(AtomicUsize::new(0)),
    };
    let config = Config {
        imds_url: emu.url(),
        ..Config::default()
    };
    let service = Arc::new(Service::new(config, resolver, NoSecretStore).expect("service"));
    let from = |pid: u32, cgroup_id: u64| Attestation {
        cgroup_id,
        ..caller(pid)
    };

    let hostile: Vec<_> = (0..20)
        .map(|i| {
            let service = Arc::clone(&service);
            tokio::spawn(async move {
                let uri = format!("/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://r{i}.example/");
                body_of(service.handle(&from(BOUND_ONE, 1), get(&uri)).await).await.0
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = std::time::Instant::now();
    let (status, _, body) =
        body_of(service.handle(&from(BOUND_TWO, 2), get(TOKEN_URI)).await).await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        took < DELAY * 2,
        "the victim waited {took:?} behind another caller's flood (one IMDS round trip is {DELAY:?})"
    );
    for h in hostile {
        assert_eq!(
            h.await.expect("task"),
            StatusCode::OK,
            "the flooding caller is slowed, not refused"
        );
    }
}
