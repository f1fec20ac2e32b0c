//! The idle timeout of a stream: how long one wait for the next chunk may
//! last.
//!
//! A `tokio::time::timeout` per chunk put a timer into tokio's wheel and took
//! it out again for every chunk of every stream. [`IdleTimer`] keeps one
//! timer for the whole stream and moves it only when it fires before the
//! current wait's deadline, so a chunk costs one clock read.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// A wait that outlasted the idle time.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Stalled;

pub(crate) struct IdleTimer {
    idle: Duration,
    wait_started: Instant,
    timer: Pin<Box<Sleep>>,
}

impl IdleTimer {
    pub(crate) fn new(idle: Duration) -> Self {
        let now = Instant::now();
        Self {
            idle,
            wait_started: now,
            timer: Box::pin(tokio::time::sleep_until(now + idle)),
        }
    }

    /// How long one wait may last.
    pub(crate) fn idle(&self) -> Duration {
        self.idle
    }

    /// `fut`'s output, or [`Stalled`] when it has not finished `idle` after
    /// this call began (as `tokio::time::timeout(idle, fut)` would say).
    pub(crate) async fn within<F: Future>(&mut self, fut: F) -> Result<F::Output, Stalled> {
        self.wait_started = Instant::now();
        let mut fut = std::pin::pin!(fut);
        std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                return Poll::Ready(Ok(out));
            }
            // The timer may still be set for an earlier wait's deadline,
            // never a later one: when it fires early, it is moved on.
            loop {
                ready!(self.timer.as_mut().poll(cx));
                let deadline = self.wait_started + self.idle;
                if Instant::now() >= deadline {
                    return Poll::Ready(Err(Stalled));
                }
                self.timer.as_mut().reset(deadline);
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each wait gets the whole idle time from its own start, however long
    /// the stream has run; a wait that outlasts it is cut at its deadline.
    #[tokio::test(start_paused = true)]
    async fn each_wait_gets_its_own_deadline() {
        let idle = Duration::from_millis(100);
        let mut timer = IdleTimer::new(idle);
        for _ in 0..5 {
            let sleep = tokio::time::sleep(Duration::from_millis(90));
            assert_eq!(timer.within(sleep).await, Ok(()));
        }
        // Time passing between waits (a slow reader) does not count.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            timer
                .within(tokio::time::sleep(Duration::from_millis(99)))
                .await,
            Ok(())
        );
        let start = Instant::now();
        assert_eq!(
            timer.within(std::future::pending::<()>()).await,
            Err(Stalled)
        );
        assert_eq!(start.elapsed(), idle);
        // A ready future never waits, even with the deadline long past.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(timer.within(async { 7 }).await, Ok(7));
    }
}
