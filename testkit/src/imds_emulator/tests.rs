use std::time::{Duration, Instant};

use serde_json::Value;

use super::*;
use crate::raw_http::{get, send};

const MD: &[(&str, &str)] = &[("Metadata", "true")];
const MGMT: &str = "resource=https%3A%2F%2Fmanagement.azure.com%2F";
const TOKEN: &str = "/metadata/identity/oauth2/token";

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

/// A token call for `cid-a`'s Azure Resource Manager token.
fn cid_a_token() -> String {
    format!("{TOKEN}?{MGMT}&client_id=cid-a")
}

#[tokio::test]
async fn a_token_answer_has_imds_fields_and_claims_naming_the_identity() {
    let emu = emulator(false).await;
    let target = format!("{TOKEN}?api-version=2018-02-01&{MGMT}&client_id=cid-a");
    let r = send(emu.addr(), "GET", &target, MD, "").await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(
        r.head
            .to_ascii_lowercase()
            .contains("content-type: application/json; charset=utf-8"),
        "{}",
        r.head
    );
    let v: Value = serde_json::from_str(&r.body).expect("json");
    let fields = v.as_object().expect("object");
    assert_eq!(fields.len(), 8);
    assert!(fields.values().all(Value::is_string), "{}", r.body);
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
}

