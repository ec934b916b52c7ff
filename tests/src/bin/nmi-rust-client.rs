//! `nmi-rust-client [CLIENT_ID]`: an unchanged Rust Azure SDK caller, the twin of `tests/clients/python_token.py`.
//! `azure_identity::ManagedIdentityCredential` with default options (or the given user-assigned client id) asks for
//! a `https://vault.azure.net/.default` token and prints one JSON line: `{"ok": true, "token": .., "expires_on": ..}`
//! or `{"ok": false, "error": <error kind>, "message": ..}`, plus `elapsed_ms`. Exit status 0 either way: the outcome
//! is the measurement.

use std::time::Instant;

use azure_core::credentials::TokenCredential;
use azure_identity::{ManagedIdentityCredential, ManagedIdentityCredentialOptions, UserAssignedId};
use clap::Parser;
use serde_json::json;

const SCOPE: &str = "https://vault.azure.net/.default";

/// Gets a Key Vault token with `ManagedIdentityCredential` and prints the outcome as one JSON line.
#[derive(Parser)]
#[command(name = "nmi-rust-client")]
struct Cli {
    /// The user-assigned identity to ask for; none (or empty) asks for the default one.
    client_id: Option<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let options = Cli::parse()
        .client_id
        .filter(|id| !id.is_empty())
        .map(|id| ManagedIdentityCredentialOptions {
            user_assigned_id: Some(UserAssignedId::ClientId(id)),
            ..Default::default()
        });
    let started = Instant::now();
    let result = match ManagedIdentityCredential::new(options) {
        Ok(credential) => credential.get_token(&[SCOPE], None).await,
        Err(e) => Err(e),
    };
    let mut out = match result {
        Ok(token) => json!({
            "ok": true,
            "token": token.token.secret(),
            "expires_on": token.expires_on.unix_timestamp(),
        }),
        Err(e) => {
            json!({"ok": false, "error": format!("{:?}", e.kind()), "message": e.to_string()})
        }
    };
    out["elapsed_ms"] = json!(started.elapsed().as_secs_f64() * 1000.0);
    println!("{out}");
}
