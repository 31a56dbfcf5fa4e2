//! The stop signal every long-running sidemesh process (and a Rust plugin) waits for.

/// Completes on SIGTERM or SIGINT (Ctrl-C). If SIGTERM cannot be watched, that is logged
/// and only SIGINT stops the process.
pub async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM; only SIGINT stops");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
