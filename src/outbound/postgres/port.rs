//! The [`RuntimeStore`] port: what the lifecycle reads and writes.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::types::Json;
use uuid::Uuid;

use super::{PgStore, batch, db_error, decode_event, path_text, reply_columns};
use crate::domain::{
    CommandRequest, ContainerId, GameId, ImageRef, NodeName, OperationEntry, OutcomeEvent,
    PriorEntry, RecordUpdate, RuntimeRecord, RuntimeState, RuntimeStatus, Step,
};
use crate::ports::{
    Admission, Answers, Begun, Fence, FenceView, InboxClaim, OperationWrite, Peeked, Progress,
    Recorded, Route, RuntimeStore, StoreError, WriteFence,
};

impl RuntimeStore for PgStore {
    async fn progress(&self, command_id: &str) -> Result<Progress, StoreError> {
        // `invalid_request` is answered before any lease, so it is never a
        // step of a run; leaving it out keeps the answer to a message that
        // reused this command_id (SPEC §6) out of the command's progress.
        let events: Vec<(Uuid, serde_json::Value)> = sqlx::query_as(
            "select o.event_id, o.payload
             from operation_log l join outbox o on o.operation_id = l.operation_id
             where l.command_id = $1
               and l.error_code is distinct from 'invalid_request'
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
        stored_progress(events, steps)
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
        let mut event = event.clone();
        event.node = self.node().map(ToString::to_string);
        let event = &event;
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
        self.written.notify_one();
        Ok(())
    }

    async fn route(&self, request: &CommandRequest) -> Result<Route, StoreError> {
        self.route_request(request).await
    }

    async fn records_in(&self, status: RuntimeStatus) -> Result<Vec<RuntimeRecord>, StoreError> {
        let rows: Vec<NamedRecordRow> = sqlx::query_as(
            "select game_id, status, current_image_ref, current_container_id, address,
                    state_dir, fence, created_at, updated_at
             from runtime_records
             where status = $1 and ($2::text is null or node = $2)",
        )
        .bind(status.as_str())
        // A worker looks only at its own node's games (SPEC §12): another
        // node's engine is not its to compare with.
        .bind(self.node().map(NodeName::as_str))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_error("list the records by status", e))?;
        Ok(rows
            .into_iter()
            .filter_map(|NamedRecordRow { game_id, row }| {
                let game_id = GameId::parse(&game_id).ok()?;
                row.into_record(&game_id).ok()
            })
            .collect())
    }

    async fn last_exit(&self, game_id: &GameId) -> Result<Option<OutcomeEvent>, StoreError> {
        PgStore::last_exit(self, game_id.as_str()).await
    }

