//! The kernel programs' log records (aya-log), passed on to the agent's own log.

use aya::Ebpf;

/// Reads the records the kernel programs write with aya-log.
pub type KernelLog = aya_log::EbpfLogger<&'static dyn log::Log>;

/// The reader of the loaded programs' log buffer; `None` (with a warning) when the object has none to offer.
pub(super) fn open(ebpf: &mut Ebpf) -> Option<KernelLog> {
    match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => Some(logger),
        Err(e) => {
            tracing::warn!(error = %e, "the kernel programs' log records will not reach this log");
            None
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
