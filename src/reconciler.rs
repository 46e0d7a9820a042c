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
//! [`Lifecycle::handle`], like any command.
//!
//! Looks run [`LOOKERS`] at a time, whatever asks for them, the games an
//! event names before those a pass names: a patch of every game at once
//! stops every old container at once (a `die` and a `destroy` each), and a
//! pass names every game. A task per ask would hold
//! a look's future, a database connection and a Docker connection per game
//! at once (the worker's peak memory, measured), for looks that nearly all
//! find a command busy or the engine running. Asks for a game already waiting are one ask; one game is
//! looked at by one look of this worker at a time, and an ask meanwhile
//! looks again after it. At shutdown the looks and restarts in flight are
//! operations like any other: they finish within `RTM_SHUTDOWN_TIMEOUT`,
//! or stop before their next Docker step.

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use futures_util::StreamExt as _;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::config::ReconcilerConfig;
use crate::domain::{CommandRequest, GameId, RuntimeStatus};
use crate::lifecycle::{ExitReport, Lifecycle};
use crate::pauses::Pauses;
use crate::ports::{ContainerEngine, LeaseStore, RuntimeStore};
use crate::shutdown::{STOPPING_GRACE, Shutdown};
use crate::telemetry;

/// How many games one worker looks at at once. A look is a record read and
/// an inspect, and a few writes for an exit: a handful keep up with a
/// burst (hundreds of looks a second), and an exit is still reported well
/// within the seconds SPEC §11 allows.
pub const LOOKERS: usize = 4;

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

/// What one look found to do next.
enum Looked {
    Done,
    /// A command held the game: look again in [`BUSY_AGAIN`].
    Busy,
    /// An exit asked for this automatic restart.
    Restart(Box<CommandRequest>),
}

/// Which of two queues an ask waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    /// An event named the game, or a look is to be repeated: served first,
    /// so an exit is reported within moments however many games a pass
    /// names.
    Soon,
    /// A pass named it.
    Routine,
}

/// Which games wait for a look, which are being looked at, and which are
/// to be looked at again later. The state is bounded by the number of
/// games, however many asks arrive: each game waits at most once (an ask
/// `Soon` moves a `Routine` one ahead; its old place is skipped).
#[derive(Debug, Default)]
struct Looks {
    soon: VecDeque<GameId>,
    routine: VecDeque<GameId>,
    /// Where each waiting game waits.
    queued: HashMap<GameId, Lane>,
    /// Being looked at (or restarted after an exit).
    looking: HashSet<GameId>,
    /// Asked for while being looked at: waits until that look is done.
    again: HashSet<GameId>,
    /// A command held them: asked for again at that time.
    later: HashMap<GameId, Instant>,
}

impl Looks {
    fn ask(&mut self, game: GameId, lane: Lane) {
        if self.looking.contains(&game) {
            self.again.insert(game);
            return;
        }
        self.later.remove(&game);
        match (self.queued.get(&game), lane) {
            (None, _) | (Some(Lane::Routine), Lane::Soon) => {
                self.queued.insert(game.clone(), lane);
                match lane {
                    Lane::Soon => self.soon.push_back(game),
                    Lane::Routine => self.routine.push_back(game),
                }
            }
            (Some(_), _) => {}
        }
    }

    /// The next game to look at, marked as being looked at.
    fn take(&mut self) -> Option<GameId> {
        for lane in [Lane::Soon, Lane::Routine] {
            loop {
                let queue = match lane {
                    Lane::Soon => &mut self.soon,
                    Lane::Routine => &mut self.routine,
                };
                let Some(game) = queue.pop_front() else { break };
                // A game moved to the other lane (or already taken from it)
                // left this place behind.
                if self.queued.get(&game) == Some(&lane) {
                    self.queued.remove(&game);
                    self.looking.insert(game.clone());
                    return Some(game);
                }
            }
        }
        None
    }

