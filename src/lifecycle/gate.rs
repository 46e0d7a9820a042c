//! The command gate: what a command passes before its op runs, and how it
//! is answered when it does not get through — the game's lease (waited out
//! when an earlier attempt of the same command holds it), the fence taken
//! under it, and the refusals recorded without it.

use std::ops::ControlFlow;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::{debug, warn};
use uuid::Uuid;

use super::lease::LeaseGuard;
use super::{Halt, Handled, Interrupted, Lifecycle, Op, record_metrics};
use crate::domain::{Action, Command, CommandRequest, EntryResult, OperationEntry};
use crate::error::{ErrorCode, Failure};
use crate::ports::{
    Acquired, Answers, Begun, ContainerEngine, InboxClaim, LeaseHolder, LeaseStore, OperationWrite,
    Peeked, Progress, Recorded, RuntimeStore, StoreError, WriteFence,
};
use crate::telemetry;

/// Whether a command got its game's lease or was answered without it: with
/// a refusal, or with the outcome another attempt of it recorded while this
/// one waited. Returned once per command: boxing the answer would buy
/// nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum Gate<L: LeaseStore> {
    Held(LeaseGuard<L>),
    Answered(Handled),
}

impl<S, L, E> Lifecycle<S, L, E>
where
    S: RuntimeStore,
    L: LeaseStore,
    E: ContainerEngine,
{
    /// Takes the game's next fence for this attempt (under its lease) and
    /// reads what the attempt starts from ([`RuntimeStore::begin`], one
    /// round trip): `Break` with the answer when another attempt of the
    /// command answered it meanwhile. The fence first: an earlier attempt
    /// can no longer write once it moved, so what is read after it is all
    /// that attempt will ever have done. Asked by every attempt, the one
    /// that claimed the command first included: a copy may have overtaken
    /// it.
    pub(super) async fn take_fence(
        &self,
        request: &CommandRequest,
        command: &Command,
    ) -> Result<ControlFlow<Handled, Begun>, Interrupted> {
        let begun = self
            .store_retrying(|| self.store.begin(&command.game_id, request))
            .await?;
        match begun.claim {
            InboxClaim::Finished(event) => Ok(ControlFlow::Break(Handled::duplicate(event))),
            InboxClaim::Reused { first } => Ok(ControlFlow::Break(
                self.answer_reuse(request, Utc::now(), &first).await?,
            )),
            InboxClaim::Fresh | InboxClaim::Unfinished => Ok(ControlFlow::Continue(begun)),
        }
    }

    /// What a patch reads of the game to be answered before it takes a
    /// fence ([`Self::answer_before_fence`]), asked alongside its lease: the
    /// answer written from it is checked at the write (the fence must still
    /// be the one read), so the read need not wait for the lease. `None`
    /// for any other op, or when the read fails (the patch then takes its
    /// fence as any command).
    pub(super) async fn peek_for(&self, command: &Command) -> Option<Peeked> {
        if !matches!(command.action, Action::Patch { .. }) {
            return None;
        }
        self.store
            .peek(&command.game_id, &command.command_id)
            .await
            .inspect_err(|e| debug!(error = %e, "could not read the game ahead of its fence"))
            .ok()
    }

    /// Answers in one commit a command the game's record refuses with no
    /// Docker work (today: a patch refused by SPEC §3's checks), from what
    /// [`Self::peek_for`] read: its entry takes the game's next fence as it
    /// is written ([`WriteFence::Take`]), where [`Self::take_fence`] and the
    /// entry were a commit each. Only when nothing could change the record
    /// once read until a newer fence is taken ([`Peeked::settled`]) and no
    /// earlier attempt of the command left steps to resume; `None`
    /// otherwise, or when anyone took the game since the read, and the
    /// command then takes its fence as any other and is decided again.
    pub(super) async fn answer_before_fence(
        &self,
        command: &Command,
        lease: &LeaseGuard<L>,
        peeked: Option<Peeked>,
    ) -> Result<Option<Recorded>, Interrupted> {
        let (Action::Patch { new_image_ref }, Some(peeked)) = (&command.action, peeked) else {
            return Ok(None);
        };
        if !peeked.settled || peeked.progress {
            return Ok(None);
        }
        let op = Op {
            lc: self,
            cmd: command,
            fence: peeked.fence,
            lease,
            started_at: Utc::now(),
            progress: Progress::default(),
            record: peeked.record,
        };
        let Some(mut entry) = op.refusal(new_image_ref).await else {
            return Ok(None);
        };
        // No write decided under a lease that may have gone.
        op.check_lease()?;
        entry.finished_at = Utc::now();
        let write = OperationWrite {
            entry,
            fence: WriteFence::Take(peeked.fence),
            record: None,
            answers: Answers::Command,
        };
        match self.append(write).await {
            Ok(recorded) => Ok(Some(recorded)),
            Err(Interrupted::Unrecorded(StoreError::FenceLost(_))) => Ok(None),
            Err(e) => Err(e),
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
    pub(super) async fn lease_or_refusal(
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
                Ok(gate) => return Ok(gate),
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
    pub(super) async fn acquire_lease(
        &self,
        request: &CommandRequest,
        command: &Command,
        holder: &LeaseHolder,
    ) -> Result<Gate<L>, Halt> {
        let ttl = self.cfg.lease_ttl;
        // A dead attempt's lease expires within one TTL; a live one keeps
        // renewing, and then this delivery is a duplicate still running.
        let give_up = tokio::time::Instant::now() + ttl.saturating_mul(2);
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
                    return Ok(Gate::Held(LeaseGuard::hold(
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
                        return Ok(Gate::Answered(Handled::duplicate(event)));
                    }
                }
                // The reconciler looking at an exit under the lease (SPEC
                // §11: a command always wins): it holds it for a few reads
                // and at most one write, so wait rather than refuse.
                Acquired::HeldBy(value)
                    if LeaseHolder::command_of(&value).starts_with(super::exit::EXIT_PREFIX)
                        && tokio::time::Instant::now() < give_up =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
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

    /// Records a failure decided without the lease (validation, a refused
    /// lease): an outer entry echoing the request as sent; no record is
    /// touched. Another attempt's earlier answer is returned as a duplicate.
    pub(super) async fn reject(
        &self,
        request: &CommandRequest,
        received_at: DateTime<Utc>,
        failure: Failure,
        fence: WriteFence,
    ) -> Result<Handled, Interrupted> {
        let write = OperationWrite {
            entry: rejection(request, received_at, failure),
            fence,
            record: None,
            answers: Answers::Command,
        };
        let recorded = self.append(write).await?;
        if recorded.answered_before {
            return Ok(Handled::duplicate(recorded.event));
        }
        record_metrics(&recorded.event);
        Ok(Handled::recorded(recorded.event))
    }

    /// Answers a message whose command_id another command claimed first
    /// (SPEC §6): `invalid_request` on the message's own game, not run, and
    /// never the other command's outcome. Its event id is derived from the
    /// command_id and what the message asks, so a redelivery of it finds
    /// this answer rather than writing a second.
    pub(super) async fn answer_reuse(
        &self,
        request: &CommandRequest,
        received_at: DateTime<Utc>,
        first: &str,
    ) -> Result<Handled, Interrupted> {
        let failure = Failure::new(
            ErrorCode::InvalidRequest,
            format!(
                "command_id {:?} was already used for another command ({first}); \
                 a command_id names one command",
                request.command_id
            ),
        );
        let event_id = Uuid::new_v5(
            &REUSE_ANSWERS,
            format!("{}\n{}", request.command_id, request.fingerprint()).as_bytes(),
        );
        let write = OperationWrite {
            entry: rejection(request, received_at, failure),
            fence: WriteFence::Unchecked,
            record: None,
            answers: Answers::Reuse {
                reply_to: request.reply_to.clone(),
            },
        };
        let recorded = self.append_as(write, event_id).await?;
        record_metrics(&recorded.event);
        Ok(Handled::recorded(recorded.event))
    }
}

/// The namespace of the event ids of answers to a reused command_id.
const REUSE_ANSWERS: Uuid = Uuid::from_u128(0x2b7e_9c41_d03a_4f86_a1c5_77e0_3d9b_52f8);

/// The outer entry of a failure decided without the lease (validation, a
/// refused lease, a reused command_id), echoing the request as sent; no
/// record is touched.
fn rejection(
    request: &CommandRequest,
    received_at: DateTime<Utc>,
    failure: Failure,
) -> OperationEntry {
    warn!(error_code = %failure.code, error_message = %failure.message, "command rejected");
    OperationEntry {
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
        finished_at: Utc::now(),
    }
}
