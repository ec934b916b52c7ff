use std::{collections::BTreeMap, io::Write as _};

use super::*;

fn command() -> GuardCommand {
    GuardCommand {
        cgroup: PathBuf::from("/sys/fs/cgroup/kubepods.slice"),
        listen: "10.0.0.4:2579".parse().expect("addr"),
        pin_dir: PathBuf::from("/sys/fs/bpf/nmi-agent"),
        imds_device: None,
    }
}

#[test]
fn a_named_imds_device_goes_into_the_unit_and_an_unquotable_one_is_refused() {
    let named = GuardCommand {
        imds_device: Some("eth0".into()),
        ..command()
    };
    assert!(
        named
            .exec_start()
            .is_ok_and(|line| line.ends_with(" --imds-device eth0")),
        "{:?}",
        named.exec_start()
    );
    for bad in ["", "eth0 --cgroup /", "$DEV", "eth%i"] {
        let odd = GuardCommand {
            imds_device: Some(bad.into()),
            ..command()
        };
        assert!(odd.exec_start().is_err(), "{bad:?}");
    }
}

/// Every path under `root` with its content (files), target (links) or nothing (directories).
fn tree(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("ls").flatten() {
            let path = entry.path();
            let rel = path.strip_prefix(root).expect("under root").to_path_buf();
            let kind = entry.file_type().expect("type");
            let value = if kind.is_symlink() {
                format!("-> {}", fs::read_link(&path).expect("readlink").display())
            } else if kind.is_dir() {
                dirs.push(path);
                "dir".into()
            } else {
                String::from_utf8_lossy(&fs::read(&path).expect("read")).into_owned()
            };
            out.insert(rel, value);
        }
    }
    out
}

/// A service unit systemd-analyze accepts once `install` has put the binary it names in place.
fn stub_service() -> String {
    format!("[Service]\nExecStart=/{BINARY}\n")
}

fn host_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    // As on a host: /opt is there, /opt/nmi-agent is not.
    for dir in [UNIT_DIR, "opt"] {
        fs::create_dir_all(root.path().join(dir)).expect("mkdir");
    }
    // Someone else's units and enable link in the same directories: they must survive install and uninstall.
    let units = root.path().join(UNIT_DIR);
    fs::write(units.join("kubelet.service"), "[Service]\n").expect("write");
    fs::write(units.join("other.service"), stub_service()).expect("write");
    fs::create_dir_all(units.join("kubelet.service.wants")).expect("mkdir");
    symlink(
        "/etc/systemd/system/other.service",
        units.join("kubelet.service.wants/other.service"),
    )
    .expect("symlink");
    root
}

#[test]
fn the_unit_runs_the_guard_with_the_resolved_values_before_the_kubelet_and_the_runtime() {
    let text = render(&command(), KubeletDependency::Required).expect("render");
    assert!(text.starts_with(MARKER), "{text}");
    for line in [
        "ExecStart=/opt/nmi-agent/bin/nmi-agent guard --cgroup /sys/fs/cgroup/kubepods.slice --listen 10.0.0.4:2579 --pin-dir /sys/fs/bpf/nmi-agent",
        "Type=oneshot",
        "RemainAfterExit=yes",
        "Before=kubelet.service containerd.service",
        "After=sys-fs-bpf.mount network-online.target",
        "Wants=network-online.target",
        "RequiredBy=kubelet.service",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    let wanted = render(&command(), KubeletDependency::Wanted).expect("render");
    assert!(
        wanted.lines().any(|l| l == "WantedBy=kubelet.service"),
        "{wanted}"
    );
    assert!(!wanted.contains("RequiredBy"), "{wanted}");
}

#[test]
fn paths_that_would_need_quoting_in_exec_start_are_refused() {
    for bad in [
        "/sys/fs/cgroup/kube pods",
        "/sys/fs/cgroup/%n",
        "/sys/fs/cgroup/$X",
        "kubepods.slice",
    ] {
        let cmd = GuardCommand {
            cgroup: PathBuf::from(bad),
            ..command()
        };
        let err = render(&cmd, KubeletDependency::Required).expect_err(bad);
        assert!(
            matches!(
                err,
                UnitError::Unquotable {
                    what: "--cgroup",
                    ..
                }
            ),
            "{bad}: {err}"
        );
    }
}

#[test]
fn install_writes_binary_unit_and_enable_link_and_remove_takes_exactly_those_away() {
    let root = host_root();
    let before = tree(root.path());
    let binary = root.path().join("agent-binary");
    fs::write(&binary, b"\x7fELF stand-in").expect("write");
    let before_with_binary = tree(root.path());

    let installed = install(
        root.path(),
        &binary,
        &command(),
        KubeletDependency::Required,
    )
    .expect("install");
    let after = tree(root.path());
    let added: Vec<&PathBuf> = after
        .keys()
        .filter(|p| !before_with_binary.contains_key(*p))
        .collect();
    assert_eq!(
        added,
        [
            "etc/systemd/system/kubelet.service.requires",
            "etc/systemd/system/kubelet.service.requires/nmi-agent-guard.service",
            "etc/systemd/system/nmi-agent-guard.service",
            "opt/nmi-agent",
            "opt/nmi-agent/bin",
            "opt/nmi-agent/bin/nmi-agent",
        ]
        .iter()
        .map(PathBuf::from)
        .collect::<Vec<_>>()
        .iter()
        .collect::<Vec<_>>()
    );
    assert_eq!(installed.paths.len(), 3);
    assert_eq!(
        after[Path::new("etc/systemd/system/kubelet.service.requires/nmi-agent-guard.service")],
        "-> /etc/systemd/system/nmi-agent-guard.service"
    );
    assert_eq!(after[Path::new(BINARY)], "\x7fELF stand-in");
    let mode = fs::metadata(root.path().join(BINARY))
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);

    // Idempotent, and switching the dependency kind leaves only the new link.
    install(
        root.path(),
        &binary,
        &command(),
        KubeletDependency::Required,
    )
    .expect("again");
    assert_eq!(
        tree(root.path()),
        after,
        "a second install changed something"
    );
    install(root.path(), &binary, &command(), KubeletDependency::Wanted).expect("wanted");
    let wanted = tree(root.path());
    assert!(!wanted.contains_key(Path::new("etc/systemd/system/kubelet.service.requires")));
    assert!(wanted.contains_key(Path::new(
        "etc/systemd/system/kubelet.service.wants/nmi-agent-guard.service"
    )));

    fs::remove_file(&binary).expect("rm");
    let removed = remove(root.path()).expect("remove");
    assert_eq!(removed.len(), 3, "{removed:?}");
    assert_eq!(
        tree(root.path()),
        before,
        "uninstall did not restore the host root"
    );
    assert!(remove(root.path()).expect("remove again").is_empty());
}

