//! The PostgreSQL adapter against a real server: inbox claims, fenced
//! appends (the outbox and the inbox written with the log entry), record
//! mapping, the relay's queries, and database creation.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rtmanager::config::SecretUrl;
use rtmanager::domain::{
    CommandRequest, ContainerId, EntryResult, GameId, ImageRef, OpKind, OperationEntry,
    OutcomeEvent, RecordUpdate, ReplyTo, RuntimeState, Stage, Step,
};
use rtmanager::error::{ErrorCode, Failure};
use rtmanager::outbound::postgres::{PgStore, Swept};
use rtmanager::ports::{
    Answers, Fence, FenceView, InboxClaim, OperationWrite, RuntimeStore, StoreError, WriteFence,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor};
use uuid::Uuid;

use crate::harness::{TestDb, admin_database_url, unique};

const IMAGE: &str = "registry.example:5000/galaxy/engine:1.4.2";
const NEW_IMAGE: &str = "registry.example:5000/galaxy/engine:1.4.3";

// ---------------------------------------------------------------------------
// Builders
// ---------------------------------------------------------------------------

fn game(raw: &str) -> GameId {
    GameId::parse(raw).unwrap()
}

fn request(command_id: &str, game_id: Option<&str>, reply_to: Option<ReplyTo>) -> CommandRequest {
    CommandRequest {
        command_id: command_id.into(),
        op: OpKind::Start,
        game_id: game_id.map(str::to_owned),
        image_ref: Some(IMAGE.into()),
        op_source: Some("admin".into()),
        source_ref: None,
        reason: None,
        requested_at: None,
        reply_to,
        malformed: None,
        node: None,
        refusal: None,
    }
}

/// A successful entry of `op` (outer when `outer_op` is `None`).
fn entry(game_id: &str, command_id: &str, op: OpKind, outer_op: Option<OpKind>) -> OperationEntry {
    let now = Utc::now();
    OperationEntry {
        game_id: game_id.into(),
        op,
        outer_op,
        op_source: "admin".into(),
        reason: None,
        correlation_id: format!("corr-{command_id}"),
        command_id: command_id.into(),
        image_ref: Some(IMAGE.into()),
        previous_image_ref: None,
        container_id: None,
        address: None,
        result: EntryResult::SUCCESS,
        rolled_back: false,
        started_at: now,
        finished_at: now,
    }
}

fn record(game_id: &str, image: &str, state: RuntimeState) -> RecordUpdate {
    RecordUpdate {
        game_id: game(game_id),
        image_ref: ImageRef::parse(image).unwrap(),
        state,
        state_dir: PathBuf::from(format!("/var/lib/rtmanager/games/{game_id}")),
    }
}

fn running(container: &str) -> RuntimeState {
    RuntimeState::Running {
        container_id: ContainerId(container.into()),
        address: Some("172.18.0.5".into()),
    }
}

/// A write under the lease (`Some(fence)`) or an unchecked one (`None`).
fn write(
    entry: OperationEntry,
    fence: Option<Fence>,
    record: Option<RecordUpdate>,
) -> OperationWrite {
    OperationWrite {
        entry,
        fence: fence.map_or(WriteFence::Unchecked, WriteFence::Held),
        record,
        answers: Answers::Command,
    }
}

/// A refusal written without the lease, under the fence it `saw`.
fn seen(entry: OperationEntry, saw: Fence) -> OperationWrite {
    OperationWrite {
        entry,
        fence: WriteFence::Seen(saw),
        record: None,
        answers: Answers::Command,
    }
}

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct InboxRow {
    command_id: String,
    game_id: String,
    op: String,
    reply_to: Option<String>,
    reply_correlation_id: Option<String>,
}

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct OutboxRow {
    operation_id: Option<i64>,
    routing_key: String,
    payload: serde_json::Value,
    reply_to: Option<String>,
    reply_correlation_id: Option<String>,
    sent_at: Option<chrono::DateTime<Utc>>,
}

async fn count(db: &TestDb, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&db.pool).await.unwrap()
}

async fn log_rows(db: &TestDb) -> i64 {
    count(db, "select count(*) from operation_log").await
}

async fn outbox_rows(db: &TestDb) -> i64 {
    count(db, "select count(*) from outbox").await
}

