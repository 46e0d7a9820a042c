//! The ports: traits the domain owns, implemented by the adapters in
//! `outbound/` (and by in-process fakes in tests). Each method documents its
//! error contract; nothing here names lapin, sqlx, redis or bollard.
//!
//! Methods return `impl Future + Send` so the lifecycle services can be
//! spawned on a multi-threaded runtime while staying generic over adapters.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::stream::BoxStream;
use uuid::Uuid;

pub use crate::domain::Progress;
use crate::domain::{
    CommandRequest, ContainerId, GameId, ImageRef, NodeName, OperationEntry, OutcomeEvent,
    RecordUpdate, ReplyTo, RuntimeRecord, RuntimeStatus, Step,
};
use crate::error::Failure;

// ---------------------------------------------------------------------------
// PostgreSQL: records, operation log, outbox, inbox, fences
// ---------------------------------------------------------------------------

/// The fence an operation took with its lease (SPEC §10): every write it
/// makes is refused once a newer operation on the game took a larger one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fence(pub i64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or timed out; retrying may help.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A newer operation took the game's fence: this writer lost its lease
    /// and must stop without writing.
    #[error("fence {0} was superseded by a newer operation")]
    FenceLost(i64),
    /// A stored row cannot be read back into the domain (a bug, or a hand
    /// edit); retrying will not help.
    #[error("corrupt data: {0}")]
    Corrupt(String),
}

/// Where a command runs (SPEC §12), asked before its inbox claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// On this worker's node: the game is placed here, or placed nowhere
    /// yet and not a start (it is answered here, `not_found` mostly).
    Here,
    /// On another node: forwarded, unchanged, to that node's queue.
    Forward(NodeName),
    /// A start that cannot be placed: answered with this failure
    /// (`invalid_request` for a node that never registered,
    /// `service_unavailable` for no room).
    Refused(Failure),
}

/// What a worker learns of a command before running it: where it runs
/// and, when that is here, its inbox claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub route: Route,
    /// `None` when the command is forwarded (its node claims it), or when
    /// the store left the claim to the command's handling.
    pub claim: Option<InboxClaim>,
}

/// The inbox's answer when a command is received.
// Returned once per command, never stored in bulk: boxing the event would
// buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboxClaim {
    /// First time this command_id is seen: it is now claimed.
    Fresh,
    /// Claimed before and not finished: running elsewhere, or its worker died.
    Unfinished,
    /// Finished: this is its stored outer outcome, to publish again as is.
    Finished(OutcomeEvent),
    /// The command_id was claimed by another command (another game, op,
    /// image or reason; SPEC §6): this message is answered on its own and
    /// never run. `first` describes that other command, for the answer.
    Reused { first: String },
}

/// Whose answer an outer entry is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Answers {
    /// Its command's: stored as the outcome in the command's inbox row, and
    /// replied to where that row says.
    #[default]
    Command,
    /// A message's that reused another command's command_id: the inbox row
    /// stays the other command's, and the reply goes where this message
    /// asked.
    Reuse { reply_to: Option<ReplyTo> },
}

/// One entry to append, with the changes that must commit with it.
#[derive(Debug, Clone)]
pub struct OperationWrite {
    pub entry: OperationEntry,
    /// What the write is checked against before it commits.
    pub fence: WriteFence,
    /// The game's record as this step leaves it; only with
    /// [`WriteFence::Held`].
    pub record: Option<RecordUpdate>,
    /// For an outer entry: which message it answers.
    pub answers: Answers,
}

/// A game's current fence, as read by a command refused its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceView {
    pub fence: Fence,
    /// The command whose attempt took it; `None` before any did.
    pub taken_by: Option<String>,
}

/// How a write is kept from landing after a newer operation took the game.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFence {
    /// Written under the game's lease with this fence (stored with the
    /// entry): refused once a newer operation advanced the fence.
    Held(Fence),
    /// Written without the lease by a command that was refused it (a
    /// `conflict`, the lease store down) and then read this fence: refused
    /// if any operation took the game since. That operation may be another
    /// attempt of this very command, which must then be the one to answer
    /// it; otherwise one command would be answered `conflict` while its
    /// effect happened all the same.
    Seen(Fence),
    /// Written under the game's lease by an attempt that took no fence
    /// yet, having read this one ([`RuntimeStore::peek`]): the write takes
    /// the game's next fence itself, and is refused (`FenceLost`, nothing
    /// written) if the fence is no longer this one. One commit instead of
    /// two for an answer decided from the record alone (a refused patch).
    Take(Fence),
    /// Not checked: an invalid request, which every attempt rejects alike.
    Unchecked,
}

