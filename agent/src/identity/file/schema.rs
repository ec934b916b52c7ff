//! The bindings file as written: serde types with line numbers (`Spanned`), and YAML syntax errors with theirs.
//! Unknown fields are refused, so a misspelt key (`clientId`) is an error on its line instead of being ignored.

use std::path::Path;

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::error::FileError;

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    // Option: a key with nothing under it (`identities:` on a fresh install) is YAML null, and means "none yet".
    #[serde(default)]
    pub identities: Option<Vec<Spanned<RawIdentity>>>,
    #[serde(default)]
    pub bindings: Option<Vec<Spanned<RawBinding>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIdentity {
    pub name: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    #[serde(rename = "resourceID", default)]
    pub resource_id: Option<String>,
    #[serde(rename = "objectID", default)]
    pub object_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBinding {
    pub cgroup: String,
    pub identity: String,
}

/// Parses a bindings file's text. `path` only names the file in errors.
pub fn parse(path: &Path, text: &str) -> Result<RawFile, FileError> {
    // An empty (or comment-only) file is a valid "nothing bound" file, not a syntax error.
    if text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        return Ok(RawFile::default());
    }
    serde_saphyr::from_str(text).map_err(|e| FileError::Syntax {
        path: path.to_owned(),
        line: e.location().map(|l| l.line() as u32),
        message: e.without_snippet().to_string(),
    })
}

/// The 1-based line an item starts on.
pub fn line_of<T>(s: &Spanned<T>) -> u32 {
    s.referenced.line() as u32
}
