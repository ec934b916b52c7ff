//! A fake Kubernetes API server for the agent's Kubernetes-mode tests: plain HTTP on 127.0.0.1, random port.
//!
//! It speaks the real list/watch wire format, which is what kube-rs's watcher and reflectors depend on:
//! - list: `GET /api/v1/pods`, `/api/v1/namespaces/{ns}/pods`, `/apis/{group}/{version}[/namespaces/{ns}]/{plural}`
//!   -> `{"apiVersion","kind":"<Kind>List","metadata":{"resourceVersion":"N"},"items":[...]}`;
//! - watch: the same path with `watch=1&resourceVersion=N` streams newline-delimited
//!   `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK","object":{...}}` for every change after N. A resourceVersion older
//!   than the last [`FakeApiServer::compact`] gets one `ERROR` event carrying a `410 Expired` Status, as etcd
//!   compaction makes a real API server do, so the client re-lists;
//! - `allowWatchBookmarks` (a BOOKMARK every [`Options::bookmark_interval`]), `timeoutSeconds`, and minimal
//!   `labelSelector` (`k=v`, `k==v`, `k!=v`, `k`, `!k`) and `fieldSelector` (`path=v`, `path!=v`, e.g.
//!   `spec.nodeName=node-a`) on lists and watches;
//! - get: `/api/v1/namespaces/{ns}/secrets/{name}` (and any other object) -> the object, or a 404 Status.
//!
//! Objects are `serde_json::Value`s; the server fills in `metadata.resourceVersion`, `metadata.uid` (unless given)
//! and `metadata.creationTimestamp`. Every request is recorded ([`FakeApiServer::request_log`]).
//! Connect a kube-rs client with `kube::Client::try_from(kube::Config::new(server.url().parse()?))`.
//!
//! Like the rest of this harness, the test-facing methods panic on misuse (creating an object twice, deleting one
//! that does not exist): a test wants the stack trace, not an error to handle.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{
    net::TcpListener,
    sync::{broadcast, watch},
    task::JoinHandle,
};

type Body = BoxBody<Bytes, Infallible>;

/// Where a resource lives: `/api/v1` or `/apis/<group>/<version>`, and its plural.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Resource {
    prefix: String,
    plural: String,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    resource: Resource,
    namespace: String,
    name: String,
}

#[derive(Debug)]
struct Event {
    rv: u64,
    /// The watch epoch it happened in: a watch of an older epoch (ended by `compact`) must not deliver it.
    epoch: u64,
    kind: &'static str,
    resource: Resource,
    object: Value,
}

/// One request the server saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedRequest {
    pub method: String,
    pub path: String,
    /// Raw query string (still percent-encoded).
    pub query: String,
}

impl LoggedRequest {
    pub fn is_watch(&self) -> bool {
        query_pairs(&self.query)
            .get("watch")
            .is_some_and(|v| v == "1" || v == "true")
    }

    pub fn param(&self, name: &str) -> Option<String> {
        query_pairs(&self.query).get(name).cloned()
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    /// How often an open watch that asked for bookmarks gets one.
    pub bookmark_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            bookmark_interval: Duration::from_secs(1),
        }
    }
}

struct Store {
    rv: u64,
    /// A watch must start at or after this resourceVersion; older ones get 410 Gone.
    oldest: u64,
    /// Bumped by `compact` / `drop_watches`; open watches of an older epoch end.
    epoch: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Arc<Event>>,
    kinds: HashMap<Resource, (String, String)>,
    next_uid: u64,
}

struct Shared {
    store: Mutex<Store>,
    events: broadcast::Sender<Arc<Event>>,
    epoch: watch::Sender<u64>,
    log: Mutex<Vec<LoggedRequest>>,
    expired: std::sync::atomic::AtomicUsize,
    options: Options,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        // A panicking test thread may poison the lock; the data is still consistent (every update is one step).
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The server; stops accepting when dropped, and ends its open watches.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.accept.abort();
        self.drop_watches();
    }
}

