//! The outbox relay: publishes the outcome events written with their
//! operation-log entries, in write order, with publisher confirms and
//! `mandatory`, then marks them sent. A broker outage delays events, never
//! drops them.
//!
//! An event the broker refuses (`nack`, e.g. a queue at its length limit
//! with `reject-publish`) or returns unroutable stays unsent and is retried
//! with backoff; only the later events of its game wait behind it, every
//! other game's keep flowing (SPEC §6). A reply to `reply_to` is a courtesy:
//! one that fails is logged and counted, never retried.
//!
//! One relay publishes at a time across all workers, so per-game order
//! holds with any number of workers: leadership is a lease in PostgreSQL
//! (`relay_leader`, migration 0006), renewed on every pass and given up when
//! it runs out, so a dead or paused leader is replaced within
//! `LEADER_TTL`. A leader stops publishing once its own view of the lease
//! runs out, and its marks are fenced by `relay_leader`: a leader paused
//! past its lease neither publishes behind the relay that took over nor
//! marks late. Publishing is at-least-once: a crash between the confirm and
//! the mark republishes with the same `event_id`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use lapin::options::ConfirmSelectOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::broker::{self, Outgoing, PublishError};
use crate::config::{AmqpConfig, SecretUrl};
use crate::outbound::postgres::{PendingEvent, PgStore, Swept};
use crate::pauses::Pauses;
use crate::readiness::Readiness;
use crate::shutdown::Shutdown;
use crate::telemetry;

/// How long relay leadership lasts without renewal.
const LEADER_TTL: Duration = Duration::from_secs(10);
/// Events per round trip to the database.
const BATCH: i64 = 200;
/// How often the relay looks even without a wake-up (other workers' events,
/// retries after an outage).
const POLL: Duration = Duration::from_millis(500);

pub struct Relay {
    store: PgStore,
    url: SecretUrl,
    amqp: AmqpConfig,
    wake: Arc<Notify>,
    readiness: Arc<Readiness>,
    /// `RTM_RETENTION`: the leader sweeps what is older.
    retention: Duration,
}

/// How often the leading relay sweeps what `RTM_RETENTION` lets go.
const SWEEP_EVERY: Duration = Duration::from_secs(600);

/// This relay's claim to publish.
struct Leadership {
    holder: Uuid,
    /// Until when it may publish, by this process's clock.
    valid_until: Option<Instant>,
}

impl Leadership {
    fn holds(&self) -> bool {
        self.valid_until.is_some_and(|until| Instant::now() < until)
    }
}

/// A live publishing channel and the connection it lives on.
struct Link {
    _connection: Connection,
    channel: Channel,
}

impl Relay {
    pub fn new(
        store: PgStore,
        url: SecretUrl,
        amqp: AmqpConfig,
        wake: Arc<Notify>,
        readiness: Arc<Readiness>,
    ) -> Self {
        Self {
            store,
            url,
            amqp,
            wake,
            readiness,
            retention: Duration::from_secs(7 * 24 * 3600),
        }
    }

