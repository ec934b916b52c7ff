//! Unsigned JWTs: the emulator's tokens are readable (the claims name the identity and the audience) but carry no
//! signature, and tests read them back with [`jwt_claims`].

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde_json::{Value, json};

/// `header.claims.signature` with `alg: none` and a fixed stand-in signature.
pub(super) fn unsigned(claims: &Value) -> String {
    let header = json!({"typ": "JWT", "alg": "none"});
    format!(
        "{}.{}.{}",
        base64url(header.to_string().as_bytes()),
        base64url(claims.to_string().as_bytes()),
        base64url(b"imds-emulator-unsigned")
    )
}

/// Unpadded base64url (RFC 4648 §5), as JWTs use.
pub fn base64url(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

/// Decodes what [`base64url`] encodes (for tests reading the emulator's JWT claims); `=` padding is tolerated.
pub fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

/// The claims of a JWT (unverified), for tests.
pub fn jwt_claims(token: &str) -> Option<Value> {
    let payload = token.split('.').nth(1)?;
    serde_json::from_slice(&base64url_decode(payload)?).ok()
}
