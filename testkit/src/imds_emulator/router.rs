//! From a request to the part of the emulator that answers it, reading paths as leniently as IMDS does, and the
//! answer shapes they all share.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use http_body_util::{BodyExt, Limited};
use hyper::{Request, Response, StatusCode, body::Incoming};
use serde_json::{Value, json};

use super::{State, admin, instance, lock, token};
use crate::http::{self, Body};

pub(super) type Answer = Response<Body>;

/// The error type hyper sees: only used to drop a connection on purpose.
#[derive(Debug)]
pub(super) struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by a fault")
    }
}

impl std::error::Error for Dropped {}

/// JSON with IMDS's content type.
pub(super) fn json_response(status: StatusCode, body: &Value) -> Answer {
    http::json(status, "application/json; charset=utf-8", body)
}

/// IMDS's error shape: `{"error": code, "error_description": description}`.
pub(super) fn imds_error(status: StatusCode, code: &str, description: &str) -> Answer {
    json_response(
        status,
        &json!({"error": code, "error_description": description}),
    )
}

/// IMDS's answer to a metadata call without `Metadata: true`.
pub(super) fn no_metadata_header() -> Answer {
    imds_error(
        StatusCode::BAD_REQUEST,
        "Bad request",
        "Required metadata header not specified",
    )
}

pub(super) async fn handle(state: &State, req: Request<Incoming>) -> Result<Answer, Dropped> {
    let (parts, body) = req.into_parts();
    let raw_path = parts.uri.path().to_owned();
    if let Some(what) = raw_path.strip_prefix("/_emulator/") {
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
        return Ok(admin::call(state, &parts.method, what, &bytes));
    }
    // IMDS's per-VM throttling, when configured: a slot for the whole call, or 429.
    let _slot = match state.config.capacity {
        Some(capacity) => match Slot::take(state, capacity.in_flight) {
            Some(slot) => {
                tokio::time::sleep(capacity.service_time).await;
                Some(slot)
            }
            None => {
                lock(&state.calls).throttled += 1;
                return Ok(imds_error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_requests",
                    "Too many requests",
                ));
            }
        },
        None => None,
    };
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
            token::call(state, &query).await
        }
        ["metadata", "instance", rest @ ..] => {
            lock(&state.calls).instance += 1;
            Ok(instance::call(metadata, &query, rest))
        }
        ["metadata", "versions"] => {
            lock(&state.calls).instance += 1;
            Ok(instance::versions(metadata))
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

/// One of the [`super::Capacity`]'s places, given back when dropped.
struct Slot<'a>(&'a State);

impl<'a> Slot<'a> {
    fn take(state: &'a State, max: usize) -> Option<Slot<'a>> {
        let taken = state
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            });
        taken.is_ok().then_some(Slot(state))
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
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