#[tokio::test]
async fn an_identity_is_selected_by_resource_id_in_either_spelling_or_by_object_id() {
    let emu = emulator(false).await;
    let res_id = EmulatedIdentity::new("cid-a", "ident-a").resource_id();
    for sel in [
        format!("msi_res_id={res_id}"),
        format!("mi_res_id={res_id}"),
        "object_id=CID-A".to_owned(),
    ] {
        let r = send(emu.addr(), "GET", &format!("{TOKEN}?{MGMT}&{sel}"), MD, "").await;
        assert_eq!(r.status, 200, "{sel}: {}", r.body);
        assert!(r.body.contains(r#""client_id":"cid-a""#));
    }
    let calls = emu.calls();
    assert_eq!(
        (
            calls.token,
            calls.issued,
            calls.by_client_id.get("cid-a").copied()
        ),
        (3, 3, Some(3))
    );
}

#[tokio::test]
async fn token_calls_without_the_header_an_identity_or_an_audience_get_imds_errors() {
    let emu = emulator(false).await;
    let cases = [
        (
            cid_a_token(),
            &[][..],
            r#"{"error":"bad_request_102","error_description":"Required metadata header not specified"}"#,
        ),
        (
            format!("{TOKEN}?{MGMT}&client_id=nope"),
            MD,
            r#"{"error":"invalid_request","error_description":"Identity not found"}"#,
        ),
        (
            format!("{TOKEN}?{MGMT}"),
            MD,
            r#"{"error":"invalid_request","error_description":"Identity not found"}"#,
        ),
        (
            format!("{TOKEN}?client_id=cid-a"),
            MD,
            r#"{"error":"invalid_request","error_description":"Required audience parameter not specified"}"#,
        ),
    ];
    for (target, headers, want) in cases {
        let r = send(emu.addr(), "GET", &target, headers, "").await;
        assert_eq!((r.status, r.body.as_str()), (400, want), "{target}");
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
    let r = send(emu.addr(), "GET", &format!("{TOKEN}?{MGMT}"), MD, "").await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains(r#""client_id":"cid-system""#));
    assert_eq!(emu.calls().by_client_id.get(""), Some(&1));
}

#[tokio::test]
async fn paths_are_routed_as_leniently_as_imds_routes_them() {
    let emu = emulator(false).await;
    for path in [
        "/metadata/identity\\oauth2\\token",
        "/METADATA/identity/oauth2/token/",
        "/metadata/identity/%2e%2e/identity/oauth2/token",
    ] {
        let r = send(
            emu.addr(),
            "GET",
            &format!("{path}?{MGMT}&client_id=cid-b"),
            MD,
            "",
        )
        .await;
        assert_eq!(r.status, 200, "{path}");
    }
    let r = send(emu.addr(), "GET", "/nothing/here", MD, "").await;
    assert_eq!(r.status, 404);
    assert_eq!(emu.calls().other_paths, ["/nothing/here"]);
}

#[tokio::test]
async fn instance_metadata_is_served_whole_or_as_a_text_leaf_and_needs_header_and_version() {
    let emu = emulator(false).await;
    let instance = "/metadata/instance?api-version=2021-02-01";
    let r = send(emu.addr(), "GET", instance, MD, "").await;
    assert_eq!(r.status, 200);
    assert!(
        serde_json::from_str::<Value>(&r.body).is_ok_and(|v| v["compute"]["name"] == "emulator-vm")
    );
    let r = send(
        emu.addr(),
        "GET",
        "/metadata/instance/compute/vmId?api-version=2021-02-01&format=text",
        MD,
        "",
    )
    .await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (200, "00000000-0000-0000-0000-0000000000a1")
    );
    let r = send(emu.addr(), "GET", "/metadata/instance", MD, "").await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("api-version was not specified"));
    assert_eq!(get(emu.addr(), instance).await.status, 400);
    assert_eq!(
        send(emu.addr(), "GET", "/metadata/versions", MD, "")
            .await
            .status,
        200
    );
    assert_eq!(emu.calls().instance, 5);
}

#[tokio::test]
async fn faults_are_consumed_one_per_token_call_that_carries_the_header() {
    let emu = emulator(false).await;
    let r = send(
        emu.addr(),
        "POST",
        "/_emulator/faults",
        &[],
        r#"[{"status":429,"retry_after":1},{"status":410},{"status":200}]"#,
    )
    .await;
    assert_eq!((r.status, r.body.as_str()), (200, r#"{"pending":3}"#));
    let r = send(
        emu.addr(),
        "POST",
        "/_emulator/faults",
        &[],
        r#"{"status":500}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    let target = cid_a_token();
    // A probe without the header consumes nothing.
    assert_eq!(get(emu.addr(), &target).await.status, 400);
    let r = send(emu.addr(), "GET", &target, MD, "").await;
    assert_eq!(r.status, 429);
    assert!(
        r.head.to_ascii_lowercase().contains("retry-after: 1"),
        "{}",
        r.head
    );
    assert!(r.body.contains("too_many_requests"));
    for want in [410, 200, 500, 200] {
        assert_eq!(send(emu.addr(), "GET", &target, MD, "").await.status, want);
    }
    let calls: Calls =
        serde_json::from_str(&get(emu.addr(), "/_emulator/calls").await.body).expect("calls json");
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
}

#[tokio::test]
async fn a_delay_fault_delays_the_answer_and_a_drop_fault_closes_without_one() {
    let emu = emulator(false).await;
    emu.push_faults([
        Fault::delay(300),
        Fault {
            drop: true,
            ..Fault::default()
        },
    ]);
    let target = cid_a_token();
    let started = Instant::now();
    assert_eq!(send(emu.addr(), "GET", &target, MD, "").await.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
    let r = send(emu.addr(), "GET", &target, MD, "").await;
    assert_eq!(r.status, 0, "no answer: {}", r.head);
    assert!(emu.pending_faults().is_empty());
}

#[tokio::test]
async fn admin_calls_reset_the_counts_and_refuse_a_malformed_fault() {
    let emu = emulator(false).await;
    assert_eq!(
        send(emu.addr(), "GET", &cid_a_token(), MD, "").await.status,
        200
    );
    assert_ne!(emu.calls(), Calls::default());
    assert_eq!(
        send(emu.addr(), "DELETE", "/_emulator/calls", &[], "")
            .await
            .status,
        200
    );
    assert_eq!(emu.calls(), Calls::default());
    assert_eq!(
        send(emu.addr(), "POST", "/_emulator/faults", &[], "nope")
            .await
            .status,
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
fn an_identity_spec_is_a_client_id_and_an_optional_name() {
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
