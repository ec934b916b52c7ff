use super::*;

#[test]
fn the_packet_count_is_read_from_the_counters_json_listing() {
    let json = br#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}, {"counter": {"family": "ip", "name": "trap", "table": "nmie2e", "handle": 2, "packets": 7, "bytes": 420}}]}"#;
    assert_eq!(parse_packets(json), 7);
}