    /// Keeps finished inbox rows and published outbox rows for `retention`
    /// (default 7 days).
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// Sweeps, if this relay leads and the last sweep is `SWEEP_EVERY` old;
    /// a failed sweep is tried again next time, nothing else depends on it.
    async fn sweep_if_due(&self, leader: &Leadership, last: &mut Option<Instant>) {
        if !leader.holds() || last.is_some_and(|at| at.elapsed() < SWEEP_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        match self.store.sweep(self.retention).await {
            Ok(swept) if swept == Swept::default() => debug!("retention sweep: nothing to delete"),
            Ok(swept) => info!(
                inbox = swept.inbox,
                outbox = swept.outbox,
                fences = swept.fences,
                retention = ?self.retention,
                "retention sweep deleted old rows"
            ),
            Err(e) => warn!(error = %e, "retention sweep failed; trying again later"),
        }
    }

    /// Publishes until shutdown, then makes one last pass so the outcomes
    /// of the commands that just finished go out too.
    pub async fn run(self, mut shutdown: Shutdown) {
        let mut link: Option<Link> = None;
        let mut leader = Leadership {
            holder: Uuid::new_v4(),
            valid_until: None,
        };
        let mut failures = Pauses::new(POLL, Duration::from_secs(5));
        let mut refusals = Refusals::default();
        let mut swept: Option<Instant> = None;
        loop {
            let stopping = shutdown.is_set();
            let pause = match self.pass(&mut link, &mut leader, &mut refusals).await {
                Ok(()) => {
                    failures.reset();
                    self.sweep_if_due(&leader, &mut swept).await;
                    POLL
                }
                Err(e) => {
                    warn!(error = format!("{e:#}"), "outbox relay failed; retrying");
                    link = None;
                    failures.next_pause()
                }
            };
            if stopping {
                break;
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(pause) => {}
                () = shutdown.wait() => {}
            }
        }
        if let Some(link) = link {
            let _ = link.channel.close(200, "shutdown".into()).await;
        }
        // Hand over at once rather than after the TTL.
        if leader.valid_until.is_some() {
            let _ = self.store.resign_relay(leader.holder).await;
        }
    }

    /// Publishes everything unsent, if this relay leads. A game whose event
    /// the broker refuses is held back until its retry is due: its later
    /// events must not overtake the refused one.
    async fn pass(
        &self,
        link: &mut Option<Link>,
        leader: &mut Leadership,
        refusals: &mut Refusals,
    ) -> anyhow::Result<()> {
        if let Ok(backlog) = self.store.outbox_backlog().await {
            metrics::gauge!(telemetry::OUTBOX_BACKLOG).set(backlog as f64);
            if backlog == 0 {
                return Ok(());
            }
        }
        let mut held_back = refusals.not_due(Instant::now());
        loop {
            if !self.lead(leader).await? {
                return Ok(());
            }
            let pending = self.store.unsent_events_except(BATCH, &held_back).await?;
            if pending.is_empty() {
                return Ok(());
            }
            let channel = match link {
                Some(link) if link.channel.status().connected() => link.channel.clone(),
                _ => {
                    let fresh = self.connect().await?;
                    let channel = fresh.channel.clone();
                    *link = Some(fresh);
                    channel
                }
            };
            for event in &pending {
                if held_back.contains(&event.game_id) {
                    continue;
                }
                // A leader that was paused past its lease must not publish:
                // another relay may be on these rows already.
                if !leader.holds() {
                    return Ok(());
                }
                match self.publish(&channel, event).await? {
                    Published::Confirmed => refusals.cleared(&event.game_id),
                    Published::Refused(why) => {
                        warn!(
                            event_id = %event.event_id,
                            game_id = %event.game_id,
                            routing_key = %event.routing_key,
                            why,
                            "the broker refused an event; it and its game's later events wait for a retry"
                        );
                        metrics::counter!(telemetry::EVENTS_REFUSED).increment(1);
                        refusals.refused(&event.game_id);
                        held_back.push(event.game_id.clone());
                        continue;
                    }
                }
                if self
                    .store
                    .mark_sent_by(leader.holder, &[event.event_id])
                    .await?
                    == 0
                {
                    // Fenced: another relay took the lease while this one
                    // was publishing. It publishes from here on.
                    warn!("another worker's relay took over publishing the outbox");
                    leader.valid_until = None;
                    return Ok(());
                }
                metrics::counter!(telemetry::EVENTS_PUBLISHED).increment(1);
            }
        }
    }

    /// Takes or renews relay leadership; `false` while another relay
    /// holds it.
    async fn lead(&self, leader: &mut Leadership) -> anyhow::Result<bool> {
        let asked = Instant::now();
        let won = self
            .store
            .lead_relay(leader.holder, LEADER_TTL)
            .await
            .context("outbox relay: take or renew leadership")?;
        if won {
            if leader.valid_until.is_none() {
                info!("this worker's relay now publishes the outbox");
            }
            // Counted from when we asked, with a margin for clock drift.
            leader.valid_until = Some(asked + LEADER_TTL - LEADER_TTL / 5);
            Ok(true)
        } else {
            if leader.valid_until.take().is_some() {
                warn!("another worker's relay took over publishing the outbox");
            }
            Ok(false)
        }
    }

    async fn connect(&self) -> anyhow::Result<Link> {
        let connection = broker::connect(&self.url, "rtmanager relay").await?;
        let channel = connection.create_channel().await?;
        broker::declare_topology(&channel, &self.amqp).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Readiness::set(&self.readiness.broker, true);
        Ok(Link {
            _connection: connection,
            channel,
        })
    }

    /// Publishes one event and waits for the broker's confirm; once it is
    /// confirmed, its reply too (for a request/reply command). An error means
    /// the link failed.
    async fn publish(
        &self,
        channel: &Channel,
        pending: &PendingEvent,
    ) -> anyhow::Result<Published> {
        let body = serde_json::to_vec(&pending.payload).context("serialize an outcome event")?;
        let mut properties = BasicProperties::default()
            .with_message_id(ShortString::from(pending.event_id.to_string()))
            .with_type(short(&pending.routing_key)?)
            .with_content_type("application/json".into())
            .with_delivery_mode(broker::PERSISTENT);
        // The decoder caps correlation ids at 255 bytes; an older row that
        // does not fit still goes out, with the id in its body only.
        match ShortString::try_new(pending.correlation_id.as_str()) {
            Ok(id) => properties = properties.with_correlation_id(id),
            Err(e) => {
                warn!(event_id = %pending.event_id, error = %e, "correlation id too long for the AMQP property")
            }
        }
        if let Some(at) = pending.occurred_at() {
            properties = properties.with_timestamp(at.timestamp().max(0) as u64);
        }
        let event = Outgoing {
            exchange: &self.amqp.event_exchange,
            routing_key: short(&pending.routing_key)?,
            // Only events are `mandatory` (see `reply` for why not replies):
            // an unroutable one comes back instead of vanishing.
            mandatory: true,
            body: &body,
            properties: properties.clone(),
        };
        match broker::publish_confirmed(channel, event).await {
            Ok(()) => {}
            Err(PublishError::Nacked) => return Ok(Published::Refused("nack")),
            // Returned unroutable: no queue took it, so nobody has it yet.
            // SPEC §6 retries it like a nack.
            Err(PublishError::Returned) => return Ok(Published::Refused("returned unroutable")),
            // The link failed: the pass fails and the next one reconnects.
            Err(e @ (PublishError::Link(_) | PublishError::Unconfirmed)) => return Err(e.into()),
        }

        if let Some(queue) = &pending.reply_to
            && let Err(e) = self.reply(channel, queue, pending, &body, properties).await
        {
            warn!(event_id = %pending.event_id, reply_to = %queue, error = format!("{e:#}"), "reply not delivered (not retried)");
            metrics::counter!(telemetry::REPLIES_FAILED).increment(1);
        }
        Ok(Published::Confirmed)
    }

    /// Sends the outer event to the caller's `reply_to` queue; an error
    /// says why it did not arrive. Not `mandatory`: RabbitMQ reports a
    /// publish to a direct reply-to name (`amq.rabbitmq.reply-to.…`) as
    /// unroutable even when it delivers it, so a return would count
    /// delivered replies as failed; a reply to a missing queue is dropped
    /// unseen.
    async fn reply(
        &self,
        channel: &Channel,
        queue: &str,
        pending: &PendingEvent,
        body: &[u8],
        properties: BasicProperties,
    ) -> anyhow::Result<()> {
        let reply = match &pending.reply_correlation_id {
            Some(id) => properties.with_correlation_id(short(id)?),
            None => properties,
        };
        let reply = Outgoing {
            exchange: "",
            routing_key: short(queue)?,
            mandatory: false,
            body,
            properties: reply,
        };
        broker::publish_confirmed(channel, reply).await?;
        Ok(())
    }
}

/// The games whose oldest unsent event the broker refused, each with its
/// own backoff: a refused event is retried with growing pauses, however
/// often other games' events wake the relay.
#[derive(Default)]
struct Refusals(HashMap<String, (Pauses, Instant)>);

impl Refusals {
    /// The games whose retry is not due yet at `now`.
    fn not_due(&self, now: Instant) -> Vec<String> {
        self.0
            .iter()
            .filter(|(_, (_, due))| now < *due)
            .map(|(game, _)| game.clone())
            .collect()
    }

