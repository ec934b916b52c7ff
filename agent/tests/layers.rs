//! Guardrails on the shape of `agent/src`, so that the layout docs/architecture.md describes stays true:
//! arrows point downstream (a lower layer never names a higher one), no two files import each other (directly or
//! around a loop), and every file stays readable in one sitting.
//!
//! The source is read as text: `crate::a::b` and `super::x` paths outside `#[cfg(test)]` code are the arrows. That
//! is cruder than a compiler's view, and enough for a layout whose modules name each other by path.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// Each top-level module and the modules it may use. Data flows from the kernel up: the kernel's records
/// (`datapath`), who is calling (`attest`), which identity it has (`identity`), the IMDS answer (`imds`), the front
/// door (`server`); `telemetry` is below all of them, `cli` is the command line's contract, and `run` wires it all.
const ALLOWED: &[(&str, &[&str])] = &[
    ("telemetry", &[]),
    ("datapath", &["telemetry"]),
    ("attest", &["datapath", "telemetry"]),
    ("identity", &["attest", "telemetry"]),
    ("imds", &["identity", "attest", "telemetry"]),
    (
        "server",
        &["imds", "identity", "attest", "datapath", "telemetry"],
    ),
    ("cli", &["identity", "telemetry"]),
    ("boot", &["cli", "attest", "datapath", "telemetry"]),
    (
        "run",
        &[
            "cli",
            "server",
            "imds",
            "identity",
            "attest",
            "datapath",
            "telemetry",
        ],
    ),
];

/// Non-test lines a file may hold: one sitting's read.
const MAX_LINES: usize = 400;

struct Module {
    /// `["imds", "token", "cache"]` for `imds/token/cache/mod.rs`.
    path: Vec<String>,
    /// The file's text without its tests.
    code: String,
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every non-test source file under `agent/src`, as a module path.
fn modules() -> Vec<Module> {
    let mut out = Vec::new();
    let mut dirs = vec![src()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("read agent/src") {
            let path = entry.expect("dir entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if path.is_dir() {
                if name != "tests" {
                    dirs.push(path);
                }
                continue;
            }
            if !name.ends_with(".rs") || name == "tests.rs" {
                continue;
            }
            let rel = path.strip_prefix(src()).expect("under src");
            let mut parts: Vec<String> = rel
                .iter()
                .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
                .collect();
            if matches!(
                parts.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                parts.pop();
            }
            let text = fs::read_to_string(&path).expect("read source file");
            let code = text.split("#[cfg(test)]").next().unwrap_or("").to_owned();
            out.push(Module { path: parts, code });
        }
    }
    out
}

/// The modules a file names: `crate::a::b::c` resolved to the longest module path that exists, `super::x` relative
/// to the file's parent, both inside `use` groups (`crate::{a, b::c}`) too.
fn arrows(module: &Module, known: &BTreeSet<Vec<String>>) -> BTreeSet<Vec<String>> {
    let mut found = BTreeSet::new();
    let resolve = |mut base: Vec<String>, rest: &str| {
        let mut best = None;
        for seg in rest.split("::") {
            let seg = seg.trim();
            if seg.is_empty()
                || !seg
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit())
            {
                break;
            }
            base.push(seg.to_owned());
            if known.contains(&base) {
                best = Some(base.clone());
            }
        }
        best
    };
    for (anchor, base) in [
        ("crate::", Vec::new()),
        (
            "super::",
            module.path[..module.path.len().saturating_sub(1)].to_vec(),
        ),
    ] {
        let mut rest = module.code.as_str();
        while let Some(at) = rest.find(anchor) {
            rest = &rest[at + anchor.len()..];
            let tail: String = if let Some(group) = rest.strip_prefix('{') {
                group.split('}').next().unwrap_or("").to_owned()
            } else {
                rest.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect()
            };
            for item in tail.split(',') {
                if let Some(target) = resolve(base.clone(), item.trim()) {
                    found.insert(target);
                }
            }
        }
    }
    found
}

fn graph() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let modules = modules();
    let known: BTreeSet<Vec<String>> = modules.iter().map(|m| m.path.clone()).collect();
    modules
        .iter()
        .map(|m| (m.path.clone(), arrows(m, &known)))
        .collect()
}

#[test]
fn no_layer_names_a_layer_above_it() {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut wrong = Vec::new();
    for (from, tos) in graph() {
        let Some(top) = from.first() else { continue };
        let Some(may) = allowed.get(top.as_str()) else {
            assert!(
                from.is_empty(),
                "agent/src/{top} is a new top-level module: add it to ALLOWED with the layers it may use"
            );
            continue;
        };
        for to in tos {
            let target = &to[0];
            if target != top && !may.contains(&target.as_str()) {
                wrong.push(format!("{} -> {}", from.join("::"), to.join("::")));
            }
        }
    }
    assert!(wrong.is_empty(), "arrows pointing upstream: {wrong:#?}");
}

#[test]
fn no_two_files_import_each_other_even_around_a_loop() {
    // A file may use its own ancestors (a folder's mod.rs is its facade); every other arrow must be acyclic.
    let graph: BTreeMap<_, BTreeSet<_>> = graph()
        .into_iter()
        .map(|(from, tos)| {
            let tos = tos.into_iter().filter(|to| !from.starts_with(to)).collect();
            (from, tos)
        })
        .collect();
    fn visit<'a>(
        node: &'a Vec<String>,
        graph: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        stack: &mut Vec<&'a Vec<String>>,
        done: &mut BTreeSet<&'a Vec<String>>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| *n == node) {
            return Some(stack[at..].iter().map(|n| n.join("::")).collect());
        }
        if !done.insert(node) {
            return None;
        }
        stack.push(node);
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, stack, done) {
                return Some(cycle);
            }
        }
        stack.pop();
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        let cycle = visit(node, &graph, &mut Vec::new(), &mut done);
        assert!(cycle.is_none(), "files importing each other: {cycle:?}");
    }
}

#[test]
fn every_file_reads_in_one_sitting() {
    let long: Vec<String> = modules()
        .into_iter()
        .filter(|m| m.code.lines().count() > MAX_LINES)
        .map(|m| format!("{} ({} lines)", m.path.join("/"), m.code.lines().count()))
        .collect();
    assert!(
        long.is_empty(),
        "files over {MAX_LINES} lines of non-test code; split them along a seam: {long:?}"
    );
}
