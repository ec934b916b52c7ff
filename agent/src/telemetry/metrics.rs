//! Prometheus metrics. Label values come from small fixed sets (outcomes, cache results, status codes, kernel event
//! names): no pod names, paths or resources, so a busy node cannot blow up the series count.

use std::sync::Arc;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text::encode},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// One of the kernel programs' event counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelCounter {
    /// Metric name without the `nmi_kernel_` prefix, e.g. `redirected`.
    pub name: &'static str,
    pub help: &'static str,
    pub value: u64,
}

/// The kernel side's numbers, read at scrape time. Implemented by the datapath; telemetry knows nothing of eBPF.
pub trait KernelStats: Send + Sync + 'static {
    /// The event counters, summed over CPUs.
    fn counters(&self) -> Vec<KernelCounter>;
    /// Connections currently recorded in the kernel map.
    fn tracked_connections(&self) -> usize;
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    /// granted | denied | probe | error | forwarded
    pub outcome: &'static str,
    /// hit | miss | none
    pub cache: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// The upstream HTTP status, or `unreachable`.
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    pub token_requests: Family<TokenLabels, Counter>,
    pub request_seconds: Histogram,
    pub upstream_seconds: Histogram,
    pub upstream_errors: Family<StatusLabels, Counter>,
    pub attestation_failures: Family<ReasonLabels, Counter>,
    /// Requests refused because their caller was over a per-caller limit, by limit (`connections`).
    pub caller_limited: Family<ReasonLabels, Counter>,
    /// Connections the server cut, by why (`io_timeout`: a response not read or a request not sent in time;
    /// `header_timeout`; `lifetime`).
    pub connections_cut: Family<ReasonLabels, Counter>,
    pub bindings_loaded: Gauge,
    /// Failed attempts to bind the health address (it was taken, or not an address of this host).
    pub health_bind_failures: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("nmi");
        let token_requests = Family::<TokenLabels, Counter>::default();
        // 100 µs .. ~26 s: a cache hit is sub-millisecond, an upstream call with retries can take seconds.
        let request_seconds = Histogram::new(exponential_buckets(0.0001, 4.0, 10));
        let upstream_seconds = Histogram::new(exponential_buckets(0.001, 3.0, 10));
        let upstream_errors = Family::<StatusLabels, Counter>::default();
        let attestation_failures = Family::<ReasonLabels, Counter>::default();
        let caller_limited = Family::<ReasonLabels, Counter>::default();
        let connections_cut = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "caller_limited",
            "Requests refused because their caller (one cgroup) was over a per-caller limit, by limit",
            caller_limited.clone(),
        );
        registry.register(
            "connections_cut",
            "Connections the token service closed on a client that was too slow to send or to read, by reason",
            connections_cut.clone(),
        );
        let bindings_loaded = Gauge::default();
        let health_bind_failures = Counter::default();
        registry.register(
            "token_requests",
            "Token requests by outcome and cache result",
            token_requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to answer a token request",
            request_seconds.clone(),
        );
        registry.register(
            "upstream_duration_seconds",
            "Time of calls to the real IMDS or the identity provider",
            upstream_seconds.clone(),
        );
        registry.register(
            "upstream_errors",
            "Failed upstream calls by HTTP status",
            upstream_errors.clone(),
        );
        registry.register(
            "attestation_failures",
            "Connections refused because the kernel had no redirect record for them",
            attestation_failures.clone(),
        );
        registry.register(
            "bindings_loaded",
            "Identity bindings currently loaded",
            bindings_loaded.clone(),
        );
        registry.register(
            "health_listener_bind_failures",
            "Failed attempts to bind the health address before it was bound (the token service ran meanwhile)",
            health_bind_failures.clone(),
        );
        Metrics {
            registry,
            token_requests,
            request_seconds,
            upstream_seconds,
            upstream_errors,
            attestation_failures,
            caller_limited,
            connections_cut,
            bindings_loaded,
            health_bind_failures,
        }
    }

    /// Adds the kernel's own counters and map occupancy, read at scrape time.
    pub fn register_kernel(&mut self, kernel: Arc<dyn KernelStats>) {
        self.registry
            .register_collector(Box::new(KernelCollector(kernel)));
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

struct KernelCollector(Arc<dyn KernelStats>);

impl std::fmt::Debug for KernelCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCollector")
    }
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for KernelCounter { name, help, value } in self.0.counters() {
            let metric = ConstCounter::new(value);
            let name = format!("kernel_{name}");
            let help = format!("Kernel datapath events: {help}");
            metric.encode(encoder.encode_descriptor(
                &name,
                &help,
                None,
                metric.metric_type(),
            )?)?;
        }
        let tracked = ConstGauge::new(self.0.tracked_connections() as i64);
        tracked.encode(encoder.encode_descriptor(
            "tracked_connections",
            "Redirected connections currently recorded in the kernel map",
            None,
            tracked.metric_type(),
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;

    impl KernelStats for Fixed {
        fn counters(&self) -> Vec<KernelCounter> {
            vec![KernelCounter {
                name: "redirected",
                help: "connects to IMDS:80 redirected to the agent",
                value: 7,
            }]
        }

        fn tracked_connections(&self) -> usize {
            3
        }
    }

    #[test]
    fn kernel_numbers_are_read_at_scrape_time_under_their_names() {
        let mut metrics = Metrics::new();
        metrics.register_kernel(Arc::new(Fixed));
        let text = metrics.render();
        assert!(text.contains("nmi_kernel_redirected_total 7"), "{text}");
        assert!(text.contains("nmi_tracked_connections 3"), "{text}");
        assert!(
            text.contains(
                "# HELP nmi_kernel_redirected Kernel datapath events: connects to IMDS:80"
            ),
            "{text}"
        );
    }
}
