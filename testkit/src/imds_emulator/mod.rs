//! An Azure IMDS emulator: the agent's `imds_url` points here instead of 169.254.169.254 (in process in the agent's
//! tests, in a topology's node namespace in the end-to-end tests, or as the `imds-emulator` binary in the demo).
//!
//! - `GET /metadata/identity/oauth2/token`: IMDS's token API. Requires `Metadata: true` (else 400 `bad_request_102`)
//!   and `resource`; selects by `client_id`, `object_id`, `msi_res_id` or `mi_res_id` (unknown: 400 `Identity not
//!   found`; none: the system identity if one is configured, else the same 400). Tokens are unsigned JWTs whose claims
//!   name the identity (`appid`, `oid` = its client id, `xms_mirid` = an ARM id ending in its name) and the resource
//!   (`aud`), with `exp`/`nbf`/`iat` and a unique `uti`; the JSON body has IMDS's fields, all strings.
//! - `GET /metadata/instance[/..]` (JSON, or `format=text` for a leaf) and `/metadata/versions`; both need
//!   `Metadata: true` and instance needs `api-version`, as IMDS does.
//! - Routing is lenient the way IMDS is (percent-decoding, `\` as `/`, duplicate slashes, case): a path variant that
//!   an agent lets through reaches the token API here too, so a leak shows up in the counts.
//! - Admin: `GET /_emulator/calls` (counts, JSON), `DELETE /_emulator/calls` (reset); `POST /_emulator/faults` with a
//!   fault or a list of faults, e.g. `[{"status":429},{"status":200}]`, `{"delay_ms":3000}`, `{"drop":true}`; `GET`
//!   shows the queue, `DELETE` clears it. One fault is consumed per token call that carries `Metadata: true`.
//!
//! In-process: `let emu = Emulator::start(EmulatorConfig::new(vec![EmulatedIdentity::new("cid", "name")])).await?;`
//! then `emu.url()`, `emu.calls()`, `emu.push_faults(..)`. Dropping the emulator stops it.

mod admin;
mod instance;
mod jwt;
mod model;
mod router;
mod token;

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, AtomicUsize},
    },
};

pub use jwt::{base64url, base64url_decode, jwt_claims};
pub use model::{Calls, Capacity, EmulatedIdentity, EmulatorConfig, Fault};

use crate::http;

/// What every request handler shares.
struct State {
    config: EmulatorConfig,
    calls: Mutex<Calls>,
    faults: Mutex<VecDeque<Fault>>,
    serial: AtomicU64,
    /// Metadata calls being served now (for [`Capacity`]).
    in_flight: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test helper: a poisoned lock only means another request panicked; the data is still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A running emulator. Dropping it stops the listener and every connection.
pub struct Emulator {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Emulator {
    /// Binds and starts serving (needs a Tokio runtime).
    pub async fn start(config: EmulatorConfig) -> std::io::Result<Emulator> {
        let listener = http::listen(config.listen)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            config,
            calls: Mutex::new(Calls::default()),
            faults: Mutex::new(VecDeque::new()),
            serial: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        });
        let serving = Arc::clone(&state);
        let task = http::serve("imds-emulator", listener, move |req| {
            let state = Arc::clone(&serving);
            async move { router::handle(&state, req).await }
        });
        Ok(Emulator { addr, state, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ip:port`, the agent's `imds_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn calls(&self) -> Calls {
        lock(&self.state.calls).clone()
    }

    pub fn reset_calls(&self) {
        *lock(&self.state.calls) = Calls::default();
    }

    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        lock(&self.state.faults).extend(faults);
    }

    pub fn pending_faults(&self) -> Vec<Fault> {
        lock(&self.state.faults).iter().cloned().collect()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests;
