//! The source-address check of Kubernetes mode: a redirected connection must come from one of the attested pod's own
//! addresses (a hostNetwork pod: one of the node's).
//!
//! The kernel record already names the caller's cgroup, and records cannot be forged (issue 8 §3). This check is the
//! second, independent witness: a pod that binds another pod's address (`IP_TRANSPARENT`, a secondary address on its
//! own interface) is attested as itself by its cgroup, and is now also refused for not speaking from its own address,
//! so a bug or a gap in one witness alone never hands out a token. It needs `status.podIPs` from the API server,
//! which the kubelet reports moments after the sandbox starts; a pod without an address yet is told to retry.

use std::net::IpAddr;

use clap::ValueEnum;
use k8s_openapi::api::core::v1::Pod;

/// What to do when the source address of a connection is not one of the attested pod's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum SourceCheck {
    /// Refuse the request (403) and audit it.
    #[default]
    Enforce,
    /// Serve it, but log and audit the mismatch: for a first rollout on a CNI that rewrites pod source addresses.
    Audit,
    /// No check (the kernel record alone attests the caller).
    Off,
}

/// The check's answer for one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The source is one of the pod's addresses.
    Matches,
    /// The pod has addresses and the source is none of them.
    Mismatch { allowed: Vec<IpAddr> },
    /// The API server has no address for the pod yet.
    NoAddressYet,
}

/// The addresses `pod` may speak from: its `status.podIPs` (and `podIP`); for a hostNetwork pod also the node's
/// (`status.hostIPs`, `hostIP`, and `node_ips`, the agent's own node addresses). IPv4-mapped IPv6 forms compare as IPv4.
pub fn allowed_addresses(pod: &Pod, node_ips: &[IpAddr]) -> Vec<IpAddr> {
    let status = pod.status.as_ref();
    let pod_ips = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .chain(status.and_then(|s| s.pod_ip.as_deref()));
    let mut allowed: Vec<IpAddr> = pod_ips.filter_map(parse).collect();
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    if host_network {
        let host_ips = status
            .and_then(|s| s.host_ips.as_ref())
            .into_iter()
            .flatten()
            .map(|h| h.ip.as_str())
            .chain(status.and_then(|s| s.host_ip.as_deref()));
        allowed.extend(host_ips.filter_map(parse));
        allowed.extend(node_ips.iter().map(IpAddr::to_canonical));
    }
    allowed.sort_unstable();
    allowed.dedup();
    allowed
}

/// Whether a connection from `source` may be served as `pod`.
pub fn check(pod: &Pod, source: IpAddr, node_ips: &[IpAddr]) -> Verdict {
    let allowed = allowed_addresses(pod, node_ips);
    if allowed.contains(&source.to_canonical()) {
        Verdict::Matches
    } else if allowed.is_empty() {
        Verdict::NoAddressYet
    } else {
        Verdict::Mismatch { allowed }
    }
}

fn parse(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{HostIP, PodIP, PodSpec, PodStatus};

    use super::*;

    fn pod(host_network: bool, pod_ips: &[&str], host_ip: Option<&str>) -> Pod {
        Pod {
            spec: Some(PodSpec {
                host_network: Some(host_network),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                pod_ip: pod_ips.first().map(|s| (*s).to_owned()),
                pod_ips: Some(
                    pod_ips
                        .iter()
                        .map(|ip| PodIP {
                            ip: (*ip).to_owned(),
                        })
                        .collect(),
                ),
                host_ip: host_ip.map(str::to_owned),
                host_ips: host_ip.map(|ip| vec![HostIP { ip: ip.to_owned() }]),
                ..PodStatus::default()
            }),
            ..Pod::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn verdicts() {
        let node = [ip("10.224.0.4")];
        let dual = pod(false, &["10.244.1.7", "fd00::7"], Some("10.224.0.4"));
        let host = pod(true, &["10.224.0.4"], Some("10.224.0.4"));
        let host_no_status = Pod {
            spec: Some(PodSpec {
                host_network: Some(true),
                ..PodSpec::default()
            }),
            ..Pod::default()
        };
        let cases: &[(&str, &Pod, &str, Verdict)] = &[
            ("pod's own address", &dual, "10.244.1.7", Verdict::Matches),
            ("pod's IPv6 address", &dual, "fd00::7", Verdict::Matches),
            (
                "IPv4-mapped spelling of the pod's address",
                &dual,
                "::ffff:10.244.1.7",
                Verdict::Matches,
            ),
            (
                "another pod's address",
                &dual,
                "10.244.1.8",
                Verdict::Mismatch {
                    allowed: vec![ip("10.244.1.7"), ip("fd00::7")],
                },
            ),
            (
                "the node's address is not a pod network pod's",
                &dual,
                "10.224.0.4",
                Verdict::Mismatch {
                    allowed: vec![ip("10.244.1.7"), ip("fd00::7")],
                },
            ),
            (
                "hostNetwork pod from the node",
                &host,
                "10.224.0.4",
                Verdict::Matches,
            ),
            (
                "hostNetwork pod before its status, from the agent's node address",
                &host_no_status,
                "10.224.0.4",
                Verdict::Matches,
            ),
            (
                "hostNetwork pod from a pod address",
                &host,
                "10.244.1.7",
                Verdict::Mismatch {
                    allowed: vec![ip("10.224.0.4")],
                },
            ),
            (
                "pod without a status yet",
                &Pod::default(),
                "10.244.1.7",
                Verdict::NoAddressYet,
            ),
            (
                "pod with an unparsable address only",
                &pod(false, &["not-an-ip"], None),
                "10.244.1.7",
                Verdict::NoAddressYet,
            ),
        ];
        for (what, pod, source, want) in cases {
            assert_eq!(&check(pod, ip(source), &node), want, "{what}");
        }
    }
}
