//! Driving kube-rs watchers into reflector stores: one task per kind, with kube's default backoff.

use std::fmt;

use futures_util::StreamExt;
use kube::{
    Api, Resource,
    runtime::{WatchStreamExt, reflector::store::Writer, watcher},
};
use tokio::task::JoinHandle;

/// Every object of a custom resource kind, in all namespaces, without `managedFields` (never read, and often the
/// largest part of an object).
pub fn crd_stream<K>(
    api: Api<K>,
) -> impl futures_util::Stream<Item = watcher::Result<watcher::Event<K>>> + Send
where
    K: Resource + Clone + fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    watcher(api, watcher::Config::default()).modify(|o| o.meta_mut().managed_fields = None)
}

/// Drives one reflector: the watcher (with kube's default backoff, which re-lists after a 410 Gone) writes into the
/// store, and `on_event` runs after each event has been applied.
pub fn run_reflector<K, S>(
    kind: &'static str,
    writer: Writer<K>,
    stream: S,
    on_event: impl Fn() + Send + 'static,
) -> JoinHandle<()>
where
    K: Resource + Clone + fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
    S: futures_util::Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
{
    tokio::spawn(async move {
        let stream = stream.default_backoff().reflect(writer);
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    if matches!(event, watcher::Event::InitDone) {
                        tracing::debug!(kind, "list complete");
                    }
                    on_event();
                }
                // 410 Gone is the normal way a watch expires: the watcher re-lists by itself.
                Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                    tracing::info!(kind, message = %status.message, "watch expired (410 Gone); re-listing");
                }
                Err(e) => tracing::warn!(kind, error = %e, "watch failed; retrying with backoff"),
            }
        }
    })
}
