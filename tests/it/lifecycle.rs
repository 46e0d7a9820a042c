//! The lifecycle services end to end on the real PostgreSQL, Redis and
//! Docker, without the broker: every outcome an op can produce here.

use std::time::Duration;

use chrono::Utc;
use rtmanager::config::LifecycleConfig;
use rtmanager::domain::{
    AllowedImages, CommandRequest, GameId, OpKind, Outcome, OutcomeEvent, RuntimeStatus,
};
use rtmanager::error::ErrorCode;
use rtmanager::lifecycle::Lifecycle;
use rtmanager::outbound::docker::DockerEngine;
use rtmanager::outbound::postgres::PgStore;
use rtmanager::outbound::redis_lease::RedisLeases;
use rtmanager::ports::{Acquired, ContainerEngine, LeaseHolder, LeaseStore, RuntimeStore};

use crate::docker_support::TestImageTag;
use crate::harness::{World, assert_success, command_request, lifecycle_config, unique};

const ENGINE_142: &str = "rtm-test/engine:1.4.2";
const ENGINE_143: &str = "rtm-test/engine:1.4.3";

type Service = Lifecycle<PgStore, RedisLeases, DockerEngine>;

/// One test's world: its own database, Redis prefix, container prefix and
/// state root.
struct Rig {
    service: Service,
    world: World,
}

/// A rig is the shared test world plus the one lifecycle over it.
impl std::ops::Deref for Rig {
    type Target = World;

    fn deref(&self) -> &World {
        &self.world
    }
}

/// A row of `operation_log`, the columns the tests look at.
#[derive(Debug, Clone, sqlx::FromRow)]
struct LogRow {
    op: String,
    outer_op: Option<String>,
    outcome: String,
    error_code: Option<String>,
    correlation_id: String,
    image_ref: Option<String>,
    container_id: Option<String>,
    rolled_back: bool,
    started_at: chrono::DateTime<Utc>,
    finished_at: chrono::DateTime<Utc>,
}

impl Rig {
    async fn new() -> Self {
        Self::with(|_| {}).await
    }

    async fn with(edit: impl FnOnce(&mut LifecycleConfig)) -> Self {
        let mut cfg = lifecycle_config();
        edit(&mut cfg);
        let world = World::new().await;
        let service = world.lifecycle(cfg);
        Self { world, service }
    }

    fn game(&self) -> GameId {
        self.docker.game()
    }

    fn request(&self, op: OpKind, game: &GameId, image: Option<&str>) -> CommandRequest {
        command_request(op, game, image)
    }

    /// Runs a request to its outcome; the lease is free afterwards, always.
    async fn run(&self, request: CommandRequest) -> OutcomeEvent {
        let game = request.game_id.clone().unwrap_or_default();
        let handled = tokio::time::timeout(Duration::from_secs(60), self.service.handle(request))
            .await
            .expect("the command finishes within a minute")
            .expect("the command is recorded");
        if let Ok(game) = GameId::parse(&game) {
            self.assert_lease_free(&game).await;
        }
        handled.event
    }

    async fn op(&self, op: OpKind, game: &GameId, image: Option<&str>) -> OutcomeEvent {
        self.run(self.request(op, game, image)).await
    }

    async fn started(&self, image: &str) -> GameId {
        let game = self.game();
        let event = self.op(OpKind::Start, &game, Some(image)).await;
        assert_success(&event);
        game
    }

    async fn assert_lease_free(&self, game: &GameId) {
        let holder = self.leases.holder_of(game).await.expect("read the lease");
        assert_eq!(holder, None, "the lease of {game} is still held");
    }

    async fn log(&self, game: &GameId) -> Vec<LogRow> {
        sqlx::query_as::<_, LogRow>(
            "SELECT op, outer_op, outcome, error_code, correlation_id, image_ref,
                    container_id, rolled_back, started_at, finished_at
             FROM operation_log WHERE game_id = $1 ORDER BY operation_id",
        )
        .bind(game.as_str())
        .fetch_all(&self.db.pool)
        .await
        .expect("read the operation log")
    }

    /// The log entries of one correlation id, as `op/outer_op/outcome`.
    async fn steps(&self, game: &GameId, correlation: &str) -> Vec<String> {
        self.log(game)
            .await
            .into_iter()
            .filter(|r| r.correlation_id == correlation)
            .map(|r| match r.outer_op {
                Some(outer) => format!("{outer}.{}.{}", r.op, r.outcome),
                None => format!("{}.{}", r.op, r.outcome),
            })
            .collect()
    }

    async fn outbox_count(&self, correlation: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM outbox WHERE correlation_id = $1")
            .bind(correlation)
            .fetch_one(&self.db.pool)
            .await
            .expect("count outbox rows")
    }