impl WriteFence {
    /// The fence stored with the entry: only a lease holder's.
    pub fn held(self) -> Option<Fence> {
        match self {
            WriteFence::Held(f) => Some(f),
            WriteFence::Seen(_) | WriteFence::Take(_) | WriteFence::Unchecked => None,
        }
    }

    /// The fence the game must still have when the write commits.
    pub fn expected(self) -> Option<Fence> {
        match self {
            WriteFence::Held(f) | WriteFence::Seen(f) | WriteFence::Take(f) => Some(f),
            WriteFence::Unchecked => None,
        }
    }
}

/// An appended entry: its id and the event stored in the outbox with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub operation_id: i64,
    pub event: OutcomeEvent,
    /// Nothing was written: another attempt of the command had answered it
    /// without the lease first, and this is that answer.
    pub answered_before: bool,
}

/// What an attempt under the game's lease starts from, read after it took
/// the game's next fence: [`RuntimeStore::begin`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begun {
    /// This attempt's fence.
    pub fence: Fence,
    /// The command's inbox row, read after the fence moved: another attempt
    /// may have answered it meanwhile.
    pub claim: InboxClaim,
    /// What earlier attempts of the command recorded.
    pub progress: Progress,
    /// The game's record; `Err` with why when its row does not make a valid
    /// record (the op answers that `internal`).
    pub record: Result<Option<RuntimeRecord>, String>,
}

/// What an attempt under the game's lease reads before it takes a fence:
/// [`RuntimeStore::peek`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peeked {
    /// The game's current fence (`Fence(0)` before any operation took it).
    pub fence: Fence,
    /// Nothing can still write under `fence`: the command whose attempt
    /// took it has its outcome (or none took it). Only then is the record
    /// below the one the game keeps until the next fence is taken.
    pub settled: bool,
    /// An earlier attempt of the command recorded an entry or a journal
    /// step: it has something to resume, which only [`RuntimeStore::begin`]
    /// reads.
    pub progress: bool,
    /// The game's record; `Err` with why when its row is corrupt.
    pub record: Result<Option<RuntimeRecord>, String>,
}

