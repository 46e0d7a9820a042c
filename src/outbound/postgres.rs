//! The PostgreSQL adapter: runtime records, operation log, outbox, inbox and
//! fences (SPEC §7, §10), behind the [`RuntimeStore`] port.
//!
//! The schema lives in `migrations/` and explains itself there. This file
//! only speaks SQL: every query is a `&'static str` with bind parameters,
//! checked at run time (no `query!` macros, so the build needs no database).
//!
//! Errors: anything that smells of the connection (I/O, pool timeout, server
//! shutting down, resources exhausted) is [`StoreError::Unavailable`], which
//! the callers retry; anything else (a constraint the code should never
//! break, a row that does not decode) is [`StoreError::Corrupt`], which
//! retrying cannot fix.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Executor, PgPool};
use uuid::Uuid;

use crate::config::SecretUrl;
use crate::domain::{
    CommandRequest, ContainerId, GameId, ImageRef, OutcomeEvent, PriorEntry, RuntimeRecord,
    RuntimeState, RuntimeStatus, Step,
};
use crate::ports::{
    Fence, FenceView, InboxClaim, OperationWrite, Progress, Recorded, RuntimeStore, StoreError,
    WriteFence,
};

/// How long a query waits for a pooled connection (including connecting)
/// before it fails: an outage must surface as [`StoreError::Unavailable`],
/// which the callers retry with backoff, never as a hang.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections per worker. A command holds a connection only for one short
/// statement or transaction at a time, so fewer connections than
/// `RTM_PREFETCH` commands in flight suffice; the rest wait their turn.
pub const MAX_CONNECTIONS: u32 = 10;

/// The database every PostgreSQL server has; used to create ours.
const MAINTENANCE_DATABASE: &str = "postgres";

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

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
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The pool settings every `PgStore` is built with.
    pub fn pool_options() -> PgPoolOptions {
        PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
    }

    /// Connects to the database of `url`, creating the database first if it
    /// does not exist (SPEC §9). Errors name the URL without its password.
    pub async fn connect(url: &SecretUrl) -> anyhow::Result<PgStore> {
        let options: PgConnectOptions = url
            .expose()
            .parse()
            .with_context(|| format!("invalid database URL {url}"))?;
        match Self::pool_options().connect_with(options.clone()).await {
            Ok(pool) => return Ok(Self::new(pool)),
            // 3D000 invalid_catalog_name: the server is up, the database is not.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("3D000") => {}
            Err(e) => return Err(e).with_context(|| format!("connect to {url}")),
        }
        let name = options
            .get_database()
            .context("the database URL names no database")?
            .to_owned();
        create_database(&options, &name)
            .await
            .with_context(|| format!("create the database of {url}"))?;
        let pool = Self::pool_options()
            .connect_with(options)
            .await
            .with_context(|| format!("connect to {url}"))?;
        Ok(Self::new(pool))
    }

    /// Applies the migrations not yet applied (`migrations/`, embedded at
    /// build time). Safe to run from several workers at once: sqlx takes an
    /// advisory lock.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        sqlx::migrate!("./migrations")
            .run(&self.pool)
            .await
            .context("apply the database migrations")
    }

    /// A round trip to the server (`/readyz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("select 1")
            .execute(&self.pool)
            .await
            .map_err(|e| db_error("ping the database", e))?;
        Ok(())
    }

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
        let done = sqlx::query(
            "update outbox
             set sent_at = case when pending_replays = 0 then now() end,
                 pending_replays = greatest(pending_replays - 1, 0)
             where event_id = any($1) and sent_at is null
               and ($2::uuid is null
                    or exists (select 1 from relay_leader where holder = $2))",
        )
        .bind(event_ids)
        .bind(holder)
        .execute(&self.pool)
        .await
        .map_err(|e| db_error("mark outbox events sent", e))?;
        Ok(done.rows_affected())
    }

    /// How many events wait for the relay (a metric and a readiness hint).
    pub async fn outbox_backlog(&self) -> Result<i64, StoreError> {
        sqlx::query_scalar("select count(*) from outbox where sent_at is null")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| db_error("count unsent outbox events", e))
    }

    /// A game's operation history, newest first, as the events written with
    /// each entry; only the entries of `correlation_id` when given.
    pub async fn history(
        &self,
        game_id: &str,
        correlation_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<OutcomeEvent>, StoreError> {
        // Two statements rather than one with `($2 is null or …)`, so each
        // one uses its own index (game history / correlation id).
        let query = match correlation_id {
            None => sqlx::query_as(
                "select o.event_id, o.payload
                 from operation_log l
                 join outbox o on o.operation_id = l.operation_id
                 where l.game_id = $1
                 order by l.operation_id desc
                 limit $2",
            )
            .bind(game_id)
            .bind(limit),
            Some(correlation_id) => sqlx::query_as(
                "select o.event_id, o.payload
                 from operation_log l
                 join outbox o on o.operation_id = l.operation_id
                 where l.correlation_id = $3 and l.game_id = $1
                 order by l.operation_id desc
                 limit $2",
            )
            .bind(game_id)
            .bind(limit)
            .bind(correlation_id),
        };
        let rows: Vec<(Uuid, serde_json::Value)> = query
            .fetch_all(&self.pool)
            .await
            .map_err(|e| db_error("read the operation history", e))?;
        rows.into_iter()
            .map(|(event_id, payload)| decode_event(event_id, payload))
            .collect()
    }
}