    async fn status(&self, game: &GameId) -> (RuntimeStatus, String) {
        let record = self
            .service
            .store()
            .load(game)
            .await
            .expect("load")
            .expect("a record");
        (record.status(), record.image_ref.to_string())
    }

    /// What Docker runs for the game: (running, image as given, container id).
    async fn docker_state(&self, game: &GameId) -> Option<(bool, String, String)> {
        self.docker
            .engine
            .inspect(game)
            .await
            .expect("inspect")
            .map(|i| (i.running, i.image_ref, i.id.to_string()))
    }

    async fn boots(&self, game: &GameId) -> String {
        let path = self.docker.engine.state_dir(game).join("boots");
        tokio::fs::read_to_string(&path).await.unwrap_or_default()
    }
}

#[track_caller]
fn assert_failure(event: &OutcomeEvent, code: ErrorCode) -> String {
    assert_eq!(
        event.outcome,
        Outcome::Failure,
        "expected {code}, got success"
    );
    assert_eq!(event.error_code, Some(code), "{:?}", event.error_message);
    event.error_message.clone().unwrap_or_default()
}

// --- validation, before the lease ----------------------------------------

#[tokio::test]
async fn invalid_request_is_recorded_and_answered() {
    let rig = Rig::new().await;
    let game = rig.game();

    let mut empty_image = rig.request(OpKind::Patch, &game, Some(""));
    empty_image.source_ref = Some(unique("req"));
    let event = rig.run(empty_image.clone()).await;
    let message = assert_failure(&event, ErrorCode::InvalidRequest);
    assert!(message.contains("new_image_ref"), "{message}");
    assert_eq!(
        event.correlation_id,
        empty_image.source_ref.clone().unwrap()
    );
    assert_eq!(rig.outbox_count(&event.correlation_id).await, 1);

    let mut bad_game = rig.request(OpKind::Stop, &game, None);
    bad_game.game_id = Some("../etc".into());
    let event = rig.run(bad_game).await;
    assert_failure(&event, ErrorCode::InvalidRequest);
    assert_eq!(
        event.game_id, "../etc",
        "the event echoes the game_id as sent"
    );

    let mut bad_source = rig.request(OpKind::Start, &game, Some(ENGINE_142));
    bad_source.op_source = Some("hacker".into());
    assert_failure(&rig.run(bad_source).await, ErrorCode::InvalidRequest);
    assert!(
        rig.docker_state(&game).await.is_none(),
        "nothing was started"
    );
}

/// Issue 10, point 3: an 8,000-character game_id, decoded as the worker
/// decodes it, is answered `invalid_request` with its echo cut to 256
/// bytes, and the answer is written (uncut it overflowed the btree index of
/// `operation_log`, so the command got no answer at all).
#[tokio::test]
async fn an_8000_character_game_id_is_answered_invalid_request() {
    let rig = Rig::new().await;
    let long = "g".repeat(8000);
    let body = serde_json::json!({"command_id": unique("long"), "op": "stop",
                                  "game_id": long, "op_source": "lobby"});
    let request = rtmanager::messages::decode_command(
        &serde_json::to_vec(&body).unwrap(),
        &rtmanager::messages::Envelope::default(),
    )
    .expect("a command");
    let event = rig.run(request).await;
    let message = assert_failure(&event, ErrorCode::InvalidRequest);
    assert!(message.contains("game_id"), "{message}");
    assert!(message.len() < 1024, "the message is bounded: {message}");
    assert!(event.game_id.len() <= 256, "{} bytes", event.game_id.len());
    assert!(event.game_id.ends_with('…') && long.starts_with(event.game_id.trim_end_matches('…')));
    let logged: i64 = sqlx::query_scalar("SELECT count(*) FROM operation_log WHERE game_id = $1")
        .bind(&event.game_id)
        .fetch_one(&rig.db.pool)
        .await
        .unwrap();
    assert_eq!(logged, 1, "the answer is in the operation log");
    assert_eq!(rig.outbox_count(&event.correlation_id).await, 1);
}

