//! Standalone mode: a YAML bindings file maps cgroup subtrees (relative to the intercepted `--cgroup`) to identities.
//!
//! ```yaml
//! identities:
//!   - name: orders
//!     clientID: "11111111-1111-1111-1111-111111111111"
//!     resourceID: "/subscriptions/.../userAssignedIdentities/orders"   # optional
//!     objectID: "..."                                                  # optional
//! bindings:
//!   - cgroup: "orders"        # this cgroup and everything below it
//!     identity: orders
//! ```
//!
//! A binding covers its cgroup and everything below it. The most specific (longest) binding path that covers a
//! caller wins; several bindings for the very same path bind several identities. `cgroup: "."` binds the intercepted
//! root itself (and so every caller that no deeper binding covers).
//!
//! Reloads (SIGHUP, or a change seen by a 2 s metadata poll) build a complete new table and swap it in one step; a
//! file that fails to parse or validate leaves the old table in force. Polling `stat` instead of inotify is
//! deliberate: a ConfigMap volume updates files by swapping a `..data` symlink, which an inotify watch on the file
//! itself never sees, while `stat` follows the link; and one `stat` every 2 s costs nothing.
//!
//! - `schema`: the YAML as written (serde types), and syntax errors with their line.
//! - `validate`: the parsed YAML turned into a [`Bindings`] table, or every problem with its line.
//! - `bindings`: the table, and the longest-prefix lookup of a cgroup in it.
//! - `source`: [`FileSource`], which holds the table in force and reloads it (SIGHUP, poll).
//! - `error`: what can be wrong with a file.

mod bindings;
mod error;
mod schema;
mod source;
mod validate;

pub use bindings::Bindings;
pub use error::{FileError, Problem, ProblemKind};
pub use source::{DEFAULT_POLL, FileSource};
pub use validate::parse;

#[cfg(test)]
mod tests;