// ---------------------------------------------------------------------------
// Inbox
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_is_fresh_then_unfinished_then_finished() {
    let db = TestDb::new().await;
    let store = PgStore::new(db.pool.clone());
    let req = request("cmd-1", Some("g-1"), None);

    // A look claims nothing (the reconciler's may come to nothing).
    assert_eq!(store.lookup(&req).await.unwrap(), InboxClaim::Fresh);
    assert_eq!(count(&db, "select count(*) from inbox").await, 0);
    assert_eq!(store.claim(&req).await.unwrap(), InboxClaim::Fresh);
    assert_eq!(store.claim(&req).await.unwrap(), InboxClaim::Unfinished);
    assert_eq!(store.lookup(&req).await.unwrap(), InboxClaim::Unfinished);

    let fence = store.advance_fence(&game("g-1"), "cmd-test").await.unwrap();
    let recorded = store
        .append(
            write(
                entry("g-1", "cmd-1", OpKind::Start, None),
                Some(fence),
                None,
            ),
            Uuid::new_v4(),
        )
        .await
        .unwrap();

    // A duplicate now gets the stored outcome, same event_id and all.
    assert_eq!(
        store.claim(&req).await.unwrap(),
        InboxClaim::Finished(recorded.event)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_keeps_raw_values_and_the_reply_address() {
    let db = TestDb::new().await;
    let store = PgStore::new(db.pool.clone());
    let reply = ReplyTo {
        queue: "amq.rabbitmq.reply-to.abc".into(),
        correlation_id: Some("req-9".into()),
    };
    store
        .claim(&request("cmd-1", None, Some(reply)))
        .await
        .unwrap();
    store
        .claim(&request("cmd-2", Some("../bad id"), None))
        .await
        .unwrap();

    let rows: Vec<InboxRow> = sqlx::query_as(
        "select command_id, game_id, op, reply_to, reply_correlation_id
         from inbox order by command_id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let inbox_row =
        |command_id: &str, game_id: &str, reply_to: Option<&str>, corr: Option<&str>| InboxRow {
            command_id: command_id.into(),
            game_id: game_id.into(),
            op: "start".into(),
            reply_to: reply_to.map(str::to_owned),
            reply_correlation_id: corr.map(str::to_owned),
        };
    assert_eq!(
        rows,
        [
            inbox_row(
                "cmd-1",
                "",
                Some("amq.rabbitmq.reply-to.abc"),
                Some("req-9")
            ),
            inbox_row("cmd-2", "../bad id", None, None),
        ]
    );
}

// ---------------------------------------------------------------------------
// Append
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outer_append_writes_log_outbox_record_and_finishes_the_inbox() {
    let db = TestDb::new().await;
    let store = PgStore::new(db.pool.clone());
    let reply = ReplyTo {
        queue: "replies".into(),
        correlation_id: Some("req-1".into()),
    };
    store
        .claim(&request("cmd-1", Some("g-1"), Some(reply)))
        .await
        .unwrap();
    let fence = store.advance_fence(&game("g-1"), "cmd-test").await.unwrap();
    let event_id = Uuid::new_v4();
    let mut e = entry("g-1", "cmd-1", OpKind::Start, None);
    e.container_id = Some("c-1".into());
    e.address = Some("172.18.0.5".into());

    let recorded = store
        .append(
            write(
                e.clone(),
                Some(fence),
                Some(record("g-1", IMAGE, running("c-1"))),
            ),
            event_id,
        )
        .await
        .unwrap();

    assert_eq!(recorded.event.event_id, event_id);
    assert_eq!(recorded.event.operation_id, Some(recorded.operation_id));
    assert_eq!(recorded.event.container_id.as_deref(), Some("c-1"));

    // The log row.
    let (game_id, op, outer_op, outcome, fence_col): (
        String,
        String,
        Option<String>,
        String,
        Option<i64>,
    ) = sqlx::query_as(
        "select game_id, op, outer_op, outcome, fence from operation_log where operation_id = $1",
    )
    .bind(recorded.operation_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        (
            game_id.as_str(),
            op.as_str(),
            outer_op,
            outcome.as_str(),
            fence_col
        ),
        ("g-1", "start", None, "success", Some(fence.0))
    );

    // The outbox row: the event as written, routed, with the reply address.
    let row: OutboxRow = sqlx::query_as(
        "select operation_id, routing_key, payload, reply_to, reply_correlation_id, sent_at
         from outbox where event_id = $1",
    )
    .bind(event_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        row,
        OutboxRow {
            operation_id: Some(recorded.operation_id),
            routing_key: "runtime.start.success".into(),
            payload: serde_json::to_value(&recorded.event).unwrap(),
            reply_to: Some("replies".into()),
            reply_correlation_id: Some("req-1".into()),
            sent_at: None,
        }
    );

    // The inbox row points at the same event.
    let (finished, outcome_event_id): (Option<chrono::DateTime<Utc>>, Option<Uuid>) =
        sqlx::query_as(
            "select finished_at, outcome_event_id from inbox where command_id = 'cmd-1'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(finished.is_some());
    assert_eq!(outcome_event_id, Some(event_id));

    // The record.
    let loaded = store.load(&game("g-1")).await.unwrap().unwrap();
    assert_eq!(loaded.state, running("c-1"));
    assert_eq!(loaded.image_ref.as_str(), IMAGE);
    assert_eq!(loaded.fence, fence.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inner_append_neither_finishes_the_command_nor_replies() {
    let db = TestDb::new().await;
    let store = PgStore::new(db.pool.clone());
    let reply = ReplyTo {
        queue: "replies".into(),
        correlation_id: None,
    };
    let req = request("cmd-1", Some("g-1"), Some(reply));
    store.claim(&req).await.unwrap();
    let fence = store.advance_fence(&game("g-1"), "cmd-test").await.unwrap();

    let recorded = store
        .append(
            write(
                entry("g-1", "cmd-1", OpKind::Stop, Some(OpKind::Patch)),
                Some(fence),
                None,
            ),
            Uuid::new_v4(),
        )
        .await
        .unwrap();

    let (routing_key, reply_to): (String, Option<String>) =
        sqlx::query_as("select routing_key, reply_to from outbox where event_id = $1")
            .bind(recorded.event.event_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(routing_key, "runtime.patch.stop.success");
    assert_eq!(reply_to, None);
    assert_eq!(store.claim(&req).await.unwrap(), InboxClaim::Unfinished);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outer_append_of_an_unclaimed_command_can_be_found_by_command_id() {
    let db = TestDb::new().await;
    let store = PgStore::new(db.pool.clone());
    // Written without a fence, as an invalid request is.
    let mut e = entry("", "cmd-1", OpKind::Start, None);
    e.result = EntryResult::Failure(Failure::new(
        ErrorCode::InvalidRequest,
        "game_id must not be empty",
    ));
    let recorded = store
        .append(write(e, None, None), Uuid::new_v4())
        .await
        .unwrap();
    assert_eq!(recorded.event.error_code, Some(ErrorCode::InvalidRequest));
    assert_eq!(recorded.event.routing_key(), "runtime.start.failure");

    assert_eq!(
        store.claim(&request("cmd-1", None, None)).await.unwrap(),
        InboxClaim::Finished(recorded.event)
    );
    let error_code: Option<String> =
        sqlx::query_scalar("select error_code from operation_log where command_id = 'cmd-1'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(error_code.as_deref(), Some("invalid_request"));
}

// ---------------------------------------------------------------------------
// Fencing
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fences_count_up_per_game() {
    let db = TestDb::new().await;
    let store = PgStore::new(db.pool.clone());
    for expected in 1..=3 {
        assert_eq!(
            store.advance_fence(&game("g-1"), "cmd-test").await.unwrap(),
            Fence(expected)
        );
    }
    assert_eq!(
        store.advance_fence(&game("g-2"), "cmd-test").await.unwrap(),
        Fence(1)
    );
}

/// The SPEC §10 proof: once a newer operation took the fence, the older one
/// writes nothing — no log entry, no event, no record change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_fence_cannot_overwrite_a_record() {
    let db = TestDb::new().await;
    let store = PgStore::new(db.pool.clone());
    let g = game("g-1");

    let old = store.advance_fence(&g, "cmd-test").await.unwrap();
    store
        .append(
            write(
                entry("g-1", "cmd-old", OpKind::Start, Some(OpKind::Patch)),
                Some(old),
                Some(record("g-1", IMAGE, running("c-old"))),
            ),
            Uuid::new_v4(),
        )
        .await
        .unwrap();
    let before = store.load(&g).await.unwrap().unwrap();

    // A newer operation takes the lease and the fence...
    let new = store.advance_fence(&g, "cmd-test").await.unwrap();
    assert!(new > old);

    // ...and the old one, unaware, tries to record a stop.
    let stale = store
        .append(
            write(
                entry("g-1", "cmd-old", OpKind::Patch, None),
                Some(old),
                Some(record(
                    "g-1",
                    IMAGE,
                    RuntimeState::Stopped { container_id: None },
                )),
            ),
            Uuid::new_v4(),
        )
        .await;
    assert_eq!(stale.unwrap_err(), StoreError::FenceLost(old.0));
    assert_eq!(log_rows(&db).await, 1);
    assert_eq!(outbox_rows(&db).await, 1);
    assert_eq!(store.load(&g).await.unwrap().unwrap(), before);
    assert_eq!(
        count(
            &db,
            "select count(*) from inbox where finished_at is not null"
        )
        .await,
        0,
        "the stale outer entry must not finish its command"
    );

    // The current holder writes.
    store
        .append(
            write(
                entry("g-1", "cmd-new", OpKind::Start, None),
                Some(new),
                Some(record("g-1", NEW_IMAGE, running("c-new"))),
            ),
            Uuid::new_v4(),
        )
        .await
        .unwrap();
    let after = store.load(&g).await.unwrap().unwrap();
    assert_eq!(after.state, running("c-new"));
    assert_eq!(after.image_ref.as_str(), NEW_IMAGE);
    assert_eq!(after.fence, new.0);
    assert_eq!(after.created_at, before.created_at);
    assert!(after.updated_at >= before.updated_at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_never_taken_is_refused() {
    let db = TestDb::new().await;
    let store = PgStore::new(db.pool.clone());
    let refused = store
        .append(
            write(
                entry("g-1", "cmd-1", OpKind::Start, None),
                Some(Fence(1)),
                Some(record("g-1", IMAGE, running("c-1"))),
            ),
            Uuid::new_v4(),
        )
        .await;
    assert_eq!(refused.unwrap_err(), StoreError::FenceLost(1));
    assert_eq!(log_rows(&db).await, 0);
    assert_eq!(store.load(&game("g-1")).await.unwrap(), None);
}

/// A refusal decided under the lease from what `peek` read: it takes the
/// fence it read's successor itself.
fn taking(entry: OperationEntry, read: Fence) -> OperationWrite {
    OperationWrite {
        entry,
        fence: WriteFence::Take(read),
        record: None,
        answers: Answers::Command,
    }
}

async fn entry_fence(db: &TestDb, command_id: &str) -> Option<i64> {
    sqlx::query_scalar("select fence from operation_log where command_id = $1")
        .bind(command_id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// Issue 11: a command answered from the record alone writes its entry and
/// takes the game's next fence in one commit. The write takes exactly the
/// fence after the one read, names its command as the taker, is stored
/// under it, and is refused, writing nothing, once anything else took the
/// game since the read; a game never taken starts at 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_taking_the_fence_takes_the_next_one_or_nothing() {
    let db = TestDb::new().await;
    let store = PgStore::new(db.pool.clone());
    let g = game("g-1");
    let fresh = store.peek(&g, "cmd-1").await.unwrap();
    assert_eq!(
        (fresh.fence, fresh.settled, fresh.progress, fresh.record),
        (Fence(0), true, false, Ok(None)),
        "a game no operation took, a command with no attempt"
    );
    let recorded = store
        .append(
            taking(conflict("g-1", "cmd-1"), fresh.fence),
            Uuid::new_v4(),
        )
        .await
        .unwrap();
    assert!(!recorded.answered_before);
    assert_eq!(
        store.observe_fence(&g).await.unwrap(),
        FenceView {
            fence: Fence(1),
            taken_by: Some("cmd-1".into())
        }
    );
    assert_eq!(entry_fence(&db, "cmd-1").await, Some(1));

    // Read at 1; then another attempt takes 2 before the write commits.
    let read = store.peek(&g, "cmd-2").await.unwrap();
    assert_eq!((read.fence, read.settled), (Fence(1), true));
    store.advance_fence(&g, "cmd-other").await.unwrap();
    assert_eq!(
        store
            .append(taking(conflict("g-1", "cmd-2"), read.fence), Uuid::new_v4())
            .await
            .unwrap_err(),
        StoreError::FenceLost(1)
    );
    assert_eq!(
        count(
            &db,
            "select count(*) from operation_log where command_id = 'cmd-2'"
        )
        .await,
        0
    );
    assert_eq!(
        store.observe_fence(&g).await.unwrap(),
        FenceView {
            fence: Fence(2),
            taken_by: Some("cmd-other".into())
        },
        "the refused write took nothing"
    );

    // A row read at 0 (a refused lease created it) is taken from 0 too.
    let h = game("g-2");
    let at_zero = store.observe_fence(&h).await.unwrap();
    store
        .append(
            taking(conflict("g-2", "cmd-3"), at_zero.fence),
            Uuid::new_v4(),
        )
        .await
        .unwrap();
    assert_eq!(store.observe_fence(&h).await.unwrap().fence, Fence(1));
}

/// `peek` says a record may still change (`settled` false) while the
/// command that took the fence has no outcome, and says so no longer once
/// it has one; it says when the command itself has steps to resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peek_tells_an_unfinished_fence_holder_and_a_commands_own_steps() {
    let db = TestDb::new().await;
    let store = PgStore::new(db.pool.clone());
    let g = game("g-1");
    let taken = store.advance_fence(&g, "cmd-running").await.unwrap();
    let read = store.peek(&g, "cmd-next").await.unwrap();
    assert_eq!((read.fence, read.settled), (taken, false));

    let done = write(
        entry("g-1", "cmd-running", OpKind::Start, None),
        Some(taken),
        Some(record("g-1", IMAGE, running("c-1"))),
    );
    store.append(done, Uuid::new_v4()).await.unwrap();
    let read = store.peek(&g, "cmd-next").await.unwrap();
    assert_eq!(
        (read.fence, read.settled, read.progress),
        (taken, true, false)
    );
    let record = read.record.unwrap().expect("the record");
    assert_eq!(record.image_ref.to_string(), IMAGE);

    // An attempt of cmd-next took the game and journaled a step, then died.
    let its = store.advance_fence(&g, "cmd-next").await.unwrap();
    store
        .journal(
            &g,
            its,
            "cmd-next",
            &Step::Begin {
                previous_image: ImageRef::parse(IMAGE).unwrap(),
            },
        )
        .await
        .unwrap();
    let read = store.peek(&g, "cmd-next").await.unwrap();
    assert_eq!((read.settled, read.progress), (false, true));
}

/// A command another attempt answered first (without the lease) gets that
/// answer from a write taking the fence, not a second outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_taking_the_fence_returns_an_answer_given_first() {
    let db = TestDb::new().await;
    let store = PgStore::new(db.pool.clone());
    let g = game("g-1");
    // One attempt holds the lease and has read the game; another, refused
    // the lease, reads the fence and answers first.
    let read = store.peek(&g, "cmd-1").await.unwrap();
    let saw = store.observe_fence(&g).await.unwrap().fence;
    let first = store
        .append(seen(conflict("g-1", "cmd-1"), saw), Uuid::new_v4())
        .await
        .unwrap();
    let second = store
        .append(taking(conflict("g-1", "cmd-1"), read.fence), Uuid::new_v4())
        .await
        .unwrap();
    assert!(second.answered_before);
    assert_eq!(second.event.event_id, first.event.event_id);
    assert_eq!(
        count(
            &db,
            "select count(*) from operation_log where command_id = 'cmd-1'"
        )
        .await,
        1
    );
}

fn conflict(game_id: &str, command_id: &str) -> OperationEntry {
    let mut e = entry(game_id, command_id, OpKind::Stop, None);
    e.result = EntryResult::Failure(Failure::new(ErrorCode::Conflict, "busy"));
    e
}

/// A refusal written without the lease stands only if no operation took
/// the game since the fence it saw; it stores no fence of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_is_dropped_once_an_operation_took_the_game() {
    let db = TestDb::new().await;
    let store = PgStore::new(db.pool.clone());
    let g = game("g-1");
    let before = store.observe_fence(&g).await.unwrap();
    assert_eq!(
        before,
        FenceView {
            fence: Fence(0),
            taken_by: None
        },
        "a game no operation took yet"
    );
    assert_eq!(
        store.observe_fence(&g).await.unwrap(),
        before,
        "not advanced"
    );
    let taken = store.advance_fence(&g, "cmd-other").await.unwrap();
    assert_eq!(taken, Fence(1));
    assert_eq!(
        store.observe_fence(&g).await.unwrap(),
        FenceView {
            fence: taken,
            taken_by: Some("cmd-other".into())
        },
        "the fence names the command that took it"
    );

    let unseen = seen(conflict("g-1", "cmd-1"), before.fence);
    assert_eq!(
        store.append(unseen, Uuid::new_v4()).await.unwrap_err(),
        StoreError::FenceLost(0)
    );
    assert_eq!(log_rows(&db).await, 0);

    let current = seen(conflict("g-1", "cmd-1"), taken);
    let recorded = store.append(current, Uuid::new_v4()).await.unwrap();
    assert!(!recorded.answered_before);
    let fence: Option<i64> =
        sqlx::query_scalar("select fence from operation_log where command_id = 'cmd-1'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(fence, None, "a refusal did not hold the lease");
}

/// A step journaled by an attempt that was fenced out is refused: the
/// journal names the latest attempt's containers, and a resumption trusts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_out_attempt_cannot_journal() {
    let db = TestDb::new().await;
    let store = PgStore::new(db.pool.clone());
    let g = game("g-1");
    let create = |container: &str| Step::Create {
        stage: Stage::Start,
        container_id: ContainerId(container.to_owned()),
    };
    let (store, g) = (&store, &g);
    let journal = |fence, container: &str| {
        let step = create(container);
        async move { store.journal(g, fence, "cmd-1", &step).await }
    };
    let old = store.advance_fence(g, "cmd-1").await.unwrap();
    journal(old, "c-old").await.unwrap();
    let new = store.advance_fence(g, "cmd-1").await.unwrap();
    journal(new, "c-new").await.unwrap();
    let late = journal(old, "c-late").await;
    assert_eq!(late, Err(StoreError::FenceLost(old.0)));
    let progress = store.progress("cmd-1").await.unwrap();
    assert_eq!(progress.steps, vec![create("c-new")]);
}

/// Two copies of a command answered without the lease at once: the second
/// writes nothing and gets the first's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_answer_without_the_lease_returns_the_first() {
    let db = TestDb::new().await;
    let store = PgStore::new(db.pool.clone());
    store
        .claim(&request("cmd-1", Some("g-1"), None))
        .await
        .unwrap();
    let answer = || write(conflict("g-1", "cmd-1"), None, None);
    let first = store.append(answer(), Uuid::new_v4()).await.unwrap();
    let second = store.append(answer(), Uuid::new_v4()).await.unwrap();
    assert!(!first.answered_before);
    assert!(second.answered_before);
    assert_eq!(second.event, first.event);
    assert_eq!(second.operation_id, first.operation_id);
    assert_eq!(log_rows(&db).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_change_without_the_lease_is_refused() {
    let db = TestDb::new().await;
    let store = PgStore::new(db.pool.clone());
    let g = game("g-1");
    let seen = store.observe_fence(&g).await.unwrap().fence;
    let refused = store
        .append(
            OperationWrite {
                entry: entry("g-1", "cmd-1", OpKind::Start, None),
                fence: WriteFence::Seen(seen),
                record: Some(record("g-1", IMAGE, running("c-1"))),
                answers: Answers::Command,
            },
            Uuid::new_v4(),
        )
        .await;
    assert!(
        matches!(refused, Err(StoreError::Corrupt(_))),
        "{refused:?}"
    );
    assert_eq!(log_rows(&db).await, 0);
    assert_eq!(store.load(&g).await.unwrap(), None);
}

/// What `append` relies on: a transaction holding the fence row `for share`
/// makes `advance_fence` wait until it ends, so a fence checked inside the
/// transaction is still current when it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn advance_fence_waits_for_a_transaction_holding_the_fence() {
    let db = TestDb::new().await;
    let store = PgStore::new(db.pool.clone());
    let g = game("g-1");
    store.advance_fence(&g, "cmd-test").await.unwrap();

    let mut tx = db.pool.begin().await.unwrap();
    let held: i64 =
        sqlx::query_scalar("select fence from game_fences where game_id = 'g-1' for share")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    assert_eq!(held, 1);

    let advancing = tokio::spawn({
        let store = store.clone();
        let g = g.clone();
        async move { store.advance_fence(&g, "cmd-test").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !advancing.is_finished(),
        "advance_fence must wait for the share lock"
    );

    tx.commit().await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), advancing)
        .await
        .expect("advance_fence finishes once the lock is released")
        .unwrap()
        .unwrap();
    assert_eq!(next, Fence(2));
}

/// `begin` (one call to `rtm_begin`) gives what its four parts give: the
/// next fence, the inbox's answer, the command's progress and the record.
/// And it reads after the fence moved: an earlier attempt's step committed
/// while `begin` waited for that attempt's `for share` lock is in the
/// progress it returns (a single statement would have read from before the
/// wait, and the attempt resumed without the step).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begin_reads_what_an_earlier_attempt_committed_while_it_waited() {
    let db = TestDb::new().await;
    let store = PgStore::new(db.pool.clone());
    let g = game("g-1");
    let cmd = request("cmd-1", Some("g-1"), None);

    // A first attempt: fresh, fence 1, nothing done, no record.
    let first = store.begin(&g, &cmd).await.unwrap();
    assert_eq!(first.fence, Fence(1));
    assert_eq!(first.claim, InboxClaim::Fresh);
    assert!(first.progress.is_empty());
    assert_eq!(first.record, Ok(None));
    let update = record("g-1", IMAGE, running("c-1"));
    store
        .append(
            write(
                entry("g-1", "cmd-1", OpKind::Start, Some(OpKind::Patch)),
                Some(first.fence),
                Some(update),
            ),
            Uuid::now_v7(),
        )
        .await
        .unwrap();

    // That attempt, still holding the fence row, journals a step and has
    // not committed yet when the second attempt begins.
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("select fence from game_fences where game_id = 'g-1' for share")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "insert into operation_journal (command_id, step, detail)
         values ('cmd-1', 'stop', '{\"container_id\": \"c-1\"}')",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    let second = tokio::spawn({
        let store = store.clone();
        let (g, cmd) = (g.clone(), cmd.clone());
        async move { store.begin(&g, &cmd).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !second.is_finished(),
        "begin waits for the fence row's lock"
    );
    tx.commit().await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("begin finishes once the lock is released")
        .unwrap()
        .unwrap();
    assert_eq!(second.fence, Fence(2));
    assert_eq!(second.claim, InboxClaim::Unfinished);
    assert_eq!(
        second.progress.steps,
        [Step::Stop {
            container_id: ContainerId("c-1".into())
        }],
        "the step committed while begin waited"
    );
    assert_eq!(second.progress.entries.len(), 1, "the inner start");
    let loaded = second.record.unwrap().expect("the record");
    assert_eq!(loaded.state, running("c-1"));
    assert_eq!(loaded.fence, 1);

    // Once finished, a third attempt is answered with the outcome; a
    // command reusing the id for something else is told so.
    let outer = store
        .append(
            write(
                entry("g-1", "cmd-1", OpKind::Patch, None),
                Some(second.fence),
                None,
            ),
            Uuid::now_v7(),
        )
        .await
        .unwrap();
    let third = store.begin(&g, &cmd).await.unwrap();
    assert_eq!(third.fence, Fence(3));
    assert_eq!(third.claim, InboxClaim::Finished(outer.event));
    let other = request("cmd-1", Some("g-2"), None);
    assert!(matches!(
        store.begin(&game("g-2"), &other).await.unwrap().claim,
        InboxClaim::Reused { .. }
    ));

    // A corrupt record is the op's to answer, not an outage.
    sqlx::query("update runtime_records set current_image_ref = '' where game_id = 'g-1'")
        .execute(&db.pool)
        .await
        .unwrap();
    let corrupt = store.begin(&g, &cmd).await.unwrap().record.unwrap_err();
    assert!(corrupt.contains("no current image_ref"), "{corrupt}");
}

/// The fence check of `append` holds until its commit, proven with a fixed
/// interleaving: a trigger parks the old writer right after its fence check
/// (inside its log insert) while a newer operation takes the fence. The
/// newer fence must not exist before the old write committed, or the old
/// writer would write "after" it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_taken_during_an_append_waits_for_its_commit() {
    let db = TestDb::new().await;
    let store = PgStore::new(db.pool.clone());
    let g = game("g-1");
    sqlx::query(
        "create function park_log_insert() returns trigger language plpgsql as
         $$ begin perform pg_sleep(1); return new; end $$",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "create trigger park_log_insert before insert on operation_log
         for each row execute function park_log_insert()",
    )
    .execute(&db.pool)
    .await
    .unwrap();

    let old = store.advance_fence(&g, "cmd-test").await.unwrap();
    let appending = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .append(
                    write(
                        entry("g-1", "cmd-old", OpKind::Start, None),
                        Some(old),
                        Some(record("g-1", IMAGE, running("c-old"))),
                    ),
                    Uuid::new_v4(),
                )
                .await
        }
    });
    // Wait until the old writer sits in the trigger, past its fence check.
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let parked: i64 = sqlx::query_scalar(
                "select count(*) from pg_stat_activity
                 where datname = current_database() and wait_event = 'PgSleep'",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap();
            if parked == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the append reaches its log insert");

    let new = store.advance_fence(&g, "cmd-test").await.unwrap();
    assert_eq!(
        log_rows(&db).await,
        1,
        "the newer fence was handed out while a write with the older one was in flight"
    );
    appending
        .await
        .unwrap()
        .expect("the old write passed its check and committed");
    assert_eq!(store.load(&g).await.unwrap().unwrap().fence, old.0);

    sqlx::query("drop trigger park_log_insert on operation_log")
        .execute(&db.pool)
        .await
        .unwrap();
    let stale = store
        .append(
            write(entry("g-1", "cmd-old", OpKind::Stop, None), Some(old), None),
            Uuid::new_v4(),
        )
        .await;
    assert_eq!(stale.unwrap_err(), StoreError::FenceLost(old.0));
    store
        .append(
            write(
                entry("g-1", "cmd-new", OpKind::Start, None),
                Some(new),
                Some(record("g-1", IMAGE, running("c-new"))),
            ),
            Uuid::new_v4(),
        )
        .await
        .unwrap();
    assert_eq!(store.load(&g).await.unwrap().unwrap().fence, new.0);
}

/// Workers racing for one game: each takes a fence and appends with it.
/// Whatever the interleaving, no write with an older fence lands after the
/// newer fence was taken: the fences in the log never go down, and the
/// record ends with the largest fence that wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_never_write_with_an_older_fence() {
    const WORKERS: usize = 4;
    const ROUNDS: usize = 25;

    let db = TestDb::new().await;
    let store = PgStore::new(db.pool.clone());
    let g = game("g-race");

    // Each round, every worker takes a fence before any of them writes: all
    // but the newest fence are stale when they write, in whatever order the
    // writes land. The barrier is what makes them contend; without it they
    // could run one after another and never be refused.
    let taken = Arc::new(tokio::sync::Barrier::new(WORKERS));
    let mut tasks = Vec::new();
    for worker in 0..WORKERS {
        let store = store.clone();
        let g = g.clone();
        let taken = taken.clone();
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::new();
            for round in 0..ROUNDS {
                let fence = store.advance_fence(&g, "cmd-test").await.unwrap();
                taken.wait().await;
                let command = format!("cmd-{worker}-{round}");
                let result = store
                    .append(
                        write(
                            entry("g-race", &command, OpKind::Start, Some(OpKind::Restart)),
                            Some(fence),
                            Some(record("g-race", IMAGE, running(&command))),
                        ),
                        Uuid::new_v4(),
                    )
                    .await;
                results.push((fence, result));
                // And nobody takes the next round's fence before every
                // write of this one landed.
                taken.wait().await;
            }
            results
        }));
    }

    let mut written = Vec::new();
    let mut refused = 0;
    for task in tasks {
        for (fence, result) in task.await.unwrap() {
            match result {
                Ok(_) => written.push(fence.0),
                Err(StoreError::FenceLost(f)) => {
                    assert_eq!(f, fence.0);
                    refused += 1;
                }
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
    }
    assert_eq!(written.len() + refused, WORKERS * ROUNDS);
    // The newest fence of each round wins; the other writers lost the race.
    // (Only the newest: a stale fence that wrote before it is still stale.)
    assert_eq!(
        (written.len(), refused),
        (ROUNDS, (WORKERS - 1) * ROUNDS),
        "one write per round, the others refused"
    );

    let fences: Vec<i64> =
        sqlx::query_scalar("select fence from operation_log order by operation_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        fences.len(),
        written.len(),
        "a refused append wrote a log row"
    );
    assert!(
        fences.windows(2).all(|w| w[0] <= w[1]),
        "an older fence wrote after a newer one: {fences:?}"
    );
    assert_eq!(outbox_rows(&db).await, written.len() as i64);

    let last = *written.iter().max().unwrap();
    let rec = store.load(&g).await.unwrap().unwrap();
    assert_eq!(
        rec.fence, last,
        "the record must carry the newest fence that wrote"
    );
}

// ---------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_maps_every_status() {
    let db = TestDb::new().await;
    let store = PgStore::new(db.pool.clone());
    let g = game("g-1");
    assert_eq!(store.load(&g).await.unwrap(), None);

    let states = [
        running("c-1"),
        RuntimeState::Running {
            container_id: ContainerId("c-2".into()),
            address: None,
        },
        RuntimeState::Stopped {
            container_id: Some(ContainerId("c-2".into())),
        },
        RuntimeState::Stopped { container_id: None },
        RuntimeState::Removed,
    ];
    for state in states {
        let fence = store.advance_fence(&g, "cmd-test").await.unwrap();
        let update = record("g-1", IMAGE, state.clone());
        store
            .append(
                write(
                    entry("g-1", "cmd", OpKind::Start, Some(OpKind::Restart)),
                    Some(fence),
                    Some(update.clone()),
                ),
                Uuid::new_v4(),
            )
            .await
            .unwrap();
        let loaded = store.load(&g).await.unwrap().unwrap();
        assert_eq!(loaded.state, state);
        assert_eq!(loaded.status(), state.status());
        assert_eq!(loaded.game_id, g);
        assert_eq!(loaded.image_ref, update.image_ref);
        assert_eq!(loaded.state_dir, update.state_dir);
        assert_eq!(loaded.fence, fence.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_rejects_a_corrupt_row() {
    let db = TestDb::new().await;
    let store = PgStore::new(db.pool.clone());
    let rows = [
        ("g-empty", "", "has no current image_ref"),
        ("g-bad", "Bad Ref", "has an invalid current image_ref"),
    ];
    for (game_id, image, _) in rows {
        sqlx::query(
            "insert into runtime_records (game_id, status, current_image_ref, state_dir, fence)
             values ($1, 'stopped', $2, '/tmp/x', 1)",
        )
        .bind(game_id)
        .bind(image)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    for (game_id, _, why) in rows {
        match store.load(&game(game_id)).await {
            Err(StoreError::Corrupt(msg)) => {
                assert!(
                    msg.contains(&format!("runtime record for game \"{game_id}\" {why}")),
                    "{msg}"
                );
            }
            other => panic!("{game_id}: expected Corrupt, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schema_refuses_impossible_rows() {
    let db = TestDb::new().await;
    let bad = [
        // running without a container
        "insert into runtime_records (game_id, status, current_image_ref, state_dir, fence)
         values ('g', 'running', 'a:1.0.0', '/x', 1)",
        // unknown status
        "insert into runtime_records (game_id, status, current_image_ref, state_dir, fence)
         values ('g', 'paused', 'a:1.0.0', '/x', 1)",
        // a failure without a code
        "insert into operation_log (game_id, op, op_source, correlation_id, command_id, outcome,
                                    started_at, finished_at)
         values ('g', 'start', 'admin', 'c', 'c', 'failure', now(), now())",
        // a success with a code
        "insert into operation_log (game_id, op, op_source, correlation_id, command_id, outcome,
                                    error_code, started_at, finished_at)
         values ('g', 'start', 'admin', 'c', 'c', 'success', 'internal', now(), now())",
    ];
    for sql in bad {
        let err = sqlx::query(sql).execute(&db.pool).await.unwrap_err();
        let db_err = err.as_database_error().expect("a database error");
        assert!(db_err.is_check_violation(), "{sql}: {db_err}");
    }
}

// ---------------------------------------------------------------------------
// Relay and history
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsent_events_come_in_write_order_until_marked_sent() {
    let db = TestDb::new().await;
    let store = PgStore::new(db.pool.clone());
    let mut events = Vec::new();
    for (game_id, command) in [("g-1", "c-1"), ("g-2", "c-2"), ("g-1", "c-3")] {
        let fence = store
            .advance_fence(&game(game_id), "cmd-test")
            .await
            .unwrap();
        let recorded = store
            .append(
                write(
                    entry(game_id, command, OpKind::Start, None),
                    Some(fence),
                    None,
                ),
                Uuid::new_v4(),
            )
            .await
            .unwrap();
        events.push(recorded.event);
    }
    assert_eq!(store.outbox_backlog().await.unwrap(), 3);

    let pending = store.unsent_events(10).await.unwrap();
    assert_eq!(
        pending.iter().map(|p| p.event_id).collect::<Vec<_>>(),
        events.iter().map(|e| e.event_id).collect::<Vec<_>>()
    );
    for (p, e) in pending.iter().zip(&events) {
        assert_eq!(p.payload, serde_json::to_value(e).unwrap());
        assert_eq!(p.correlation_id, e.correlation_id);
        assert_eq!(p.occurred_at(), Some(e.occurred_at));
    }
    assert!(pending.windows(2).all(|w| w[0].seq < w[1].seq));
    assert!(
        pending
            .iter()
            .all(|p| p.routing_key == "runtime.start.success")
    );

    let first_two = store.unsent_events(2).await.unwrap();
    assert_eq!(first_two, pending[..2]);

    let ids: Vec<Uuid> = first_two.iter().map(|p| p.event_id).collect();
    assert_eq!(store.mark_sent(&ids).await.unwrap(), 2);
    assert_eq!(
        store.mark_sent(&ids).await.unwrap(),
        0,
        "marking twice changes nothing"
    );
    assert_eq!(store.mark_sent(&[]).await.unwrap(), 0);
    assert_eq!(store.outbox_backlog().await.unwrap(), 1);
    assert_eq!(store.unsent_events(10).await.unwrap(), pending[2..]);
}

/// A stored event this build cannot decode (a newer worker's, say, with an
/// error code added since) is handed to the relay as stored, and the events
/// behind it are not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_this_build_cannot_read_is_still_relayed() {
    let db = TestDb::new().await;
    let store = PgStore::new(db.pool.clone());
    let future = serde_json::json!({
        "event_id": "0194b3a0-0000-7000-8000-000000000001",
        "game_id": "g-1",
        "outcome": "failure",
        "error_code": "quota_exceeded",
        "occurred_at": "2026-11-27T12:00:00Z",
        "correlation_id": "corr-future"
    });
    sqlx::query(
        "insert into outbox (event_id, game_id, routing_key, correlation_id, payload)
         values ('0194b3a0-0000-7000-8000-000000000001', 'g-1', 'runtime.start.failure',
                 'corr-future', $1)",
    )
    .bind(&future)
    .execute(&db.pool)
    .await
    .unwrap();
    let fence = store.advance_fence(&game("g-2"), "cmd-test").await.unwrap();
    let behind = store
        .append(
            write(entry("g-2", "c-2", OpKind::Start, None), Some(fence), None),
            Uuid::new_v4(),
        )
        .await
        .unwrap();

    let pending = store.unsent_events(10).await.unwrap();
    assert_eq!(pending.len(), 2);
    assert_eq!(pending[0].payload, future, "published as stored");
    assert_eq!(pending[0].correlation_id, "corr-future");
    assert_eq!(
        pending[0].occurred_at().map(|t| t.to_rfc3339()),
        Some("2026-11-27T12:00:00+00:00".to_owned())
    );
    assert_eq!(pending[1].event_id, behind.event.event_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_events_and_republished_events_reach_the_relay() {
    let db = TestDb::new().await;
    let store = PgStore::new(db.pool.clone());

    // A message that could not be decoded: an event with no log entry.
    let mut rejected = OutcomeEvent::from_entry(
        &entry("", "cmd-bad", OpKind::Start, None),
        0,
        Uuid::new_v4(),
    );
    rejected.operation_id = None;
    rejected.op = None;
    store.append_rejected(&rejected).await.unwrap();
    store.append_rejected(&rejected).await.unwrap();
    let pending = store.unsent_events(10).await.unwrap();
    assert_eq!(
        pending.len(),
        1,
        "storing the same rejection twice keeps one"
    );
    assert_eq!(pending[0].event_id, rejected.event_id);
    assert_eq!(pending[0].payload, serde_json::to_value(&rejected).unwrap());
    assert_eq!(pending[0].routing_key, "runtime.rejected");
    assert_eq!(store.history("", None, 10).await.unwrap(), []);

    // A finished command's outcome, sent, then asked for again.
    let fence = store.advance_fence(&game("g-1"), "cmd-test").await.unwrap();
    let recorded = store
        .append(
            write(
                entry("g-1", "cmd-1", OpKind::Start, None),
                Some(fence),
                None,
            ),
            Uuid::new_v4(),
        )
        .await
        .unwrap();
    let ids = [rejected.event_id, recorded.event.event_id];
    assert_eq!(store.mark_sent(&ids).await.unwrap(), 2);
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);

    store.republish(recorded.event.event_id).await.unwrap();
    let again = store.unsent_events(10).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(
        again[0].payload,
        serde_json::to_value(&recorded.event).unwrap(),
        "same event, same event_id"
    );

    // Each republish owes one publication, also when the previous one has
    // not gone out yet (a duplicate arriving before the relay ran).
    let id = recorded.event.event_id;
    assert_eq!(store.mark_sent(&[id]).await.unwrap(), 1);
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
    store.republish(id).await.unwrap();
    store.republish(id).await.unwrap();
    for publication in 1..=2 {
        assert_eq!(
            store.unsent_events(10).await.unwrap().len(),
            1,
            "publication {publication} is owed"
        );
        store.mark_sent(&[id]).await.unwrap();
    }
    assert_eq!(
        store.outbox_backlog().await.unwrap(),
        0,
        "two publications, no more"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_newest_first_and_filters_by_correlation() {
    let db = TestDb::new().await;
    let store = PgStore::new(db.pool.clone());
    let g = game("g-1");

    // A patch (inner stop, inner start, outer patch), then a stop.
    let mut written = Vec::new();
    let patch = [
        entry("g-1", "cmd-p", OpKind::Stop, Some(OpKind::Patch)),
        entry("g-1", "cmd-p", OpKind::Start, Some(OpKind::Patch)),
        entry("g-1", "cmd-p", OpKind::Patch, None),
    ];
    let fence = store.advance_fence(&g, "cmd-test").await.unwrap();
    for e in patch {
        written.push(
            store
                .append(write(e, Some(fence), None), Uuid::new_v4())
                .await
                .unwrap()
                .event,
        );
    }
    let fence = store.advance_fence(&g, "cmd-test").await.unwrap();
    written.push(
        store
            .append(
                write(entry("g-1", "cmd-s", OpKind::Stop, None), Some(fence), None),
                Uuid::new_v4(),
            )
            .await
            .unwrap()
            .event,
    );
    // Another game's entry stays out of this history.
    let other = store.advance_fence(&game("g-2"), "cmd-test").await.unwrap();
    store
        .append(
            write(entry("g-2", "cmd-p", OpKind::Stop, None), Some(other), None),
            Uuid::new_v4(),
        )
        .await
        .unwrap();

    let newest_first: Vec<_> = written.iter().rev().cloned().collect();
    assert_eq!(store.history("g-1", None, 100).await.unwrap(), newest_first);
    assert_eq!(
        store.history("g-1", None, 2).await.unwrap(),
        newest_first[..2]
    );
    assert_eq!(
        store.history("g-1", Some("corr-cmd-p"), 100).await.unwrap(),
        newest_first[1..]
    );
    assert_eq!(store.history("g-unknown", None, 100).await.unwrap(), []);
}

/// Issue 10, point 11: `RTM_RETENTION`. A sweep deletes finished inbox
/// rows and published outbox rows older than the retention, and fence rows
/// at 0 of games with no record; it keeps the operation log (the history
/// still shows the entry, rebuilt from the log), anything younger, an
/// unpublished event, the entries of a command still unfinished, and any
/// fence that ever moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_deletes_only_what_retention_lets_go() {
    let db = TestDb::new().await;
    let store = PgStore::new(db.pool.clone());
    let g = game("g-1");
    // cmd-old finished long ago, cmd-new just now; cmd-open is a patch
    // whose worker died after its inner stop.
    for command in ["cmd-old", "cmd-new", "cmd-open"] {
        assert_eq!(
            store
                .claim(&request(command, Some("g-1"), None))
                .await
                .unwrap(),
            InboxClaim::Fresh
        );
    }
    for (command, op, outer) in [
        ("cmd-old", OpKind::Stop, None),
        ("cmd-new", OpKind::Stop, None),
        ("cmd-open", OpKind::Stop, Some(OpKind::Patch)),
    ] {
        let fence = store.advance_fence(&g, command).await.unwrap();
        store
            .append(
                write(entry("g-1", command, op, outer), Some(fence), None),
                Uuid::new_v4(),
            )
            .await
            .unwrap();
    }
    let unsent = store
        .append(
            write(entry("g-2", "cmd-unsent", OpKind::Stop, None), None, None),
            Uuid::new_v4(),
        )
        .await
        .unwrap();
    // Everything published and (but cmd-new) eight days old.
    sqlx::query("update outbox set sent_at = now() - interval '8 days', created_at = now() - interval '8 days' where game_id = 'g-1'")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("update outbox set sent_at = now() where correlation_id = 'corr-cmd-new'")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("update outbox set sent_at = null, created_at = now() - interval '8 days' where event_id = $1")
        .bind(unsent.event.event_id)
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("update inbox set finished_at = now() - interval '8 days' where command_id in ('cmd-old', 'cmd-unsent')")
        .execute(&db.pool)
        .await
        .unwrap();
    // A game only ever refused (fence row at 0, no record).
    store.observe_fence(&game("ghost")).await.unwrap();
    let before = store.history("g-1", None, 100).await.unwrap();

    let swept = store
        .sweep(Duration::from_secs(7 * 24 * 3600))
        .await
        .unwrap();

    let inbox: Vec<String> = sqlx::query_scalar("select command_id from inbox order by command_id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(inbox, ["cmd-new", "cmd-open"], "finished long ago: gone");
    let outbox: Vec<String> =
        sqlx::query_scalar("select correlation_id from outbox order by correlation_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        outbox,
        ["corr-cmd-new", "corr-cmd-open", "corr-cmd-unsent"],
        "young, still needed by an unfinished command, or unsent: kept"
    );
    assert_eq!(log_rows(&db).await, 4, "the operation log is kept");
    let fences: Vec<String> =
        sqlx::query_scalar("select game_id from game_fences order by game_id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        fences,
        ["g-1"],
        "a fence that moved is kept, the ghost's is not"
    );
    assert_eq!(
        swept,
        Swept {
            inbox: 2,
            outbox: 1,
            fences: 1
        }
    );

    let after = store.history("g-1", None, 100).await.unwrap();
    assert_eq!(
        after.len(),
        before.len(),
        "the history still shows every entry"
    );
    let old = after.last().unwrap();
    assert_eq!(old.command_id, "cmd-old");
    assert_eq!(old.event_id, Uuid::nil(), "rebuilt from the log");
    // The same entry but its event id (and timestamps, which the log
    // column keeps to the microsecond).
    let mut expected = before.last().unwrap().clone();
    assert!(
        (expected.finished_at - old.finished_at)
            .num_milliseconds()
            .abs()
            < 1
    );
    expected.event_id = Uuid::nil();
    expected.started_at = old.started_at;
    expected.finished_at = old.finished_at;
    expected.occurred_at = old.occurred_at;
    assert_eq!(*old, expected);
}

// ---------------------------------------------------------------------------
// Connection
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_creates_a_missing_database_and_migrates_it() {
    let name = unique("rtm_test_connect").replace('-', "_");
    let base = admin_database_url();
    let (server, _) = base.rsplit_once('/').expect("a database URL");
    let url = SecretUrl::new(format!("{server}/{name}"));

    // Two workers starting at once: both succeed, one database.
    let (a, b) = tokio::join!(PgStore::connect(&url), PgStore::connect(&url));
    let (a, b) = (a.unwrap(), b.unwrap());
    let (ma, mb) = tokio::join!(a.migrate(), b.migrate());
    ma.unwrap();
    mb.unwrap();
    a.migrate().await.expect("migrating again is a no-op");
    a.ping().await.unwrap();
    assert_eq!(a.outbox_backlog().await.unwrap(), 0);
    a.pool().close().await;
    b.pool().close().await;

    let admin: PgConnectOptions = base.parse().unwrap();
    let mut conn = admin.connect().await.unwrap();
    conn.execute(sqlx::AssertSqlSafe(format!(
        r#"drop database "{name}" with (force)"#
    )))
    .await
    .unwrap();
    conn.close().await.ok();
}

/// The relay's mark commits without waiting for the WAL flush, and only
/// it: the setting is its transaction's, so the next statement on the same
/// connection (a fence, an outcome) still commits durably.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mark_sent_leaves_the_connection_committing_durably() {
    let db = TestDb::new().await;
    // One connection: whatever the mark leaves on it, the next call gets.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await
        .unwrap();
    let store = PgStore::new(pool.clone());
    let recorded = store
        .append(
            write(entry("g-1", "cmd-1", OpKind::Stop, None), None, None),
            Uuid::new_v4(),
        )
        .await
        .unwrap();
    assert_eq!(
        store.mark_sent(&[recorded.event.event_id]).await.unwrap(),
        1
    );
    let setting: String = sqlx::query_scalar("show synchronous_commit")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(setting, "on");
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_unavailable_not_a_hang() {
    // Nothing listens on port 1; connect lazily so the error shows up on use.
    let options: PgConnectOptions = "postgres://postgres@127.0.0.1:1/rtmanager".parse().unwrap();
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect_lazy_with(options);
    let store = PgStore::new(pool);

    let started = std::time::Instant::now();
    let err = store.ping().await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let err = store
        .advance_fence(&game("g-1"), "cmd-test")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
}
