//! The PostgreSQL adapter: runtime records, operation log, outbox, inbox and
//! fences (SPEC §7, §10). One file per client of the database:
//!
//! - [`port`]: the [`RuntimeStore`](crate::ports::RuntimeStore) port the
//!   lifecycle writes through. An attempt's start and an append are one
//!   call each to the functions `rtm_begin` and `rtm_append` (migration
//!   0009), so each costs one round trip and one commit. Every outbox write
//!   notifies the store's `written` handle, which wakes the relay.
//! - [`outbox`]: the relay's reads and marks, its leadership lease
//!   (`relay_leader`), and the wake-up a follower sends the leader.
//! - [`history`]: the operation history `rtmanager log` prints.
//! - [`nodes`]: several Docker hosts (SPEC §12): the heartbeat, the
//!   routing and placement call `rtm_route` (migration 0012), `rtm_admit`
//!   (migration 0013: the route and the inbox claim in one call), and what
//!   `rtmanager nodes`, `drain` and `undrain` read and write.
//! - [`retention`]: the sweep of what `RTM_RETENTION` keeps only a while.
//! - [`bootstrap`]: connecting (creating the database if missing),
//!   migrating, and the readiness ping.
//!
//! The schema lives in `migrations/` and explains itself there. These files
//! only speak SQL: every query is a `&'static str` with bind parameters,
//! checked at run time (no `query!` macros, so the build needs no database).
//!
//! Errors: anything that smells of the connection (I/O, pool timeout, server
//! shutting down, resources exhausted) is [`StoreError::Unavailable`], which
//! the callers retry; anything else (a constraint the code should never
//! break, a row that does not decode) is [`StoreError::Corrupt`], which
//! retrying cannot fix.

mod batch;
mod bootstrap;
mod history;
mod nodes;
mod outbox;
mod port;
mod retention;

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::domain::{CommandRequest, NodeName, OutcomeEvent};
use crate::ports::StoreError;

pub use nodes::{HEARTBEAT, NodeRow, live_within};
pub use outbox::PendingEvent;
pub use retention::Swept;

/// How long a query waits for a pooled connection (including connecting)
/// before it fails: an outage must surface as [`StoreError::Unavailable`],
/// which the callers retry with backoff, never as a hang.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections per worker (one of them the relay's `LISTEN`). A command
/// holds a connection only for one call at a time, so fewer connections
/// than `RTM_PREFETCH` commands in flight suffice; the rest wait their turn.
/// Enough of them that PostgreSQL flushes many commits with each WAL write:
/// with 10, a worker's commits queued behind the flush (`WALWrite`) and the
/// control plane stalled well below the database's own rate. Opened only
/// as the load needs them.
pub const MAX_CONNECTIONS: u32 = 24;

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Notified after every write of an outbox event (an entry's, a
    /// rejected message's, a duplicate's republish): this worker's relay
    /// wakes at once, never later than the commit.
    written: Arc<Notify>,
    /// The node this store's worker runs on: stamped on every event it
    /// writes (and so on the record, `runtime_records.node`), and the node
    /// `route` compares a game's with. `None` (tools, tests): no node, every
    /// command runs here.
    node: Option<NodeName>,
    /// The group-commit queues of the hot calls ([`batch`]), started on
    /// first use and shared by every clone. Their tasks run on the runtime
    /// of that first use: a store is used within one runtime (the binary
    /// has one; each test its own store).
    ///
    /// A batch that panics drops its callers' answers, which they take as
    /// `Unavailable` and retry; the queue's own task only gathers calls.
    batches: Arc<OnceLock<Batches>>,
}

/// The batchers of the calls every command makes.
struct Batches {
    append: batch::Batcher<port::AppendCall, port::AppendAnswer>,
    begin: batch::Batcher<port::BeginCall, port::BegunRow>,
    admit: batch::Batcher<nodes::AdmitCall, nodes::AdmitAnswer>,
}

impl std::fmt::Debug for Batches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Batches")
    }
}

impl PgStore {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            written: Arc::new(Notify::new()),
            node: None,
            batches: Arc::default(),
        }
    }

    /// The batchers, started on first use.
    fn batches(&self) -> &Batches {
        self.batches.get_or_init(|| {
            let (append, begin, admit) = (self.pool.clone(), self.pool.clone(), self.pool.clone());
            Batches {
                append: batch::Batcher::spawn(move |calls| {
                    let pool = append.clone();
                    async move { port::append_batch(&pool, calls).await }
                }),
                begin: batch::Batcher::spawn(move |calls| {
                    let pool = begin.clone();
                    async move { port::begin_batch(&pool, calls).await }
                }),
                admit: batch::Batcher::spawn(move |calls| {
                    let pool = admit.clone();
                    async move { nodes::admit_batch(&pool, calls).await }
                }),
            }
        })
    }

    /// This store, writing for a worker of `node`.
    pub fn on_node(mut self, node: NodeName) -> Self {
        self.node = Some(node);
        self
    }

    pub fn node(&self) -> Option<&NodeName> {
        self.node.as_ref()
    }

    /// This store, notifying `written` after each outbox write (the relay's
    /// wake-up).
    pub fn notifying(mut self, written: Arc<Notify>) -> Self {
        self.written = written;
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The pool settings every `PgStore` is built with.
    pub fn pool_options() -> PgPoolOptions {
        PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            // No ping before each use: it doubled every query's round trips.
            // A connection that died meanwhile fails its statement as
            // `Unavailable`, which every caller retries, and the pool drops it.
            .test_before_acquire(false)
    }
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

/// The inbox's `reply_to` and `reply_correlation_id` of a request, as a
/// claim stores them.
fn reply_columns(request: &CommandRequest) -> (Option<&str>, Option<&str>) {
    match &request.reply_to {
        Some(r) => (Some(r.queue.as_str()), r.correlation_id.as_deref()),
        None => (None, None),
    }
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
