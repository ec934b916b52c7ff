//! Properties that nmi-agent's input parsers and its HTTP front door must hold for any input, one module per
//! cargo-fuzz target (`fuzz_targets/<name>.rs` calls `<name>::check`). Each `check` panics when its property is
//! broken; libFuzzer reports the panic as a crash, and `regressions` replays every saved crash with `cargo test`.
//!
//! - [`path`]: request path normalisation and routing (`imds::path`).
//! - [`token_query`]: the token request's query string and its `Metadata` / `X-Forwarded-For` headers.
//! - [`bindings_file`]: the standalone bindings file, parsed and validated from bytes.
//! - [`pod_cgroup`]: cgroup path -> pod UID and container.
//! - [`mountinfo`]: finding the cgroup v2 mount in `/proc/self/mountinfo`.
//! - [`front_door`]: arbitrary bytes on an attested connection to `server::serve`.

pub mod bindings_file;
pub mod front_door;
pub mod mountinfo;
pub mod path;
pub mod pod_cgroup;
pub mod token_query;

/// A target's property: panics when `data` breaks it.
pub type Check = fn(&[u8]);

/// Every target, by the name of its `fuzz_targets/` file and corpus directory.
pub const TARGETS: [(&str, Check); 6] = [
    ("path", path::check),
    ("token_query", token_query::check),
    ("bindings_file", bindings_file::check),
    ("pod_cgroup", pod_cgroup::check),
    ("mountinfo", mountinfo::check),
    ("front_door", front_door::check),
];

#[cfg(test)]
mod regressions;
