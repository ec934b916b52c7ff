//! `/_emulator/...`: what a test or the demo asks the emulator itself: the call counts, and the queue of faults.

use hyper::{Method, StatusCode};
use serde_json::json;

use super::{
    Calls, Fault, State, lock,
    router::{Answer, imds_error, json_response},
};

pub(super) fn call(state: &State, method: &Method, what: &str, body: &[u8]) -> Answer {
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