impl RuntimeStore for PgStore {
    async fn progress(&self, command_id: &str) -> Result<Progress, StoreError> {
        let events: Vec<(Uuid, serde_json::Value)> = sqlx::query_as(
            "select o.event_id, o.payload
             from operation_log l join outbox o on o.operation_id = l.operation_id
             where l.command_id = $1
             order by l.operation_id",
        )
        .bind(command_id)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_error("read the command's earlier entries", e))?;
        let steps: Vec<(String, Option<serde_json::Value>)> =
            sqlx::query_as("select step, detail from operation_journal where command_id = $1")
                .bind(command_id)
                .fetch_all(&self.pool)
                .await
                .map_err(|e| db_error("read the operation journal", e))?;
        Ok(Progress {
            entries: events
                .into_iter()
                .map(|(id, payload)| {
                    PriorEntry::from_event(&decode_event(id, payload)?).map_err(|e| {
                        StoreError::Corrupt(format!("outbox event {id} is not an entry: {e}"))
                    })
                })
                .collect::<Result<_, _>>()?,
            steps: steps
                .into_iter()
                .map(|(step, detail)| {
                    Step::from_stored(&step, detail.unwrap_or(serde_json::Value::Null))
                        .map_err(|e| StoreError::Corrupt(e.to_string()))
                })
                .collect::<Result<_, _>>()?,
        })
    }

    async fn journal(
        &self,
        game_id: &GameId,
        fence: Fence,
        command_id: &str,
        step: &Step,
    ) -> Result<(), StoreError> {
        // Written only while `fence` is the game's: the fence row is locked
        // `for share` for the statement, as `append` does for its commit.
        let written = sqlx::query(
            "insert into operation_journal (command_id, step, detail)
             select $1, $2, $3
             where (select fence from game_fences where game_id = $4 for share) = $5
             on conflict (command_id, step)
                 do update set detail = excluded.detail, done_at = now()",
        )
        .bind(command_id)
        .bind(step.name())
        .bind(Json(step.detail()))
        .bind(game_id.as_str())
        .bind(fence.0)
        .execute(&self.pool)
        .await
        .map_err(|e| db_error("journal an operation step", e))?;
        if written.rows_affected() == 0 {
            return Err(StoreError::FenceLost(fence.0));
        }
        Ok(())
    }

    async fn append_rejected(&self, event: &OutcomeEvent) -> Result<(), StoreError> {
        sqlx::query(
            "insert into outbox (event_id, game_id, routing_key, correlation_id, payload)
             values ($1, $2, $3, $4, $5)
             on conflict (event_id) do nothing",
        )
        .bind(event.event_id)
        .bind(&event.game_id)
        .bind(event.routing_key())
        .bind(&event.correlation_id)
        .bind(Json(event))
        .execute(&self.pool)
        .await
        .map_err(|e| db_error("store a runtime.rejected event", e))?;
        Ok(())
    }

    async fn republish(&self, event_id: Uuid) -> Result<(), StoreError> {
        // One more publication owed, same event_id, with its original seq
        // (ahead of anything newer). See migration 0005.
        sqlx::query(
            // Already sent: one publication is owed again. Still unsent: one
            // more on top of the one pending. (SET sees the old `sent_at`.)
            "update outbox
             set pending_replays = pending_replays + (case when sent_at is null then 1 else 0 end),
                 sent_at = null
             where event_id = $1",
        )
        .bind(event_id)
        .execute(&self.pool)
        .await
        .map_err(|e| db_error("queue an event for republishing", e))?;
        Ok(())
    }

    async fn claim(&self, request: &CommandRequest) -> Result<InboxClaim, StoreError> {
        let (reply_to, reply_correlation_id) = match &request.reply_to {
            Some(r) => (Some(r.queue.as_str()), r.correlation_id.as_deref()),
            None => (None, None),
        };
        // The primary key decides: whoever inserts the row owns the command.
        // A concurrent claim of the same id waits for the inserting
        // statement, then inserts nothing.
        let inserted = sqlx::query(
            "insert into inbox (command_id, game_id, op, reply_to, reply_correlation_id)
             values ($1, $2, $3, $4, $5)
             on conflict (command_id) do nothing",
        )
        .bind(&request.command_id)
        .bind(request.game_id.as_deref().unwrap_or_default())
        .bind(request.op.as_str())
        .bind(reply_to)
        .bind(reply_correlation_id)
        .execute(&self.pool)
        .await
        .map_err(|e| db_error("claim the command in the inbox", e))?;
        if inserted.rows_affected() == 1 {
            return Ok(InboxClaim::Fresh);
        }

        // `outcome_event_id` is set exactly when the command finished (a
        // check constraint), and the foreign key keeps its event.
        let row: Option<(Option<Uuid>, Option<serde_json::Value>)> = sqlx::query_as(
            "select i.outcome_event_id, o.payload
             from inbox i
             left join outbox o on o.event_id = i.outcome_event_id
             where i.command_id = $1",
        )
        .bind(&request.command_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| db_error("read the inbox", e))?;
        match row {
            Some((None, _)) => Ok(InboxClaim::Unfinished),
            Some((Some(event_id), Some(payload))) => {
                Ok(InboxClaim::Finished(decode_event(event_id, payload)?))
            }
            Some((Some(event_id), None)) => Err(StoreError::Corrupt(format!(
                "command {:?} finished with outcome event {event_id}, which is not in the outbox",
                request.command_id
            ))),
            // Inbox rows are never deleted by the manager.
            None => Err(StoreError::Corrupt(format!(
                "inbox row of command {:?} vanished while it was claimed",
                request.command_id
            ))),
        }
    }

    async fn load(&self, game_id: &GameId) -> Result<Option<RuntimeRecord>, StoreError> {
        let row: Option<RecordRow> = sqlx::query_as(
            "select status, current_image_ref, current_container_id, address, state_dir,
                    fence, created_at, updated_at
             from runtime_records
             where game_id = $1",
        )
        .bind(game_id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| db_error("load the runtime record", e))?;
        row.map(|row| row.into_record(game_id)).transpose()
    }

    async fn advance_fence(&self, game_id: &GameId, command_id: &str) -> Result<Fence, StoreError> {
        // One statement, so two workers racing for the same game each get a
        // distinct, larger number; the row lock it takes also waits for any
        // `append` holding the row `for share` (see `append`).
        let fence: i64 = sqlx::query_scalar(
            "insert into game_fences (game_id, fence, command_id) values ($1, 1, $2)
             on conflict (game_id) do update
                 set fence = game_fences.fence + 1, command_id = excluded.command_id
             returning fence",
        )
        .bind(game_id.as_str())
        .bind(command_id)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| db_error("advance the game's fence", e))?;
        Ok(Fence(fence))
    }

    async fn observe_fence(&self, game_id: &GameId) -> Result<FenceView, StoreError> {
        let read = || async {
            sqlx::query_as::<_, (i64, Option<String>)>(
                "select fence, command_id from game_fences where game_id = $1",
            )
            .bind(game_id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| db_error("read the game's fence", e))
        };
        let row = match read().await? {
            Some(row) => row,
            None => {
                // Created at 0 when missing: the `for share` check of a
                // `Seen` write needs a row to lock, or a first
                // `advance_fence` could insert one between that check and
                // the commit.
                sqlx::query(
                    "insert into game_fences (game_id, fence) values ($1, 0)
                     on conflict (game_id) do nothing",
                )
                .bind(game_id.as_str())
                .execute(&self.pool)
                .await
                .map_err(|e| db_error("create the game's fence", e))?;
                read().await?.ok_or_else(|| {
                    StoreError::Corrupt(format!("the fence row of game {game_id} vanished"))
                })?
            }
        };
        Ok(FenceView {
            fence: Fence(row.0),
            taken_by: row.1,
        })
    }

    async fn append(&self, write: OperationWrite, event_id: Uuid) -> Result<Recorded, StoreError> {
        let OperationWrite {
            entry,
            fence,
            record,
        } = write;
        if let Some(record) = &record
            && record.game_id.as_str() != entry.game_id
        {
            return Err(StoreError::Corrupt(format!(
                "an entry of game {:?} carries a record update of game {:?}",
                entry.game_id,
                record.game_id.as_str()
            )));
        }
        let state_dir = record
            .as_ref()
            .map(|r| path_text(&r.state_dir))
            .transpose()?;

        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| db_error("begin the append transaction", e))?;

        // A retry of a write whose COMMIT went through but whose reply was
        // lost: the event id is fixed per write, so it finds its own row.
        if let Some((Some(operation_id), event)) = stored_outcome(&mut tx, event_id).await? {
            return Ok(Recorded {
                operation_id,
                event,
                answered_before: false,
            });
        }

        if record.is_some() && !matches!(fence, WriteFence::Held(_)) {
            return Err(StoreError::Corrupt(format!(
                "an entry of game {:?} changes the record without holding the lease",
                entry.game_id
            )));
        }
        if let Some(Fence(expected)) = fence.expected() {
            // The fence check must hold until commit, not just at the moment
            // it is read: `for share` locks the game's fence row for the rest
            // of this transaction, and `advance_fence` (an upsert, which needs
            // a conflicting row lock) waits until we commit or roll back. So
            // either our writes commit before the newer fence exists, or we
            // read the newer fence here and write nothing; a plain select
            // would let a newer operation take the fence and write between
            // our check and our commit, and we would overwrite its record.
            let current: Option<i64> =
                sqlx::query_scalar("select fence from game_fences where game_id = $1 for share")
                    .bind(&entry.game_id)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(|e| db_error("check the game's fence", e))?;
            if current != Some(expected) {
                // Dropping `tx` rolls back; say so explicitly all the same.
                tx.rollback().await.ok();
                return Err(StoreError::FenceLost(expected));
            }
        }

        // An answer given without the lease (a refusal, an invalid request)
        // stands only if no other attempt of the command answered it first:
        // two copies refused at once give one outcome. The inbox row is
        // locked after the fence row, in the order every append takes them.
        if entry.is_outer() && fence.held().is_none() {
            // Locked by itself: a join would, after waiting for the lock,
            // still miss an outbox row committed by the attempt it waited for.
            let answered: Option<Option<Uuid>> = sqlx::query_scalar(
                "select outcome_event_id from inbox where command_id = $1 for update",
            )
            .bind(&entry.command_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| db_error("check whether the command was answered", e))?;
            if let Some(Some(event_id)) = answered {
                // The inbox's foreign key keeps its outcome in the outbox.
                let (operation_id, event) =
                    stored_outcome(&mut tx, event_id).await?.ok_or_else(|| {
                        StoreError::Corrupt(format!(
                            "outcome event {event_id} is not in the outbox"
                        ))
                    })?;
                tx.rollback().await.ok();
                return Ok(Recorded {
                    operation_id: operation_id.unwrap_or_default(),
                    event,
                    answered_before: true,
                });
            }
        }

        let operation_id: i64 = sqlx::query_scalar(
            "insert into operation_log (
                 game_id, op, outer_op, op_source, reason, correlation_id, command_id,
                 image_ref, previous_image_ref, container_id, address,
                 outcome, error_code, error_message, noop, rolled_back,
                 started_at, finished_at, fence)
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                     $17, $18, $19)
             returning operation_id",
        )
        .bind(&entry.game_id)
        .bind(entry.op.as_str())
        .bind(entry.outer_op.map(|o| o.as_str()))
        .bind(&entry.op_source)
        .bind(entry.reason.as_deref())
        .bind(&entry.correlation_id)
        .bind(&entry.command_id)
        .bind(entry.image_ref.as_deref())
        .bind(entry.previous_image_ref.as_deref())
        .bind(entry.container_id.as_deref())
        .bind(entry.address.as_deref())
        .bind(entry.result.outcome().as_str())
        .bind(entry.result.error_code().map(|c| c.as_str()))
        .bind(entry.result.error_message())
        .bind(entry.result.noop())
        .bind(entry.rolled_back)
        .bind(entry.started_at)
        .bind(entry.finished_at)
        .bind(fence.held().map(|f| f.0))
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| db_error("append to the operation log", e))?;

        let event = OutcomeEvent::from_entry(&entry, operation_id, event_id);

        // Only the outer event answers a request/reply caller.
        let (reply_to, reply_correlation_id) = if entry.is_outer() {
            sqlx::query_as::<_, (Option<String>, Option<String>)>(
                "select reply_to, reply_correlation_id from inbox where command_id = $1",
            )
            .bind(&entry.command_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| db_error("read the command's reply address", e))?
            .unwrap_or_default()
        } else {
            (None, None)
        };

        sqlx::query(
            "insert into outbox (event_id, operation_id, game_id, routing_key, correlation_id,
                                 payload, reply_to, reply_correlation_id)
             values ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(event_id)
        .bind(operation_id)
        .bind(&entry.game_id)
        .bind(event.routing_key())
        .bind(&entry.correlation_id)
        .bind(Json(&event))
        .bind(reply_to)
        .bind(reply_correlation_id)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_error("store the outcome event in the outbox", e))?;

        if let (Some(record), Some(state_dir)) = (&record, &state_dir) {
            sqlx::query(
                "insert into runtime_records (game_id, status, current_image_ref,
                     current_container_id, address, state_dir, fence)
                 values ($1, $2, $3, $4, $5, $6, coalesce($7, 0))
                 on conflict (game_id) do update set
                     status = excluded.status,
                     current_image_ref = excluded.current_image_ref,
                     current_container_id = excluded.current_container_id,
                     address = excluded.address,
                     state_dir = excluded.state_dir,
                     fence = coalesce($7, runtime_records.fence),
                     updated_at = now()",
            )
            .bind(record.game_id.as_str())
            .bind(record.state.status().as_str())
            .bind(record.image_ref.as_str())
            .bind(record.state.container_id().map(ContainerId::as_str))
            .bind(record.state.address())
            .bind(state_dir)
            .bind(fence.held().map(|f| f.0))
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error("write the runtime record", e))?;
        }

        if entry.is_outer() {
            // Normally the row was claimed when the command arrived; an
            // outer entry of a command that never went through the inbox
            // (the services driven directly, by tests or tools) creates it,
            // so its outcome can be found by command_id all the same.
            sqlx::query(
                "insert into inbox (command_id, game_id, op, finished_at, outcome_event_id)
                 values ($1, $2, $3, now(), $4)
                 on conflict (command_id) do update set
                     finished_at = now(),
                     outcome_event_id = excluded.outcome_event_id
                 -- The first outcome stands: a duplicate gets that one.
                 where inbox.outcome_event_id is null",
            )
            .bind(&entry.command_id)
            .bind(&entry.game_id)
            .bind(entry.op.as_str())
            .bind(event_id)
            .execute(&mut *tx)
            .await
            .map_err(|e| db_error("mark the command finished in the inbox", e))?;
        }

        tx.commit()
            .await
            .map_err(|e| db_error("commit the append transaction", e))?;
        Ok(Recorded {
            operation_id,
            event,
            answered_before: false,
        })
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