pub trait RuntimeStore: Clone + Send + Sync + 'static {
    /// What the inbox knows of `request.command_id`, without claiming it
    /// ([`InboxClaim::Fresh`] when nothing): for a look that may come to
    /// nothing (the reconciler's, at an engine that may have been stopped
    /// by a command), which must leave no unfinished claim behind.
    /// Errors: `Unavailable`.
    fn lookup(
        &self,
        request: &CommandRequest,
    ) -> impl Future<Output = Result<InboxClaim, StoreError>> + Send;

    /// Claims `request.command_id` in the inbox (remembering its `reply_to`
    /// for the outer event). Errors: `Unavailable`.
    fn claim(
        &self,
        request: &CommandRequest,
    ) -> impl Future<Output = Result<InboxClaim, StoreError>> + Send;

    /// The game's record, if any. Errors: `Unavailable`; `Corrupt` when the
    /// row does not make a valid record (unknown status, empty image).
    fn load(
        &self,
        game_id: &GameId,
    ) -> impl Future<Output = Result<Option<RuntimeRecord>, StoreError>> + Send;

    /// Takes the game's next fence for an attempt of `command_id`; called
    /// right after the lease is taken. Errors: `Unavailable`.
    fn advance_fence(
        &self,
        game_id: &GameId,
        command_id: &str,
    ) -> impl Future<Output = Result<Fence, StoreError>> + Send;

    /// The game's current fence and the command that took it, without
    /// advancing it (`Fence(0)`, taken by none, before any operation took
    /// the game); read by a command refused the lease, so it can answer
    /// under [`WriteFence::Seen`]. Errors: `Unavailable`.
    fn observe_fence(
        &self,
        game_id: &GameId,
    ) -> impl Future<Output = Result<FenceView, StoreError>> + Send;

    /// In one transaction: appends the entry, stores its outcome event in
    /// the outbox with `event_id`, applies the record update, and for an
    /// outer entry marks the command finished in the inbox. Everything is
    /// refused (`FenceLost`) when the game's fence is no longer the one the
    /// write expects. An outer entry written without the lease for a command
    /// another attempt already answered writes nothing and returns that
    /// answer, so a command never has two outer outcomes.
    /// Errors: `Unavailable`, `FenceLost`, `Corrupt` (a record update
    /// without the lease).
    fn append(
        &self,
        write: OperationWrite,
        event_id: Uuid,
    ) -> impl Future<Output = Result<Recorded, StoreError>> + Send;

    /// Stores the `runtime.rejected` event of a message that could not be
    /// decoded (it has no log entry) in the outbox. Errors: `Unavailable`.
    fn append_rejected(
        &self,
        event: &OutcomeEvent,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// What earlier attempts of `command_id` recorded (for a redelivered
    /// command that must resume). Errors: `Unavailable`, `Corrupt` (an entry
    /// or a journal row that does not read back).
    fn progress(
        &self,
        command_id: &str,
    ) -> impl Future<Output = Result<Progress, StoreError>> + Send;

    /// Journals a Docker step of `command_id` as done by the attempt holding
    /// `fence` on `game_id` (recording a step again replaces its detail: the
    /// latest attempt's container counts, so an attempt fenced out must not
    /// write). Errors: `Unavailable`, `FenceLost`.
    fn journal(
        &self,
        game_id: &GameId,
        fence: Fence,
        command_id: &str,
        step: &Step,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Queues a stored event to be published again with its own event_id
    /// (the answer to a duplicate of a finished command). Errors:
    /// `Unavailable`.
    fn republish(&self, event_id: Uuid) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Where `request` runs (SPEC §12): on this node, on another, or (a
    /// start no node can take) nowhere. Placing a start records the choice
    /// before it returns, so every copy of that start gets the same node.
    /// A store that knows no nodes runs everything here. Errors:
    /// `Unavailable`.
    fn route(
        &self,
        request: &CommandRequest,
    ) -> impl Future<Output = Result<Route, StoreError>> + Send {
        let _ = request;
        async { Ok(Route::Here) }
    }

    /// [`Self::route`], then [`Self::claim`] unless the command is
    /// forwarded: a store that can answer both at once (one round trip on
    /// every command's path) overrides it. Errors: `Unavailable`.
    fn admit(
        &self,
        request: &CommandRequest,
    ) -> impl Future<Output = Result<Admission, StoreError>> + Send {
        async move {
            let route = self.route(request).await?;
            let claim = match route {
                Route::Forward(_) => None,
                Route::Here | Route::Refused(_) => Some(self.claim(request).await?),
            };
            Ok(Admission { route, claim })
        }
    }

    /// Every record with `status` (the reconciler's periodic pass asks for
    /// `running` and `exited` ones, SPEC §11), of this store's node only. A
    /// corrupt row is left out. Errors: `Unavailable`.
    fn records_in(
        &self,
        status: RuntimeStatus,
    ) -> impl Future<Output = Result<Vec<RuntimeRecord>, StoreError>> + Send;

    /// The game's latest `exit` entry's event, if any. Errors:
    /// `Unavailable`.
    fn last_exit(
        &self,
        game_id: &GameId,
    ) -> impl Future<Output = Result<Option<OutcomeEvent>, StoreError>> + Send;

    /// How many restarts the reconciler ran for the game (outer `restart`
    /// entries with `op_source` `reconciler`) that started at or after
    /// `since`: what `RTM_RESTART_ON_EXIT` has spent. Errors: `Unavailable`.
    fn auto_restarts_since(
        &self,
        game_id: &GameId,
        since: DateTime<Utc>,
    ) -> impl Future<Output = Result<u32, StoreError>> + Send;

    /// What an attempt of `command_id` under the game's lease finds before
    /// taking a fence, read in one go without writing: an answer decided
    /// from it is written under [`WriteFence::Take`]. Errors:
    /// `Unavailable`.
    fn peek(
        &self,
        game_id: &GameId,
        command_id: &str,
    ) -> impl Future<Output = Result<Peeked, StoreError>> + Send;

    /// An attempt's start under the game's lease: [`advance_fence`], then,
    /// read after it, [`claim`], [`progress`] and [`load`]. The fence
    /// first: an earlier attempt can no longer write once it moved, so what
    /// is read after it is all that attempt will ever have done. A store
    /// that can does it in one round trip (PostgreSQL: `rtm_begin`). Errors:
    /// those of the four.
    ///
    /// [`advance_fence`]: Self::advance_fence
    /// [`claim`]: Self::claim
    /// [`progress`]: Self::progress
    /// [`load`]: Self::load
    fn begin(
        &self,
        game_id: &GameId,
        request: &CommandRequest,
    ) -> impl Future<Output = Result<Begun, StoreError>> + Send {
        async move {
            let fence = self.advance_fence(game_id, &request.command_id).await?;
            let claim = self.claim(request).await?;
            let progress = self.progress(&request.command_id).await?;
            let record = match self.load(game_id).await {
                Ok(record) => Ok(record),
                Err(StoreError::Corrupt(why)) => Err(why),
                Err(e) => return Err(e),
            };
            Ok(Begun {
                fence,
                claim,
                progress,
                record,
            })
        }
    }
}

// ---------------------------------------------------------------------------
// Redis: per-game leases
// ---------------------------------------------------------------------------

/// Who holds a lease: the command and a token unique to this attempt.
/// Stored as `<command_id>:<token>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    pub command_id: String,
    pub token: String,
}

impl LeaseHolder {
    pub fn new(command_id: &str) -> Self {
        Self {
            command_id: command_id.to_owned(),
            token: Uuid::new_v4().simple().to_string(),
        }
    }

    pub fn value(&self) -> String {
        format!("{}:{}", self.command_id, self.token)
    }

    /// The command_id of a stored lease value (the token has no ':').
    pub fn command_of(value: &str) -> &str {
        value.rsplit_once(':').map_or(value, |(command, _)| command)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    Yes,
    /// Someone holds it; this is the stored value.
    HeldBy(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("lease store unavailable: {0}")]
pub struct LeaseError(pub String);

pub trait LeaseStore: Clone + Send + Sync + 'static {
    /// `SET NX PX ttl`. Errors: the store could not be reached.
    fn acquire(
        &self,
        game_id: &GameId,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> impl Future<Output = Result<Acquired, LeaseError>> + Send;

    /// Extends the lease only if `holder` still holds it; `false` when it
    /// does not (expired, or taken by another).
    fn renew(
        &self,
        game_id: &GameId,
        holder: &LeaseHolder,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, LeaseError>> + Send;

    /// Deletes the lease only if `holder` still holds it; `false` when it
    /// did not.
    fn release(
        &self,
        game_id: &GameId,
        holder: &LeaseHolder,
    ) -> impl Future<Output = Result<bool, LeaseError>> + Send;
}

// ---------------------------------------------------------------------------
// Docker: the container engine
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The engine could not be reached, timed out, or failed internally;
    /// retrying may help (`service_unavailable`).
    #[error("docker unavailable: {0}")]
    Unavailable(String),
    /// The engine refused the request (image not found, bad config, start
    /// failure); retrying will not help. The caller maps it to the code of
    /// the step.
    #[error("{0}")]
    Rejected(String),
    /// Only from `start`: the engine still holds a runtime task of an
    /// earlier start of this container, cut short by an engine restart, and
    /// refuses to start it again ("already exists", "id already in use").
    /// Recreating the container clears it.
    #[error("{0}")]
    StaleTask(String),
}

/// Health as reported by an image's HEALTHCHECK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Starting,
    Healthy,
    Unhealthy,
}

/// What Docker reports about a game's container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: ContainerId,
    /// The image reference the container was created from, as given.
    pub image_ref: String,
    pub running: bool,
    pub exit_code: Option<i64>,
    /// `None` when the image declares no HEALTHCHECK.
    pub health: Option<Health>,
    /// The address on the configured network, once running.
    pub address: Option<String>,
    /// Whether the kernel's OOM killer ended it (meaningful once stopped).
    pub oom_killed: bool,
    /// When it last stopped; `None` while running or never started.
    pub finished_at: Option<DateTime<Utc>>,
    /// Docker is removing it (a `docker rm -f` in progress): as good as gone.
    pub removing: bool,
}

/// A container carrying the managed label, as Docker lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedContainer {
    pub id: ContainerId,
    /// Its name, without the leading `/`.
    pub name: String,
    /// The game its label names (as written there: it may not parse).
    pub game_id: String,
    pub running: bool,
}

