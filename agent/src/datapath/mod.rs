//! The only code that touches aya: load the kernel programs, attach them to the intercepted cgroup, pin them so they
//! outlive the agent, and read the maps they fill.
//!
//! Pins live under `<pin-dir>/v<LAYOUT_VERSION>/{maps,links}`. A start loads fresh programs against the pinned maps,
//! attaches and pins the new links, and only then removes the previous links ("make before break"), so there is no
//! moment in which pods' connects to IMDS are not redirected.

mod bpffs;

use std::{
    fs,
    net::SocketAddrV4,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSkbAttachType, Program,
        links::{FdLink, LinkError},
    },
};
use nmi_agent_ebpf::abi::{self, ConnKey, ConnRecord, Counter, LAYOUT_VERSION, RedirectConfig};

pub use bpffs::ensure_bpffs;

/// Reads the records the kernel programs write with aya-log.
pub type KernelLog = aya_log::EbpfLogger<&'static dyn log::Log>;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nmi-agent-ebpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "this nmi-agent binary was built without its eBPF object (plain `cargo build`); build it with `cargo xtask build`"
    )]
    NoObject,
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "loading the eBPF object: {0} (needs root or CAP_BPF + CAP_NET_ADMIN, and a kernel >= 5.8 with BTF)"
    )]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("program {name}: taking its link: {source}")]
    Link {
        name: &'static str,
        source: LinkError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error(
        "the eBPF object has no {kind} named {name}; the binary and its object are out of step"
    )]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("{0}")]
    Bpffs(String),
}

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
    /// The network namespace the agent listens in (its cookie): intercepted processes there may not bind `redirect`.
    pub netns_cookie: u64,
}

/// Looks a redirected connection up by its 4-tuple.
pub trait ConnLookup {
    fn lookup(&self, key: &ConnKey) -> Result<Option<ConnRecord>, String>;
}

/// The loaded, attached and pinned datapath.
pub struct Datapath {
    conns: HashMap<MapData, ConnKey, ConnRecord>,
    kernel_log: Option<KernelLog>,
    counters: PerCpuArray<MapData, u64>,
    links: Vec<PathBuf>,
    // Kept so program fds (and later the kernel log reader) stay valid for the agent's lifetime.
    _ebpf: Ebpf,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DatapathError + 'a {
    move |source| DatapathError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The versioned directory that holds this layout's pins.
pub fn state_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(format!("v{LAYOUT_VERSION}"))
}

