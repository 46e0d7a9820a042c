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
//!    next fence; a patch reads the game alongside the lease request, and
//!    one its record refuses is answered in one write that takes the fence
//!    itself (`gate`: `answer_before_fence`);
//! 4. dispatch to the op, which runs its Docker steps and writes an
//!    operation-log entry (with its outbox event, in one fenced transaction)
//!    per step: inner `stop`/`start` entries, then the outer entry, which
//!    also marks the command finished in the inbox;
//! 5. release the lease with its own timeout, whatever happened.
//!
//! A business failure is an outcome like any other (recorded, published).
//! Only [`Interrupted`] escapes: the outcome could not be recorded, or the
//! lease was lost, so the command must be left for redelivery.
//!
//! Where things live: `gate` (lease, fence, the refusals written without
//! the lease), `lease` (the held lease and its renewal), one file per op,
//! `container` (the Docker steps they share), `record` (writing entries and
//! journal steps; every entry under the lease goes through `Op::finish`),
//! `retry`. An op and its steps are methods of `Op`, the per-operation
//! context (the services, command, lease, fence, progress), so no step
//! takes the operation as an argument. The `memory` ports and `tests` run
//! every op rule and every resumption under `cargo test --lib`.

mod container;
mod exit;
mod gate;
mod lease;
#[cfg(test)]
mod memory;
mod patch;
mod record;
mod remove;
mod restart;
mod retry;
mod start;
mod stop;
#[cfg(test)]
mod tests;

use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use tracing::{debug, info, warn};

pub use crate::config::LifecycleConfig;
use crate::domain::{
    Action, Command, CommandRequest, EntryResult, GameId, OpKind, OperationEntry, OutcomeEvent,
    RuntimeRecord, Stage, Step,
};
use crate::error::{ErrorCode, Failure};
use crate::ports::{
    Admission, Begun, ContainerEngine, Fence, InboxClaim, LeaseStore, Peeked, Progress, Recorded,
    Route, RuntimeStore, StoreError, WriteFence,
};
use crate::telemetry;
pub use container::STALE_TASK_RECREATED;
pub use exit::{EXIT_PREFIX, ExitReport, exit_command_id};
use gate::Gate;
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
    #[error("shutting down: the operation on game {0} stops before its next Docker step")]
    ShuttingDown(String),
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

/// One operation running under its lease: the command, its lease and
/// fence, and what earlier attempts did. The op's steps are its methods, so
/// each reaches the services and this context without it threaded through.
struct Op<'a, S, L: LeaseStore, E> {
    lc: &'a Lifecycle<S, L, E>,
    cmd: &'a Command,
    fence: Fence,
    lease: &'a LeaseGuard<L>,
    started_at: DateTime<Utc>,
    /// What earlier attempts of this command did (empty on a first attempt).
    progress: Progress,
    /// The game's record as read after the fence was taken; `Err` when its
    /// row is corrupt.
    record: Result<Option<RuntimeRecord>, String>,
}

