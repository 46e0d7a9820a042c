//! The command consumer: takes messages off the quorum queue, decodes them,
//! runs them through the lifecycle, and acks once the outcome is recorded.
//!
//! Each concern has its file:
//!
//! - [`session`]: the AMQP side — connect, consume, reconnect, drain at
//!   shutdown, and [`session::settle`], the one function that acks or nacks.
//! - [`lanes`]: one queue per game, so a game's commands run in arrival
//!   order while different games run concurrently (at most `RTM_PREFETCH`).
//! - [`attempt`]: the attempt policy — poison, retry until recorded, panic
//!   → `internal` — which turns one delivery into one [`Decision`].
//! - [`dead_letter`]: an undecodable message's `runtime.rejected` event and
//!   its copy on the dead-letter exchange.
//!
//! What happens to a delivery is decided once, as a [`Decision`]:
//!
//! | what happened                         | decision                        |
//! |---------------------------------------|---------------------------------|
//! | outcome recorded (success or failure) | `Ack`                           |
//! | undecodable body                      | `DeadLetter(Undecodable)`: a copy to the DLX with `x-rtm-reject-reason`, then ack |
//! | interrupted (store down, lease lost)  | none yet: retried in-process with backoff (a requeue would count toward the delivery limit) |
//! | panic while handling                  | record `internal`, `Ack`        |
//! | not even a failure can be recorded    | `DeadLetter(Unrecordable)`: rejected, the broker dead-letters it |
//! | a step before the ack failed (the rejected event or a duplicate's republish could not be stored, the DLX copy not confirmed) | none yet: retried in-process with backoff; `Leave` at shutdown |
//! | waiting in its lane when shutdown came   | `Requeue`: handed back unstarted |
//! | shutdown while interrupted            | `Leave` unacked: redelivered when the channel closes |

mod attempt;
mod dead_letter;
mod forward;
mod lanes;
mod session;

use std::sync::Arc;

use futures_util::future::BoxFuture;
use lapin::Channel;
use lapin::message::Delivery;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tracing::{Instrument as _, debug, info_span};
use uuid::Uuid;

use crate::config::{AmqpConfig, SecretUrl};
use crate::domain::NodeName;
use crate::domain::{CommandRequest, OpKind, OutcomeEvent};
use crate::lifecycle::{Handled, Interrupted, Lifecycle};
use crate::messages::{Envelope, decode_command};
use crate::ports::{
    Admission, ContainerEngine, InboxClaim, LeaseStore, Route, RuntimeStore, StoreError,
};
use crate::readiness::Readiness;
use crate::shutdown::Shutdown;
use crate::telemetry;

pub use attempt::{DeadLetterReason, Decision};

/// What the consumer asks of the service behind it: run a command, answer
/// one `internal`, and two outbox writes. The lifecycle implements it; the
/// consumer holds it as a trait object, so it is not generic over the
/// lifecycle's three ports.
pub trait CommandHandler: Send + Sync + 'static {
    /// Runs one decoded command to its recorded outcome; `claim` is its
    /// inbox claim when [`Self::admit`] just made it (else it is claimed
    /// here).
    fn handle(
        &self,
        request: CommandRequest,
        claim: Option<InboxClaim>,
    ) -> BoxFuture<'_, Result<Handled, Interrupted>>;
    /// Answers a command `internal` with `message`.
    fn fail_internal<'a>(
        &'a self,
        request: &'a CommandRequest,
        message: String,
    ) -> BoxFuture<'a, Result<Handled, Interrupted>>;
    /// Stores the `runtime.rejected` event of an undecodable message.
    fn append_rejected<'a>(
        &'a self,
        event: &'a OutcomeEvent,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Queues a stored outcome for publishing again (a duplicate's).
    fn republish(&self, event_id: Uuid) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Stops the operations still running before their next Docker step
    /// (shutdown's time for them is up).
    fn stop_operations(&self);
    /// Where a command runs (SPEC §12), placing a start records the
    /// choice, and, when it runs here, its inbox claim. By default
    /// everything runs here (a handler of one node) and is claimed by
    /// [`Self::handle`].
    fn admit<'a>(
        &'a self,
        request: &'a CommandRequest,
    ) -> BoxFuture<'a, Result<Admission, StoreError>> {
        let _ = request;
        Box::pin(async {
            Ok(Admission {
                route: Route::Here,
                claim: None,
            })
        })
    }
}

