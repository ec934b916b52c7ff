//! The only code that touches aya: load the kernel programs, attach them to the intercepted cgroup, pin them so they
//! outlive the agent, and read the maps they fill.
//!
//! - `load`: open the eBPF object, configure it, attach each program.
//! - `pins`: the pin directory's layout, make-before-break replacement of the links, `uninstall`.
//! - `maps`: the redirect records ([`ConnLookup`]), counters and occupancy.
//! - `sys`: the netns cookie and the memlock limit; `bpffs`: the bpf filesystem the pins need.
//! - `kernel_log`: the programs' own log records.
//! - `forward_guard`: the tc program on the device that routes to IMDS; `imds_route` finds that device.

mod bpffs;
mod error;
mod exempt;
mod forward_guard;
mod imds_route;
mod kernel_log;
mod load;
mod maps;
mod pins;
mod sys;

use std::{fs, net::SocketAddrV4, path::PathBuf};

use aya::Ebpf;

pub use bpffs::ensure_bpffs;
pub use error::DatapathError;
pub use exempt::exempt_in_pinned;
pub use forward_guard::ForwardGuard;
pub use kernel_log::{KernelLog, forward_kernel_log};
pub use maps::ConnLookup;
pub use pins::{Uninstalled, state_dir};
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
    /// The device whose egress the forwarding guard watches; `None`: the one the route to IMDS leaves through.
    pub imds_device: Option<String>,
    /// The most live redirected sockets one cgroup may hold (0: no cap); see `docs/configuration.md`.
    pub max_sockets_per_cgroup: u32,
}

/// What [`guard`] found, and the pinned links that intercept from now on.
#[derive(Debug)]
pub enum Guarded {
    /// Not every program had a pinned link: all of them were attached and pinned now (make-before-break over any
    /// that were there).
    Attached(Vec<PathBuf>),
    /// Every program already had a pinned link of this layout (an earlier guard, or a running agent): left as is.
    AlreadyPinned(Vec<PathBuf>),
}

/// The boot guard's start: attaches and pins the programs unless every one of them is pinned already, in which case
/// nothing is touched. A running agent's links (and the configuration it wrote) are never replaced by a guard, so
/// the guard can run at any time without disturbing the service.
pub fn guard(opts: &Options) -> Result<Guarded, DatapathError> {
    let pinned = pins::pinned_links(&opts.pin_dir);
    let complete = load::ATTACH_ORDER
        .iter()
        .all(|name| pinned.iter().any(|(program, _)| program == name));
    if complete {
        return Ok(Guarded::AlreadyPinned(
            pinned.into_iter().map(|(_, pin)| pin).collect(),
        ));
    }
    Datapath::start(opts).map(|datapath| Guarded::Attached(datapath.links))
}

/// The loaded, attached and pinned datapath.
pub struct Datapath {
    maps: Maps,
    kernel_log: Option<KernelLog>,
    links: Vec<PathBuf>,
    forward_guard: ForwardGuard,
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

        // The node-level guard first, like the cgroup guards: packets the node forwards to IMDS are dropped before
        // anything is redirected.
        let forward_guard =
            forward_guard::attach(&mut ebpf, opts.imds_device.as_deref(), &mut pins)?;
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
            forward_guard,
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

    /// Where the forwarding guard went.
    pub fn forward_guard(&self) -> &ForwardGuard {
        &self.forward_guard
    }
}

/// `nmi-agent uninstall`: removes the pins (which detaches every link) and the forwarding guard's clsact filters of
/// this network namespace; pods reach IMDS directly again.
pub fn uninstall(pin_dir: &std::path::Path) -> Result<Uninstalled, DatapathError> {
    let mut done = pins::uninstall(pin_dir)?;
    done.filters_removed = forward_guard::remove_filters();
    Ok(done)
}
