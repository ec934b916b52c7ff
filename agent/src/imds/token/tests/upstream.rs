//! Tests of the hyper client to IMDS.

use std::time::Duration;

use http::HeaderMap;

use crate::imds::token::upstream::{HttpUpstream, TransportError, Upstream};

#[test]
fn upstream_url_validation() {
    for ok in [
        "http://169.254.169.254",
        "http://169.254.169.254/",
        "http://127.0.0.1:8080",
        "http://imds.local",
    ] {
        assert!(
            HttpUpstream::new(ok, Duration::from_secs(1)).is_ok(),
            "{ok}"
        );
    }
    for bad in [
        "https://169.254.169.254",
        "169.254.169.254",
        "http://x/metadata",
        "http://x/?a=b",
        "",
        "ftp://x",
    ] {
        assert!(
            HttpUpstream::new(bad, Duration::from_secs(1)).is_err(),
            "{bad}"
        );
    }
}

#[tokio::test]
async fn http_upstream_reports_connect_errors() {
    // Port 1 on loopback: nothing listens there, so the connect is refused at once.
    let up = HttpUpstream::new("http://127.0.0.1:1", Duration::from_secs(2)).expect("valid url");
    let r = up.get("/metadata/instance", &HeaderMap::new()).await;
    assert!(matches!(r, Err(TransportError::Connect(_))), "{r:?}");
}