impl FakeApiServer {
    pub async fn start() -> FakeApiServer {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake API server");
        let addr = listener.local_addr().expect("fake API server address");
        let mut kinds = HashMap::new();
        for (prefix, plural, api_version, kind) in [
            ("/api/v1", "pods", "v1", "Pod"),
            ("/api/v1", "secrets", "v1", "Secret"),
            (
                "/apis/aadpodidentity.k8s.io/v1",
                "azureidentities",
                "aadpodidentity.k8s.io/v1",
                "AzureIdentity",
            ),
            (
                "/apis/aadpodidentity.k8s.io/v1",
                "azureidentitybindings",
                "aadpodidentity.k8s.io/v1",
                "AzureIdentityBinding",
            ),
            (
                "/apis/aadpodidentity.k8s.io/v1",
                "azurepodidentityexceptions",
                "aadpodidentity.k8s.io/v1",
                "AzurePodIdentityException",
            ),
        ] {
            kinds.insert(
                Resource {
                    prefix: prefix.into(),
                    plural: plural.into(),
                },
                (api_version.to_owned(), kind.to_owned()),
            );
        }
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                // Start well above 0: "0" means "any version" to a real API server.
                rv: 100,
                oldest: 0,
                epoch: 0,
                objects: BTreeMap::new(),
                history: Vec::new(),
                kinds,
                next_uid: 1,
            }),
            events: broadcast::channel(4096).0,
            epoch: watch::channel(0).0,
            log: Mutex::new(Vec::new()),
            expired: std::sync::atomic::AtomicUsize::new(0),
            options,
        });
        let accept_shared = Arc::clone(&shared);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = Arc::clone(&accept_shared);
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let shared = Arc::clone(&shared);
                        async move { Ok::<_, Infallible>(handle(&shared, req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeApiServer {
            shared,
            addr,
            accept,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv
    }

    /// Stores a new object and emits ADDED. Returns it as stored (with resourceVersion and uid).
    pub fn create(&self, object: Value) -> Value {
        self.write(object, "ADDED")
    }

    /// Replaces an existing object and emits MODIFIED.
    pub fn update(&self, object: Value) -> Value {
        self.write(object, "MODIFIED")
    }

    /// Removes an object (identified by apiVersion, kind, namespace and name) and emits DELETED.
    pub fn delete(&self, object: &Value) -> Value {
        let (key, _) = self.key_of(object);
        let mut store = self.shared.store();
        let Some(mut gone) = store.objects.remove(&key) else {
            panic!("fake API server: delete of {key:?}, which does not exist");
        };
        store.rv += 1;
        let rv = store.rv;
        gone["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.emit(&mut store, rv, "DELETED", key.resource, gone.clone());
        gone
    }

    /// The stored object, if any.
    pub fn get(&self, object: &Value) -> Option<Value> {
        let (key, _) = self.key_of(object);
        self.shared.store().objects.get(&key).cloned()
    }

    /// Forgets the change history, as etcd compaction does, and ends every open watch. A client that resumes from
    /// any resourceVersion it has seen gets 410 Gone and must re-list.
    pub fn compact(&self) {
        let mut store = self.shared.store();
        // Move past every version a client may hold (including bookmarks), so that all of them are too old.
        store.rv += 1;
        store.oldest = store.rv;
        store.history.clear();
        store.epoch += 1;
        let epoch = store.epoch;
        drop(store);
        self.shared.epoch.send_replace(epoch);
    }

    /// Ends every open watch (as an API server restart or a load balancer would); clients resume from their last
    /// resourceVersion.
    pub fn drop_watches(&self) {
        let mut store = self.shared.store();
        store.epoch += 1;
        let epoch = store.epoch;
        drop(store);
        self.shared.epoch.send_replace(epoch);
    }

    /// How many watches were refused with 410 Gone.
    pub fn expired_watches(&self) -> usize {
        self.shared
            .expired
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every request so far.
    pub fn request_log(&self) -> Vec<LoggedRequest> {
        self.shared
            .log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn key_of(&self, object: &Value) -> (Key, String) {
        let api_version = object["apiVersion"]
            .as_str()
            .unwrap_or_else(|| panic!("fake API server: object without apiVersion: {object}"));
        let kind = object["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("fake API server: object without kind: {object}"));
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("fake API server: object without metadata.name: {object}"));
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default");
        let prefix = if api_version.contains('/') {
            format!("/apis/{api_version}")
        } else {
            format!("/api/{api_version}")
        };
        let plural = {
            let lower = kind.to_ascii_lowercase();
            if lower.ends_with('y') {
                format!("{}ies", &lower[..lower.len() - 1])
            } else if lower.ends_with('s') {
                format!("{lower}es")
            } else {
                format!("{lower}s")
            }
        };
        (
            Key {
                resource: Resource { prefix, plural },
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            },
            kind.to_owned(),
        )
    }

    fn write(&self, mut object: Value, kind_of_change: &'static str) -> Value {
        let (key, kind) = self.key_of(&object);
        let mut store = self.shared.store();
        let existing = store.objects.get(&key).cloned();
        match (kind_of_change, &existing) {
            ("ADDED", Some(_)) => panic!("fake API server: create of {key:?}, which exists"),
            ("MODIFIED", None) => {
                panic!("fake API server: update of {key:?}, which does not exist")
            }
            _ => {}
        }
        store.rv += 1;
        let rv = store.rv;
        let uid = match existing
            .as_ref()
            .and_then(|e| e["metadata"]["uid"].as_str())
        {
            Some(uid) => uid.to_owned(),
            None => match object["metadata"]["uid"].as_str() {
                Some(uid) => uid.to_owned(),
                None => {
                    store.next_uid += 1;
                    format!("00000000-0000-4000-8000-{:012x}", store.next_uid)
                }
            },
        };
        let meta = &mut object["metadata"];
        meta["namespace"] = json!(key.namespace);
        meta["resourceVersion"] = json!(rv.to_string());
        meta["uid"] = json!(uid);
        if meta["creationTimestamp"].is_null() {
            meta["creationTimestamp"] = existing
                .as_ref()
                .map(|e| e["metadata"]["creationTimestamp"].clone())
                .unwrap_or_else(|| json!("2024-01-01T00:00:00Z"));
        }
        let api_version = object["apiVersion"].as_str().unwrap_or_default().to_owned();
        store
            .kinds
            .entry(key.resource.clone())
            .or_insert((api_version, kind));
        store.objects.insert(key.clone(), object.clone());
        self.emit(&mut store, rv, kind_of_change, key.resource, object.clone());
        object
    }

    fn emit(
        &self,
        store: &mut Store,
        rv: u64,
        kind: &'static str,
        resource: Resource,
        object: Value,
    ) {
        let event = Arc::new(Event {
            rv,
            epoch: store.epoch,
            kind,
            resource,
            object,
        });
        store.history.push(Arc::clone(&event));
        // Sent under the store lock, so a watch that subscribes under the same lock sees each event exactly once:
        // either in the history it copies or on the channel.
        let _ = self.shared.events.send(event);
    }
}

fn full(status: StatusCode, body: Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn status(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    full(
        code,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": message, "reason": reason, "code": code.as_u16()
        }),
    )
}

/// Parsed request path.
struct Target {
    resource: Resource,
    namespace: Option<String>,
    name: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (format!("/api/{v}"), rest),
        ["apis", g, v, rest @ ..] => (format!("/apis/{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        [plural] => (None, *plural, None),
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        _ => return None,
    };
    Some(Target {
        resource: Resource {
            prefix,
            plural: plural.to_owned(),
        },
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
    })
}

fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    shared
        .log
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(LoggedRequest {
            method: req.method().to_string(),
            path: path.clone(),
            query: query.clone(),
        });
    if req.method() != Method::GET {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{} is not served", req.method()),
        );
    }
    let Some(target) = parse_path(&path) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no route for {path}"),
        );
    };
    let params = query_pairs(&query);
    let filter = match Filter::parse(&params, target.namespace.clone()) {
        Ok(f) => f,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", e),
    };

    if let Some(name) = &target.name {
        let key = Key {
            resource: target.resource.clone(),
            namespace: target.namespace.clone().unwrap_or_default(),
            name: name.clone(),
        };
        return match shared.store().objects.get(&key) {
            Some(obj) => full(StatusCode::OK, obj.clone()),
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{} \"{name}\" not found", target.resource.plural),
            ),
        };
    }

    let watching = params.get("watch").is_some_and(|v| v == "1" || v == "true");
    if !watching {
        let store = shared.store();
        let items: Vec<Value> = store
            .objects
            .iter()
            .filter(|(k, v)| k.resource == target.resource && filter.matches(v))
            .map(|(_, v)| v.clone())
            .collect();
        let (api_version, kind) = store
            .kinds
            .get(&target.resource)
            .cloned()
            .unwrap_or_else(|| ("v1".into(), "".into()));
        return full(
            StatusCode::OK,
            json!({
                "apiVersion": api_version,
                "kind": format!("{kind}List"),
                "metadata": {"resourceVersion": store.rv.to_string()},
                "items": items,
            }),
        );
    }
    watch(shared, target.resource, filter, &params)
}

