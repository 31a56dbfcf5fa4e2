//! The stop signal every long-running sidemesh process (and a Rust plugin) waits for.

use std::future::Future;

/// Watches SIGTERM and SIGINT (Ctrl-C) from the moment it is called, and returns a future
/// that completes on the first of them. Call it before printing the ready line: a signal
/// that arrives between "ready" and the first poll of a lazily registered handler would
/// otherwise kill the process with the default action instead of stopping it cleanly.
/// If SIGTERM cannot be watched, that is logged and only SIGINT stops the process.
/// Must be called inside a tokio runtime.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Ok(mut term), Err(e)) => {
                tracing::error!(error = %e, "cannot watch SIGINT; only SIGTERM stops");
                term.recv().await;
            }
            (Err(e), Ok(mut int)) => {
                tracing::error!(error = %e, "cannot watch SIGTERM; only SIGINT stops");
                int.recv().await;
            }
            (Err(e), Err(_)) => {
                tracing::error!(error = %e, "cannot watch SIGTERM or SIGINT; stop with SIGKILL");
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// The handler is in place as soon as `signal()` returns, before its first poll: a
    /// SIGTERM sent in between is not lost (and does not kill the test process).
    #[tokio::test]
    async fn a_signal_before_the_first_poll_is_kept() {
        let stop = super::signal();
        // Sent with kill(1) to our own PID: the crate has no libc dependency for raise(3).
        let status = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        tokio::time::timeout(std::time::Duration::from_secs(5), stop)
            .await
            .expect("the SIGTERM sent before the first poll stops it");
    }
}
