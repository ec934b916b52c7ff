//! `?watch=1`: a newline-delimited stream of change events from a resourceVersion on, with bookmarks, timeouts, and
//! the `410 Expired` that tells a client resuming from a compacted version to re-list.

use std::{collections::HashMap, convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, channel::Sender};
use hyper::{Response, StatusCode, header};
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

use super::{
    Shared,
    query::Filter,
    routes::status,
    store::{Event, Resource},
};
use crate::http::Body;

/// The watch parameters of one request.
struct Params {
    bookmarks: bool,
    timeout: Option<Duration>,
    /// `resourceVersion`; empty or `0` means "the current state, then changes".
    from: String,
}

impl Params {
    fn new(params: &HashMap<String, String>) -> Params {
        Params {
            bookmarks: params
                .get("allowWatchBookmarks")
                .is_some_and(|v| v == "true" || v == "1"),
            timeout: params
                .get("timeoutSeconds")
                .and_then(|t| t.parse::<u64>().ok())
                .map(Duration::from_secs),
            from: params.get("resourceVersion").cloned().unwrap_or_default(),
        }
    }
}

/// Where a new watch starts, decided under the store lock together with its subscriptions, so that every event
/// reaches it exactly once: either in `backlog` or on `live`.
struct Start {
    /// Events before it goes live, as watch events.
    backlog: Vec<Value>,
    /// The resourceVersion it has delivered up to.
    last: u64,
    /// `Some((asked, oldest))`: the version it asked for is older than the history; it only gets a 410.
    expired: Option<(u64, u64)>,
    epoch: u64,
    live: broadcast::Receiver<Arc<Event>>,
    epochs: watch::Receiver<u64>,
    /// (apiVersion, kind) for bookmarks.
    kind: (String, String),
}

/// Answers a watch request: the response streams from a task that ends with the watch.
pub(super) fn open(
    shared: &Arc<Shared>,
    resource: Resource,
    filter: Filter,
    params: &HashMap<String, String>,
) -> Response<Body> {
    let params = Params::new(params);
    let start = match position(shared, &resource, &filter, &params.from) {
        Ok(start) => start,
        Err(bad) => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("invalid resourceVersion {bad:?}"),
            );
        }
    };
    let (tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(64);
    let mut resp = Response::new(body.boxed());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    tokio::spawn(stream(
        Arc::clone(shared),
        resource,
        filter,
        params,
        start,
        tx,
    ));
    resp
}

/// Where a watch from `from` starts; Err when `from` is not a resourceVersion.
fn position(
    shared: &Shared,
    resource: &Resource,
    filter: &Filter,
    from: &str,
) -> Result<Start, String> {
    let store = shared.store();
    let mut backlog = Vec::new();
    let mut expired = None;
    let last = match from {
        // "Any version": start with the current state as ADDED events, as the real server does.
        "" | "0" => {
            for v in store.list(resource, filter) {
                backlog.push(json!({"type": "ADDED", "object": v}));
            }
            store.rv
        }
        rv => match rv.parse::<u64>() {
            Ok(rv) if rv < store.oldest => {
                shared
                    .expired
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                expired = Some((rv, store.oldest));
                rv
            }
            Ok(rv) => {
                for e in &store.history {
                    if e.rv > rv && e.resource == *resource && filter.matches(&e.object) {
                        backlog.push(json!({"type": e.kind, "object": e.object}));
                    }
                }
                rv
            }
            Err(_) => return Err(rv.to_owned()),
        },
    };
    Ok(Start {
        backlog,
        last,
        expired,
        epoch: store.epoch,
        live: shared.events.subscribe(),
        epochs: shared.epoch.subscribe(),
        kind: store.kind(resource),
    })
}

fn line(v: Value) -> Bytes {
    Bytes::from(format!("{v}\n"))
}

/// Sends the watch's events until it times out, its epoch ends, the client goes away or it lags behind.
async fn stream(
    shared: Arc<Shared>,
    resource: Resource,
    filter: Filter,
    params: Params,
    start: Start,
    mut tx: Sender<Bytes, Infallible>,
) {
    let Start {
        backlog,
        mut last,
        expired,
        epoch,
        mut live,
        mut epochs,
        kind: (api_version, kind),
    } = start;
    if let Some((rv, oldest)) = expired {
        let gone = json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": "Expired", "code": 410,
            "message": format!("too old resource version: {rv} ({oldest})"),
        }});
        let _ = tx.send_data(line(gone)).await;
        return;
    }
    for ev in backlog {
        if tx.send_data(line(ev)).await.is_err() {
            return;
        }
    }
    let deadline = async {
        match params.timeout {
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
            _ = tick.tick(), if params.bookmarks => {
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
}
