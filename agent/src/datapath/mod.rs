//! The only code that touches aya: load the kernel programs, attach them to the intercepted cgroup, pin them so they
//! outlive the agent, and read the maps they fill.
//!
//! - `load`: open the eBPF object, configure it, attach each program.
//! - `pins`: the pin directory's layout, make-before-break replacement of the links, `uninstall`.
//! - `maps`: the redirect records ([`ConnLookup`]), counters and occupancy.
//! - `sys`: the netns cookie and the memlock limit; `bpffs`: the bpf filesystem the pins need.
//! - `kernel_log`: the programs' own log records.

mod bpffs;
mod error;
mod kernel_log;
mod load;
mod maps;
mod pins;
mod sys;

use std::{fs, net::SocketAddrV4, path::PathBuf};

use aya::Ebpf;

pub use bpffs::ensure_bpffs;
pub use error::DatapathError;
pub use kernel_log::{KernelLog, forward_kernel_log};
pub use maps::ConnLookup;
pub use pins::{Uninstalled, state_dir, uninstall};
pub use sys::netns_cookie;

use error::io;
use maps::Maps;
use pins::Pins;

/// What to intercept, where to send it, and whom to leave alone.
#[derive(Clone, Debug)]
pub struct Options {
    /// The cgroup v2 directory whose subtree is intercepted.
    pub cgroup: PathBuf,
    /// Where programs' links and maps are pinned.
    pub pin_dir: PathBuf,
    /// The token service: redirected connects go here.
    pub redirect: SocketAddrV4,
    /// cgroup ids that are never intercepted (the agent's own).
    pub exempt: Vec<u64>,
    /// The network namespace the agent listens in (its cookie): intercepted processes there may not bind `redirect`
    /// or `health`.
    pub netns_cookie: u64,
    /// The health listener's address, guarded like `redirect` (an IPv6 one is not guarded).
    pub health: Option<SocketAddrV4>,
    /// The most live redirected sockets one cgroup may hold (0: no cap); see `docs/configuration.md`.
    pub max_sockets_per_cgroup: u32,
}

/// The loaded, attached and pinned datapath.
pub struct Datapath {
    maps: Maps,
    kernel_log: Option<KernelLog>,
    links: Vec<PathBuf>,
    // Kept so program fds (and later the kernel log reader) stay valid for the agent's lifetime.
    _ebpf: Ebpf,
}

impl Datapath {
    /// Loads the programs, attaches them to `opts.cgroup`, pins them, and retires whatever an earlier run pinned.
    pub fn start(opts: &Options) -> Result<Self, DatapathError> {
        if !load::has_object() {
            return Err(DatapathError::NoObject);
        }
        sys::raise_memlock_limit();
        let mut pins = Pins::prepare(&opts.pin_dir)?;

        let mut ebpf = load::open(pins.maps_dir())?;
        load::configure(&mut ebpf, opts)?;

        let cgroup = fs::File::open(&opts.cgroup).map_err(io("opening cgroup", &opts.cgroup))?;
        for name in load::ATTACH_ORDER {
            let link = load::attach(&mut ebpf, name, &cgroup)?;
            pins.pin_link(name, link)?;
        }
        // Only now that the new links are live, retire the old ones, and any pins of an older layout.
        let links = pins.retire_previous();

        let kernel_log = kernel_log::open(&mut ebpf);
        let maps = Maps::take(&mut ebpf)?;
        Ok(Datapath {
            maps,
            kernel_log,
            links,
            _ebpf: ebpf,
        })
    }

    /// The reader of the kernel programs' log records (once); see [`forward_kernel_log`].
    pub fn take_kernel_log(&mut self) -> Option<KernelLog> {
        self.kernel_log.take()
    }

    /// Paths of the pinned links of this run.
    pub fn links(&self) -> &[PathBuf] {
        &self.links
    }
}
