//! Parsing a token request: the `Metadata` header and the query string.

use http::HeaderMap;

use super::path::percent_decode;
use crate::identity::Selector;

/// True when the request carries exactly one `Metadata` header whose value is exactly `true`.
///
/// IMDS compares the value case-sensitively (`True` fails), and it is an SSRF guard: a request forged through a
/// server-side URL fetcher cannot add headers. Two `Metadata` headers are refused rather than guessing which one a
/// server would read.
pub fn has_metadata_header(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all("metadata").iter();
    matches!((values.next(), values.next()), (Some(v), None) if v.as_bytes() == b"true")
}

/// True when the request came through a proxy that says so (`X-Forwarded-For`, any value, even empty).
pub fn is_forwarded(headers: &HeaderMap) -> bool {
    headers.contains_key("x-forwarded-for")
}

/// The parameters of a token request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenQuery {
    /// The v1 resource (App ID URI) exactly as sent; it becomes the token's `aud` and half of the cache key.
    pub resource: String,
    /// Accepted and recorded, not enforced: IMDS is always called with 2018-02-01, and the token shape does not
    /// depend on it. NMI ignored it too, so no client relying on NMI sends an unusual one.
    pub api_version: Option<String>,
    /// Which identity the caller asks for.
    pub selector: Selector,
}

/// Why a token request's query was refused (all answered 400 `invalid_request`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("Required audience parameter not specified")]
    MissingResource,
    #[error("Only one of client_id, object_id, msi_res_id and mi_res_id may be specified")]
    SeveralSelectors,
    #[error("Query parameter '{0}' is specified more than once")]
    Repeated(&'static str),
    #[error("Query parameter '{0}' is not correctly encoded")]
    BadEncoding(&'static str),
}

/// Parses the query string of a token request.
///
/// Names compare ASCII case-insensitively (IMDS is an ASP.NET-style service). A known parameter given twice is refused,
/// so that no two readers of the same request can disagree about it. Empty values count as absent, as Go's ADAL and
/// NMI treated them. Unknown parameters are ignored.
pub fn parse_token_query(query: Option<&str>) -> Result<TokenQuery, QueryError> {
    const NAMES: [&str; 6] = [
        "resource",
        "api-version",
        "client_id",
        "object_id",
        "msi_res_id",
        "mi_res_id",
    ];
    let mut values: [Option<String>; 6] = Default::default();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let Ok(name) = form_decode(raw_name) else {
            // An undecodable name cannot be one of ours; ignore it like any other unknown parameter.
            continue;
        };
        let Some(index) = NAMES.iter().position(|n| n.eq_ignore_ascii_case(&name)) else {
            continue;
        };
        let value = form_decode(raw_value).map_err(|()| QueryError::BadEncoding(NAMES[index]))?;
        if values[index].is_some() {
            return Err(QueryError::Repeated(NAMES[index]));
        }
        values[index] = Some(value);
    }
    let [
        resource,
        api_version,
        client_id,
        object_id,
        msi_res_id,
        mi_res_id,
    ] = values.map(|v| v.filter(|v| !v.is_empty()));
    let resource = resource.ok_or(QueryError::MissingResource)?;
    let selectors = [
        client_id.map(Selector::ClientId),
        object_id.map(Selector::ObjectId),
        msi_res_id.map(Selector::ResourceId),
        mi_res_id.map(Selector::ResourceId),
    ];
    let mut given = selectors.into_iter().flatten();
    let selector = match (given.next(), given.next()) {
        (None, _) => Selector::Default,
        (Some(one), None) => one,
        (Some(_), Some(_)) => return Err(QueryError::SeveralSelectors),
    };
    Ok(TokenQuery {
        resource,
        api_version,
        selector,
    })
}

