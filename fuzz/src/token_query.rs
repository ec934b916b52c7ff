//! The token request's query and headers. The input's first line is the query string, the other lines are
//! `name: value` headers. The parser never panics; what it accepts survives re-encoding unchanged (so the agent and
//! IMDS read the same resource and selector); the header checks agree with their definitions.

use http::{HeaderMap, HeaderName, HeaderValue};
use nmi_agent::{
    identity::Selector,
    imds::{
        request::{TokenQuery, has_metadata_header, is_forwarded, parse_token_query},
        token::query_encode,
    },
};

pub fn check(data: &[u8]) {
    let (query, header_lines) = match data.iter().position(|b| *b == b'\n') {
        Some(end) => (&data[..end], &data[end + 1..]),
        None => (data, &[][..]),
    };
    let query = String::from_utf8_lossy(query);
    if let Ok(parsed) = parse_token_query(Some(&query)) {
        assert!(
            !parsed.resource.is_empty(),
            "{query:?} parsed without a resource"
        );
        let encoded = encode(&parsed);
        assert_eq!(
            parse_token_query(Some(&encoded)).as_ref(),
            Ok(&parsed),
            "{query:?} parses differently once re-encoded as {encoded:?}"
        );
    }
    check_headers(header_lines);
}

fn encode(query: &TokenQuery) -> String {
    let mut out = format!("resource={}", query_encode(&query.resource));
    if let Some(version) = &query.api_version {
        out.push_str(&format!("&api-version={}", query_encode(version)));
    }
    let selector = match &query.selector {
        Selector::Default => None,
        Selector::ClientId(id) => Some(("client_id", id)),
        Selector::ObjectId(id) => Some(("object_id", id)),
        Selector::ResourceId(id) => Some(("msi_res_id", id)),
    };
    if let Some((name, value)) = selector {
        out.push_str(&format!("&{name}={}", query_encode(value)));
    }
    out
}

fn check_headers(lines: &[u8]) {
    let mut headers = HeaderMap::new();
    for line in lines.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    let metadata: Vec<&HeaderValue> = headers.get_all("metadata").iter().collect();
    assert_eq!(
        has_metadata_header(&headers),
        metadata.len() == 1 && metadata[0] == "true",
        "Metadata check disagrees for {metadata:?}"
    );
    let forwarded = headers
        .keys()
        .any(|name| name.as_str().eq_ignore_ascii_case("x-forwarded-for"));
    assert_eq!(
        is_forwarded(&headers),
        forwarded,
        "X-Forwarded-For check disagrees for {headers:?}"
    );
}
