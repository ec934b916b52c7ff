//! Standalone mode: a YAML bindings file maps cgroup subtrees (relative to the intercepted `--cgroup`) to identities.
//!
//! ```yaml
//! identities:
//!   - name: orders
//!     clientID: "11111111-1111-1111-1111-111111111111"
//!     resourceID: "/subscriptions/.../userAssignedIdentities/orders"   # optional
//!     objectID: "..."                                                  # optional
//! bindings:
//!   - cgroup: "orders"        # this cgroup and everything below it
//!     identity: orders
//! ```
//!
//! A binding covers its cgroup and everything below it. The most specific (longest) binding path that covers a
//! caller wins; several bindings for the very same path bind several identities. `cgroup: "."` binds the intercepted
//! root itself (and so every caller that no deeper binding covers).
//!
//! Reloads (SIGHUP, or a change seen by a 2 s metadata poll) build a complete new table and swap it in one step; a
//! file that fails to parse or validate leaves the old table in force. Polling `stat` instead of inotify is
//! deliberate: a ConfigMap volume updates files by swapping a `..data` symlink, which an inotify watch on the file
//! itself never sees, while `stat` follows the link; and one `stat` every 2 s costs nothing.

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    os::unix::fs::MetadataExt,
    path::{Component, Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::{Duration, SystemTime},
};

use serde::Deserialize;
use serde_saphyr::Spanned;
use tokio::sync::watch;

use super::{Binding, Identity, IdentityKind, Resolve, Workload, podcgroup};
use crate::attest::Attestation;

/// How often [`FileSource::spawn_reloader`] checks the file for changes by default.
pub const DEFAULT_POLL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("reading bindings file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Syntax {
        path: PathBuf,
        /// 1-based line of the YAML error, when the parser knows it.
        line: Option<u32>,
        message: String,
    },
    #[error("{}: {}", path.display(), ProblemList(problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

impl FileError {
    /// The first line the error points at, if any (for tests and log fields).
    pub fn line(&self) -> Option<u32> {
        match self {
            FileError::Read { .. } => None,
            FileError::Syntax { line, .. } => *line,
            FileError::Invalid { problems, .. } => problems.first().map(|p| p.line),
        }
    }
}

/// One validation problem and the line it is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub line: u32,
    pub kind: ProblemKind,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.kind)
    }
}