    async fn auto_restarts_since(
        &self,
        game_id: &GameId,
        since: DateTime<Utc>,
    ) -> Result<u32, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "select count(*) from operation_log
             where game_id = $1 and op = 'restart' and outer_op is null
               and op_source = 'reconciler' and started_at >= $2",
        )
        .bind(game_id.as_str())
        .bind(since)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| db_error("count the automatic restarts", e))?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
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
        self.written.notify_one();
        Ok(())
    }

    async fn lookup(&self, request: &CommandRequest) -> Result<InboxClaim, StoreError> {
        let row: Option<InboxRow> = sqlx::query_as(
            "select i.fingerprint, i.op, i.game_id, i.outcome_event_id, o.payload
             from inbox i
             left join outbox o on o.event_id = i.outcome_event_id
             where i.command_id = $1",
        )
        .bind(&request.command_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| db_error("read the inbox", e))?;
        row.map_or(Ok(InboxClaim::Fresh), |row| row.claim(request))
    }

    async fn claim(&self, request: &CommandRequest) -> Result<InboxClaim, StoreError> {
        let (reply_to, reply_correlation_id) = reply_columns(request);
        // The primary key decides: whoever inserts the row owns the command.
        // A concurrent claim of the same id waits for the inserting
        // statement, then inserts nothing.
        let fingerprint = request.fingerprint();
        let inserted = sqlx::query(
            "insert into inbox (command_id, game_id, op, reply_to, reply_correlation_id,
                                fingerprint)
             values ($1, $2, $3, $4, $5, $6)
             on conflict (command_id) do nothing",
        )
        .bind(&request.command_id)
        .bind(request.game_id.as_deref().unwrap_or_default())
        .bind(request.op.as_str())
        .bind(reply_to)
        .bind(reply_correlation_id)
        .bind(&fingerprint)
        .execute(&self.pool)
        .await
        .map_err(|e| db_error("claim the command in the inbox", e))?;
        if inserted.rows_affected() == 1 {
            return Ok(InboxClaim::Fresh);
        }

        // Claimed by another: what it left. Its row is there (inbox rows are
        // deleted only by the retention sweep, long after).
        match self.lookup(request).await? {
            InboxClaim::Fresh => Err(InboxRow::vanished(request)),
            claim => Ok(claim),
        }
    }

    async fn admit(&self, request: &CommandRequest) -> Result<Admission, StoreError> {
        self.admit_request(request).await
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

    async fn peek(&self, game_id: &GameId, command_id: &str) -> Result<Peeked, StoreError> {
        // A read: no commit to wait for, and not batched.
        let Json(row): Json<PeekRow> = sqlx::query_scalar("select rtm_peek($1, $2)")
            .bind(game_id.as_str())
            .bind(command_id)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| db_error("read the game before taking its fence", e))?;
        Ok(Peeked {
            fence: Fence(row.fence),
            settled: row.settled,
            progress: row.progress,
            record: readable_record(row.record, game_id)?,
        })
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
            answers,
        } = write;
        if record.is_some() && !matches!(fence, WriteFence::Held(_)) {
            return Err(StoreError::Corrupt(format!(
                "an entry of game {:?} changes the record without holding the lease",
                entry.game_id
            )));
        }
        // Only a command's own answer goes in (and is checked against) its
        // inbox row; a reused command_id's answer stands on its own. An
        // answer given without the lease stands only if no other attempt of
        // the command answered it first: two copies refused at once give one
        // outcome.
        let answers_inbox = entry.is_outer() && answers == Answers::Command;
        let check_answered = answers_inbox && fence.held().is_none();
        // Only the outer event answers a request/reply caller.
        let (reply_from_inbox, reply_to, reply_correlation_id) = match &answers {
            _ if !entry.is_outer() => (false, None, None),
            Answers::Command => (true, None, None),
            Answers::Reuse { reply_to } => (
                false,
                reply_to.as_ref().map(|r| r.queue.clone()),
                reply_to.as_ref().and_then(|r| r.correlation_id.clone()),
            ),
        };
        let record = record
            .map(|record| checked_record(record, &entry))
            .transpose()?;
        // The event as it will be stored; the database sets its
        // operation_id, which the log insert makes.
        let mut event = OutcomeEvent::from_entry(&entry, 0, event_id);
        event.node = self.node().map(ToString::to_string);
        let result = &entry.result;
        let call = AppendCall {
            event_id,
            expected_fence: fence.expected().map(|f| f.0),
            held_fence: fence.held().map(|f| f.0),
            check_answered,
            answers_inbox,
            reply_from_inbox,
            reply_to,
            reply_correlation_id,
            game_id: entry.game_id.clone(),
            op: entry.op.as_str(),
            outer_op: entry.outer_op.map(|o| o.as_str()),
            op_source: entry.op_source.clone(),
            reason: entry.reason.clone(),
            correlation_id: entry.correlation_id.clone(),
            command_id: entry.command_id.clone(),
            image_ref: entry.image_ref.clone(),
            previous_image_ref: entry.previous_image_ref.clone(),
            container_id: entry.container_id.clone(),
            address: entry.address.clone(),
            outcome: result.outcome().as_str(),
            error_code: result.error_code().map(|c| c.as_str()),
            error_message: result.error_message().map(str::to_owned),
            noop: result.noop(),
            rolled_back: entry.rolled_back,
            started_at: entry.started_at,
            finished_at: entry.finished_at,
            routing_key: event.routing_key(),
            payload: serde_json::to_string(&event).map_err(|e| {
                StoreError::Corrupt(format!("event {event_id} does not encode: {e}"))
            })?,
            record_status: record.as_ref().map(|(r, _)| r.state.status().as_str()),
            record_image_ref: record.as_ref().map(|(r, _)| r.image_ref.to_string()),
            record_container_id: record
                .as_ref()
                .and_then(|(r, _)| r.state.container_id().map(|c| c.as_str().to_owned())),
            record_address: record
                .as_ref()
                .and_then(|(r, _)| r.state.address().map(str::to_owned)),
            record_state_dir: record.map(|(_, dir)| dir),
            take_fence: matches!(fence, WriteFence::Take(_)),
        };
        let answer = self.batches().append.call(call).await?;
        match answer {
            AppendAnswer::Appended { operation_id } => {
                self.written.notify_one();
                event.operation_id = Some(operation_id);
                Ok(Recorded {
                    operation_id,
                    event,
                    answered_before: false,
                })
            }
            AppendAnswer::Stored {
                operation_id,
                payload,
            } => Ok(Recorded {
                operation_id,
                event: decode_event(event_id, payload)?,
                answered_before: false,
            }),
            AppendAnswer::FenceLost => {
                Err(StoreError::FenceLost(fence.expected().map_or(0, |f| f.0)))
            }
            AppendAnswer::Answered {
                event_id: answered,
                operation_id,
                payload,
            } => {
                // The inbox's foreign key keeps its outcome in the outbox.
                let payload = payload.ok_or_else(|| {
                    StoreError::Corrupt(format!("outcome event {answered} is not in the outbox"))
                })?;
                Ok(Recorded {
                    operation_id: operation_id.unwrap_or_default(),
                    event: decode_event(answered, payload)?,
                    answered_before: true,
                })
            }
        }
    }

    async fn begin(&self, game_id: &GameId, request: &CommandRequest) -> Result<Begun, StoreError> {
        let (reply_to, reply_correlation_id) = reply_columns(request);
        let call = BeginCall {
            game_id: game_id.to_string(),
            command_id: request.command_id.clone(),
            claim_game_id: request.game_id.clone().unwrap_or_default(),
            op: request.op.as_str(),
            reply_to: reply_to.map(str::to_owned),
            reply_correlation_id: reply_correlation_id.map(str::to_owned),
            fingerprint: request.fingerprint(),
        };
        let begun = self.batches().begin.call(call).await?;
        let BegunRow {
            fence,
            claimed,
            inbox,
            entries,
            steps,
            record,
        } = begun;
        let claim = InboxRow::claim_made(claimed, inbox, request)?;
        Ok(Begun {
            fence: Fence(fence),
            claim,
            progress: stored_progress(entries, steps)?,
            record: readable_record(record, game_id)?,
        })
    }
}

