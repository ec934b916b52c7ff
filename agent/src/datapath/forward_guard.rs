//! The forwarding guard: `nmi_forward` on egress of the device that routes to IMDS, dropping packets to IMDS that no
//! IP socket of the node sent (a pod's hand-built frames, IPIP or VXLAN the node decapsulated: see
//! `agent-ebpf/src/programs/forward.rs`).
//!
//! Two ways to attach, both fail-closed when the agent dies:
//! - TCX (Linux 6.6+): a bpf_link, attached first on the device and pinned next to the cgroup links, so it is replaced
//!   make-before-break like them (the new link runs beside the old until the old pin is retired) and `uninstall`
//!   detaches it by removing the pin.
//! - Older kernels: a direct-action filter on the device's clsact qdisc at a fixed priority and handle. The filter
//!   holds its program itself, so it stays on the device when the agent exits or dies; a restart replaces the program
//!   in that filter in one netlink request (the kernel swaps it under RCU: no packet sees no filter), a filter left on
//!   another device (the route moved) is deleted after that, and `uninstall` deletes filters of this program's name on
//!   every device of the namespace.

use std::{fs, os::fd::AsFd};

use aya::{
    Ebpf,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::FdLink,
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
};
use nmi_agent_ebpf::abi::PROG_FORWARD;

use super::{
    DatapathError,
    imds_route::{self, ImdsRoute},
    pins::Pins,
};

/// The clsact filter's place on kernels without TCX: priority 1 so that a CNI's filter that accepts a packet cannot
/// end classification before the guard sees it, and a handle no other software uses ("nmi" and 1), because a restart
/// replaces whatever filter holds this priority and handle.
const TC_PRIORITY: u16 = 1;
const TC_HANDLE: TcHandle = TcHandle::new(0x6e6d, 0x6901);

/// Where the guard went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardGuard {
    /// On `device`, as a pinned TCX link.
    Tcx { device: String },
    /// On `device`, as a clsact filter (no TCX on this kernel).
    Filter { device: String },
    /// Not attached: 169.254.169.254 is local here, or unreachable (the reason, for the log).
    Nowhere(&'static str),
}

/// Attaches the guard on `device`, or on the device the route to IMDS leaves through when none is given.
pub fn attach(
    ebpf: &mut Ebpf,
    device: Option<&str>,
    pins: &mut Pins,
) -> Result<ForwardGuard, DatapathError> {
    let device = match device {
        Some(device) => device.to_owned(),
        None => match imds_route::lookup().map_err(DatapathError::ImdsRoute)? {
            ImdsRoute::Device(index) => device_name(index)?,
            ImdsRoute::Local => {
                return Ok(ForwardGuard::Nowhere(
                    "169.254.169.254 is an address of this network namespace: nothing is forwarded to it",
                ));
            }
            ImdsRoute::Unreachable => {
                return Ok(ForwardGuard::Nowhere(
                    "no route to 169.254.169.254 in this network namespace; set --imds-device to guard a device anyway",
                ));
            }
        },
    };
    let program: &mut SchedClassifier = ebpf
        .program_mut(PROG_FORWARD)
        .ok_or(DatapathError::Missing {
            kind: "program",
            name: PROG_FORWARD,
        })?
        .try_into()
        .map_err(program_err)?;
    program.load().map_err(program_err)?;

    let tcx = program.attach_with_options(
        &device,
        TcAttachType::Egress,
        TcAttachOptions::TcxOrder(LinkOrder::first()),
    );
    match tcx {
        Ok(id) => {
            let link: FdLink = program
                .take_link(id)
                .map_err(program_err)?
                .try_into()
                .map_err(|source| DatapathError::Link {
                    name: PROG_FORWARD,
                    source,
                })?;
            pins.pin_link(PROG_FORWARD, link)?;
            Ok(ForwardGuard::Tcx { device })
        }
        Err(tcx_error) => {
            tracing::debug!(%device, error = %tcx_error, "no TCX link (needs Linux 6.6+); using a clsact filter");
            attach_filter(program, &device).map_err(|source| DatapathError::TcFilter {
                device: device.clone(),
                tcx: tcx_error.to_string(),
                source: Box::new(source),
            })?;
            // The route may have moved since the last start: the guard on the old device is retired only now.
            remove_filters_except(Some(&device));
            Ok(ForwardGuard::Filter { device })
        }
    }
}

