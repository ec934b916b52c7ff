//! `cargo xtask image [--pin]`: the eBPF object, a static musl `nmi-agent` with it embedded, and from those an OCI
//! image built offline with buildah (deploy/Containerfile, FROM scratch), written to target/image/nmi-agent.tar as an
//! oci-archive. Prints the manifest digest; `--pin` writes it into deploy/kustomization.yaml.
//!
//! A release pushes that very archive with its digest preserved (`skopeo copy --preserve-digests
//! oci-archive:target/image/nmi-agent.tar docker://ghcr.io/OWNER/nmi-agent:vX.Y.Z`), so the pinned digest is the one
//! in the registry. Timestamps are fixed (`--timestamp 0`), so the digest depends on the files alone.

use std::{
    fs,
    io::Read,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::{
    artifacts,
    cmd::{self, announce},
    ebpf,
    host::Apt,
    toolchain,
};

const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
const CONTAINERFILE: &str = "deploy/Containerfile";
const KUSTOMIZATION: &str = "deploy/kustomization.yaml";
/// The local name of the image inside buildah's store (never pushed anywhere by xtask).
const LOCAL_NAME: &str = "localhost/nmi-agent:build";
/// Debian's bundle of the Mozilla roots: HTTPS to Entra ID for service-principal identities.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

pub fn image(root: &Path, pin: bool) -> Result<()> {
    let started = Instant::now();
    let mut apt = Apt::default();
    let target_dir = artifacts::target_dir(root);
    let out_dir = target_dir.join("image");

    let phase = Instant::now();
    announce(format!("checking the {} toolchain", toolchain::NIGHTLY));
    let nightly = toolchain::nightly()?;
    toolchain::ensure_rust_src(&nightly)?;
    let linker = toolchain::ensure_bpf_linker(&nightly)?;
    let ebpf_object = ebpf::build_object(root, &target_dir, &linker)?;
    announce(format!(
        "eBPF object: {} ({:.1}s)",
        ebpf_object.display(),
        phase.elapsed().as_secs_f64()
    ));

    let phase = Instant::now();
    ensure_musl_toolchain(root, &mut apt)?;
    let agent = build_static_agent(root, &target_dir, &ebpf_object)?;
    announce(format!(
        "static agent: {} ({:.1}s)",
        agent.display(),
        phase.elapsed().as_secs_f64()
    ));

    let phase = Instant::now();
    let context = stage_context(&out_dir, &agent, &mut apt)?;
    let buildah = ensure_program("buildah", "buildah", &mut apt)?;
    let archive = out_dir.join("nmi-agent.tar");
    let digest = build_image(root, &buildah, &out_dir, &context, &archive)?;
    announce(format!(
        "image: {} ({:.1}s)",
        archive.display(),
        phase.elapsed().as_secs_f64()
    ));

    if pin {
        let path = root.join(KUSTOMIZATION);
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let pinned = pin_digest(&text, &digest)
            .with_context(|| format!("cannot pin the digest in {}", path.display()))?;
        if pinned != text {
            fs::write(&path, pinned).with_context(|| format!("cannot write {}", path.display()))?;
            announce(format!("pinned {digest} in {KUSTOMIZATION}"));
        } else {
            announce(format!("{KUSTOMIZATION} already pins {digest}"));
        }
    }
    announce(format!(
        "image built in {:.1}s; digest:",
        started.elapsed().as_secs_f64()
    ));
    println!("{digest}");
    Ok(())
}

/// The musl target for the toolchain running xtask (rustup's proxies pass RUSTUP_TOOLCHAIN on), and musl-gcc for
/// the C in the dependency tree (aws-lc-sys): glibc's headers and crt objects must not end up in a musl binary.
fn ensure_musl_toolchain(root: &Path, apt: &mut Apt) -> Result<()> {
    let installed = cmd::stdout(
        Command::new("rustup")
            .args(["target", "list", "--installed"])
            .current_dir(root),
        "cannot ask rustup for the installed targets; the image build needs rustup",
    )?;
    if !installed.lines().any(|line| line.trim() == MUSL_TARGET) {
        announce(format!("rustup target add {MUSL_TARGET}"));
        cmd::run(
            Command::new("rustup")
                .args(["target", "add", MUSL_TARGET])
                .current_dir(root),
            "needs network access to static.rust-lang.org, or run `rustup target add x86_64-unknown-linux-musl`",
        )?;
    }
    ensure_program("musl-gcc", "musl-tools", apt)?;
    Ok(())
}

fn ensure_program(program: &str, package: &str, apt: &mut Apt) -> Result<PathBuf> {
    if let Some(path) = cmd::find_program(program) {
        return Ok(path);
    }
    apt.install(&[package])?;
    cmd::find_program(program).with_context(|| {
        format!(
            "`{program}` is still missing after installing {package}; check the apt output above"
        )
    })
}

fn build_static_agent(root: &Path, target_dir: &Path, ebpf_object: &Path) -> Result<PathBuf> {
    announce(format!("building nmi-agent for {MUSL_TARGET} (static)"));
    let mut build = cmd::cargo();
    build
        .args([
            "build",
            "--release",
            "--package",
            "nmi-agent",
            "--bin",
            "nmi-agent",
            "--target",
            MUSL_TARGET,
        ])
        .current_dir(root)
        .env("NMI_AGENT_EBPF_OBJ", ebpf_object)
        .env("CC_x86_64_unknown_linux_musl", "musl-gcc");
    cmd::run(
        &mut build,
        "the static build failed; a C compile error in a -sys crate usually means musl-gcc (Debian: musl-tools) is \
         missing or a C dependency needs more than musl's headers",
    )?;
    let agent = target_dir.join(MUSL_TARGET).join("release/nmi-agent");
    let bytes = fs::read(&agent).with_context(|| format!("cannot read {}", agent.display()))?;
    if has_interpreter(&bytes)? {
        bail!(
            "{} asks for a dynamic loader (PT_INTERP); the image is FROM scratch, so it must be static",
            agent.display()
        );
    }
    Ok(agent)
}

/// True when the ELF64 little-endian file has a PT_INTERP program header, i.e. needs a dynamic loader.
fn has_interpreter(elf: &[u8]) -> Result<bool> {
    const PT_INTERP: u32 = 3;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        bail!("not a 64-bit little-endian ELF file");
    }
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]);
    let phoff = u64::from_le_bytes(elf[32..40].try_into()?) as usize;
    let (phentsize, phnum) = (usize::from(u16_at(54)), usize::from(u16_at(56)));
    for index in 0..phnum {
        let at = phoff + index * phentsize;
        let header = elf
            .get(at..at + 4)
            .context("ELF program header table is truncated")?;
        if u32::from_le_bytes(header.try_into()?) == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

/// target/image/context: exactly what the Containerfile copies, nothing else from the workspace.
fn stage_context(out_dir: &Path, agent: &Path, apt: &mut Apt) -> Result<PathBuf> {
    let context = out_dir.join("context");
    if context.exists() {
        fs::remove_dir_all(&context)
            .with_context(|| format!("cannot clear {}", context.display()))?;
    }
    fs::create_dir_all(&context).with_context(|| format!("cannot create {}", context.display()))?;

    // Debug info stays out of the image (symbols stay, for readable backtraces).
    let staged = context.join("nmi-agent");
    let strip = ensure_program("objcopy", "binutils", apt)?;
    cmd::run(
        Command::new(strip)
            .arg("--strip-debug")
            .arg(agent)
            .arg(&staged),
        "objcopy could not strip the agent binary",
    )?;

    if !Path::new(CA_BUNDLE).is_file() {
        apt.install(&["ca-certificates"])?;
    }
    fs::copy(CA_BUNDLE, context.join("ca-certificates.crt"))
        .with_context(|| format!("cannot copy {CA_BUNDLE} (Debian: ca-certificates)"))?;
    Ok(context)
}

/// Builds with a private store under target/image (vfs: works in any container, needs no kernel overlay support),
/// writes the oci-archive, and returns the manifest digest read back from the archive itself.
fn build_image(
    root: &Path,
    buildah: &Path,
    out_dir: &Path,
    context: &Path,
    archive: &Path,
) -> Result<String> {
    let store = |command: &mut Command| {
        command
            .arg("--root")
            .arg(out_dir.join("storage"))
            .arg("--runroot")
            .arg(out_dir.join("run"))
            .args(["--storage-driver", "vfs"]);
    };

    announce("buildah build (offline: FROM scratch, nothing is pulled)");
    let mut build = Command::new(buildah);
    store(&mut build);
    build
        .args([
            "build",
            "--quiet",
            "--isolation",
            "chroot",
            "--pull=never",
            "--format",
            "oci",
            // Reproducible: fixed timestamps, no buildah version label, no history with build times.
            "--timestamp",
            "0",
            "--identity-label=false",
            "--omit-history",
            "--file",
        ])
        .arg(root.join(CONTAINERFILE))
        .args(["--tag", LOCAL_NAME])
        .arg(context);
    // stdout is only the image id, which is not the digest that matters: keep it off the terminal.
    cmd::stdout(&mut build, "buildah could not build the image")?;

    if archive.exists() {
        fs::remove_file(archive)
            .with_context(|| format!("cannot replace {}", archive.display()))?;
    }
    let digest_file = out_dir.join("digest");
    let version = env!("CARGO_PKG_VERSION");
    let mut push = Command::new(buildah);
    store(&mut push);
    push.args(["push", "--quiet", "--format", "oci", "--digestfile"])
        .arg(&digest_file)
        .arg(LOCAL_NAME)
        .arg(format!(
            "oci-archive:{}:nmi-agent:{version}",
            archive.display()
        ));
    cmd::run(&mut push, "buildah could not write the oci-archive")?;

    let digest = archive_digest(archive)?;
    let reported = fs::read_to_string(&digest_file)
        .with_context(|| format!("cannot read {}", digest_file.display()))?;
    if reported.trim() != digest {
        bail!(
            "buildah reported digest {} but {} holds {digest}",
            reported.trim(),
            archive.display()
        );
    }
    Ok(digest)
}

/// The manifest digest named by the archive's index.json: what a registry will serve for this image.
fn archive_digest(archive: &Path) -> Result<String> {
    let mut bytes = Vec::new();
    fs::File::open(archive)
        .and_then(|mut file| file.read_to_end(&mut bytes))
        .with_context(|| format!("cannot read {}", archive.display()))?;
    let index = tar_member(&bytes, "index.json")
        .with_context(|| format!("{} has no index.json", archive.display()))?;
    let index = std::str::from_utf8(index).context("index.json is not UTF-8")?;
    manifest_digest(index)
}

/// The contents of the member `name` of an uncompressed (ustar) tar.
fn tar_member<'a>(tar: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let mut at = 0;
    while at + 512 <= tar.len() {
        let header = &tar[at..at + 512];
        if header.iter().all(|byte| *byte == 0) {
            return None;
        }
        let field = |range: std::ops::Range<usize>| {
            let raw = &header[range];
            let end = raw.iter().position(|byte| *byte == 0).unwrap_or(raw.len());
            std::str::from_utf8(&raw[..end]).ok()
        };
        let member = field(0..100)?;
        let size = usize::from_str_radix(field(124..136)?.trim(), 8).ok()?;
        let data = at + 512;
        if member.trim_start_matches("./") == name {
            return tar.get(data..data + size);
        }
        at = data + size.div_ceil(512) * 512;
    }
    None
}

