//! The lifecycle services: one per op (`start`, `stop`, `restart`, `patch`,
//! `remove`), generic over the ports so they run without a broker and
//! against fakes as well as the real adapters.
//!
//! [`Lifecycle::handle`] is the outer handle every command goes through:
//!
//! 1. claim the command_id in the inbox (a finished duplicate gets its stored
//!    outcome back, without Docker work);
//! 2. validate (`invalid_request`, `image_not_allowed`), before the lease;
//! 3. take the per-game lease (renewed while the op runs) and the game's
//!    next fence;
//! 4. dispatch to the op, which runs its Docker steps and writes an
//!    operation-log entry (with its outbox event, in one fenced transaction)
//!    per step: inner `stop`/`start` entries, then the outer entry, which
//!    also marks the command finished in the inbox;
//! 5. release the lease with its own timeout, whatever happened.
//!
//! A business failure is an outcome like any other (recorded, published).
//! Only [`Interrupted`] escapes: the outcome could not be recorded, or the
//! lease was lost, so the command must be left for redelivery.

mod container;
mod lease;
mod patch;
mod remove;
mod restart;
mod start;
mod stop;

use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use tracing::{debug, info, warn};
use uuid::Uuid;

pub use crate::config::LifecycleConfig;
use crate::domain::{
    Action, Command, CommandRequest, EntryResult, GameId, ImageRef, OpKind, OperationEntry,
    OutcomeEvent, RecordUpdate, RuntimeRecord, RuntimeState, Stage, Step,
};
use crate::error::{ErrorCode, Failure};
use crate::ports::{
    Acquired, ContainerEngine, Fence, InboxClaim, LeaseHolder, LeaseStore, OperationWrite,
    Progress, Recorded, RuntimeStore, StoreError, WriteFence,
};
use crate::telemetry;
use lease::LeaseGuard;

/// Counts an outer outcome and times it.
fn record_metrics(event: &OutcomeEvent) {
    let op = event.op.clone().unwrap_or_default();
    let code = event.error_code.map_or("none", ErrorCode::as_str);
    metrics::counter!(
        telemetry::OPERATIONS,
        "op" => op.clone(),
        "outcome" => event.outcome.as_str(),
        "error_code" => code
    )
    .increment(1);
    if matches!(code, "invalid_request" | "image_not_allowed") {
        metrics::counter!(telemetry::COMMANDS_REJECTED).increment(1);
    }
    let seconds = (event.finished_at - event.started_at)
        .num_milliseconds()
        .max(0) as f64
        / 1000.0;
    metrics::histogram!(telemetry::OPERATION_SECONDS, "op" => op).record(seconds);
}

/// The result of a handled command: its outer outcome event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handled {
    pub event: OutcomeEvent,
    /// A finished duplicate: the stored outcome, republished as is.
    pub duplicate: bool,
}

impl Handled {
    /// An outcome this attempt recorded.
    fn recorded(event: OutcomeEvent) -> Self {
        Self {
            event,
            duplicate: false,
        }
    }

    /// The outcome another attempt of the command recorded.
    fn duplicate(event: OutcomeEvent) -> Self {
        Self {
            event,
            duplicate: true,
        }
    }
}

/// Why a command was left unfinished; the caller must not acknowledge it,
/// so it is delivered again and resumes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Interrupted {
    #[error("the outcome could not be recorded: {0}")]
    Unrecorded(StoreError),
    #[error("the lease of game {0} was lost; stopping before the next Docker step")]
    LeaseLost(String),
    #[error("a newer operation took the fence of game {0}")]
    FenceLost(String),
    #[error("an earlier attempt of this command still holds the lease of game {0}")]
    StillRunning(String),
    /// Refused its lease, but an attempt of the command already touched
    /// the game: answering now could strand it half-done or answer it
    /// twice, so it resumes later.
    #[error("the command cannot go on yet: {0}")]
    Blocked(String),
}

impl From<StoreError> for Interrupted {
    fn from(e: StoreError) -> Self {
        Interrupted::Unrecorded(e)
    }
}

/// What taking the lease gave. Returned once per command: boxing the
/// event would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Leased<L: LeaseStore> {
    Held(LeaseGuard<L>),
    /// Another attempt of the same command finished while this one waited.
    Finished(OutcomeEvent),
}

