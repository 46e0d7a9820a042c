//! The relay's side of the outbox: the unsent events in publish order,
//! marking them sent, the backlog, and the relay's leadership lease
//! (`relay_leader`, migration 0006).

use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use sqlx::postgres::PgListener;

use super::{PgStore, db_error};

/// The notification channel a follower wakes the leading relay on.
const OUTBOX_CHANNEL: &str = "rtm_outbox";
use crate::ports::StoreError;

/// An outbox event waiting for the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingEvent {
    /// Publish order (per game, the order the entries were written).
    pub seq: i64,
    pub event_id: Uuid,
    /// The game whose order it keeps (as sent, for a rejected message).
    pub game_id: String,
    /// The event as stored, published without being decoded: an event this
    /// build cannot read (a newer worker's, with an error code added since,
    /// during a rolling upgrade) still goes out instead of stopping the
    /// relay at that row, and every game's events behind it.
    pub payload: serde_json::Value,
    pub correlation_id: String,
    pub routing_key: String,
    /// For an outer event of a request/reply command: the caller's queue.
    pub reply_to: Option<String>,
    /// The AMQP `correlation_id` the caller asked to get back.
    pub reply_correlation_id: Option<String>,
}

impl PendingEvent {
    /// When the event happened, as its payload says (`None` if it does not
    /// say so readably: the AMQP timestamp is then left out).
    pub fn occurred_at(&self) -> Option<DateTime<Utc>> {
        let text = self.payload.get("occurred_at")?.as_str()?;
        DateTime::parse_from_rfc3339(text)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

impl PgStore {
    /// The oldest `limit` events not yet confirmed by the broker, in publish
    /// order.
    pub async fn unsent_events(&self, limit: i64) -> Result<Vec<PendingEvent>, StoreError> {
        self.unsent_events_except(limit, &[]).await
    }

    /// Like [`unsent_events`](Self::unsent_events), leaving out the games
    /// in `held_back` (the relay's games whose oldest event the broker just
    /// refused: theirs wait, the others' keep flowing).
    pub async fn unsent_events_except(
        &self,
        limit: i64,
        held_back: &[String],
    ) -> Result<Vec<PendingEvent>, StoreError> {
        let rows: Vec<UnsentRow> = sqlx::query_as(
            "select seq, event_id, game_id, payload, correlation_id, routing_key, reply_to,
                    reply_correlation_id
             from outbox
             where sent_at is null and game_id <> all($2)
             order by seq
             limit $1",
        )
        .bind(limit)
        .bind(held_back)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_error("read unsent outbox events", e))?;
        Ok(rows
            .into_iter()
            .map(|row| PendingEvent {
                seq: row.seq,
                event_id: row.event_id,
                game_id: row.game_id,
                payload: row.payload,
                correlation_id: row.correlation_id,
                routing_key: row.routing_key,
                reply_to: row.reply_to,
                reply_correlation_id: row.reply_correlation_id,
            })
            .collect())
    }

    /// Records confirmed publications: each consumes the original
    /// publication or one pending replay (a duplicate's), and an event is
    /// sent once none is left. Returns how many events are now sent.
    pub async fn mark_sent(&self, event_ids: &[Uuid]) -> Result<u64, StoreError> {
        self.mark(None, event_ids).await
    }

    /// [`mark_sent`](Self::mark_sent) by the relay `holder`, only while
    /// `relay_leader` still names it: a leader paused between a publish and
    /// its mark, whose lease another relay took meanwhile, must not consume
    /// a publication owed since (a duplicate's replay queued after that
    /// relay sent the event). Refused, the event is simply published again
    /// by whoever leads. Returns how many rows it changed (0 when refused).
    pub async fn mark_sent_by(&self, holder: Uuid, event_ids: &[Uuid]) -> Result<u64, StoreError> {
        self.mark(Some(holder), event_ids).await
    }

    async fn mark(&self, holder: Option<Uuid>, event_ids: &[Uuid]) -> Result<u64, StoreError> {
        if event_ids.is_empty() {
            return Ok(0);
        }
        // `rtm_mark_sent` (migration 0014): its commit does not wait for
        // the WAL flush; a mark lost in a crash only republishes.
        let marked: i64 = sqlx::query_scalar("select rtm_mark_sent($1, $2)")
            .bind(event_ids)
            .bind(holder)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| db_error("mark outbox events sent", e))?;
        Ok(u64::try_from(marked).unwrap_or_default())
    }

    /// How many events wait for the relay (a metric and a readiness hint).
    pub async fn outbox_backlog(&self) -> Result<i64, StoreError> {
        sqlx::query_scalar("select count(*) from outbox where sent_at is null")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| db_error("count unsent outbox events", e))
    }

    /// Wakes the leading relay, wherever it runs (`NOTIFY rtm_outbox`): a
    /// follower's worker wrote events. A statement of its own, never part
    /// of a write: NOTIFY takes a database-wide lock held through its
    /// transaction's commit, so in every write it serialized all commits.
    pub async fn wake_leader(&self) -> Result<(), StoreError> {
        sqlx::query("select pg_notify($1, '')")
            .bind(OUTBOX_CHANNEL)
            .execute(&self.pool)
            .await
            .map_err(|e| db_error("wake the leading relay", e))?;
        Ok(())
    }

    /// A connection listening on `rtm_outbox`, where followers wake the
    /// leader ([`wake_leader`](Self::wake_leader)). It holds one of the
    /// pool's connections for as long as it lives.
    pub async fn listener(&self) -> Result<PgListener, StoreError> {
        let mut listener = PgListener::connect_with(&self.pool)
            .await
            .map_err(|e| db_error("listen for outbox events", e))?;
        listener
            .listen(OUTBOX_CHANNEL)
            .await
            .map_err(|e| db_error("listen for outbox events", e))?;
        Ok(listener)
    }

    /// Takes or renews relay leadership for `holder`, for `ttl`: `true`
    /// once it holds it, `false` while another relay does.
    pub async fn lead_relay(&self, holder: Uuid, ttl: Duration) -> Result<bool, StoreError> {
        let won: Option<Uuid> = sqlx::query_scalar(
            "insert into relay_leader (id, holder, expires_at)
             values (true, $1, now() + make_interval(secs => $2))
             on conflict (id) do update
                 set holder = excluded.holder, expires_at = excluded.expires_at
                 where relay_leader.holder = excluded.holder
                    or relay_leader.expires_at < now()
             returning holder",
        )
        .bind(holder)
        .bind(ttl.as_secs_f64())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| db_error("take or renew relay leadership", e))?;
        Ok(won.is_some())
    }

    /// Gives up `holder`'s relay leadership, so another relay takes over at
    /// once rather than after the lease runs out.
    pub async fn resign_relay(&self, holder: Uuid) -> Result<(), StoreError> {
        sqlx::query("delete from relay_leader where holder = $1")
            .bind(holder)
            .execute(&self.pool)
            .await
            .map_err(|e| db_error("give up relay leadership", e))?;
        Ok(())
    }
}

/// An unsent `outbox` row.
#[derive(sqlx::FromRow)]
struct UnsentRow {
    seq: i64,
    event_id: Uuid,
    game_id: String,
    payload: serde_json::Value,
    correlation_id: String,
    routing_key: String,
    reply_to: Option<String>,
    reply_correlation_id: Option<String>,
}
