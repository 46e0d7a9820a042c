//! In-memory implementations of the three ports, so the op rules and
//! resumption are tested in milliseconds without PostgreSQL, Redis or
//! Docker. Each keeps the contract its port documents (fencing, one outer
//! outcome per command, repeatable engine calls); the engine logs every
//! call that changes Docker, which is how a test sees work done or not.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt as _;
use futures_util::stream::BoxStream;
use uuid::Uuid;

use crate::domain::{
    CommandRequest, ContainerId, GameId, ImageRef, OutcomeEvent, PriorEntry, Progress,
    RuntimeRecord, RuntimeStatus, Step,
};
use crate::error::ErrorCode;
use crate::ports::{
    Acquired, Answers, ContainerEngine, ContainerInfo, EngineError, EngineEvent, Fence, FenceView,
    InboxClaim, LeaseError, LeaseHolder, LeaseStore, ManagedContainer, OperationWrite, Peeked,
    Recorded, RuntimeStore, StoreError, WriteFence,
};

#[derive(Default)]
struct Tables {
    fences: HashMap<GameId, (i64, Option<String>)>,
    records: HashMap<GameId, RuntimeRecord>,
    /// command_id → the claiming request's fingerprint and description, and
    /// its outer outcome once finished.
    inbox: HashMap<String, Claimed>,
    /// The operation log's events, in write order (operation_id = index + 1).
    log: Vec<OutcomeEvent>,
    journal: Vec<(String, Step)>,
}

/// An inbox row.
#[derive(Default)]
struct Claimed {
    /// `None` for a row an entry created without a claim.
    fingerprint: Option<String>,
    first: String,
    outcome: Option<OutcomeEvent>,
}

/// [`RuntimeStore`] over maps behind a mutex. `die_after` names a journal
/// step (`start.create`) or an entry (`entry stop/patch`,
/// `entry start/patch rolled_back`): once written, the writer never hears
/// back, as if its worker died right then (`died` fires).
#[derive(Clone, Default)]
pub struct MemStore {
    tables: Arc<Mutex<Tables>>,
    pub die_after: Arc<Mutex<Option<String>>>,
    pub died: Arc<tokio::sync::Notify>,
    /// How many fences `advance_fence` (so `begin`) handed out.
    advanced: Arc<std::sync::atomic::AtomicUsize>,
    /// Set: right after the next `peek`, an attempt of this command takes
    /// the game's fence (another worker racing the reader).
    pub take_after_peek: Arc<Mutex<Option<String>>>,
}

impl MemStore {
    /// Never returns if `written` is the point to die at.
    async fn maybe_die(&self, written: &str) {
        let die = self.die_after.lock().expect("die point").as_deref() == Some(written);
        if die {
            self.died.notify_one();
            std::future::pending::<()>().await;
        }
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().expect("store tables")
    }

    /// Sets a game's record as if an earlier operation had written it.
    pub fn put_record(&self, record: RuntimeRecord) {
        self.tables().records.insert(record.game_id.clone(), record);
    }

    pub fn record(&self, game_id: &GameId) -> Option<RuntimeRecord> {
        self.tables().records.get(game_id).cloned()
    }

    /// The game's fence and the command that took it.
    pub fn fence(&self, game_id: &GameId) -> (i64, Option<String>) {
        self.tables()
            .fences
            .get(game_id)
            .cloned()
            .unwrap_or((0, None))
    }

    /// How many fences were taken by `advance_fence` (every `begin`), not
    /// by a write ([`WriteFence::Take`]).
    pub fn fences_advanced(&self) -> usize {
        self.advanced.load(Ordering::SeqCst)
    }

    /// Every event written, in order.
    pub fn events(&self) -> Vec<OutcomeEvent> {
        self.tables().log.clone()
    }

    /// Journals a step for `command_id` as an earlier attempt would have.
    pub fn put_step(&self, command_id: &str, step: Step) {
        let mut t = self.tables();
        t.journal
            .retain(|(c, s)| !(c == command_id && s.name() == step.name()));
        t.journal.push((command_id.to_owned(), step));
    }

    fn fence_check(t: &Tables, game_id: &str, expected: Option<Fence>) -> Result<(), StoreError> {
        let Some(expected) = expected else {
            return Ok(());
        };
        let current = t
            .fences
            .iter()
            .find(|(g, _)| g.as_str() == game_id)
            .map_or(0, |(_, (f, _))| *f);
        if current == expected.0 {
            Ok(())
        } else {
            Err(StoreError::FenceLost(expected.0))
        }
    }
}

