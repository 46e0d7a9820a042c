//! The [`RuntimeStore`] port: what the lifecycle reads and writes.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::{PgStore, db_error, decode_event, path_text, reply_columns};
use crate::domain::{
    CommandRequest, ContainerId, GameId, ImageRef, NodeName, OperationEntry, OutcomeEvent,
    PriorEntry, RecordUpdate, RuntimeRecord, RuntimeState, RuntimeStatus, Step,
};
use crate::ports::{
    Admission, Answers, Begun, Fence, FenceView, InboxClaim, OperationWrite, Progress, Recorded,
    Route, RuntimeStore, StoreError, WriteFence,
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
        self.claim_request(request).await
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
        let answer: Json<AppendAnswer> = sqlx::query_scalar(
            "select rtm_append($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,
                               $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28,
                               $29, $30, $31, $32, $33)",
        )
        .bind(event_id)
        .bind(fence.expected().map(|f| f.0))
        .bind(fence.held().map(|f| f.0))
        .bind(check_answered)
        .bind(answers_inbox)
        .bind(reply_from_inbox)
        .bind(reply_to)
        .bind(reply_correlation_id)
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
        .bind(result.outcome().as_str())
        .bind(result.error_code().map(|c| c.as_str()))
        .bind(result.error_message())
        .bind(result.noop())
        .bind(entry.rolled_back)
        .bind(entry.started_at)
        .bind(entry.finished_at)
        .bind(event.routing_key())
        .bind(Json(&event))
        .bind(record.as_ref().map(|(r, _)| r.state.status().as_str()))
        .bind(record.as_ref().map(|(r, _)| r.image_ref.as_str()))
        .bind(
            record
                .as_ref()
                .and_then(|(r, _)| r.state.container_id().map(ContainerId::as_str)),
        )
        .bind(record.as_ref().and_then(|(r, _)| r.state.address()))
        .bind(record.as_ref().map(|(_, dir)| dir.as_str()))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| db_error("append to the operation log", e))?;
        match answer.0 {
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
        let begun: Json<BegunRow> =
            sqlx::query_scalar("select rtm_begin($1, $2, $3, $4, $5, $6, $7)")
                .bind(game_id.as_str())
                .bind(&request.command_id)
                .bind(request.game_id.as_deref().unwrap_or_default())
                .bind(request.op.as_str())
                .bind(reply_to)
                .bind(reply_correlation_id)
                .bind(request.fingerprint())
                .fetch_one(&self.pool)
                .await
                .map_err(|e| db_error("take the game's fence", e))?;
        let BegunRow {
            fence,
            claimed,
            inbox,
            entries,
            steps,
            record,
        } = begun.0;
        let claim = if claimed {
            InboxClaim::Fresh
        } else {
            let inbox = inbox.ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "inbox row of command {:?} vanished while it was claimed",
                    request.command_id
                ))
            })?;
            inbox.claim(request)?
        };
        Ok(Begun {
            fence: Fence(fence),
            claim,
            progress: stored_progress(entries, steps)?,
            record: match record.map(|row| row.into_record(game_id)).transpose() {
                Ok(record) => Ok(record),
                Err(StoreError::Corrupt(why)) => Err(why),
                Err(e) => return Err(e),
            },
        })
    }
}

impl PgStore {
    /// [`RuntimeStore::claim`]: inserts the command's inbox row, or reads
    /// what the claim that inserted it left.
    pub(super) async fn claim_request(
        &self,
        request: &CommandRequest,
    ) -> Result<InboxClaim, StoreError> {
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
            InboxClaim::Fresh => Err(StoreError::Corrupt(format!(
                "inbox row of command {:?} vanished while it was claimed",
                request.command_id
            ))),
            claim => Ok(claim),
        }
    }
}

/// What `rtm_append` (migration 0009) answers.
#[derive(serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum AppendAnswer {
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
struct BegunRow {
    fence: i64,
    /// The call inserted the command's inbox row.
    claimed: bool,
    inbox: Option<InboxRow>,
    entries: Vec<(Uuid, serde_json::Value)>,
    steps: Vec<(String, Option<serde_json::Value>)>,
    record: Option<RecordRow>,
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
    /// The claim of `request` this row makes, when another claim inserted it.
    pub(super) fn claim(self, request: &CommandRequest) -> Result<InboxClaim, StoreError> {
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