/// Whether a command got its game's lease or was answered without it.
#[allow(clippy::large_enum_variant)]
enum Gate<L: LeaseStore> {
    Held(LeaseGuard<L>),
    Answered(Handled),
}

/// How an op's step ended early: a business failure to record, or an
/// interruption to hand back.
#[derive(Debug)]
enum Halt {
    Fail(Failure),
    Interrupt(Interrupted),
}

impl From<Interrupted> for Halt {
    fn from(i: Interrupted) -> Self {
        Halt::Interrupt(i)
    }
}

impl From<Failure> for Halt {
    fn from(f: Failure) -> Self {
        Halt::Fail(f)
    }
}

/// The lifecycle services over a store, a lease store and a container
/// engine. Cheap to clone: the adapters are handles.
#[derive(Clone)]
pub struct Lifecycle<S, L, E> {
    store: S,
    leases: L,
    engine: E,
    cfg: Arc<LifecycleConfig>,
    held: lease::HeldLeases,
}

/// One operation running under its lease.
struct Op<'a, L: LeaseStore> {
    cmd: &'a Command,
    fence: Fence,
    lease: &'a LeaseGuard<L>,
    started_at: DateTime<Utc>,
    /// What earlier attempts of this command did (empty on a first attempt).
    progress: Progress,
}

impl<L: LeaseStore> Op<'_, L> {
    fn game(&self) -> &GameId {
        &self.cmd.game_id
    }

    /// A new entry of this operation's command for `op`, a step of `outer`
    /// (`None` for the outer entry itself).
    fn entry(&self, op: OpKind, outer: Option<OpKind>) -> OperationEntry {
        let now = Utc::now();
        OperationEntry {
            game_id: self.cmd.game_id.to_string(),
            op,
            outer_op: outer,
            op_source: self.cmd.op_source.to_string(),
            reason: None,
            correlation_id: self.cmd.correlation_id.clone(),
            command_id: self.cmd.command_id.clone(),
            image_ref: None,
            previous_image_ref: None,
            container_id: None,
            address: None,
            result: EntryResult::SUCCESS,
            rolled_back: false,
            started_at: if outer.is_none() {
                self.started_at
            } else {
                now
            },
            finished_at: now,
        }
    }

    /// The outer entry of this command's op.
    fn outer_entry(&self) -> OperationEntry {
        self.entry(self.cmd.action.op(), None)
    }

    /// Whether an earlier attempt of this `outer` op (restart, patch) got
    /// past its new start, so the old container is gone already: its inner
    /// start was recorded, or the new container created.
    fn resumed_past_start(&self, outer: OpKind) -> bool {
        self.progress
            .entry(OpKind::Start, Some(outer), false)
            .is_some()
            || self.progress.created(Stage::Start)
    }

    /// Stops before the next Docker step if the lease is gone.
    fn check_lease(&self) -> Result<(), Interrupted> {
        self.lease.check()
    }
}

