//! The command consumer: takes messages off the quorum queue, decodes them,
//! runs them through the lifecycle, and acks once the outcome is recorded.
//! Ack, retry or dead-letter is decided here and nowhere else:
//!
//! | what happened                         | what the consumer does          |
//! |---------------------------------------|---------------------------------|
//! | outcome recorded (success or failure) | ack                             |
//! | undecodable body                      | publish to the DLX with `x-rtm-reject-reason`, then ack |
//! | interrupted (store down, lease lost)  | keep the message, retry in-process with backoff (a requeue would count toward the delivery limit) |
//! | panic while handling                  | record `internal`, ack          |
//! | shutdown while interrupted            | leave unacked: redelivered when the channel closes |
//!
//! Commands of one game run one after another in arrival order (a lane per
//! game); different games run concurrently, at most `RTM_PREFETCH` at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::{Instrument, debug, error, info, info_span, warn};
use uuid::Uuid;

use crate::broker;
use crate::config::{AmqpConfig, SecretUrl};
use crate::domain::event::{REJECTED_ROUTING_KEY, SCHEMA_VERSION};
use crate::domain::{CommandRequest, Outcome, OutcomeEvent};
use crate::error::ErrorCode;
use crate::inbound::http::Readiness;
use crate::lifecycle::{Handled, Interrupted, Lifecycle};
use crate::messages::{Envelope, Undecodable, decode_command};
use crate::pauses::Pauses;
use crate::ports::{ContainerEngine, LeaseStore, RuntimeStore, StoreError};
use crate::shutdown::Shutdown;
use crate::telemetry;

/// Why a command ends without an outcome to ack.
enum NoOutcome {
    /// Shutdown came first: leave it unacked, it is redelivered.
    Shutdown,
    /// Not even a failure could be stored: dead-letter it.
    Unrecordable(String),
}

/// In-process retries of an interrupted command: from 1 s up to 10 s.
fn retry_pauses() -> Pauses {
    Pauses::new(Duration::from_secs(1), Duration::from_secs(10))
}

/// Reconnects after the broker went away: from half a second up to 5 s
/// (the relay's too), so a returning broker is found within seconds.
fn reconnect_pauses() -> Pauses {
    Pauses::new(Duration::from_millis(500), Duration::from_secs(5))
}

pub struct Consumer<S, L, E> {
    lifecycle: Lifecycle<S, L, E>,
    url: SecretUrl,
    amqp: AmqpConfig,
    readiness: Arc<Readiness>,
    relay_wake: Arc<Notify>,
    /// One permit per message in flight; all permits back means drained.
    in_flight: Arc<Semaphore>,
    lanes: Arc<Lanes>,
    shutdown: Shutdown,
}

/// One delivery on its way through a lane.
struct Job {
    request: CommandRequest,
    delivery: Delivery,
    /// How many times the broker delivered it before (`x-delivery-count`).
    redeliveries: u64,
    _permit: OwnedSemaphorePermit,
}

/// The per-game lanes: a queue and a task per game with work pending.
#[derive(Default)]
struct Lanes {
    senders: Mutex<HashMap<String, mpsc::UnboundedSender<Job>>>,
}

