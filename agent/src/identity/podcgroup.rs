//! cgroup path -> (pod UID, container id), for the names kubelet and the container runtimes give cgroups.
//!
//! kubelet names a pod's cgroup after its UID and QoS class, in one of two styles depending on its cgroup driver:
//! - systemd: `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with '_' for '-'>.slice`
//!   (guaranteed pods sit directly under `kubepods.slice` as `kubepods-pod<uid>.slice`); the runtime puts each
//!   container in `cri-containerd-<id>.scope`, `crio-<id>.scope` or `docker-<id>.scope` below it.
//! - cgroupfs: `/kubepods/burstable/pod<uid>/<id>` (guaranteed: `/kubepods/pod<uid>/<id>`); CRI-O names the
//!   container `crio-<id>`.
//!
//! The agent's `--cgroup` is usually the kubepods cgroup itself, so attested paths start below it
//! (`/kubepods-burstable.slice/...`, `/burstable/pod<uid>/<id>`, `/pod<uid>/<id>`): the parser therefore looks for
//! the pod component anywhere in the path instead of anchoring at `kubepods`.

use std::path::{Component, Path};

/// What a cgroup path says about the pod it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroup {
    /// The pod's UID in its canonical form (dashes, lower case). For static pods this is the config hash, which the
    /// API server's mirror pod carries in its `kubernetes.io/config.mirror` annotation.
    pub pod_uid: String,
    /// The container the cgroup belongs to; `None` for the pod-level cgroup itself.
    pub container: Option<Container>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    /// The runtime's container id (64 hex characters for containerd, CRI-O and Docker).
    pub id: String,
    /// Which naming the cgroup used: `containerd`, `crio`, `crio-conmon`, `docker`, or `unknown` for cgroupfs
    /// names that carry no runtime prefix.
    pub runtime: &'static str,
}

/// Parses a cgroup path (absolute or relative to any ancestor of the pod cgroup). Returns `None` for paths that are
/// not inside a pod (host processes, system slices, the QoS parents themselves).
pub fn parse(path: &Path) -> Option<PodCgroup> {
    let mut names = path.components().filter_map(|c| match c {
        Component::Normal(n) => n.to_str(),
        _ => None,
    });
    // The first component that names a pod wins: a container may create nested cgroups of its own below its scope,
    // and those names are under the workload's control, so nothing below the container component is interpreted.
    let pod_uid = names.by_ref().find_map(pod_component)?;
    let container = names.next().and_then(container_component);
    Some(PodCgroup { pod_uid, container })
}

/// `kubepods-<qos>-pod<uid>.slice`, `kubepods-pod<uid>.slice` (systemd) or `pod<uid>` (cgroupfs).
fn pod_component(name: &str) -> Option<String> {
    if let Some(stem) = name.strip_suffix(".slice") {
        // systemd escapes '-' inside a unit name component as '_', because '-' separates slice levels.
        let (_, last) = stem.rsplit_once('-')?;
        let uid = last.strip_prefix("pod")?;
        return canonical_uid(&uid.replace('_', "-"));
    }
    canonical_uid(name.strip_prefix("pod")?)
}

/// A pod UID: a UUID (8-4-4-4-12 hex) for API pods, or 32 hex characters (the config hash) for static pods.
fn canonical_uid(uid: &str) -> Option<String> {
    let hex = uid.bytes().filter(|b| *b != b'-').count();
    let ok = uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
        && hex == 32
        && (!uid.contains('-') || super::azure_id::is_guid(uid));
    ok.then(|| uid.to_ascii_lowercase())
}

fn container_component(name: &str) -> Option<Container> {
    if let Some(stem) = name.strip_suffix(".scope") {
        // Longest prefix first: `crio-conmon-` must not be read as `crio-` with id `conmon-...`.
        const PREFIXES: [(&str, &str); 4] = [
            ("cri-containerd-", "containerd"),
            ("crio-conmon-", "crio-conmon"),
            ("crio-", "crio"),
            ("docker-", "docker"),
        ];
        return PREFIXES.iter().find_map(|(prefix, runtime)| {
            let id = stem.strip_prefix(prefix)?;
            is_container_id(id).then(|| Container {
                id: id.to_owned(),
                runtime,
            })
        });
    }
    // cgroupfs driver: the bare id (containerd, Docker) or `crio-<id>`.
    if let Some(id) = name.strip_prefix("crio-").filter(|id| is_container_id(id)) {
        return Some(Container {
            id: id.to_owned(),
            runtime: "crio",
        });
    }
    is_container_id(name).then(|| Container {
        id: name.to_owned(),
        runtime: "unknown",
    })
}

