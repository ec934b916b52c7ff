//! The pin directory: `<pin-dir>/v<LAYOUT_VERSION>/{maps,links}`, replaced make-before-break, and removed by
//! `nmi-agent uninstall`.
//!
//! A start loads fresh programs against the pinned maps, attaches and pins the new links, and only then removes the
//! previous links ("make before break"), so there is no moment in which pods' connects to IMDS are not redirected.
//! Pins of another layout version are retired after that, the same way.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aya::programs::links::{FdLink, PinnedLink};
use nmi_agent_ebpf::abi::LAYOUT_VERSION;

use super::{
    DatapathError,
    bpffs::{self, ensure_bpffs},
    error::io,
};

/// The versioned directory that holds this layout's pins.
pub fn state_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("v{LAYOUT_VERSION}"))
}

/// One start's view of the pin directory: the links an earlier run left, and the ones this run adds.
#[derive(Debug)]
pub struct Pins {
    pin_dir: PathBuf,
    state: PathBuf,
    maps_dir: PathBuf,
    links_dir: PathBuf,
    /// Links pinned by an earlier run, retired once this run's are live.
    previous: Vec<PathBuf>,
    /// Suffix of this run's link pins, so they never collide with the previous run's.
    generation: u128,
    links: Vec<PathBuf>,
}

impl Pins {
    /// Makes sure the layout directories exist on a bpf filesystem (mounting one when needed) and notes which links
    /// are pinned there already.
    pub fn prepare(pin_dir: &Path) -> Result<Self, DatapathError> {
        ensure_bpffs(pin_dir).map_err(DatapathError::Bpffs)?;
        if bpffs::is_bpffs_root(pin_dir) {
            return Err(DatapathError::Bpffs(format!(
                "--pin-dir {} is the root of a bpf filesystem; give nmi-agent a directory of its own under it",
                pin_dir.display()
            )));
        }
        let state = state_dir(pin_dir);
        let (maps_dir, links_dir) = (state.join("maps"), state.join("links"));
        for dir in [&maps_dir, &links_dir] {
            fs::create_dir_all(dir).map_err(io("creating", dir))?;
        }
        let previous = list_dir(&links_dir)?;
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Ok(Pins {
            pin_dir: pin_dir.to_owned(),
            state,
            maps_dir,
            links_dir,
            previous,
            generation,
            links: Vec::new(),
        })
    }

    /// Where the programs' maps are pinned (and found again by the next start).
    pub fn maps_dir(&self) -> &Path {
        &self.maps_dir
    }

    /// Pins the link of program `name`, next to (not instead of) the previous run's.
    pub fn pin_link(&mut self, name: &str, link: FdLink) -> Result<(), DatapathError> {
        // bpffs reserves names containing a dot, hence the dash.
        let path = self.links_dir.join(format!("{name}-{}", self.generation));
        link.pin(&path).map_err(|source| DatapathError::Pin {
            path: path.clone(),
            source,
        })?;
        self.links.push(path);
        Ok(())
    }

    /// The break after the make: removes the previous run's links, then any pins of another layout version. Call only
    /// once every new link is pinned. Returns the paths of this run's links.
    pub fn retire_previous(self) -> Vec<PathBuf> {
        for old in &self.previous {
            remove_pin(old);
        }
        retire_other_layouts(&self.pin_dir, &self.state);
        self.links
    }
}

/// The links of this layout pinned under `pin_dir` that still open as links, each with the program it was pinned for
/// (the name before the generation suffix).
pub fn pinned_links(pin_dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(pins) = list_dir(&state_dir(pin_dir).join("links")) else {
        return Vec::new();
    };
    pins.into_iter()
        .filter(|pin| PinnedLink::from_pin(pin).is_ok())
        .filter_map(|pin| {
            let (program, _generation) = pin.file_name()?.to_str()?.rsplit_once('-')?;
            Some((program.to_owned(), pin.clone()))
        })
        .collect()
}