struct ProblemList<'a>(&'a [Problem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProblemKind {
    #[error("identity name is empty")]
    EmptyName,
    #[error("identity `{name}` is defined twice (first on line {first_line})")]
    DuplicateIdentity { name: String, first_line: u32 },
    #[error("identity `{name}` has an empty clientID")]
    EmptyClientId { name: String },
    #[error(
        "identity `{name}`: clientID `{value}` is not a GUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)"
    )]
    InvalidClientId { name: String, value: String },
    #[error("identity `{name}`: objectID `{value}` is not a GUID")]
    InvalidObjectId { name: String, value: String },
    #[error(
        "identity `{name}`: resourceID `{value}` is not the ARM id of a user-assigned identity \
         (/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>)"
    )]
    InvalidResourceId { name: String, value: String },
    #[error("binding names unknown identity `{identity}`")]
    UnknownIdentity { identity: String },
    #[error("binding cgroup is empty; use \".\" to bind the whole intercepted cgroup")]
    EmptyCgroup,
    #[error("binding cgroup `{0}` is absolute; write it relative to --cgroup")]
    AbsoluteCgroup(String),
    #[error("binding cgroup `{0}` contains `..`; bindings cannot reach outside --cgroup")]
    ParentCgroup(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    // Option: a key with nothing under it (`identities:` on a fresh install) is YAML null, and means "none yet".
    #[serde(default)]
    identities: Option<Vec<Spanned<RawIdentity>>>,
    #[serde(default)]
    bindings: Option<Vec<Spanned<RawBinding>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    name: String,
    #[serde(rename = "clientID")]
    client_id: String,
    #[serde(rename = "resourceID", default)]
    resource_id: Option<String>,
    #[serde(rename = "objectID", default)]
    object_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBinding {
    cgroup: String,
    identity: String,
}

/// One validated bindings file: cgroup path (absolute form, relative to `--cgroup`) -> identities bound there.
#[derive(Debug, Default)]
pub struct Bindings {
    by_path: HashMap<PathBuf, Vec<Arc<Identity>>>,
    identities: usize,
    bindings: usize,
    warnings: Vec<String>,
}

impl Bindings {
    /// Parses and validates a bindings file's text. `path` only names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Bindings, FileError> {
        // An empty (or comment-only) file is a valid "nothing bound" file, not a syntax error.
        let raw: RawFile = if text
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            RawFile {
                identities: None,
                bindings: None,
            }
        } else {
            serde_saphyr::from_str(text).map_err(|e| FileError::Syntax {
                path: path.to_owned(),
                line: e.location().map(|l| l.line() as u32),
                message: e.without_snippet().to_string(),
            })?
        };
        Self::validate(path, raw)
    }

    fn validate(path: &Path, raw: RawFile) -> Result<Bindings, FileError> {
        let mut problems = Vec::new();
        let mut warnings = Vec::new();
        let mut by_name: HashMap<String, (u32, Arc<Identity>)> = HashMap::new();
        let mut order: Vec<String> = Vec::new();
        let mut by_client_id: HashMap<String, String> = HashMap::new();

        for item in raw.identities.unwrap_or_default() {
            let line = line_of(&item);
            let RawIdentity {
                name,
                client_id,
                resource_id,
                object_id,
            } = item.value;
            let mut ok = true;
            let mut problem = |kind| {
                problems.push(Problem { line, kind });
                ok = false;
            };
            if name.trim().is_empty() {
                problem(ProblemKind::EmptyName);
            }
            if client_id.trim().is_empty() {
                problem(ProblemKind::EmptyClientId { name: name.clone() });
            } else if !is_guid(&client_id) {
                problem(ProblemKind::InvalidClientId {
                    name: name.clone(),
                    value: client_id.clone(),
                });
            }
            if let Some(object_id) = object_id.as_ref().filter(|o| !is_guid(o)) {
                problem(ProblemKind::InvalidObjectId {
                    name: name.clone(),
                    value: object_id.clone(),
                });
            }
            if let Some(resource_id) = resource_id.as_ref().filter(|r| !is_uami_resource_id(r)) {
                problem(ProblemKind::InvalidResourceId {
                    name: name.clone(),
                    value: resource_id.clone(),
                });
            }
            if let Some((first_line, _)) = by_name.get(&name) {
                problem(ProblemKind::DuplicateIdentity {
                    name: name.clone(),
                    first_line: *first_line,
                });
            }
            if !ok {
                continue;
            }
            if let Some(other) = by_client_id.insert(client_id.to_ascii_lowercase(), name.clone()) {
                warnings.push(format!(
                    "line {line}: identities `{other}` and `{name}` have the same clientID; they are one identity to IMDS"
                ));
            }
            let identity = Arc::new(Identity {
                name: name.clone(),
                namespace: None,
                client_id,
                resource_id,
                object_id,
                kind: IdentityKind::UserAssigned,
            });
            order.push(name.clone());
            by_name.insert(name, (line, identity));
        }

        let mut by_path: HashMap<PathBuf, Vec<Arc<Identity>>> = HashMap::new();
        let mut used: BTreeSet<String> = BTreeSet::new();
        let mut bindings = 0;
        for item in raw.bindings.unwrap_or_default() {
            let line = line_of(&item);
            let RawBinding { cgroup, identity } = item.value;
            let key = match binding_key(&cgroup) {
                Ok(key) => Some(key),
                Err(kind) => {
                    problems.push(Problem { line, kind });
                    None
                }
            };
            let Some((_, id)) = by_name.get(&identity) else {
                // A binding to an identity that itself failed validation is reported once, at the identity.
                if !problems.iter().any(|p| matches!(&p.kind, ProblemKind::InvalidClientId { name, .. } | ProblemKind::EmptyClientId { name } | ProblemKind::InvalidObjectId { name, .. } | ProblemKind::InvalidResourceId { name, .. } if *name == identity))
                {
                    problems.push(Problem {
                        line,
                        kind: ProblemKind::UnknownIdentity { identity },
                    });
                }
                continue;
            };
            let Some(key) = key else { continue };
            bindings += 1;
            used.insert(identity.clone());
            let ids = by_path.entry(key).or_default();
            // The same identity bound twice to one path is one binding.
            if !ids.iter().any(|i| i.name == id.name) {
                ids.push(Arc::clone(id));
            }
        }

        if !problems.is_empty() {
            problems.sort_by_key(|p| p.line);
            return Err(FileError::Invalid {
                path: path.to_owned(),
                problems,
            });
        }

        for name in &order {
            if !used.contains(name)
                && let Some((line, _)) = by_name.get(name)
            {
                warnings.push(format!(
                    "line {line}: identity `{name}` is not bound to any cgroup"
                ));
            }
        }
        let mut crowded: Vec<_> = by_path.iter().filter(|(_, ids)| ids.len() > 1).collect();
        crowded.sort_by(|a, b| a.0.cmp(b.0));
        for (p, ids) in crowded {
            let names: Vec<&str> = ids.iter().map(|i| i.name.as_str()).collect();
            warnings.push(format!(
                "cgroup {} has {} identities ({}); its requests must name one with client_id, object_id or msi_res_id",
                p.display(),
                ids.len(),
                names.join(", ")
            ));
        }
        if bindings == 0 {
            warnings.push("the file binds nothing: every caller is unbound".to_owned());
        }
        Ok(Bindings {
            by_path,
            identities: order.len(),
            bindings,
            warnings,
        })
    }

    /// The identities bound to a cgroup (path relative to `--cgroup`, leading `/`): the deepest binding path that
    /// is the cgroup itself or one of its ancestors.
    pub fn lookup(&self, cgroup: &Path) -> Option<(&Path, &[Arc<Identity>])> {
        let rooted = if cgroup.has_root() {
            cgroup.to_owned()
        } else {
            Path::new("/").join(cgroup)
        };
        rooted
            .ancestors()
            .find_map(|anc| self.by_path.get_key_value(anc))
            .map(|(p, ids)| (p.as_path(), ids.as_slice()))
    }

    pub fn identity_count(&self) -> usize {
        self.identities
    }

    pub fn binding_count(&self) -> usize {
        self.bindings
    }

    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Lower-cased client ids of every bound identity (the token cache compares them case-insensitively).
    pub fn bound_client_ids(&self) -> BTreeSet<String> {
        self.by_path
            .values()
            .flatten()
            .map(|i| i.client_id.to_ascii_lowercase())
            .collect()
    }
}

