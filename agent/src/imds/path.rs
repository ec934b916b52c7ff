//! Request-path normalisation and routing.
//!
//! CVE-2022-23551 was a parser differential: NMI matched the raw path with a regex, IMDS normalised it (backslashes to
//! slashes) and served a token the pod was not bound to. Here every path is first brought to one canonical form, the
//! way the most lenient server could read it (percent-decoding until stable, backslashes as separators, duplicate
//! slashes collapsed, dot segments resolved, ASCII case folded for matching), and only then routed. Anything that is
//! not exactly the token endpoint or an instance-metadata path is refused, and a path that is forwarded is rebuilt from
//! the canonical segments with a strict character set, so IMDS never sees a form we did not check.

/// Where a request goes, decided on the canonical path only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// `/metadata/identity/oauth2/token`.
    Token,
    /// `/metadata/instance[/...]` or `/metadata/versions`: may be forwarded to IMDS as the node. Carries the canonical
    /// path to forward: the routing segments lower-cased, the rest as the caller spelled them (IMDS leaf names such
    /// as `vmId` are camel-case).
    Instance(String),
    /// Everything else: answered 403 and never forwarded.
    Forbidden(Refusal),
}

/// Why a path was refused (for logs; the caller only sees a 403).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A `%` not followed by two hex digits, or encodings nested more deeply than [`MAX_DECODE_ROUNDS`].
    BadEncoding,
    /// The decoded path is not UTF-8, or holds control characters.
    BadCharacters,
    /// A well-formed path that is not served.
    NotServed,
}

/// How many rounds of percent-decoding are undone before a path is refused. Three covers `%252e` (double encoding)
/// with room to spare; nothing legitimate is encoded even twice.
pub const MAX_DECODE_ROUNDS: usize = 3;

/// Brings a raw request path to its canonical segments (without empty and `.` segments, `..` resolved, clamped at
/// the root as RFC 3986 does). Case is preserved; [`route`] folds it.
pub fn normalise(raw: &str) -> Result<Vec<String>, Refusal> {
    let mut path = raw.to_owned();
    let mut rounds = 0;
    // Decode until nothing is left to decode: a server that decodes once more than we do must not see a different
    // path than we matched, so `%252e%252e` is read as `..`.
    while path.contains('%') {
        if rounds == MAX_DECODE_ROUNDS {
            return Err(Refusal::BadEncoding);
        }
        path = percent_decode(&path)?;
        rounds += 1;
    }
    if path.chars().any(char::is_control) {
        return Err(Refusal::BadCharacters);
    }
    let mut segments: Vec<String> = Vec::new();
    // IMDS runs on Windows infrastructure, where `\` separates path segments (the CVE-2022-23551 trick).
    for segment in path.split(['/', '\\']) {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            other => segments.push(other.to_owned()),
        }
    }
    Ok(segments)
}

/// Routes a raw request path (the path part of the request target, without the query).
pub fn route(raw: &str) -> Route {
    let segments = match normalise(raw) {
        Ok(segments) => segments,
        Err(refusal) => return Route::Forbidden(refusal),
    };
    let lower: Vec<String> = segments.iter().map(|s| s.to_ascii_lowercase()).collect();
    let lower: Vec<&str> = lower.iter().map(String::as_str).collect();
    match lower.as_slice() {
        ["metadata", "identity", "oauth2", "token"] => Route::Token,
        ["metadata", "versions"] => Route::Instance("/metadata/versions".to_owned()),
        ["metadata", "instance", ..] => {
            // Forwarded segments must be plain names: no dots, spaces, semicolons or anything else a server could read
            // as path syntax (trailing-dot trimming, path parameters, re-encoding). Every documented IMDS instance
            // path is made of such names.
            let rest = &segments[2..];
            if !rest.iter().all(|s| {
                s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            }) {
                return Route::Forbidden(Refusal::NotServed);
            }
            let mut out = String::from("/metadata/instance");
            for segment in rest {
                out.push('/');
                out.push_str(segment);
            }
            Route::Instance(out)
        }
        _ => Route::Forbidden(Refusal::NotServed),
    }
}

