//! The startup taint: a brand-new node registers with a taint that only the agent tolerates (AKS:
//! `--node-initialization-taints nmi-agent.io/not-ready=true:NoSchedule`), so no workload lands on it before the
//! kernel programs are attached and the agent serves; the agent then removes the taint from its own node.
//!
//! This covers the first boot, before any guard unit exists on the node (docs/operations.md, "Startup taint"). The
//! patch names the taint it removes with a JSON-patch `test`, so a concurrent change to the node's taints makes it
//! fail and be retried from a fresh read instead of removing the wrong entry. The agent's RBAC allows `get` and
//! `patch` on nodes, and deploy/startup-taint-policy.yaml narrows that to "remove this taint from your own node".

use std::{sync::Arc, time::Duration};

use backon::{ExponentialBuilder, Retryable};
use k8s_openapi::api::core::v1::{Node, Taint};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

use crate::telemetry::readiness::Readiness;

pub use crate::cli::DEFAULT_STARTUP_TAINT as DEFAULT_KEY;

#[derive(Debug, thiserror::Error)]
pub enum TaintError {
    #[error("reading node {node}: {source}")]
    Get {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "the agent's ServiceAccount may not {verb} node {node}: apply deploy/clusterrole.yaml (nodes: get, patch) and \
         deploy/startup-taint-policy.yaml, or remove the taint by hand (kubectl taint nodes {node} {key}-)"
    )]
    Forbidden {
        verb: &'static str,
        node: String,
        key: String,
    },
    #[error("removing taint {key} from node {node}: {source}")]
    Patch {
        node: String,
        key: String,
        #[source]
        source: kube::Error,
    },
    #[error("building the JSON patch: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Removes every taint with `key` (whatever its value and effect) from `node`, in one patch. Returns how many it
/// removed; none is not an error (a node that registered without it, or a restart after the removal).
pub async fn remove(nodes: &Api<Node>, node: &str, key: &str) -> Result<usize, TaintError> {
    let current = nodes.get(node).await.map_err(|source| match source {
        kube::Error::Api(ref s) if s.code == 403 => TaintError::Forbidden {
            verb: "get",
            node: node.to_owned(),
            key: key.to_owned(),
        },
        source => TaintError::Get {
            node: node.to_owned(),
            source,
        },
    })?;
    let taints: &[Taint] = current
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or_default();
    // From the last to the first, so that each removal leaves the indices of the ones still to go unchanged.
    let mut ops = Vec::new();
    for (i, taint) in taints.iter().enumerate().rev() {
        if taint.key == key {
            let path = format!("/spec/taints/{i}");
            ops.push(serde_json::json!({"op": "test", "path": path, "value": taint}));
            ops.push(serde_json::json!({"op": "remove", "path": path}));
        }
    }
    if ops.is_empty() {
        return Ok(0);
    }
    let removed = ops.len() / 2;
    let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))?;
    nodes
        .patch(node, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .map_err(|source| match source {
            kube::Error::Api(ref s) if s.code == 403 => TaintError::Forbidden {
                verb: "patch",
                node: node.to_owned(),
                key: key.to_owned(),
            },
            source => TaintError::Patch {
                node: node.to_owned(),
                key: key.to_owned(),
                source,
            },
        })?;
    Ok(removed)
}

/// Once the agent serves (programs attached, bindings synced), removes the startup taint from its own node, retrying
/// with backoff (a `test` that failed on a concurrent change, an API server away, RBAC being fixed) until it is gone.
pub async fn remove_when_serving(
    client: Client,
    node: String,
    key: String,
    readiness: Arc<Readiness>,
) {
    while !readiness.serving() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let nodes: Api<Node> = Api::all(client);
    let attempt = || remove(&nodes, &node, &key);
    let result = attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(30))
                .without_max_times(),
        )
        .notify(|e, wait| {
            tracing::warn!(error = %e, retry_in = ?wait, node = %node, "cannot remove the startup taint yet");
        })
        .await;
    match result {
        Ok(0) => tracing::debug!(node = %node, taint = %key, "no startup taint on this node"),
        Ok(n) => {
            tracing::info!(node = %node, taint = %key, removed = n, "removed the startup taint: workloads may be scheduled here")
        }
        // `without_max_times` retries until it succeeds.
        Err(e) => tracing::error!(error = %e, node = %node, "gave up removing the startup taint"),
    }
}
