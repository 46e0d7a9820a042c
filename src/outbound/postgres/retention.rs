//! `RTM_RETENTION` (SPEC §9): what the manager keeps only for a while. The
//! operation log is kept for good; finished inbox rows, published outbox
//! rows and fence rows of games that were never taken are not.

use std::time::Duration;

use chrono::Utc;

use super::{PgStore, db_error};
use crate::ports::StoreError;

/// What one sweep deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    pub inbox: u64,
    pub outbox: u64,
    pub fences: u64,
}

impl PgStore {
    /// Deletes what is older than `retention`:
    ///
    /// - inbox rows of commands that finished before the cutoff (a copy of
    ///   such a command arriving later runs again: retention is the window
    ///   in which duplicates are recognised);
    /// - outbox rows published before the cutoff, except an inbox row's
    ///   outcome (a duplicate is answered with it) and the entries of a
    ///   command still unfinished (its resumption reads them);
    /// - fence rows still at 0 with no record: read by a refused command
    ///   of a game that never ran. A refusal racing the delete finds no row,
    ///   loses its fence check and asks again, so it is safe at any time;
    ///   a fence that ever moved is kept, or a fenced-out writer could match
    ///   a restarted count.
    pub async fn sweep(&self, retention: Duration) -> Result<Swept, StoreError> {
        let cutoff =
            Utc::now() - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
        let inbox = sqlx::query("delete from inbox where finished_at < $1")
            .bind(cutoff)
            .execute(&self.pool)
            .await
            .map_err(|e| db_error("sweep finished inbox rows", e))?
            .rows_affected();
        let outbox = sqlx::query(
            "delete from outbox o
             where o.sent_at < $1
               and o.pending_replays = 0
               and not exists (select 1 from inbox i where i.outcome_event_id = o.event_id)
               and not exists (
                   select 1 from operation_log l
                   join inbox i on i.command_id = l.command_id and i.finished_at is null
                   where l.operation_id = o.operation_id)",
        )
        .bind(cutoff)
        .execute(&self.pool)
        .await
        .map_err(|e| db_error("sweep published outbox rows", e))?
        .rows_affected();
        let fences = sqlx::query(
            "delete from game_fences f
             where f.fence = 0
               and not exists (select 1 from runtime_records r where r.game_id = f.game_id)",
        )
        .execute(&self.pool)
        .await
        .map_err(|e| db_error("sweep unused fence rows", e))?
        .rows_affected();
        Ok(Swept {
            inbox,
            outbox,
            fences,
        })
    }
}
