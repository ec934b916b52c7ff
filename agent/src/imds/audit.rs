//! The audit trail of token decisions: one event per decision (`tracing` target `audit`, `event = "token"`), and
//! the request counters and latency that go with it.

use std::time::Instant;

use crate::{
    attest::Attestation,
    identity::Workload,
    telemetry::metrics::{Metrics, TokenLabels},
};

/// The caller's cgroup path as text (empty when it is gone), for log fields.
pub fn cgroup_of(caller: &Attestation) -> String {
    caller
        .cgroup
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// The fields of one audit event, filled in as the decision is made.
pub struct Audit<'a> {
    caller: &'a Attestation,
    metrics: &'a Metrics,
    started: Instant,
    pub workload: Workload,
    pub identity: String,
    pub resource: String,
    pub cache: &'static str,
}

impl<'a> Audit<'a> {
    pub fn new(caller: &'a Attestation, started: Instant, metrics: &'a Metrics) -> Self {
        Audit {
            caller,
            metrics,
            started,
            workload: Workload::default(),
            identity: String::new(),
            resource: String::new(),
            cache: "none",
        }
    }

    pub fn emit(&self, outcome: &'static str, reason: &str) {
        let elapsed = self.started.elapsed();
        self.metrics
            .token_requests
            .get_or_create(&TokenLabels {
                outcome,
                cache: self.cache,
            })
            .inc();
        self.metrics.request_seconds.observe(elapsed.as_secs_f64());
        let w = &self.workload;
        tracing::info!(
            target: "audit",
            event = "token",
            pid = self.caller.pid,
            cgroup = %cgroup_of(self.caller),
            namespace = w.namespace.as_deref().unwrap_or(""),
            pod = w.pod.as_deref().unwrap_or(""),
            pod_uid = w.pod_uid.as_deref().unwrap_or(""),
            container = w.container.as_deref().unwrap_or(""),
            identity = self.identity.as_str(),
            resource = self.resource.as_str(),
            outcome,
            reason,
            cache = self.cache,
            latency_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
        );
    }
}
