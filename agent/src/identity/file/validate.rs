//! From the parsed YAML to a [`Bindings`] table: every identity and binding is checked, every problem is reported
//! with its line (not only the first), and a file with any problem yields no table at all. What is valid but
//! probably not meant (an unused identity, one client id under two names, a path with several identities) becomes a
//! warning.

use std::{
    collections::{BTreeSet, HashMap},
    path::{Component, Path, PathBuf},
    sync::Arc,
};

use serde_saphyr::Spanned;

use super::{
    bindings::Bindings,
    error::{FileError, Problem, ProblemKind},
    schema::{self, RawBinding, RawFile, RawIdentity, line_of},
};
use crate::identity::{
    azure_id::{is_guid, is_uami_resource_id},
    binding::{Identity, IdentityKind},
};

/// Parses and validates a bindings file's text. `path` only names the file in errors.
pub fn parse(path: &Path, text: &str) -> Result<Bindings, FileError> {
    validate(path, schema::parse(path, text)?)
}

/// Validates a parsed file. `path` only names the file in errors.
pub fn validate(path: &Path, raw: RawFile) -> Result<Bindings, FileError> {
    let mut problems = Vec::new();
    let named = identities(raw.identities.unwrap_or_default(), &mut problems);
    let table = bindings(raw.bindings.unwrap_or_default(), &named, &mut problems);
    if !problems.is_empty() {
        problems.sort_by_key(|p| p.line);
        return Err(FileError::Invalid {
            path: path.to_owned(),
            problems,
        });
    }
    let more = unused_and_crowded(&named, &table);
    let mut warnings = named.warnings;
    warnings.extend(more);
    Ok(Bindings {
        by_path: table.by_path,
        identities: named.order.len(),
        bindings: table.bindings,
        warnings,
    })
}

/// The valid identities by name, in file order.
struct Named {
    by_name: HashMap<String, (u32, Arc<Identity>)>,
    order: Vec<String>,
    warnings: Vec<String>,
}

/// Checks each identity; the valid ones are kept, every problem is pushed onto `problems`.
fn identities(items: Vec<Spanned<RawIdentity>>, problems: &mut Vec<Problem>) -> Named {
    let mut named = Named {
        by_name: HashMap::new(),
        order: Vec::new(),
        warnings: Vec::new(),
    };
    let mut by_client_id: HashMap<String, String> = HashMap::new();
    for item in items {
        let line = line_of(&item);
        let RawIdentity {
            name,
            client_id,
            resource_id,
            object_id,
        } = item.value;
        let mut ok = true;
        let mut problem = |kind| {
            problems.push(Problem { line, kind });
            ok = false;
        };
        if name.trim().is_empty() {
            problem(ProblemKind::EmptyName);
        }
        if client_id.trim().is_empty() {
            problem(ProblemKind::EmptyClientId { name: name.clone() });
        } else if !is_guid(&client_id) {
            problem(ProblemKind::InvalidClientId {
                name: name.clone(),
                value: client_id.clone(),
            });
        }
        if let Some(object_id) = object_id.as_ref().filter(|o| !is_guid(o)) {
            problem(ProblemKind::InvalidObjectId {
                name: name.clone(),
                value: object_id.clone(),
            });
        }
        if let Some(resource_id) = resource_id.as_ref().filter(|r| !is_uami_resource_id(r)) {
            problem(ProblemKind::InvalidResourceId {
                name: name.clone(),
                value: resource_id.clone(),
            });
        }
        if let Some((first_line, _)) = named.by_name.get(&name) {
            problem(ProblemKind::DuplicateIdentity {
                name: name.clone(),
                first_line: *first_line,
            });
        }
        if !ok {
            continue;
        }
        if let Some(other) = by_client_id.insert(client_id.to_ascii_lowercase(), name.clone()) {
            named.warnings.push(format!(
                "line {line}: identities `{other}` and `{name}` have the same clientID; they are one identity to IMDS"
            ));
        }
        let identity = Arc::new(Identity {
            name: name.clone(),
            namespace: None,
            client_id,
            resource_id,
            object_id,
            kind: IdentityKind::UserAssigned,
        });
        named.order.push(name.clone());
        named.by_name.insert(name, (line, identity));
    }
    named
}

/// The bindings of the valid identities, by cgroup path.
struct Table {
    by_path: HashMap<PathBuf, Vec<Arc<Identity>>>,
    used: BTreeSet<String>,
    bindings: usize,
}

/// Checks each binding and files it under its cgroup path; every problem is pushed onto `problems`.
fn bindings(items: Vec<Spanned<RawBinding>>, named: &Named, problems: &mut Vec<Problem>) -> Table {
    let mut table = Table {
        by_path: HashMap::new(),
        used: BTreeSet::new(),
        bindings: 0,
    };
    for item in items {
        let line = line_of(&item);
        let RawBinding { cgroup, identity } = item.value;
        let key = match binding_key(&cgroup) {
            Ok(key) => Some(key),
            Err(kind) => {
                problems.push(Problem { line, kind });
                None
            }
        };
        let Some((_, id)) = named.by_name.get(&identity) else {
            // A binding to an identity that itself failed validation is reported once, at the identity.
            if !problems
                .iter()
                .any(|p| p.kind.invalid_identity() == Some(identity.as_str()))
            {
                problems.push(Problem {
                    line,
                    kind: ProblemKind::UnknownIdentity { identity },
                });
            }
            continue;
        };
        let Some(key) = key else { continue };
        table.bindings += 1;
        table.used.insert(identity.clone());
        let ids = table.by_path.entry(key).or_default();
        // The same identity bound twice to one path is one binding.
        if !ids.iter().any(|i| i.name == id.name) {
            ids.push(Arc::clone(id));
        }
    }
    table
}

/// Warnings about a valid file: identities bound nowhere, paths whose callers must name their identity, and a file
/// that binds nothing.
fn unused_and_crowded(named: &Named, table: &Table) -> Vec<String> {
    let mut warnings = Vec::new();
    for name in &named.order {
        if !table.used.contains(name)
            && let Some((line, _)) = named.by_name.get(name)
        {
            warnings.push(format!(
                "line {line}: identity `{name}` is not bound to any cgroup"
            ));
        }
    }
    let mut crowded: Vec<_> = table
        .by_path
        .iter()
        .filter(|(_, ids)| ids.len() > 1)
        .collect();
    crowded.sort_by(|a, b| a.0.cmp(b.0));
    for (p, ids) in crowded {
        let names: Vec<&str> = ids.iter().map(|i| i.name.as_str()).collect();
        warnings.push(format!(
            "cgroup {} has {} identities ({}); its requests must name one with client_id, object_id or msi_res_id",
            p.display(),
            ids.len(),
            names.join(", ")
        ));
    }
    if table.bindings == 0 {
        warnings.push("the file binds nothing: every caller is unbound".to_owned());
    }
    warnings
}

/// `orders/api` -> `/orders/api`; `.` -> `/`.
fn binding_key(cgroup: &str) -> Result<PathBuf, ProblemKind> {
    let trimmed = cgroup.trim();
    if trimmed.is_empty() {
        return Err(ProblemKind::EmptyCgroup);
    }
    let path = Path::new(trimmed);
    if path.has_root() {
        return Err(ProblemKind::AbsoluteCgroup(cgroup.to_owned()));
    }
    let mut key = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(n) => key.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err(ProblemKind::ParentCgroup(cgroup.to_owned())),
            Component::RootDir | Component::Prefix(_) => {
                return Err(ProblemKind::AbsoluteCgroup(cgroup.to_owned()));
            }
        }
    }
    Ok(key)
}
