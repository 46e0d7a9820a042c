//! The operation history `rtmanager log` reads.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{PgStore, db_error, decode_event};
use crate::domain::event::SCHEMA_VERSION;
use crate::domain::{Outcome, OutcomeEvent};
use crate::error::ErrorCode;
use crate::ports::StoreError;

/// The columns of a history row: the entry's event as written, or (once
/// `RTM_RETENTION` swept its outbox row) the log entry it was written from.
/// A macro, so the statements stay `&'static str`.
macro_rules! history_select {
    () => {
        "select o.event_id, o.payload, l.operation_id, l.game_id, l.op, l.outer_op,
                l.op_source, l.reason, l.correlation_id, l.command_id, l.image_ref,
                l.previous_image_ref, l.container_id, l.address, l.outcome, l.error_code,
                l.error_message, l.noop, l.rolled_back, l.started_at, l.finished_at
         from operation_log l
         left join outbox o on o.operation_id = l.operation_id"
    };
}

#[derive(sqlx::FromRow)]
struct Row {
    event_id: Option<Uuid>,
    payload: Option<serde_json::Value>,
    operation_id: i64,
    game_id: String,
    op: String,
    outer_op: Option<String>,
    op_source: String,
    reason: Option<String>,
    correlation_id: String,
    command_id: String,
    image_ref: Option<String>,
    previous_image_ref: Option<String>,
    container_id: Option<String>,
    address: Option<String>,
    outcome: String,
    error_code: Option<String>,
    error_message: Option<String>,
    noop: bool,
    rolled_back: bool,
    started_at: DateTime<Utc>,
    finished_at: DateTime<Utc>,
}

impl Row {
    fn into_event(self) -> Result<OutcomeEvent, StoreError> {
        if let (Some(event_id), Some(payload)) = (self.event_id, self.payload) {
            return decode_event(event_id, payload);
        }
        let corrupt = |what: &str| {
            StoreError::Corrupt(format!(
                "operation_log row {} has {what}",
                self.operation_id
            ))
        };
        let outcome = Outcome::parse(&self.outcome).ok_or_else(|| corrupt("an unknown outcome"))?;
        let error_code = match self.error_code.as_deref() {
            None => None,
            Some(code) => {
                Some(ErrorCode::parse(code).ok_or_else(|| corrupt("an unknown error code"))?)
            }
        };
        Ok(OutcomeEvent {
            node: None,
            // The event's id went with its outbox row.
            event_id: Uuid::nil(),
            schema_version: SCHEMA_VERSION,
            occurred_at: self.finished_at,
            operation_id: Some(self.operation_id),
            command_id: self.command_id,
            correlation_id: self.correlation_id,
            game_id: self.game_id,
            op: Some(self.op),
            outer_op: self.outer_op,
            op_source: Some(self.op_source),
            reason: self.reason,
            outcome,
            error_code,
            error_message: self.error_message,
            image_ref: self.image_ref,
            previous_image_ref: self.previous_image_ref,
            container_id: self.container_id,
            address: self.address,
            noop: self.noop,
            rolled_back: self.rolled_back,
            started_at: self.started_at,
            finished_at: self.finished_at,
        })
    }
}

impl PgStore {
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
            None => sqlx::query_as::<_, Row>(concat!(
                history_select!(),
                " where l.game_id = $1 order by l.operation_id desc limit $2"
            ))
            .bind(game_id)
            .bind(limit),
            Some(correlation_id) => sqlx::query_as::<_, Row>(concat!(
                history_select!(),
                " where l.correlation_id = $3 and l.game_id = $1
                  order by l.operation_id desc limit $2"
            ))
            .bind(game_id)
            .bind(limit)
            .bind(correlation_id),
        };
        let rows = query
            .fetch_all(&self.pool)
            .await
            .map_err(|e| db_error("read the operation history", e))?;
        rows.into_iter().map(Row::into_event).collect()
    }

    /// The game's latest `exit` entry (the reconciler's, SPEC §11), if any:
    /// what `rtmanager status` shows beside an `exited` record.
    pub async fn last_exit(&self, game_id: &str) -> Result<Option<OutcomeEvent>, StoreError> {
        let row = sqlx::query_as::<_, Row>(concat!(
            history_select!(),
            " where l.game_id = $1 and l.op = 'exit' order by l.operation_id desc limit 1"
        ))
        .bind(game_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| db_error("read the last exit", e))?;
        row.map(Row::into_event).transpose()
    }
}
