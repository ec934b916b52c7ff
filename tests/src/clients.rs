//! Unchanged Azure SDK callers run inside a pod: the Python `azure-identity` script (`tests/clients/python_token.py`)
//! and the Rust `azure_identity` one (`nmi-rust-client`). Both print one JSON line, read here as [`ClientOutput`];
//! and the emulator's tokens are decoded with [`jwt_claims`].

use std::path::PathBuf;
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;

use crate::topology::Pod;

/// What a client printed.
#[derive(Clone, Debug, Deserialize)]
pub struct ClientOutput {
    pub ok: bool,
    pub token: Option<String>,
    pub expires_on: Option<Value>,
    /// The exception class (Python) or error kind (Rust) when `ok` is false.
    pub error: Option<String>,
    pub message: Option<String>,
    pub elapsed_ms: Option<f64>,
}

impl ClientOutput {
    /// The claims of the token it got; panics (with the output) if it got none.
    pub fn claims(&self) -> Value {
        let token = self
            .token
            .as_deref()
            .filter(|_| self.ok)
            .unwrap_or_else(|| panic!("client got no token: {self:?}"));
        jwt_claims(token)
    }
}

/// The claims (middle part) of a JWT, as JSON.
pub fn jwt_claims(jwt: &str) -> Value {
    let payload = jwt
        .split('.')
        .nth(1)
        .unwrap_or_else(|| panic!("not a JWT: {jwt:?}"));
    crate::imds_emulator::jwt_claims(jwt)
        .unwrap_or_else(|| panic!("JWT payload is not base64url JSON: {payload:?}"))
}

/// The venv's python with the pinned Azure SDK: `$NMI_E2E_PYTHON` (set by `cargo xtask test`), else the venv xtask
/// keeps in `target/pyenv`. There is no fallback to a system python: its azure-identity version would be whatever
/// happens to be installed.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("NMI_E2E_PYTHON").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv/bin/python");
    if venv.is_file() {
        return venv;
    }
    panic!(
        "NMI_E2E_PYTHON is not set and {} does not exist: run the end-to-end tests with `cargo xtask test` (it \
         creates that venv from tests/clients/requirements.txt and sets NMI_E2E_PYTHON)",
        venv.display()
    )
}

/// `tests/clients/python_token.py`.
pub fn python_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients/python_token.py")
}

/// Runs the Python client in `pod`: `ManagedIdentityCredential()` (or `(client_id=...)`) and
/// `get_token("https://vault.azure.net/.default")`.
pub fn python_token(pod: &Pod, client_id: Option<&str>) -> ClientOutput {
    let mut cmd = pod.command(python());
    cmd.arg(python_script());
    if let Some(id) = client_id {
        cmd.arg(id);
    }
    run_client(cmd)
}

/// Runs `nmi-rust-client` (the `azure_identity` crate's `ManagedIdentityCredential`) in `pod`.
pub fn rust_token(pod: &Pod, client_id: Option<&str>) -> ClientOutput {
    let mut cmd = pod.command(crate::probe::package_bin("nmi-rust-client"));
    if let Some(id) = client_id {
        cmd.arg(id);
    }
    run_client(cmd)
}

/// A client must see no Azure or proxy settings: it is "unchanged" only if it finds IMDS on its own. So the
/// environment is cleared down to what a process needs to start.
fn run_client(mut cmd: Command) -> ClientOutput {
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", std::env::temp_dir())
        .env("LANG", "C.UTF-8");
    let out = crate::process::run_ok(&mut cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| {
            panic!(
                "{cmd:?} printed no JSON line:\nstdout: {stdout}\nstderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{cmd:?}: bad output line {line:?}: {e}"))
}
