//! What the fake API server holds, as etcd would: the objects, the resourceVersion counter, the change history that
//! watches resume from, and the kinds it knows how to list.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use serde_json::{Value, json};

use super::query::Filter;

/// Where a resource lives: `/api/v1` or `/apis/<group>/<version>`, and its plural.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct Resource {
    pub prefix: String,
    pub plural: String,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Key {
    pub resource: Resource,
    pub namespace: String,
    pub name: String,
}

/// One change, as a watch delivers it.
#[derive(Debug)]
pub(super) struct Event {
    pub rv: u64,
    /// The watch epoch it happened in: a watch of an older epoch (ended by `compact`) must not deliver it.
    pub epoch: u64,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub kind: &'static str,
    pub resource: Resource,
    pub object: Value,
}

/// The resources a kube-rs client of the agent asks for before any object of theirs exists: (prefix, plural,
/// apiVersion, kind).
const BUILTIN_KINDS: [(&str, &str, &str, &str); 5] = [
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
];

pub(super) struct Store {
    pub rv: u64,
    /// A watch must start at or after this resourceVersion; older ones get 410 Gone.
    pub oldest: u64,
    /// Bumped by `compact` / `drop_watches`; open watches of an older epoch end.
    pub epoch: u64,
    pub objects: BTreeMap<Key, Value>,
    pub history: Vec<Arc<Event>>,
    kinds: HashMap<Resource, (String, String)>,
    next_uid: u64,
}

impl Store {
    pub fn new() -> Store {
        let kinds = BUILTIN_KINDS
            .iter()
            .map(|(prefix, plural, api_version, kind)| {
                let resource = Resource {
                    prefix: (*prefix).into(),
                    plural: (*plural).into(),
                };
                (resource, ((*api_version).into(), (*kind).into()))
            })
            .collect();
        Store {
            // Start well above 0: "0" means "any version" to a real API server.
            rv: 100,
            oldest: 0,
            epoch: 0,
            objects: BTreeMap::new(),
            history: Vec::new(),
            kinds,
            next_uid: 1,
        }
    }

    /// (apiVersion, kind) of a resource's objects; `("v1", "")` for one never seen.
    pub fn kind(&self, resource: &Resource) -> (String, String) {
        self.kinds
            .get(resource)
            .cloned()
            .unwrap_or_else(|| ("v1".into(), "".into()))
    }

    /// The objects of `resource` that `filter` lets through, in key order.
    pub fn list(&self, resource: &Resource, filter: &Filter) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|(k, v)| k.resource == *resource && filter.matches(v))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Stores `object` as `change` (`ADDED`: must be new; `MODIFIED`: must exist), filling in resourceVersion, uid and
    /// creationTimestamp, and records the event.
    pub fn write(&mut self, mut object: Value, change: &'static str) -> Arc<Event> {
        let (key, kind) = key_of(&object);
        let existing = self.objects.get(&key).cloned();
        match (change, &existing) {
            ("ADDED", Some(_)) => panic!("fake API server: create of {key:?}, which exists"),
            ("MODIFIED", None) => {
                panic!("fake API server: update of {key:?}, which does not exist")
            }
            _ => {}
        }
        self.rv += 1;
        let uid = existing
            .as_ref()
            .and_then(|e| e["metadata"]["uid"].as_str())
            .or_else(|| object["metadata"]["uid"].as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| {
                self.next_uid += 1;
                format!("00000000-0000-4000-8000-{:012x}", self.next_uid)
            });
        let meta = &mut object["metadata"];
        if !key.namespace.is_empty() {
            meta["namespace"] = json!(key.namespace);
        }
        meta["resourceVersion"] = json!(self.rv.to_string());
        meta["uid"] = json!(uid);
        if meta["creationTimestamp"].is_null() {
            meta["creationTimestamp"] = existing
                .as_ref()
                .map(|e| e["metadata"]["creationTimestamp"].clone())
                .unwrap_or_else(|| json!("2024-01-01T00:00:00Z"));
        }
        let api_version = object["apiVersion"].as_str().unwrap_or_default().to_owned();
        self.kinds
            .entry(key.resource.clone())
            .or_insert((api_version, kind));
        self.objects.insert(key.clone(), object.clone());
        self.record(change, key.resource, object)
    }

    /// Removes the object `object` names (which must exist) and records the DELETED event.
    pub fn delete(&mut self, object: &Value) -> Arc<Event> {
        let (key, _) = key_of(object);
        let Some(mut gone) = self.objects.remove(&key) else {
            panic!("fake API server: delete of {key:?}, which does not exist");
        };
        self.rv += 1;
        gone["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record("DELETED", key.resource, gone)
    }

    pub fn get(&self, object: &Value) -> Option<Value> {
        self.objects.get(&key_of(object).0).cloned()
    }

    /// Forgets the history, moving past every version a client may hold (bookmarks included), so that all of them
    /// are too old; returns the new watch epoch.
    pub fn compact(&mut self) -> u64 {
        self.rv += 1;
        self.oldest = self.rv;
        self.history.clear();
        self.end_watches()
    }

    /// Starts a new watch epoch (open watches of the old one end) and returns it.
    pub fn end_watches(&mut self) -> u64 {
        self.epoch += 1;
        self.epoch
    }

    fn record(&mut self, kind: &'static str, resource: Resource, object: Value) -> Arc<Event> {
        let event = Arc::new(Event {
            rv: self.rv,
            epoch: self.epoch,
            kind,
            resource,
            object,
        });
        self.history.push(Arc::clone(&event));
        event
    }
}

/// Kinds that live outside namespaces: stored (and served) without one.
const CLUSTER_SCOPED: &[&str] = &["Node", "Namespace", "CustomResourceDefinition"];

/// Where `object` is stored (from its apiVersion, kind, namespace and name), and its kind.
fn key_of(object: &Value) -> (Key, String) {
    let field = |value: &Value, what: &str| {
        value
            .as_str()
            .unwrap_or_else(|| panic!("fake API server: object without {what}: {object}"))
            .to_owned()
    };
    let api_version = field(&object["apiVersion"], "apiVersion");
    let kind = field(&object["kind"], "kind");
    let name = field(&object["metadata"]["name"], "metadata.name");
    let namespace = if CLUSTER_SCOPED.contains(&kind.as_str()) {
        ""
    } else {
        object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
    };
    let prefix = if api_version.contains('/') {
        format!("/apis/{api_version}")
    } else {
        format!("/api/{api_version}")
    };
    let key = Key {
        resource: Resource {
            prefix,
            plural: plural(&kind),
        },
        namespace: namespace.to_owned(),
        name,
    };
    (key, kind)
}

/// The resource name of a kind, by the English rules the Kubernetes kinds here follow.
fn plural(kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    if let Some(stem) = lower.strip_suffix('y') {
        format!("{stem}ies")
    } else if lower.ends_with('s') {
        format!("{lower}es")
    } else {
        format!("{lower}s")
    }
}