impl<S, L, E> Lifecycle<S, L, E>
where
    S: RuntimeStore,
    L: LeaseStore,
    E: ContainerEngine,
{
    pub fn new(store: S, leases: L, engine: E, cfg: LifecycleConfig) -> Self {
        Self {
            store,
            leases,
            engine,
            cfg: Arc::new(cfg),
            held: lease::HeldLeases::default(),
        }
    }

    /// Releases the leases operations still hold; for shutdown, once the
    /// in-flight operations had `RTM_SHUTDOWN_TIMEOUT`.
    pub async fn release_held_leases(&self) {
        lease::release_all(&self.leases, &self.held).await;
    }

    pub fn config(&self) -> &LifecycleConfig {
        &self.cfg
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn engine(&self) -> &E {
        &self.engine
    }

    /// Runs one decoded command to its recorded outcome.
    #[tracing::instrument(
        name = "command",
        skip_all,
        fields(command_id = %request.command_id, op = %request.op, game_id = request.game_id.as_deref().unwrap_or(""))
    )]
    pub async fn handle(&self, request: CommandRequest) -> Result<Handled, Interrupted> {
        let received_at = Utc::now();
        match self.store_retrying(|| self.store.claim(&request)).await? {
            InboxClaim::Fresh => {}
            InboxClaim::Unfinished => {
                debug!("command seen before: a redelivery or another copy of it");
            }
            InboxClaim::Finished(event) => {
                info!(outcome = %event.outcome, "duplicate of a finished command: republishing its outcome");
                return Ok(Handled::duplicate(event));
            }
        }

        let command = match request.validate(&self.cfg.allowed_images) {
            Ok(command) => command,
            Err(failure) => {
                return self
                    .reject(&request, received_at, failure, WriteFence::Unchecked)
                    .await;
            }
        };

        let lease = match self
            .lease_or_refusal(&request, &command, received_at, None)
            .await?
        {
            Gate::Held(lease) => lease,
            Gate::Answered(handled) => return Ok(handled),
        };

        // A panic inside the op must not outlive the lease's release: catch
        // it, release in order, then let it continue to the caller (which
        // answers the command `internal`).
        let outcome = AssertUnwindSafe(self.run_leased(&request, &command, &lease))
            .catch_unwind()
            .await;
        lease.release().await;
        match outcome {
            Ok(outcome) => outcome,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    async fn run_leased(
        &self,
        request: &CommandRequest,
        command: &Command,
        lease: &LeaseGuard<L>,
    ) -> Result<Handled, Interrupted> {
        let fence = match self.take_fence(request, command).await? {
            ControlFlow::Continue(fence) => fence,
            ControlFlow::Break(answered) => return Ok(answered),
        };
        // An earlier attempt may have died part-way: this one resumes from
        // what it recorded.
        let progress = self
            .store_retrying(|| self.store.progress(&command.command_id))
            .await?;
        if !progress.is_empty() {
            info!(
                entries = progress.entries.len(),
                steps = ?progress.steps.iter().map(Step::name).collect::<Vec<_>>(),
                "resuming a command an earlier attempt left unfinished"
            );
        }
        let op = Op {
            cmd: command,
            fence,
            lease,
            started_at: Utc::now(),
            progress,
        };
        let recorded = match &command.action {
            Action::Start { image_ref } => self.start(&op, image_ref).await?,
            Action::Stop { reason } => self.stop(&op, *reason).await?,
            Action::Restart => self.restart(&op).await?,
            Action::Patch { new_image_ref } => self.patch(&op, new_image_ref).await?,
            Action::Remove => self.remove(&op).await?,
        };
        let event = recorded.event;
        record_metrics(&event);
        match event.error_code {
            None => info!(noop = event.noop, "operation succeeded"),
            Some(code) => warn!(
                error_code = %code,
                error_message = event.error_message.as_deref().unwrap_or(""),
                rolled_back = event.rolled_back,
                "operation failed"
            ),
        }
        Ok(Handled::recorded(event))
    }

    /// Takes the game's next fence for this attempt (under its lease), then
    /// asks the inbox whether another attempt of the command answered it
    /// meanwhile: `Break` with that answer. The fence first: an earlier
    /// attempt can no longer write once it moved, so what is read after it
    /// is all that attempt will ever have done. Asked by every attempt, the
    /// one that claimed the command first included: a copy may have
    /// overtaken it.
    async fn take_fence(
        &self,
        request: &CommandRequest,
        command: &Command,
    ) -> Result<ControlFlow<Handled, Fence>, Interrupted> {
        let fence = self
            .store_retrying(|| {
                self.store
                    .advance_fence(&command.game_id, &command.command_id)
            })
            .await?;
        match self.store_retrying(|| self.store.claim(request)).await? {
            InboxClaim::Finished(event) => Ok(ControlFlow::Break(Handled::duplicate(event))),
            InboxClaim::Fresh | InboxClaim::Unfinished => Ok(ControlFlow::Continue(fence)),
        }
    }

    /// Takes the game's lease, or answers the command without it when it is
    /// refused: with the refusal itself (`conflict`, `service_unavailable`),
    /// or with `answer` when given. The answer is written under the fence
    /// seen once refused ([`WriteFence::Seen`]): if any operation took the
    /// game meanwhile (perhaps another copy of this command, about to run
    /// it), the answer is dropped and the lease asked for again. A command
    /// an attempt of which took the game last, or left steps done, is not
    /// answered here at all ([`Interrupted::Blocked`]).
    async fn lease_or_refusal(
        &self,
        request: &CommandRequest,
        command: &Command,
        received_at: DateTime<Utc>,
        answer: Option<&Failure>,
    ) -> Result<Gate<L>, Interrupted> {
        let holder = LeaseHolder::new(&command.command_id);
        loop {
            let asked = std::time::Instant::now();
            let leased = self.acquire_lease(request, command, &holder).await;
            metrics::histogram!(telemetry::LEASE_ACQUIRE_SECONDS)
                .record(asked.elapsed().as_secs_f64());
            let refusal = match leased {
                Ok(Leased::Held(lease)) => return Ok(Gate::Held(lease)),
                Ok(Leased::Finished(event)) => {
                    return Ok(Gate::Answered(Handled::duplicate(event)));
                }
                Err(Halt::Interrupt(i)) => return Err(i),
                Err(Halt::Fail(refusal)) => refusal,
            };
            // Read once refused, not before asking: only refused commands
            // pay for it, and whatever took the game before this read shows
            // in it (below), whatever takes it after makes the answer's
            // fence check fail.
            let seen = self
                .store_retrying(|| self.store.observe_fence(&command.game_id))
                .await?;
            // An attempt of this very command took the game last: it is
            // running (the lease store could not tell us who holds it) or
            // died holding it, and its outcome or a resumption answers the
            // command; answering here as well would give it two outcomes.
            if seen.taken_by.as_deref() == Some(command.command_id.as_str()) {
                return Err(Interrupted::Blocked(format!(
                    "{refusal}; an attempt of this command took the game last"
                )));
            }
            let failure = match answer {
                Some(answer) => answer.clone(),
                None => {
                    // An earlier attempt already changed the game: closing
                    // the command now would strand it half-done. Keep it for
                    // a later delivery instead.
                    if !self
                        .store_retrying(|| self.store.progress(&command.command_id))
                        .await?
                        .is_empty()
                    {
                        return Err(Interrupted::Blocked(refusal.to_string()));
                    }
                    refusal
                }
            };
            match self
                .reject(request, received_at, failure, WriteFence::Seen(seen.fence))
                .await
            {
                Err(Interrupted::Unrecorded(StoreError::FenceLost(_))) => {
                    debug!("the game was taken while this command was refused; asking again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                answered => return answered.map(Gate::Answered),
            }
        }
    }

    /// Takes the game's lease. Held by another command: `conflict`. Held by
    /// an earlier attempt of this same command (its worker died): waited out.
    async fn acquire_lease(
        &self,
        request: &CommandRequest,
        command: &Command,
        holder: &LeaseHolder,
    ) -> Result<Leased<L>, Halt> {
        let ttl = self.cfg.lease_ttl;
        // A dead attempt's lease expires within one TTL; a live one keeps
        // renewing, and then this delivery is a duplicate still running.
        let give_up = tokio::time::Instant::now() + ttl * 2;
        loop {
            let asked = tokio::time::Instant::now();
            let acquired = self
                .retrying(
                    || self.leases.acquire(&command.game_id, holder, ttl),
                    |_| true,
                )
                .await
                .map_err(|e| {
                    Failure::new(
                        ErrorCode::ServiceUnavailable,
                        format!("acquire game lease: {}", e.0),
                    )
                })?;
            match acquired {
                Acquired::Yes => {
                    return Ok(Leased::Held(LeaseGuard::hold(
                        self.leases.clone(),
                        self.held.clone(),
                        command.game_id.clone(),
                        holder.clone(),
                        ttl,
                        asked,
                    )));
                }
                Acquired::HeldBy(value)
                    if LeaseHolder::command_of(&value) == command.command_id =>
                {
                    if tokio::time::Instant::now() >= give_up {
                        return Err(Interrupted::StillRunning(command.game_id.to_string()).into());
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    // The other attempt may have finished meanwhile: answer
                    // with its outcome rather than take the lease to find
                    // out, which would make the game's next command a
                    // `conflict` for that moment.
                    if let InboxClaim::Finished(event) = self
                        .store_retrying(|| self.store.claim(request))
                        .await
                        .map_err(Interrupted::from)?
                    {
                        return Ok(Leased::Finished(event));
                    }
                }
                Acquired::HeldBy(_) => {
                    return Err(Failure::new(
                        ErrorCode::Conflict,
                        "another lifecycle operation is in progress for this game",
                    )
                    .into());
                }
            }
        }
    }

    /// Fails a command with `internal`: after its handling panicked (the
    /// panicked attempt's lease was released as it unwound), when its
    /// outcome cannot be stored, or on the last delivery of a command that
    /// keeps interrupting its workers. A command that did finish keeps its
    /// outcome. The answer is written under the game's lease and a new fence,
    /// so an attempt still running elsewhere finishes first (`StillRunning`
    /// while it does) and cannot write after it.
    pub async fn fail_internal(
        &self,
        request: &CommandRequest,
        message: String,
    ) -> Result<Handled, Interrupted> {
        let failure = Failure::new(ErrorCode::Internal, message);
        if let InboxClaim::Finished(event) =
            self.store_retrying(|| self.store.claim(request)).await?
        {
            return Ok(Handled::duplicate(event));
        }
        let Ok(command) = request.validate(&self.cfg.allowed_images) else {
            return self
                .reject(request, Utc::now(), failure, WriteFence::Unchecked)
                .await;
        };
        let lease = match self
            .lease_or_refusal(request, &command, Utc::now(), Some(&failure))
            .await?
        {
            Gate::Held(lease) => lease,
            Gate::Answered(handled) => return Ok(handled),
        };
        let answered = async {
            let fence = match self.take_fence(request, &command).await? {
                ControlFlow::Continue(fence) => fence,
                ControlFlow::Break(answered) => return Ok(answered),
            };
            let op = Op {
                cmd: &command,
                fence,
                lease: &lease,
                started_at: Utc::now(),
                progress: Progress::default(),
            };
            let mut entry = op.outer_entry();
            entry.image_ref = request.image_ref.clone();
            // The interrupted attempt may have changed the game: the record
            // is set to what Docker reports, so they agree again.
            let record = self.observed_record(&op).await;
            let recorded = self.fail_outer(&op, entry, failure, record).await?;
            record_metrics(&recorded.event);
            Ok(Handled::recorded(recorded.event))
        }
        .await;
        lease.release().await;
        answered
    }

    /// The game's record as Docker reports it now, for a command answered
    /// without running to the end; `None` (leave it) when there is no
    /// record, Docker cannot be asked, or they already agree.
    async fn observed_record(&self, op: &Op<'_, L>) -> Option<RecordUpdate> {
        let record = self.store.load(op.game()).await.ok().flatten()?;
        let info = self.engine.inspect(op.game()).await.ok()?;
        let (image_ref, state) = match info {
            Some(info) if info.running => (
                ImageRef::parse(&info.image_ref).unwrap_or_else(|_| record.image_ref.clone()),
                RuntimeState::Running {
                    container_id: info.id,
                    address: info.address,
                },
            ),
            Some(info) => (
                record.image_ref.clone(),
                RuntimeState::Stopped {
                    container_id: Some(info.id),
                },
            ),
            None if matches!(record.state, RuntimeState::Removed) => return None,
            None => (
                record.image_ref.clone(),
                RuntimeState::Stopped { container_id: None },
            ),
        };
        if state == record.state && image_ref == record.image_ref {
            return None;
        }
        Some(RecordUpdate {
            game_id: op.game().clone(),
            image_ref,
            state,
            state_dir: record.state_dir,
        })
    }

    /// Records a failure decided without the lease (validation, a refused
    /// lease): an outer entry echoing the request as sent; no record is
    /// touched. Another attempt's earlier answer is returned as a duplicate.
    async fn reject(
        &self,
        request: &CommandRequest,
        received_at: DateTime<Utc>,
        failure: Failure,
        fence: WriteFence,
    ) -> Result<Handled, Interrupted> {
        warn!(error_code = %failure.code, error_message = %failure.message, "command rejected");
        let now = Utc::now();
        let entry = OperationEntry {
            game_id: request.game_id.clone().unwrap_or_default(),
            op: request.op,
            outer_op: None,
            op_source: request.op_source.clone().unwrap_or_default(),
            reason: request.reason.clone(),
            correlation_id: request.correlation_id(),
            command_id: request.command_id.clone(),
            image_ref: request.image_ref.clone(),
            previous_image_ref: None,
            container_id: None,
            address: None,
            result: EntryResult::Failure(failure),
            rolled_back: false,
            started_at: received_at,
            finished_at: now,
        };
        let recorded = self
            .append(OperationWrite {
                entry,
                fence,
                record: None,
            })
            .await?;
        if recorded.answered_before {
            return Ok(Handled::duplicate(recorded.event));
        }
        record_metrics(&recorded.event);
        Ok(Handled::recorded(recorded.event))
    }

    /// Writes an entry of `op` (with its event and record update) under the
    /// op's fence.
    async fn write(
        &self,
        op: &Op<'_, L>,
        mut entry: OperationEntry,
        record: Option<RecordUpdate>,
    ) -> Result<Recorded, Interrupted> {
        entry.finished_at = Utc::now();
        self.append(OperationWrite {
            entry,
            fence: WriteFence::Held(op.fence),
            record,
        })
        .await
        .map_err(|e| match e {
            Interrupted::Unrecorded(StoreError::FenceLost(_)) => {
                Interrupted::FenceLost(op.game().to_string())
            }
            other => other,
        })
    }

    /// Journals a Docker step as done, so a redelivered command can resume
    /// after it.
    async fn journal(&self, op: &Op<'_, L>, step: &Step) -> Result<(), Interrupted> {
        self.store_retrying(|| {
            self.store
                .journal(op.game(), op.fence, &op.cmd.command_id, step)
        })
        .await
        .map_err(|e| match e {
            StoreError::FenceLost(_) => Interrupted::FenceLost(op.game().to_string()),
            other => Interrupted::Unrecorded(other),
        })
    }

    /// Writes the outer entry as a failure.
    async fn fail_outer(
        &self,
        op: &Op<'_, L>,
        mut entry: OperationEntry,
        failure: Failure,
        record: Option<RecordUpdate>,
    ) -> Result<Recorded, Interrupted> {
        entry.result = EntryResult::Failure(failure);
        self.write(op, entry, record).await
    }

    async fn append(&self, write: OperationWrite) -> Result<Recorded, Interrupted> {
        // The event id is fixed before the first attempt, so a retried write
        // that did commit cannot produce a second id for the same entry.
        let event_id = Uuid::now_v7();
        Ok(self
            .store_retrying(|| self.store.append(write.clone(), event_id))
            .await?)
    }

    /// Loads the game's record, if any: database down →
    /// `service_unavailable` (beyond the original, which said `internal`),
    /// a corrupt row → `internal`.
    async fn load_record(&self, op: &Op<'_, L>) -> Result<Option<RuntimeRecord>, Failure> {
        self.store_retrying(|| self.store.load(op.game()))
            .await
            .map_err(|e| match e {
                StoreError::Corrupt(msg) => Failure::new(ErrorCode::Internal, msg),
                other => Failure::new(
                    ErrorCode::ServiceUnavailable,
                    format!("load runtime record: {other}"),
                ),
            })
    }

    /// The game's record, which must exist (`not_found`).
    async fn load_existing(&self, op: &Op<'_, L>) -> Result<RuntimeRecord, Failure> {
        self.load_record(op).await?.ok_or_else(|| {
            Failure::new(
                ErrorCode::NotFound,
                format!(
                    "runtime record for game {:?} does not exist",
                    op.game().as_str()
                ),
            )
        })
    }

    /// Retries a store call while the database is unavailable, for
    /// `RTM_RETRY_FOR`.
    async fn store_retrying<T, F, Fut>(&self, call: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        self.retrying(call, |e| matches!(e, StoreError::Unavailable(_)))
            .await
    }

    /// Retries `call` with exponential backoff while `transient(error)`, for
    /// at most `RTM_RETRY_FOR` in total.
    async fn retrying<T, Err, F, Fut>(
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
