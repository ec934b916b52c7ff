//! `GET /metadata/identity/oauth2/token`: which identity a call selects, the scripted fault it may meet, and the
//! token body IMDS would send.

use std::{
    collections::BTreeMap,
    sync::atomic::Ordering,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use hyper::{StatusCode, header};
use serde_json::{Value, json};

use super::{
    EmulatedIdentity, EmulatorConfig, Fault, State, jwt, lock,
    router::{Answer, Dropped, imds_error, json_response},
};

/// How a call names its identity (`client_id`, `object_id`, or the ARM resource id as `msi_res_id` or `mi_res_id`);
/// IMDS takes the first of these parameters that is present and not empty.
#[derive(Clone, Copy)]
enum Selector<'a> {
    Client(&'a str),
    Object(&'a str),
    Resource(&'a str),
}

impl<'a> Selector<'a> {
    fn from_query(query: &'a BTreeMap<String, String>) -> Option<Self> {
        let param = |name: &str| {
            query
                .get(name)
                .filter(|v| !v.is_empty())
                .map(String::as_str)
        };
        param("client_id")
            .map(Selector::Client)
            .or_else(|| param("object_id").map(Selector::Object))
            .or_else(|| param("msi_res_id").map(Selector::Resource))
            .or_else(|| param("mi_res_id").map(Selector::Resource))
    }

    /// The raw value, counted as such when it names no identity.
    fn value(self) -> &'a str {
        match self {
            Selector::Client(v) | Selector::Object(v) | Selector::Resource(v) => v,
        }
    }

    fn find(self, config: &EmulatorConfig) -> Option<&EmulatedIdentity> {
        let mut identities = config.identities.iter();
        match self {
            // The emulator's identities use their client id as object id too.
            Selector::Client(id) | Selector::Object(id) => {
                identities.find(|i| i.client_id.eq_ignore_ascii_case(id))
            }
            Selector::Resource(res) => identities.find(|i| {
                i.resource_id()
                    .eq_ignore_ascii_case(res.trim_end_matches('/'))
            }),
        }
    }
}

pub(super) async fn call(
    state: &State,
    query: &BTreeMap<String, String>,
) -> Result<Answer, Dropped> {
    let config = &state.config;
    let selector = Selector::from_query(query);
    let found = match selector {
        None => config.system_identity.as_ref(),
        Some(selector) => selector.find(config),
    };
    let counted_as = match (found, selector) {
        (Some(identity), Some(_)) => identity.client_id.clone(),
        (None, Some(selector)) => selector.value().to_owned(),
        (_, None) => String::new(),
    };
    if let Some(fault) = count_and_take_fault(state, counted_as) {
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
    let Some(resource) = query.get("resource").filter(|v| !v.is_empty()) else {
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

/// Counts the call under `counted_as` and takes the next scripted fault, if any (counted too).
fn count_and_take_fault(state: &State, counted_as: String) -> Option<Fault> {
    let mut calls = lock(&state.calls);
    calls.token += 1;
    *calls.by_client_id.entry(counted_as).or_default() += 1;
    let fault = lock(&state.faults).pop_front();
    if fault.is_some() {
        calls.faults += 1;
    }
    fault
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
    json!({
        "access_token": jwt::unsigned(&claims),
        "client_id": identity.client_id,
        "expires_in": lifetime.as_secs().to_string(),
        "expires_on": exp.to_string(),
        "ext_expires_in": lifetime.as_secs().to_string(),
        "not_before": now.to_string(),
        "resource": resource,
        "token_type": "Bearer",
    })
}