    /// A look (or the restart after it) is done: an ask that came meanwhile
    /// is served now, a busy game later.
    fn done(&mut self, game: GameId, busy: bool, now: Instant) {
        self.looking.remove(&game);
        if self.again.remove(&game) {
            self.ask(game, Lane::Soon);
        } else if busy {
            self.later.insert(game, now + BUSY_AGAIN);
        }
    }

    /// When the earliest game asked for later is due.
    fn next_due(&self) -> Option<Instant> {
        self.later.values().min().copied()
    }

    /// Asks for the games due by `now`.
    fn due(&mut self, now: Instant) {
        let due: Vec<GameId> = self
            .later
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(g, _)| g.clone())
            .collect();
        for game in due {
            self.ask(game, Lane::Soon);
        }
    }
}

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

    /// Runs until `stop`: the watch, the passes, and the looks they ask
    /// for; then lets the looks and restarts in flight finish within
    /// `drain_timeout` (`RTM_SHUTDOWN_TIMEOUT`), like the consumer's
    /// commands.
    pub async fn run(self, mut stop: Shutdown, drain_timeout: Duration) {
        let this = Arc::new(self);
        let (tx, mut rx) = mpsc::unbounded_channel::<(GameId, Lane)>();
        let (pass_tx, pass_rx) = mpsc::unbounded_channel::<()>();
        let watch = tokio::spawn(this.clone().watch(tx.clone(), pass_tx));
        // Passes in a task of their own: a slow one (a busy engine lists
        // containers slowly) must not hold up the looks events ask for.
        let passes = tokio::spawn(this.clone().passes(tx, pass_rx));
        let mut looks = Looks::default();
        // Looks, at most LOOKERS at once; restarts (one per exit with budget
        // left, so rare) outside that limit, so a restart's seconds never
        // hold up the reports of other games' exits.
        let mut lookers: JoinSet<(GameId, Looked)> = JoinSet::new();
        let mut restarts: JoinSet<GameId> = JoinSet::new();
        info!(interval = ?this.cfg.interval, restart_on_exit = %this.cfg.restart_on_exit, "reconciler watching engine events");
        loop {
            while lookers.len() < LOOKERS
                && let Some(game) = looks.take()
            {
                let this = this.clone();
                lookers.spawn(async move {
                    let looked = this.look(&game).await;
                    (game, looked)
                });
            }
            let due = looks.next_due();
            tokio::select! {
                () = stop.wait() => break,
                Some((game, lane)) = rx.recv() => looks.ask(game, lane),
                Some(done) = lookers.join_next(), if !lookers.is_empty() => {
                    let (game, looked) = done.expect("a look catches its panics");
                    match looked {
                        Looked::Done => looks.done(game, false, Instant::now()),
                        Looked::Busy => looks.done(game, true, Instant::now()),
                        // Still being looked at until the restart is done.
                        Looked::Restart(request) => {
                            let this = this.clone();
                            restarts.spawn(async move {
                                this.restart(&game, *request).await;
                                game
                            });
                        }
                    }
                }
                Some(done) = restarts.join_next(), if !restarts.is_empty() => {
                    looks.done(done.expect("a restart catches its panics"), false, Instant::now());
                }
                () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    looks.due(Instant::now());
                }
            }
        }
        watch.abort();
        passes.abort();
        // A look that finds an exit now still writes it; the restart it asks
        // for is left to the next start-up's pass (`PendingRestart`).
        let in_flight = lookers.len() + restarts.len();
        if in_flight > 0 {
            info!(in_flight, "reconciler: waiting for its looks in flight");
            if !drain(&mut lookers, &mut restarts, drain_timeout).await {
                // As the consumer does with its commands: each stops before
                // its next Docker step and releases its lease once the call
                // in flight has returned, never before.
                warn!(
                    ?drain_timeout,
                    "reconciler looks still in flight at the shutdown timeout: stopping them before their next Docker step"
                );
                this.lc.stop_operations();
                if !drain(&mut lookers, &mut restarts, STOPPING_GRACE).await {
                    warn!(
                        grace = ?STOPPING_GRACE,
                        "a reconciler look's Docker call did not return; leaving it (its lease expires within RTM_LEASE_TTL)"
                    );
                    lookers.detach_all();
                    restarts.detach_all();
                }
            }
        }
        debug!("reconciler stopped");
    }

    /// Follows the engine's events, subscribing again whenever the stream
    /// ends or fails; each reconnection asks for a pass.
    async fn watch(
        self: Arc<Self>,
        games: mpsc::UnboundedSender<(GameId, Lane)>,
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
                            let _ = games.send((game, Lane::Soon));
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

    /// Passes at start-up, every `RTM_RECONCILE_INTERVAL`, and whenever the
    /// watch asks (it subscribed again).
    async fn passes(
        self: Arc<Self>,
        games: mpsc::UnboundedSender<(GameId, Lane)>,
        mut asked: mpsc::UnboundedReceiver<()>,
    ) {
        let mut every = tokio::time::interval(self.cfg.interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut orphans_seen = HashSet::new();
        loop {
            tokio::select! {
                _ = every.tick() => {}
                Some(()) = asked.recv() => {}
            }
            self.pass(&games, &mut orphans_seen).await;
        }
    }

    /// Asks for a look at every `running` game and counts orphans.
    async fn pass(
        &self,
        games: &mpsc::UnboundedSender<(GameId, Lane)>,
        orphans_seen: &mut HashSet<String>,
    ) {
        // `exited` ones too: a restart their exit asked for may never have
        // run (its worker died first).
        for status in [RuntimeStatus::Running, RuntimeStatus::Exited] {
            match self.lc.store().records_in(status).await {
                Ok(records) => {
                    for record in records {
                        let _ = games.send((record.game_id, Lane::Routine));
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

    /// One look at a game, its panic caught (a bug in one look must not
    /// stop the reconciler, nor leave the game marked as being looked at).
    async fn look(&self, game: &GameId) -> Looked {
        let policy = self.cfg.restart_on_exit;
        let report = match AssertUnwindSafe(self.lc.report_exit(game, policy))
            .catch_unwind()
            .await
        {
            Ok(report) => report,
            Err(_) => {
                error!(game_id = %game, "reconciler: a look at the game panicked; the next pass looks again");
                return Looked::Done;
            }
        };
        let restart = match report {
            Ok(ExitReport::Reported { restart, .. }) => restart,
            Ok(ExitReport::PendingRestart(restart)) => Some(restart),
            Ok(ExitReport::Busy) => return Looked::Busy,
            Ok(
                ExitReport::NotExited | ExitReport::AlreadyReported | ExitReport::CommandUnfinished,
            ) => None,
            Err(e) => {
                warn!(game_id = %game, error = %e, "reconciler: cannot look at the game now; the next pass will");
                None
            }
        };
        restart.map_or(Looked::Done, Looked::Restart)
    }

    /// The automatic restart an exit asked for, run like any command.
    async fn restart(&self, game: &GameId, request: CommandRequest) {
        let outcome = match AssertUnwindSafe(self.lc.handle(request))
            .catch_unwind()
            .await
        {
            // Asked again by a pass: it had run after all.
            Ok(Ok(handled)) if handled.duplicate => return,
            Ok(Ok(handled)) => handled.event.outcome.as_str(),
            Ok(Err(e)) => {
                warn!(game_id = %game, error = %e, "reconciler: the automatic restart was interrupted");
                "interrupted"
            }
            Err(_) => {
                error!(game_id = %game, "reconciler: the automatic restart panicked");
                "interrupted"
            }
        };
        metrics::counter!(telemetry::AUTO_RESTARTS, "outcome" => outcome).increment(1);
    }
}

/// Waits up to `timeout` for every look and restart in flight; whether they
/// all finished.
async fn drain(
    lookers: &mut JoinSet<(GameId, Looked)>,
    restarts: &mut JoinSet<GameId>,
    timeout: Duration,
) -> bool {
    let all = async {
        while lookers.join_next().await.is_some() {}
        while restarts.join_next().await.is_some() {}
    };
    tokio::time::timeout(timeout, all).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn game(n: usize) -> GameId {
        GameId::parse(&format!("g{n:03}")).unwrap()
    }

    /// Takes games as the run loop does when `room` lookers are free.
    fn take_up_to(looks: &mut Looks, room: usize) -> Vec<GameId> {
        std::iter::from_fn(|| looks.take()).take(room).collect()
    }

    #[test]
    fn a_burst_of_asks_is_one_look_per_game_in_order() {
        let mut looks = Looks::default();
        // A patch of 128 games at once: a die and a destroy each, and a
        // pass naming every game on top.
        for n in 0..128 {
            looks.ask(game(n), Lane::Soon);
            looks.ask(game(n), Lane::Soon);
        }
        for n in 0..128 {
            looks.ask(game(n), Lane::Routine);
        }
        assert_eq!(looks.queued.len(), 128);
        let first = take_up_to(&mut looks, LOOKERS);
        assert_eq!(first, (0..LOOKERS).map(game).collect::<Vec<_>>());
        assert_eq!(looks.looking.len(), LOOKERS);
        let rest = take_up_to(&mut looks, usize::MAX);
        assert_eq!(rest, (LOOKERS..128).map(game).collect::<Vec<_>>());
        assert!(looks.soon.is_empty() && looks.routine.is_empty() && looks.queued.is_empty());
    }

    #[test]
    fn an_event_is_looked_at_before_the_games_a_pass_named() {
        let mut looks = Looks::default();
        for n in 0..200 {
            looks.ask(game(n), Lane::Routine);
        }
        looks.ask(game(150), Lane::Soon);
        looks.ask(game(500), Lane::Soon);
        assert_eq!(
            take_up_to(&mut looks, 3),
            vec![game(150), game(500), game(0)]
        );
        // Game 150 is not looked at a second time from its old place.
        let rest = take_up_to(&mut looks, usize::MAX);
        assert_eq!(rest.len(), 199 - 1);
        assert!(!rest.contains(&game(150)));
    }

    #[test]
    fn an_ask_during_a_look_looks_again_after_it_and_only_then() {
        let mut looks = Looks::default();
        looks.ask(game(1), Lane::Routine);
        assert_eq!(looks.take(), Some(game(1)));
        looks.ask(game(1), Lane::Soon);
        looks.ask(game(1), Lane::Routine);
        assert_eq!(looks.take(), None, "not twice at once");
        looks.done(game(1), false, Instant::now());
        assert_eq!(looks.take(), Some(game(1)), "once more after it");
        looks.done(game(1), false, Instant::now());
        assert_eq!(looks.take(), None);
        assert!(looks.looking.is_empty() && looks.again.is_empty());
    }

    #[test]
    fn a_busy_game_is_asked_for_again_later_unless_asked_sooner() {
        let mut looks = Looks::default();
        let now = Instant::now();
        for n in [1, 2] {
            looks.ask(game(n), Lane::Soon);
            looks.take();
            looks.done(game(n), true, now);
        }
        assert_eq!(looks.take(), None);
        assert_eq!(looks.next_due(), Some(now + BUSY_AGAIN));
        looks.due(now + BUSY_AGAIN / 2);
        assert_eq!(looks.take(), None, "not due yet");
        // An event for game 2 meanwhile: looked at now, not again later.
        looks.ask(game(2), Lane::Soon);
        assert_eq!(looks.take(), Some(game(2)));
        looks.done(game(2), false, now);
        looks.due(now + BUSY_AGAIN);
        assert_eq!(looks.take(), Some(game(1)));
        assert_eq!(looks.take(), None);
        assert_eq!(looks.next_due(), None);
    }
}