fn line_of<T>(s: &Spanned<T>) -> u32 {
    s.referenced.line() as u32
}

/// `orders/api` -> `/orders/api`; `.` -> `/`.
fn binding_key(cgroup: &str) -> Result<PathBuf, ProblemKind> {
    let trimmed = cgroup.trim();
    if trimmed.is_empty() {
        return Err(ProblemKind::EmptyCgroup);
    }
    let path = Path::new(trimmed);
    if path.has_root() {
        return Err(ProblemKind::AbsoluteCgroup(cgroup.to_owned()));
    }
    let mut key = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(n) => key.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err(ProblemKind::ParentCgroup(cgroup.to_owned())),
            Component::RootDir | Component::Prefix(_) => {
                return Err(ProblemKind::AbsoluteCgroup(cgroup.to_owned()));
            }
        }
    }
    Ok(key)
}

/// 8-4-4-4-12 hex digits, the form Azure prints client and object ids in.
pub(crate) fn is_guid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The shape aad-pod-identity validated: `/subscriptions/<s>/resourcegroups/<rg>/providers/
/// Microsoft.ManagedIdentity/userAssignedIdentities/<name>`, case-insensitive as ARM is.
fn is_uami_resource_id(s: &str) -> bool {
    let parts: Vec<String> = s
        .trim_end_matches('/')
        .split('/')
        .map(str::to_ascii_lowercase)
        .collect();
    matches!(
        parts.iter().map(String::as_str).collect::<Vec<_>>().as_slice(),
        ["", "subscriptions", sub, "resourcegroups", rg, "providers", "microsoft.managedidentity", "userassignedidentities", name]
            if !sub.is_empty() && !rg.is_empty() && !name.is_empty()
    )
}

/// What identifies one version of the file: a change in any of these means "read it again".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    dev: u64,
    ino: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    // `metadata` follows symlinks, so a ConfigMap's `..data` swap shows up as a new inode.
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        dev: m.dev(),
        ino: m.ino(),
    })
}