impl<S, L: LeaseStore, E> Op<'_, S, L, E> {
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

    /// Stops the operations still running before their next Docker step;
    /// for shutdown, once they had `RTM_SHUTDOWN_TIMEOUT`. Each releases its
    /// lease once its Docker call in flight has returned.
    pub fn stop_operations(&self) {
        lease::stop_all(&self.held);
    }

    /// How many leases operations of this process hold.
    pub fn leases_held(&self) -> usize {
        self.held.lock().expect("lease registry").len()
    }

    pub fn config(&self) -> &LifecycleConfig {
        &self.cfg
    }

    /// Where `request` runs (SPEC §12) and, when here, its inbox claim
    /// (one round trip, [`RuntimeStore::admit`]). One that will not
    /// validate is answered where it landed and never placed: its
    /// `invalid_request` needs no engine.
    pub async fn admit(&self, request: &CommandRequest) -> Result<Admission, StoreError> {
        if request.validate(&self.cfg.allowed_images).is_err() {
            return Ok(Admission {
                route: Route::Here,
                claim: Some(self.store.claim(request).await?),
            });
        }
        self.store.admit(request).await
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn engine(&self) -> &E {
        &self.engine
    }

    /// Runs one decoded command to its recorded outcome. Its log lines name
    /// no command: they run in the caller's span, which does (the
    /// consumer's `message` span records command_id, op, game_id and
    /// correlation_id); a second span here repeated all of them on every line.
    pub async fn handle(&self, request: CommandRequest) -> Result<Handled, Interrupted> {
        self.handle_claimed(request, None).await
    }

    /// [`Self::handle`], with the command's inbox claim when it was just
    /// made ([`Self::admit`]); `None` claims it here.
    pub async fn handle_claimed(
        &self,
        request: CommandRequest,
        claim: Option<InboxClaim>,
    ) -> Result<Handled, Interrupted> {
        let received_at = Utc::now();
        let claim = match claim {
            Some(claim) => claim,
            None => self.store_retrying(|| self.store.claim(&request)).await?,
        };
        match claim {
            InboxClaim::Fresh => {}
            InboxClaim::Unfinished => {
                debug!("command seen before: a redelivery or another copy of it");
            }
            InboxClaim::Finished(event) => {
                info!(outcome = %event.outcome, "duplicate of a finished command: republishing its outcome");
                return Ok(Handled::duplicate(event));
            }
            InboxClaim::Reused { first } => {
                return self.answer_reuse(&request, received_at, &first).await;
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

        let (gate, peeked) = tokio::join!(
            self.lease_or_refusal(&request, &command, received_at, None),
            self.peek_for(&command)
        );
        let lease = match gate? {
            Gate::Held(lease) => lease,
            Gate::Answered(handled) => return Ok(handled),
        };

        // A panic inside the op must not outlive the lease's release: catch
        // it, release in order, then let it continue to the caller (which
        // answers the command `internal`).
        let outcome = AssertUnwindSafe(self.run_leased(&request, &command, &lease, peeked))
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
        peeked: Option<Peeked>,
    ) -> Result<Handled, Interrupted> {
        if let Some(recorded) = self.answer_before_fence(command, lease, peeked).await? {
            return Ok(Self::outcome(recorded));
        }
        let Begun {
            fence,
            progress,
            record,
            ..
        } = match self.take_fence(request, command).await? {
            ControlFlow::Continue(begun) => begun,
            ControlFlow::Break(answered) => return Ok(answered),
        };
        // An earlier attempt may have died part-way: this one resumes from
        // what it recorded.
        if !progress.is_empty() {
            info!(
                entries = progress.entries.len(),
                steps = ?progress.steps.iter().map(Step::name).collect::<Vec<_>>(),
                "resuming a command an earlier attempt left unfinished"
            );
        }
        let op = Op {
            lc: self,
            cmd: command,
            fence,
            lease,
            started_at: Utc::now(),
            progress,
            record,
        };
        let recorded = match &command.action {
            Action::Start { image_ref } => op.start(image_ref).await?,
            Action::Stop { reason } => op.stop(*reason).await?,
            Action::Restart => op.restart().await?,
            Action::Patch { new_image_ref } => op.patch(new_image_ref).await?,
            Action::Remove => op.remove().await?,
            Action::Exit => {
                unreachable!("validation refuses op exit: only the reconciler writes it")
            }
        };
        Ok(Self::outcome(recorded))
    }

    /// An op's recorded outer entry as the command's answer, counted and
    /// logged; another attempt's earlier answer is returned as a duplicate.
    fn outcome(recorded: Recorded) -> Handled {
        let event = recorded.event;
        if recorded.answered_before {
            return Handled::duplicate(event);
        }
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
        Handled::recorded(event)
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
        match self.store_retrying(|| self.store.claim(request)).await? {
            InboxClaim::Finished(event) => return Ok(Handled::duplicate(event)),
            // Its answer is fixed whatever went wrong on the way to it.
            InboxClaim::Reused { first } => {
                return self.answer_reuse(request, Utc::now(), &first).await;
            }
            InboxClaim::Fresh | InboxClaim::Unfinished => {}
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
            let begun = match self.take_fence(request, &command).await? {
                ControlFlow::Continue(begun) => begun,
                ControlFlow::Break(answered) => return Ok(answered),
            };
            let op = Op {
                lc: self,
                cmd: &command,
                fence: begun.fence,
                lease: &lease,
                started_at: Utc::now(),
                progress: Progress::default(),
                record: begun.record,
            };
            let mut entry = op.outer_entry();
            entry.image_ref = request.image_ref.clone();
            // The interrupted attempt may have changed the game: the record
            // is set to what Docker reports, so they agree again.
            let record = op.observed_record().await;
            let recorded = op.finish(entry, Err(failure.into()), record).await?;
            record_metrics(&recorded.event);
            Ok(Handled::recorded(recorded.event))
        }
        .await;
        lease.release().await;
        answered
    }
}
