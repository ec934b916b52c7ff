//! Replays every saved input through its target's property with plain `cargo test` (no nightly, no libFuzzer): the
//! crashes fuzzing found (`regressions/<target>/`) stay fixed, and the seed corpus (`corpus/<target>/`) still holds.

use std::{fs, path::Path};

use crate::TARGETS;

fn replay(dir: &str) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut replayed = 0;
    for (target, check) in TARGETS {
        let Ok(entries) = fs::read_dir(root.join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("list a regression directory").path();
            let input = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            eprintln!("{target}: {}", path.display());
            check(&input);
            replayed += 1;
        }
    }
    replayed
}

#[test]
fn saved_crashes_stay_fixed() {
    replay("regressions");
}

#[test]
fn the_seed_corpus_holds_the_properties() {
    assert!(replay("corpus") > 0, "no seed corpus under fuzz/corpus");
}

#[test]
fn every_fuzz_target_is_replayed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz_targets");
    let mut files: Vec<String> = fs::read_dir(&dir)
        .expect("list fuzz_targets")
        .map(|e| {
            let path = e.expect("list fuzz_targets").path();
            path.file_stem()
                .expect("a file name")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    files.sort();
    let mut listed: Vec<String> = TARGETS.iter().map(|(name, _)| (*name).to_owned()).collect();
    listed.sort();
    assert_eq!(files, listed, "fuzz_targets/ and TARGETS differ");
}
