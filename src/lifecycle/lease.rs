//! The held lease: renewed in the background while the operation runs (at a
//! third of its TTL, so a slow stop, pull or health wait never outlives it),
//! checked before every Docker step, and released by its holder with its own
//! short timeout — also when the operation's future is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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

/// The leases this process holds, each with its operation's stop flags, so
/// shutdown can stop whatever the in-flight operations still do when their
/// time is up. It stops them and never releases for them: a lease goes only
/// once its operation has stopped touching Docker (SPEC §10).
pub(super) type HeldLeases = Arc<Mutex<HashMap<GameId, (LeaseHolder, Arc<Stop>)>>>;

/// Why a held lease's operation must stop before its next Docker step.
#[derive(Debug, Default)]
pub(super) struct Stop {
    /// The lease may have passed to someone else.
    lost: AtomicBool,
    /// Shutdown's time for in-flight operations is up.
    shutdown: AtomicBool,
}

pub(super) struct LeaseGuard<L: LeaseStore> {
    leases: L,
    registry: HeldLeases,
    game_id: GameId,
    holder: LeaseHolder,
    stop: Arc<Stop>,
    /// When the lease may have run out, counted from when the last good
    /// acquire or renewal was *sent*: checked by time, not only by the
    /// renewer's flag, so a worker that was paused for longer than the TTL
    /// cannot take one more Docker step before its renewer wakes up.
    valid_until: Arc<Mutex<Instant>>,
    renewer: JoinHandle<()>,
    released: bool,
}

impl<L: LeaseStore> LeaseGuard<L> {
    /// Wraps a just-acquired lease and starts renewing it.
    /// `asked` is when the acquire that got it was sent.
    pub(super) fn hold(
        leases: L,
        registry: HeldLeases,
        game_id: GameId,
        holder: LeaseHolder,
        ttl: Duration,
        asked: Instant,
    ) -> Self {
        let stop = Arc::new(Stop::default());
        let valid_until = Arc::new(Mutex::new(asked + usable(ttl)));
        let renewer = tokio::spawn(renew_until_lost(
            leases.clone(),
            game_id.clone(),
            holder.clone(),
            ttl,
            stop.clone(),
            valid_until.clone(),
        ));
        registry
            .lock()
            .expect("lease registry")
            .insert(game_id.clone(), (holder.clone(), stop.clone()));
        Self {
            leases,
            registry,
            game_id,
            holder,
            stop,
            valid_until,
            renewer,
            released: false,
        }
    }

    /// `Err` once the lease may have passed to someone else, or shutdown
    /// stopped the operation.
    pub(super) fn check(&self) -> Result<(), Interrupted> {
        let expired = Instant::now() >= *self.valid_until.lock().expect("lease clock");
        if expired || self.stop.lost.load(Ordering::Acquire) {
            Err(Interrupted::LeaseLost(self.game_id.to_string()))
        } else if self.stop.shutdown.load(Ordering::Acquire) {
            Err(Interrupted::ShuttingDown(self.game_id.to_string()))
        } else {
            Ok(())
        }
    }

    pub(super) async fn release(mut self) {
        self.released = true;
        self.renewer.abort();
        self.forget();
        release(&self.leases, &self.game_id, &self.holder).await;
    }

    /// Takes this lease out of the process's registry (if it is still this
    /// holder's entry).
    fn forget(&self) {
        let mut held = self.registry.lock().expect("lease registry");
        if held
            .get(&self.game_id)
            .is_some_and(|(h, _)| *h == self.holder)
        {
            held.remove(&self.game_id);
        }
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
        self.forget();
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

/// Stops every operation still holding a lease before its next Docker step
/// (shutdown, after the in-flight operations had their time). Each releases
/// its own lease as it unwinds, once its Docker call in flight returned;
/// releasing them here instead let another worker take a game while this
/// one still stopped its container.
pub(super) fn stop_all(registry: &HeldLeases) {
    for (_, stop) in registry.lock().expect("lease registry").values() {
        stop.shutdown.store(true, Ordering::Release);
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

/// How much of a TTL the holder may use: a margin for clock drift between
/// this process and Redis, and for the time a Docker call takes to start.
fn usable(ttl: Duration) -> Duration {
    ttl - ttl / 10
}

async fn renew_until_lost<L: LeaseStore>(
    leases: L,
    game_id: GameId,
    holder: LeaseHolder,
    ttl: Duration,
    stop: Arc<Stop>,
    valid_until: Arc<Mutex<Instant>>,
) {
    let every = ttl / 3;
    loop {
        tokio::time::sleep(every).await;
        let sent = Instant::now();
        match tokio::time::timeout(every, leases.renew(&game_id, &holder, ttl)).await {
            Ok(Ok(true)) => {
                *valid_until.lock().expect("lease clock") = sent + usable(ttl);
            }
            Ok(Ok(false)) => {
                warn!(game_id = %game_id, "lease lost: it expired or was taken over");
                stop.lost.store(true, Ordering::Release);
                return;
            }
            Ok(Err(e)) => warn!(game_id = %game_id, error = %e, "lease renewal failed"),
            Err(_) => warn!(game_id = %game_id, "lease renewal timed out"),
        }
        // Renewals keep failing: stop before the lease can pass to another
        // worker, not after.
        let until = *valid_until.lock().expect("lease clock");
        if Instant::now() + every >= until {
            warn!(game_id = %game_id, "lease presumed lost: renewals failed for most of its TTL");
            stop.lost.store(true, Ordering::Release);
            return;
        }
    }
}
