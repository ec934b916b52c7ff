//! Embeds the eBPF object that `cargo xtask build` produced (path in NMI_AGENT_EBPF_OBJ). Without it, an empty
//! stand-in is embedded so `cargo build` / `cargo test` of the host crates work without the nightly toolchain; the
//! loader then refuses to start and says how to build the real thing.

use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=NMI_AGENT_EBPF_OBJ");
    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("nmi-agent-ebpf.o");
    let bytes = match env::var_os("NMI_AGENT_EBPF_OBJ") {
        Some(path) => {
            let path = PathBuf::from(path);
            println!("cargo:rerun-if-changed={}", path.display());
            fs::read(&path).unwrap_or_else(|e| panic!("NMI_AGENT_EBPF_OBJ={}: {e}", path.display()))
        }
        None => Vec::new(),
    };
    fs::write(&out, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
}
