//! One run of the unchanged SDK client (tests/clients/python_keyvault.py) in a pod, and what it reported.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, ExitStatus, Stdio};
use std::thread;
use std::time::Duration;

use nmi_agent_e2e::Pod;
use nmi_agent_e2e::wait::poll;
use serde_json::Value;

use crate::setup::Paths;
use crate::signals::interrupted;

const CLIENT_TIMEOUT: Duration = Duration::from_secs(90);

/// The Key Vault emulator as a client reaches it.
pub struct Vault {
    pub url: String,
    /// The demo CA that signed its certificate.
    pub ca: PathBuf,
}

/// What one client call reported (a line of python_keyvault.py's output).
pub struct SecretRead {
    pub pod: String,
    pub identity: String,
    pub secret: String,
    pub outcome: Outcome,
    pub elapsed_ms: f64,
    /// Empty when the outcome is what the scenario expects.
    pub unexpected: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Value(String),
    Refused(u16, String),
    NoToken,
    Other(String),
}

impl Outcome {
    pub fn describe(&self) -> String {
        match self {
            Outcome::Value(v) => {
                let shown: String = v.chars().take(8).collect();
                format!("read \"{shown}…\"")
            }
            Outcome::Refused(status, code) => format!("refused {status} {code}"),
            Outcome::NoToken => "no token (CredentialUnavailableError)".into(),
            Outcome::Other(what) => what.clone(),
        }
    }
}

fn parse_read(pod: &str, identity: &str, line: &Value) -> SecretRead {
    let secret = line["secret"].as_str().unwrap_or("?").to_string();
    let outcome = if line["ok"] == true {
        Outcome::Value(line["value"].as_str().unwrap_or("").to_string())
    } else if line["error"] == "CredentialUnavailableError" {
        Outcome::NoToken
    } else if let Some(status) = line["status"].as_u64() {
        Outcome::Refused(
            status as u16,
            line["code"].as_str().unwrap_or("").to_string(),
        )
    } else {
        Outcome::Other(format!(
            "{}: {}",
            line["error"].as_str().unwrap_or("error"),
            line["message"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(80)
                .collect::<String>()
        ))
    };
    SecretRead {
        pod: pod.to_string(),
        identity: identity.to_string(),
        secret,
        outcome,
        elapsed_ms: line["elapsed_ms"].as_f64().unwrap_or(f64::NAN),
        unexpected: String::new(),
    }
}

/// Runs the unchanged SDK client in `pod`: a fresh process, with only the environment a pod spec would give it
/// (no proxy settings or anything else of the node's), the vault's CA trusted through the standard variables.
pub fn run(
    paths: &Paths,
    pod: &Pod,
    identity: &str,
    vault: &Vault,
    secrets: &[&str],
) -> Result<Vec<SecretRead>, String> {
    if interrupted() {
        return Err("interrupted".into());
    }
    let mut cmd = pod.command(&paths.python);
    cmd.arg(paths.tests_dir.join("clients/python_keyvault.py"))
        .arg(&vault.url)
        .args(secrets)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", "/tmp")
        .env("LANG", "C.UTF-8")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("REQUESTS_CA_BUNDLE", &vault.ca)
        .env("SSL_CERT_FILE", &vault.ca)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("start the client in {}: {e}", pod.label))?;
    let (status, stdout, stderr) = wait(&mut child, &pod.label)?;
    if !status.success() {
        return Err(format!(
            "the client in {} failed ({status}):\n{}",
            pod.label,
            stderr.trim()
        ));
    }
    let reads: Vec<SecretRead> = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str::<Value>(l)
                .map(|v| parse_read(&pod.label, identity, &v))
                .map_err(|e| format!("client output {l:?}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    if reads.len() != secrets.len() {
        return Err(format!(
            "the client in {} reported {} reads for {} secrets:\n{stdout}{stderr}",
            pod.label,
            reads.len(),
            secrets.len()
        ));
    }
    Ok(reads)
}

/// Waits up to [`CLIENT_TIMEOUT`] for the client in `pod` to exit (killing it after that); its status, stdout and
/// stderr.
fn wait(child: &mut Child, pod: &str) -> Result<(ExitStatus, String, String), String> {
    // Read both pipes on threads so a chatty client cannot block on a full pipe while we wait.
    let pipe = |mut r: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let stdout = pipe(Box::new(child.stdout.take().expect("piped")));
    let stderr = pipe(Box::new(child.stderr.take().expect("piped")));
    let exited = poll(CLIENT_TIMEOUT, Duration::from_millis(20), || {
        child.try_wait().transpose()
    });
    let Some(status) = exited else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!(
            "the client in {pod} did not finish within {CLIENT_TIMEOUT:?}"
        ));
    };
    let status = status.map_err(|e| format!("wait: {e}"))?;
    Ok((
        status,
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    ))
}
