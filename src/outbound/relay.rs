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
//! Events go out in waves ([`Relay::publish_batch`]): a wave sends the
//! next event of every game in the batch at once, then waits for all their
//! confirms, so games share round trips while one game's events still
//! leave one after another; the batch's confirmed rows are marked sent in
//! one statement. Under load, passes are at least [`GATHER`] apart, so one
//! read and one mark serve the events of several commands; a pass ends
//! with a short read rather than an empty one.
//!
//! Wake-ups: the store notifies its worker's relay after every outbox
//! write, so an inner event leaves as soon as its entry commits, not when
//! its command ends. A follower (a relay that does not lead) passes each
//! such wake-up on to the leader, wherever it runs, with one `NOTIFY
//! rtm_outbox` in a statement of its own (at most one in flight; the leader
//! `LISTEN`s), so the events of a worker that does not relay wait for no
//! poll either. Not from inside the writes: NOTIFY takes a database-wide
//! lock through its transaction's commit, which serialized every commit.
//!
//! One relay publishes at a time across all workers, so per-game order
//! holds with any number of workers: leadership is a lease in PostgreSQL
//! (`relay_leader`, migration 0006), renewed once half its TTL is gone and given up when
//! it runs out, so a dead or paused leader is replaced within
//! `LEADER_TTL`. A leader stops publishing once its own view of the lease
//! runs out, and its marks are fenced by `relay_leader`: a leader paused
//! past its lease neither publishes behind the relay that took over nor
//! marks late. Publishing is at-least-once: a crash between the confirm and
//! the mark republishes with the same `event_id`.

use std::collections::{HashMap, VecDeque};
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
use crate::ports::StoreError;
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
/// The least time from the end of a pass that published to the start of
/// the next. Under load every command's commit wakes the relay: passing at
/// each wake-up read and marked about one event per round trip, and the
/// relay's own statements outnumbered a command's. Waiting this long lets
/// the events of a millisecond share one read and one mark; an event that
/// arrives after a quiet spell still leaves at once.
const GATHER: Duration = Duration::from_millis(2);

pub struct Relay {
    store: PgStore,
    url: SecretUrl,
    amqp: AmqpConfig,
    /// Notified by this worker's store after each outbox write.
    wake: Arc<Notify>,
    readiness: Arc<Readiness>,
    /// `RTM_RETENTION`: the leader sweeps what is older.
    retention: Duration,
    /// How often it looks without a wake-up.
    poll: Duration,
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

