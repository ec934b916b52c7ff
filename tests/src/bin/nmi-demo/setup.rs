//! What the demo reads before it starts anything: where its files are, the identities of the bindings file, and the
//! secrets the Key Vault emulator holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nmi_agent_e2e::probe;
use serde_json::Value;

/// Everything the demo reads, found from the environment xtask sets.
pub struct Paths {
    pub tests_dir: PathBuf,
    pub python: PathBuf,
    pub imds_emulator: PathBuf,
}

impl Paths {
    pub fn from_env() -> Result<Paths, String> {
        let tests_dir = std::env::var_os("NMI_DEMO_TESTS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
        if std::env::var_os("NMI_AGENT_BIN").is_none_or(|p| !Path::new(&p).is_file()) {
            return Err(
                "NMI_AGENT_BIN does not name the agent binary: run the demo with `cargo xtask demo`, which \
                 builds the agent with its eBPF programs and sets it"
                    .into(),
            );
        }
        let python = match std::env::var_os("NMI_E2E_PYTHON") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => tests_dir.join("../target/pyenv/bin/python"),
        };
        if !python.is_file() {
            return Err(format!(
                "no Python with the Azure SDK at {}: run the demo with `cargo xtask demo`, which creates it",
                python.display()
            ));
        }
        for file in [
            "demo/bindings.yaml",
            "demo/keyvault_emulator.py",
            "demo/access-policy.json",
            "demo/secrets.json",
            "clients/python_keyvault.py",
        ] {
            if !tests_dir.join(file).is_file() {
                return Err(format!(
                    "{} is missing (NMI_DEMO_TESTS_DIR must be the repository's tests/ directory)",
                    tests_dir.join(file).display()
                ));
            }
        }
        Ok(Paths {
            imds_emulator: probe::package_bin("imds-emulator"),
            python,
            tests_dir,
        })
    }

    pub fn demo(&self, file: &str) -> PathBuf {
        self.tests_dir.join("demo").join(file)
    }
}

/// `(name, clientID)` of each identity in the bindings file, so the IMDS emulator knows the same identities. The
/// file's format is the agent's (docs/configuration.md); this reads only the two keys it needs.
pub fn identities(bindings: &Path) -> Result<Vec<(String, String)>, String> {
    let text = std::fs::read_to_string(bindings)
        .map_err(|e| format!("read {}: {e}", bindings.display()))?;
    let mut out = Vec::new();
    let mut name = None;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let line = line.strip_prefix("- ").unwrap_or(line).trim();
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim().trim_matches('"').to_string();
        match key.trim() {
            "name" => name = Some(value),
            "clientID" => {
                let name = name
                    .take()
                    .ok_or_else(|| format!("{}: clientID before name", bindings.display()))?;
                out.push((name, value));
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The secrets the Key Vault emulator holds, by name (tests/demo/secrets.json).
pub struct Secrets(BTreeMap<String, Value>);

impl Secrets {
    pub fn load(paths: &Paths) -> Result<Secrets, String> {
        let text = std::fs::read_to_string(paths.demo("secrets.json"))
            .map_err(|e| format!("secrets.json: {e}"))?;
        let secrets = serde_json::from_str(&text).map_err(|e| format!("secrets.json: {e}"))?;
        Ok(Secrets(secrets))
    }

    /// The value of secret `name`; empty if there is none.
    pub fn value(&self, name: &str) -> String {
        self.0
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    }
}
