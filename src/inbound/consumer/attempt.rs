//! The attempt policy: what to do with one delivered command, decided from
//! typed results and returned as one [`Decision`]. Nothing here touches the
//! broker; [`super::session::settle`] carries the decision out.
//!
//! - Its last delivery (`x-delivery-count` at `RTM_DELIVERY_LIMIT`): every
//!   earlier one ended without an outcome, so the command is poison —
//!   answered `internal` instead of run again.
//! - Interrupted (store down, lease lost): retried in-process with backoff
//!   until its outcome is recorded, or until shutdown (`Leave`).
//! - A panic, or an outcome the database refuses: answered `internal`.
//! - Not even that can be stored: dead-lettered for an operator.
//! - A duplicate of a finished command: its stored outcome is queued for
//!   publishing again before the ack.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tracing::{Instrument as _, error, warn};

use super::CommandHandler;
use crate::domain::CommandRequest;
use crate::lifecycle::{Handled, Interrupted};
use crate::pauses::Pauses;
use crate::ports::{InboxClaim, StoreError};
use crate::shutdown::Shutdown;

/// What becomes of one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Its outcome is recorded (or it was dead-lettered by copy): done.
    Ack,
    /// Back to the queue now, to be handled again (counts toward the
    /// delivery limit): only a command shutdown caught before it started.
    Requeue,
    /// Never to be handled again: to the dead-letter exchange.
    DeadLetter(DeadLetterReason),
    /// Shutdown came first: left unacked, it is redelivered when the
    /// channel closes.
    Leave,
}

/// Why a message is dead-lettered, which also says how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// Its body does not decode: a copy goes to the dead-letter exchange
    /// with `x-rtm-reject-reason` set to this, then the original is acked.
    Undecodable(String),
    /// Not even a failure could be stored for it (why): it is rejected,
    /// and the broker dead-letters it (reason `rejected`).
    Unrecordable(String),
}

/// Why a command ends without an outcome.
enum NoOutcome {
    /// Shutdown came first.
    Shutdown,
    /// Not even a failure could be stored.
    Unrecordable(String),
}

/// In-process retries of an interrupted command: from 1 s up to 10 s.
fn retry_pauses() -> Pauses {
    Pauses::new(Duration::from_secs(1), Duration::from_secs(10))
}

/// Retries `call` with backoff until it succeeds; `None` once shutdown is
/// requested, and the message is left unacked to come back. The steps
/// before an ack are retried here rather than by a requeue: a requeue
/// counts toward the delivery limit, and a message requeued through an
/// outage ended dead-lettered by the broker, with no reason and no event.
pub(super) async fn retry_until_shutdown<T, E, Fut>(
    shutdown: &Shutdown,
    what: &str,
    mut call: impl FnMut() -> Fut,
) -> Option<T>
where
    E: std::fmt::Display,
    Fut: Future<Output = Result<T, E>>,
{
    let mut pauses = retry_pauses();
    let mut shutdown = shutdown.clone();
    loop {
        match call().await {
            Ok(done) => return Some(done),
            Err(e) => warn!(error = %e, "could not {what} yet; retrying"),
        }
        if shutdown.is_set() {
            return None;
        }
        tokio::select! {
            () = tokio::time::sleep(pauses.next_pause()) => {}
            () = shutdown.wait() => return None,
        }
    }
}

/// The policy, over what one consumer holds.
pub(super) struct Attempts<'a> {
    pub handler: &'a Arc<dyn CommandHandler>,
    /// `RTM_DELIVERY_LIMIT`: the broker dead-letters a message returned
    /// more often than this.
    pub delivery_limit: u32,
    pub shutdown: &'a Shutdown,
    /// Woken once a duplicate's outcome is queued again.
    pub relay_wake: &'a Notify,
}

