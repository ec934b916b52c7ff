//! Request paths: routing never panics, normalising is idempotent, and a path that may be forwarded is canonical and
//! inside the allow list (the CVE-2022-23551 class: no spelling of a path may reach IMDS as another path).

use nmi_agent::imds::path::{Route, normalise, route};

const TOKEN: [&str; 4] = ["metadata", "identity", "oauth2", "token"];

pub fn check(data: &[u8]) {
    let raw = String::from_utf8_lossy(data);
    let routed = route(&raw);
    if let Ok(segments) = normalise(&raw) {
        assert!(
            segments
                .iter()
                .all(|s| !s.is_empty() && s != "." && s != ".." && !s.contains(['/', '\\', '%'])),
            "normalise({raw:?}) left a separator, dot or escape in {segments:?}"
        );
        let again = format!("/{}", segments.join("/"));
        assert_eq!(
            normalise(&again).as_ref(),
            Ok(&segments),
            "normalising {raw:?} twice differs from once"
        );
        assert_eq!(
            route(&again),
            routed,
            "{raw:?} and its canonical form {again:?} route differently"
        );
    }
    match &routed {
        Route::Token => {
            let segments = normalise(&raw).expect("a token route comes from a normalised path");
            assert!(
                segments.len() == TOKEN.len()
                    && segments
                        .iter()
                        .zip(TOKEN)
                        .all(|(s, t)| s.eq_ignore_ascii_case(t)),
                "{raw:?} routed to the token endpoint from {segments:?}"
            );
        }
        Route::Instance(forwarded) => {
            assert!(
                is_allowed_upstream(forwarded),
                "{raw:?} forwards {forwarded:?}"
            );
            assert_eq!(
                route(forwarded),
                routed,
                "the forwarded path {forwarded:?} of {raw:?} routes elsewhere"
            );
        }
        Route::Forbidden(_) => {}
    }
}

/// The instance-metadata paths the agent may forward: `/metadata/versions`, `/metadata/instance` and plain names
/// below it.
pub fn is_allowed_upstream(path: &str) -> bool {
    if path == "/metadata/versions" {
        return true;
    }
    let Some(rest) = path.strip_prefix("/metadata/instance") else {
        return false;
    };
    rest.is_empty()
        || rest.strip_prefix('/').is_some_and(|names| {
            names.split('/').all(|name| {
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
        })
}