    /// Held with more than half its time left: no renewal needed yet (a
    /// renewal on every pass was a round trip per event).
    fn fresh(&self) -> bool {
        self.valid_until
            .is_some_and(|until| Instant::now() + LEADER_TTL / 2 < until)
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
            poll: POLL,
        }
    }

    /// Looks every `poll` without a wake-up (default 500 ms): for tests
    /// that must tell a wake-up from a poll.
    pub fn with_poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
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
        // Followers' wake-ups, kept apart from this worker's own: a follower
        // passes only its own on, or two followers would wake each other
        // forever.
        let heard = Arc::new(Notify::new());
        let listening = tokio::spawn(listen(self.store.clone(), heard.clone(), shutdown.clone()));
        loop {
            let stopping = shutdown.is_set();
            let (pause, published) = match self.pass(&mut link, &mut leader, &mut refusals).await {
                Ok(published) => {
                    failures.reset();
                    self.sweep_if_due(&leader, &mut swept).await;
                    (self.poll, published)
                }
                Err(e) => {
                    warn!(error = format!("{e:#}"), "outbox relay failed; retrying");
                    link = None;
                    (failures.next_pause(), false)
                }
            };
            if stopping {
                break;
            }
            let passed = Instant::now();
            self.wait(&leader, &heard, pause, &mut shutdown).await;
            if published && !shutdown.is_set() {
                tokio::time::sleep_until(passed + GATHER).await;
            }
        }
        listening.abort();
        if let Some(link) = link {
            let _ = link.channel.close(200, "shutdown".into()).await;
        }
        // Hand over at once rather than after the TTL.
        if leader.valid_until.is_some() {
            let _ = self.store.resign_relay(leader.holder).await;
        }
    }

    /// Waits for the next pass: a wake-up if this relay leads, else `pause`.
    /// A follower passes its own worker's wake-ups on to the leader and
    /// still makes its pass every `pause`, to take over from a leader that
    /// died.
    async fn wait(
        &self,
        leader: &Leadership,
        heard: &Notify,
        pause: Duration,
        shutdown: &mut Shutdown,
    ) {
        let next_pass = Instant::now() + pause;
        loop {
            let leading = leader.holds();
            tokio::select! {
                () = self.wake.notified() => {
                    if leading {
                        return;
                    }
                    if let Err(e) = self.store.wake_leader().await {
                        debug!(error = %e, "could not wake the leading relay; it polls");
                    }
                }
                () = heard.notified(), if leading => return,
                () = tokio::time::sleep_until(next_pass) => return,
                () = shutdown.wait() => return,
            }
        }
    }

    /// Publishes everything unsent, if this relay leads; `true` when it
    /// published anything. A game whose event the broker refuses is held
    /// back until its retry is due: its later events must not overtake the
    /// refused one. A read that returns less than a full batch ends the
    /// pass: what was written after it woke the relay, which passes again.
    async fn pass(
        &self,
        link: &mut Option<Link>,
        leader: &mut Leadership,
        refusals: &mut Refusals,
    ) -> anyhow::Result<bool> {
        let mut held_back = refusals.not_due(Instant::now());
        let mut published = false;
        loop {
            if !self.lead(leader).await? {
                return Ok(published);
            }
            let pending = self.store.unsent_events_except(BATCH, &held_back).await?;
            // A full count only when the batch does not say it all.
            let backlog = match pending.len() as i64 {
                n if n < BATCH => n,
                _ => self.store.outbox_backlog().await.unwrap_or(BATCH),
            };
            metrics::gauge!(telemetry::OUTBOX_BACKLOG).set(backlog as f64);
            if pending.is_empty() {
                return Ok(published);
            }
            let full = pending.len() as i64 >= BATCH;
            let channel = match link {
                Some(link) if link.channel.status().connected() => link.channel.clone(),
                _ => {
                    let fresh = self.connect().await?;
                    let channel = fresh.channel.clone();
                    *link = Some(fresh);
                    channel
                }
            };
            let batch = self
                .publish_batch(&channel, &pending, leader, refusals, &mut held_back)
                .await;
            // What the broker confirmed is marked even when the link failed
            // part-way: it would otherwise go out twice.
            if !batch.confirmed.is_empty() {
                let marked = self
                    .store
                    .mark_sent_by(leader.holder, &batch.confirmed)
                    .await?;
                if marked == 0 {
                    // Fenced: another relay took the lease while this one
                    // was publishing. It publishes from here on.
                    warn!("another worker's relay took over publishing the outbox");
                    leader.valid_until = None;
                    return Ok(published);
                }
                published = true;
                metrics::counter!(telemetry::EVENTS_PUBLISHED).increment(marked);
            }
            if let Some(e) = batch.failed {
                return Err(e);
            }
            // A refused event's game is held back, and the rest of its batch
            // went out: read again only if the batch could not hold it all.
            if !leader.holds() || !full {
                return Ok(published);
            }
        }
    }

    /// Publishes `pending` (in publish order), skipping the games in
    /// `held_back`, in waves: each wave sends the next event of every game
    /// at once, then waits for their confirms. A game's later event is
    /// never sent before its earlier one is confirmed, so a refused event
    /// (added to `held_back`) holds back only its own game's later ones and
    /// none of them has overtaken it. Stops at a failed link, or once this
    /// relay's view of its lease runs out (another relay may be on these
    /// rows already).
    async fn publish_batch(
        &self,
        channel: &Channel,
        pending: &[PendingEvent],
        leader: &Leadership,
        refusals: &mut Refusals,
        held_back: &mut Vec<String>,
    ) -> Batch {
        let mut games: Vec<VecDeque<&PendingEvent>> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        for event in pending {
            if held_back.contains(&event.game_id) {
                continue;
            }
            let slot = *index.entry(event.game_id.as_str()).or_insert_with(|| {
                games.push(VecDeque::new());
                games.len() - 1
            });
            games[slot].push_back(event);
        }
        let mut batch = Batch::default();
        loop {
            let wave: Vec<(usize, &PendingEvent)> = games
                .iter_mut()
                .enumerate()
                .filter_map(|(slot, queue)| Some((slot, queue.pop_front()?)))
                .collect();
            if wave.is_empty() || !leader.holds() {
                return batch;
            }
            match self.publish_wave(channel, &wave).await {
                Ok(answers) => {
                    let mut replies = Vec::new();
                    for ((slot, event), answer) in wave.into_iter().zip(answers) {
                        match answer {
                            Published::Confirmed => {
                                refusals.cleared(&event.game_id);
                                batch.confirmed.push(event.event_id);
                                if event.reply_to.is_some() {
                                    replies.push(event);
                                }
                            }
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
                                games[slot].clear();
                            }
                        }
                    }
                    self.reply_all(channel, &replies).await;
                }
                Err(e) => {
                    batch.failed = Some(e);
                    return batch;
                }
            }
        }
    }

    /// Sends every event of `wave`, then waits for each one's confirm. An
    /// error means the link failed: what it did with the wave is unknown.
    async fn publish_wave(
        &self,
        channel: &Channel,
        wave: &[(usize, &PendingEvent)],
    ) -> anyhow::Result<Vec<Published>> {
        let mut sent = Vec::with_capacity(wave.len());
        for (_, pending) in wave {
            let (body, properties) = message(pending)?;
            let event = Outgoing {
                exchange: &self.amqp.event_exchange,
                routing_key: short(&pending.routing_key)?,
                // Only events are `mandatory` (see `reply_all` for why not
                // replies): an unroutable one comes back instead of
                // vanishing.
                mandatory: true,
                body: &body,
                properties,
            };
            sent.push(broker::publish(channel, event).await?);
        }
        let mut answers = Vec::with_capacity(sent.len());
        for confirm in sent {
            answers.push(match broker::confirmed(confirm).await {
                Ok(()) => Published::Confirmed,
                Err(PublishError::Nacked) => Published::Refused("nack"),
                // Returned unroutable: no queue took it, so nobody has it
                // yet. SPEC §6 retries it like a nack.
                Err(PublishError::Returned) => Published::Refused("returned unroutable"),
                // The link failed: the pass fails and the next one
                // reconnects.
                Err(e @ (PublishError::Link(_) | PublishError::Unconfirmed)) => {
                    return Err(e.into());
                }
            });
        }
        Ok(answers)
    }

    /// Takes or renews relay leadership; `false` while another relay
    /// holds it.
    async fn lead(&self, leader: &mut Leadership) -> anyhow::Result<bool> {
        if leader.fresh() {
            return Ok(true);
        }
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

    /// Sends each confirmed outer event of a request/reply command to its
    /// caller's `reply_to` queue, all at once. A reply is a courtesy: one
    /// that does not arrive is logged and counted, never retried. Not
    /// `mandatory`: RabbitMQ reports a publish to a direct reply-to name
    /// (`amq.rabbitmq.reply-to.…`) as unroutable even when it delivers it,
    /// so a return would count delivered replies as failed; a reply to a
    /// missing queue is dropped unseen.
    async fn reply_all(&self, channel: &Channel, events: &[&PendingEvent]) {
        let mut sent = Vec::with_capacity(events.len());
        for pending in events {
            let Some(queue) = &pending.reply_to else {
                continue;
            };
            let result = async {
                let (body, properties) = message(pending)?;
                let properties = match &pending.reply_correlation_id {
                    Some(id) => properties.with_correlation_id(short(id)?),
                    None => properties,
                };
                let reply = Outgoing {
                    exchange: "",
                    routing_key: short(queue)?,
                    mandatory: false,
                    body: &body,
                    properties,
                };
                anyhow::Ok(broker::publish(channel, reply).await?)
            }
            .await;
            sent.push((pending, queue, result));
        }
        for (pending, queue, result) in sent {
            let delivered = match result {
                Ok(confirm) => broker::confirmed(confirm)
                    .await
                    .map_err(anyhow::Error::from),
                Err(e) => Err(e),
            };
            if let Err(e) = delivered {
                warn!(event_id = %pending.event_id, reply_to = %queue, error = format!("{e:#}"), "reply not delivered (not retried)");
                metrics::counter!(telemetry::REPLIES_FAILED).increment(1);
            }
        }
    }
}

