//! The agent's own cgroups in the pinned `NMI_EXEMPT` set, before anything is loaded.
//!
//! A restarted agent (a new container after a crash or a rollout) runs in a new cgroup, and the programs an earlier
//! agent pinned are still attached: their bind guard lets only exempt cgroups take the agent's port, so the new agent
//! would be refused its own listener (EPERM). It must therefore add its cgroup to every pinned exempt set before it
//! binds; [`super::Datapath::start`] then writes the same set again for its own programs.

use std::{fs, path::Path};

use aya::maps::{HashMap, Map, MapData};
use nmi_agent_ebpf::abi;

use super::DatapathError;

/// Adds `cgroup_id` to the exempt set of every layout version pinned under `pin_dir` (an older agent's programs may
/// still be the ones attached), first dropping the ids of agents' cgroups that are gone (`is_live` says which still
/// exist): every restart brings a new cgroup, and the set holds only [`abi::EXEMPT_MAX`] of them. Returns how many
/// sets it added to; none pinned (a first start) is not an error.
pub fn exempt_in_pinned(
    pin_dir: &Path,
    cgroup_id: u64,
    is_live: impl Fn(u64) -> bool,
) -> Result<usize, DatapathError> {
    let Ok(entries) = fs::read_dir(pin_dir) else {
        return Ok(0);
    };
    let mut added = 0;
    for entry in entries.flatten() {
        let pin = entry.path().join("maps").join(abi::MAP_EXEMPT);
        if !entry.file_name().to_string_lossy().starts_with('v') || !pin.exists() {
            continue;
        }
        let failed = |what| {
            let path = pin.clone();
            move |source| DatapathError::PinnedMap { what, path, source }
        };
        let data = MapData::from_pin(&pin).map_err(failed("opening the pinned map"))?;
        let mut exempt: HashMap<_, u64, u32> =
            HashMap::try_from(Map::HashMap(data)).map_err(failed("reading the pinned map"))?;
        // Dead agents' cgroups first (a cgroup id is never reused, so a gone one never comes back); a live one may be
        // an agent still draining during a rolling update.
        let gone: Vec<u64> = exempt
            .keys()
            .filter_map(Result::ok)
            .filter(|&id| id != cgroup_id && !is_live(id))
            .collect();
        for id in gone {
            let _ = exempt.remove(&id);
        }
        exempt
            .insert(cgroup_id, 1, 0)
            .map_err(failed("adding this agent's cgroup to the pinned map"))?;
        added += 1;
    }
    Ok(added)
}