impl RuntimeStore for MemStore {
    async fn lookup(&self, request: &CommandRequest) -> Result<InboxClaim, StoreError> {
        let t = self.tables();
        let fingerprint = request.fingerprint();
        Ok(match t.inbox.get(&request.command_id) {
            None => InboxClaim::Fresh,
            Some(claimed)
                if claimed
                    .fingerprint
                    .as_ref()
                    .is_some_and(|f| *f != fingerprint) =>
            {
                InboxClaim::Reused {
                    first: claimed.first.clone(),
                }
            }
            Some(claimed) => match &claimed.outcome {
                None => InboxClaim::Unfinished,
                Some(event) => InboxClaim::Finished(event.clone()),
            },
        })
    }

    async fn claim(&self, request: &CommandRequest) -> Result<InboxClaim, StoreError> {
        {
            let mut t = self.tables();
            if !t.inbox.contains_key(&request.command_id) {
                let first = format!(
                    "{} of game {:?}",
                    request.op,
                    request.game_id.as_deref().unwrap_or_default()
                );
                t.inbox.insert(
                    request.command_id.clone(),
                    Claimed {
                        fingerprint: Some(request.fingerprint()),
                        first,
                        outcome: None,
                    },
                );
                return Ok(InboxClaim::Fresh);
            }
        }
        self.lookup(request).await
    }

    async fn load(&self, game_id: &GameId) -> Result<Option<RuntimeRecord>, StoreError> {
        Ok(self.record(game_id))
    }

    async fn peek(&self, game_id: &GameId, command_id: &str) -> Result<Peeked, StoreError> {
        let (fence, taken_by) = {
            let t = self.tables();
            t.fences.get(game_id).cloned().unwrap_or((0, None))
        };
        let settled = match taken_by {
            None => fence == 0,
            Some(command) => self
                .tables()
                .inbox
                .get(&command)
                .is_some_and(|claimed| claimed.outcome.is_some()),
        };
        let peeked = Peeked {
            fence: Fence(fence),
            settled,
            progress: !self.read_progress(command_id)?.is_empty(),
            record: Ok(self.record(game_id)),
        };
        let racer = self.take_after_peek.lock().expect("racer").take();
        if let Some(racer) = racer {
            self.advance_fence(game_id, &racer).await?;
        }
        Ok(peeked)
    }

    async fn advance_fence(&self, game_id: &GameId, command_id: &str) -> Result<Fence, StoreError> {
        self.advanced.fetch_add(1, Ordering::SeqCst);
        let mut t = self.tables();
        let fence = t.fences.entry(game_id.clone()).or_insert((0, None));
        fence.0 += 1;
        fence.1 = Some(command_id.to_owned());
        Ok(Fence(fence.0))
    }

    async fn observe_fence(&self, game_id: &GameId) -> Result<FenceView, StoreError> {
        let t = self.tables();
        let (fence, taken_by) = t.fences.get(game_id).cloned().unwrap_or((0, None));
        Ok(FenceView {
            fence: Fence(fence),
            taken_by,
        })
    }

    async fn append(&self, write: OperationWrite, event_id: Uuid) -> Result<Recorded, StoreError> {
        let entry = &write.entry;
        let label = format!(
            "entry {}/{}{}",
            entry.op,
            entry.outer_op.map_or("", |o| o.as_str()),
            if entry.rolled_back {
                " rolled_back"
            } else {
                ""
            }
        );
        let recorded = self.write_entry(write, event_id)?;
        self.maybe_die(&label).await;
        Ok(recorded)
    }

    async fn append_rejected(&self, _event: &OutcomeEvent) -> Result<(), StoreError> {
        Ok(())
    }

    async fn progress(&self, command_id: &str) -> Result<Progress, StoreError> {
        self.read_progress(command_id)
    }

    async fn journal(
        &self,
        game_id: &GameId,
        fence: Fence,
        command_id: &str,
        step: &Step,
    ) -> Result<(), StoreError> {
        Self::fence_check(&self.tables(), game_id.as_str(), Some(fence))?;
        self.put_step(command_id, step.clone());
        self.maybe_die(&step.name()).await;
        Ok(())
    }

