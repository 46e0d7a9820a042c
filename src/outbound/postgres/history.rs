//! The operation history `rtmanager log` reads.

use uuid::Uuid;

use super::{PgStore, db_error, decode_event};
use crate::domain::OutcomeEvent;
use crate::ports::StoreError;

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
