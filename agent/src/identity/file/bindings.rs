//! One validated bindings file as a table: cgroup path -> identities bound there, and the lookup of a caller's cgroup.

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::identity::binding::Identity;

/// One validated bindings file: cgroup path (absolute form, relative to `--cgroup`) -> identities bound there.
/// Built by [`super::parse`].
#[derive(Debug, Default)]
pub struct Bindings {
    pub(super) by_path: HashMap<PathBuf, Vec<Arc<Identity>>>,
    pub(super) identities: usize,
    pub(super) bindings: usize,
    pub(super) warnings: Vec<String>,
}

impl Bindings {
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

    /// How many distinct cgroup paths carry a binding.
    pub fn cgroup_count(&self) -> usize {
        self.by_path.len()
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
