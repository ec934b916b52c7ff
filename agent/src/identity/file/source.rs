//! The bindings file as a binding source: the table in force, swapped whole on a reload (SIGHUP, through
//! `run::signals`, or a change seen by a metadata poll), and the set of bound client ids the token cache follows.

use std::{
    fmt,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::{Duration, SystemTime},
};

use tokio::sync::watch;

use super::{bindings::Bindings, error::FileError, validate};
use crate::{
    attest::Attestation,
    identity::{
        binding::{Binding, BoundIds, Resolve, Workload, publish_bound},
        podcgroup,
    },
};

/// How often [`FileSource::spawn_reloader`] checks the file for changes by default.
pub const DEFAULT_POLL: Duration = Duration::from_secs(2);

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
    bound: watch::Sender<BoundIds>,
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
                publish_bound(&self.bound, bindings.bound_client_ids());
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

    /// Reloads whenever a poll every `poll` sees the file change. Runs until the task is aborted. SIGHUP is not
    /// listened for here: the process's signals have one owner (`run::signals`), which calls [`FileSource::reload`].
    pub fn spawn_reloader(self: &Arc<Self>, poll: Duration) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let _ = me.reload_if_changed();
            }
        })
    }

    /// The set of bound client ids (lower case), updated on every reload that changes it; the token cache drops
    /// tokens of identities that leave it.
    pub fn bound_client_ids(&self) -> watch::Receiver<BoundIds> {
        self.bound.subscribe()
    }

    /// Resolves a cgroup path (relative to `--cgroup`, leading `/`) to its binding.
    pub fn resolve_cgroup(&self, cgroup: Option<&Path>) -> Binding {
        let Some(cgroup) = cgroup else {
            return Binding::cgroup_gone();
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
    validate::parse(path, &text)
}

fn log_loaded(path: &Path, b: &Bindings, what: &str) {
    tracing::info!(
        file = %path.display(),
        identities = b.identity_count(),
        bindings = b.binding_count(),
        cgroups = b.cgroup_count(),
        "{what} bindings file"
    );
    for w in b.warnings() {
        tracing::warn!(file = %path.display(), "{w}");
    }
}