/// One `rtm_append` call's arguments, owned, for its batch.
pub(super) struct AppendCall {
    event_id: Uuid,
    expected_fence: Option<i64>,
    held_fence: Option<i64>,
    check_answered: bool,
    answers_inbox: bool,
    reply_from_inbox: bool,
    reply_to: Option<String>,
    reply_correlation_id: Option<String>,
    game_id: String,
    op: &'static str,
    outer_op: Option<&'static str>,
    op_source: String,
    reason: Option<String>,
    correlation_id: String,
    command_id: String,
    image_ref: Option<String>,
    previous_image_ref: Option<String>,
    container_id: Option<String>,
    address: Option<String>,
    outcome: &'static str,
    error_code: Option<&'static str>,
    error_message: Option<String>,
    noop: bool,
    rolled_back: bool,
    started_at: DateTime<Utc>,
    finished_at: DateTime<Utc>,
    routing_key: String,
    /// The event's JSON, which the function stores with its operation_id.
    payload: String,
    record_status: Option<&'static str>,
    record_image_ref: Option<String>,
    record_container_id: Option<String>,
    record_address: Option<String>,
    record_state_dir: Option<String>,
    /// `WriteFence::Take`: the write takes the fence after `expected_fence`.
    take_fence: bool,
}

/// One `rtm_begin` call's arguments, owned, for its batch.
pub(super) struct BeginCall {
    game_id: String,
    command_id: String,
    claim_game_id: String,
    op: &'static str,
    reply_to: Option<String>,
    reply_correlation_id: Option<String>,
    fingerprint: String,
}

/// A batch of `append` calls: one row of each array per call.
const APPEND_MANY: &str =
    "select rtm_append(a.event_id, a.expected_fence, a.held_fence, a.check_answered,
                  a.answers_inbox, a.reply_from_inbox, a.reply_to,
                  a.reply_correlation_id, a.game_id, a.op, a.outer_op,
                  a.op_source, a.reason, a.correlation_id, a.command_id,
                  a.image_ref, a.previous_image_ref, a.container_id, a.address,
                  a.outcome, a.error_code, a.error_message, a.noop,
                  a.rolled_back, a.started_at, a.finished_at, a.routing_key,
                  a.payload::jsonb, a.record_status, a.record_image_ref,
                  a.record_container_id, a.record_address, a.record_state_dir,
                  a.take_fence)
