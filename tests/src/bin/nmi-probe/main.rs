//! nmi-probe: makes network attempts from wherever it was started (a pod's cgroup and network namespace) and
//! prints one JSON object per attempt on stdout (see `nmi_agent_e2e::probe::Attempt`).
//!
//! ```text
//! nmi-probe http [--count N] [--concurrency C] [--addr A] [--duration-ms D] [--interval-ms I] [--timeout-ms T]
//!                [--until-stdin-eof]
//! nmi-probe connect [--addr A] [--timeout-ms T]
//! nmi-probe from --source S [--transparent] [--request] [--hold-ms H] [--addr A] [--timeout-ms T]
//!                                                     one TCP connection from S (`--transparent`: S need not be local)
//! nmi-probe hold --count N [--pending] [--addr A] [--timeout-ms T]
//!                                                     N connects, held open until stdin is closed
//! nmi-probe bind --addr A                            a TCP listener bound to A
//! nmi-probe udp [--addr A] [--connect] [--count N]
//! nmi-probe v6mapped [--port P] [--timeout-ms T]     TCP over an IPv6 socket to [::ffff:169.254.169.254]:P
//! nmi-probe raw [--addr IP:PORT] [--hdrincl]          one UDP datagram through a SOCK_RAW socket
//! nmi-probe frame --source IP --dst-mac M [--dev D] [--src-mac M] [--addr A]
//!                                                     a TCP SYN in a hand-built Ethernet frame on an AF_PACKET socket
//! nmi-probe ipip --source IP --via NODE [--addr A]    a TCP SYN in IPIP to NODE, which decapsulates and forwards it
//! nmi-probe vxlan --source IP --via NODE:PORT --inner-dst-mac M [--vni N] [--addr A]
//!                                                     the same in VXLAN, the inner frame addressed to the node's device
//! nmi-probe whoami                                    pid, cgroup and network namespace of the probe
//! ```
//! `--addr` defaults to 169.254.169.254:80. `http` runs until N attempts were made, or, with `--duration-ms`, until
//! that time has passed, or, with `--until-stdin-eof`, until its stdin is closed (N = 0 means no count limit; the
//! last form lets a test stop a background loop cleanly at a moment it chooses). Exit status is 0 whatever the
//! attempts' outcome; only bad arguments fail, because the outcome is the measurement.

mod datagram;
mod forged;
mod report;
mod soak;
mod tcp;

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use nmi_agent_e2e::probe::Whoami;

use report::emit;

const IMDS: &str = "169.254.169.254:80";

/// Makes network attempts from where it runs and prints one JSON object per attempt.
#[derive(Parser)]
#[command(name = "nmi-probe")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Token requests over HTTP (`Connection: close`), each read to EOF.
    Http(tcp::HttpArgs),
    /// Token requests on kept-alive connections, every answer checked; one JSON summary.
    Soak(soak::SoakArgs),
    /// Many connections, each with pipelined requests whose answers are never read (a hostile pod).
    Wedge(tcp::WedgeArgs),
    /// One TCP connect.
    Connect {
        #[command(flatten)]
        to: To,
        #[command(flatten)]
        timeout: Timeout,
    },
    /// One TCP connection from a chosen source address and port.
    From(tcp::FromArgs),
    /// Connections opened one by one and held open until stdin is closed.
    Hold(tcp::HoldArgs),
    /// A TCP listener bound to the address.
    Bind {
        #[command(flatten)]
        to: To,
    },
    /// One UDP datagram (or `--count` of them, each from its own socket).
    Udp {
        #[command(flatten)]
        to: To,
        /// connect(2) the socket first, then send (else sendto).
        #[arg(long)]
        connect: bool,
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
    /// TCP over an IPv6 socket to [::ffff:169.254.169.254]:PORT.
    V6mapped {
        #[arg(long, default_value_t = 80)]
        port: u16,
        #[command(flatten)]
        timeout: Timeout,
    },
    /// One UDP datagram through a SOCK_RAW socket.
    Raw {
        #[command(flatten)]
        to: To,
        /// IPPROTO_RAW with an IP header we build, instead of IPPROTO_UDP.
        #[arg(long)]
        hdrincl: bool,
    },
    /// A TCP SYN in a hand-built Ethernet frame on an AF_PACKET socket.
    Frame(forged::FrameArgs),
    /// A TCP SYN in IPIP, addressed to the node that decapsulates it.
    Ipip(forged::IpipArgs),
    /// A TCP SYN in VXLAN, addressed to the node that decapsulates it.
    Vxlan(forged::VxlanArgs),
    /// The pid, cgroup and network namespace of the probe.
    Whoami,
}

/// Where an attempt is aimed.
#[derive(Args)]
struct To {
    #[arg(long, default_value = IMDS)]
    addr: SocketAddr,
}

/// How long one attempt may take.
#[derive(Args)]
struct Timeout {
    #[arg(long = "timeout-ms", value_name = "MS", default_value_t = 5000)]
    timeout_ms: u64,
}

impl Timeout {
    fn get(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

fn main() {
    match Cli::parse().mode {
        Mode::Http(args) => tcp::http(&args),
        Mode::Wedge(args) => tcp::wedge(&args),
        Mode::Soak(args) => soak::soak(&args),
        Mode::Connect { to, timeout } => emit(&tcp::connect("connect", to.addr, timeout.get())),
        Mode::From(args) => emit(&tcp::from_source(&args)),
        Mode::Hold(args) => tcp::hold(&args),
        Mode::Bind { to } => emit(&tcp::bind(to.addr)),
        Mode::V6mapped { port, timeout } => {
            let addr = SocketAddr::new(
                Ipv4Addr::new(169, 254, 169, 254).to_ipv6_mapped().into(),
                port,
            );
            emit(&tcp::connect("v6mapped", addr, timeout.get()))
        }
        Mode::Udp { to, connect, count } => {
            for _ in 0..count {
                emit(&datagram::udp(to.addr, connect));
            }
        }
        Mode::Raw { to, hdrincl } => emit(&datagram::raw(to.addr, hdrincl)),
        Mode::Frame(args) => emit(&forged::frame(&args)),
        Mode::Ipip(args) => emit(&forged::ipip(&args)),
        Mode::Vxlan(args) => emit(&forged::vxlan(&args)),
        Mode::Whoami => println!("{}", serde_json::to_string(&whoami()).expect("serialize")),
    }
}

fn whoami() -> Whoami {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        })
        .unwrap_or_default();
    let netns_inode = std::fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino())
        .unwrap_or(0);
    Whoami {
        pid: std::process::id(),
        cgroup,
        netns_inode,
    }
}

#[cfg(test)]
mod tests;
