//! The standalone bindings file from bytes: parsing and validation never panic; a refused file names a line that
//! exists; an accepted one holds only well-formed client ids, and its lookup only ever answers with the caller's own
//! cgroup or one of its ancestors.

use std::path::Path;

use nmi_agent::identity::{azure_id::is_guid, file};

/// Cgroups looked up in every accepted file: the root, the shapes the examples bind, and a deep one.
const CALLERS: [&str; 5] = [
    "/",
    "/orders",
    "/orders/api",
    "/kubepods.slice/a/b",
    "/a/b/c/d/e/f",
];

pub fn check(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match file::parse(Path::new("fuzz.yaml"), &text) {
        Ok(bindings) => {
            assert!(
                bindings.binding_count() >= bindings.cgroup_count(),
                "{} bindings over {} cgroups",
                bindings.binding_count(),
                bindings.cgroup_count()
            );
            for id in bindings.bound_client_ids() {
                assert!(
                    is_guid(&id) && id == id.to_ascii_lowercase(),
                    "accepted client id {id:?}"
                );
            }
            for caller in CALLERS {
                if let Some((bound_at, identities)) = bindings.lookup(Path::new(caller)) {
                    assert!(
                        Path::new(caller).starts_with(bound_at),
                        "{caller} matched the binding at {}",
                        bound_at.display()
                    );
                    assert!(!identities.is_empty(), "{caller} matched an empty binding");
                }
            }
        }
        Err(error) => {
            assert!(!error.to_string().is_empty(), "an error without a message");
            // YAML ends a line at `\n`, `\r\n` or a lone `\r`.
            let lines = text.replace("\r\n", "\n").split(['\n', '\r']).count();
            if let Some(line) = error.line() {
                assert!(
                    line >= 1 && line as usize <= lines + 1,
                    "error on line {line} of a {lines}-line file: {error}"
                );
            }
        }
    }
}
