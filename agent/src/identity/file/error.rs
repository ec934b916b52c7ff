//! What can be wrong with a bindings file: unreadable, not YAML of the expected shape (with the parser's line), or
//! invalid (every problem, each with its line).

use std::{fmt, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("reading bindings file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Syntax {
        path: PathBuf,
        /// 1-based line of the YAML error, when the parser knows it.
        line: Option<u32>,
        message: String,
    },
    #[error("{}: {}", path.display(), ProblemList(problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

impl FileError {
    /// The first line the error points at, if any (for tests and log fields).
    pub fn line(&self) -> Option<u32> {
        match self {
            FileError::Read { .. } => None,
            FileError::Syntax { line, .. } => *line,
            FileError::Invalid { problems, .. } => problems.first().map(|p| p.line),
        }
    }
}

/// One validation problem and the line it is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub line: u32,
    pub kind: ProblemKind,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.kind)
    }
}

struct ProblemList<'a>(&'a [Problem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProblemKind {
    #[error("identity name is empty")]
    EmptyName,
    #[error("identity `{name}` is defined twice (first on line {first_line})")]
    DuplicateIdentity { name: String, first_line: u32 },
    #[error("identity `{name}` has an empty clientID")]
    EmptyClientId { name: String },
    #[error(
        "identity `{name}`: clientID `{value}` is not a GUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)"
    )]
    InvalidClientId { name: String, value: String },
    #[error("identity `{name}`: objectID `{value}` is not a GUID")]
    InvalidObjectId { name: String, value: String },
    #[error(
        "identity `{name}`: resourceID `{value}` is not the ARM id of a user-assigned identity \
         (/subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>)"
    )]
    InvalidResourceId { name: String, value: String },
    #[error("binding names unknown identity `{identity}`")]
    UnknownIdentity { identity: String },
    #[error("binding cgroup is empty; use \".\" to bind the whole intercepted cgroup")]
    EmptyCgroup,
    #[error("binding cgroup `{0}` is absolute; write it relative to --cgroup")]
    AbsoluteCgroup(String),
    #[error("binding cgroup `{0}` contains `..`; bindings cannot reach outside --cgroup")]
    ParentCgroup(String),
}

impl ProblemKind {
    /// The identity an identity-level problem is about (not set for a duplicate name: the first definition stands).
    pub(super) fn invalid_identity(&self) -> Option<&str> {
        match self {
            ProblemKind::InvalidClientId { name, .. }
            | ProblemKind::EmptyClientId { name }
            | ProblemKind::InvalidObjectId { name, .. }
            | ProblemKind::InvalidResourceId { name, .. } => Some(name),
            _ => None,
        }
    }
}