/// Issue 10, point 4: a command_id names one command. A start of game B
/// reusing the command_id of game A's start is answered `invalid_request`
/// on B and never runs (it used to get A's outcome and B never started);
/// its redelivery finds that answer; A's duplicate still gets A's outcome;
/// a stop of A reusing the id does not stop A.
#[tokio::test]
async fn a_reused_command_id_is_answered_on_its_own_game_and_never_run() {
    let rig = Rig::new().await;
    let (a, b) = (rig.game(), rig.game());
    let mut first = rig.request(OpKind::Start, &a, Some(ENGINE_142));
    first.command_id = unique("reused");
    let first_event = rig.run(first.clone()).await;
    assert_success(&first_event);

    let mut other_game = rig.request(OpKind::Start, &b, Some(ENGINE_142));
    other_game.command_id = first.command_id.clone();
    let event = rig.run(other_game.clone()).await;
    let message = assert_failure(&event, ErrorCode::InvalidRequest);
    assert!(
        message.contains("already used for another command"),
        "{message}"
    );
    assert!(
        message.contains(a.as_str()),
        "names the command it was used for: {message}"
    );
    assert_eq!(event.game_id, b.as_str(), "answered on its own game");
    assert_eq!(event.command_id, first.command_id);
    assert!(rig.docker_state(&b).await.is_none(), "B never ran");

    let again = rig.run(other_game).await;
    assert_eq!(
        again.event_id, event.event_id,
        "a redelivery finds its answer"
    );
    assert_eq!(rig.log(&b).await.len(), 1, "written once");

    let duplicate = rig.run(first.clone()).await;
    assert_eq!(
        duplicate.event_id, first_event.event_id,
        "A keeps its outcome"
    );

    let mut other_op = rig.request(OpKind::Stop, &a, None);
    other_op.command_id = first.command_id.clone();
    assert_failure(&rig.run(other_op).await, ErrorCode::InvalidRequest);
    let mut other_image = rig.request(OpKind::Start, &a, Some(ENGINE_143));
    other_image.command_id = first.command_id.clone();
    assert_failure(&rig.run(other_image).await, ErrorCode::InvalidRequest);
    let (running, image, _) = rig.docker_state(&a).await.expect("A's container");
    assert!(running, "A still runs");
    assert_eq!(image, ENGINE_142);
    assert_eq!(rig.status(&a).await.0, RuntimeStatus::Running);
}

#[tokio::test]
async fn image_outside_the_allow_list_is_refused() {
    let rig = Rig::with(|c| c.allowed_images = AllowedImages::parse("rtm-test/engine")).await;
    let game = rig.started(ENGINE_142).await;
    let event = rig
        .op(OpKind::Patch, &game, Some("rtm-test/healthy:1.4.3"))
        .await;
    assert_failure(&event, ErrorCode::ImageNotAllowed);
    let event = rig
        .op(
            OpKind::Start,
            &rig.game(),
            Some("rtm-test/engine-evil:1.4.2"),
        )
        .await;
    assert_failure(&event, ErrorCode::ImageNotAllowed);
}

// --- record and lease checks -----------------------------------------------

#[tokio::test]
async fn ops_on_an_unknown_game_are_not_found() {
    let rig = Rig::new().await;
    let game = rig.game();
    for (op, image) in [
        (OpKind::Patch, Some(ENGINE_143)),
        (OpKind::Stop, None),
        (OpKind::Restart, None),
        (OpKind::Remove, None),
    ] {
        let event = rig.op(op, &game, image).await;
        assert_failure(&event, ErrorCode::NotFound);
    }
}

