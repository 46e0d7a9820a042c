//! The [`RuntimeStore`] port: what the lifecycle reads and writes.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::{PgStore, append, db_error, decode_event, path_text};
use crate::domain::{
    CommandRequest, ContainerId, GameId, ImageRef, OperationEntry, OutcomeEvent, PriorEntry,
    RecordUpdate, RuntimeRecord, RuntimeState, RuntimeStatus, Step,
};
use crate::ports::{
    Answers, Fence, FenceView, InboxClaim, OperationWrite, Progress, Recorded, RuntimeStore,
    StoreError, WriteFence,
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

        // `outcome_event_id` is set exactly when the command finished (a
        // check constraint), and the foreign key keeps its event.
        type ClaimRow = (
            Option<Uuid>,
            Option<serde_json::Value>,
            Option<String>,
            String,
            String,
        );
        let row: Option<ClaimRow> = sqlx::query_as(
            "select i.outcome_event_id, o.payload, i.fingerprint, i.op, i.game_id
             from inbox i
             left join outbox o on o.event_id = i.outcome_event_id
             where i.command_id = $1",
        )
        .bind(&request.command_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| db_error("read the inbox", e))?;
        match row {
            // Rows claimed before fingerprints were kept have none.
            Some((_, _, Some(first), op, game_id)) if first != fingerprint => {
                Ok(InboxClaim::Reused {
                    first: format!("{op} of game {game_id:?}"),
                })
            }
            Some((None, ..)) => Ok(InboxClaim::Unfinished),
            Some((Some(event_id), Some(payload), ..)) => {
                Ok(InboxClaim::Finished(decode_event(event_id, payload)?))
            }
            Some((Some(event_id), None, ..)) => Err(StoreError::Corrupt(format!(
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
            answers,
        } = write;
        // Only a command's own answer goes in (and is checked against) its
        // inbox row; a reused command_id's answer stands on its own.
        let answers_inbox = entry.is_outer() && answers == Answers::Command;
        let record = record
            .map(|record| checked_record(record, &entry))
            .transpose()?;
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| db_error("begin the append transaction", e))?;

        // A retry of a write whose COMMIT went through but whose reply was
        // lost: the event id is fixed per write, so it finds its own row.
        if let Some((Some(operation_id), event)) = append::stored_outcome(&mut tx, event_id).await?
        {
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
        if let Some(Fence(expected)) = fence.expected()
            && append::lock_fence(&mut tx, &entry.game_id).await? != Some(expected)
        {
            // Dropping `tx` rolls back; say so explicitly all the same.
            tx.rollback().await.ok();
            return Err(StoreError::FenceLost(expected));
        }
        // An answer given without the lease (a refusal, an invalid request)
        // stands only if no other attempt of the command answered it first:
        // two copies refused at once give one outcome. The inbox row is
        // locked after the fence row, in the order every append takes them.
        if answers_inbox
            && fence.held().is_none()
            && let Some(answered) = append::lock_inbox_answer(&mut tx, &entry.command_id).await?
        {
            // The inbox's foreign key keeps its outcome in the outbox.
            let (operation_id, event) = append::stored_outcome(&mut tx, answered)
                .await?
                .ok_or_else(|| {
                    StoreError::Corrupt(format!("outcome event {answered} is not in the outbox"))
                })?;
            tx.rollback().await.ok();
            return Ok(Recorded {
                operation_id: operation_id.unwrap_or_default(),
                event,
                answered_before: true,
            });
        }

        let operation_id = append::insert_entry(&mut tx, &entry, fence.held()).await?;
        let event = OutcomeEvent::from_entry(&entry, operation_id, event_id);
        // Only the outer event answers a request/reply caller.
        let reply = match &answers {
            _ if !entry.is_outer() => (None, None),
            Answers::Command => append::reply_address(&mut tx, &entry.command_id).await?,
            Answers::Reuse { reply_to } => reply_to
                .as_ref()
                .map(|r| (Some(r.queue.clone()), r.correlation_id.clone()))
                .unwrap_or_default(),
        };
        append::insert_event(&mut tx, &entry, &event, operation_id, reply).await?;
        if let Some((record, state_dir)) = &record {
            append::upsert_record(&mut tx, record, state_dir, fence.held()).await?;
        }
        if answers_inbox {
            append::finish_inbox(&mut tx, &entry, event_id).await?;
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