/// A `runtime_records` row as stored, before it is checked.
#[derive(sqlx::FromRow)]
struct RecordRow {
    status: String,
    current_image_ref: String,
    current_container_id: Option<String>,
    address: Option<String>,
    state_dir: String,
    fence: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl RecordRow {
    fn into_record(self, game_id: &GameId) -> Result<RuntimeRecord, StoreError> {
        let corrupt = |what: String| {
            StoreError::Corrupt(format!(
                "runtime record for game {:?} {what}",
                game_id.as_str()
            ))
        };
        if self.current_image_ref.is_empty() {
            return Err(corrupt("has no current image_ref".into()));
        }
        let image_ref = ImageRef::parse(&self.current_image_ref)
            .map_err(|e| corrupt(format!("has an invalid current image_ref: {e}")))?;
        let container_id = self.current_container_id.map(ContainerId);
        let state = match RuntimeStatus::parse(&self.status) {
            Some(RuntimeStatus::Running) => RuntimeState::Running {
                container_id: container_id
                    .ok_or_else(|| corrupt("is running without a container id".into()))?,
                address: self.address,
            },
            Some(RuntimeStatus::Stopped) => RuntimeState::Stopped { container_id },
            Some(RuntimeStatus::Removed) => RuntimeState::Removed,
            None => return Err(corrupt(format!("has an unknown status {:?}", self.status))),
        };
        Ok(RuntimeRecord {
            game_id: game_id.clone(),
            image_ref,
            state,
            state_dir: PathBuf::from(self.state_dir),
            fence: self.fence,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

/// Creates `name` through the maintenance database of the same server. A
/// concurrent creator (another worker starting) is not an error.
async fn create_database(options: &PgConnectOptions, name: &str) -> anyhow::Result<()> {
    let mut conn = options
        .clone()
        .database(MAINTENANCE_DATABASE)
        .connect()
        .await
        .with_context(|| format!("connect to the {MAINTENANCE_DATABASE:?} database"))?;
    let exists: bool =
        sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
            .bind(name)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        // An identifier cannot be a bind parameter; quote it the SQL way
        // (double any `"`), which makes any name safe to splice in.
        let quoted = format!(r#""{}""#, name.replace('"', r#""""#));
        let created = conn
            .execute(AssertSqlSafe(format!("create database {quoted}")))
            .await;
        match created {
            Ok(_) => tracing::info!(database = name, "created the database"),
            // 42P04 duplicate_database; 23505 when two creators race inside
            // the catalog itself.
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("42P04" | "23505")) => {}
            Err(e) => return Err(e.into()),
        }
    }
    conn.close().await.ok();
    Ok(())
}

/// Maps a sqlx error: connection trouble is `Unavailable` (retry), the rest
/// `Corrupt` (a bug or a hand edit; retrying will not help).
fn db_error(doing: &str, error: sqlx::Error) -> StoreError {
    let message = format!("{doing}: {error}");
    match &error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => StoreError::Unavailable(message),
        sqlx::Error::Database(e) => {
            // SQLSTATE classes: 08 connection exception, 40 transaction
            // rollback (serialization failure, deadlock), 53 insufficient
            // resources, 57 operator intervention (shutdown, statement
            // timeout), 58 system error. All are worth a retry.
            let class = e.code().map(|c| c.chars().take(2).collect::<String>());
            match class.as_deref() {
                Some("08" | "40" | "53" | "57" | "58") => StoreError::Unavailable(message),
                _ => StoreError::Corrupt(message),
            }
        }
        _ => StoreError::Corrupt(message),
    }
}

/// An event stored in the outbox, with the id of the entry it reports
/// (none for a rejected message's event).
async fn stored_outcome(
    conn: &mut sqlx::PgConnection,
    event_id: Uuid,
) -> Result<Option<(Option<i64>, OutcomeEvent)>, StoreError> {
    let row: Option<(Option<i64>, serde_json::Value)> =
        sqlx::query_as("select operation_id, payload from outbox where event_id = $1")
            .bind(event_id)
            .fetch_optional(conn)
            .await
            .map_err(|e| db_error("read a stored outcome event", e))?;
    row.map(|(operation_id, payload)| Ok((operation_id, decode_event(event_id, payload)?)))
        .transpose()
}

/// An outbox payload back as the event it was written from.
fn decode_event(event_id: Uuid, payload: serde_json::Value) -> Result<OutcomeEvent, StoreError> {
    serde_json::from_value(payload).map_err(|e| {
        StoreError::Corrupt(format!(
            "outbox event {event_id} does not decode as an outcome event: {e}"
        ))
    })
}

/// State directories come from `RTM_STATE_ROOT` and a `GameId`, so they are
/// UTF-8; anything else would not survive a round trip through `text`.
fn path_text(path: &Path) -> Result<&str, StoreError> {
    path.to_str().ok_or_else(|| {
        StoreError::Corrupt(format!("state directory {} is not UTF-8", path.display()))
    })
}
