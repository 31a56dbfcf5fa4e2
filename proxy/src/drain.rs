//! The two-stage stop signal of a listener's connections, made cheap to carry and to
//! watch: every connection holds one and checks it on every wake-up of its task.
//!
//! A `CancellationToken` takes a lock to clone, to drop, to ask whether it is cancelled,
//! and on every poll of its `cancelled()` future (twice: the flag, then the waiter list).
//! Here a [`Drain`] is one `Arc` (one atomic to clone), each stage keeps a flag read
//! without a lock, and [`Fired`] polls the token's future only when it must register a
//! new waker: a connection's task, whose waker never changes, pays an atomic load per
//! wake-up instead of two locks.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// Two-stage stop signal for connections: `soft` asks them to finish (stop accepting,
/// HTTP graceful shutdown), `hard` ends them. Clones share the signal.
#[derive(Clone, Default)]
pub(crate) struct Drain(Arc<Stages>);

/// The stages of a [`Drain`].
#[derive(Default)]
pub(crate) struct Stages {
    pub soft: Stage,
    pub hard: Stage,
}

impl std::ops::Deref for Drain {
    type Target = Stages;

    fn deref(&self) -> &Stages {
        &self.0
    }
}

/// One stage of a drain: fired once, never reset.
#[derive(Default)]
pub(crate) struct Stage {
    fired: AtomicBool,
    token: CancellationToken,
}

impl Stage {
    /// Fires the stage: every [`Stage::cancelled`] future completes.
    pub(crate) fn cancel(&self) {
        // The flag first: a woken waiter reads it to know why it was woken.
        self.fired.store(true, Ordering::Release);
        self.token.cancel();
    }

    /// Whether the stage has fired (an atomic load, no lock).
    pub(crate) fn is_cancelled(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }

    /// Completes once the stage has fired; it may be polled again after completing.
    pub(crate) fn cancelled(&self) -> Fired<'_> {
        Fired {
            fired: &self.fired,
            wait: self.token.cancelled(),
            waker: None,
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Stage::cancelled`].
    pub(crate) struct Fired<'a> {
        fired: &'a AtomicBool,
        #[pin]
        wait: WaitForCancellationFuture<'a>,
        // The waker the token's future holds, if it holds one.
        waker: Option<Waker>,
    }
}

impl Future for Fired<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.fired.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        // The token wakes the registered waker when it fires, after the flag is set: with
        // the same waker registered, there is nothing to do until then.
        if this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        let r = this.wait.poll(cx);
        if r.is_pending() {
            *this.waker = Some(cx.waker().clone());
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn each_stage_wakes_its_waiters_and_stays_fired() {
        let drain = Drain::default();
        let d = drain.clone();
        let soft = tokio::spawn(async move {
            let wait = d.soft.cancelled();
            tokio::pin!(wait);
            // Polled many times from one task before it fires, once after.
            for _ in 0..3 {
                tokio::select! {
                    _ = wait.as_mut() => return false,
                    _ = tokio::task::yield_now() => {}
                }
            }
            wait.as_mut().await;
            wait.as_mut().await;
            d.soft.is_cancelled() && !d.hard.is_cancelled()
        });
        let d = drain.clone();
        let hard = tokio::spawn(async move { d.hard.cancelled().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!soft.is_finished() && !hard.is_finished());
        assert!(!drain.soft.is_cancelled());
        drain.soft.cancel();
        let soft = tokio::time::timeout(Duration::from_secs(5), soft).await;
        assert!(soft.unwrap().unwrap(), "soft fired, hard not");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!hard.is_finished());
        drain.hard.cancel();
        tokio::time::timeout(Duration::from_secs(5), hard)
            .await
            .unwrap()
            .unwrap();
        // A wait made after the stage fired completes at once.
        tokio::time::timeout(Duration::from_secs(5), drain.hard.cancelled())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_wait_moved_to_another_task_registers_that_task() {
        let drain = Drain::default();
        let d = drain.clone();
        // Polled once on this task, then awaited on another one.
        let mut wait = Box::pin(async move {
            let w = d.soft.cancelled();
            tokio::pin!(w);
            w.await
        });
        assert!(futures::poll!(wait.as_mut()).is_pending());
        let other = tokio::spawn(wait);
        tokio::time::sleep(Duration::from_millis(20)).await;
        drain.soft.cancel();
        tokio::time::timeout(Duration::from_secs(5), other)
            .await
            .unwrap()
            .unwrap();
    }
}
