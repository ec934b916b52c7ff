//! The agent's standalone-mode bindings file (`--bindings`), written for a test.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One identity of the file.
#[derive(Clone, Debug)]
pub struct FileIdentity {
    pub name: String,
    pub client_id: String,
}

impl FileIdentity {
    pub fn new(name: &str, client_id: &str) -> FileIdentity {
        FileIdentity {
            name: name.into(),
            client_id: client_id.into(),
        }
    }
}

/// Writes `identities` and `bindings` (cgroup relative to the agent's `--cgroup`, identity name) as YAML to
/// `dir/bindings.yaml` and returns the path.
pub fn write(dir: &Path, identities: &[FileIdentity], bindings: &[(&str, &str)]) -> PathBuf {
    let mut yaml = String::from("identities:\n");
    for id in identities {
        let _ = writeln!(
            yaml,
            "  - name: {:?}\n    clientID: {:?}",
            id.name, id.client_id
        );
    }
    yaml.push_str("bindings:\n");
    for (cgroup, identity) in bindings {
        let _ = writeln!(yaml, "  - cgroup: {cgroup:?}\n    identity: {identity:?}");
    }
    let path = dir.join("bindings.yaml");
    std::fs::write(&path, yaml).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}
