//! The reconciler (SPEC §11): notices engines that stop without a command.
//!
//! Two sources name games to look at:
//! - the engine's event stream (`die`, `oom`, `destroy` of managed
//!   containers under this worker's prefix), subscribed again whenever it
//!   drops, with a full pass after each reconnection (events missed while
//!   it was down are not replayed);
//! - a periodic pass, at start-up and every `RTM_RECONCILE_INTERVAL`, over
//!   every `running` record (a worker down while an engine died reports it
//!   here), which also counts orphan containers.
//!
//! Looking at a game is [`Lifecycle::report_exit`]: under the game's lease
//! and fence, re-checked there, so a command in progress always wins and
//! each exit is written once however many workers look. A reported exit
//! with restart budget left is followed by a `restart` through
//! [`Lifecycle::handle`], like any command. One game is looked at by one
//! task of this worker at a time; a look asked for meanwhile runs after it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::config::ReconcilerConfig;
use crate::domain::{GameId, RuntimeStatus};
use crate::lifecycle::{ExitReport, Lifecycle};
use crate::pauses::Pauses;
use crate::ports::{ContainerEngine, LeaseStore, RuntimeStore};
use crate::shutdown::Shutdown;
use crate::telemetry;

/// How soon a game whose lease a command held is looked at again (the
/// command's own outcome usually settles it first).
const BUSY_AGAIN: Duration = Duration::from_secs(1);

/// The reconciler of one worker.
pub struct Reconciler<S, L, E> {
    lc: Lifecycle<S, L, E>,
    cfg: ReconcilerConfig,
    /// `RTM_CONTAINER_PREFIX`: only containers named `<prefix><game_id>`
    /// are this worker's.
    prefix: String,
}

/// Whether a game is being looked at, and whether another look was asked
/// for meanwhile.
type Looking = Arc<Mutex<HashMap<GameId, bool>>>;

