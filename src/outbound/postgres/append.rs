//! The statements of [`RuntimeStore::append`](crate::ports::RuntimeStore::append)'s
//! transaction, one function each, in the order it runs them. Each takes
//! the transaction's connection; the locks they take (the fence row, then
//! the inbox row) are held until the caller commits or rolls back.

use sqlx::PgConnection;
use sqlx::types::Json;
use uuid::Uuid;

use super::db_error;
use crate::domain::{ContainerId, OperationEntry, OutcomeEvent, RecordUpdate};
use crate::ports::{Fence, StoreError};

/// An event stored in the outbox, with the id of the entry it reports
/// (none for a rejected message's event).
pub(super) async fn stored_outcome(
    conn: &mut PgConnection,
    event_id: Uuid,
) -> Result<Option<(Option<i64>, OutcomeEvent)>, StoreError> {
    let row: Option<(Option<i64>, serde_json::Value)> =
        sqlx::query_as("select operation_id, payload from outbox where event_id = $1")
            .bind(event_id)
            .fetch_optional(conn)
            .await
            .map_err(|e| db_error("read a stored outcome event", e))?;
    row.map(|(operation_id, payload)| Ok((operation_id, super::decode_event(event_id, payload)?)))
        .transpose()
}

/// The game's fence, its row locked `for share` until the transaction
/// ends. The fence check must hold until commit, not just at the moment it
/// is read: `advance_fence` (an upsert, which needs a conflicting row lock)
/// waits until we commit or roll back. So either our writes commit before
/// the newer fence exists, or we read the newer fence here and write
/// nothing; a plain select would let a newer operation take the fence and
/// write between our check and our commit, and we would overwrite its
/// record.
pub(super) async fn lock_fence(
    conn: &mut PgConnection,
    game_id: &str,
) -> Result<Option<i64>, StoreError> {
    sqlx::query_scalar("select fence from game_fences where game_id = $1 for share")
        .bind(game_id)
        .fetch_optional(conn)
        .await
        .map_err(|e| db_error("check the game's fence", e))
}

/// The command's outcome event if it was answered, its inbox row locked
/// `for update` until the transaction ends. Locked by itself: a join
/// would, after waiting for the lock, still miss an outbox row committed
/// by the attempt it waited for.
pub(super) async fn lock_inbox_answer(
    conn: &mut PgConnection,
    command_id: &str,
) -> Result<Option<Uuid>, StoreError> {
    let answered: Option<Option<Uuid>> =
        sqlx::query_scalar("select outcome_event_id from inbox where command_id = $1 for update")
            .bind(command_id)
            .fetch_optional(conn)
            .await
            .map_err(|e| db_error("check whether the command was answered", e))?;
    Ok(answered.flatten())
}

/// Appends `entry` to the operation log with the fence it was written
/// under (a lease holder's only); returns its `operation_id`.
pub(super) async fn insert_entry(
    conn: &mut PgConnection,
    entry: &OperationEntry,
    held: Option<Fence>,
) -> Result<i64, StoreError> {
    sqlx::query_scalar(
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
    .bind(held.map(|f| f.0))
    .fetch_one(conn)
    .await
    .map_err(|e| db_error("append to the operation log", e))
}

/// Where a request/reply caller wants its answer: `(reply_to,
/// reply_correlation_id)`, both `None` for a plain command.
pub(super) type ReplyAddress = (Option<String>, Option<String>);

/// The reply address the command was claimed with.
pub(super) async fn reply_address(
    conn: &mut PgConnection,
    command_id: &str,
) -> Result<ReplyAddress, StoreError> {
    let address: Option<ReplyAddress> =
        sqlx::query_as("select reply_to, reply_correlation_id from inbox where command_id = $1")
            .bind(command_id)
            .fetch_optional(conn)
            .await
            .map_err(|e| db_error("read the command's reply address", e))?;
    Ok(address.unwrap_or_default())
}

/// Stores the entry's event in the outbox for the relay.
pub(super) async fn insert_event(
    conn: &mut PgConnection,
    entry: &OperationEntry,
    event: &OutcomeEvent,
    operation_id: i64,
    (reply_to, reply_correlation_id): ReplyAddress,
) -> Result<(), StoreError> {
    sqlx::query(
        "insert into outbox (event_id, operation_id, game_id, routing_key, correlation_id,
                             payload, reply_to, reply_correlation_id)
         values ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(event.event_id)
    .bind(operation_id)
    .bind(&entry.game_id)
    .bind(event.routing_key())
    .bind(&entry.correlation_id)
    .bind(Json(event))
    .bind(reply_to)
    .bind(reply_correlation_id)
    .execute(conn)
    .await
    .map_err(|e| db_error("store the outcome event in the outbox", e))?;
    Ok(())
}

/// Writes the game's runtime record (`state_dir` as text), stamped with
/// the fence it was written under.
pub(super) async fn upsert_record(
    conn: &mut PgConnection,
    record: &RecordUpdate,
    state_dir: &str,
    held: Option<Fence>,
) -> Result<(), StoreError> {
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
    .bind(held.map(|f| f.0))
    .execute(conn)
    .await
    .map_err(|e| db_error("write the runtime record", e))?;
    Ok(())
}

/// Marks the command finished with `event_id` as its outcome. Normally the
/// row was claimed when the command arrived; an outer entry of a command
/// that never went through the inbox (the services driven directly, by
/// tests or tools) creates it, so its outcome can be found by command_id
/// all the same.
pub(super) async fn finish_inbox(
    conn: &mut PgConnection,
    entry: &OperationEntry,
    event_id: Uuid,
) -> Result<(), StoreError> {
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
    .execute(conn)
    .await
    .map_err(|e| db_error("mark the command finished in the inbox", e))?;
    Ok(())
}