impl<S, L, E> Consumer<S, L, E>
where
    S: RuntimeStore,
    L: LeaseStore,
    E: ContainerEngine,
{
    pub fn new(
        lifecycle: Lifecycle<S, L, E>,
        url: SecretUrl,
        amqp: AmqpConfig,
        readiness: Arc<Readiness>,
        relay_wake: Arc<Notify>,
        shutdown: Shutdown,
    ) -> Self {
        let permits = usize::from(amqp.prefetch);
        Self {
            lifecycle,
            url,
            amqp,
            readiness,
            relay_wake,
            in_flight: Arc::new(Semaphore::new(permits)),
            lanes: Arc::new(Lanes::default()),
            shutdown,
        }
    }

    /// Consumes until shutdown, reconnecting whenever the broker goes away
    /// (the consumer cancelled included), then lets the commands in flight
    /// finish within `drain_timeout` before closing the connection.
    pub async fn run(self, drain_timeout: Duration) {
        let mut shutdown = self.shutdown.clone();
        let this = Arc::new(self);
        let mut connection: Option<(Connection, Channel)> = None;
        let mut pauses = reconnect_pauses();
        while !shutdown.is_set() {
            match this.clone().session(&mut shutdown, &mut pauses).await {
                Ok(conn) => {
                    connection = Some(conn);
                    break;
                }
                Err(e) => {
                    Readiness::set(&this.readiness.broker, false);
                    warn!(
                        error = format!("{e:#}"),
                        "command consumer lost the broker; reconnecting"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(pauses.next_pause()) => {}
                        () = shutdown.wait() => {}
                    }
                }
            }
        }
        let permits = u32::from(this.amqp.prefetch);
        info!("stopped consuming; waiting for the commands in flight");
        match tokio::time::timeout(drain_timeout, this.in_flight.acquire_many(permits)).await {
            Ok(_) => info!("all commands in flight finished"),
            Err(_) => warn!(
                ?drain_timeout,
                "commands still in flight at the shutdown timeout; they will be redelivered"
            ),
        }
        // Channel first, then the connection: closing the connection under
        // an open channel makes lapin log errors on a clean shutdown.
        if let Some((conn, channel)) = connection {
            let _ = channel.close(200, "shutdown".into()).await;
            let _ = conn.close(200, "shutdown".into()).await;
        }
    }

    /// One connection's life: declare, consume until the stream ends (an
    /// error) or shutdown (returns the connection, still open for acks).
    /// Once consuming, the reconnect pauses start over.
    async fn session(
        self: Arc<Self>,
        shutdown: &mut Shutdown,
        pauses: &mut Pauses,
    ) -> anyhow::Result<(Connection, Channel)> {
        let conn = broker::connect(&self.url, "rtmanager worker").await?;
        let channel = conn.create_channel().await?;
        broker::declare_topology(&channel, &self.amqp).await?;
        channel
            .basic_qos(self.amqp.prefetch, BasicQosOptions::default())
            .await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut stream = channel
            .basic_consume(
                self.amqp.command_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Readiness::set(&self.readiness.broker, true);
        pauses.reset();
        info!(queue = %self.amqp.command_queue, prefetch = self.amqp.prefetch, "consuming commands");
        loop {
            tokio::select! {
                () = shutdown.wait() => {
                    // Stop taking new messages; the channel stays open so the
                    // commands in flight can still ack.
                    let tag = stream.tag();
                    if let Err(e) = channel.basic_cancel(tag, Default::default()).await {
                        debug!(error = %e, "cancel the consumer");
                    }
                    return Ok((conn, channel));
                }
                next = stream.next() => match next {
                    None => anyhow::bail!("the broker cancelled the consumer"),
                    Some(Err(e)) => return Err(e.into()),
                    Some(Ok(delivery)) => {
                        let permit = self.in_flight.clone().acquire_owned().await?;
                        self.clone().dispatch(&channel, delivery, permit).await;
                    }
                }
            }
        }
    }

    async fn dispatch(
        self: Arc<Self>,
        channel: &Channel,
        delivery: Delivery,
        permit: OwnedSemaphorePermit,
    ) {
        metrics::counter!(telemetry::COMMANDS_CONSUMED).increment(1);
        let envelope = Envelope::from(&delivery.properties);
        match decode_command(&delivery.data, &envelope) {
            Ok(request) => self.submit(request, delivery, permit),
            Err(undecodable) => {
                self.dead_letter(channel, &delivery, undecodable).await;
                drop(permit);
            }
        }
    }

    /// Queues a command on its game's lane, starting the lane if idle.
    fn submit(
        self: Arc<Self>,
        request: CommandRequest,
        delivery: Delivery,
        permit: OwnedSemaphorePermit,
    ) {
        let key = request.game_id.clone().unwrap_or_default();
        let job = Job {
            redeliveries: delivery_count(&delivery.properties),
            request,
            delivery,
            _permit: permit,
        };
        let mut senders = self.lanes.senders.lock().expect("lanes lock");
        let job = match senders.get(&key) {
            Some(tx) => match tx.send(job) {
                Ok(()) => return,
                Err(mpsc::error::SendError(job)) => job,
            },
            None => job,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(job).ok();
        senders.insert(key.clone(), tx);
        drop(senders);
        tokio::spawn(self.clone().lane(key, rx));
    }

    /// Runs one game's commands in arrival order; ends when none is pending.
    async fn lane(self: Arc<Self>, key: String, mut rx: mpsc::UnboundedReceiver<Job>) {
        loop {
            let job = match rx.try_recv() {
                Ok(job) => job,
                Err(_) => {
                    // Check again under the lock, so a command submitted
                    // right now either lands here or starts a new lane.
                    let mut senders = self.lanes.senders.lock().expect("lanes lock");
                    match rx.try_recv() {
                        Ok(job) => job,
                        Err(_) => {
                            senders.remove(&key);
                            return;
                        }
                    }
                }
            };
            let span = info_span!(
                "message",
                command_id = %job.request.command_id,
                op = %job.request.op,
                game_id = %key,
                correlation_id = %job.request.correlation_id(),
            );
            self.process(job).instrument(span).await;
        }
    }

    async fn process(&self, job: Job) {
        let gauge = metrics::gauge!(telemetry::OPERATIONS_IN_FLIGHT);
        gauge.increment(1.0);
        let handled = if self.last_delivery(job.redeliveries) {
            // Every earlier delivery ended without an outcome: the command
            // keeps killing workers. Answer it instead of running it again;
            // the broker would dead-letter it after this delivery anyway.
            let message = format!(
                "gave up after {} deliveries without an outcome (RTM_DELIVERY_LIMIT={}): the command kept interrupting its workers",
                job.redeliveries + 1,
                self.amqp.delivery_limit
            );
            error!(%message, "poison command");
            self.record_internal(&job.request, message).await
        } else {
            self.handle_until_recorded(&job.request).await
        };
        gauge.decrement(1.0);
        self.relay_wake.notify_one();
        let handled = match handled {
            Ok(handled) => handled,
            // Left unacked: redelivered when the channel closes.
            Err(NoOutcome::Shutdown) => return,
            Err(NoOutcome::Unrecordable(why)) => {
                // Not even a failure could be recorded: let the broker
                // dead-letter it (reason `rejected`) for an operator.
                error!(error = %why, "command cannot be recorded; dead-lettering it");
                metrics::counter!(telemetry::COMMANDS_DEAD_LETTERED).increment(1);
                nack(&job.delivery, false).await;
                return;
            }
        };
        if handled.duplicate {
            // Publish the stored outcome again, with the same event_id. If
            // that cannot be queued, the duplicate is not acked: it comes
            // back and is answered then.
            if let Err(e) = self
                .lifecycle
                .store()
                .republish(handled.event.event_id)
                .await
            {
                warn!(error = %e, "could not queue the duplicate's outcome for republishing; returning it to the queue");
                nack(&job.delivery, true).await;
                return;
            }
            self.relay_wake.notify_one();
        }
        match job.delivery.acker.ack(BasicAckOptions::default()).await {
            Ok(_) => debug!(outcome = %handled.event.outcome, "acked"),
            // The channel is gone: the message comes back and the inbox
            // answers it as a duplicate.
            Err(e) => {
                warn!(error = %e, "ack failed; the command will be redelivered and deduplicated")
            }
        }
    }

    /// Handles a command until its outcome is recorded; `None` if shutdown
    /// came first. A panic fails the command with `internal`.
    async fn handle_until_recorded(&self, request: &CommandRequest) -> Result<Handled, NoOutcome> {
        let mut pauses = retry_pauses();
        loop {
            let lifecycle = self.lifecycle.clone();
            let owned = request.clone();
            let outcome =
                tokio::spawn(async move { lifecycle.handle(owned).await }.in_current_span()).await;
            match outcome {
                Ok(Ok(handled)) => return Ok(handled),
                // Not an outage: the database refuses what this command would
                // write. Retrying cannot help; answer it `internal` (its own
                // raw fields may be what is refused: if that fails too, the
                // message goes to the dead-letter queue, see `process`).
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
            match self.lifecycle.fail_internal(request, message.clone()).await {
                Ok(handled) => return Ok(handled),
                Err(Interrupted::Unrecorded(StoreError::Corrupt(why))) => {
                    return Err(NoOutcome::Unrecordable(why));
                }
                Err(e) => {
                    warn!(error = %e, "could not record the command's internal failure yet; retrying")
                }
            }
            self.pause_before_retry(&mut pauses).await?;
        }
    }

    /// Waits the next of `pauses` before an in-process retry; gives up at
    /// shutdown, leaving the message unacked.
    async fn pause_before_retry(&self, pauses: &mut Pauses) -> Result<(), NoOutcome> {
        if self.in_shutdown() {
            return Err(NoOutcome::Shutdown);
        }
        tokio::time::sleep(pauses.next_pause()).await;
        Ok(())
    }

    /// The broker dead-letters a message returned more than
    /// `RTM_DELIVERY_LIMIT` times: this delivery is its last.
    fn last_delivery(&self, redeliveries: u64) -> bool {
        redeliveries >= u64::from(self.amqp.delivery_limit)
    }

    fn in_shutdown(&self) -> bool {
        self.shutdown.is_set()
    }

    /// Sends an undecodable message to the dead-letter exchange with the
    /// reason, publishes a `runtime.rejected` event when a command_id could
    /// be read, and acks it. If the dead-letter publish fails, the message
    /// is returned to the queue (the broker dead-letters it at the limit).
    async fn dead_letter(&self, channel: &Channel, delivery: &Delivery, undecodable: Undecodable) {
        warn!(reason = %undecodable.reason, command_id = ?undecodable.command_id, "undecodable message: dead-lettering");
        // The event first: if it cannot be stored, the message goes back to
        // the queue and is handled again, rather than dead-lettered with its
        // event lost. Its id is derived from the command_id, so handling the
        // message twice stores it once.
        if let Some(event) = rejected_event(&undecodable) {
            if let Err(e) = self.lifecycle.store().append_rejected(&event).await {
                warn!(error = %e, "could not record the runtime.rejected event; returning the message to the queue");
                nack(delivery, true).await;
                return;
            }
            self.relay_wake.notify_one();
        }
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(
            crate::broker::REJECT_REASON_HEADER.into(),
            AMQPValue::LongString(LongString::from(undecodable.reason.as_str())),
        );
        let properties = delivery.properties.clone().with_headers(headers);
        let published = async {
            let confirm = channel
                .basic_publish(
                    self.amqp.dead_letter_exchange.as_str().into(),
                    delivery.routing_key.clone(),
                    BasicPublishOptions::default(),
                    &delivery.data,
                    properties,
                )
                .await?
                .await?;
            anyhow::ensure!(
                !matches!(confirm, Confirmation::Nack(_)),
                "the broker refused the dead letter"
            );
            Ok::<_, anyhow::Error>(())
        }
        .await;
        if let Err(e) = published {
            warn!(
                error = format!("{e:#}"),
                "could not dead-letter; returning the message to the queue"
            );
            nack(delivery, true).await;
            return;
        }
        metrics::counter!(telemetry::COMMANDS_DEAD_LETTERED).increment(1);
        if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
            warn!(error = %e, "ack of a dead-lettered message failed");
        }
    }
}

/// The namespace of `runtime.rejected` event ids (UUID v5 of the command_id).
const REJECTED_EVENTS: Uuid = Uuid::from_u128(0x5f1c_2a4e_9b7d_4c1a_8e3f_6d2b_0a9c_7e41);

/// The `runtime.rejected` event of an undecodable message whose command_id
/// could be read.
fn rejected_event(undecodable: &Undecodable) -> Option<OutcomeEvent> {
    let command_id = undecodable.command_id.clone()?;
    let now = Utc::now();
    Some(OutcomeEvent {
        event_id: Uuid::new_v5(&REJECTED_EVENTS, command_id.as_bytes()),
        schema_version: SCHEMA_VERSION,
        occurred_at: now,
        operation_id: None,
        correlation_id: undecodable
            .source_ref
            .clone()
            .unwrap_or_else(|| command_id.clone()),
        command_id,
        game_id: undecodable.game_id.clone().unwrap_or_default(),
        op: undecodable.op.clone(),
        outer_op: None,
        op_source: None,
        reason: None,
        outcome: Outcome::Failure,
        error_code: Some(ErrorCode::InvalidRequest),
        error_message: Some(undecodable.reason.clone()),
        image_ref: None,
        previous_image_ref: None,
        container_id: None,
        address: None,
        noop: false,
        rolled_back: false,
        started_at: now,
        finished_at: now,
    })
    .filter(|e| e.routing_key() == REJECTED_ROUTING_KEY)
}

/// Returns the message to the queue (`requeue`), or has the broker
/// dead-letter it. A failure means the channel is gone, which returns it
/// anyway.
async fn nack(delivery: &Delivery, requeue: bool) {
    let options = BasicNackOptions {
        requeue,
        ..BasicNackOptions::default()
    };
    if let Err(e) = delivery.acker.nack(options).await {
        debug!(error = %e, "nack failed; the channel is gone and the message returns");
    }
}

/// `x-delivery-count`, set by quorum queues on redeliveries (absent on the
/// first delivery).
fn delivery_count(props: &BasicProperties) -> u64 {
    let headers = props.headers().as_ref();
    match headers.and_then(|h| h.inner().get("x-delivery-count")) {
        Some(AMQPValue::LongLongInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongUInt(n)) => u64::from(*n),
        Some(AMQPValue::ShortInt(n)) => u64::try_from(*n).unwrap_or(0),
        Some(AMQPValue::ShortShortInt(n)) => u64::try_from(*n).unwrap_or(0),
        _ => 0,
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

impl From<&BasicProperties> for Envelope {
    fn from(props: &BasicProperties) -> Self {
        Envelope {
            message_id: props.message_id().as_ref().map(ToString::to_string),
            reply_to: props.reply_to().as_ref().map(ToString::to_string),
            correlation_id: props.correlation_id().as_ref().map(ToString::to_string),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn undecodable(command_id: Option<&str>) -> Undecodable {
        Undecodable {
            reason: "op \"explode\" is unknown".into(),
            command_id: command_id.map(str::to_owned),
            op: Some("explode".into()),
            game_id: Some("g-1".into()),
            source_ref: None,
        }
    }

    fn with_count(value: AMQPValue) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert("x-delivery-count".into(), value);
        BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn a_first_delivery_has_no_count() {
        assert_eq!(delivery_count(&BasicProperties::default()), 0, "no headers");
        let mut other = FieldTable::default();
        other.insert("x-death".into(), AMQPValue::LongLongInt(7));
        let props = BasicProperties::default().with_headers(other);
        assert_eq!(delivery_count(&props), 0, "headers, none of them the count");
    }

    #[test]
    fn the_count_is_read_whatever_integer_width_the_broker_picks() {
        // RabbitMQ sends a long (signed 64-bit) today; the narrower widths
        // are what an older broker or a shovel re-encoding it may send.
        for (value, expected) in [
            (AMQPValue::LongLongInt(3), 3),
            (AMQPValue::LongInt(4), 4),
            (AMQPValue::LongUInt(5), 5),
            (AMQPValue::ShortInt(6), 6),
            (AMQPValue::ShortShortInt(7), 7),
        ] {
            let shown = format!("{value:?}");
            assert_eq!(delivery_count(&with_count(value)), expected, "{shown}");
        }
    }

    #[test]
    fn a_count_that_is_no_count_reads_as_a_first_delivery() {
        // A negative or non-integer count cannot come from the broker; it is
        // not trusted to make this delivery the last one.
        for value in [
            AMQPValue::LongLongInt(-1),
            AMQPValue::LongInt(-2),
            AMQPValue::ShortInt(-3),
            AMQPValue::ShortShortInt(-4),
            AMQPValue::LongString(LongString::from("3")),
            AMQPValue::Boolean(true),
            AMQPValue::Double(3.0),
        ] {
            let shown = format!("{value:?}");
            assert_eq!(delivery_count(&with_count(value)), 0, "{shown}");
        }
    }

    #[test]
    fn a_rejected_event_is_the_same_event_each_time_it_is_handled() {
        let first = rejected_event(&undecodable(Some("c-7"))).unwrap();
        let again = rejected_event(&undecodable(Some("c-7"))).unwrap();
        assert_eq!(
            first.event_id, again.event_id,
            "stored once, however often handled"
        );
        assert_ne!(
            first.event_id,
            rejected_event(&undecodable(Some("c-8"))).unwrap().event_id
        );
        assert_eq!(first.routing_key(), "runtime.rejected");
        assert_eq!(first.correlation_id, "c-7");
        assert_eq!(first.error_code, Some(ErrorCode::InvalidRequest));
        assert!(
            rejected_event(&undecodable(None)).is_none(),
            "no command_id, no event"
        );
    }
}