impl<S, L, E> Reconciler<S, L, E>
where
    S: RuntimeStore,
    L: LeaseStore,
    E: ContainerEngine,
{
    pub fn new(lc: Lifecycle<S, L, E>, cfg: ReconcilerConfig, prefix: String) -> Self {
        Self { lc, cfg, prefix }
    }

    /// The game a container name belongs to: `<prefix><game_id>`, never the
    /// temporary `<prefix>_next.<game_id>` of a patch in progress.
    fn game_of(&self, name: &str) -> Option<GameId> {
        let rest = name.strip_prefix(&self.prefix)?;
        GameId::parse(rest).ok()
    }

    /// Runs until `stop`: the watch, the passes, and the looks they ask for.
    pub async fn run(self, mut stop: Shutdown) {
        let this = Arc::new(self);
        let (tx, mut rx) = mpsc::unbounded_channel::<GameId>();
        let (pass_tx, mut pass_rx) = mpsc::unbounded_channel::<()>();
        let watch = tokio::spawn(this.clone().watch(tx.clone(), pass_tx));
        let looking: Looking = Arc::default();
        let mut every = tokio::time::interval(this.cfg.interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut orphans_seen = HashSet::new();
        info!(interval = ?this.cfg.interval, restart_on_exit = %this.cfg.restart_on_exit, "reconciler watching engine events");
        loop {
            tokio::select! {
                () = stop.wait() => break,
                _ = every.tick() => this.pass(&tx, &mut orphans_seen).await,
                Some(()) = pass_rx.recv() => this.pass(&tx, &mut orphans_seen).await,
                Some(game) = rx.recv() => this.clone().look_at(game, &looking, &tx),
            }
        }
        watch.abort();
        debug!("reconciler stopped");
    }

    /// Follows the engine's events, subscribing again whenever the stream
    /// ends or fails; each reconnection asks for a pass.
    async fn watch(
        self: Arc<Self>,
        games: mpsc::UnboundedSender<GameId>,
        passes: mpsc::UnboundedSender<()>,
    ) {
        let mut pauses = Pauses::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut first = true;
        loop {
            let mut events = self.lc.engine().events();
            if !first {
                let _ = passes.send(());
            }
            first = false;
            loop {
                match events.next().await {
                    Some(Ok(event)) => {
                        pauses.reset();
                        if let Some(game) = self.game_of(&event.name) {
                            debug!(game_id = %game, action = ?event.action, "engine event");
                            let _ = games.send(game);
                        }
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "the engine's event stream failed; subscribing again");
                        break;
                    }
                    None => {
                        warn!("the engine's event stream ended; subscribing again");
                        break;
                    }
                }
            }
            tokio::time::sleep(pauses.next_pause()).await;
        }
    }

    /// Asks for a look at every `running` game and counts orphans.
    async fn pass(
        &self,
        games: &mpsc::UnboundedSender<GameId>,
        orphans_seen: &mut HashSet<String>,
    ) {
        // `exited` ones too: a restart their exit asked for may never have
        // run (its worker died first).
        for status in [RuntimeStatus::Running, RuntimeStatus::Exited] {
            match self.lc.store().records_in(status).await {
                Ok(records) => {
                    for record in records {
                        let _ = games.send(record.game_id);
                    }
                }
                Err(e) => warn!(error = %e, %status, "reconciler pass: cannot list the records"),
            }
        }
        self.count_orphans(orphans_seen).await;
    }

    /// Counts (`rtmanager_orphan_containers`) and logs, once each, the
    /// managed containers of this prefix that no record names. Never
    /// touches them.
    async fn count_orphans(&self, seen: &mut HashSet<String>) {
        let containers = match self.lc.engine().managed_containers().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "reconciler pass: cannot list the managed containers");
                return;
            }
        };
        let mut orphans = HashSet::new();
        for c in containers {
            let Some(game) = self.game_of(&c.name) else {
                continue;
            };
            match self.lc.store().load(&game).await {
                Ok(Some(_)) => {}
                Ok(None) => {
                    if !seen.contains(c.id.as_str()) {
                        warn!(container = %c.name, container_id = %c.id, running = c.running,
                            "orphan container: managed, but no runtime record names its game; left alone");
                    }
                    orphans.insert(c.id.to_string());
                }
                Err(e) => {
                    warn!(error = %e, "reconciler pass: cannot read a record");
                    return;
                }
            }
        }
        metrics::gauge!(telemetry::ORPHAN_CONTAINERS).set(orphans.len() as f64);
        *seen = orphans;
    }

    /// Looks at `game` in a task of its own, unless a look is running: then
    /// that one looks again once done.
    fn look_at(
        self: Arc<Self>,
        game: GameId,
        looking: &Looking,
        again: &mpsc::UnboundedSender<GameId>,
    ) {
        {
            let mut looking = looking.lock().expect("looking");
            if let Some(more) = looking.get_mut(&game) {
                *more = true;
                return;
            }
            looking.insert(game.clone(), false);
        }
        let (looking, again) = (looking.clone(), again.clone());
        tokio::spawn(async move {
            loop {
                let busy = self.look(&game).await;
                let more = {
                    let mut looking = looking.lock().expect("looking");
                    let more = looking.get(&game).copied().unwrap_or(false);
                    if more {
                        looking.insert(game.clone(), false);
                    } else {
                        looking.remove(&game);
                    }
                    more
                };
                if more {
                    continue;
                }
                if busy {
                    let (again, game) = (again.clone(), game.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(BUSY_AGAIN).await;
                        let _ = again.send(game);
                    });
                }
                return;
            }
        });
    }

    /// One look at a game; whether a command held it (look again soon).
    async fn look(&self, game: &GameId) -> bool {
        let policy = self.cfg.restart_on_exit;
        let restart = match self.lc.report_exit(game, policy).await {
            Ok(ExitReport::Reported { restart, .. }) => restart,
            Ok(ExitReport::PendingRestart(restart)) => Some(restart),
            Ok(ExitReport::Busy) => return true,
            Ok(
                ExitReport::NotExited | ExitReport::AlreadyReported | ExitReport::CommandUnfinished,
            ) => return false,
            Err(e) => {
                warn!(game_id = %game, error = %e, "reconciler: cannot look at the game now; the next pass will");
                return false;
            }
        };
        let Some(request) = restart else {
            return false;
        };
        let outcome = match self.lc.handle(*request).await {
            // Asked again by a pass: it had run after all.
            Ok(handled) if handled.duplicate => return false,
            Ok(handled) => handled.event.outcome.as_str(),
            Err(e) => {
                warn!(game_id = %game, error = %e, "reconciler: the automatic restart was interrupted");
                "interrupted"
            }
        };
        metrics::counter!(telemetry::AUTO_RESTARTS, "outcome" => outcome).increment(1);
        false
    }
}
