use std::path::Path;

use super::*;

fn args(cgroup: Option<&Path>) -> InterceptArgs {
    InterceptArgs {
        cgroup: cgroup.map(Path::to_path_buf),
        listen: None,
        node_ip: None,
        pin_dir: PathBuf::from(crate::cli::DEFAULT_PIN_DIR),
        imds_device: None,
        max_sockets_per_cgroup: nmi_agent_ebpf::abi::DEFAULT_SOCKETS_PER_CGROUP,
    }
}

#[test]
fn a_missing_cgroup_is_created_under_the_mount_and_an_existing_one_is_taken_as_it_is() {
    // A plain directory stands in for the cgroup v2 mount: creating the cgroup is a mkdir either way.
    let mount = tempfile::tempdir().expect("tempdir");
    let mount = fs::canonicalize(mount.path()).expect("canonical");
    let kubepods = mount.join("kubepods.slice");

    let err = intercepted_cgroup(&args(Some(&kubepods)), &mount, false)
        .expect_err("install-guard accepted a cgroup that does not exist");
    assert!(
        !kubepods.exists(),
        "created without being asked to: {err:#}"
    );

    assert_eq!(
        intercepted_cgroup(&args(Some(&kubepods)), &mount, true).expect("guard"),
        kubepods
    );
    assert!(kubepods.is_dir(), "not created");
    // Again, now that it exists: the same directory, nothing else created.
    assert_eq!(
        intercepted_cgroup(&args(Some(&kubepods)), &mount, true).expect("guard again"),
        kubepods
    );
    assert_eq!(fs::read_dir(&mount).expect("ls").count(), 1);
}

#[test]
fn the_guard_never_creates_or_intercepts_outside_the_mount_nor_the_root_cgroup() {
    let root = tempfile::tempdir().expect("tempdir");
    let root = fs::canonicalize(root.path()).expect("canonical");
    let mount = root.join("cgroup");
    fs::create_dir(&mount).expect("mkdir");
    for outside in [
        root.join("elsewhere"),
        mount.join("kubepods/../../escaped"),
        PathBuf::from("relative/kubepods"),
    ] {
        let err = intercepted_cgroup(&args(Some(&outside)), &mount, true)
            .expect_err(&format!("created {}", outside.display()));
        assert!(err.to_string().contains("not a directory under"), "{err:#}");
    }
    assert!(!root.join("elsewhere").exists() && !root.join("escaped").exists());

    let err = intercepted_cgroup(&args(Some(&mount)), &mount, true).expect_err("took the root");
    assert!(err.to_string().contains("root cgroup"), "{err:#}");
}

#[test]
fn without_cgroup_and_without_a_pods_cgroup_the_message_says_to_pass_one() {
    let mount = tempfile::tempdir().expect("tempdir");
    let err = intercepted_cgroup(&args(None), mount.path(), true).expect_err("found a pods cgroup");
    let text = format!("{err:#}");
    assert!(
        text.contains("--cgroup") && text.contains("install-guard"),
        "{text}"
    );
}
