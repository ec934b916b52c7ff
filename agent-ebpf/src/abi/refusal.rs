//! Why the kernel refused a connect or a bind, and the per-cgroup counts of those refusals
//! (`NMI_CGROUP_REFUSALS`), from which the agent writes its refusal summaries.

use super::Counter;

/// Why the kernel refused a connect or a bind: the index into [`CgroupRefusals::by_reason`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Port = 0,
    Protocol = 1,
    V6Mapped = 2,
    NoTarget = 3,
    Cap = 4,
    Bind = 5,
}

impl Refusal {
    pub const ALL: [Refusal; 6] = [
        Refusal::Port,
        Refusal::Protocol,
        Refusal::V6Mapped,
        Refusal::NoTarget,
        Refusal::Cap,
        Refusal::Bind,
    ];
    pub const COUNT: usize = Self::ALL.len();

    /// The node-wide counter that counts this reason.
    pub const fn counter(self) -> Counter {
        match self {
            Refusal::Port => Counter::RefusedPort,
            Refusal::Protocol => Counter::RefusedProtocol,
            Refusal::V6Mapped => Counter::RefusedV6Mapped,
            Refusal::NoTarget => Counter::RefusedNoTarget,
            Refusal::Cap => Counter::CgroupCapRefused,
            Refusal::Bind => Counter::BindRefused,
        }
    }

    /// Whether this refusal also counts in [`Counter::Refused`] (the connect refusals it has always counted).
    pub const fn is_refused_connect(self) -> bool {
        matches!(
            self,
            Refusal::Port | Refusal::Protocol | Refusal::V6Mapped | Refusal::NoTarget
        )
    }

    /// How the agent's log names it.
    pub const fn describe(self) -> &'static str {
        match self {
            Refusal::Port => "TCP to a port other than 80",
            Refusal::Protocol => "not TCP",
            Refusal::V6Mapped => "IPv6 to ::ffff:169.254.169.254",
            Refusal::NoTarget => "no redirect target yet",
            Refusal::Cap => "over the cgroup's cap of redirected sockets",
            Refusal::Bind => "bind to the agent's port",
        }
    }
}

/// One cgroup's refused connects and binds since the kernel first refused it, by [`Refusal`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupRefusals {
    pub by_reason: [u64; Refusal::COUNT],
}
