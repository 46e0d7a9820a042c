//! The AMQP side of the consumer: one session per connection (declare,
//! consume), reconnects whenever the broker goes away, the drain at
//! shutdown, and [`settle`](Consumer::settle), the one place a delivery is
//! acked or nacked.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use tracing::{debug, error, info, warn};

use super::attempt::{DeadLetterReason, Decision};
use super::{Consumer, dead_letter};
use crate::broker;
use crate::pauses::Pauses;
use crate::readiness::Readiness;
use crate::shutdown::{STOPPING_GRACE, Shutdown};
use crate::telemetry;

/// Reconnects after the broker went away: from half a second up to 5 s
/// (the relay's too), so a returning broker is found within seconds.
fn reconnect_pauses() -> Pauses {
    Pauses::new(Duration::from_millis(500), Duration::from_secs(5))
}

impl Consumer {
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
        let drained = this.in_flight.acquire_many(permits);
        tokio::pin!(drained);
        if tokio::time::timeout(drain_timeout, &mut drained)
            .await
            .is_ok()
        {
            info!("all commands in flight finished");
        } else {
            // Their time is up: each stops before its next Docker step and
            // releases its lease once the call in flight returns, never
            // before (another worker could take the game mid-call). A call
            // that does not return in time leaves its lease to expire.
            warn!(
                ?drain_timeout,
                "commands still in flight at the shutdown timeout: stopping them before their next Docker step; they will be redelivered"
            );
            this.handler.stop_operations();
            if tokio::time::timeout(STOPPING_GRACE, &mut drained)
                .await
                .is_err()
            {
                warn!(
                    grace = ?STOPPING_GRACE,
                    "a Docker call in flight did not return; exiting with its lease held (it expires within RTM_LEASE_TTL)"
                );
            }
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
        // The broker may deliver twice as many commands as run at once: the
        // other half waits in lanes behind busy games without holding a slot,
        // so `RTM_PREFETCH` commands queued for one slow game still leave
        // room for a delivery of another game's (SPEC §10).
        channel
            .basic_qos(
                broker_prefetch(self.amqp.prefetch),
                BasicQosOptions::default(),
            )
            .await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        // This node's queue beside the shared one (SPEC §12): commands
        // forwarded here, and those for this node's games that waited here
        // while it was down.
        broker::declare_node_queue(&channel, &self.amqp, &self.node).await?;
        let node_queue = &self.node_queue;
        let mut consumers = Vec::with_capacity(2);
        for queue in [self.amqp.command_queue.as_str(), node_queue.as_str()] {
            consumers.push(
                channel
                    .basic_consume(
                        queue.into(),
                        "".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await?,
            );
        }
        let tags: Vec<_> = consumers.iter().map(|c| c.tag()).collect();
        // Each consumer's stream ends with a `None` of its own: the broker
        // cancelling either (its queue deleted) ends the session, which
        // reconnects and declares both again, rather than going on with one.
        let mut stream = futures_util::stream::select_all(
            consumers
                .into_iter()
                .map(|c| c.map(Some).chain(futures_util::stream::iter([None]))),
        );
        Readiness::set(&self.readiness.broker, true);
        pauses.reset();
        info!(queue = %self.amqp.command_queue, %node_queue, prefetch = self.amqp.prefetch, "consuming commands");
        loop {
            tokio::select! {
                () = shutdown.wait() => {
                    // Stop taking new messages; the channel stays open so the
                    // commands in flight can still ack.
                    for tag in tags {
                        if let Err(e) = channel.basic_cancel(tag, Default::default()).await {
                            debug!(error = %e, "cancel the consumer");
                        }
                    }
                    return Ok((conn, channel));
                }
                next = stream.next() => match next {
                    None | Some(None) => anyhow::bail!("the broker cancelled a consumer"),
                    Some(Some(Err(e))) => return Err(e.into()),
                    Some(Some(Ok(delivery))) => self.clone().dispatch(&channel, delivery),
                }
            }
        }
    }

    /// Carries out `decision` on `delivery`: the only place a delivery is
    /// acked or nacked. A failed ack or nack means the channel is gone,
    /// which returns the message anyway (and the inbox answers it as a
    /// duplicate if it was done).
    pub(super) async fn settle(&self, channel: &Channel, delivery: &Delivery, decision: Decision) {
        // `None` acks; `Some(requeue)` nacks.
        let nack = match decision {
            Decision::Leave => return,
            Decision::Ack => None,
            Decision::Requeue => Some(true),
            Decision::DeadLetter(DeadLetterReason::Undecodable(reason)) => {
                let exchange = self.amqp.dead_letter_exchange.as_str();
                if !dead_letter::copy_until_confirmed(
                    channel,
                    exchange,
                    delivery,
                    &reason,
                    &self.shutdown,
                )
                .await
                {
                    debug!(
                        "not dead-lettered before shutdown or the channel closed; it comes back"
                    );
                    return;
                }
                metrics::counter!(telemetry::COMMANDS_DEAD_LETTERED).increment(1);
                None
            }
            Decision::DeadLetter(DeadLetterReason::Unrecordable(why)) => {
                // The broker dead-letters it (reason `rejected`) for an
                // operator.
                error!(error = %why, "command cannot be recorded; dead-lettering it");
                metrics::counter!(telemetry::COMMANDS_DEAD_LETTERED).increment(1);
                Some(false)
            }
        };
        let settled = match nack {
            None => delivery.acker.ack(BasicAckOptions::default()).await,
            Some(requeue) => {
                let options = BasicNackOptions {
                    requeue,
                    ..BasicNackOptions::default()
                };
                delivery.acker.nack(options).await
            }
        };
        match settled {
            Ok(_) => debug!(?nack, "settled"),
            Err(e) => {
                warn!(error = %e, "ack or nack failed; the channel is gone and the message comes back (a finished command is answered as a duplicate)")
            }
        }
    }
}

/// Unacked deliveries the broker may hand this worker: its in-flight slots
/// (`RTM_PREFETCH`), as many waiting behind busy games, and one more, so
/// that even with one slot a command queued behind a busy game leaves room
/// for another game's.
pub(super) fn broker_prefetch(slots: u16) -> u16 {
    slots.saturating_mul(2).saturating_add(1)
}

/// `x-delivery-count`, set by quorum queues on redeliveries (absent on the
/// first delivery).
pub(super) fn delivery_count(props: &BasicProperties) -> u64 {
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

#[cfg(test)]
mod tests {
    use lapin::types::LongString;

    use super::*;

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
}