impl Datapath {
    /// Loads the programs, attaches them to `opts.cgroup`, pins them, and retires whatever an earlier run pinned.
    pub fn start(opts: &Options) -> Result<Self, DatapathError> {
        if OBJECT.is_empty() {
            return Err(DatapathError::NoObject);
        }
        raise_memlock_limit();
        ensure_bpffs(&opts.pin_dir).map_err(DatapathError::Bpffs)?;
        if bpffs::is_bpffs_root(&opts.pin_dir) {
            return Err(DatapathError::Bpffs(format!(
                "--pin-dir {} is the root of a bpf filesystem; give nmi-agent a directory of its own under it",
                opts.pin_dir.display()
            )));
        }
        let state = state_dir(&opts.pin_dir);
        let (maps_dir, links_dir) = (state.join("maps"), state.join("links"));
        for dir in [&maps_dir, &links_dir] {
            fs::create_dir_all(dir).map_err(io("creating", dir))?;
        }
        let previous = list_dir(&links_dir)?;

        // The programs skip formatting records the agent's log level would drop anyway.
        let log_level = log::max_level() as u8;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .override_global(aya_log::LEVEL, &log_level, false)
            .load(OBJECT)?;
        configure(&mut ebpf, opts)?;

        let cgroup = fs::File::open(&opts.cgroup).map_err(io("opening cgroup", &opts.cgroup))?;
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let mut links = Vec::new();
        // The guard and the bookkeeping programs go first, the redirect last: at no point is a redirect live without
        // the sockops program that makes it attestable.
        for name in [
            abi::PROG_EGRESS,
            abi::PROG_BIND4,
            abi::PROG_BIND6,
            abi::PROG_SOCKOPS,
            abi::PROG_GETPEERNAME4,
            abi::PROG_CONNECT6,
            abi::PROG_CONNECT4,
        ] {
            let link = attach(&mut ebpf, name, &cgroup)?;
            // bpffs reserves names containing a dot, hence the dash.
            let path = links_dir.join(format!("{name}-{generation}"));
            link.pin(&path).map_err(|source| DatapathError::Pin {
                path: path.clone(),
                source,
            })?;
            links.push(path);
        }

        // Only now that the new links are live, retire the old ones, and any pins of an older layout.
        for old in previous {
            remove_pin(&old);
        }
        retire_other_layouts(&opts.pin_dir, &state);

        let kernel_log = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                tracing::warn!(error = %e, "the kernel programs' log records will not reach this log");
                None
            }
        };
        let conns = take_map(&mut ebpf, abi::MAP_CONNS)?;
        let counters = take_map(&mut ebpf, abi::MAP_COUNTERS)?;
        Ok(Datapath {
            conns,
            kernel_log,
            counters,
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

    /// Kernel-side counters, summed over CPUs.
    pub fn counters(&self) -> Vec<(Counter, u64)> {
        Counter::ALL
            .iter()
            .map(|&c| {
                let total = self
                    .counters
                    .get(&(c as u32), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (c, total)
            })
            .collect()
    }

    /// Number of connections currently recorded by sockops.
    pub fn tracked_connections(&self) -> usize {
        self.conns.keys().filter(Result::is_ok).count()
    }
}

impl ConnLookup for Datapath {
    fn lookup(&self, key: &ConnKey) -> Result<Option<ConnRecord>, String> {
        match self.conns.get(key, 0) {
            Ok(record) => Ok(Some(record)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Passes the kernel programs' log records on to the agent's log (as `log` records, which the tracing subscriber
/// takes in) until the reader fails.
pub async fn forward_kernel_log(log: KernelLog) {
    // SAFETY: the logger owns its ring buffer's fd, which stays open and the same until the AsyncFd drops it.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(log, tokio::io::Interest::READABLE)
    };
    let mut reader = match registered {
        Ok(reader) => reader,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the kernel programs' log buffer");
            return;
        }
    };
    loop {
        let Ok(mut ready) = reader.readable_mut().await else {
            tracing::warn!("the kernel programs' log buffer can no longer be read");
            return;
        };
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}

/// Removes every layout directory (`v<N>`) nmi-agent pinned under `pin_dir`, then `pin_dir` itself if that left it
/// empty; the kernel detaches each program once its last link reference is gone. Nothing else under `pin_dir` is
/// touched, so a mistaken `--pin-dir /sys/fs/bpf` cannot wipe other software's pins.
pub fn uninstall(pin_dir: &Path) -> Result<bool, DatapathError> {
    if !pin_dir.exists() {
        return Ok(false);
    }
    let layouts: Vec<PathBuf> = list_dir(pin_dir)?
        .into_iter()
        .filter(|p| is_layout_dir(p))
        .collect();
    for layout in &layouts {
        fs::remove_dir_all(layout).map_err(io("removing", layout))?;
    }
    // Only if nothing else lives there; an error (not empty) is the answer, not a failure.
    let _ = fs::remove_dir(pin_dir);
    Ok(!layouts.is_empty())
}

/// `v` followed by digits: the directories [`state_dir`] makes.
fn is_layout_dir(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix('v'))
        .is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
}

fn configure(ebpf: &mut Ebpf, opts: &Options) -> Result<(), DatapathError> {
    let mut config: Array<_, RedirectConfig> = Array::try_from(
        ebpf.map_mut(abi::MAP_CONFIG)
            .ok_or(DatapathError::Missing {
                kind: "map",
                name: abi::MAP_CONFIG,
            })?,
    )
    .map_err(|source| DatapathError::Map {
        name: abi::MAP_CONFIG,
        source,
    })?;
    config
        .set(
            0,
            RedirectConfig {
                target: opts.redirect.into(),
                netns_cookie: opts.netns_cookie,
            },
            0,
        )
        .map_err(|source| DatapathError::Map {
            name: abi::MAP_CONFIG,
            source,
        })?;

    let mut exempt: HashMap<_, u64, u32> = HashMap::try_from(ebpf.map_mut(abi::MAP_EXEMPT).ok_or(
        DatapathError::Missing {
            kind: "map",
            name: abi::MAP_EXEMPT,
        },
    )?)
    .map_err(|source| DatapathError::Map {
        name: abi::MAP_EXEMPT,
        source,
    })?;
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
            exempt
                .insert(id, 1, 0)
                .map_err(|source| DatapathError::Map {
                    name: abi::MAP_EXEMPT,
                    source,
                })?;
        }
    }
    Ok(())
}

fn attach(ebpf: &mut Ebpf, name: &'static str, cgroup: &fs::File) -> Result<FdLink, DatapathError> {
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

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DatapathError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
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

/// The cookie of the network namespace `socket` lives in (`SO_NETNS_COOKIE`, Linux >= 5.14), as
/// `bpf_get_netns_cookie` reports it in the kernel programs.
pub fn netns_cookie(socket: &impl std::os::fd::AsRawFd) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket fd and an out-buffer of the size we pass.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones use memcg and ignore it.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK; fine on kernels >= 5.11");
    }
}

impl<T: ConnLookup> ConnLookup for std::sync::Arc<T> {
    fn lookup(&self, key: &ConnKey) -> Result<Option<ConnRecord>, String> {
        T::lookup(self, key)
    }
}