/// Decodes one `application/x-www-form-urlencoded` component: `+` is a space, then `%XX` escapes.
fn form_decode(raw: &str) -> Result<String, ()> {
    percent_decode(&raw.replace('+', " ")).map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imds::token::query_encode;
    use http::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(
                "Metadata",
                HeaderValue::from_str(v).expect("test header value"),
            );
        }
        h
    }

    #[test]
    fn metadata_header_must_be_exactly_true_once() {
        assert!(has_metadata_header(&headers(&["true"])));
        for bad in [
            &[][..],
            &["True"],
            &["TRUE"],
            &["true "],
            &["1"],
            &["yes"],
            &[""],
            &["true", "true"],
            &["false", "true"],
        ] {
            assert!(!has_metadata_header(&headers(bad)), "{bad:?}");
        }
        // The header name itself is case-insensitive, as in all of HTTP.
        let mut h = HeaderMap::new();
        h.insert("METADATA", HeaderValue::from_static("true"));
        assert!(has_metadata_header(&h));
    }

    fn parse(q: &str) -> Result<TokenQuery, QueryError> {
        parse_token_query(Some(q))
    }

    #[test]
    fn selectors() {
        let r = "resource=https%3A%2F%2Fmanagement.azure.com%2F";
        let ok = |q: &str| parse(&format!("{r}&{q}")).map(|t| t.selector);
        assert_eq!(ok("api-version=2018-02-01"), Ok(Selector::Default));
        assert_eq!(ok("client_id=abc"), Ok(Selector::ClientId("abc".into())));
        assert_eq!(ok("CLIENT_ID=abc"), Ok(Selector::ClientId("abc".into())));
        assert_eq!(ok("object_id=o1"), Ok(Selector::ObjectId("o1".into())));
        let arm = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/x";
        assert_eq!(
            ok(&format!("msi_res_id={}", query_encode(arm))),
            Ok(Selector::ResourceId(arm.into()))
        );
        assert_eq!(
            ok(&format!("mi_res_id={arm}")),
            Ok(Selector::ResourceId(arm.into()))
        );
        assert_eq!(
            ok("client_id="),
            Ok(Selector::Default),
            "an empty selector is no selector"
        );
        assert_eq!(
            ok("client_id=&object_id=o"),
            Ok(Selector::ObjectId("o".into()))
        );
        assert_eq!(
            ok("client_id=a&object_id=o"),
            Err(QueryError::SeveralSelectors)
        );
        assert_eq!(
            ok("msi_res_id=a&mi_res_id=a"),
            Err(QueryError::SeveralSelectors)
        );
        assert_eq!(
            ok("client_id=a&client_id=a"),
            Err(QueryError::Repeated("client_id"))
        );
        assert_eq!(
            ok("client_id=a&Client_Id=b"),
            Err(QueryError::Repeated("client_id"))
        );
        assert_eq!(
            ok("client_id=%zz"),
            Err(QueryError::BadEncoding("client_id"))
        );
        assert_eq!(
            ok("unknown=1&bypass_cache=true&%zz=1"),
            Ok(Selector::Default)
        );
    }

    #[test]
    fn resource_and_api_version() {
        let t = parse("api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net")
            .expect("valid query");
        assert_eq!(t.resource, "https://vault.azure.net");
        assert_eq!(t.api_version.as_deref(), Some("2018-02-01"));
        let t = parse("resource=https://management.azure.com/").expect("unencoded is fine");
        assert_eq!(t.resource, "https://management.azure.com/");
        assert_eq!(t.api_version, None);
        assert_eq!(parse("resource=a+b").map(|t| t.resource), Ok("a b".into()));
        assert_eq!(
            parse("api-version=2018-02-01"),
            Err(QueryError::MissingResource)
        );
        assert_eq!(parse("resource="), Err(QueryError::MissingResource));
        assert_eq!(parse("resource"), Err(QueryError::MissingResource));
        assert_eq!(parse_token_query(None), Err(QueryError::MissingResource));
        assert_eq!(
            parse("resource=a&resource=b"),
            Err(QueryError::Repeated("resource"))
        );
    }

    #[test]
    fn query_encode_round_trips() {
        for v in [
            "https://management.azure.com/",
            "a b&c=d+e%",
            "é",
            "/subscriptions/x",
        ] {
            assert_eq!(form_decode(&query_encode(v)).as_deref(), Ok(v));
        }
        assert_eq!(query_encode("https://x/"), "https%3A%2F%2Fx%2F");
    }
}