impl<S, L, E> CommandHandler for Lifecycle<S, L, E>
where
    S: RuntimeStore,
    L: LeaseStore,
    E: ContainerEngine,
{
    fn handle(
        &self,
        request: CommandRequest,
        claim: Option<InboxClaim>,
    ) -> BoxFuture<'_, Result<Handled, Interrupted>> {
        Box::pin(Lifecycle::handle_claimed(self, request, claim))
    }

    fn fail_internal<'a>(
        &'a self,
        request: &'a CommandRequest,
        message: String,
    ) -> BoxFuture<'a, Result<Handled, Interrupted>> {
        Box::pin(Lifecycle::fail_internal(self, request, message))
    }

    fn append_rejected<'a>(
        &'a self,
        event: &'a OutcomeEvent,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.store().append_rejected(event))
    }

    fn republish(&self, event_id: Uuid) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.store().republish(event_id))
    }

    fn stop_operations(&self) {
        Lifecycle::stop_operations(self);
    }

    fn admit<'a>(
        &'a self,
        request: &'a CommandRequest,
    ) -> BoxFuture<'a, Result<Admission, StoreError>> {
        Box::pin(Lifecycle::admit(self, request))
    }
}

pub struct Consumer {
    handler: Arc<dyn CommandHandler>,
    url: SecretUrl,
    amqp: AmqpConfig,
    /// This worker's node: its queue is consumed beside the shared one.
    node: NodeName,
    /// That queue's name, `<RTM_COMMAND_QUEUE>.node.<node>` (asked of every
    /// delivery's `reply_to`, so made once).
    node_queue: String,
    readiness: Arc<Readiness>,
    relay_wake: Arc<Notify>,
    /// One permit per message in flight; all permits back means drained.
    in_flight: Arc<Semaphore>,
    lanes: lanes::Lanes<Job>,
    shutdown: Shutdown,
}

/// One delivery on its way through a lane. It holds no in-flight slot
/// while it waits behind its game's earlier commands: it takes one only
/// when it starts, so a busy game never occupies the slots other games
/// need (SPEC §10).
struct Job {
    request: CommandRequest,
    delivery: Delivery,
    /// The channel it came on: where it is settled.
    channel: Channel,
    /// How many times the broker delivered it before (`x-delivery-count`).
    redeliveries: u64,
}

/// A command's admission started ahead of its turn.
type Admitting = JoinHandle<Result<Admission, StoreError>>;

/// A lane's next command, taken off it while the one before runs.
struct Ahead {
    job: Job,
    admitting: Option<Admitting>,
}

impl Consumer {
    pub fn new(
        handler: impl CommandHandler,
        url: SecretUrl,
        amqp: AmqpConfig,
        node: NodeName,
        readiness: Arc<Readiness>,
        relay_wake: Arc<Notify>,
        shutdown: Shutdown,
    ) -> Self {
        let permits = usize::from(amqp.prefetch);
        Self {
            handler: Arc::new(handler),
            url,
            node_queue: node.queue(&amqp.command_queue),
            amqp,
            node,
            readiness,
            relay_wake,
            in_flight: Arc::new(Semaphore::new(permits)),
            lanes: lanes::Lanes::default(),
            shutdown,
        }
    }

    /// Decodes a delivery: a command goes to its game's lane, an
    /// undecodable one is dead-lettered by a task of its own, so neither
    /// ever holds up the consume loop.
    fn dispatch(self: Arc<Self>, channel: &Channel, delivery: Delivery) {
        metrics::counter!(telemetry::COMMANDS_CONSUMED).increment(1);
        let envelope = Envelope::from(&delivery.properties);
        match decode_command(&delivery.data, &envelope) {
            Ok(mut request) => {
                request.refuse_reply_to(|queue| self.is_own_queue(queue));
                let job = Job {
                    redeliveries: session::delivery_count(&delivery.properties),
                    request,
                    delivery,
                    channel: channel.clone(),
                };
                let key = job.request.game_id.clone().unwrap_or_default();
                if let Some(lane) = self.lanes.submit(&key, job) {
                    tokio::spawn(self.clone().run_lane(lane));
                }
            }
            Err(undecodable) => {
                let channel = channel.clone();
                tokio::spawn(async move {
                    // Counted in flight, so the drain at shutdown waits for it.
                    let Ok(_permit) = self.in_flight.clone().acquire_owned().await else {
                        return;
                    };
                    let decision =
                        dead_letter::reject(self.handler.as_ref(), undecodable, &self.shutdown)
                            .await;
                    if matches!(decision, Decision::DeadLetter(_)) {
                        self.relay_wake.notify_one();
                    }
                    self.settle(&channel, &delivery, decision).await;
                });
            }
        }
    }

    /// Whether `queue` is one this service consumes or fills: a reply sent
    /// there would come back as a command (SPEC §6).
    fn is_own_queue(&self, queue: &str) -> bool {
        queue == self.amqp.command_queue
            || queue == self.amqp.dead_letter_queue
            || queue == self.node_queue
    }

