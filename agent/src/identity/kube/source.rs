//! The Kubernetes binding source: reflectors on this node's pods and on the three aad-pod-identity kinds, readiness
//! (every reflector has listed once), the bound-client-id set the token cache follows, and the resolution of a
//! caller's cgroup to a pod, which the [`super::policy`] then binds.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    path::Path,
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::{Pod, PodSpec, PodStatus};
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, reflector, watcher},
};
use tokio::{sync::watch, task::JoinHandle};

use super::{
    address::{self, SourceCheck, Verdict},
    crd::{AzureIdentity, AzureIdentityBinding, AzurePodIdentityException},
    pods::Pods,
    policy::Policy,
    reflect::{crd_stream, run_reflector},
};
use crate::{
    attest::Attestation,
    identity::{
        binding::{Binding, BoundIds, Resolve, Workload, publish_bound},
        podcgroup,
    },
};

/// The longest a request waits for a pod the reflector has not delivered yet. SDKs probe IMDS with 0.3-1 s
/// timeouts; waiting longer would turn "unbound" into "IMDS unavailable" for them.
pub const MAX_POD_WAIT: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct KubeConfig {
    /// This node's name: only pods with `spec.nodeName` equal to it are watched.
    pub node_name: String,
    /// Let a binding match pods in every namespace (aad-pod-identity's default without `--forceNamespaced`).
    /// AzureIdentities annotated `aadpodidentity.k8s.io/Behavior: namespaced` still serve only their namespace.
    pub cluster_wide: bool,
    /// How long a request waits for a pod that is not in the store yet; capped at [`MAX_POD_WAIT`].
    pub pod_wait: Duration,
    /// Whether a connection must come from the attested pod's own address (see [`super::address`]).
    pub source_check: SourceCheck,
    /// This node's addresses (the agent's own): a hostNetwork pod may speak from them before the API server reports
    /// the pod's status.
    pub node_ips: Vec<IpAddr>,
}

impl KubeConfig {
    pub fn new(node_name: impl Into<String>) -> Self {
        KubeConfig {
            node_name: node_name.into(),
            cluster_wide: false,
            pod_wait: MAX_POD_WAIT,
            source_check: SourceCheck::default(),
            node_ips: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "the node name is empty; Kubernetes mode needs it to watch this node's pods (set it from spec.nodeName)"
    )]
    NoNodeName,
    #[error("building the Kubernetes client (in-cluster or kubeconfig): {0}")]
    Client(#[source] kube::Error),
}

/// The Kubernetes binding source. Dropping it stops its reflectors.
pub struct KubeSource {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

struct Inner {
    config: KubeConfig,
    pods: Pods,
    policy: Policy,
    ready: watch::Sender<bool>,
    bound: watch::Sender<BoundIds>,
}

impl fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeSource")
            .field("config", &self.inner.config)
            .field("ready", &self.ready())
            .finish_non_exhaustive()
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Which CRD store changed, for the bound-set task.
#[derive(Clone, Copy, Debug)]
enum Changed {
    Identities,
    Bindings,
}

impl KubeSource {
    /// Builds a client from the in-cluster service account (or `KUBECONFIG`) and starts.
    pub async fn from_env(config: KubeConfig) -> Result<KubeSource, KubeError> {
        let client = Client::try_default().await.map_err(KubeError::Client)?;
        KubeSource::start(client, config)
    }