/// Decodes `%XX` escapes once. Any other use of `%` is refused, as is a result that is not UTF-8.
pub(crate) fn percent_decode(s: &str) -> Result<String, Refusal> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = bytes.get(i + 1).and_then(|b| hex_value(*b));
            let lo = bytes.get(i + 2).and_then(|b| hex_value(*b));
            match (hi, lo) {
                (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                _ => return Err(Refusal::BadEncoding),
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| Refusal::BadCharacters)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(p: &str) -> Route {
        Route::Instance(p.to_owned())
    }
    const NOT_SERVED: Route = Route::Forbidden(Refusal::NotServed);

    #[test]
    fn route_table() {
        let table: &[(&str, Route)] = &[
            // The token endpoint, however it is spelled.
            ("/metadata/identity/oauth2/token", Route::Token),
            ("/metadata/identity/oauth2/token/", Route::Token),
            ("/METADATA/identity/oauth2/token", Route::Token),
            ("/Metadata/Identity/OAuth2/Token", Route::Token),
            ("/metadata/identity\\oauth2\\token", Route::Token),
            ("\\metadata\\identity\\oauth2\\token\\", Route::Token),
            ("/metadata/identity\\oauth2\\token/", Route::Token),
            ("//metadata//identity///oauth2/token", Route::Token),
            ("/metadata/./identity/oauth2/./token", Route::Token),
            (
                "/metadata/identity/%2e%2e/identity/oauth2/token",
                Route::Token,
            ),
            (
                "/metadata/identity/%2E%2E/identity/oauth2/token",
                Route::Token,
            ),
            ("/metadata%2Fidentity%2Foauth2%2Ftoken", Route::Token),
            ("/metadata%2fidentity%5coauth2%5Ctoken", Route::Token),
            ("/metadata/identity/oauth2/%74oken", Route::Token),
            ("/metadata/identity/oauth2/%2574oken", Route::Token),
            ("/metadata/instance/../identity/oauth2/token", Route::Token),
            (
                "/metadata/instance/%2e%2e%2fidentity/oauth2/token",
                Route::Token,
            ),
            (
                "/metadata/instance/%252e%252e%252fidentity/oauth2/token",
                Route::Token,
            ),
            ("/x/../metadata/identity/oauth2/token", Route::Token),
            (
                "/metadata/identity/oauth2/token/../../../identity/oauth2/token",
                Route::Token,
            ),
            ("/../../metadata/identity/oauth2/token", Route::Token),
            // Instance metadata: forwarded, as the canonical path only.
            ("/metadata/instance", instance("/metadata/instance")),
            ("/metadata/instance/", instance("/metadata/instance")),
            ("/METADATA/INSTANCE", instance("/metadata/instance")),
            (
                "/metadata/instance/compute/vmId",
                instance("/metadata/instance/compute/vmId"),
            ),
            (
                "//metadata//instance//compute",
                instance("/metadata/instance/compute"),
            ),
            (
                "/metadata\\instance\\compute",
                instance("/metadata/instance/compute"),
            ),
            (
                "/metadata/identity/oauth2/token/../../../instance",
                instance("/metadata/instance"),
            ),
            (
                "/metadata/identity/oauth2/token/..%2f..%2f..%2finstance",
                instance("/metadata/instance"),
            ),
            (
                "/metadata/instance/network/interface/0/ipv4/ipAddress/0/privateIpAddress",
                instance(
                    "/metadata/instance/network/interface/0/ipv4/ipAddress/0/privateIpAddress",
                ),
            ),
            ("/metadata/versions", instance("/metadata/versions")),
            ("/Metadata/Versions/", instance("/metadata/versions")),
            // Refused: near misses and everything else.
            ("/", NOT_SERVED),
            ("", NOT_SERVED),
            ("/metadata", NOT_SERVED),
            ("/metadata/identity", NOT_SERVED),
            ("/metadata/identity/oauth2", NOT_SERVED),
            ("/metadata/identity/oauth2/token/x", NOT_SERVED),
            ("/metadata/identity/oauth2/tokens", NOT_SERVED),
            ("/metadata/identity/oauth2/token.", NOT_SERVED),
            ("/metadata/identity/oauth2/token%20", NOT_SERVED),
            ("/metadata/identity/oauth2/token;x=1", NOT_SERVED),
            ("/metadata/identity/oauth2token", NOT_SERVED),
            ("/metadata/identityoauth2/token", NOT_SERVED),
            ("/metadata/identity/oauth2/token/../../instance", NOT_SERVED),
            (
                "/metadata/identity/oauth2/token/..%2f..%2finstance",
                NOT_SERVED,
            ),
            ("/metadata/instances", NOT_SERVED),
            ("/metadata/instance/compute/..%20", NOT_SERVED),
            ("/metadata/instance/compute/vmId.", NOT_SERVED),
            ("/metadata/instance/compute;x", NOT_SERVED),
            ("/metadata/instance/a b", NOT_SERVED),
            ("/metadata/versions/x", NOT_SERVED),
            ("/metadata/attested/document", NOT_SERVED),
            ("/metadata/scheduledevents", NOT_SERVED),
            ("/metadata/loadbalancer", NOT_SERVED),
            ("/host/token", NOT_SERVED),
            ("/latest/meta-data/iam/security-credentials", NOT_SERVED),
            ("/computeMetadata/v1/instance", NOT_SERVED),
            // Malformed: refused before routing.
            (
                "/metadata/identity/oauth2/token%",
                Route::Forbidden(Refusal::BadEncoding),
            ),
            (
                "/metadata/identity/oauth2/token%2",
                Route::Forbidden(Refusal::BadEncoding),
            ),
            (
                "/metadata/identity/oauth2/%zzoken",
                Route::Forbidden(Refusal::BadEncoding),
            ),
            (
                "/metadata/identity/oauth2/token%25",
                Route::Forbidden(Refusal::BadEncoding),
            ),
            (
                "/metadata/%25252525/identity/oauth2/token",
                Route::Forbidden(Refusal::BadEncoding),
            ),
            (
                "/metadata/identity/oauth2/token%00",
                Route::Forbidden(Refusal::BadCharacters),
            ),
            (
                "/metadata/identity/oauth2/token%0a",
                Route::Forbidden(Refusal::BadCharacters),
            ),
            (
                "/metadata/identity/oauth2/token%ff",
                Route::Forbidden(Refusal::BadCharacters),
            ),
        ];
        for (raw, want) in table {
            assert_eq!(&route(raw), want, "route({raw:?})");
        }
    }

    #[test]
    fn normalise_resolves_dot_segments_and_keeps_case() {
        assert_eq!(
            normalise("/a/B/../c/./D//"),
            Ok(vec!["a".to_owned(), "c".to_owned(), "D".to_owned()])
        );
        assert_eq!(normalise("/../.."), Ok(vec![]));
        assert_eq!(normalise("/a%2F..%2Fb"), Ok(vec!["b".to_owned()]));
    }

    #[test]
    fn percent_decode_is_one_round() {
        assert_eq!(percent_decode("%252e").as_deref(), Ok("%2e"));
        assert_eq!(percent_decode("a%20b").as_deref(), Ok("a b"));
        assert_eq!(percent_decode("%c3%a9").as_deref(), Ok("é"));
        assert_eq!(percent_decode("%"), Err(Refusal::BadEncoding));
        assert_eq!(percent_decode("%g0"), Err(Refusal::BadEncoding));
    }
}