    fn refused(&mut self, game: &str) {
        let (pauses, due) = self
            .0
            .entry(game.to_owned())
            .or_insert_with(|| (Pauses::new(POLL, Duration::from_secs(5)), Instant::now()));
        *due = Instant::now() + pauses.next_pause();
    }

    /// The game's refused event went out.
    fn cleared(&mut self, game: &str) {
        self.0.remove(game);
    }
}

/// What the broker did with one event.
enum Published {
    Confirmed,
    Refused(&'static str),
}

/// An AMQP short string, or an error instead of lapin's panic.
fn short(s: &str) -> anyhow::Result<ShortString> {
    ShortString::try_new(s)
        .map_err(|e| anyhow::anyhow!("{s:?} does not fit an AMQP short string: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_game_waits_for_its_own_retry_and_is_cleared_once_through() {
        let mut refusals = Refusals::default();
        refusals.refused("a");
        let now = Instant::now();
        assert_eq!(refusals.not_due(now), ["a"], "held back right after");
        // The longest pause is 5 s plus as much again in jitter.
        assert!(refusals.not_due(now + Duration::from_secs(11)).is_empty());
        refusals.refused("b");
        refusals.cleared("a");
        assert_eq!(refusals.not_due(Instant::now()), ["b"]);
    }
}