impl Attempts<'_> {
    /// Handles `request`, delivered `redeliveries` times before, and says
    /// what becomes of its delivery.
    /// `claim` is the command's inbox claim when its admission just made
    /// it (the first attempt uses it; a retry claims again).
    pub async fn decide(
        &self,
        request: &CommandRequest,
        redeliveries: u64,
        claim: Option<InboxClaim>,
    ) -> Decision {
        let handled = if self.last_delivery(redeliveries) {
            // Every earlier delivery ended without an outcome: the command
            // keeps killing workers. Answer it instead of running it again;
            // the broker would dead-letter it after this delivery anyway.
            let message = format!(
                "gave up after {} deliveries without an outcome (RTM_DELIVERY_LIMIT={}): the command kept interrupting its workers",
                redeliveries + 1,
                self.delivery_limit
            );
            error!(%message, "poison command");
            self.record_internal(request, message).await
        } else {
            self.handle_until_recorded(request, claim).await
        };
        match handled {
            Ok(handled) if handled.duplicate => self.republish(&handled).await,
            Ok(_) => Decision::Ack,
            Err(NoOutcome::Shutdown) => Decision::Leave,
            Err(NoOutcome::Unrecordable(why)) => {
                Decision::DeadLetter(DeadLetterReason::Unrecordable(why))
            }
        }
    }

    /// A duplicate: publish the stored outcome again, with the same
    /// event_id. Until that is queued the duplicate is not acked.
    async fn republish(&self, handled: &Handled) -> Decision {
        let event_id = handled.event.event_id;
        let queued = retry_until_shutdown(
            self.shutdown,
            "queue the duplicate's outcome for republishing",
            || self.handler.republish(event_id),
        )
        .await;
        match queued {
            Some(()) => {
                self.relay_wake.notify_one();
                Decision::Ack
            }
            None => Decision::Leave,
        }
    }

    /// Handles a command until its outcome is recorded. A panic fails the
    /// command with `internal`.
    async fn handle_until_recorded(
        &self,
        request: &CommandRequest,
        mut claim: Option<InboxClaim>,
    ) -> Result<Handled, NoOutcome> {
        let mut pauses = retry_pauses();
        loop {
            let handler = self.handler.clone();
            let owned = request.clone();
            // Only the first attempt may use the admission's claim: what it
            // says may be out of date by a retry.
            let claim = claim.take();
            // A task of its own, so a panic is caught here as a `JoinError`.
            let outcome =
                tokio::spawn(async move { handler.handle(owned, claim).await }.in_current_span())
                    .await;
            match outcome {
                Ok(Ok(handled)) => return Ok(handled),
                // Not an outage: the database refuses what this command would
                // write. Retrying cannot help; answer it `internal` (its own
                // raw fields may be what is refused: if that fails too, the
                // message is dead-lettered).
                Ok(Err(Interrupted::Unrecorded(StoreError::Corrupt(why)))) => {
                    error!(error = %why, "the command's outcome cannot be stored");
                    return self
                        .record_internal(request, format!("the outcome could not be stored: {why}"))
                        .await;
                }
                Ok(Err(interrupted)) => {
                    warn!(reason = %interrupted, "command interrupted; it will be retried");
                }
                Err(join) if join.is_panic() => {
                    let message = panic_message(join.into_panic());
                    error!(panic = %message, "command handling panicked");
                    // Never run the op that panicked again: answer it.
                    return self
                        .record_internal(
                            request,
                            format!("panic while handling the command: {message}"),
                        )
                        .await;
                }
                Err(join) => warn!(error = %join, "command task cancelled; retrying"),
            }
            self.pause_before_retry(&mut pauses).await?;
        }
    }

    /// Answers a command `internal`, retrying while the database is out
    /// (a command that cannot even be recorded stays unacknowledged); only
    /// a write the database refuses outright makes it unrecordable.
    async fn record_internal(
        &self,
        request: &CommandRequest,
        message: String,
    ) -> Result<Handled, NoOutcome> {
        let mut pauses = retry_pauses();
        loop {
            let (handler, owned, message) =
                (self.handler.clone(), request.clone(), message.clone());
            // A task of its own like the op's: a panic here must not take
            // the lane down with the delivery unacked.
            let answered = tokio::spawn(
                async move { handler.fail_internal(&owned, message).await }.in_current_span(),
            )
            .await;
            match answered {
                Ok(Ok(handled)) => return Ok(handled),
                Ok(Err(Interrupted::Unrecorded(StoreError::Corrupt(why)))) => {
                    return Err(NoOutcome::Unrecordable(why));
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "could not record the command's internal failure yet; retrying")
                }
                Err(join) if join.is_panic() => {
                    let message = panic_message(join.into_panic());
                    error!(panic = %message, "answering the command internal panicked");
                    return Err(NoOutcome::Unrecordable(format!(
                        "panic while answering the command internal: {message}"
                    )));
                }
                Err(join) => warn!(error = %join, "internal answer task cancelled; retrying"),
            }
            self.pause_before_retry(&mut pauses).await?;
        }
    }

    /// Waits the next of `pauses` before an in-process retry; gives up at
    /// shutdown, leaving the message unacked.
    async fn pause_before_retry(&self, pauses: &mut Pauses) -> Result<(), NoOutcome> {
        let mut shutdown = self.shutdown.clone();
        if shutdown.is_set() {
            return Err(NoOutcome::Shutdown);
        }
        tokio::select! {
            () = tokio::time::sleep(pauses.next_pause()) => Ok(()),
            () = shutdown.wait() => Err(NoOutcome::Shutdown),
        }
    }

    /// The broker dead-letters a message returned more than
    /// `RTM_DELIVERY_LIMIT` times: this delivery is its last.
    fn last_delivery(&self, redeliveries: u64) -> bool {
        redeliveries >= u64::from(self.delivery_limit)
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

#[cfg(test)]
mod tests {
    //! The policy against a scripted handler: no broker, no database.

    use std::sync::Mutex;

    use futures_util::future::BoxFuture;
    use uuid::Uuid;

    use super::*;
    use crate::domain::{OpKind, OutcomeEvent};
    use crate::messages::Undecodable;
    use crate::shutdown;

    /// What the scripted handler answers, and what it was asked.
    #[derive(Default)]
    struct Scripted {
        /// `None`: `handle` panics.
        handle: Option<Result<Handled, Interrupted>>,
        fail_internal: Option<Result<Handled, Interrupted>>,
        republish: Option<Result<(), StoreError>>,
        internal_messages: Mutex<Vec<String>>,
    }

    impl CommandHandler for Scripted {
        fn handle(
            &self,
            _: CommandRequest,
            _: Option<InboxClaim>,
        ) -> BoxFuture<'_, Result<Handled, Interrupted>> {
            let answer = self.handle.clone().expect("the op panics");
            Box::pin(async move { answer })
        }

        fn fail_internal<'a>(
            &'a self,
            _: &'a CommandRequest,
            message: String,
        ) -> BoxFuture<'a, Result<Handled, Interrupted>> {
            self.internal_messages.lock().unwrap().push(message);
            let answer = self
                .fail_internal
                .clone()
                .expect("no internal answer scripted");
            Box::pin(async move { answer })
        }

        fn append_rejected<'a>(
            &'a self,
            _: &'a OutcomeEvent,
        ) -> BoxFuture<'a, Result<(), StoreError>> {
            Box::pin(async { Ok(()) })
        }

        fn republish(&self, _: Uuid) -> BoxFuture<'_, Result<(), StoreError>> {
            let answer = self.republish.clone().expect("no republish scripted");
            Box::pin(async move { answer })
        }

        fn stop_operations(&self) {}
    }

    fn handled(duplicate: bool) -> Handled {
        let event = super::super::dead_letter::rejected_event(&Undecodable {
            reason: "any".into(),
            command_id: Some("c-1".into()),
            op: None,
            game_id: Some("g-1".into()),
            source_ref: None,
        })
        .expect("an event");
        Handled { event, duplicate }
    }

    fn request() -> CommandRequest {
        CommandRequest {
            command_id: "c-1".into(),
            op: OpKind::Stop,
            game_id: Some("g-1".into()),
            image_ref: None,
            op_source: None,
            source_ref: None,
            reason: None,
            requested_at: None,
            reply_to: None,
            malformed: None,
            node: None,
            refusal: None,
        }
    }

    fn corrupt() -> Interrupted {
        Interrupted::Unrecorded(StoreError::Corrupt("refused".into()))
    }

    /// Runs the policy over `handler`, with shutdown already requested
    /// when `stopping` (so an interruption is not retried).
    async fn decide(
        handler: Scripted,
        redeliveries: u64,
        stopping: bool,
    ) -> (Decision, Vec<String>) {
        let scripted = Arc::new(handler);
        let handler: Arc<dyn CommandHandler> = scripted.clone();
        let (trigger, shutdown) = shutdown::channel();
        if stopping {
            trigger.fire();
        }
        let wake = Notify::new();
        let attempts = Attempts {
            handler: &handler,
            delivery_limit: 5,
            shutdown: &shutdown,
            relay_wake: &wake,
        };
        let decision = attempts.decide(&request(), redeliveries, None).await;
        let asked = scripted.internal_messages.lock().unwrap().clone();
        (decision, asked)
    }

    #[tokio::test]
    async fn a_recorded_outcome_is_acked_and_a_duplicate_once_its_outcome_is_queued_again() {
        let recorded = Scripted {
            handle: Some(Ok(handled(false))),
            ..Scripted::default()
        };
        assert_eq!(decide(recorded, 0, false).await.0, Decision::Ack);
        let duplicate = Scripted {
            handle: Some(Ok(handled(true))),
            republish: Some(Ok(())),
            ..Scripted::default()
        };
        assert_eq!(decide(duplicate, 0, false).await.0, Decision::Ack);
        let unqueued = Scripted {
            handle: Some(Ok(handled(true))),
            republish: Some(Err(StoreError::Unavailable("down".into()))),
            ..Scripted::default()
        };
        // Retried in-process, never requeued (a requeue counts toward the
        // delivery limit); at shutdown it is left to come back.
        assert_eq!(decide(unqueued, 0, true).await.0, Decision::Leave);
    }

    #[tokio::test]
    async fn the_last_delivery_is_answered_internal_without_running_the_op() {
        let poison = Scripted {
            handle: None,
            fail_internal: Some(Ok(handled(false))),
            ..Scripted::default()
        };
        let (decision, asked) = decide(poison, 5, false).await;
        assert_eq!(decision, Decision::Ack);
        assert!(
            asked[0].starts_with("gave up after 6 deliveries"),
            "{asked:?}"
        );
    }

    #[tokio::test]
    async fn a_panic_or_a_refused_outcome_is_answered_internal() {
        let panics = Scripted {
            handle: None,
            fail_internal: Some(Ok(handled(false))),
            ..Scripted::default()
        };
        let (decision, asked) = decide(panics, 0, false).await;
        assert_eq!(decision, Decision::Ack);
        assert!(
            asked[0].starts_with("panic while handling the command: the op panics"),
            "{asked:?}"
        );
        let refused = Scripted {
            handle: Some(Err(corrupt())),
            fail_internal: Some(Ok(handled(false))),
            ..Scripted::default()
        };
        let (decision, asked) = decide(refused, 0, false).await;
        assert_eq!(decision, Decision::Ack);
        assert!(
            asked[0].starts_with("the outcome could not be stored"),
            "{asked:?}"
        );
    }

    #[tokio::test]
    async fn a_panic_while_answering_internal_dead_letters_the_command() {
        // `handle` panics, then so does `fail_internal` (nothing scripted).
        let (decision, asked) = decide(Scripted::default(), 0, false).await;
        assert_eq!(asked.len(), 1, "asked once: {asked:?}");
        match decision {
            Decision::DeadLetter(DeadLetterReason::Unrecordable(why)) => {
                assert!(why.contains("no internal answer scripted"), "{why}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_command_not_even_a_failure_can_be_stored_for_is_dead_lettered() {
        let unrecordable = Scripted {
            handle: Some(Err(corrupt())),
            fail_internal: Some(Err(corrupt())),
            ..Scripted::default()
        };
        assert_eq!(
            decide(unrecordable, 0, false).await.0,
            Decision::DeadLetter(DeadLetterReason::Unrecordable("refused".into()))
        );
    }

    #[tokio::test]
    async fn an_interrupted_command_is_left_unacked_at_shutdown() {
        let interrupted = Scripted {
            handle: Some(Err(Interrupted::LeaseLost("g-1".into()))),
            ..Scripted::default()
        };
        assert_eq!(decide(interrupted, 0, true).await.0, Decision::Leave);
    }
}