/// What Docker's event stream says happened to a managed container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineAction {
    /// Its process ended (any way: a crash, a stop, a kill).
    Die,
    /// The kernel's OOM killer hit it (a `die` follows).
    Oom,
    /// It was removed.
    Destroy,
}

/// One event of a managed container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineEvent {
    /// The game its label names (as written there: it may not parse).
    pub game_id: String,
    pub container_id: ContainerId,
    pub action: EngineAction,
    /// Its name at the time, without the leading `/`.
    pub name: String,
}

/// Every method is repeatable: a stop of a stopped container, a remove of a
/// missing one, a start of a running one succeed, so an interrupted
/// operation can be resumed step by step.
pub trait ContainerEngine: Clone + Send + Sync + 'static {
    /// Whether the image is present locally.
    fn image_present(
        &self,
        image: &ImageRef,
    ) -> impl Future<Output = Result<bool, EngineError>> + Send;

    /// Pulls the image. `Rejected` when the registry refuses or lacks it.
    fn pull(&self, image: &ImageRef) -> impl Future<Output = Result<(), EngineError>> + Send;

    /// The game's container (found by its name), if any.
    fn inspect(
        &self,
        game_id: &GameId,
    ) -> impl Future<Output = Result<Option<ContainerInfo>, EngineError>> + Send;

    /// Creates the game's container with the SPEC §4 shape, creating its
    /// state directory if missing. Fails if a container of that name exists.
    fn create(
        &self,
        game_id: &GameId,
        image: &ImageRef,
    ) -> impl Future<Output = Result<ContainerId, EngineError>> + Send;

    /// Creates the game's *next* container, with the same shape, under the
    /// game's temporary name (`<RTM_CONTAINER_PREFIX>_next.<game_id>`: a
    /// game id starts with a letter or digit, so no game's own name is
    /// ever another's temporary one), while its current container may
    /// still run. Fails if a container of that name exists.
    fn create_next(
        &self,
        game_id: &GameId,
        image: &ImageRef,
    ) -> impl Future<Output = Result<ContainerId, EngineError>> + Send;

    /// The game's next container (found by its temporary name), if any.
    fn inspect_next(
        &self,
        game_id: &GameId,
    ) -> impl Future<Output = Result<Option<ContainerInfo>, EngineError>> + Send;

    /// Gives container `id` (the game's next one) the game's own name,
    /// which the old container must have left. Repeatable: a container that
    /// has the name already succeeds. `Rejected` when another container
    /// holds the name, or `id` is missing.
    fn rename_to_game(
        &self,
        id: &ContainerId,
        game_id: &GameId,
    ) -> impl Future<Output = Result<(), EngineError>> + Send;

    fn start(&self, id: &ContainerId) -> impl Future<Output = Result<(), EngineError>> + Send;

    /// SIGTERM, then SIGKILL after `grace`. A missing or stopped container
    /// is not an error.
    fn stop(
        &self,
        id: &ContainerId,
        grace: Duration,
    ) -> impl Future<Output = Result<(), EngineError>> + Send;

    /// Force-removes the container (not its state directory). A missing
    /// container is not an error.
    fn remove(&self, id: &ContainerId) -> impl Future<Output = Result<(), EngineError>> + Send;

    /// The last `lines` lines of the container's stdout and stderr.
    fn logs_tail(
        &self,
        id: &ContainerId,
        lines: usize,
    ) -> impl Future<Output = Result<String, EngineError>> + Send;

    /// The host directory holding the game's state.
    fn state_dir(&self, game_id: &GameId) -> PathBuf;

    /// Every container carrying the managed label, running or not.
    fn managed_containers(
        &self,
    ) -> impl Future<Output = Result<Vec<ManagedContainer>, EngineError>> + Send;

    /// The engine's events (die, oom, destroy) of managed containers, from
    /// now on. The stream ends or yields an error when the connection
    /// drops; the caller subscribes again (events meanwhile are missed:
    /// the reconciler's periodic pass covers them).
    fn events(&self) -> BoxStream<'static, Result<EngineEvent, EngineError>>;
}
