//! Logs, the audit trail, health and readiness. The bottom layer: every other part reports here, and nothing here
//! depends on them (the kernel's numbers come in through [`metrics::KernelStats`]).

pub mod health;
pub mod metrics;
pub mod readiness;
pub mod refusals;

use clap::ValueEnum;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line, fields at the top level; audit events carry `"target":"audit"`.
    Json,
}

/// Installs the global subscriber. `RUST_LOG` overrides the default level (info).
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
}