    /// Runs one game's commands in arrival order; ends when none is pending.
    /// Each takes an in-flight slot only when it starts. Once shutdown is
    /// requested, the commands still waiting are handed back to the broker
    /// unstarted (another worker, or this one's successor, runs them): none
    /// takes a lease this worker would not live to release.
    async fn run_lane(self: Arc<Self>, mut lane: lanes::Lane<Job>) {
        let mut ahead: Option<Ahead> = None;
        loop {
            let (job, admitting) = match ahead.take() {
                Some(Ahead { job, admitting }) => (job, admitting),
                None => match self.lanes.next(&mut lane) {
                    Some(job) => (job, None),
                    None => return,
                },
            };
            let mut shutdown = self.shutdown.clone();
            let permit = tokio::select! {
                permit = self.in_flight.clone().acquire_owned() => permit.ok(),
                () = shutdown.wait() => None,
            };
            let Some(permit) = permit.filter(|_| !self.shutdown.is_set()) else {
                debug!(command_id = %job.request.command_id, "shutting down: handing the command back unstarted");
                self.settle(&job.channel, &job.delivery, Decision::Requeue)
                    .await;
                continue;
            };
            let span = info_span!(
                "message",
                command_id = %job.request.command_id,
                op = %job.request.op,
                game_id = %lane.key(),
                correlation_id = %job.request.correlation_id(),
            );
            self.process(job, admitting, permit, &mut lane, &mut ahead)
                .instrument(span)
                .await;
        }
    }

    /// Runs one command, holding its in-flight slot (`permit`): its
    /// admission (taken from `admitting` when it was started ahead), then,
    /// once it is admitted, starts the admission of its game's next command
    /// into `ahead`, and runs the command.
    async fn process(
        self: &Arc<Self>,
        mut job: Job,
        admitting: Option<Admitting>,
        permit: OwnedSemaphorePermit,
        lane: &mut lanes::Lane<Job>,
        ahead: &mut Option<Ahead>,
    ) {
        let gauge = metrics::gauge!(telemetry::OPERATIONS_IN_FLIGHT);
        gauge.increment(1.0);
        // The admission made ahead, if it came through; else asked now,
        // with the retries.
        let early = match admitting {
            Some(handle) => match handle.await {
                Ok(Ok(admission)) => Some(admission),
                Ok(Err(e)) => {
                    debug!(error = %e, "the admission made ahead failed; asking again");
                    None
                }
                Err(_) => None,
            },
            None => None,
        };
        let admission = match early {
            Some(admission) => Some(admission),
            None => {
                attempt::retry_until_shutdown(
                    &self.shutdown,
                    "find the node the command runs on and claim it",
                    || self.handler.admit(&job.request),
                )
                .await
            }
        };
        *ahead = self.look_ahead(lane);
        let decision = match admission {
            None => Decision::Leave,
            Some(Admission {
                route: Route::Forward(node),
                ..
            }) => self.forward(&job, &node).await,
            Some(Admission { route, claim }) => {
                if let Route::Refused(failure) = route {
                    job.request.refusal = Some(failure);
                }
                self.attempts()
                    .decide(&job.request, job.redeliveries, claim)
                    .await
            }
        };
        gauge.decrement(1.0);
        self.relay_wake.notify_one();
        if decision == Decision::Ack {
            // The outcome is recorded: the game's next command need not
            // wait for the ack to be written. The ack keeps the slot, so
            // the drain at shutdown still waits for it; acks of one game
            // may go out of order, which AMQP allows.
            let this = self.clone();
            tokio::spawn(
                async move {
                    this.settle(&job.channel, &job.delivery, decision).await;
                    drop(permit);
                }
                .in_current_span(),
            );
        } else {
            self.settle(&job.channel, &job.delivery, decision).await;
        }
    }

    /// Takes the lane's next command, if one is waiting, and starts its
    /// admission now, while the command before it runs: for one busy game
    /// the admission's round trip then leaves the path its commands take
    /// one after another. Only once the command before is admitted, and
    /// never for a `start`: a start before it may place the game (its
    /// admission records where), and a start's own route depends on what
    /// the commands before it leave (a removed game is placed afresh), so
    /// each is asked only when its turn comes, as before. Every other op
    /// goes where its game's placement or record says, which no command
    /// still running before it changes.
    fn look_ahead(&self, lane: &mut lanes::Lane<Job>) -> Option<Ahead> {
        let job = self.lanes.try_next(lane)?;
        let admitting = (job.request.op != OpKind::Start && !self.shutdown.is_set()).then(|| {
            let (handler, request) = (self.handler.clone(), job.request.clone());
            tokio::spawn(async move { handler.admit(&request).await }.in_current_span())
        });
        Some(Ahead { job, admitting })
    }

    fn attempts(&self) -> attempt::Attempts<'_> {
        attempt::Attempts {
            handler: &self.handler,
            delivery_limit: self.amqp.delivery_limit,
            shutdown: &self.shutdown,
            relay_wake: &self.relay_wake,
        }
    }
}