    async fn records_in(&self, status: RuntimeStatus) -> Result<Vec<RuntimeRecord>, StoreError> {
        Ok(self
            .tables()
            .records
            .values()
            .filter(|r| r.status() == status)
            .cloned()
            .collect())
    }

    async fn last_exit(&self, game_id: &GameId) -> Result<Option<OutcomeEvent>, StoreError> {
        Ok(self
            .tables()
            .log
            .iter()
            .rev()
            .find(|e| e.game_id == game_id.as_str() && e.op.as_deref() == Some("exit"))
            .cloned())
    }

    async fn auto_restarts_since(
        &self,
        game_id: &GameId,
        since: DateTime<Utc>,
    ) -> Result<u32, StoreError> {
        Ok(self
            .tables()
            .log
            .iter()
            .filter(|e| {
                e.game_id == game_id.as_str()
                    && e.op.as_deref() == Some("restart")
                    && e.outer_op.is_none()
                    && e.op_source.as_deref() == Some("reconciler")
                    && e.started_at >= since
            })
            .count() as u32)
    }

    async fn republish(&self, _event_id: Uuid) -> Result<(), StoreError> {
        Ok(())
    }
}

impl MemStore {
    fn write_entry(&self, write: OperationWrite, event_id: Uuid) -> Result<Recorded, StoreError> {
        let mut t = self.tables();
        let entry = &write.entry;
        if let Some(event) = t.log.iter().find(|e| e.event_id == event_id) {
            return Ok(Recorded {
                operation_id: event.operation_id.unwrap_or_default(),
                event: event.clone(),
                answered_before: false,
            });
        }
        Self::fence_check(&t, &entry.game_id, write.fence.expected())?;
        if let WriteFence::Take(seen) = write.fence {
            let game = GameId::parse(&entry.game_id)
                .map_err(|e| StoreError::Corrupt(format!("take the fence: {e}")))?;
            t.fences
                .insert(game, (seen.0 + 1, Some(entry.command_id.clone())));
        }
        let answers_inbox = entry.is_outer() && write.answers == Answers::Command;
        if answers_inbox
            && write.fence.held().is_none()
            && let Some(Claimed {
                outcome: Some(event),
                ..
            }) = t.inbox.get(&entry.command_id)
        {
            return Ok(Recorded {
                operation_id: event.operation_id.unwrap_or_default(),
                event: event.clone(),
                answered_before: true,
            });
        }
        let operation_id = t.log.len() as i64 + 1;
        let event = OutcomeEvent::from_entry(entry, operation_id, event_id);
        t.log.push(event.clone());
        if let Some(update) = write.record {
            let fence = write
                .fence
                .held()
                .ok_or_else(|| StoreError::Corrupt("a record update without the lease".into()))?;
            let created_at = t
                .records
                .get(&update.game_id)
                .map_or_else(Utc::now, |r| r.created_at);
            t.records.insert(
                update.game_id.clone(),
                RuntimeRecord {
                    game_id: update.game_id,
                    image_ref: update.image_ref,
                    state: update.state,
                    state_dir: update.state_dir,
                    fence: fence.0,
                    created_at,
                    updated_at: Utc::now(),
                },
            );
        }
        if answers_inbox {
            let claimed = t.inbox.entry(entry.command_id.clone()).or_default();
            claimed.outcome.get_or_insert_with(|| event.clone());
        }
        Ok(Recorded {
            operation_id,
            event,
            answered_before: false,
        })
    }

    fn read_progress(&self, command_id: &str) -> Result<Progress, StoreError> {
        let t = self.tables();
        let entries = t
            .log
            .iter()
            // As the PostgreSQL store: an invalid_request is never a step.
            .filter(|e| {
                e.command_id == command_id && e.error_code != Some(ErrorCode::InvalidRequest)
            })
            .map(|e| PriorEntry::from_event(e).map_err(StoreError::Corrupt))
            .collect::<Result<_, _>>()?;
        let steps = t
            .journal
            .iter()
            .filter(|(c, _)| c == command_id)
            .map(|(_, s)| s.clone())
            .collect();
        Ok(Progress { entries, steps })
    }
}

/// [`LeaseStore`] over a map; `down` makes every call fail.
#[derive(Clone, Default)]
pub struct MemLeases {
    held: Arc<Mutex<HashMap<GameId, String>>>,
    pub down: Arc<AtomicBool>,
}