fn watch(
    shared: &Arc<Shared>,
    resource: Resource,
    filter: Filter,
    params: &HashMap<String, String>,
) -> Response<Body> {
    let bookmarks = params
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true" || v == "1");
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let from = params.get("resourceVersion").cloned().unwrap_or_default();

    let (tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(64);
    let mut resp = Response::new(body.boxed());
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );

    let store = shared.store();
    let (api_version, kind) = store
        .kinds
        .get(&resource)
        .cloned()
        .unwrap_or_else(|| ("v1".into(), "".into()));
    let epoch = store.epoch;
    let mut backlog: Vec<Value> = Vec::new();
    let mut expired = None;
    let start = match from.as_str() {
        // "Any version": start with the current state as ADDED events, as the real server does.
        "" | "0" => {
            for (k, v) in &store.objects {
                if k.resource == resource && filter.matches(v) {
                    backlog.push(json!({"type": "ADDED", "object": v}));
                }
            }
            store.rv
        }
        rv => match rv.parse::<u64>() {
            Ok(rv) if rv < store.oldest => {
                shared
                    .expired
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                expired = Some(rv);
                rv
            }
            Ok(rv) => {
                for e in &store.history {
                    if e.rv > rv && e.resource == resource && filter.matches(&e.object) {
                        backlog.push(json!({"type": e.kind, "object": e.object}));
                    }
                }
                rv
            }
            Err(_) => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!("invalid resourceVersion {rv:?}"),
                );
            }
        },
    };
    let oldest = store.oldest;
    let mut live = shared.events.subscribe();
    let mut epochs = shared.epoch.subscribe();
    drop(store);

    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let mut tx = tx;
        let line = |v: Value| Bytes::from(format!("{v}\n"));
        if let Some(rv) = expired {
            let gone = json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "reason": "Expired", "code": 410,
                "message": format!("too old resource version: {rv} ({oldest})"),
            }});
            let _ = tx.send_data(line(gone)).await;
            return;
        }
        let mut last = start;
        for ev in backlog {
            if tx.send_data(line(ev)).await.is_err() {
                return;
            }
        }
        let deadline = async {
            match timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(shared.options.bookmark_interval);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                // The `Ref` that wait_for returns holds a lock; drop it inside the branch future.
                _ = async { drop(epochs.wait_for(|e| *e != epoch).await) } => return,
                ev = live.recv() => match ev {
                    Ok(ev) => {
                        if ev.epoch != epoch {
                            return;
                        }
                        if ev.rv > last && ev.resource == resource && filter.matches(&ev.object) {
                            last = ev.rv;
                            if tx.send_data(line(json!({"type": ev.kind, "object": ev.object}))).await.is_err() {
                                return;
                            }
                        }
                    }
                    // Lagged or closed: end the watch; the client resumes from its last version.
                    Err(_) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    let rv = {
                        let store = shared.store();
                        if store.epoch != epoch {
                            return;
                        }
                        store.rv
                    };
                    let bm = json!({"type": "BOOKMARK", "object": {
                        "apiVersion": api_version, "kind": kind,
                        "metadata": {"resourceVersion": rv.to_string()},
                    }});
                    if tx.send_data(line(bm)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    resp
}

/// `labelSelector` / `fieldSelector` / namespace restriction of one request.
struct Filter {
    namespace: Option<String>,
    labels: Vec<(String, Op, String)>,
    fields: Vec<(String, Op, String)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Exists,
    NotExists,
}

impl Filter {
    fn parse(
        params: &HashMap<String, String>,
        namespace: Option<String>,
    ) -> Result<Filter, String> {
        let parse_terms =
            |s: Option<&String>, allow_exists: bool| -> Result<Vec<(String, Op, String)>, String> {
                let Some(s) = s.filter(|s| !s.is_empty()) else {
                    return Ok(Vec::new());
                };
                s.split(',')
                    .map(|term| {
                        let term = term.trim();
                        if let Some((k, v)) = term.split_once("!=") {
                            Ok((k.trim().to_owned(), Op::Ne, v.trim().to_owned()))
                        } else if let Some((k, v)) =
                            term.split_once("==").or_else(|| term.split_once('='))
                        {
                            Ok((k.trim().to_owned(), Op::Eq, v.trim().to_owned()))
                        } else if allow_exists && term.starts_with('!') {
                            Ok((term[1..].trim().to_owned(), Op::NotExists, String::new()))
                        } else if allow_exists && !term.contains(' ') && !term.contains('(') {
                            Ok((term.to_owned(), Op::Exists, String::new()))
                        } else {
                            Err(format!("unsupported selector term {term:?}"))
                        }
                    })
                    .collect()
            };
        Ok(Filter {
            namespace,
            labels: parse_terms(params.get("labelSelector"), true)?,
            fields: parse_terms(params.get("fieldSelector"), false)?,
        })
    }

    fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && obj["metadata"]["namespace"].as_str() != Some(ns.as_str())
        {
            return false;
        }
        let labels = &obj["metadata"]["labels"];
        let labels_ok = self.labels.iter().all(|(k, op, v)| {
            let have = labels.get(k).and_then(Value::as_str);
            match op {
                Op::Eq => have == Some(v.as_str()),
                Op::Ne => have != Some(v.as_str()),
                Op::Exists => have.is_some(),
                Op::NotExists => have.is_none(),
            }
        });
        let fields_ok = self.fields.iter().all(|(path, op, v)| {
            let mut cur = obj;
            for part in path.split('.') {
                cur = &cur[part];
            }
            let have = match cur {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            match op {
                Op::Ne => have != *v,
                _ => have == *v,
            }
        });
        labels_ok && fields_ok
    }
}

fn query_pairs(query: &str) -> HashMap<String, String> {
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_queries() {
        let q = query_pairs("fieldSelector=spec.nodeName%3Dnode-a&watch=1&labelSelector=a%3Db%2Cc");
        assert_eq!(q["fieldSelector"], "spec.nodeName=node-a");
        assert_eq!(q["labelSelector"], "a=b,c");
        let lenient = query_pairs("a=50%&b=%4&c=%41&d=x+y");
        assert_eq!(lenient["a"], "50%");
        assert_eq!(lenient["b"], "%4");
        assert_eq!(lenient["c"], "A");
        assert_eq!(lenient["d"], "x y");
    }

    /// One HTTP/1.1 GET with `Connection: close`; returns status line + headers + (chunked) body as text.
    async fn get(server: &FakeApiServer, path_and_query: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(server.addr())
            .await
            .expect("connect");
        let req = format!("GET {path_and_query} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        String::from_utf8_lossy(&out).into_owned()
    }

    fn pod(name: &str, node: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "ns"},
               "spec": {"nodeName": node}})
    }

    #[tokio::test]
    async fn wire_format() {
        let server = Arc::new(
            FakeApiServer::start_with(Options {
                bookmark_interval: Duration::from_millis(200),
            })
            .await,
        );
        let a = server.create(pod("a", "n1"));
        server.create(pod("b", "n2"));
        assert!(a["metadata"]["uid"].is_string() && a["metadata"]["resourceVersion"].is_string());

        let list = get(
            &server,
            "/api/v1/pods?fieldSelector=spec.nodeName%3Dn1&limit=500",
        )
        .await;
        assert!(list.starts_with("HTTP/1.1 200"), "{list}");
        assert!(
            list.contains(r#""kind":"PodList""#) && list.contains(r#""name":"a""#),
            "{list}"
        );
        assert!(!list.contains(r#""name":"b""#), "{list}");
        let rv = server.resource_version();
        assert!(
            list.contains(&format!(r#""resourceVersion":"{rv}""#)),
            "{list}"
        );

        // A watch from that version sees later changes and bookmarks, and ends at timeoutSeconds.
        let writer = Arc::clone(&server);
        let later = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            writer.create(pod("c", "n1"));
            writer.create(pod("d", "n2"));
        });
        let started = std::time::Instant::now();
        let watch = get(
            &server,
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
            watch.contains(r#""type":"ADDED""#) && watch.contains(r#""name":"c""#),
            "{watch}"
        );
        assert!(
            !watch.contains(r#""name":"d""#),
            "field selector on watch: {watch}"
        );
        assert!(watch.contains(r#""type":"BOOKMARK""#), "{watch}");
        later.await.expect("writer task");

        // After compaction an old version is Gone.
        server.compact();
        let gone = get(
            &server,
            &format!("/api/v1/pods?watch=1&resourceVersion={rv}"),
        )
        .await;
        assert!(
            gone.contains(r#""type":"ERROR""#) && gone.contains(r#""code":410"#),
            "{gone}"
        );
        assert!(gone.contains(r#""reason":"Expired""#), "{gone}");
        assert_eq!(server.expired_watches(), 1);

        // Single objects, e.g. Secrets.
        server.create(json!({"apiVersion": "v1", "kind": "Secret",
                             "metadata": {"name": "s", "namespace": "ns"}, "data": {"k": "dg=="}}));
        let secret = get(&server, "/api/v1/namespaces/ns/secrets/s").await;
        assert!(
            secret.starts_with("HTTP/1.1 200") && secret.contains(r#""k":"dg==""#),
            "{secret}"
        );
        let missing = get(&server, "/api/v1/namespaces/ns/secrets/nope").await;
        assert!(
            missing.starts_with("HTTP/1.1 404") && missing.contains(r#""reason":"NotFound""#),
            "{missing}"
        );
        assert!(server.request_log().iter().filter(|r| r.is_watch()).count() == 2);
    }

    #[test]
    fn filters() {
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
}