    /// Starts the reflectors on the current tokio runtime. Returns at once; [`KubeSource::ready`] turns true when
    /// every reflector has finished its initial list.
    pub fn start(client: Client, mut config: KubeConfig) -> Result<KubeSource, KubeError> {
        if config.node_name.trim().is_empty() {
            return Err(KubeError::NoNodeName);
        }
        config.pod_wait = config.pod_wait.min(MAX_POD_WAIT);
        if config.cluster_wide {
            tracing::warn!(
                "cluster-wide matching: an AzureIdentityBinding serves pods of every namespace, so any pod that can set \
                 the label aadpodidbinding=<selector> gets that identity; prefer the namespaced default"
            );
        }

        let (pods, pods_w) = reflector::store::<Pod>();
        let (identities, identities_w) = reflector::store::<AzureIdentity>();
        let (bindings, bindings_w) = reflector::store::<AzureIdentityBinding>();
        let (exceptions, exceptions_w) = reflector::store::<AzurePodIdentityException>();
        let inner = Arc::new(Inner {
            policy: Policy {
                cluster_wide: config.cluster_wide,
                identities,
                bindings,
                exceptions,
            },
            pods: Pods::new(pods, config.node_name.clone()),
            config,
            ready: watch::channel(false).0,
            bound: watch::channel(Arc::new(BTreeSet::new())).0,
        });
        let (changed_tx, changed_rx) = tokio::sync::mpsc::unbounded_channel::<Changed>();
        let notify = |change: Changed| {
            let tx = changed_tx.clone();
            move || {
                let _ = tx.send(change);
            }
        };

        let node_selector = format!("spec.nodeName={}", inner.config.node_name);
        let pod_stream = watcher(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(&node_selector),
        )
        // Metadata, hostNetwork and the addresses are used; dropping the rest keeps the store small.
        .modify(|pod| {
            pod.spec = pod.spec.take().map(|spec| PodSpec {
                host_network: spec.host_network,
                ..PodSpec::default()
            });
            pod.status = pod.status.take().map(|status| PodStatus {
                pod_ip: status.pod_ip,
                pod_ips: status.pod_ips,
                host_ip: status.host_ip,
                host_ips: status.host_ips,
                ..PodStatus::default()
            });
            pod.metadata.managed_fields = None;
        });
        let pods_changed = {
            let inner = Arc::clone(&inner);
            move || inner.pods.changed()
        };
        let mut tasks = vec![
            run_reflector("Pod", pods_w, pod_stream, pods_changed),
            run_reflector(
                "AzureIdentity",
                identities_w,
                crd_stream(Api::<AzureIdentity>::all(client.clone())),
                notify(Changed::Identities),
            ),
            run_reflector(
                "AzureIdentityBinding",
                bindings_w,
                crd_stream(Api::<AzureIdentityBinding>::all(client.clone())),
                notify(Changed::Bindings),
            ),
            run_reflector(
                "AzurePodIdentityException",
                exceptions_w,
                crd_stream(Api::<AzurePodIdentityException>::all(client)),
                || {},
            ),
        ];
        drop(changed_tx);
        tasks.push(tokio::spawn(announce_synced(Arc::clone(&inner))));
        tasks.push(tokio::spawn(track_bound(Arc::clone(&inner), changed_rx)));
        Ok(KubeSource { inner, tasks })
    }

    /// True once every reflector has finished its initial list (later re-lists keep serving the previous state).
    pub fn ready(&self) -> bool {
        *self.inner.ready.borrow()
    }

    /// Waits until [`KubeSource::ready`].
    pub async fn wait_ready(&self) {
        let mut rx = self.inner.ready.subscribe();
        // The sender lives in `inner`, which we hold, so this only ends when ready.
        let _ = rx.wait_for(|r| *r).await;
    }

    /// The set of client ids (lower case) that some AzureIdentityBinding refers to, updated as bindings and
    /// identities change; the token cache drops tokens of identities that leave it.
    pub fn bound_client_ids(&self) -> watch::Receiver<BoundIds> {
        self.inner.bound.subscribe()
    }

    pub fn config(&self) -> &KubeConfig {
        &self.inner.config
    }

