//! An Azure IMDS emulator for the end-to-end tests: the agent's `imds_url` points here instead of 169.254.169.254.
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

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::{net::TcpSocket, task::JoinSet};

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

#[derive(Clone, Debug)]
pub struct EmulatorConfig {
    /// Where to listen; port 0 picks one (see [`Emulator::addr`]).
    pub listen: SocketAddr,
    pub identities: Vec<EmulatedIdentity>,
    /// The system-assigned identity, served when a request names none.
    pub system_identity: Option<EmulatedIdentity>,
    /// `expires_in` of issued tokens.
    pub token_lifetime: Duration,
}

impl EmulatorConfig {
    /// Loopback, any port, 24 h tokens (IMDS's managed-identity lifetime), no system identity.
    pub fn new(identities: Vec<EmulatedIdentity>) -> Self {
        EmulatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            identities,
            system_identity: None,
            token_lifetime: Duration::from_secs(86_400),
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
}

struct State {
    config: EmulatorConfig,
    calls: Mutex<Calls>,
    faults: Mutex<VecDeque<Fault>>,
    serial: AtomicU64,
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
        let socket = if config.listen.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(config.listen)?;
        // A large backlog: connection storms from many pods must queue, not see SYN drops.
        let listener = socket.listen(4096)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            config,
            calls: Mutex::new(Calls::default()),
            faults: Mutex::new(VecDeque::new()),
            serial: AtomicU64::new(0),
        });
        let serving = Arc::clone(&state);
        let task = tokio::spawn(async move {
            // Owned by this task: aborting it (drop) aborts every connection too.
            let mut connections = JoinSet::new();
            loop {
                let (stream, _) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        eprintln!("imds-emulator: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let state = Arc::clone(&serving);
                connections.spawn(async move {
                    let service = service_fn(move |req| {
                        let state = Arc::clone(&state);
                        async move { handle(&state, req).await }
                    });
                    // Errors here are clients going away or dropped connections (the `drop` fault): nothing to do.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                // Reap finished connections so the set does not grow without bound.
                while connections.try_join_next().is_some() {}
            }
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

/// The error type hyper sees: only used to drop a connection on purpose.
#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by a fault")
    }
}

impl std::error::Error for Dropped {}

type Answer = Response<Full<Bytes>>;

fn json_response(status: StatusCode, body: &Value) -> Answer {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

fn imds_error(status: StatusCode, code: &str, description: &str) -> Answer {
    json_response(
        status,
        &json!({"error": code, "error_description": description}),
    )
}

async fn handle(state: &State, req: Request<Incoming>) -> Result<Answer, Dropped> {
    let (parts, body) = req.into_parts();
    let raw_path = parts.uri.path().to_owned();
    if let Some(admin) = raw_path.strip_prefix("/_emulator/") {
        // Admin bodies are small JSON; a limit keeps a broken test from buffering much.
        let bytes = match Limited::new(body, 1 << 20).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => {
                return Ok(imds_error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "unreadable body",
                ));
            }
        };
        return Ok(admin_call(state, &parts.method, admin, &bytes));
    }
    let query = parse_query(parts.uri.query().unwrap_or(""));
    let metadata = parts
        .headers
        .get("metadata")
        .is_some_and(|v| v.as_bytes() == b"true");
    let segments = lenient_segments(&raw_path);
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    match segments.as_slice() {
        ["metadata", "identity", "oauth2", "token"] => {
            if !metadata {
                lock(&state.calls).no_metadata_header += 1;
                return Ok(imds_error(
                    StatusCode::BAD_REQUEST,
                    "bad_request_102",
                    "Required metadata header not specified",
                ));
            }
            token_call(state, &query).await
        }
        ["metadata", "instance", rest @ ..] => {
            lock(&state.calls).instance += 1;
            Ok(instance_call(metadata, &query, rest))
        }
        ["metadata", "versions"] => {
            lock(&state.calls).instance += 1;
            if !metadata {
                return Ok(imds_error(
                    StatusCode::BAD_REQUEST,
                    "Bad request",
                    "Required metadata header not specified",
                ));
            }
            Ok(json_response(
                StatusCode::OK,
                &json!({"apiVersions": ["2018-02-01", "2019-08-01", "2021-02-01", "2023-07-01"]}),
            ))
        }
        _ => {
            let mut calls = lock(&state.calls);
            calls.other += 1;
            if calls.other_paths.len() < 100 {
                calls.other_paths.push(raw_path);
            }
            Ok(json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": "Not found"}),
            ))
        }
    }
}

/// Path segments as a lenient server reads them: percent-decoded once, `\` as `/`, empty segments dropped, lower case.
fn lenient_segments(raw: &str) -> Vec<String> {
    let decoded = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
    decoded
        .split(['/', '\\'])
        .filter(|s| !s.is_empty() && *s != ".")
        .map(str::to_ascii_lowercase)
        .fold(Vec::new(), |mut acc, s| {
            if s == ".." {
                acc.pop();
            } else {
                acc.push(s);
            }
            acc
        })
}

/// Query parameters, names lower-cased, `+` as space, percent-decoded; the first of repeated names wins.
fn parse_query(q: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (k, v) in form_urlencoded::parse(q.as_bytes()) {
        out.entry(k.to_ascii_lowercase())
            .or_insert_with(|| v.into_owned());
    }
    out
}

async fn token_call(state: &State, query: &BTreeMap<String, String>) -> Result<Answer, Dropped> {
    let config = &state.config;
    let param = |name: &str| query.get(name).filter(|v| !v.is_empty());
    let selector = [
        ("client_id", 0),
        ("object_id", 1),
        ("msi_res_id", 2),
        ("mi_res_id", 2),
    ]
    .into_iter()
    .find_map(|(name, kind)| param(name).map(|v| (kind, v.as_str())));
    let found = match selector {
        None => config.system_identity.as_ref(),
        Some((0 | 1, id)) => config
            .identities
            .iter()
            .find(|i| i.client_id.eq_ignore_ascii_case(id)),
        Some((_, res)) => config.identities.iter().find(|i| {
            i.resource_id()
                .eq_ignore_ascii_case(res.trim_end_matches('/'))
        }),
    };
    let counted_as = match (found, selector) {
        (Some(identity), _) if selector.is_some() => identity.client_id.clone(),
        (_, Some((_, raw))) => raw.to_owned(),
        (_, None) => String::new(),
    };
    let fault = {
        let mut calls = lock(&state.calls);
        calls.token += 1;
        *calls.by_client_id.entry(counted_as).or_default() += 1;
        let fault = lock(&state.faults).pop_front();
        if fault.is_some() {
            calls.faults += 1;
        }
        fault
    };
    if let Some(fault) = fault {
        if let Some(ms) = fault.delay_ms {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if fault.drop {
            return Err(Dropped);
        }
        if let Some(status) = fault.status.filter(|s| *s != 200) {
            return Ok(fault_answer(status, &fault));
        }
    }
    let Some(resource) = param("resource") else {
        return Ok(imds_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Required audience parameter not specified",
        ));
    };
    let Some(identity) = found else {
        return Ok(imds_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Identity not found",
        ));
    };
    let serial = state.serial.fetch_add(1, Ordering::Relaxed) + 1;
    lock(&state.calls).issued += 1;
    Ok(json_response(
        StatusCode::OK,
        &issue(identity, resource, config.token_lifetime, serial),
    ))
}

