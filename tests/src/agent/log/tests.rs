use super::*;

#[test]
fn a_log_line_has_tracing_fields_flattened_and_non_json_lines_are_skipped() {
    let v = parse_line(
        r#"{"timestamp":"t","level":"INFO","fields":{"message":"ready"},"target":"nmi_agent"}"#,
    )
    .expect("json");
    assert_eq!(v["message"], "ready");
    assert_eq!(v["target"], "nmi_agent");
    assert!(parse_line("thread 'main' panicked at src/main.rs").is_none());
}

#[test]
fn an_audit_line_fits_the_audit_contract() {
    let v = parse_line(
        r#"{"target":"audit","event":"connection","peer":"10.213.0.2:40000","verdict":"attested","cgroup":"/pod-a","cgroup_id":42,"pid":7}"#,
    )
    .expect("json");
    let a: Audit = serde_json::from_value(v).expect("audit");
    assert_eq!(a.peer, "10.213.0.2:40000".parse().unwrap());
    assert_eq!(
        (a.cgroup.as_deref(), a.cgroup_id, a.pid),
        (Some("/pod-a"), Some(42), Some(7))
    );
}