    /// Resolves a caller's cgroup (relative to `--cgroup`) to its binding; `source` is the connection's source
    /// address, which must be one of the pod's (see [`super::address`]).
    pub async fn resolve_caller(&self, cgroup: Option<&Path>, source: IpAddr) -> Binding {
        // Right after a start the stores are still filling: "no binding" could be "not listed yet". Wait as long as
        // for a pod, then say "retry" rather than a final "Identity not found".
        if !self.ready() {
            let _ = tokio::time::timeout(self.inner.config.pod_wait, self.wait_ready()).await;
            if !self.ready() {
                return Binding::NotReady {
                    reason: "the Kubernetes caches (pods, AzureIdentity, AzureIdentityBinding, \
                             AzurePodIdentityException) have not synced yet"
                        .to_owned(),
                };
            }
        }
        let Some(cgroup) = cgroup else {
            return Binding::cgroup_gone();
        };
        let Some(pc) = podcgroup::parse(cgroup) else {
            return Binding::Unbound {
                workload: None,
                reason: format!("cgroup {} is not a pod's cgroup", cgroup.display()),
            };
        };
        let mut workload = Workload {
            pod_uid: Some(pc.pod_uid.clone()),
            container: pc.container.map(|c| c.id),
            ..Workload::default()
        };
        let config = &self.inner.config;
        let wait = config.pod_wait;
        // With the check on, also wait (as long) for the kubelet to report the pod's address.
        let complete = |pod: &Pod| {
            config.source_check == SourceCheck::Off
                || address::check(pod, source, &config.node_ips) != Verdict::NoAddressYet
        };
        let Some(pod) = self
            .inner
            .pods
            .find_until(&pc.pod_uid, wait, complete)
            .await
        else {
            return Binding::Unbound {
                workload: Some(workload),
                reason: format!(
                    "pod {} is not among this node's pods (waited {} ms for it)",
                    pc.pod_uid,
                    wait.as_millis()
                ),
            };
        };
        workload.namespace = pod.namespace();
        workload.pod = Some(pod.name_any());
        if config.source_check != SourceCheck::Off {
            let pod_name = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
            match address::check(&pod, source, &config.node_ips) {
                Verdict::Matches => {}
                Verdict::NoAddressYet => {
                    return Binding::NotReady {
                        reason: format!(
                            "the API server has no address for pod {pod_name} yet (waited {} ms); retry",
                            wait.as_millis()
                        ),
                    };
                }
                Verdict::Mismatch { allowed } => {
                    let reason = format!(
                        "source_address_mismatch: the connection comes from {source}, which is not an address of \
                         pod {pod_name} ({allowed:?}); a pod speaking from another's address, or a CNI that \
                         rewrites pod source addresses (then run with --check-source-address=audit)"
                    );
                    if config.source_check == SourceCheck::Enforce {
                        return Binding::Refused { workload, reason };
                    }
                    tracing::warn!(target: "audit", pod = %pod_name, %source, "{reason} (audit only: served)");
                }
            }
        }
        self.inner.policy.bind_pod(&pod, workload)
    }
}

impl Resolve for KubeSource {
    fn resolve(&self, caller: &Attestation) -> impl std::future::Future<Output = Binding> + Send {
        self.resolve_caller(caller.cgroup.as_deref(), IpAddr::V4(*caller.peer.ip()))
    }
}

/// Marks the source ready once every store has been listed.
async fn announce_synced(inner: Arc<Inner>) {
    let policy = &inner.policy;
    let all = tokio::join!(
        inner.pods.store.wait_until_ready(),
        policy.identities.wait_until_ready(),
        policy.bindings.wait_until_ready(),
        policy.exceptions.wait_until_ready(),
    );
    if let (Ok(()), Ok(()), Ok(()), Ok(())) = all {
        tracing::info!(
            pods = inner.pods.store.len(),
            identities = policy.identities.len(),
            bindings = policy.bindings.len(),
            exceptions = policy.exceptions.len(),
            "Kubernetes caches synced"
        );
        inner.ready.send_replace(true);
    }
}

/// Keeps the bound-client-id set current and warns when one identity is bound in several namespaces.
async fn track_bound(
    inner: Arc<Inner>,
    mut changed: tokio::sync::mpsc::UnboundedReceiver<Changed>,
) {
    let mut warned: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    while let Some(first) = changed.recv().await {
        // Coalesce a burst (an initial list delivers every object) into one recomputation.
        let mut last = first;
        while let Ok(c) = changed.try_recv() {
            last = c;
        }
        tracing::trace!(?last, "recomputing bound identities");
        let (ids, spread) = inner.policy.bound_summary();
        publish_bound(&inner.bound, ids);
        for (client_id, namespaces) in &spread {
            if namespaces.len() > 1 && warned.get(client_id) != Some(namespaces) {
                tracing::warn!(
                    client_id = %redact(client_id),
                    namespaces = ?namespaces,
                    "one Azure identity is bound in several namespaces; each of them can get its tokens"
                );
            }
        }
        warned = spread;
    }
}

/// aad-pod-identity's redaction: the first and last 4 characters.
pub(super) fn redact(client_id: &str) -> String {
    match (
        client_id.get(..4),
        client_id.get(client_id.len().saturating_sub(4)..),
    ) {
        (Some(a), Some(b)) if client_id.len() > 8 => format!("{a}##### REDACTED #####{b}"),
        _ => "##### REDACTED #####".to_owned(),
    }
}