#[tokio::test]
async fn a_lease_held_by_another_command_is_conflict() {
    let rig = Rig::new().await;
    let game = rig.started(ENGINE_142).await;
    let (_, _, container_before) = rig.docker_state(&game).await.unwrap();

    let other = LeaseHolder::new("another-command");
    let held = rig
        .leases
        .acquire(&game, &other, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(held, Acquired::Yes);

    let request = rig.request(OpKind::Patch, &game, Some(ENGINE_143));
    let handled = rig.service.handle(request).await.unwrap();
    let message = assert_failure(&handled.event, ErrorCode::Conflict);
    assert_eq!(
        message,
        "another lifecycle operation is in progress for this game"
    );
    // The other command's lease is untouched, and so is the game.
    assert_eq!(
        rig.leases.holder_of(&game).await.unwrap(),
        Some(other.value())
    );
    assert_eq!(
        rig.docker_state(&game).await.unwrap(),
        (true, ENGINE_142.to_owned(), container_before)
    );
    rig.leases.release(&game, &other).await.unwrap();
}

#[tokio::test]
async fn patch_or_restart_of_a_removed_game_is_conflict() {
    let rig = Rig::new().await;
    let game = rig.started(ENGINE_142).await;
    assert_success(&rig.op(OpKind::Remove, &game, None).await);
    assert_eq!(rig.status(&game).await.0, RuntimeStatus::Removed);
    assert!(rig.docker_state(&game).await.is_none());

    let message = assert_failure(
        &rig.op(OpKind::Patch, &game, Some(ENGINE_143)).await,
        ErrorCode::Conflict,
    );
    assert!(message.contains("removed"), "{message}");
    assert_failure(
        &rig.op(OpKind::Restart, &game, None).await,
        ErrorCode::Conflict,
    );
    // A removed game may start again, with any image, on its kept state.
    assert_success(&rig.op(OpKind::Start, &game, Some(ENGINE_143)).await);
    assert_eq!(rig.boots(&game).await, "1.4.2\n1.4.3\n");
}

#[tokio::test]
async fn start_rules_follow_the_record_and_docker() {
    let rig = Rig::new().await;
    let game = rig.started(ENGINE_142).await;

    // Same image, and Docker confirms it runs: a no-op.
    let event = rig.op(OpKind::Start, &game, Some(ENGINE_142)).await;
    assert_success(&event);
    assert!(event.noop);
    assert_eq!(rig.boots(&game).await, "1.4.2\n", "no second boot");

    // Running with another image: conflict.
    let message = assert_failure(
        &rig.op(OpKind::Start, &game, Some(ENGINE_143)).await,
        ErrorCode::Conflict,
    );
    assert!(message.contains("patch"), "{message}");

    // Stopped: only the recorded image may start it.
    assert_success(&rig.op(OpKind::Stop, &game, None).await);
    assert_failure(
        &rig.op(OpKind::Start, &game, Some(ENGINE_143)).await,
        ErrorCode::Conflict,
    );
    let event = rig.op(OpKind::Start, &game, Some(ENGINE_142)).await;
    assert_success(&event);
    assert!(!event.noop);
    assert!(event.address.is_some(), "the address is reported");
    assert_eq!(
        rig.status(&game).await,
        (RuntimeStatus::Running, ENGINE_142.into())
    );
}

#[tokio::test]
async fn a_start_the_record_believes_in_but_docker_does_not_runs_again() {
    let rig = Rig::new().await;
    let game = rig.started(ENGINE_142).await;
    // The container died behind the manager's back.
    let (_, _, id) = rig.docker_state(&game).await.unwrap();
    rig.docker
        .engine
        .stop(&rtmanager::domain::ContainerId(id), Duration::from_secs(1))
        .await
        .unwrap();
    let event = rig.op(OpKind::Start, &game, Some(ENGINE_142)).await;
    assert_success(&event);
    assert!(
        !event.noop,
        "decided from what Docker reports, not the record"
    );
    assert!(rig.docker_state(&game).await.unwrap().0);
}

// --- semver pre-checks -----------------------------------------------------

#[tokio::test]
async fn patch_refuses_tags_that_are_not_semver() {
    let rig = Rig::new().await;

    let latest = rig.started("rtm-test/engine:latest").await;
    let before = rig.docker_state(&latest).await;
    let message = assert_failure(
        &rig.op(OpKind::Patch, &latest, Some(ENGINE_143)).await,
        ErrorCode::ImageRefNotSemver,
    );
    assert!(message.starts_with("current image_ref"), "{message}");
    assert_eq!(rig.docker_state(&latest).await, before, "untouched");

    let game = rig.started(ENGINE_142).await;
    let before = rig.docker_state(&game).await;
    let message = assert_failure(
        &rig.op(OpKind::Patch, &game, Some("rtm-test/engine:latest"))
            .await,
        ErrorCode::ImageRefNotSemver,
    );
    assert!(message.starts_with("new image_ref"), "{message}");
    assert_eq!(rig.docker_state(&game).await, before, "untouched");
    assert_eq!(
        rig.log(&game).await.len(),
        2,
        "start + the failed patch, and no inner entries"
    );
}

#[tokio::test]
async fn patch_must_keep_major_and_minor() {
    let rig = Rig::new().await;
    let game = rig.started(ENGINE_142).await;
    let before = rig.docker_state(&game).await;

    let minor = assert_failure(
        &rig.op(OpKind::Patch, &game, Some("rtm-test/engine:1.5.0"))
            .await,
        ErrorCode::SemverPatchOnly,
    );
    assert!(
        minor.contains("1.4.2") && minor.contains("1.5.0"),
        "{minor}"
    );
    let major = assert_failure(
        &rig.op(OpKind::Patch, &game, Some("rtm-test/engine:2.0.0"))
            .await,
        ErrorCode::SemverPatchOnly,
    );
    assert!(major.contains("2.0.0"), "{major}");
    assert_eq!(
        rig.docker_state(&game).await,
        before,
        "a rejected patch never disturbs the game"
    );
    assert_eq!(rig.boots(&game).await, "1.4.2\n");
}

// --- Docker outcomes ---------------------------------------------------------

#[tokio::test]
async fn a_pull_failure_leaves_the_game_untouched() {
    let rig = Rig::new().await;
    let game = rig.started(ENGINE_142).await;
    let before = rig.docker_state(&game).await;

    let mut request = rig.request(OpKind::Patch, &game, Some("rtm-test/engine:1.4.99"));
    request.source_ref = Some(unique("req"));
    let event = rig.run(request.clone()).await;
    assert_failure(&event, ErrorCode::ImagePullFailed);
    assert_eq!(
        rig.docker_state(&game).await,
        before,
        "still running the old container"
    );
    assert_eq!(
        rig.status(&game).await,
        (RuntimeStatus::Running, ENGINE_142.into())
    );
    assert_eq!(
        rig.steps(&game, request.source_ref.as_deref().unwrap())
            .await,
        ["patch.failure"],
        "the pull happens before the stop"
    );
}

#[tokio::test]
async fn a_patch_that_does_not_come_up_is_rolled_back() {
    let rig = Rig::new().await;
    let game = rig.started(ENGINE_142).await;

    let mut request = rig.request(OpKind::Patch, &game, Some("rtm-test/crash:1.4.3"));
    request.source_ref = Some(unique("req"));
    let correlation = request.source_ref.clone().unwrap();
    let event = rig.run(request).await;
    let message = assert_failure(&event, ErrorCode::ContainerStartFailed);
    assert!(event.rolled_back);
    assert!(
        message.contains("code 3"),
        "the exit code is reported: {message}"
    );
    assert!(
        message.contains("fatal: cannot load world"),
        "the log tail is reported: {message}"
    );
    assert_rolled_back_to_142(&rig, &game, &correlation, &event, &message).await;
    assert_eq!(rig.outbox_count(&correlation).await, 4);
}

/// What a patch rolled back to `ENGINE_142` leaves: its message says so,
/// its four entries (the rollback's start marked), the record and Docker on
/// the previous image in the event's container, and one boot of the new
/// engine between two of the old on the same state directory.
async fn assert_rolled_back_to_142(
    rig: &Rig,
    game: &GameId,
    correlation: &str,
    event: &OutcomeEvent,
    message: &str,
) {
    assert!(event.rolled_back, "{message}");
    assert!(
        message.contains("rolled back to rtm-test/engine:1.4.2"),
        "{message}"
    );
    assert_eq!(
        rig.steps(game, correlation).await,
        [
            "patch.stop.success",
            "patch.start.failure",
            "patch.start.success",
            "patch.failure"
        ]
    );
    let log = rig.log(game).await;
    let rollback = &log[log.len() - 2];
    assert!(rollback.rolled_back, "the rollback start is marked");
    assert_eq!(rollback.image_ref.as_deref(), Some(ENGINE_142));
    assert_eq!(
        rig.status(game).await,
        (RuntimeStatus::Running, ENGINE_142.into())
    );
    let (running, image, id) = rig.docker_state(game).await.unwrap();
    assert!(running);
    assert_eq!(image, ENGINE_142, "the previous image runs again");
    assert_eq!(event.container_id.as_deref(), Some(id.as_str()));
    assert_eq!(
        rig.boots(game).await,
        "1.4.2\n1.4.3\n1.4.2\n",
        "the new engine booted once, on the same state directory"
    );
}

/// A new image that starts but never turns healthy is rolled back like one
/// that crashes (SPEC §3, §4): the HEALTHCHECK decides "up", not the process.
#[tokio::test]
async fn a_patch_whose_new_engine_never_turns_healthy_is_rolled_back() {
    let rig = Rig::with(|c| c.health_timeout = Duration::from_secs(5)).await;
    let game = rig.started(ENGINE_142).await;

    let mut request = rig.request(OpKind::Patch, &game, Some("rtm-test/unhealthy:1.4.3"));
    request.source_ref = Some(unique("req"));
    let correlation = request.source_ref.clone().unwrap();
    let event = rig.run(request).await;
    let message = assert_failure(&event, ErrorCode::ContainerStartFailed);
    assert!(event.rolled_back, "{message}");
    // Unhealthy as reported, or still not healthy at the timeout on a slow
    // machine: either way the health check is what failed it.
    assert!(
        message.contains("unhealthy") || message.contains("did not become healthy"),
        "{message}"
    );
    assert_rolled_back_to_142(&rig, &game, &correlation, &event, &message).await;
}

/// The previous image no longer starts either (its tag was moved to an
/// engine that crashes at boot): the rollback fails too, the game is left
/// stopped on the previous image, and the message tells both failures
/// (SPEC §3).
#[tokio::test]
async fn a_patch_whose_rollback_fails_too_leaves_the_game_stopped() {
    let previous = TestImageTag::new("1.4.2", ENGINE_142).await;
    let rig = Rig::with(|c| c.health_timeout = Duration::from_secs(5)).await;
    let game = rig.started(&previous.name).await;
    previous.point_at("rtm-test/crash:1.4.3").await;

    let mut request = rig.request(OpKind::Patch, &game, Some("rtm-test/unhealthy:1.4.3"));
    request.source_ref = Some(unique("req"));
    let correlation = request.source_ref.clone().unwrap();
    let event = rig.run(request).await;
    let message = assert_failure(&event, ErrorCode::ContainerStartFailed);
    assert!(!event.rolled_back, "{message}");
    assert!(
        message.contains("unhealthy") || message.contains("did not become healthy"),
        "the new image's failure: {message}"
    );
    assert!(
        message.contains(&format!("rollback to {} failed too", previous.name)),
        "{message}"
    );
    assert!(
        message.contains("code 3"),
        "the rollback's failure: {message}"
    );
    assert!(message.contains("the game is stopped"), "{message}");

    assert_eq!(
        rig.steps(&game, &correlation).await,
        [
            "patch.stop.success",
            "patch.start.failure",
            "patch.start.failure",
            "patch.failure"
        ]
    );
    let log = rig.log(&game).await;
    let rollback = &log[log.len() - 2];
    assert!(rollback.rolled_back, "the failed rollback start is marked");
    assert_eq!(rollback.image_ref.as_deref(), Some(previous.name.as_str()));
    assert_eq!(
        rig.status(&game).await,
        (RuntimeStatus::Stopped, previous.name.clone()),
        "the record says stopped, on the previous image"
    );
    assert_eq!(
        rig.docker_state(&game).await,
        None,
        "both failed containers are removed"
    );
}

#[tokio::test]
async fn without_rollback_a_failed_patch_leaves_the_game_stopped() {
    let rig = Rig::with(|c| c.rollback = false).await;
    let game = rig.started(ENGINE_142).await;
    let event = rig
        .op(OpKind::Patch, &game, Some("rtm-test/crash:1.4.3"))
        .await;
    let message = assert_failure(&event, ErrorCode::ContainerStartFailed);
    assert!(!event.rolled_back);
    assert!(
        message.contains("code 3") && message.contains("RTM_ROLLBACK=false"),
        "{message}"
    );
    assert_eq!(
        rig.status(&game).await,
        (RuntimeStatus::Stopped, ENGINE_142.into())
    );
    assert!(
        rig.docker_state(&game).await.is_none(),
        "the failed container is removed"
    );
    // The record says stopped on the previous image: it can start again.
    assert_success(&rig.op(OpKind::Start, &game, Some(ENGINE_142)).await);
}

#[tokio::test]
async fn an_unhealthy_engine_fails_to_start() {
    let rig = Rig::with(|c| c.health_timeout = Duration::from_secs(10)).await;
    let game = rig.game();
    let message = assert_failure(
        &rig.op(OpKind::Start, &game, Some("rtm-test/unhealthy:1.4.3"))
            .await,
        ErrorCode::ContainerStartFailed,
    );
    assert!(message.contains("unhealthy"), "{message}");
    assert!(rig.docker_state(&game).await.is_none());
    assert!(
        rig.service.store().load(&game).await.unwrap().is_none(),
        "a first start that failed leaves no record"
    );
}

#[tokio::test]
async fn a_healthcheck_engine_starts_once_healthy() {
    let rig = Rig::new().await;
    let game = rig.started("rtm-test/healthy:1.4.2").await;
    let event = rig
        .op(OpKind::Patch, &game, Some("rtm-test/healthy:1.4.3"))
        .await;
    assert_success(&event);
    assert_eq!(
        rig.status(&game).await,
        (RuntimeStatus::Running, "rtm-test/healthy:1.4.3".into())
    );
}

// --- success paths -----------------------------------------------------------

#[tokio::test]
async fn a_patch_keeps_the_games_data_and_links_its_steps() {
    let rig = Rig::new().await;
    let game = rig.started(ENGINE_142).await;
    let state = rig.docker.engine.state_dir(&game);
    tokio::fs::write(state.join("world.dat"), b"galaxy 1042")
        .await
        .unwrap();

    let mut request = rig.request(OpKind::Patch, &game, Some(ENGINE_143));
    request.source_ref = Some(unique("lobby-req"));
    let correlation = request.source_ref.clone().unwrap();
    let event = rig.run(request).await;
    assert_success(&event);
    assert_eq!(event.correlation_id, correlation);
    assert_eq!(event.image_ref.as_deref(), Some(ENGINE_143));
    assert_eq!(event.previous_image_ref.as_deref(), Some(ENGINE_142));
    assert!(event.address.is_some());

    assert_eq!(
        tokio::fs::read_to_string(state.join("world.dat"))
            .await
            .unwrap(),
        "galaxy 1042"
    );
    assert_eq!(rig.boots(&game).await, "1.4.2\n1.4.3\n");
    assert_eq!(
        rig.steps(&game, &correlation).await,
        ["patch.stop.success", "patch.start.success", "patch.success"]
    );
    let log = rig.log(&game).await;
    let patch = log.last().unwrap();
    assert_eq!(patch.container_id.as_deref(), event.container_id.as_deref());
    assert_eq!(rig.outbox_count(&correlation).await, 3);
    let (running, image, id) = rig.docker_state(&game).await.unwrap();
    assert!(running);
    assert_eq!(
        image, ENGINE_143,
        "docker ps shows the tag the lobby asked for"
    );
    assert_eq!(Some(id), event.container_id);
    assert_eq!(
        rig.status(&game).await,
        (RuntimeStatus::Running, ENGINE_143.into())
    );
}

/// SPEC §3: the new container is created (under the temporary name) before
/// the old one is stopped, so between the old engine's kill and the new
/// one's start Docker only removes the old container and renames the new.
#[tokio::test]
async fn a_patch_is_down_only_for_stop_remove_rename_and_start() {
    let rig = Rig::new().await;
    let game = rig.started(ENGINE_142).await;
    let engine = &rig.docker.engine;
    let old = engine.inspect(&game).await.unwrap().unwrap().id.to_string();
    let filters = std::collections::HashMap::from([
        ("type".to_owned(), vec!["container".to_owned()]),
        (
            "container".to_owned(),
            vec![
                engine.container_name(&game),
                engine.next_container_name(&game),
            ],
        ),
    ]);
    let options = bollard::query_parameters::EventsOptions {
        since: Some((Utc::now().timestamp() - 1).to_string()),
        until: None,
        filters: Some(filters),
    };
    let mut stream = engine.client().events(Some(options));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let watcher = tokio::spawn(async move {
        use futures_util::StreamExt as _;
        while let Some(Ok(event)) = stream.next().await {
            let action = event.action.unwrap_or_default();
            let id = event.actor.and_then(|a| a.id).unwrap_or_default();
            if tx.send((action, id)).is_err() {
                break;
            }
        }
    });

    let event = rig
        .run(rig.request(OpKind::Patch, &game, Some(ENGINE_143)))
        .await;
    assert_success(&event);
    let new = event.container_id.clone().expect("the new container");
    // Docker reports an event a moment after it happened.
    let mut seen = Vec::new();
    while let Ok(Some((action, id))) =
        tokio::time::timeout(Duration::from_millis(1500), rx.recv()).await
    {
        let who = if id == old {
            "old"
        } else if id == new {
            "new"
        } else {
            "other"
        };
        // Exec and health events say nothing about the order here.
        if !action.starts_with("exec") && !action.starts_with("health") {
            seen.push(format!("{who} {action}"));
        }
        if who == "new" && action == "start" {
            break;
        }
    }
    watcher.abort();
    let at = |wanted: &str| {
        seen.iter()
            .position(|e| e == wanted)
            .unwrap_or_else(|| panic!("no {wanted} in {seen:?}"))
    };
    assert!(at("new create") < at("old kill"), "{seen:?}");
    let downtime = &seen[at("old kill")..=at("new start")];
    assert!(
        downtime
            .iter()
            .all(|e| e.starts_with("old ") || e == "new rename" || e == "new start"),
        "only the old container's stop and removal, the rename and the start: {downtime:?}"
    );
    assert!(downtime.contains(&"old destroy".to_owned()), "{seen:?}");
    assert!(downtime.contains(&"new rename".to_owned()), "{seen:?}");
    assert_eq!(engine.inspect_next(&game).await.unwrap(), None);
    assert_eq!(rig.boots(&game).await, "1.4.2\n1.4.3\n");
}

#[tokio::test]
async fn the_correlation_id_falls_back_to_the_command_id() {
    let rig = Rig::new().await;
    let game = rig.started(ENGINE_142).await;
    let request = rig.request(OpKind::Patch, &game, Some("rtm-test/engine:v1.4.4"));
    let command_id = request.command_id.clone();
    let event = rig.run(request).await;
    assert_success(&event);
    assert_eq!(event.correlation_id, command_id);
    assert_eq!(rig.steps(&game, &command_id).await.len(), 3);
}

#[tokio::test]
async fn downgrade_and_same_tag_are_allowed() {
    let rig = Rig::new().await;
    let game = rig.started(ENGINE_142).await;
    assert_success(
        &rig.op(OpKind::Patch, &game, Some("rtm-test/engine:1.4.1"))
            .await,
    );
    let event = rig
        .op(OpKind::Patch, &game, Some("rtm-test/engine:1.4.1"))
        .await;
    assert_success(&event);
    assert!(!event.noop, "the same tag again is a full restart");
    assert_eq!(rig.boots(&game).await, "1.4.2\n1.4.1\n1.4.1\n");
}

#[tokio::test]
async fn stop_restart_and_remove() {
    let rig = Rig::new().await;
    let game = rig.started(ENGINE_142).await;

    let event = rig.op(OpKind::Stop, &game, None).await;
    assert_success(&event);
    assert_eq!(event.reason.as_deref(), Some("lobby_request"));
    assert_eq!(rig.status(&game).await.0, RuntimeStatus::Stopped);
    assert!(
        !rig.docker_state(&game).await.unwrap().0,
        "a stop keeps the container"
    );
    let again = rig.op(OpKind::Stop, &game, None).await;
    assert_success(&again);
    assert!(again.noop);

    // Restart of a stopped game runs as usual and leaves it running.
    let restart = rig.op(OpKind::Restart, &game, None).await;
    assert_success(&restart);
    assert_eq!(
        rig.steps(&game, &restart.correlation_id).await,
        [
            "restart.stop.success",
            "restart.start.success",
            "restart.success"
        ]
    );
    assert_eq!(rig.status(&game).await.0, RuntimeStatus::Running);

    let remove = rig.op(OpKind::Remove, &game, None).await;
    assert_success(&remove);
    assert_eq!(
        rig.steps(&game, &remove.correlation_id).await,
        ["remove.stop.success", "remove.success"]
    );
    assert!(rig.docker_state(&game).await.is_none());
    assert!(
        rig.docker.engine.state_dir(&game).join("boots").exists(),
        "state is kept"
    );
    let again = rig.op(OpKind::Remove, &game, None).await;
    assert_success(&again);
    assert!(again.noop);
}

#[tokio::test]
async fn a_stop_corrects_a_record_docker_disagrees_with() {
    let rig = Rig::new().await;
    let game = rig.started(ENGINE_142).await;
    let (_, _, id) = rig.docker_state(&game).await.unwrap();
    rig.docker
        .engine
        .stop(&rtmanager::domain::ContainerId(id), Duration::from_secs(1))
        .await
        .unwrap();
    let event = rig.op(OpKind::Stop, &game, None).await;
    assert_success(&event);
    assert!(event.noop);
    assert_eq!(rig.status(&game).await.0, RuntimeStatus::Stopped);
}

#[tokio::test]
async fn a_slow_engine_is_killed_after_the_grace_period() {
    let rig = Rig::new().await;
    let game = rig.started("rtm-test/slow:1.4.2").await;
    let event = rig
        .op(OpKind::Patch, &game, Some("rtm-test/slow:1.4.3"))
        .await;
    assert_success(&event);
    let log = rig.log(&game).await;
    let stop = log.iter().find(|r| r.op == "stop").unwrap();
    let took = stop.finished_at - stop.started_at;
    assert!(
        took >= chrono::Duration::milliseconds(1900),
        "the slow engine got its grace period: {took}"
    );
}

// --- duplicates and concurrency ------------------------------------------------

#[tokio::test]
async fn a_finished_command_is_not_run_twice() {
    let rig = Rig::new().await;
    let game = rig.started(ENGINE_142).await;
    let request = rig.request(OpKind::Patch, &game, Some(ENGINE_143));
    let first = rig.run(request.clone()).await;
    assert_success(&first);
    let handled = rig.service.handle(request).await.unwrap();
    assert!(handled.duplicate);
    assert_eq!(handled.event, first, "the stored outcome, same event_id");
    assert_eq!(rig.boots(&game).await, "1.4.2\n1.4.3\n", "no second patch");
}

#[tokio::test]
async fn two_patches_of_one_game_never_overlap() {
    let rig = Rig::new().await;
    let game = rig.started(ENGINE_142).await;
    // Each side sends its patch again (a new command) while it is refused,
    // as a lobby would: both end up running, the second right as the first
    // lets go of the game, which is where a lease that failed to exclude
    // would let them overlap.
    let (rig, game) = (&rig, &game);
    let until_run = |image: &'static str| async move {
        // Not `rig.run`: the other side may hold the lease right now.
        let send = |image| async move {
            let request = rig.request(OpKind::Patch, game, Some(image));
            tokio::time::timeout(Duration::from_secs(60), rig.service.handle(request))
                .await
                .expect("the patch finishes within a minute")
                .expect("the patch is recorded")
                .event
        };
        let first = send(image).await;
        let mut last = first.clone();
        for _ in 0..600 {
            if last.error_code != Some(ErrorCode::Conflict) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            last = send(image).await;
        }
        (first, last)
    };
    let ((first_a, a), (first_b, b)) =
        tokio::join!(until_run(ENGINE_143), until_run("rtm-test/engine:1.4.1"));

    // Operations that ran (took the lease) never overlap in time: the two
    // patches, and the start before them.
    let log = rig.log(game).await;
    let mut ran: Vec<_> = log
        .iter()
        .filter(|r| r.outer_op.is_none() && r.error_code.as_deref() != Some("conflict"))
        .collect();
    ran.sort_by_key(|r| r.started_at);
    for pair in ran.windows(2) {
        assert!(pair[0].finished_at <= pair[1].started_at, "{pair:#?}");
    }
    assert_success(&a);
    assert_success(&b);
    assert_eq!(ran.len(), 3, "{ran:#?}");
    rig.assert_lease_free(game).await;

    // Sent together, the first two could not both take the game.
    let firsts = [first_a, first_b];
    let successes = firsts
        .iter()
        .filter(|e| e.outcome == Outcome::Success)
        .count();
    let conflicts = firsts
        .iter()
        .filter(|e| e.error_code == Some(ErrorCode::Conflict))
        .count();
    assert_eq!((successes, conflicts), (1, 1), "{firsts:#?}");
}
