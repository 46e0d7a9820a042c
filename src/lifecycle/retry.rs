//! Retries of dependency calls while the dependency is unavailable, for at
//! most `RTM_RETRY_FOR`.

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBuilder, Retryable};
use tracing::{debug, warn};

use super::Lifecycle;
use crate::ports::{ContainerEngine, LeaseStore, RuntimeStore, StoreError};

impl<S, L, E> Lifecycle<S, L, E>
where
    S: RuntimeStore,
    L: LeaseStore,
    E: ContainerEngine,
{
    /// Retries a store call while the database is unavailable, for
    /// `RTM_RETRY_FOR`.
    pub(super) async fn store_retrying<T, F, Fut>(&self, call: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        self.retrying(call, |e| matches!(e, StoreError::Unavailable(_)))
            .await
    }

    /// Retries `call` with exponential backoff while `transient(error)`, for
    /// at most `RTM_RETRY_FOR` in total.
    pub(super) async fn retrying<T, Err, F, Fut>(
        &self,
        call: F,
        mut transient: impl FnMut(&Err) -> bool,
    ) -> Result<T, Err>
    where
        Err: std::fmt::Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Err>>,
    {
        // backon's total delay counts sleeps only; the calls' own timeouts
        // (seconds each) come on top, so the deadline is checked as well.
        let since = std::time::Instant::now();
        let retry_for = self.cfg.retry_for;
        let deadline = since + retry_for;
        // The last pause is cut short at the deadline, then one last call:
        // backon's own `with_total_delay` gives up as soon as the *next*
        // pause would overrun, which ended outages a quarter shorter than
        // RTM_RETRY_FOR with `service_unavailable`.
        let backoff = ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(2))
            .with_jitter()
            .without_max_times()
            .build()
            .map(move |pause| {
                pause.min(deadline.saturating_duration_since(std::time::Instant::now()))
            });
        let outcome = call
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(|e| transient(e) && since.elapsed() < retry_for)
            // One line per outage, not per attempt: attempts go to debug.
            .notify(|e, delay| debug!(error = %e, retry_in = ?delay, "dependency call failed; retrying"))
            .await;
        if let Err(e) = &outcome
            && since.elapsed() >= retry_for
        {
            warn!(error = %e, waited = ?since.elapsed(), "dependency still failing after RTM_RETRY_FOR; giving up");
        }
        outcome
    }
}