impl MemLeases {
    /// Takes a game's lease for another command.
    pub fn hold(&self, game_id: &GameId, command_id: &str) {
        let holder = LeaseHolder::new(command_id);
        self.held
            .lock()
            .expect("leases")
            .insert(game_id.clone(), holder.value());
    }

    pub fn is_free(&self, game_id: &GameId) -> bool {
        !self.held.lock().expect("leases").contains_key(game_id)
    }

    fn up(&self) -> Result<(), LeaseError> {
        if self.down.load(Ordering::SeqCst) {
            Err(LeaseError("injected: the lease store is down".into()))
        } else {
            Ok(())
        }
    }
}

impl LeaseStore for MemLeases {
    async fn acquire(
        &self,
        game_id: &GameId,
        holder: &LeaseHolder,
        _ttl: Duration,
    ) -> Result<Acquired, LeaseError> {
        self.up()?;
        let mut held = self.held.lock().expect("leases");
        match held.get(game_id) {
            Some(value) => Ok(Acquired::HeldBy(value.clone())),
            None => {
                held.insert(game_id.clone(), holder.value());
                Ok(Acquired::Yes)
            }
        }
    }

    async fn renew(
        &self,
        game_id: &GameId,
        holder: &LeaseHolder,
        _ttl: Duration,
    ) -> Result<bool, LeaseError> {
        self.up()?;
        Ok(self.held.lock().expect("leases").get(game_id) == Some(&holder.value()))
    }

    async fn release(&self, game_id: &GameId, holder: &LeaseHolder) -> Result<bool, LeaseError> {
        self.up()?;
        let mut held = self.held.lock().expect("leases");
        if held.get(game_id) == Some(&holder.value()) {
            held.remove(game_id);
            Ok(true)
        } else {
            Ok(false)
        }
    }
}

#[derive(Debug, Clone)]
struct Container {
    id: ContainerId,
    game_id: GameId,
    image: String,
    running: bool,
    exit_code: Option<i64>,
    /// Under the game's temporary name (a patch's next container).
    next: bool,
    oom_killed: bool,
    finished_at: Option<DateTime<Utc>>,
}

#[derive(Default)]
struct Host {
    /// Images present locally.
    images: HashSet<String>,
    /// Images no registry has.
    unpullable: HashSet<String>,
    /// Images whose engine exits at boot.
    crashing: HashSet<String>,
    containers: Vec<Container>,
    /// Starts refused as `StaleTask` (an engine restart kept their task).
    stale_starts: u32,
    /// Stops refused (`Rejected`).
    refuse_stops: bool,
    next_id: u32,
    calls: Vec<String>,
    /// Every call, reads included, by name only.
    trace: Vec<&'static str>,
}

/// [`ContainerEngine`] over a simulated host: every image pullable unless
/// marked otherwise, engines that run until stopped unless their image is
/// marked crashing. No HEALTHCHECK: up means still running after the settle
/// time. `die_after` names a call (`create_next`, `rename`): once it took
/// effect, the caller never hears back, as if its worker died right then
/// (`died` fires).
#[derive(Clone, Default)]
pub struct MemEngine {
    host: Arc<Mutex<Host>>,
    pub die_after: Arc<Mutex<Option<String>>>,
    pub died: Arc<tokio::sync::Notify>,
}

