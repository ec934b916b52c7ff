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
//! - get: `/api/v1/namespaces/{ns}/secrets/{name}`, `/api/v1/nodes/{name}` (and any other object) -> the object, or a
//!   404 Status;
//! - patch: a JSON patch (`application/json-patch+json`) of one object; a failed `test` op is a 422.
//!
//! Objects are `serde_json::Value`s; the server fills in `metadata.resourceVersion`, `metadata.uid` (unless given)
//! and `metadata.creationTimestamp`. Every request is recorded ([`FakeApiServer::request_log`]).
//! Connect a kube-rs client with `kube::Client::try_from(kube::Config::new(server.url().parse()?))`.
//!
//! Like the rest of the test support, the test-facing methods panic on misuse (creating an object twice, deleting one
//! that does not exist): a test wants the stack trace, not an error to handle.

mod query;
mod routes;
mod store;
mod watch;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde_json::Value;
use tokio::{
    sync::{broadcast, watch as epoch_watch},
    task::JoinHandle,
};

use crate::http;
use store::{Event, Store};

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
        query::is_watch(&query::query_pairs(&self.query))
    }

    pub fn param(&self, name: &str) -> Option<String> {
        query::query_pairs(&self.query).get(name).cloned()
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    /// How often an open watch that asked for bookmarks gets one.
    pub bookmark_interval: Duration,
    /// Answer every write (PATCH) with 403, as an API server does for a ServiceAccount without the RBAC for it.
    pub forbid_writes: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            bookmark_interval: Duration::from_secs(1),
            forbid_writes: false,
        }
    }
}

/// What the request handlers and the test-facing methods share.
struct Shared {
    store: Mutex<Store>,
    events: broadcast::Sender<Arc<Event>>,
    /// The current watch epoch; open watches of an older one end.
    epoch: epoch_watch::Sender<u64>,
    log: Mutex<Vec<LoggedRequest>>,
    expired: AtomicUsize,
    options: Options,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        // A panicking test thread may poison the lock; the data is still consistent (every update is one step).
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The server; stops accepting when dropped, and ends its open connections and watches.
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
        let listener =
            http::listen(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind fake API server");
        let addr = listener.local_addr().expect("fake API server address");
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new()),
            events: broadcast::channel(4096).0,
            epoch: epoch_watch::channel(0).0,
            log: Mutex::new(Vec::new()),
            expired: AtomicUsize::new(0),
            options,
        });
        let serving = Arc::clone(&shared);
        let accept = http::serve("fake API server", listener, move |req| {
            let shared = Arc::clone(&serving);
            async move { Ok::<_, Infallible>(routes::handle(&shared, req).await) }
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
        self.change(|store| store.write(object, "ADDED"))
    }

    /// Replaces an existing object and emits MODIFIED.
    pub fn update(&self, object: Value) -> Value {
        self.change(|store| store.write(object, "MODIFIED"))
    }

    /// Removes an object (identified by apiVersion, kind, namespace and name) and emits DELETED.
    pub fn delete(&self, object: &Value) -> Value {
        self.change(|store| store.delete(object))
    }

    /// The stored object, if any.
    pub fn get(&self, object: &Value) -> Option<Value> {
        self.shared.store().get(object)
    }

    /// Forgets the change history, as etcd compaction does, and ends every open watch. A client that resumes from
    /// any resourceVersion it has seen gets 410 Gone and must re-list.
    pub fn compact(&self) {
        let epoch = self.shared.store().compact();
        self.shared.epoch.send_replace(epoch);
    }

    /// Ends every open watch (as an API server restart or a load balancer would); clients resume from their last
    /// resourceVersion.
    pub fn drop_watches(&self) {
        let epoch = self.shared.store().end_watches();
        self.shared.epoch.send_replace(epoch);
    }

    /// How many watches were refused with 410 Gone.
    pub fn expired_watches(&self) -> usize {
        self.shared.expired.load(Ordering::Relaxed)
    }

    /// Every request so far.
    pub fn request_log(&self) -> Vec<LoggedRequest> {
        self.shared
            .log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Applies one change to the store and publishes its event; returns the object as the event carries it.
    fn change(&self, apply: impl FnOnce(&mut Store) -> Arc<Event>) -> Value {
        let mut store = self.shared.store();
        let event = apply(&mut store);
        // Sent under the store lock, so a watch that subscribes under the same lock sees each event exactly once:
        // either in the history it copies or on the channel.
        let _ = self.shared.events.send(Arc::clone(&event));
        drop(store);
        event.object.clone()
    }
}

#[cfg(test)]
mod tests;