/// `manifests[0].digest` of an OCI image index, checked to be one sha256 digest. A plain scan rather than a JSON
/// parser: xtask has no JSON dependency, and buildah writes exactly one manifest here.
fn manifest_digest(index_json: &str) -> Result<String> {
    let digests: Vec<&str> = index_json
        .match_indices("\"digest\":\"")
        .map(|(at, key)| &index_json[at + key.len()..])
        .filter_map(|rest| rest.split('"').next())
        .collect();
    match digests.as_slice() {
        [one] if is_sha256_digest(one) => Ok((*one).to_owned()),
        _ => bail!("expected exactly one sha256 manifest digest in index.json, found {digests:?}"),
    }
}

fn is_sha256_digest(text: &str) -> bool {
    text.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
    })
}

/// Replaces the one `digest: sha256:...` line of the kustomization (under `images:`), keeping indentation, comments
/// and everything else as it is.
pub fn pin_digest(kustomization: &str, digest: &str) -> Result<String> {
    if !is_sha256_digest(digest) {
        bail!("{digest} is not sha256:<64 hex digits>");
    }
    let mut found = 0;
    let lines: Vec<String> = kustomization
        .split_inclusive('\n')
        .map(|line| {
            let body = line.trim_start();
            if let Some(old) = body.strip_prefix("digest:")
                && is_sha256_digest(old.trim())
            {
                found += 1;
                let indent = &line[..line.len() - body.len()];
                let newline = if line.ends_with('\n') { "\n" } else { "" };
                format!("{indent}digest: {digest}{newline}")
            } else {
                line.to_owned()
            }
        })
        .collect();
    if found != 1 {
        bail!(
            "expected exactly one `digest: sha256:...` line (in `images:`), found {found}; fix the file by hand"
        );
    }
    Ok(lines.concat())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    const NEW: &str = "sha256:5011e9d377afae09152f56d7823fdb6166c118c8c1eb2362393a5521d2cd8bca";

    #[test]
    fn pinning_rewrites_only_the_digest_line() {
        let text = format!(
            "# digest: keep this comment\nimages:\n  - name: ghcr.io/OWNER/nmi-agent\n    digest: {OLD}\nresources: []\n"
        );
        let pinned = pin_digest(&text, NEW).unwrap();
        assert_eq!(pinned, text.replace(OLD, NEW));
        assert_eq!(pin_digest(&pinned, NEW).unwrap(), pinned);
    }

    #[test]
    fn pinning_refuses_ambiguous_files_and_bad_digests() {
        let two = format!("images:\n  - digest: {OLD}\n  - digest: {OLD}\n");
        assert!(pin_digest(&two, NEW).is_err());
        assert!(pin_digest("images: []\n", NEW).is_err());
        assert!(pin_digest(&format!("digest: {OLD}\n"), "sha256:ABC").is_err());
    }

    #[test]
    fn reads_the_manifest_digest_from_an_oci_index() {
        let index = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{NEW}","size":502}}]}}"#
        );
        assert_eq!(manifest_digest(&index).unwrap(), NEW);
        assert!(manifest_digest(r#"{"manifests":[]}"#).is_err());
    }

    #[test]
    fn finds_a_member_in_a_ustar_archive() {
        let mut tar = vec![0u8; 512];
        tar[..10].copy_from_slice(b"index.json");
        tar[124..135].copy_from_slice(b"00000000002");
        tar.extend_from_slice(b"{}");
        tar.resize(2048, 0);
        assert_eq!(tar_member(&tar, "index.json"), Some(&b"{}"[..]));
        assert_eq!(tar_member(&tar, "oci-layout"), None);
    }

    #[test]
    fn tells_static_from_dynamic_elf() {
        // A minimal ELF64 LE header with one program header of the given type.
        let elf = |p_type: u32| {
            let mut bytes = vec![0u8; 64 + 56];
            bytes[..6].copy_from_slice(b"\x7fELF\x02\x01");
            bytes[32..40].copy_from_slice(&64u64.to_le_bytes());
            bytes[54..56].copy_from_slice(&56u16.to_le_bytes());
            bytes[56..58].copy_from_slice(&1u16.to_le_bytes());
            bytes[64..68].copy_from_slice(&p_type.to_le_bytes());
            bytes
        };
        assert!(has_interpreter(&elf(3)).unwrap());
        assert!(!has_interpreter(&elf(1)).unwrap());
        assert!(has_interpreter(b"not an elf").is_err());
    }
}