from unnest($1::uuid[], $2::int8[], $3::int8[], $4::bool[], $5::bool[],
            $6::bool[], $7::text[], $8::text[], $9::text[], $10::text[],
            $11::text[], $12::text[], $13::text[], $14::text[], $15::text[],
            $16::text[], $17::text[], $18::text[], $19::text[], $20::text[],
            $21::text[], $22::text[], $23::bool[], $24::bool[],
            $25::timestamptz[], $26::timestamptz[], $27::text[], $28::text[],
            $29::text[], $30::text[], $31::text[], $32::text[], $33::text[],
            $34::bool[])
     as a(event_id, expected_fence, held_fence, check_answered, answers_inbox,
          reply_from_inbox, reply_to, reply_correlation_id, game_id, op,
          outer_op, op_source, reason, correlation_id, command_id, image_ref,
          previous_image_ref, container_id, address, outcome, error_code,
          error_message, noop, rolled_back, started_at, finished_at,
          routing_key, payload, record_status, record_image_ref,
          record_container_id, record_address, record_state_dir, take_fence)";

/// The same for a batch of one: the arrays' first elements, without the
/// `unnest` scan, which is work for nothing when calls come one at a time
/// (a quiet worker, or one busy game's commands).
const APPEND_ONE: &str =
    "select rtm_append(($1::uuid[])[1], ($2::int8[])[1], ($3::int8[])[1], ($4::bool[])[1],
                  ($5::bool[])[1], ($6::bool[])[1], ($7::text[])[1], ($8::text[])[1],
                  ($9::text[])[1], ($10::text[])[1], ($11::text[])[1],
                  ($12::text[])[1], ($13::text[])[1], ($14::text[])[1],
                  ($15::text[])[1], ($16::text[])[1], ($17::text[])[1],
                  ($18::text[])[1], ($19::text[])[1], ($20::text[])[1],
                  ($21::text[])[1], ($22::text[])[1], ($23::bool[])[1],
                  ($24::bool[])[1], ($25::timestamptz[])[1], ($26::timestamptz[])[1],
                  ($27::text[])[1], ($28::text[])[1]::jsonb, ($29::text[])[1],
                  ($30::text[])[1], ($31::text[])[1], ($32::text[])[1],
                  ($33::text[])[1], ($34::bool[])[1])";

/// Makes a batch of `rtm_append` calls in one statement (see [`batch`]).
pub(super) async fn append_batch(
    pool: &PgPool,
    calls: Vec<AppendCall>,
) -> Vec<Result<AppendAnswer, StoreError>> {
    batch::in_key_order(
        calls,
        |c| c.game_id.clone(),
        |calls| {
            let calls = calls.as_slice();
            // Built before the future, which so borrows nothing of `calls`.
            let query = sqlx::query_scalar::<_, Json<AppendAnswer>>(if calls.len() == 1 {
                APPEND_ONE
            } else {
                APPEND_MANY
            })
            .bind(batch::column(calls, |c| c.event_id))
            .bind(batch::column(calls, |c| c.expected_fence))
            .bind(batch::column(calls, |c| c.held_fence))
            .bind(batch::column(calls, |c| c.check_answered))
            .bind(batch::column(calls, |c| c.answers_inbox))
            .bind(batch::column(calls, |c| c.reply_from_inbox))
            .bind(batch::column(calls, |c| c.reply_to.clone()))
            .bind(batch::column(calls, |c| c.reply_correlation_id.clone()))
            .bind(batch::column(calls, |c| c.game_id.clone()))
            .bind(batch::column(calls, |c| c.op))
            .bind(batch::column(calls, |c| c.outer_op))
            .bind(batch::column(calls, |c| c.op_source.clone()))
            .bind(batch::column(calls, |c| c.reason.clone()))
            .bind(batch::column(calls, |c| c.correlation_id.clone()))
            .bind(batch::column(calls, |c| c.command_id.clone()))
            .bind(batch::column(calls, |c| c.image_ref.clone()))
            .bind(batch::column(calls, |c| c.previous_image_ref.clone()))
            .bind(batch::column(calls, |c| c.container_id.clone()))
            .bind(batch::column(calls, |c| c.address.clone()))
            .bind(batch::column(calls, |c| c.outcome))
            .bind(batch::column(calls, |c| c.error_code))
            .bind(batch::column(calls, |c| c.error_message.clone()))
            .bind(batch::column(calls, |c| c.noop))
            .bind(batch::column(calls, |c| c.rolled_back))
            .bind(batch::column(calls, |c| c.started_at))
            .bind(batch::column(calls, |c| c.finished_at))
            .bind(batch::column(calls, |c| c.routing_key.clone()))
            .bind(batch::column(calls, |c| c.payload.clone()))
            .bind(batch::column(calls, |c| c.record_status))
            .bind(batch::column(calls, |c| c.record_image_ref.clone()))
            .bind(batch::column(calls, |c| c.record_container_id.clone()))
            .bind(batch::column(calls, |c| c.record_address.clone()))
            .bind(batch::column(calls, |c| c.record_state_dir.clone()))
            .bind(batch::column(calls, |c| c.take_fence));
            async move {
                let answers = query
                    .fetch_all(pool)
                    .await
                    .map_err(|e| db_error("append to the operation log", e))?;
                Ok(answers.into_iter().map(|Json(a)| a).collect())
            }
        },
    )
    .await
}