/// Removes every layout directory (`v<N>`) nmi-agent pinned under `pin_dir`, then `pin_dir` itself if that left it
/// empty; the kernel detaches each program once its last link reference is gone. Nothing else under `pin_dir` is
/// touched, so a mistaken `--pin-dir /sys/fs/bpf` cannot wipe other software's pins.
pub fn uninstall(pin_dir: &Path) -> Result<Uninstalled, DatapathError> {
    if !pin_dir.exists() {
        return Ok(Uninstalled::default());
    }
    let layouts: Vec<PathBuf> = list_dir(pin_dir)?
        .into_iter()
        .filter(|p| is_layout_dir(p))
        .collect();
    let programs: Vec<u32> = layouts
        .iter()
        .flat_map(|layout| list_dir(&layout.join("links")).unwrap_or_default())
        .filter_map(|pin| linked_program(&pin))
        .collect();
    for layout in &layouts {
        fs::remove_dir_all(layout).map_err(io("removing", layout))?;
    }
    // Only if nothing else lives there; an error (not empty) is the answer, not a failure.
    let _ = fs::remove_dir(pin_dir);
    Ok(Uninstalled {
        removed: !layouts.is_empty(),
        still_loaded: wait_until_unloaded(&programs),
        filters_removed: Vec::new(),
    })
}

/// What `uninstall` did.
#[derive(Debug, Default)]
pub struct Uninstalled {
    /// Pins were found and removed.
    pub removed: bool,
    /// Programs the kernel had not detached yet when `uninstall` stopped waiting (normally none).
    pub still_loaded: Vec<u32>,
    /// Devices the forwarding guard's clsact filter was removed from (kernels without TCX).
    pub filters_removed: Vec<String>,
}

/// The id of the program a pinned link attaches, read before the pin goes.
fn linked_program(pin: &Path) -> Option<u32> {
    let link = FdLink::from(PinnedLink::from_pin(pin).ok()?);
    let id = link.info().ok()?.program_id();
    // Dropping `link` closes our own reference, so the pin is the last one.
    Some(id)
}

/// How long `uninstall` waits for the kernel to detach what it unpinned.
const DETACH_WAIT: Duration = Duration::from_secs(5);

/// Removing a link's last pin does not detach it at once: the kernel frees the link from a workqueue, and only then
/// detaches its program. Waiting for the programs themselves to go (they are freed after the detach) makes
/// `uninstall`'s promise hold when it returns: pods reach IMDS directly again. Returns those still loaded at the
/// deadline.
fn wait_until_unloaded(programs: &[u32]) -> Vec<u32> {
    let deadline = Instant::now() + DETACH_WAIT;
    loop {
        let loaded: Vec<u32> = aya::programs::loaded_programs()
            .filter_map(|p| p.ok().map(|p| p.id()))
            .filter(|id| programs.contains(id))
            .collect();
        if loaded.is_empty() || Instant::now() >= deadline {
            return loaded;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `v` followed by digits: the directories [`state_dir`] makes.
fn is_layout_dir(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix('v'))
        .is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, DatapathError> {
    let entries = fs::read_dir(dir).map_err(io("listing", dir))?;
    Ok(entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
}

fn remove_pin(path: &Path) {
    if let Err(e) = fs::remove_file(path) {
        tracing::warn!(path = %path.display(), error = %e, "could not remove a previous link pin; it stays attached");
    }
}

fn retire_other_layouts(pin_dir: &Path, current: &Path) {
    let Ok(entries) = fs::read_dir(pin_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if is_layout_dir(&path) && path != current {
            tracing::info!(path = %path.display(), "retiring pins of another layout version");
            if let Err(e) = fs::remove_dir_all(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove pins of another layout version");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_v_and_digits_names_a_layout_directory() {
        for yes in ["v1", "v42"] {
            assert!(is_layout_dir(Path::new(yes)), "{yes}");
        }
        for no in ["v", "va", "v1a", "1", "maps", "V1"] {
            assert!(!is_layout_dir(Path::new(no)), "{no}");
        }
    }

    #[test]
    fn uninstall_removes_layout_directories_and_leaves_everything_else() {
        let root = tempfile::tempdir().expect("tempdir");
        let pin_dir = root.path().join("nmi-agent");
        for layout in ["v1/links", "v2/maps"] {
            fs::create_dir_all(pin_dir.join(layout)).expect("mkdir");
        }
        fs::create_dir_all(pin_dir.join("someone-else")).expect("mkdir");

        assert!(
            uninstall(&pin_dir).expect("uninstall").removed,
            "reported nothing removed"
        );
        assert!(!pin_dir.join("v1").exists() && !pin_dir.join("v2").exists());
        assert!(
            pin_dir.join("someone-else").exists(),
            "removed what nmi-agent did not pin"
        );

        fs::remove_dir(pin_dir.join("someone-else")).expect("rmdir");
        fs::create_dir_all(pin_dir.join("v3")).expect("mkdir");
        assert!(uninstall(&pin_dir).expect("uninstall").removed);
        assert!(!pin_dir.exists(), "an emptied pin dir stays");
        assert!(!uninstall(&pin_dir).expect("uninstall of nothing").removed);
    }
}
