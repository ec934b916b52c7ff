//! This node's pods by UID, from the pod reflector's store, waiting a bounded time for a pod the reflector has not
//! delivered yet, or not with its address (a pod's first IMDS call can race its watch events).

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::{ResourceExt, runtime::reflector::Store};
use tokio::{sync::watch, time::Instant};

/// Static pods run under their config hash, which the API server's mirror pod carries in this annotation.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// The pod store and the signal that it changed.
pub struct Pods {
    pub store: Store<Pod>,
    /// This node's name: a mirror pod is owned by this Node and named `<static pod>-<node>`.
    node: String,
    /// Bumped after every pod event has reached the store; requests waiting for a pod watch it.
    pub events: watch::Sender<u64>,
}

impl Pods {
    pub fn new(store: Store<Pod>, node: impl Into<String>) -> Self {
        Pods {
            store,
            node: node.into(),
            events: watch::channel(0).0,
        }
    }

    /// Called after each pod event has been applied to the store.
    pub fn changed(&self) {
        self.events.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The pod whose UID is `uid`; failing that, the mirror pod of the static pod that runs under `uid` (its config
    /// hash). The exact UID always wins. A mirror annotation counts only on what looks like a kubelet-made mirror pod
    /// of this node (owned by this Node as controller, named `<name>-<node>`), and only if exactly one such pod claims the
    /// hash: anyone who can create a pod can write the annotation and an owner reference, and must not thereby claim
    /// another pod's cgroup; two such claimants are refused rather than guessed between.
    fn lookup(&self, uid: &str) -> Option<Arc<Pod>> {
        // Linear scans: a node runs at most a few hundred pods, and the read lock is held for microseconds.
        if let Some(pod) = self.store.find(|p| {
            p.metadata
                .uid
                .as_deref()
                .is_some_and(|u| u.eq_ignore_ascii_case(uid))
        }) {
            return Some(pod);
        }
        let mut claimants = self.store.state_filter(|p| {
            is_mirror_pod_of(p, &self.node)
                && p.annotations()
                    .get(MIRROR_ANNOTATION)
                    .is_some_and(|m| m.eq_ignore_ascii_case(uid))
        });
        match (claimants.pop(), claimants.is_empty()) {
            (Some(pod), true) => Some(pod),
            (Some(_), false) => {
                tracing::warn!(
                    static_pod = uid,
                    "several pods claim to be this static pod's mirror; none is trusted"
                );
                None
            }
            _ => None,
        }
    }

    /// The pod with this UID once `complete` holds for it (e.g. the kubelet reported its address), waiting up to
    /// `wait` for the events that make it so. At the deadline: the pod as it stands, complete or not.
    pub async fn find_until(
        &self,
        uid: &str,
        wait: Duration,
        complete: impl Fn(&Pod) -> bool,
    ) -> Option<Arc<Pod>> {
        // Subscribe before looking, so that an event landing between the look and the wait is not missed.
        let mut events = self.events.subscribe();
        let mut found = self.lookup(uid);
        let deadline = Instant::now() + wait;
        loop {
            if found.as_deref().is_some_and(&complete) {
                return found;
            }
            match tokio::time::timeout_at(deadline, events.changed()).await {
                Ok(Ok(())) => found = self.lookup(uid),
                // Timed out, or the source is shutting down.
                _ => return found,
            }
        }
    }
}

/// A mirror pod of `node`: the API server's copy of a static pod, which the kubelet creates owned by its Node (as
/// controller) and names `<static pod name>-<node name>`.
fn is_mirror_pod_of(pod: &Pod, node: &str) -> bool {
    let owned = pod.owner_references().iter().any(|o| {
        o.kind == "Node" && o.api_version == "v1" && o.name == node && o.controller == Some(true)
    });
    owned && pod.name_any().ends_with(&format!("-{node}"))
}
