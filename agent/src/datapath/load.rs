//! Loading: open the eBPF object against the pinned maps, fill in its configuration (`NMI_CONFIG`, the exempt cgroups)
//! and attach each program to the intercepted cgroup.

use std::{fs, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap},
    programs::{CgroupAttachMode, CgroupSkbAttachType, Program, links::FdLink},
};
use nmi_agent_ebpf::abi::{self, RedirectConfig};

use super::{DatapathError, Options};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nmi-agent-ebpf.o"));

/// The order in which programs are attached. The guard and the bookkeeping programs go first, the redirect last: at no
/// point is a redirect live without the sockops program that makes it attestable.
pub const ATTACH_ORDER: [&str; 8] = [
    abi::PROG_EGRESS,
    abi::PROG_BIND4,
    abi::PROG_BIND6,
    abi::PROG_SOCKOPS,
    abi::PROG_SOCK_RELEASE,
    abi::PROG_GETPEERNAME4,
    abi::PROG_CONNECT6,
    abi::PROG_CONNECT4,
];

/// Whether this binary carries its eBPF object (a plain `cargo build` leaves it empty).
pub fn has_object() -> bool {
    !OBJECT.is_empty()
}

/// Loads the object; its maps are pinned in (or taken over from) `maps_dir`.
pub fn open(maps_dir: &Path) -> Result<Ebpf, DatapathError> {
    // The programs skip formatting records the agent's log level would drop anyway.
    let log_level = log::max_level() as u8;
    Ok(EbpfLoader::new()
        .default_map_pin_directory(maps_dir)
        .override_global(aya_log::LEVEL, &log_level, false)
        .load(OBJECT)?)
}

/// Writes where to redirect and whom to leave alone into the programs' maps.
pub fn configure(ebpf: &mut Ebpf, opts: &Options) -> Result<(), DatapathError> {
    let map_err =
        |name: &'static str| move |source: aya::maps::MapError| DatapathError::Map { name, source };
    let mut config: Array<_, RedirectConfig> =
        Array::try_from(map_mut(ebpf, abi::MAP_CONFIG)?).map_err(map_err(abi::MAP_CONFIG))?;
    config
        .set(
            0,
            RedirectConfig {
                target: opts.redirect.into(),
                netns_cookie: opts.netns_cookie,
                health: opts.health.map(Into::into).unwrap_or_default(),
                max_sockets_per_cgroup: opts.max_sockets_per_cgroup,
                _pad: 0,
            },
            0,
        )
        .map_err(map_err(abi::MAP_CONFIG))?;

    let mut exempt: HashMap<_, u64, u32> =
        HashMap::try_from(map_mut(ebpf, abi::MAP_EXEMPT)?).map_err(map_err(abi::MAP_EXEMPT))?;
    for &id in &opts.exempt {
        if exempt.insert(id, 1, 0).is_err() {
            // Full of ids from earlier agents' cgroups (a cgroup id is never reused): start the set over.
            let stale: Vec<u64> = exempt
                .keys()
                .filter_map(Result::ok)
                .filter(|k| !opts.exempt.contains(k))
                .collect();
            for k in stale {
                let _ = exempt.remove(&k);
            }
            exempt.insert(id, 1, 0).map_err(map_err(abi::MAP_EXEMPT))?;
        }
    }
    Ok(())
}

fn map_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::maps::Map, DatapathError> {
    ebpf.map_mut(name)
        .ok_or(DatapathError::Missing { kind: "map", name })
}

/// Loads program `name` into the kernel and attaches it to `cgroup` as a bpf_link, which the caller pins.
pub fn attach(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &fs::File,
) -> Result<FdLink, DatapathError> {
    let program = ebpf.program_mut(name).ok_or(DatapathError::Missing {
        kind: "program",
        name,
    })?;
    let err = |source| DatapathError::Program { name, source };
    let link_err = |source| DatapathError::Link { name, source };
    // Cgroup bpf_links already run side by side; any mode other than Single makes the kernel reject the link
    // (aya#1078).
    let mode = CgroupAttachMode::Single;
    let link: FdLink = match program {
        Program::CgroupSockAddr(p) => {
            p.load().map_err(err)?;
            let id = p.attach(cgroup, mode).map_err(err)?;
            p.take_link(id).map_err(err)?.try_into().map_err(link_err)?
        }
        Program::CgroupSock(p) => {
            p.load().map_err(err)?;
            let id = p.attach(cgroup, mode).map_err(err)?;
            p.take_link(id).map_err(err)?.try_into().map_err(link_err)?
        }
        Program::SockOps(p) => {
            p.load().map_err(err)?;
            let id = p.attach(cgroup, mode).map_err(err)?;
            p.take_link(id).map_err(err)?.try_into().map_err(link_err)?
        }
        Program::CgroupSkb(p) => {
            p.load().map_err(err)?;
            let id = p
                .attach(cgroup, CgroupSkbAttachType::Egress, mode)
                .map_err(err)?;
            p.take_link(id).map_err(err)?.try_into().map_err(link_err)?
        }
        _ => {
            return Err(DatapathError::Missing {
                kind: "cgroup program",
                name,
            });
        }
    };
    Ok(link)
}

/// Takes map `name` out of the object, typed.
pub fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DatapathError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}