/// A batch of `begin` calls: one row of each array per call.
const BEGIN_MANY: &str =
    "select rtm_begin(a.game_id, a.command_id, a.claim_game_id, a.op, a.reply_to,
                 a.reply_correlation_id, a.fingerprint)
from unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
            $6::text[], $7::text[])
     as a(game_id, command_id, claim_game_id, op, reply_to,
          reply_correlation_id, fingerprint)";

/// The same for a batch of one: the arrays' first elements, without the
/// `unnest` scan, which is work for nothing when calls come one at a time
/// (a quiet worker, or one busy game's commands).
const BEGIN_ONE: &str =
    "select rtm_begin(($1::text[])[1], ($2::text[])[1], ($3::text[])[1], ($4::text[])[1],
                 ($5::text[])[1], ($6::text[])[1], ($7::text[])[1])";

/// Makes a batch of `rtm_begin` calls in one statement (see [`batch`]).
pub(super) async fn begin_batch(
    pool: &PgPool,
    calls: Vec<BeginCall>,
) -> Vec<Result<BegunRow, StoreError>> {
    batch::in_key_order(
        calls,
        |c| c.game_id.clone(),
        |calls| {
            let calls = calls.as_slice();
            let query = sqlx::query_scalar::<_, Json<BegunRow>>(if calls.len() == 1 {
                BEGIN_ONE
            } else {
                BEGIN_MANY
            })
            .bind(batch::column(calls, |c| c.game_id.clone()))
            .bind(batch::column(calls, |c| c.command_id.clone()))
            .bind(batch::column(calls, |c| c.claim_game_id.clone()))
            .bind(batch::column(calls, |c| c.op))
            .bind(batch::column(calls, |c| c.reply_to.clone()))
            .bind(batch::column(calls, |c| c.reply_correlation_id.clone()))
            .bind(batch::column(calls, |c| c.fingerprint.clone()));
            async move {
                let begun = query
                    .fetch_all(pool)
                    .await
                    .map_err(|e| db_error("take the game's fence", e))?;
                Ok(begun.into_iter().map(|Json(b)| b).collect())
            }
        },
    )
    .await
}

/// What `rtm_append` (migration 0009) answers.
#[derive(serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(super) enum AppendAnswer {
    Appended {
        operation_id: i64,
    },
    Stored {
        operation_id: i64,
        payload: serde_json::Value,
    },
    FenceLost,
    Answered {
        event_id: Uuid,
        operation_id: Option<i64>,
        payload: Option<serde_json::Value>,
    },
}

/// What `rtm_begin` (migration 0009) answers.
#[derive(serde::Deserialize)]
pub(super) struct BegunRow {
    fence: i64,
    /// The call inserted the command's inbox row.
    claimed: bool,
    inbox: Option<InboxRow>,
    entries: Vec<(Uuid, serde_json::Value)>,
    steps: Vec<(String, Option<serde_json::Value>)>,
    record: Option<RecordRow>,
}

