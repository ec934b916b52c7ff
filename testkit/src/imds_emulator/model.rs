//! The emulator's vocabulary: the identities it knows, how it is configured, the faults a test scripts and the calls
//! it counts.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One user-assigned identity the emulated VM has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmulatedIdentity {
    pub client_id: String,
    /// The last segment of its ARM id (`xms_mirid`, `msi_res_id`).
    pub name: String,
}

impl EmulatedIdentity {
    pub fn new(client_id: impl Into<String>, name: impl Into<String>) -> Self {
        EmulatedIdentity {
            client_id: client_id.into(),
            name: name.into(),
        }
    }

    /// `CLIENT_ID[=name]`; the name defaults to the client id.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (client_id, name) = spec.split_once('=').unwrap_or((spec, spec));
        if client_id.is_empty() || name.is_empty() {
            return Err(format!("identity `{spec}`: expected CLIENT_ID[=name]"));
        }
        Ok(EmulatedIdentity::new(client_id, name))
    }

    /// The ARM resource id IMDS would know it by.
    pub fn resource_id(&self) -> String {
        format!(
            "/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/emulator/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{}",
            self.name
        )
    }
}

/// How an [`super::Emulator`] serves.
#[derive(Clone, Debug)]
pub struct EmulatorConfig {
    /// Where to listen; port 0 picks one (see [`Emulator::addr`]).
    pub listen: SocketAddr,
    pub identities: Vec<EmulatedIdentity>,
    /// The system-assigned identity, served when a request names none.
    pub system_identity: Option<EmulatedIdentity>,
    /// `expires_in` of issued tokens.
    pub token_lifetime: Duration,
    /// IMDS's per-VM throttling, when set: every metadata call takes a while, and calls beyond the capacity get 429.
    pub capacity: Option<Capacity>,
}

/// How much the emulated IMDS takes at once (the real one throttles each VM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Metadata calls (token, instance, versions) served at once; more are answered 429 and counted as throttled.
    pub in_flight: usize,
    /// How long each one takes.
    pub service_time: Duration,
}

impl EmulatorConfig {
    /// Loopback, any port, 24 h tokens (IMDS's managed-identity lifetime), no system identity.
    pub fn new(identities: Vec<EmulatedIdentity>) -> Self {
        EmulatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            identities,
            system_identity: None,
            token_lifetime: Duration::from_secs(86_400),
            capacity: None,
        }
    }
}

/// A scripted misbehaviour for one token call.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// Answer with this status (a non-200 one; 200 or none serves the token normally).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Wait this long first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// Error body; IMDS-like defaults per status when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    /// `Retry-After` seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    /// Close the connection without answering.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drop: bool,
}

impl Fault {
    pub fn status(status: u16) -> Self {
        Fault {
            status: Some(status),
            ..Fault::default()
        }
    }

    pub fn delay(ms: u64) -> Self {
        Fault {
            delay_ms: Some(ms),
            ..Fault::default()
        }
    }
}

/// What the emulator has been asked, as `GET /_emulator/calls` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Calls {
    /// Token calls that carried `Metadata: true` (served, refused or faulted).
    pub token: u64,
    /// Those, by the client id they asked for (`""` for none; other selectors are counted under the identity they
    /// resolved to, or under the raw selector value when unknown).
    pub by_client_id: BTreeMap<String, u64>,
    /// Tokens actually issued.
    pub issued: u64,
    /// Faults consumed.
    pub faults: u64,
    /// Token calls without `Metadata: true`.
    pub no_metadata_header: u64,
    /// Instance-metadata and versions calls.
    pub instance: u64,
    /// Anything else (not counting admin calls).
    pub other: u64,
    /// The first 100 of those paths, for leak diagnosis.
    pub other_paths: Vec<String>,
    /// Metadata calls answered 429 because the [`Capacity`] was taken.
    #[serde(default)]
    pub throttled: u64,
}