impl MemEngine {
    fn host(&self) -> std::sync::MutexGuard<'_, Host> {
        self.host.lock().expect("engine host")
    }

    /// Never returns if `call` is the point to die at.
    async fn maybe_die(&self, call: &str) {
        let die = self.die_after.lock().expect("die point").as_deref() == Some(call);
        if die {
            self.died.notify_one();
            std::future::pending::<()>().await;
        }
    }

    /// Creates a container of the game under its own name or (`next`) its
    /// temporary one; refused when that name is taken.
    fn create_as(
        &self,
        game_id: &GameId,
        image: &ImageRef,
        next: bool,
    ) -> Result<ContainerId, EngineError> {
        let mut host = self.host();
        let call = if next { "create_next" } else { "create" };
        host.calls.push(format!("{call} {image}"));
        if host
            .containers
            .iter()
            .any(|c| c.game_id == *game_id && c.next == next)
        {
            return Err(EngineError::Rejected(
                "name already in use (HTTP 409)".into(),
            ));
        }
        host.next_id += 1;
        let id = ContainerId(format!("c{}", host.next_id));
        host.containers.push(Container {
            id: id.clone(),
            game_id: game_id.clone(),
            image: image.to_string(),
            running: false,
            exit_code: None,
            next,
            oom_killed: false,
            finished_at: None,
        });
        Ok(id)
    }

    fn find(&self, game_id: &GameId, next: bool) -> Option<ContainerInfo> {
        self.host()
            .containers
            .iter()
            .find(|c| c.game_id == *game_id && c.next == next)
            .map(info)
    }

    /// The game's container under its temporary name, if any.
    pub fn next_container(&self, game_id: &GameId) -> Option<ContainerInfo> {
        self.find(game_id, true)
    }

    /// How many containers of the game run, under either name.
    pub fn running(&self, game_id: &GameId) -> usize {
        self.host()
            .containers
            .iter()
            .filter(|c| c.game_id == *game_id && c.running)
            .count()
    }

    /// A next container of the game, as a dead attempt left it.
    pub fn put_next_container(&self, game_id: &GameId, image: &str) -> ContainerId {
        let image = ImageRef::parse(image).expect("an image");
        self.host().images.insert(image.to_string());
        let id = self.create_as(game_id, &image, true).expect("no next yet");
        self.host().calls.pop();
        id
    }

    pub fn unpullable(&self, image: &str) {
        self.host().unpullable.insert(image.to_owned());
    }

    pub fn crashing(&self, image: &str) {
        self.host().crashing.insert(image.to_owned());
    }

    /// Every stop is refused from now on.
    pub fn refuse_stops(&self) {
        self.host().refuse_stops = true;
    }

    /// The next `n` starts are refused as `StaleTask`.
    pub fn stale_starts(&self, n: u32) {
        self.host().stale_starts = n;
    }

    /// The calls that changed the host (`pull`, `create`, `create_next`,
    /// `rename`, `start`, `stop`, `remove`), in order.
    pub fn calls(&self) -> Vec<String> {
        self.host().calls.clone()
    }

    pub fn clear_calls(&self) {
        let mut host = self.host();
        host.calls.clear();
        host.trace.clear();
    }

    /// Every port call since the last [`Self::clear_calls`], reads
    /// included, by name: what a command costs in Docker round trips.
    pub fn trace(&self) -> Vec<&'static str> {
        self.host().trace.clone()
    }

    fn traced(&self, call: &'static str) {
        self.host().trace.push(call);
    }

    /// A container of the game, as an earlier operation left it.
    pub fn put_container(&self, game_id: &GameId, image: &str, running: bool) -> ContainerId {
        let mut host = self.host();
        host.next_id += 1;
        let id = ContainerId(format!("c{}", host.next_id));
        host.images.insert(image.to_owned());
        host.containers.retain(|c| c.game_id != *game_id || c.next);
        host.containers.push(Container {
            id: id.clone(),
            game_id: game_id.clone(),
            image: image.to_owned(),
            running,
            exit_code: None,
            next: false,
            oom_killed: false,
            finished_at: None,
        });
        id
    }

    /// The game's engine stops on its own (a crash; `oom`: killed by its
    /// memory limit), as the reconciler must notice.
    pub fn engine_exits(&self, game_id: &GameId, exit_code: i64, oom: bool) {
        let mut host = self.host();
        if let Some(c) = host
            .containers
            .iter_mut()
            .find(|c| c.game_id == *game_id && !c.next)
        {
            c.running = false;
            c.exit_code = Some(exit_code);
            c.oom_killed = oom;
            c.finished_at = Some(Utc::now());
        }
    }

    /// The game's container is removed behind the manager's back.
    pub fn vanish(&self, game_id: &GameId) {
        self.host()
            .containers
            .retain(|c| c.game_id != *game_id || c.next);
    }

    /// The game's container under its own name, if any.
    pub fn container(&self, game_id: &GameId) -> Option<ContainerInfo> {
        self.find(game_id, false)
    }
}

fn info(c: &Container) -> ContainerInfo {
    ContainerInfo {
        id: c.id.clone(),
        image_ref: c.image.clone(),
        running: c.running,
        exit_code: c.exit_code,
        health: None,
        address: c.running.then(|| format!("10.0.0.{}", c.id.0.len())),
        oom_killed: c.oom_killed,
        finished_at: c.finished_at,
        removing: false,
    }
}

impl ContainerEngine for MemEngine {
    async fn image_present(&self, image: &ImageRef) -> Result<bool, EngineError> {
        self.traced("image_present");
        Ok(self.host().images.contains(image.as_str()))
    }