/// What `rtm_peek` answers.
#[derive(serde::Deserialize)]
struct PeekRow {
    fence: i64,
    settled: bool,
    progress: bool,
    record: Option<RecordRow>,
}

/// A record row as the lifecycle takes it: `Err` inside when the row is
/// corrupt (the op answers that `internal`); only a failure to read is an
/// error.
fn readable_record(
    row: Option<RecordRow>,
    game_id: &GameId,
) -> Result<Result<Option<RuntimeRecord>, String>, StoreError> {
    match row.map(|row| row.into_record(game_id)).transpose() {
        Ok(record) => Ok(Ok(record)),
        Err(StoreError::Corrupt(why)) => Ok(Err(why)),
        Err(e) => Err(e),
    }
}

/// A command's inbox row, with its outcome event's payload if it finished.
#[derive(sqlx::FromRow, serde::Deserialize)]
pub(super) struct InboxRow {
    /// Rows claimed before fingerprints were kept have none.
    fingerprint: Option<String>,
    op: String,
    game_id: String,
    outcome_event_id: Option<Uuid>,
    payload: Option<serde_json::Value>,
}

impl InboxRow {
    /// The claim a call that tried to insert `request`'s inbox row made:
    /// `Fresh` when it `claimed` (inserted) it, else the one the row it
    /// found says, which must be there.
    pub(super) fn claim_made(
        claimed: bool,
        inbox: Option<Self>,
        request: &CommandRequest,
    ) -> Result<InboxClaim, StoreError> {
        if claimed {
            return Ok(InboxClaim::Fresh);
        }
        inbox.ok_or_else(|| Self::vanished(request))?.claim(request)
    }

    /// A claim that found the command's row taken and then no row at all:
    /// inbox rows go only with the retention sweep, long after.
    fn vanished(request: &CommandRequest) -> StoreError {
        StoreError::Corrupt(format!(
            "inbox row of command {:?} vanished while it was claimed",
            request.command_id
        ))
    }

    /// The claim of `request` this row makes, when another claim inserted it.
    fn claim(self, request: &CommandRequest) -> Result<InboxClaim, StoreError> {
        match self {
            InboxRow {
                fingerprint: Some(first),
                op,
                game_id,
                ..
            } if first != request.fingerprint() => Ok(InboxClaim::Reused {
                first: format!("{op} of game {game_id:?}"),
            }),
            // `outcome_event_id` is set exactly when the command finished (a
            // check constraint), and the foreign key keeps its event.
            InboxRow {
                outcome_event_id: None,
                ..
            } => Ok(InboxClaim::Unfinished),
            InboxRow {
                outcome_event_id: Some(event_id),
                payload: Some(payload),
                ..
            } => Ok(InboxClaim::Finished(decode_event(event_id, payload)?)),
            InboxRow {
                outcome_event_id: Some(event_id),
                payload: None,
                ..
            } => Err(StoreError::Corrupt(format!(
                "command {:?} finished with outcome event {event_id}, which is not in the outbox",
                request.command_id
            ))),
        }
    }
}

/// A command's progress from its stored events (with their ids, in write
/// order) and journal rows.
fn stored_progress(
    events: Vec<(Uuid, serde_json::Value)>,
    steps: Vec<(String, Option<serde_json::Value>)>,
) -> Result<Progress, StoreError> {
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

/// A record update checked against its entry, with its state directory as
/// the text it is stored as.
fn checked_record(
    record: RecordUpdate,
    entry: &OperationEntry,
) -> Result<(RecordUpdate, String), StoreError> {
    if record.game_id.as_str() != entry.game_id {
        return Err(StoreError::Corrupt(format!(
            "an entry of game {:?} carries a record update of game {:?}",
            entry.game_id,
            record.game_id.as_str()
        )));
    }
    let state_dir = path_text(&record.state_dir)?.to_owned();
    Ok((record, state_dir))
}

/// A `runtime_records` row with its game, as the reconciler lists them.
#[derive(sqlx::FromRow)]
struct NamedRecordRow {
    game_id: String,
    #[sqlx(flatten)]
    row: RecordRow,
}

/// A `runtime_records` row as stored, before it is checked.
#[derive(sqlx::FromRow, serde::Deserialize)]
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
            Some(RuntimeStatus::Exited) => RuntimeState::Exited { container_id },
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
