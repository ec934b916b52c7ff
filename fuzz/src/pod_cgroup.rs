//! cgroup path -> pod UID. Parsing never panics; a UID it reads is canonical and spelled in the path; and cgroups a
//! workload creates below its own (whatever it names them, even after another pod) never change whose they are.

use std::{ffi::OsStr, os::unix::ffi::OsStrExt, path::Path};

use nmi_agent::identity::{azure_id::is_guid, podcgroup};

/// Names a container could give cgroups it creates below its own: another pod's, in both drivers' styles, and a
/// container scope.
const NESTED: [&str; 4] = [
    "pod11111111-2222-4333-8444-555555555555",
    "kubepods-besteffort-pod11111111_2222_4333_8444_555555555555.slice",
    "cri-containerd-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.scope",
    "0123456789abcdef0123456789abcdef",
];

const RUNTIMES: [&str; 5] = ["containerd", "crio", "crio-conmon", "docker", "unknown"];

pub fn check(data: &[u8]) {
    let path = Path::new(OsStr::from_bytes(data));
    let Some(pod) = podcgroup::parse(path) else {
        return;
    };
    let uid = &pod.pod_uid;
    assert!(
        *uid == uid.to_ascii_lowercase()
            && (is_guid(uid) || (uid.len() == 32 && uid.bytes().all(|b| b.is_ascii_hexdigit()))),
        "{path:?} gave the pod UID {uid:?}"
    );
    let spelled = String::from_utf8_lossy(data).to_ascii_lowercase();
    assert!(
        spelled.contains(uid.as_str()) || spelled.contains(&uid.replace('-', "_")),
        "{path:?} gave the pod UID {uid:?}, which it does not spell"
    );
    if let Some(container) = &pod.container {
        assert!(
            (12..=128).contains(&container.id.len())
                && container.id.bytes().all(|b| b.is_ascii_hexdigit())
                && RUNTIMES.contains(&container.runtime),
            "{path:?} gave the container {container:?}"
        );
    }
    for name in NESTED {
        let nested = podcgroup::parse(&path.join(name));
        let nested = nested.as_ref().map(|n| &n.pod_uid);
        assert_eq!(
            nested,
            Some(uid),
            "creating {name} below {path:?} changed the pod"
        );
        if pod.container.is_some() {
            assert_eq!(
                podcgroup::parse(&path.join(name)).as_ref(),
                Some(&pod),
                "creating {name} below the container cgroup {path:?} changed it"
            );
        }
    }
}
