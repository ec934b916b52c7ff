//! Kubernetes mode: reflectors on this node's pods and on aad-pod-identity's CRDs, and the matching policy.
//!
//! cgroup path -> pod UID ([`podcgroup`]) -> pod (reflector store; a pod not seen yet is waited for, at most
//! [`MAX_POD_WAIT`]) -> AzurePodIdentityException in the pod's namespace with a matching label: node exception;
//! otherwise AzureIdentityBindings whose `selector` equals the pod's `aadpodidbinding` label -> the AzureIdentity
//! each names, in the binding's namespace.
//!
//! Matching is namespaced by default: a binding serves only pods of its own namespace, so a pod cannot pick up
//! another team's identity by setting a label (aad-pod-identity's "label self-assignment" hole outside
//! `--forceNamespaced`). [`KubeConfig::cluster_wide`] restores NMI's default for clusters that depend on it.

pub mod crd;
pub mod secrets;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::Path,
    sync::Arc,
    time::Duration,
};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{
        WatchStreamExt,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use tokio::{sync::watch, task::JoinHandle, time::Instant};

pub use crd::{AzureIdentity, AzureIdentityBinding, AzurePodIdentityException};
pub use secrets::{KubeSecrets, SecretError};

use super::{Binding, Identity, IdentityKind, Resolve, SecretRef, Workload, podcgroup};
use crate::attest::Attestation;

/// The longest a request waits for a pod the reflector has not delivered yet. SDKs probe IMDS with 0.3-1 s
/// timeouts; waiting longer would turn "unbound" into "IMDS unavailable" for them.
pub const MAX_POD_WAIT: Duration = Duration::from_secs(1);

/// The Secret key read for a service principal's client secret. NMI used the first value in the Secret whatever
/// its key (Go map order, so in practice Secrets with one key); see [`KubeSecrets`] for how this is honoured.
pub const CLIENT_SECRET_KEY: &str = "clientSecret";

const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

#[derive(Clone, Debug)]
pub struct KubeConfig {
    /// This node's name: only pods with `spec.nodeName` equal to it are watched.
    pub node_name: String,
    /// Let a binding match pods in every namespace (aad-pod-identity's default without `--forceNamespaced`).
    /// AzureIdentities annotated `aadpodidentity.k8s.io/Behavior: namespaced` still serve only their namespace.
    pub cluster_wide: bool,
    /// How long a request waits for a pod that is not in the store yet; capped at [`MAX_POD_WAIT`].
    pub pod_wait: Duration,
}

impl KubeConfig {
    pub fn new(node_name: impl Into<String>) -> Self {
        KubeConfig {
            node_name: node_name.into(),
            cluster_wide: false,
            pod_wait: MAX_POD_WAIT,
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
    pods: Store<Pod>,
    identities: Store<AzureIdentity>,
    bindings: Store<AzureIdentityBinding>,
    exceptions: Store<AzurePodIdentityException>,
    /// Bumped after every pod event has reached the store; requests waiting for a pod watch it.
    pod_events: watch::Sender<u64>,
    ready: watch::Sender<bool>,
    bound: watch::Sender<Arc<BTreeSet<String>>>,
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
            config,
            pods,
            identities,
            bindings,
            exceptions,
            pod_events: watch::channel(0).0,
            ready: watch::channel(false).0,
            bound: watch::channel(Arc::new(BTreeSet::new())).0,
        });
        let (changed_tx, changed_rx) = tokio::sync::mpsc::unbounded_channel::<Changed>();

        let mut tasks = Vec::new();
        let node_selector = format!("spec.nodeName={}", inner.config.node_name);
        let pod_stream = watcher(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(&node_selector),
        )
        // Only metadata is used; dropping spec, status and managedFields keeps the store small.
        .modify(|pod| {
            pod.spec = None;
            pod.status = None;
            pod.metadata.managed_fields = None;
        });
        {
            let inner2 = Arc::clone(&inner);
            tasks.push(run_reflector("Pod", pods_w, pod_stream, move |_| {
                inner2.pod_events.send_modify(|n| *n = n.wrapping_add(1));
            }));
        }
        {
            let tx = changed_tx.clone();
            tasks.push(run_reflector(
                "AzureIdentity",
                identities_w,
                crd_stream(Api::<AzureIdentity>::all(client.clone()))
                    .modify(|o| o.metadata.managed_fields = None),
                move |_| {
                    let _ = tx.send(Changed::Identities);
                },
            ));
        }
        {
            let tx = changed_tx;
            tasks.push(run_reflector(
                "AzureIdentityBinding",
                bindings_w,
                crd_stream(Api::<AzureIdentityBinding>::all(client.clone()))
                    .modify(|o| o.metadata.managed_fields = None),
                move |_| {
                    let _ = tx.send(Changed::Bindings);
                },
            ));
        }
        tasks.push(run_reflector(
            "AzurePodIdentityException",
            exceptions_w,
            crd_stream(Api::<AzurePodIdentityException>::all(client))
                .modify(|o| o.metadata.managed_fields = None),
            |_| {},
        ));

        {
            let inner = Arc::clone(&inner);
            tasks.push(tokio::spawn(async move {
                let all = tokio::join!(
                    inner.pods.wait_until_ready(),
                    inner.identities.wait_until_ready(),
                    inner.bindings.wait_until_ready(),
                    inner.exceptions.wait_until_ready(),
                );
                if let (Ok(()), Ok(()), Ok(()), Ok(())) = all {
                    tracing::info!(
                        pods = inner.pods.len(),
                        identities = inner.identities.len(),
                        bindings = inner.bindings.len(),
                        exceptions = inner.exceptions.len(),
                        "Kubernetes caches synced"
                    );
                    inner.ready.send_replace(true);
                }
            }));
        }
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
    pub fn bound_client_ids(&self) -> watch::Receiver<Arc<BTreeSet<String>>> {
        self.inner.bound.subscribe()
    }

    pub fn config(&self) -> &KubeConfig {
        &self.inner.config
    }

    /// Resolves a caller's cgroup (relative to `--cgroup`) to its binding.
    pub async fn resolve_cgroup(&self, cgroup: Option<&Path>) -> Binding {
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
            return Binding::Unbound {
                workload: None,
                reason: "the caller's cgroup no longer exists".to_owned(),
            };
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
        let Some(pod) = self.inner.find_pod(&pc.pod_uid).await else {
            return Binding::Unbound {
                workload: Some(workload),
                reason: format!(
                    "pod {} is not among this node's pods (waited {} ms for it)",
                    pc.pod_uid,
                    self.inner.config.pod_wait.as_millis()
                ),
            };
        };
        workload.namespace = pod.namespace();
        workload.pod = Some(pod.name_any());
        self.inner.bind_pod(&pod, workload)
    }
}

impl Resolve for KubeSource {
    fn resolve(&self, caller: &Attestation) -> impl std::future::Future<Output = Binding> + Send {
        self.resolve_cgroup(caller.cgroup.as_deref())
    }
}

fn crd_stream<K>(
    api: Api<K>,
) -> impl futures_util::Stream<Item = watcher::Result<watcher::Event<K>>> + Send
where
    K: Resource + Clone + fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    watcher(api, watcher::Config::default())
}

