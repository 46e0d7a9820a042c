//! The shutdown signal, shared by every task of the worker (mini-redis
//! style): a `watch` channel flipped once.

use std::time::Duration;

use tokio::sync::watch;

/// How long operations stopped at the shutdown timeout (commands and the
/// reconciler's looks alike) have to finish the Docker call they are in (a
/// stop's grace period, a pull) and stop before their next step.
pub const STOPPING_GRACE: Duration = Duration::from_secs(120);

/// Sends the signal.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// Receives it; cheap to clone into every task.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown began (at once if it already has).
    pub async fn wait(&mut self) {
        // An error means the trigger was dropped: treat it as shutdown too.
        let _ = self.0.wait_for(|set| *set).await;
    }
}