/// Runtimes use 64 lower-case hex characters; shorter all-hex ids are accepted so that test setups and other
/// runtimes still show a container, but anything with other characters is not taken for an id.
fn is_container_id(id: &str) -> bool {
    (12..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f3a4b5c-6d7e-4f80-91a2-b3c4d5e6f708";
    const UID_: &str = "0f3a4b5c_6d7e_4f80_91a2_b3c4d5e6f708";
    const CID: &str = "4c2b0c6f0d8a5bcf27d1e9d4b0f3f9a36f5e2d1c0b9a8f7e6d5c4b3a2f1e0d9c";
    const SANDBOX: &str = "9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a1f0e9d8c";
    const STATIC_UID: &str = "6a3e4c2f0b9d8e7f6a5b4c3d2e1f0a9b";

    fn expect(path: &str, uid: &str, container: Option<(&str, &str)>) {
        let got = parse(Path::new(path));
        let want = Some(PodCgroup {
            pod_uid: uid.to_owned(),
            container: container.map(|(id, runtime)| Container {
                id: id.to_owned(),
                runtime: match runtime {
                    "containerd" => "containerd",
                    "crio" => "crio",
                    "crio-conmon" => "crio-conmon",
                    "docker" => "docker",
                    _ => "unknown",
                },
            }),
        });
        assert_eq!(got, want, "{path}");
    }

    #[test]
    fn systemd_driver_paths() {
        let cases: Vec<(String, Option<(&str, &str)>)> = vec![
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
                ),
                Some((CID, "containerd")),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope"
                ),
                Some((CID, "crio")),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-conmon-{CID}.scope"
                ),
                Some((CID, "crio-conmon")),
            ),
            // Guaranteed QoS: directly under kubepods.slice.
            (
                format!("/kubepods.slice/kubepods-pod{UID_}.slice/docker-{CID}.scope"),
                Some((CID, "docker")),
            ),
            // Relative to kubepods.slice, the agent's default --cgroup.
            (
                format!(
                    "/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"
                ),
                Some((CID, "containerd")),
            ),
            (
                format!("/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope"),
                Some((CID, "containerd")),
            ),
            // Relative to the pod's own QoS slice, and without a leading slash.
            (
                format!("kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"),
                Some((CID, "containerd")),
            ),
            // The pod-level cgroup (no container).
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
                ),
                None,
            ),
            // The sandbox (pause) container is a container of the pod like any other.
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{SANDBOX}.scope"
                ),
                Some((SANDBOX, "containerd")),
            ),
            // A cgroup the container made below its own scope still belongs to that container.
            (
                format!(
                    "/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope/init.scope"
                ),
                Some((CID, "containerd")),
            ),
        ];
        for (path, container) in cases {
            expect(&path, UID, container);
        }
    }

    #[test]
    fn cgroupfs_driver_paths() {
        let cases: Vec<(String, Option<(&str, &str)>)> = vec![
            (
                format!("/kubepods/burstable/pod{UID}/{CID}"),
                Some((CID, "unknown")),
            ),
            (
                format!("/kubepods/besteffort/pod{UID}/crio-{CID}"),
                Some((CID, "crio")),
            ),
            (format!("/kubepods/pod{UID}/{CID}"), Some((CID, "unknown"))),
            (format!("/burstable/pod{UID}/{CID}"), Some((CID, "unknown"))),
            (format!("/pod{UID}/{CID}"), Some((CID, "unknown"))),
            (format!("/kubepods/burstable/pod{UID}"), None),
            (
                format!("/kubepods/burstable/pod{UID}/{SANDBOX}"),
                Some((SANDBOX, "unknown")),
            ),
        ];
        for (path, container) in cases {
            expect(&path, UID, container);
        }
    }

    #[test]
    fn static_pods_and_upper_case() {
        expect(
            &format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC_UID}.slice/cri-containerd-{CID}.scope"
            ),
            STATIC_UID,
            Some((CID, "containerd")),
        );
        expect(&format!("/kubepods/pod{}", UID.to_uppercase()), UID, None);
    }

    #[test]
    fn non_pod_paths() {
        for path in [
            "/",
            "",
            "/kubepods.slice",
            "/kubepods.slice/kubepods-burstable.slice",
            "/kubepods-besteffort.slice",
            "/kubepods/burstable",
            "/system.slice/containerd.service",
            "/user.slice/user-1000.slice/session-3.scope",
            "/orders",
            "/pod-not-a-uid/abc",
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podnothex.slice",
            // A UUID with its dashes in the wrong places is not a pod UID.
            "/kubepods/pod0f3a4b5c6d7e-4f80-91a2-b3c4d5e6f708",
        ] {
            assert_eq!(parse(Path::new(path)), None, "{path}");
        }
    }

    #[test]
    fn unknown_container_names_keep_the_pod() {
        expect(&format!("/kubepods/pod{UID}/not-a-container"), UID, None);
        expect(
            &format!("/kubepods-pod{UID_}.slice/something.scope"),
            UID,
            None,
        );
    }
}