/// The bindings file source. Lookups read the current table under a read lock held only to clone an `Arc`, so a
/// reload never blocks or drops requests in flight: those keep the table they started with.
pub struct FileSource {
    path: PathBuf,
    current: RwLock<Arc<Bindings>>,
    seen: Mutex<Option<Stamp>>,
    bound: watch::Sender<Arc<BTreeSet<String>>>,
}

impl fmt::Debug for FileSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileSource")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl FileSource {
    /// Reads and validates the file; a first load that fails is an error (the agent should not start on it).
    pub fn load(path: impl Into<PathBuf>) -> Result<FileSource, FileError> {
        let path = path.into();
        let seen = stamp(&path);
        let bindings = read(&path)?;
        log_loaded(&path, &bindings, "loaded");
        let (bound, _) = watch::channel(Arc::new(bindings.bound_client_ids()));
        Ok(FileSource {
            path,
            current: RwLock::new(Arc::new(bindings)),
            seen: Mutex::new(seen),
            bound,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The table in force.
    pub fn current(&self) -> Arc<Bindings> {
        // A poisoned lock only means a panic elsewhere while holding it; the Arc inside is always whole.
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Warnings about the table in force (unused identities, paths with several identities, ...).
    pub fn warnings(&self) -> Vec<String> {
        self.current().warnings().to_vec()
    }

    /// Reads the file again. On success the new table replaces the old one at once; on failure the old one stays
    /// and the error (with its line) is logged and returned.
    pub fn reload(&self) -> Result<Arc<Bindings>, FileError> {
        let seen = stamp(&self.path);
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = seen;
        match read(&self.path) {
            Ok(bindings) => {
                log_loaded(&self.path, &bindings, "reloaded");
                let bindings = Arc::new(bindings);
                *self.current.write().unwrap_or_else(PoisonError::into_inner) =
                    Arc::clone(&bindings);
                let ids = bindings.bound_client_ids();
                self.bound.send_if_modified(|cur| {
                    let changed = **cur != ids;
                    if changed {
                        *cur = Arc::new(ids);
                    }
                    changed
                });
                Ok(bindings)
            }
            Err(e) => {
                tracing::error!(file = %self.path.display(), line = e.line(), error = %e, "bindings file not reloaded; the previous bindings stay in force");
                Err(e)
            }
        }
    }

    /// Reloads if the file's metadata changed since the last (attempted) load. A broken file is tried once per
    /// change, so a bad edit is logged once rather than every poll.
    pub fn reload_if_changed(&self) -> Option<Result<Arc<Bindings>, FileError>> {
        let now = stamp(&self.path);
        let last = *self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        (now != last).then(|| self.reload())
    }

    /// Reloads on SIGHUP and whenever a poll every `poll` sees the file change. Runs until the task is aborted.
    pub fn spawn_reloader(self: &Arc<Self>, poll: Duration) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut hup = match tokio::signal::unix::signal(
                tokio::signal::unix::SignalKind::hangup(),
            ) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGHUP; the bindings file is reloaded on change only");
                    None
                }
            };
            let mut tick = tokio::time::interval(poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let hup_recv = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = hup_recv => {
                        tracing::info!(file = %me.path.display(), "SIGHUP: reloading bindings file");
                        let _ = me.reload();
                    }
                    _ = tick.tick() => {
                        let _ = me.reload_if_changed();
                    }
                }
            }
        })
    }

    /// The set of bound client ids (lower case), updated on every reload that changes it; the token cache drops
    /// tokens of identities that leave it.
    pub fn bound_client_ids(&self) -> watch::Receiver<Arc<BTreeSet<String>>> {
        self.bound.subscribe()
    }

    /// Resolves a cgroup path (relative to `--cgroup`, leading `/`) to its binding.
    pub fn resolve_cgroup(&self, cgroup: Option<&Path>) -> Binding {
        let Some(cgroup) = cgroup else {
            return Binding::Unbound {
                workload: None,
                reason: "the caller's cgroup no longer exists".to_owned(),
            };
        };
        let pod = podcgroup::parse(cgroup);
        let workload = Workload {
            pod_uid: pod.as_ref().map(|p| p.pod_uid.clone()),
            container: pod.and_then(|p| p.container).map(|c| c.id),
            ..Workload::default()
        };
        let table = self.current();
        match table.lookup(cgroup) {
            Some((_, ids)) => Binding::Bound {
                workload,
                identities: ids.to_vec(),
            },
            None => Binding::Unbound {
                workload: Some(workload),
                reason: format!(
                    "no binding in {} covers cgroup {}",
                    self.path.display(),
                    cgroup.display()
                ),
            },
        }
    }
}