#[test]
fn remove_leaves_a_unit_of_the_same_name_that_install_did_not_write() {
    let root = host_root();
    let unit = root.path().join(UNIT_DIR).join(UNIT_NAME);
    fs::write(&unit, "[Unit]\nDescription=an operator's own\n").expect("write");
    let before = tree(root.path());
    assert!(remove(root.path()).expect("remove").is_empty());
    assert_eq!(tree(root.path()), before);
}

#[test]
fn install_without_the_unit_directory_says_what_to_mount() {
    let root = tempfile::tempdir().expect("tempdir");
    let err = install(
        root.path(),
        Path::new("/proc/self/exe"),
        &command(),
        KubeletDependency::Required,
    )
    .expect_err("installed without a unit directory");
    assert!(
        err.to_string()
            .contains("mount the host's /etc/systemd/system"),
        "{err}"
    );
    assert!(!root.path().join("opt").exists(), "wrote the binary anyway");
}

/// Whether this is a CI run (`CI` is `true` or `1`), where a missing tool fails a test instead of skipping it.
fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// `program` on PATH; without it the test is skipped loudly, or fails under CI (`cargo xtask test` installs it).
fn tool(program: &str, test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join(program))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            !is_ci(),
            "{test}: {program} is missing, and CI=true forbids skipping (apt-get install systemd)"
        );
        let _ = writeln!(
            std::io::stderr(),
            "\n## SKIP {test}: {program} is not installed (apt-get install systemd; `cargo xtask test` does it)\n"
        );
    }
    found
}

/// `systemd-analyze verify --root=<root> <units>`: (success, everything it printed).
fn verify(analyze: &Path, root: &Path, units: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(analyze)
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .args(units)
        .output()
        .expect("run systemd-analyze");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), printed)
}

#[test]
fn the_installed_unit_passes_systemd_analyze_verify_and_systemctl_sees_it_enabled() {
    const TEST: &str = "the_installed_unit_passes_systemd_analyze_verify";
    let (Some(analyze), Some(systemctl)) = (tool("systemd-analyze", TEST), tool("systemctl", TEST))
    else {
        return;
    };
    let root = host_root();
    let units = root.path().join(UNIT_DIR);
    // Stubs for what the unit names and the default dependencies every service gets, so verify resolves them in a
    // root that holds nothing else.
    for target in [
        "sysinit.target",
        "basic.target",
        "shutdown.target",
        "network-online.target",
    ] {
        fs::write(units.join(target), "[Unit]\nDescription=stub\n").expect("write stub");
    }
    for service in ["kubelet.service", "containerd.service"] {
        fs::write(units.join(service), stub_service()).expect("write stub");
    }
    let before = tree(root.path());
    // Any executable does: verify checks that ExecStart= names one inside the root.
    let binary = std::env::current_exe().expect("test binary");
    install(
        root.path(),
        &binary,
        &command(),
        KubeletDependency::Required,
    )
    .expect("install");

    let (ok, printed) = verify(&analyze, root.path(), &[UNIT_NAME]);
    assert!(
        ok && printed.trim().is_empty(),
        "systemd-analyze verify:\n{printed}"
    );
    // Control: the same check sees a mistake of the kind that would otherwise go unnoticed (an ignored key).
    let broken = render(&command(), KubeletDependency::Required)
        .expect("render")
        .replace("Before=", "Befor=");
    fs::write(units.join("broken.service"), broken).expect("write");
    let (_, printed) = verify(&analyze, root.path(), &["broken.service"]);
    assert!(
        printed.contains("Befor"),
        "verify missed a misspelt key:\n{printed}"
    );
    fs::remove_file(units.join("broken.service")).expect("rm");

    let enabled = std::process::Command::new(&systemctl)
        .arg(format!("--root={}", root.path().display()))
        .args(["is-enabled", UNIT_NAME])
        .output()
        .expect("run systemctl");
    assert_eq!(
        String::from_utf8_lossy(&enabled.stdout).trim(),
        "enabled",
        "systemctl is-enabled: {}",
        String::from_utf8_lossy(&enabled.stderr)
    );

    remove(root.path()).expect("remove");
    assert_eq!(
        tree(root.path()),
        before,
        "uninstall did not remove exactly what install wrote"
    );
}
