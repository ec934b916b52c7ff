//! The refusal log: the kernel counts refused connects and binds per cgroup (it logs none of them, so a pod refused
//! in a loop cannot flood the log); every second those counts go through [`RefusalSummaries`], which says what to
//! log: a cgroup's first refusal at once, then one summary per cgroup every [`SUMMARY_EVERY`] at most.

use std::{num::NonZeroUsize, sync::Arc, time::Duration};

use nmi_agent_ebpf::abi::{CGROUP_REFUSALS_MAX, Refusal};
use tokio::time::{Instant, MissedTickBehavior};

use crate::{
    attest::cgroupfs::CgroupResolver,
    datapath::Datapath,
    identity::podcgroup,
    telemetry::refusals::{Line, LineKind, RefusalSummaries},
};

const READ_EVERY: Duration = Duration::from_secs(1);
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// Reads the kernel's refusal counts and logs them, for as long as the agent runs.
pub fn spawn(datapath: Arc<Datapath>, cgroups: Arc<CgroupResolver>) {
    // Twice the kernel's map: a cgroup the kernel still counts is never forgotten here.
    let capacity = NonZeroUsize::new(2 * CGROUP_REFUSALS_MAX as usize).unwrap_or(NonZeroUsize::MIN);
    let mut summaries = RefusalSummaries::<{ Refusal::COUNT }>::new(capacity);
    tokio::spawn(async move {
        let mut read = tokio::time::interval(READ_EVERY);
        read.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_summary = Instant::now();
        loop {
            read.tick().await;
            let dp = Arc::clone(&datapath);
            let Ok(reading) = tokio::task::spawn_blocking(move || dp.cgroup_refusals()).await
            else {
                tracing::warn!(
                    "reading the kernel's refusal counts panicked; refusals are no longer logged"
                );
                return;
            };
            for (cgroup_id, counts) in reading {
                for line in summaries.observe(cgroup_id, counts.by_reason) {
                    log(&line, &cgroups);
                }
            }
            if last_summary.elapsed() >= SUMMARY_EVERY {
                last_summary = Instant::now();
                for line in summaries.flush() {
                    log(&line, &cgroups);
                }
            }
        }
    });
}

fn log(line: &Line<{ Refusal::COUNT }>, cgroups: &CgroupResolver) {
    let path = cgroups.path_of(line.cgroup_id);
    let cgroup = match &path {
        Some(p) => p.display().to_string(),
        // Removed since, or never under the intercepted root.
        None => format!("id {}", line.cgroup_id),
    };
    let pod_uid = path
        .as_deref()
        .and_then(podcgroup::parse)
        .map(|p| p.pod_uid);
    let pod = pod_uid
        .as_deref()
        .map(|uid| format!(" (pod {uid})"))
        .unwrap_or_default();
    let reasons = Refusal::ALL
        .iter()
        .zip(line.by_reason)
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| format!("{}: {n}", r.describe()))
        .collect::<Vec<_>>()
        .join(", ");
    let refused = line.total();
    let every = SUMMARY_EVERY.as_secs();
    let message = match line.kind {
        LineKind::First => format!(
            "cgroup {cgroup}{pod}: {refused} refused connect(s) or bind(s) to IMDS or the agent's ports ({reasons}); \
             further refusals of this cgroup are summarised every {every} s"
        ),
        LineKind::Summary => format!(
            "cgroup {cgroup}{pod}: {refused} refused connect(s) or bind(s) to IMDS or the agent's ports in the last \
             {every} s ({reasons})"
        ),
    };
    tracing::warn!(
        cgroup_id = line.cgroup_id,
        cgroup,
        pod_uid,
        refused,
        reasons,
        "{message}"
    );
}