impl Resolve for FileSource {
    fn resolve(&self, caller: &Attestation) -> impl std::future::Future<Output = Binding> + Send {
        std::future::ready(self.resolve_cgroup(caller.cgroup.as_deref()))
    }
}

fn read(path: &Path) -> Result<Bindings, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })?;
    Bindings::parse(path, &text)
}

fn log_loaded(path: &Path, b: &Bindings, what: &str) {
    tracing::info!(
        file = %path.display(),
        identities = b.identity_count(),
        bindings = b.binding_count(),
        cgroups = b.by_path.len(),
        "{what} bindings file"
    );
    for w in b.warnings() {
        tracing::warn!(file = %path.display(), "{w}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "11111111-1111-1111-1111-111111111111";
    const B: &str = "22222222-2222-2222-2222-222222222222";

    fn parse(text: &str) -> Result<Bindings, FileError> {
        Bindings::parse(Path::new("bindings.yaml"), text)
    }

    fn names(b: &Bindings, cgroup: &str) -> Option<(String, Vec<String>)> {
        b.lookup(Path::new(cgroup)).map(|(p, ids)| {
            (
                p.display().to_string(),
                ids.iter().map(|i| i.name.clone()).collect(),
            )
        })
    }

    fn problems(text: &str) -> Vec<Problem> {
        match parse(text) {
            Err(FileError::Invalid { problems, .. }) => problems,
            other => panic!("expected validation problems, got {other:?}"),
        }
    }

    const GOOD: &str = r#"
identities:
  - name: orders
    clientID: "11111111-1111-1111-1111-111111111111"
    resourceID: "/subscriptions/0000/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/orders"
  - name: payments
    clientID: "22222222-2222-2222-2222-222222222222"
    objectID: "33333333-3333-3333-3333-333333333333"
  - name: audit
    clientID: "44444444-4444-4444-4444-444444444444"
bindings:
  - cgroup: "orders"
    identity: orders
  - cgroup: "orders/api/payments"
    identity: payments
  - cgroup: "shared"
    identity: orders
  - cgroup: "shared"
    identity: payments
  - cgroup: "shared/"
    identity: payments
  - cgroup: "./batch/nightly"
    identity: audit
"#;

    #[test]
    fn parses_and_matches_longest_prefix() {
        let b = parse(GOOD).expect("valid");
        assert_eq!(b.identity_count(), 3);
        assert_eq!(b.binding_count(), 6);
        let orders = Some(("/orders".to_owned(), vec!["orders".to_owned()]));
        assert_eq!(names(&b, "/orders"), orders);
        assert_eq!(names(&b, "/orders/api"), orders);
        assert_eq!(names(&b, "/orders/api/x/y"), orders);
        assert_eq!(
            names(&b, "/orders/api/payments/worker"),
            Some((
                "/orders/api/payments".to_owned(),
                vec!["payments".to_owned()]
            ))
        );
        // Component-wise, not string prefix.
        assert_eq!(names(&b, "/orders2"), None);
        assert_eq!(names(&b, "/"), None);
        assert_eq!(names(&b, "/batch"), None);
        assert_eq!(
            names(&b, "batch/nightly/run-1"),
            Some(("/batch/nightly".to_owned(), vec!["audit".to_owned()]))
        );
        // Several bindings for one path bind several identities, each once.
        assert_eq!(
            names(&b, "/shared/x"),
            Some((
                "/shared".to_owned(),
                vec!["orders".to_owned(), "payments".to_owned()]
            ))
        );
        let ids = b.bound_client_ids();
        assert_eq!(ids.len(), 3);
        assert!(ids.contains(A) && ids.contains(B));
        assert!(
            b.warnings()
                .iter()
                .any(|w| w.contains("/shared has 2 identities")),
            "{:?}",
            b.warnings()
        );
    }

    #[test]
    fn fields_are_parsed() {
        let b = parse(GOOD).expect("valid");
        let (_, ids) = b.lookup(Path::new("/orders/api/payments")).expect("bound");
        assert_eq!(ids[0].client_id, B);
        assert_eq!(
            ids[0].object_id.as_deref(),
            Some("33333333-3333-3333-3333-333333333333")
        );
        assert_eq!(ids[0].resource_id, None);
        assert_eq!(ids[0].kind, IdentityKind::UserAssigned);
        let (_, ids) = b.lookup(Path::new("/orders")).expect("bound");
        assert!(
            ids[0]
                .resource_id
                .as_deref()
                .is_some_and(|r| r.ends_with("/orders"))
        );
    }

    #[test]
    fn root_binding_and_empty_file() {
        let b = parse(&format!(
            "identities:\n  - name: a\n    clientID: \"{A}\"\nbindings:\n  - cgroup: .\n    identity: a\n"
        ))
        .expect("valid");
        assert_eq!(
            names(&b, "/anything/below"),
            Some(("/".to_owned(), vec!["a".to_owned()]))
        );
        assert_eq!(names(&b, "/"), Some(("/".to_owned(), vec!["a".to_owned()])));

        let empty = parse("# nothing yet\n\n").expect("empty file is valid");
        let keys_only =
            parse("identities:\nbindings:\n").expect("keys with nothing under them are valid");
        assert_eq!((keys_only.identities, keys_only.bindings), (0, 0));
        assert_eq!(empty.binding_count(), 0);
        assert!(empty.warnings().iter().any(|w| w.contains("binds nothing")));
        assert!(parse("identities: []\nbindings: []\n").is_ok());
    }

    #[test]
    fn unknown_identity_names_the_line() {
        let text = format!(
            "identities:\n  - name: a\n    clientID: \"{A}\"\nbindings:\n  - cgroup: x\n    identity: a\n  - cgroup: y\n    identity: nope\n"
        );
        let p = problems(&text);
        assert_eq!(
            p,
            vec![Problem {
                line: 7,
                kind: ProblemKind::UnknownIdentity {
                    identity: "nope".into()
                }
            }]
        );
        let msg = parse(&text).expect_err("invalid").to_string();
        assert!(
            msg.contains("bindings.yaml: line 7: binding names unknown identity `nope`"),
            "{msg}"
        );
    }

    #[test]
    fn duplicate_names_and_bad_ids() {
        let text = format!(
            "identities:
  - name: a
    clientID: \"{A}\"
  - name: a
    clientID: \"{B}\"
  - name: b
    clientID: \"\"
  - name: c
    clientID: not-a-guid
  - name: d
    clientID: \"{A}\"
    objectID: xyz
  - name: e
    clientID: \"{B}\"
    resourceID: /subscriptions/s/resourceGroups/rg
bindings: []
"
        );
        let p = problems(&text);
        let kinds: Vec<(u32, &ProblemKind)> = p.iter().map(|p| (p.line, &p.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (
                    4,
                    &ProblemKind::DuplicateIdentity {
                        name: "a".into(),
                        first_line: 2
                    }
                ),
                (6, &ProblemKind::EmptyClientId { name: "b".into() }),
                (
                    8,
                    &ProblemKind::InvalidClientId {
                        name: "c".into(),
                        value: "not-a-guid".into()
                    }
                ),
                (
                    10,
                    &ProblemKind::InvalidObjectId {
                        name: "d".into(),
                        value: "xyz".into()
                    }
                ),
                (
                    13,
                    &ProblemKind::InvalidResourceId {
                        name: "e".into(),
                        value: "/subscriptions/s/resourceGroups/rg".into()
                    }
                ),
            ]
        );
    }

    #[test]
    fn cgroup_paths_must_stay_inside() {
        let text = format!(
            "identities:
  - name: a
    clientID: \"{A}\"
bindings:
  - cgroup: /abs
    identity: a
  - cgroup: ok/../../escape
    identity: a
  - cgroup: \"\"
    identity: a
"
        );
        let p = problems(&text);
        assert_eq!(
            p,
            vec![
                Problem {
                    line: 5,
                    kind: ProblemKind::AbsoluteCgroup("/abs".into())
                },
                Problem {
                    line: 7,
                    kind: ProblemKind::ParentCgroup("ok/../../escape".into())
                },
                Problem {
                    line: 9,
                    kind: ProblemKind::EmptyCgroup
                },
            ]
        );
    }

    #[test]
    fn unknown_fields_and_syntax_errors_name_the_line() {
        let err = parse(&format!(
            "identities:\n  - name: a\n    clientID: \"{A}\"\n    clientId: \"{A}\"\nbindings: []\n"
        ))
        .expect_err("unknown field");
        assert!(
            matches!(err, FileError::Syntax { line: Some(4), .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("clientId"), "{err}");

        let err = parse("identities: []\nbinding: []\n").expect_err("unknown top-level field");
        assert!(
            matches!(err, FileError::Syntax { line: Some(2), .. }),
            "{err:?}"
        );

        let err = parse("identities:\n  - name: [unclosed\n").expect_err("bad yaml");
        assert!(
            matches!(err, FileError::Syntax { line: Some(_), .. }),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("bindings.yaml:"), "{err}");
    }

    #[test]
    fn warnings() {
        let b = parse(&format!(
            "identities:
  - name: a
    clientID: \"{A}\"
  - name: unused
    clientID: \"{B}\"
  - name: a-again
    clientID: \"{}\"
bindings:
  - cgroup: x
    identity: a
  - cgroup: y
    identity: a
  - cgroup: z
    identity: a-again
",
            A.to_uppercase()
        ))
        .expect("valid");
        let w = b.warnings().join("\n");
        assert!(w.contains("identity `unused` is not bound"), "{w}");
        assert!(w.contains("same clientID"), "{w}");
        // One identity bound in two places is fine in a bindings file.
        assert!(!w.contains("`a` is"), "{w}");
    }

    #[test]
    fn guid_and_resource_id_shapes() {
        assert!(is_guid(A));
        assert!(is_guid("abcdefab-ABCD-0123-4567-89abcdef0123"));
        assert!(!is_guid("11111111111111111111111111111111"));
        assert!(!is_guid("{11111111-1111-1111-1111-111111111111}"));
        assert!(is_uami_resource_id(
            "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/x"
        ));
        assert!(!is_uami_resource_id(
            "/subscriptions/s/resourcegroups/rg/providers/Microsoft.Compute/vm/x"
        ));
    }

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).expect("write bindings file");
    }

    fn caller(cgroup: &str) -> Option<PathBuf> {
        Some(PathBuf::from(cgroup))
    }

    fn bound_names(b: &Binding) -> Vec<String> {
        match b {
            Binding::Bound { identities, .. } => {
                identities.iter().map(|i| i.name.clone()).collect()
            }
            _ => Vec::new(),
        }
    }

    #[test]
    fn reload_swaps_and_a_bad_reload_keeps_the_old_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bindings.yaml");
        write(
            &path,
            &format!(
                "identities:\n  - name: a\n    clientID: \"{A}\"\nbindings:\n  - cgroup: x\n    identity: a\n"
            ),
        );
        let src = FileSource::load(&path).expect("load");
        let mut bound = src.bound_client_ids();
        assert_eq!(
            bound_names(&src.resolve_cgroup(caller("/x/y").as_deref())),
            vec!["a"]
        );
        assert!(matches!(
            src.resolve_cgroup(caller("/z").as_deref()),
            Binding::Unbound { .. }
        ));
        assert!(matches!(
            src.resolve_cgroup(None),
            Binding::Unbound { workload: None, .. }
        ));
        assert!(
            src.reload_if_changed().is_none(),
            "unchanged file is not reloaded"
        );

        // A broken edit: reported with its line, old table stays.
        write(
            &path,
            &format!(
                "identities:\n  - name: a\n    clientID: \"{A}\"\nbindings:\n  - cgroup: x\n    identity: b\n"
            ),
        );
        let err = src.reload().expect_err("bad file");
        assert_eq!(err.line(), Some(5));
        assert_eq!(
            bound_names(&src.resolve_cgroup(caller("/x").as_deref())),
            vec!["a"]
        );
        assert!(
            src.reload_if_changed().is_none(),
            "a failed version is tried once"
        );

        // A good edit takes effect and the bound set changes.
        let held = src.current();
        write(
            &path,
            &format!(
                "identities:\n  - name: b\n    clientID: \"{B}\"\nbindings:\n  - cgroup: z\n    identity: b\n"
            ),
        );
        assert!(src.reload().is_ok());
        assert!(matches!(
            src.resolve_cgroup(caller("/x").as_deref()),
            Binding::Unbound { .. }
        ));
        assert_eq!(
            bound_names(&src.resolve_cgroup(caller("/z/1").as_deref())),
            vec!["b"]
        );
        // A table taken before the swap stays whole for whoever holds it.
        assert!(held.lookup(Path::new("/x")).is_some());
        assert!(bound.has_changed().unwrap_or(false));
        assert_eq!(**bound.borrow_and_update(), BTreeSet::from([B.to_owned()]));
    }

    #[tokio::test]
    async fn the_reloader_sees_a_replaced_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bindings.yaml");
        let v1 = format!(
            "identities:\n  - name: a\n    clientID: \"{A}\"\nbindings:\n  - cgroup: x\n    identity: a\n"
        );
        write(&path, &v1);
        let src = Arc::new(FileSource::load(&path).expect("load"));
        let task = src.spawn_reloader(Duration::from_millis(50));

        // Replace through rename, as editors and ConfigMap updates do.
        let tmp = dir.path().join("new.yaml");
        write(&tmp, &v1.replace("cgroup: x", "cgroup: y"));
        std::fs::rename(&tmp, &path).expect("rename");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while bound_names(&src.resolve_cgroup(caller("/y").as_deref())).is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "poll reload did not happen"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        task.abort();
    }

    #[tokio::test]
    async fn sighup_reloads() {
        // Registering a handler first makes SIGHUP harmless to this test process whatever the reloader task does.
        let _guard = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .expect("sighup handler");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bindings.yaml");
        let v1 = format!(
            "identities:\n  - name: a\n    clientID: \"{A}\"\nbindings:\n  - cgroup: x\n    identity: a\n"
        );
        write(&path, &v1);
        let src = Arc::new(FileSource::load(&path).expect("load"));
        // A poll so slow that only the signal can cause the reload.
        let task = src.spawn_reloader(Duration::from_secs(3600));
        tokio::time::sleep(Duration::from_millis(200)).await;
        write(&path, &v1.replace("cgroup: x", "cgroup: w"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while bound_names(&src.resolve_cgroup(caller("/w").as_deref())).is_empty() {
            // SAFETY: kill(2) on our own pid with a signal this process handles.
            unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
            assert!(
                tokio::time::Instant::now() < deadline,
                "SIGHUP reload did not happen"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        task.abort();
    }

    #[tokio::test]
    async fn the_source_enum_dispatches_to_the_file() {
        use std::net::{Ipv4Addr, SocketAddrV4};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.yaml");
        write(
            &path,
            &format!(
                "identities:\n  - name: a\n    clientID: \"{A}\"\nbindings:\n  - cgroup: x\n    identity: a\n"
            ),
        );
        let source = super::super::Source::File(Arc::new(FileSource::load(&path).expect("load")));
        assert!(source.ready());
        assert_eq!(
            **source.bound_client_ids().borrow(),
            BTreeSet::from([A.to_owned()])
        );
        let caller = Attestation {
            peer: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1),
            cgroup_id: 1,
            cgroup: caller("/x/worker"),
            pid: 1,
            original_dst: SocketAddrV4::new(Ipv4Addr::new(169, 254, 169, 254), 80),
        };
        assert_eq!(bound_names(&source.resolve(&caller).await), vec!["a"]);
    }

    #[test]
    fn workload_carries_pod_and_container_when_the_path_is_a_pod() {
        let b = format!(
            "identities:\n  - name: a\n    clientID: \"{A}\"\nbindings:\n  - cgroup: kubepods-besteffort.slice\n    identity: a\n"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.yaml");
        write(&path, &b);
        let src = FileSource::load(&path).expect("load");
        let cid = "ab".repeat(32);
        let got = src.resolve_cgroup(Some(Path::new(&format!(
            "/kubepods-besteffort.slice/kubepods-besteffort-pod0f3a4b5c_6d7e_4f80_91a2_b3c4d5e6f708.slice/cri-containerd-{cid}.scope"
        ))));
        match got {
            Binding::Bound {
                workload,
                identities,
            } => {
                assert_eq!(identities.len(), 1);
                assert_eq!(
                    workload.pod_uid.as_deref(),
                    Some("0f3a4b5c-6d7e-4f80-91a2-b3c4d5e6f708")
                );
                assert_eq!(workload.container.as_deref(), Some(cid.as_str()));
            }
            other => panic!("{other:?}"),
        }
    }
}