/// What one pass's batch came to: the events the broker confirmed, and the
/// link failure that cut it short, if any.
#[derive(Default)]
struct Batch {
    confirmed: Vec<Uuid>,
    failed: Option<anyhow::Error>,
}

/// An event's body and AMQP properties, as every copy of it is published.
fn message(pending: &PendingEvent) -> anyhow::Result<(Vec<u8>, BasicProperties)> {
    let body = serde_json::to_vec(&pending.payload).context("serialize an outcome event")?;
    let mut properties = BasicProperties::default()
        .with_message_id(ShortString::from(pending.event_id.to_string()))
        .with_type(short(&pending.routing_key)?)
        .with_content_type("application/json".into())
        .with_delivery_mode(broker::PERSISTENT);
    // The decoder caps correlation ids at 255 bytes; an older row that does
    // not fit still goes out, with the id in its body only.
    match ShortString::try_new(pending.correlation_id.as_str()) {
        Ok(id) => properties = properties.with_correlation_id(id),
        Err(e) => {
            warn!(event_id = %pending.event_id, error = %e, "correlation id too long for the AMQP property")
        }
    }
    if let Some(at) = pending.occurred_at() {
        properties = properties.with_timestamp(at.timestamp().max(0) as u64);
    }
    Ok((body, properties))
}

/// Notifies `heard` whenever a follower wakes the leading relay: listens on
/// PostgreSQL's `rtm_outbox` channel. Reconnects on its own; while it
/// cannot listen, the relay's poll still finds everything.
async fn listen(store: PgStore, wake: Arc<Notify>, mut shutdown: Shutdown) {
    let mut pauses = Pauses::new(POLL, Duration::from_secs(5));
    while !shutdown.is_set() {
        let listening = async {
            let mut listener = store.listener().await?;
            pauses.reset();
            loop {
                // `None`: the connection dropped (it reconnects on the next
                // call), so what was written meanwhile is looked for now too.
                listener
                    .try_recv()
                    .await
                    .map_err(|e| StoreError::Unavailable(e.to_string()))?;
                wake.notify_one();
            }
        };
        let failed: Result<std::convert::Infallible, StoreError> = tokio::select! {
            failed = listening => failed,
            () = shutdown.wait() => return,
        };
        let Err(e) = failed;
        debug!(error = %e, "cannot listen for outbox events; polling meanwhile");
        tokio::select! {
            () = tokio::time::sleep(pauses.next_pause()) => {}
            () = shutdown.wait() => return,
        }
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