/// Drives one reflector: the watcher (with kube's default backoff, which re-lists after a 410 Gone) writes into the
/// store, and `on_event` runs after each event has been applied.
fn run_reflector<K, S>(
    kind: &'static str,
    writer: reflector::store::Writer<K>,
    stream: S,
    on_event: impl Fn(&watcher::Event<K>) + Send + 'static,
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
                    on_event(&event);
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
        let (ids, spread) = inner.bound_summary();
        inner.bound.send_if_modified(|cur| {
            let modified = **cur != ids;
            if modified {
                *cur = Arc::new(ids);
            }
            modified
        });
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
fn redact(client_id: &str) -> String {
    match (
        client_id.get(..4),
        client_id.get(client_id.len().saturating_sub(4)..),
    ) {
        (Some(a), Some(b)) if client_id.len() > 8 => format!("{a}##### REDACTED #####{b}"),
        _ => "##### REDACTED #####".to_owned(),
    }
}

impl Inner {
    fn lookup_pod(&self, uid: &str) -> Option<Arc<Pod>> {
        // A linear scan: a node runs at most a few hundred pods, and the read lock is held for microseconds.
        // Static pods run under their config hash, which the API's mirror pod carries as an annotation.
        self.pods.find(|p| {
            p.metadata
                .uid
                .as_deref()
                .is_some_and(|u| u.eq_ignore_ascii_case(uid))
                || p.annotations()
                    .get(MIRROR_ANNOTATION)
                    .is_some_and(|m| m.eq_ignore_ascii_case(uid))
        })
    }

    /// The pod with this UID, waiting up to `pod_wait` for the reflector to deliver it.
    async fn find_pod(&self, uid: &str) -> Option<Arc<Pod>> {
        // Subscribe before looking, so that an event landing between the look and the wait is not missed.
        let mut events = self.pod_events.subscribe();
        if let Some(p) = self.lookup_pod(uid) {
            return Some(p);
        }
        let deadline = Instant::now() + self.config.pod_wait;
        loop {
            match tokio::time::timeout_at(deadline, events.changed()).await {
                Ok(Ok(())) => {
                    if let Some(p) = self.lookup_pod(uid) {
                        return Some(p);
                    }
                }
                // Timed out, or the source is shutting down.
                _ => return None,
            }
        }
    }

    fn bind_pod(&self, pod: &Pod, workload: Workload) -> Binding {
        let ns = pod.namespace().unwrap_or_default();
        let pod_name = format!("{ns}/{}", pod.name_any());
        let labels = pod.labels();

        let exception = self.exceptions.find(|e| {
            e.namespace().as_deref() == Some(ns.as_str())
                && e.spec
                    .pod_labels
                    .as_ref()
                    .is_some_and(|want| want.iter().any(|(k, v)| labels.get(k) == Some(v)))
        });
        if let Some(e) = exception {
            tracing::debug!(pod = %pod_name, exception = %e.name_any(), "pod matches an AzurePodIdentityException");
            return Binding::NodeException { workload };
        }

        let Some(selector) = labels.get(crd::BINDING_LABEL).filter(|s| !s.is_empty()) else {
            return Binding::Unbound {
                workload: Some(workload),
                reason: format!("pod {pod_name} has no {} label", crd::BINDING_LABEL),
            };
        };
        let cluster_wide = self.config.cluster_wide;
        let mut matched: Vec<Arc<AzureIdentityBinding>> = self.bindings.state_filter(|b| {
            (cluster_wide || b.namespace().as_deref() == Some(ns.as_str()))
                && b.spec.selector.as_deref() == Some(selector.as_str())
        });
        // Store order is a hash order; sort so that logs and identity order are stable.
        matched.sort_by_key(|b| (b.namespace(), b.name_any()));
        if matched.is_empty() {
            return Binding::Unbound {
                workload: Some(workload),
                reason: format!(
                    "no AzureIdentityBinding {} has selector {selector:?} (pod {pod_name})",
                    if cluster_wide {
                        "in any namespace".to_owned()
                    } else {
                        format!("in namespace {ns}")
                    }
                ),
            };
        }

        let mut identities: Vec<Arc<Identity>> = Vec::new();
        let mut problems: Vec<String> = Vec::new();
        for b in &matched {
            let b_ns = b.namespace().unwrap_or_default();
            let Some(id_name) = b.spec.azure_identity.as_deref().filter(|n| !n.is_empty()) else {
                problems.push(format!(
                    "AzureIdentityBinding {b_ns}/{} names no azureIdentity",
                    b.name_any()
                ));
                continue;
            };
            let Some(az) = self.identities.get(&ObjectRef::new(id_name).within(&b_ns)) else {
                problems.push(format!(
                    "AzureIdentityBinding {b_ns}/{} names AzureIdentity {b_ns}/{id_name}, which does not exist",
                    b.name_any()
                ));
                continue;
            };
            if az
                .annotations()
                .get(crd::BEHAVIOR_ANNOTATION)
                .map(String::as_str)
                == Some(crd::BEHAVIOR_NAMESPACED)
                && b_ns != ns
            {
                problems.push(format!("AzureIdentity {b_ns}/{id_name} is namespaced and pod {pod_name} is not in {b_ns}"));
                continue;
            }
            match to_identity(&az, cluster_wide) {
                Ok(id) => {
                    if !identities
                        .iter()
                        .any(|have| have.name == id.name && have.namespace == id.namespace)
                    {
                        identities.push(Arc::new(id));
                    }
                }
                Err(p) => problems.push(p),
            }
        }
        if identities.is_empty() {
            return Binding::Unbound {
                workload: Some(workload),
                reason: problems.join("; "),
            };
        }
        for p in &problems {
            tracing::warn!(pod = %pod_name, "{p}");
        }
        Binding::Bound {
            workload,
            identities,
        }
    }

    /// Client ids referenced by some binding, and for each the namespaces of the bindings that reference it.
    fn bound_summary(&self) -> (BTreeSet<String>, BTreeMap<String, BTreeSet<String>>) {
        let mut ids = BTreeSet::new();
        let mut spread: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for b in self.bindings.state() {
            let b_ns = b.namespace().unwrap_or_default();
            let Some(name) = b.spec.azure_identity.as_deref() else {
                continue;
            };
            let Some(az) = self.identities.get(&ObjectRef::new(name).within(&b_ns)) else {
                continue;
            };
            let Some(client_id) = az.spec.client_id.as_deref().filter(|c| !c.is_empty()) else {
                continue;
            };
            let client_id = client_id.to_ascii_lowercase();
            spread.entry(client_id.clone()).or_default().insert(b_ns);
            ids.insert(client_id);
        }
        (ids, spread)
    }
}

/// AzureIdentity -> [`Identity`]. `cluster_wide` allows a service principal's Secret to live in another namespace;
/// namespaced, it must be the identity's own, or whoever may create an AzureIdentity in one namespace could spend
/// another namespace's client secret.
fn to_identity(az: &AzureIdentity, cluster_wide: bool) -> Result<Identity, String> {
    let ns = az.namespace().unwrap_or_default();
    let name = az.name_any();
    let client_id = az
        .spec
        .client_id
        .clone()
        .filter(|c| !c.trim().is_empty())
        .ok_or_else(|| format!("AzureIdentity {ns}/{name} has no clientID"))?;
    let kind = match az.spec.type_.unwrap_or(crd::TYPE_USER_ASSIGNED_MSI) {
        crd::TYPE_USER_ASSIGNED_MSI => IdentityKind::UserAssigned,
        crd::TYPE_SERVICE_PRINCIPAL => {
            let tenant_id = az
                .spec
                .tenant_id
                .clone()
                .filter(|t| !t.trim().is_empty())
                .ok_or_else(|| {
                    format!("AzureIdentity {ns}/{name} is a service principal without tenantID")
                })?;
            let pw = az.spec.client_password.clone().unwrap_or_default();
            let secret_name = pw.name.filter(|n| !n.is_empty()).ok_or_else(|| {
                format!(
                    "AzureIdentity {ns}/{name} is a service principal without clientPassword.name"
                )
            })?;
            let secret_ns = pw
                .namespace
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| ns.clone());
            if !cluster_wide && secret_ns != ns {
                return Err(format!(
                    "AzureIdentity {ns}/{name} refers to a Secret in namespace {secret_ns}; namespaced mode allows only {ns}"
                ));
            }
            IdentityKind::ServicePrincipal {
                tenant_id,
                secret: SecretRef {
                    namespace: secret_ns,
                    name: secret_name,
                    key: CLIENT_SECRET_KEY.to_owned(),
                },
            }
        }
        crd::TYPE_SERVICE_PRINCIPAL_CERTIFICATE => {
            return Err(format!(
                "AzureIdentity {ns}/{name} has type 2 (service principal certificate), which nmi-agent does not support"
            ));
        }
        other => {
            return Err(format!(
                "AzureIdentity {ns}/{name} has unknown type {other}"
            ));
        }
    };
    Ok(Identity {
        name,
        namespace: Some(ns),
        client_id,
        resource_id: az.spec.resource_id.clone().filter(|r| !r.is_empty()),
        object_id: None,
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::SecretReference;

    fn az(ns: &str, name: &str, spec: crd::AzureIdentitySpec) -> AzureIdentity {
        let mut a = AzureIdentity::new(name, spec);
        a.metadata.namespace = Some(ns.into());
        a
    }

    #[test]
    fn identity_types() {
        let mi = az(
            "a",
            "mi",
            crd::AzureIdentitySpec {
                type_: Some(0),
                client_id: Some("C".into()),
                resource_id: Some("/subscriptions/x".into()),
                ..Default::default()
            },
        );
        let got = to_identity(&mi, false).expect("mi");
        assert_eq!(got.kind, IdentityKind::UserAssigned);
        assert_eq!(got.namespace.as_deref(), Some("a"));
        assert_eq!(got.resource_id.as_deref(), Some("/subscriptions/x"));

        let sp = |secret_ns: Option<&str>| {
            az(
                "a",
                "sp",
                crd::AzureIdentitySpec {
                    type_: Some(1),
                    client_id: Some("C".into()),
                    tenant_id: Some("T".into()),
                    client_password: Some(SecretReference {
                        name: Some("s".into()),
                        namespace: secret_ns.map(Into::into),
                    }),
                    ..Default::default()
                },
            )
        };
        let want = IdentityKind::ServicePrincipal {
            tenant_id: "T".into(),
            secret: SecretRef {
                namespace: "a".into(),
                name: "s".into(),
                key: CLIENT_SECRET_KEY.into(),
            },
        };
        assert_eq!(
            to_identity(&sp(None), false).map(|i| i.kind),
            Ok(want.clone())
        );
        assert_eq!(to_identity(&sp(Some("a")), false).map(|i| i.kind), Ok(want));
        assert!(
            to_identity(&sp(Some("b")), false).is_err(),
            "cross-namespace secret refused when namespaced"
        );
        assert!(to_identity(&sp(Some("b")), true).is_ok());

        let cert = az(
            "a",
            "cert",
            crd::AzureIdentitySpec {
                type_: Some(2),
                client_id: Some("C".into()),
                ..Default::default()
            },
        );
        assert!(to_identity(&cert, false).is_err_and(|e| e.contains("type 2")));
        let no_client = az("a", "x", crd::AzureIdentitySpec::default());
        assert!(to_identity(&no_client, false).is_err_and(|e| e.contains("no clientID")));
    }

    fn apply<K>(objs: Vec<K>) -> Store<K>
    where
        K: Resource + Clone + 'static,
        K::DynamicType: Eq + std::hash::Hash + Clone + Default,
    {
        let (store, mut writer) = reflector::store::<K>();
        for o in objs {
            writer.apply_watcher_event(&watcher::Event::Apply(o));
        }
        // Dropping the writer leaves the store's contents readable (it only fails `wait_until_ready`).
        store
    }

    fn meta<K: Resource>(mut k: K, ns: &str, labels: &[(&str, &str)]) -> K {
        k.meta_mut().namespace = Some(ns.into());
        k.meta_mut().labels = Some(
            labels
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        );
        k
    }

    fn inner(cluster_wide: bool, pods: Vec<Pod>) -> Inner {
        let mi = |ns: &str, name: &str, client: &str| {
            meta(
                AzureIdentity::new(
                    name,
                    crd::AzureIdentitySpec {
                        client_id: Some(client.into()),
                        ..Default::default()
                    },
                ),
                ns,
                &[],
            )
        };
        let bind = |ns: &str, name: &str, id: &str, sel: &str| {
            meta(
                AzureIdentityBinding::new(
                    name,
                    crd::AzureIdentityBindingSpec {
                        azure_identity: Some(id.into()),
                        selector: Some(sel.into()),
                        weight: None,
                    },
                ),
                ns,
                &[],
            )
        };
        Inner {
            config: KubeConfig {
                cluster_wide,
                ..KubeConfig::new("n")
            },
            pods: apply(pods),
            identities: apply(vec![
                mi("a", "id1", "AAAA"),
                mi("b", "id1", "aaaa"),
                mi("b", "id2", "bbbb"),
            ]),
            bindings: apply(vec![
                bind("a", "b1", "id1", "web"),
                bind("b", "b2", "id1", "web"),
                bind("b", "b3", "id2", "web"),
                bind("b", "dangling", "missing", "other"),
            ]),
            exceptions: apply(Vec::<AzurePodIdentityException>::new()),
            pod_events: watch::channel(0).0,
            ready: watch::channel(false).0,
            bound: watch::channel(Arc::new(BTreeSet::new())).0,
        }
    }

    #[test]
    fn bound_summary_spots_identities_bound_in_several_namespaces() {
        let (ids, spread) = inner(false, Vec::new()).bound_summary();
        assert_eq!(ids, BTreeSet::from(["aaaa".to_owned(), "bbbb".to_owned()]));
        assert_eq!(
            spread["aaaa"],
            BTreeSet::from(["a".to_owned(), "b".to_owned()])
        );
        assert_eq!(spread["bbbb"].len(), 1);
    }

    #[test]
    fn pod_policy() {
        let pod = |ns: &str, labels: &[(&str, &str)]| {
            let mut p = meta(Pod::default(), ns, labels);
            p.metadata.name = Some("p".into());
            p
        };
        let names = |b: Binding| match b {
            Binding::Bound { identities, .. } => identities
                .iter()
                .map(|i| format!("{}/{}", i.namespace.as_deref().unwrap_or(""), i.name))
                .collect::<Vec<_>>(),
            Binding::Unbound { reason, .. } => vec![format!("unbound: {reason}")],
            Binding::NodeException { .. } => vec!["exception".into()],
            Binding::NotReady { reason } => vec![format!("not ready: {reason}")],
        };
        let ns = inner(false, Vec::new());
        assert_eq!(
            names(ns.bind_pod(
                &pod("a", &[("aadpodidbinding", "web")]),
                Workload::default()
            )),
            ["a/id1"]
        );
        assert_eq!(
            names(ns.bind_pod(
                &pod("b", &[("aadpodidbinding", "web")]),
                Workload::default()
            )),
            ["b/id1", "b/id2"]
        );
        let unlabelled = names(ns.bind_pod(&pod("a", &[("app", "x")]), Workload::default()));
        assert!(
            unlabelled[0].contains("no aadpodidbinding label"),
            "{unlabelled:?}"
        );
        let empty = names(ns.bind_pod(&pod("a", &[("aadpodidbinding", "")]), Workload::default()));
        assert!(
            empty[0].starts_with("unbound"),
            "an empty selector never matches: {empty:?}"
        );
        let dangling = names(ns.bind_pod(
            &pod("b", &[("aadpodidbinding", "other")]),
            Workload::default(),
        ));
        assert!(dangling[0].contains("does not exist"), "{dangling:?}");
        let cw = inner(true, Vec::new());
        assert_eq!(
            names(cw.bind_pod(
                &pod("c", &[("aadpodidbinding", "web")]),
                Workload::default()
            )),
            ["a/id1", "b/id1", "b/id2"]
        );
    }

    #[test]
    fn redaction() {
        assert_eq!(redact("11112222-3333"), "1111##### REDACTED #####3333");
        assert_eq!(redact("short"), "##### REDACTED #####");
    }
}