fn fault_answer(status: u16, fault: &Fault) -> Answer {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = fault.body.clone().unwrap_or_else(|| match status.as_u16() {
        404 => json!({"error": "not_found", "error_description": "IMDS is updating"}),
        410 => json!({"error": "gone", "error_description": "IMDS is updating; retry within 70 seconds"}),
        429 => json!({"error": "too_many_requests", "error_description": "IMDS throttle limit reached"}),
        500 => json!({"error": "unknown", "error_description": "Failed to retrieve token from the Active directory"}),
        _ => json!({"error": "unknown", "error_description": format!("emulated fault {status}")}),
    });
    let mut r = json_response(status, &body);
    if let Some(secs) = fault.retry_after {
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
    }
    r
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// IMDS's token body for `identity`, with an unsigned JWT naming it.
fn issue(identity: &EmulatedIdentity, resource: &str, lifetime: Duration, serial: u64) -> Value {
    let now = now_secs();
    let exp = now + lifetime.as_secs();
    let header = json!({"typ": "JWT", "alg": "none"});
    let claims = json!({
        "aud": resource,
        "iss": "https://sts.windows.net/00000000-0000-0000-0000-0000000000e0/",
        "iat": now,
        "nbf": now,
        "exp": exp,
        "appid": identity.client_id,
        "oid": identity.client_id,
        "sub": identity.client_id,
        "tid": "00000000-0000-0000-0000-0000000000e0",
        "idtyp": "app",
        "xms_mirid": identity.resource_id(),
        "uti": format!("emulator-{serial}"),
        "ver": "1.0",
    });
    let jwt = format!(
        "{}.{}.{}",
        base64url(header.to_string().as_bytes()),
        base64url(claims.to_string().as_bytes()),
        base64url(b"imds-emulator-unsigned")
    );
    json!({
        "access_token": jwt,
        "client_id": identity.client_id,
        "expires_in": lifetime.as_secs().to_string(),
        "expires_on": exp.to_string(),
        "ext_expires_in": lifetime.as_secs().to_string(),
        "not_before": now.to_string(),
        "resource": resource,
        "token_type": "Bearer",
    })
}

/// Unpadded base64url (RFC 4648 §5), as JWTs use.
pub fn base64url(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

/// Decodes what [`base64url`] encodes (for tests reading the emulator's JWT claims); `=` padding is tolerated.
pub fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

/// The claims of a JWT (unverified), for tests.
pub fn jwt_claims(token: &str) -> Option<Value> {
    let payload = token.split('.').nth(1)?;
    serde_json::from_slice(&base64url_decode(payload)?).ok()
}

fn instance_document() -> Value {
    json!({
        "compute": {
            "azEnvironment": "AzurePublicCloud",
            "location": "emulator",
            "name": "emulator-vm",
            "resourceGroupName": "emulator",
            "subscriptionId": "00000000-0000-0000-0000-000000000000",
            "vmId": "00000000-0000-0000-0000-0000000000a1",
            "vmSize": "Standard_D2s_v5",
            "osType": "Linux"
        },
        "network": {
            "interface": [{
                "ipv4": {"ipAddress": [{"privateIpAddress": "10.240.0.4", "publicIpAddress": ""}]},
                "macAddress": "000D3A000000"
            }]
        }
    })
}

fn instance_call(metadata: bool, query: &BTreeMap<String, String>, rest: &[&str]) -> Answer {
    if !metadata {
        return imds_error(
            StatusCode::BAD_REQUEST,
            "Bad request",
            "Required metadata header not specified",
        );
    }
    if !query.contains_key("api-version") {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({
                "error": "Bad request. api-version was not specified in the request. For more information refer to aka.ms/azureimds",
                "newest-versions": ["2023-07-01", "2021-12-13", "2021-11-15"]
            }),
        );
    }
    // IMDS leaf names are camel-case; the lenient router lower-cased them, so match case-insensitively.
    let mut node = instance_document();
    for segment in rest {
        let next = match &node {
            Value::Object(map) => map
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(segment))
                .map(|(_, v)| v.clone()),
            Value::Array(items) => segment
                .parse::<usize>()
                .ok()
                .and_then(|i| items.get(i).cloned()),
            _ => None,
        };
        match next {
            Some(v) => node = v,
            None => return json_response(StatusCode::NOT_FOUND, &json!({"error": "Not found"})),
        }
    }
    match (&node, query.get("format").map(String::as_str)) {
        (Value::String(s), Some("text")) => {
            let mut r = Response::new(Full::new(Bytes::from(s.clone())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            r
        }
        _ => json_response(StatusCode::OK, &node),
    }
}

fn admin_call(state: &State, method: &Method, what: &str, body: &[u8]) -> Answer {
    match (method, what) {
        (&Method::GET, "calls") => json_response(StatusCode::OK, &json!(*lock(&state.calls))),
        (&Method::DELETE, "calls") => {
            *lock(&state.calls) = Calls::default();
            json_response(StatusCode::OK, &json!({}))
        }
        (&Method::GET, "faults") => {
            let pending: Vec<Fault> = lock(&state.faults).iter().cloned().collect();
            json_response(StatusCode::OK, &json!(pending))
        }
        (&Method::DELETE, "faults") => {
            lock(&state.faults).clear();
            json_response(StatusCode::OK, &json!({}))
        }
        (&Method::POST, "faults") => {
            let parsed: Result<Vec<Fault>, _> = serde_json::from_slice::<Vec<Fault>>(body)
                .or_else(|_| serde_json::from_slice::<Fault>(body).map(|f| vec![f]));
            match parsed {
                Ok(faults) => {
                    let mut queue = lock(&state.faults);
                    queue.extend(faults);
                    json_response(StatusCode::OK, &json!({"pending": queue.len()}))
                }
                Err(e) => imds_error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!("faults: {e}"),
                ),
            }
        }
        _ => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": "unknown admin endpoint"}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A minimal HTTP/1.1 client (one request per connection), so the tests need no client crate.
    async fn send(
        addr: SocketAddr,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut request = format!(
            "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(body);
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read");
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, head.to_owned(), body.to_owned())
    }

    const MD: &[(&str, &str)] = &[("Metadata", "true")];
    const MGMT: &str = "resource=https%3A%2F%2Fmanagement.azure.com%2F";

    async fn emulator(system: bool) -> Emulator {
        let mut config = EmulatorConfig::new(vec![
            EmulatedIdentity::new("cid-a", "ident-a"),
            EmulatedIdentity::new("cid-b", "cid-b"),
        ]);
        if system {
            config.system_identity = Some(EmulatedIdentity::new("cid-system", "system"));
        }
        config.token_lifetime = Duration::from_secs(3600);
        Emulator::start(config).await.expect("start")
    }

    #[tokio::test]
    async fn issues_per_identity_tokens_shaped_like_imds() {
        let emu = emulator(false).await;
        let target = format!(
            "/metadata/identity/oauth2/token?api-version=2018-02-01&{MGMT}&client_id=cid-a"
        );
        let (status, head, body) = send(emu.addr(), "GET", &target, MD, "").await;
        assert_eq!(status, 200, "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json; charset=utf-8"),
            "{head}"
        );
        let v: Value = serde_json::from_str(&body).expect("json");
        let fields = v.as_object().expect("object");
        assert_eq!(fields.len(), 8);
        assert!(fields.values().all(Value::is_string), "{body}");
        assert_eq!(v["client_id"], "cid-a");
        assert_eq!(v["resource"], "https://management.azure.com/");
        assert_eq!(v["expires_in"], "3600");
        let token = v["access_token"].as_str().expect("token");
        assert_eq!(token.split('.').count(), 3);
        let claims = jwt_claims(token).expect("claims");
        assert_eq!(
            (
                claims["aud"].as_str(),
                claims["appid"].as_str(),
                claims["oid"].as_str()
            ),
            (
                Some("https://management.azure.com/"),
                Some("cid-a"),
                Some("cid-a")
            )
        );
        assert!(
            claims["xms_mirid"]
                .as_str()
                .is_some_and(|m| m.ends_with("/userAssignedIdentities/ident-a"))
        );
        let exp = claims["exp"].as_u64().expect("exp");
        assert_eq!(v["expires_on"], exp.to_string());
        assert_eq!(claims["nbf"].as_u64().map(|n| n + 3600), Some(exp));

        // By resource id (either spelling) and object id.
        let res_id = EmulatedIdentity::new("cid-a", "ident-a").resource_id();
        for sel in [
            format!("msi_res_id={res_id}"),
            format!("mi_res_id={res_id}"),
            "object_id=CID-A".to_owned(),
        ] {
            let (status, _, body) = send(
                emu.addr(),
                "GET",
                &format!("/metadata/identity/oauth2/token?{MGMT}&{sel}"),
                MD,
                "",
            )
            .await;
            assert_eq!(status, 200, "{sel}: {body}");
            assert!(body.contains(r#""client_id":"cid-a""#));
        }
        let calls = emu.calls();
        assert_eq!(
            (
                calls.token,
                calls.issued,
                calls.by_client_id.get("cid-a").copied()
            ),
            (4, 4, Some(4))
        );
    }

    #[tokio::test]
    async fn imds_errors() {
        let emu = emulator(false).await;
        let tok = "/metadata/identity/oauth2/token";
        let cases = [
            (
                format!("{tok}?{MGMT}&client_id=cid-a"),
                &[][..],
                r#"{"error":"bad_request_102","error_description":"Required metadata header not specified"}"#,
            ),
            (
                format!("{tok}?{MGMT}&client_id=nope"),
                MD,
                r#"{"error":"invalid_request","error_description":"Identity not found"}"#,
            ),
            (
                format!("{tok}?{MGMT}"),
                MD,
                r#"{"error":"invalid_request","error_description":"Identity not found"}"#,
            ),
            (
                format!("{tok}?client_id=cid-a"),
                MD,
                r#"{"error":"invalid_request","error_description":"Required audience parameter not specified"}"#,
            ),
        ];
        for (target, headers, want) in cases {
            let (status, _, body) = send(emu.addr(), "GET", &target, headers, "").await;
            assert_eq!((status, body.as_str()), (400, want), "{target}");
        }
        let calls = emu.calls();
        assert_eq!(
            (calls.no_metadata_header, calls.token, calls.issued),
            (1, 3, 0)
        );
        assert_eq!(calls.by_client_id.get("nope"), Some(&1));
    }

    #[tokio::test]
    async fn system_identity_serves_requests_without_a_selector() {
        let emu = emulator(true).await;
        let (status, _, body) = send(
            emu.addr(),
            "GET",
            &format!("/metadata/identity/oauth2/token?{MGMT}"),
            MD,
            "",
        )
        .await;
        assert_eq!(status, 200);
        assert!(body.contains(r#""client_id":"cid-system""#));
        assert_eq!(emu.calls().by_client_id.get(""), Some(&1));
    }

    #[tokio::test]
    async fn lenient_routing_like_imds() {
        let emu = emulator(false).await;
        for path in [
            "/metadata/identity\\oauth2\\token",
            "/METADATA/identity/oauth2/token/",
            "/metadata/identity/%2e%2e/identity/oauth2/token",
        ] {
            let (status, _, _) = send(
                emu.addr(),
                "GET",
                &format!("{path}?{MGMT}&client_id=cid-b"),
                MD,
                "",
            )
            .await;
            assert_eq!(status, 200, "{path}");
        }
        let (status, _, _) = send(emu.addr(), "GET", "/nothing/here", MD, "").await;
        assert_eq!(status, 404);
        assert_eq!(emu.calls().other_paths, ["/nothing/here"]);
    }

    #[tokio::test]
    async fn instance_metadata() {
        let emu = emulator(false).await;
        let (status, _, body) = send(
            emu.addr(),
            "GET",
            "/metadata/instance?api-version=2021-02-01",
            MD,
            "",
        )
        .await;
        assert_eq!(status, 200);
        assert!(
            serde_json::from_str::<Value>(&body)
                .is_ok_and(|v| v["compute"]["name"] == "emulator-vm")
        );
        let (status, _, body) = send(
            emu.addr(),
            "GET",
            "/metadata/instance/compute/vmId?api-version=2021-02-01&format=text",
            MD,
            "",
        )
        .await;
        assert_eq!(
            (status, body.as_str()),
            (200, "00000000-0000-0000-0000-0000000000a1")
        );
        let (status, _, body) = send(emu.addr(), "GET", "/metadata/instance", MD, "").await;
        assert_eq!(status, 400);
        assert!(body.contains("api-version was not specified"));
        assert_eq!(
            send(
                emu.addr(),
                "GET",
                "/metadata/instance?api-version=2021-02-01",
                &[],
                ""
            )
            .await
            .0,
            400
        );
        assert_eq!(
            send(emu.addr(), "GET", "/metadata/versions", MD, "")
                .await
                .0,
            200
        );
        assert_eq!(emu.calls().instance, 5);
    }

    #[tokio::test]
    async fn faults_are_consumed_per_token_call() {
        let emu = emulator(false).await;
        let (status, _, body) = send(
            emu.addr(),
            "POST",
            "/_emulator/faults",
            &[],
            r#"[{"status":429,"retry_after":1},{"status":410},{"status":200}]"#,
        )
        .await;
        assert_eq!((status, body.as_str()), (200, r#"{"pending":3}"#));
        let (status, _, _) = send(
            emu.addr(),
            "POST",
            "/_emulator/faults",
            &[],
            r#"{"status":500}"#,
        )
        .await;
        assert_eq!(status, 200);
        let target = format!("/metadata/identity/oauth2/token?{MGMT}&client_id=cid-a");
        // A probe without the header consumes nothing.
        assert_eq!(send(emu.addr(), "GET", &target, &[], "").await.0, 400);
        let (status, head, body) = send(emu.addr(), "GET", &target, MD, "").await;
        assert_eq!(status, 429);
        assert!(
            head.to_ascii_lowercase().contains("retry-after: 1"),
            "{head}"
        );
        assert!(body.contains("too_many_requests"));
        assert_eq!(send(emu.addr(), "GET", &target, MD, "").await.0, 410);
        assert_eq!(send(emu.addr(), "GET", &target, MD, "").await.0, 200);
        assert_eq!(send(emu.addr(), "GET", &target, MD, "").await.0, 500);
        assert_eq!(send(emu.addr(), "GET", &target, MD, "").await.0, 200);
        let (_, _, calls) = send(emu.addr(), "GET", "/_emulator/calls", &[], "").await;
        let calls: Calls = serde_json::from_str(&calls).expect("calls json");
        assert_eq!(
            (
                calls.token,
                calls.faults,
                calls.issued,
                calls.no_metadata_header
            ),
            (5, 4, 2, 1)
        );
        assert_eq!(calls.by_client_id.get("cid-a"), Some(&5));

        // Delay, then a normal answer; and a dropped connection.
        emu.push_faults([
            Fault::delay(300),
            Fault {
                drop: true,
                ..Fault::default()
            },
        ]);
        let started = std::time::Instant::now();
        assert_eq!(send(emu.addr(), "GET", &target, MD, "").await.0, 200);
        assert!(started.elapsed() >= Duration::from_millis(300));
        let (status, head, _) = send(emu.addr(), "GET", &target, MD, "").await;
        assert_eq!(status, 0, "no answer: {head}");
        assert!(emu.pending_faults().is_empty());

        assert_eq!(
            send(emu.addr(), "DELETE", "/_emulator/calls", &[], "")
                .await
                .0,
            200
        );
        assert_eq!(emu.calls(), Calls::default());
        assert_eq!(
            send(emu.addr(), "POST", "/_emulator/faults", &[], "nope")
                .await
                .0,
            400
        );
    }

    #[test]
    fn base64url_round_trips() {
        for data in [
            &b""[..],
            b"f",
            b"fo",
            b"foo",
            b"foob",
            b"fooba",
            b"foobar",
            &[0xff, 0xfe, 0xfd, 0x00],
        ] {
            assert_eq!(base64url_decode(&base64url(data)).as_deref(), Some(data));
        }
        assert_eq!(base64url(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn identity_specs() {
        assert_eq!(
            EmulatedIdentity::parse("cid=name"),
            Ok(EmulatedIdentity::new("cid", "name"))
        );
        assert_eq!(
            EmulatedIdentity::parse("cid"),
            Ok(EmulatedIdentity::new("cid", "cid"))
        );
        assert!(EmulatedIdentity::parse("=x").is_err());
        assert!(EmulatedIdentity::parse("").is_err());
    }
}
