//! `GET /metadata/instance[/..]` and `/metadata/versions`: the VM's metadata document, whole or one leaf of it.

use std::collections::BTreeMap;

use hyper::StatusCode;
use serde_json::{Value, json};

use super::router::{Answer, json_response, no_metadata_header};
use crate::http;

fn document() -> Value {
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

/// `/metadata/instance` followed by the path segments `rest`; `format=text` gives a string leaf as plain text.
pub(super) fn call(metadata: bool, query: &BTreeMap<String, String>, rest: &[&str]) -> Answer {
    if !metadata {
        return no_metadata_header();
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
    let Some(node) = leaf(document(), rest) else {
        return json_response(StatusCode::NOT_FOUND, &json!({"error": "Not found"}));
    };
    match (&node, query.get("format").map(String::as_str)) {
        (Value::String(s), Some("text")) => {
            http::text(StatusCode::OK, "text/plain; charset=utf-8", s.clone())
        }
        _ => json_response(StatusCode::OK, &node),
    }
}

/// The value at `path` below `node`: object keys matched without case (IMDS leaf names are camel-case and the
/// lenient router lower-cased them), array items by index.
fn leaf(mut node: Value, path: &[&str]) -> Option<Value> {
    for segment in path {
        node = match &node {
            Value::Object(map) => map
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(segment))
                .map(|(_, v)| v.clone()),
            Value::Array(items) => segment
                .parse::<usize>()
                .ok()
                .and_then(|i| items.get(i).cloned()),
            _ => None,
        }?;
    }
    Some(node)
}

/// `/metadata/versions`.
pub(super) fn versions(metadata: bool) -> Answer {
    if !metadata {
        return no_metadata_header();
    }
    json_response(
        StatusCode::OK,
        &json!({"apiVersions": ["2018-02-01", "2019-08-01", "2021-02-01", "2023-07-01"]}),
    )
}