    async fn pull(&self, image: &ImageRef) -> Result<(), EngineError> {
        self.traced("pull");
        let mut host = self.host();
        host.calls.push(format!("pull {image}"));
        if host.unpullable.contains(image.as_str()) {
            return Err(EngineError::Rejected(format!("pull {image}: not found")));
        }
        host.images.insert(image.to_string());
        Ok(())
    }

    async fn inspect(&self, game_id: &GameId) -> Result<Option<ContainerInfo>, EngineError> {
        self.traced("inspect");
        Ok(self.container(game_id))
    }

    async fn create(&self, game_id: &GameId, image: &ImageRef) -> Result<ContainerId, EngineError> {
        self.traced("create");
        self.create_as(game_id, image, false)
    }

    async fn create_next(
        &self,
        game_id: &GameId,
        image: &ImageRef,
    ) -> Result<ContainerId, EngineError> {
        self.traced("create_next");
        let created = self.create_as(game_id, image, true);
        self.maybe_die("create_next").await;
        created
    }

    async fn inspect_next(&self, game_id: &GameId) -> Result<Option<ContainerInfo>, EngineError> {
        self.traced("inspect_next");
        Ok(self.next_container(game_id))
    }

    async fn rename_to_game(&self, id: &ContainerId, game_id: &GameId) -> Result<(), EngineError> {
        {
            let mut host = self.host();
            host.trace.push("rename");
            host.calls.push(format!("rename {id}"));
            if host
                .containers
                .iter()
                .any(|c| c.game_id == *game_id && !c.next && c.id != *id)
            {
                return Err(EngineError::Rejected(
                    "rename: name already in use (HTTP 409)".into(),
                ));
            }
            let Some(c) = host.containers.iter_mut().find(|c| c.id == *id) else {
                return Err(EngineError::Rejected(format!("no such container {id}")));
            };
            c.next = false;
        }
        self.maybe_die("rename").await;
        Ok(())
    }

    async fn start(&self, id: &ContainerId) -> Result<(), EngineError> {
        let mut host = self.host();
        host.trace.push("start");
        host.calls.push(format!("start {id}"));
        if host.stale_starts > 0 {
            host.stale_starts -= 1;
            return Err(EngineError::StaleTask(format!(
                "start {id}: id already in use"
            )));
        }
        let crashing = host.crashing.clone();
        let Some(c) = host.containers.iter_mut().find(|c| c.id == *id) else {
            return Err(EngineError::Rejected(format!("no such container {id}")));
        };
        if crashing.contains(&c.image) {
            c.exit_code = Some(1);
        } else {
            c.running = true;
        }
        Ok(())
    }

    async fn stop(&self, id: &ContainerId, _grace: Duration) -> Result<(), EngineError> {
        let mut host = self.host();
        host.trace.push("stop");
        host.calls.push(format!("stop {id}"));
        if host.refuse_stops {
            return Err(EngineError::Rejected(format!("stop {id}: refused")));
        }
        if let Some(c) = host.containers.iter_mut().find(|c| c.id == *id) {
            c.running = false;
            c.exit_code = Some(0);
        }
        Ok(())
    }

    async fn remove(&self, id: &ContainerId) -> Result<(), EngineError> {
        let mut host = self.host();
        host.trace.push("remove");
        host.calls.push(format!("remove {id}"));
        host.containers.retain(|c| c.id != *id);
        Ok(())
    }

    async fn logs_tail(&self, _id: &ContainerId, _lines: usize) -> Result<String, EngineError> {
        self.traced("logs_tail");
        Ok("engine: fatal: boom\n".into())
    }

    async fn managed_containers(&self) -> Result<Vec<ManagedContainer>, EngineError> {
        Ok(self
            .host()
            .containers
            .iter()
            .map(|c| ManagedContainer {
                id: c.id.clone(),
                name: if c.next {
                    format!("rtm-_next.{}", c.game_id)
                } else {
                    format!("rtm-{}", c.game_id)
                },
                game_id: c.game_id.to_string(),
                running: c.running,
            })
            .collect())
    }

    fn events(&self) -> BoxStream<'static, Result<EngineEvent, EngineError>> {
        // No event stream: the in-memory tests drive the reconciler's looks
        // directly.
        futures_util::stream::pending().boxed()
    }

    fn state_dir(&self, game_id: &GameId) -> PathBuf {
        PathBuf::from("/state").join(game_id.as_str())
    }
}
