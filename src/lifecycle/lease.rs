//! The held lease: renewed in the background while the operation runs (at a
//! third of its TTL, so a slow stop, pull or health wait never outlives it),
//! checked before every Docker step, and released by its holder with its own
//! short timeout — also when the operation's future is dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::Interrupted;
use crate::domain::GameId;
use crate::ports::{LeaseHolder, LeaseStore};

/// How long a release may take; it runs even when the operation was
/// cancelled, so it must not wait on anything else.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) struct LeaseGuard<L: LeaseStore> {
    leases: L,
    game_id: GameId,
    holder: LeaseHolder,
    lost: Arc<AtomicBool>,
    renewer: JoinHandle<()>,
    released: bool,
}

impl<L: LeaseStore> LeaseGuard<L> {
    /// Wraps a just-acquired lease and starts renewing it.
    pub(super) fn hold(leases: L, game_id: GameId, holder: LeaseHolder, ttl: Duration) -> Self {
        let lost = Arc::new(AtomicBool::new(false));
        let renewer = tokio::spawn(renew_until_lost(
            leases.clone(),
            game_id.clone(),
            holder.clone(),
            ttl,
            lost.clone(),
        ));
        Self {
            leases,
            game_id,
            holder,
            lost,
            renewer,
            released: false,
        }
    }

    /// `Err` once the lease may have passed to someone else.
    pub(super) fn check(&self) -> Result<(), Interrupted> {
        if self.lost.load(Ordering::Acquire) {
            Err(Interrupted::LeaseLost(self.game_id.to_string()))
        } else {
            Ok(())
        }
    }

    pub(super) async fn release(mut self) {
        self.released = true;
        self.renewer.abort();
        release(&self.leases, &self.game_id, &self.holder).await;
    }
}

impl<L: LeaseStore> Drop for LeaseGuard<L> {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        // The operation was cancelled mid-flight: release anyway, so the game
        // is not blocked for a whole TTL.
        self.renewer.abort();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (leases, game_id, holder) = (
                self.leases.clone(),
                self.game_id.clone(),
                self.holder.clone(),
            );
            runtime.spawn(async move { release(&leases, &game_id, &holder).await });
        }
    }
}

async fn release<L: LeaseStore>(leases: &L, game_id: &GameId, holder: &LeaseHolder) {
    match tokio::time::timeout(RELEASE_TIMEOUT, leases.release(game_id, holder)).await {
        Ok(Ok(true)) => debug!(game_id = %game_id, "lease released"),
        Ok(Ok(false)) => warn!(game_id = %game_id, "lease was no longer ours at release"),
        Ok(Err(e)) => warn!(game_id = %game_id, error = %e, "release game lease"),
        Err(_) => warn!(game_id = %game_id, "release game lease timed out"),
    }
}

async fn renew_until_lost<L: LeaseStore>(
    leases: L,
    game_id: GameId,
    holder: LeaseHolder,
    ttl: Duration,
    lost: Arc<AtomicBool>,
) {
    let every = ttl / 3;
    let mut renewed_at = Instant::now();
    loop {
        tokio::time::sleep(every).await;
        match tokio::time::timeout(every, leases.renew(&game_id, &holder, ttl)).await {
            Ok(Ok(true)) => renewed_at = Instant::now(),
            Ok(Ok(false)) => {
                warn!(game_id = %game_id, "lease lost: it expired or was taken over");
                lost.store(true, Ordering::Release);
                return;
            }
            Ok(Err(e)) => warn!(game_id = %game_id, error = %e, "lease renewal failed"),
            Err(_) => warn!(game_id = %game_id, "lease renewal timed out"),
        }
        // Renewals keep failing: by the time the TTL since the last good
        // renewal is nearly spent, another worker may take the lease. Stop
        // before that, not after.
        if renewed_at.elapsed() + every >= ttl {
            warn!(game_id = %game_id, "lease presumed lost: renewals failed for most of its TTL");
            lost.store(true, Ordering::Release);
            return;
        }
    }
}