/// Puts the program into this guard's clsact filter on `device`: replaces the program of an existing one, else creates
/// it (and the clsact qdisc, when the device has none).
fn attach_filter(
    program: &mut SchedClassifier,
    device: &str,
) -> Result<(), aya::programs::ProgramError> {
    let existing =
        SchedClassifierLink::attached(device, TcAttachType::Egress, TC_PRIORITY, TC_HANDLE, None)?;
    let id = match program.attach_to_link(existing) {
        Ok(id) => id,
        Err(replace_error) => {
            tracing::debug!(%device, error = %replace_error, "no guard filter to replace; creating one");
            // Already there (another program's filters, or ours from an earlier run) is what we want.
            if let Err(e) = tc::qdisc_add_clsact(device) {
                tracing::debug!(%device, error = %e, "clsact qdisc not added (it is usually there already)");
            }
            program.attach_with_options(
                device,
                TcAttachType::Egress,
                TcAttachOptions::Netlink(NlOptions {
                    priority: TC_PRIORITY,
                    handle: TC_HANDLE,
                    classid: None,
                }),
            )?
        }
    };
    // Dropping the link would delete the filter; it must outlive this process (fail closed while the agent is down).
    std::mem::forget(program.take_link(id)?);
    Ok(())
}

/// Removes the guard's clsact filters from every device of this network namespace (its TCX link goes with the pins).
/// Returns the devices it was removed from.
pub fn remove_filters() -> Vec<String> {
    remove_filters_except(None)
}

fn remove_filters_except(keep: Option<&str>) -> Vec<String> {
    let mut removed = Vec::new();
    for device in devices().into_iter().filter(|d| Some(d.as_str()) != keep) {
        match tc::qdisc_detach_program(&device, TcAttachType::Egress, PROG_FORWARD) {
            Ok(()) => removed.push(device),
            // NotFound: no filter of ours there; anything else (no clsact qdisc) means the same.
            Err(e) => tracing::debug!(%device, error = %e, "no guard filter removed"),
        }
    }
    removed
}

/// The names of this network namespace's devices, from `/proc/self/net/dev` (per network namespace, unlike sysfs,
/// which shows the namespace that mounted it).
fn devices() -> Vec<String> {
    fs::read_to_string("/proc/self/net/dev")
        .map(|table| parse_net_dev(&table))
        .unwrap_or_default()
}

fn parse_net_dev(table: &str) -> Vec<String> {
    table
        .lines()
        .skip(2)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, _)| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .collect()
}

/// The name of the device with index `index`.
fn device_name(index: u32) -> Result<String, DatapathError> {
    let socket = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::DGRAM,
        None,
    )
    .map_err(|e| DatapathError::Device {
        index,
        source: e.into(),
    })?;
    rustix::net::netdevice::index_to_name(socket.as_fd(), index).map_err(|e| {
        DatapathError::Device {
            index,
            source: e.into(),
        }
    })
}

fn program_err(source: aya::programs::ProgramError) -> DatapathError {
    DatapathError::Program {
        name: PROG_FORWARD,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_read_from_the_net_dev_table() {
        let table = "Inter-|   Receive                                                |  Transmit\n \
                     face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets\n    \
                     lo:    1000      10    0    0    0     0          0         0     1000      10\n  \
                     eth0: 2000      20    0    0    0     0          0         0     2000      20\n\
                     ne1im:3000      30    0    0    0     0          0         0     3000      30\n";
        assert_eq!(parse_net_dev(table), ["lo", "eth0", "ne1im"]);
    }
}
