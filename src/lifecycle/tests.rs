//! The op rules of SPEC §2–3 and resumption from every journal step, against
//! the in-memory ports: no service, milliseconds each.

use std::time::Duration;

use chrono::Utc;

use super::memory::{MemEngine, MemLeases, MemStore};
use super::{Interrupted, Lifecycle, LifecycleConfig};
use crate::domain::{
    CommandRequest, GameId, ImageRef, OpKind, OutcomeEvent, RuntimeRecord, RuntimeState,
    RuntimeStatus, Step,
};
use crate::error::ErrorCode;
use crate::ports::RuntimeStore as _;

const A: &str = "rtm-test/engine:1.4.2";
const A_NEXT: &str = "rtm-test/engine:1.4.3";

struct World {
    store: MemStore,
    leases: MemLeases,
    engine: MemEngine,
    service: Lifecycle<MemStore, MemLeases, MemEngine>,
    game: GameId,
}

fn config() -> LifecycleConfig {
    LifecycleConfig {
        lease_ttl: Duration::from_secs(30),
        stop_timeout: Duration::from_millis(10),
        start_settle: Duration::ZERO,
        health_timeout: Duration::from_millis(10),
        rollback: true,
        retry_for: Duration::from_millis(20),
        ..LifecycleConfig::default()
    }
}

impl World {
    fn new() -> Self {
        Self::with(config())
    }

    fn with(cfg: LifecycleConfig) -> Self {
        let (store, leases, engine) = (
            MemStore::default(),
            MemLeases::default(),
            MemEngine::default(),
        );
        let service = Lifecycle::new(store.clone(), leases.clone(), engine.clone(), cfg);
        Self {
            store,
            leases,
            engine,
            service,
            game: GameId::parse("g-1042").unwrap(),
        }
    }

    fn request(&self, op: OpKind, image: Option<&str>) -> CommandRequest {
        CommandRequest {
            command_id: uuid::Uuid::new_v4().to_string(),
            op,
            game_id: Some(self.game.to_string()),
            image_ref: image.map(str::to_owned),
            op_source: Some("lobby".into()),
            source_ref: None,
            reason: None,
            requested_at: Some(Utc::now()),
            reply_to: None,
            malformed: None,
            node: None,
            refusal: None,
        }
    }

    async fn run(&self, request: CommandRequest) -> OutcomeEvent {
        let event = self.service.handle(request).await.expect("handled").event;
        assert!(self.leases.is_free(&self.game), "the lease is released");
        event
    }

    async fn op(&self, op: OpKind, image: Option<&str>) -> OutcomeEvent {
        self.run(self.request(op, image)).await
    }

    /// A record and a container as earlier operations left them.
    fn given(&self, status: RuntimeStatus, image: &str) {
        let state = match status {
            RuntimeStatus::Running => RuntimeState::Running {
                container_id: self.engine.put_container(&self.game, image, true),
                address: None,
            },
            RuntimeStatus::Stopped => RuntimeState::Stopped {
                container_id: Some(self.engine.put_container(&self.game, image, false)),
            },
            RuntimeStatus::Exited => RuntimeState::Exited {
                container_id: Some(self.engine.put_container(&self.game, image, false)),
            },
            RuntimeStatus::Removed => RuntimeState::Removed,
        };
        self.store.put_record(RuntimeRecord {
            game_id: self.game.clone(),
            image_ref: ImageRef::parse(image).unwrap(),
            state,
            state_dir: format!("/state/{}", self.game).into(),
            fence: 0,
            created_at: Utc::now(),
            updated_at: Utc::now(),
        });
    }

    fn status(&self) -> (RuntimeStatus, String) {
        let record = self.store.record(&self.game).expect("a record");
        (record.status(), record.image_ref.to_string())
    }

    /// What Docker runs for the game: (running, image).
    fn docker(&self) -> Option<(bool, String)> {
        self.engine
            .container(&self.game)
            .map(|c| (c.running, c.image_ref))
    }
}

fn success(event: &OutcomeEvent, noop: bool) {
    assert_eq!(event.error_code, None, "{:?}", event.error_message);
    assert_eq!(event.noop, noop, "noop");
}

fn failure(event: &OutcomeEvent, code: ErrorCode) -> String {
    assert_eq!(event.error_code, Some(code), "{:?}", event.error_message);
    event.error_message.clone().unwrap_or_default()
}

// --- SPEC §2: start -------------------------------------------------------

#[tokio::test]
async fn start_of_an_unknown_game_creates_its_record() {
    let w = World::new();
    success(&w.op(OpKind::Start, Some(A)).await, false);
    assert_eq!(w.status(), (RuntimeStatus::Running, A.into()));
    assert_eq!(w.docker(), Some((true, A.into())));
    assert!(w.engine.calls().iter().any(|c| c == &format!("pull {A}")));
}

#[tokio::test]
async fn start_of_a_removed_game_is_allowed_with_any_image() {
    let w = World::new();
    w.given(RuntimeStatus::Removed, A);
    success(&w.op(OpKind::Start, Some(A_NEXT)).await, false);
    assert_eq!(w.status(), (RuntimeStatus::Running, A_NEXT.into()));
}

#[tokio::test]
async fn start_of_a_stopped_game_takes_its_recorded_image_only() {
    let w = World::new();
    w.given(RuntimeStatus::Stopped, A);
    failure(
        &w.op(OpKind::Start, Some(A_NEXT)).await,
        ErrorCode::Conflict,
    );
    assert_eq!(w.docker(), Some((false, A.into())), "untouched");
    success(&w.op(OpKind::Start, Some(A)).await, false);
    assert_eq!(w.status(), (RuntimeStatus::Running, A.into()));
    assert_eq!(w.docker(), Some((true, A.into())));
}

#[tokio::test]
async fn start_of_a_running_game_is_a_noop_with_its_image_and_a_conflict_with_another() {
    let w = World::new();
    w.given(RuntimeStatus::Running, A);
    w.engine.clear_calls();
    success(&w.op(OpKind::Start, Some(A)).await, true);
    failure(
        &w.op(OpKind::Start, Some(A_NEXT)).await,
        ErrorCode::Conflict,
    );
    assert!(w.engine.calls().is_empty(), "{:?}", w.engine.calls());
}

#[tokio::test]
async fn start_of_a_game_docker_no_longer_runs_starts_it_again() {
    let w = World::new();
    w.given(RuntimeStatus::Running, A);
    w.engine.put_container(&w.game, A, false);
    success(&w.op(OpKind::Start, Some(A)).await, false);
    assert_eq!(w.docker(), Some((true, A.into())));
}

#[tokio::test]
async fn a_start_refused_for_a_stale_task_recreates_the_container_once() {
    let w = World::new();
    w.engine.stale_starts(1);
    success(&w.op(OpKind::Start, Some(A)).await, false);
    let creates = w
        .engine
        .calls()
        .iter()
        .filter(|c| c.starts_with("create"))
        .count();
    assert_eq!(creates, 2, "{:?}", w.engine.calls());
    assert_eq!(w.docker(), Some((true, A.into())));

    let w = World::new();
    w.engine.stale_starts(2);
    let message = failure(
        &w.op(OpKind::Start, Some(A)).await,
        ErrorCode::ContainerStartFailed,
    );
    assert!(message.contains("already in use"), "{message}");
    assert_eq!(w.docker(), None, "the failed container is removed");
}

// --- SPEC §2: stop, remove, restart, patch, unknown games ------------------

#[tokio::test]
async fn stop_of_a_stopped_game_is_a_noop() {
    let w = World::new();
    w.given(RuntimeStatus::Stopped, A);
    success(&w.op(OpKind::Stop, None).await, true);
    assert_eq!(w.status().0, RuntimeStatus::Stopped);
}

#[tokio::test]
async fn stop_of_a_game_docker_does_not_run_is_a_noop_that_corrects_the_record() {
    let w = World::new();
    w.given(RuntimeStatus::Running, A);
    w.engine.put_container(&w.game, A, false);
    w.engine.clear_calls();
    success(&w.op(OpKind::Stop, None).await, true);
    assert_eq!(w.status().0, RuntimeStatus::Stopped);
    assert!(w.engine.calls().is_empty(), "{:?}", w.engine.calls());
}

#[tokio::test]
async fn stop_of_a_running_game_keeps_its_container() {
    let w = World::new();
    w.given(RuntimeStatus::Running, A);
    success(&w.op(OpKind::Stop, None).await, false);
    assert_eq!(w.status().0, RuntimeStatus::Stopped);
    assert_eq!(w.docker(), Some((false, A.into())));
}

#[tokio::test]
async fn remove_of_a_removed_game_is_a_noop_and_of_a_running_one_removes_it() {
    let w = World::new();
    w.given(RuntimeStatus::Running, A);
    success(&w.op(OpKind::Remove, None).await, false);
    assert_eq!(w.status().0, RuntimeStatus::Removed);
    assert_eq!(w.docker(), None);
    success(&w.op(OpKind::Remove, None).await, true);
}

#[tokio::test]
async fn patch_and_restart_of_a_stopped_game_run_and_leave_it_running() {
    let w = World::new();
    w.given(RuntimeStatus::Stopped, A);
    success(&w.op(OpKind::Restart, None).await, false);
    assert_eq!(w.status(), (RuntimeStatus::Running, A.into()));
    success(&w.op(OpKind::Stop, None).await, false);
    success(&w.op(OpKind::Patch, Some(A_NEXT)).await, false);
    assert_eq!(w.status(), (RuntimeStatus::Running, A_NEXT.into()));
    assert_eq!(w.docker(), Some((true, A_NEXT.into())));
}

#[tokio::test]
async fn patch_and_restart_of_a_removed_game_are_conflict() {
    let w = World::new();
    w.given(RuntimeStatus::Removed, A);
    failure(&w.op(OpKind::Restart, None).await, ErrorCode::Conflict);
    failure(
        &w.op(OpKind::Patch, Some(A_NEXT)).await,
        ErrorCode::Conflict,
    );
}

#[tokio::test]
async fn any_op_but_start_on_an_unknown_game_is_not_found() {
    let w = World::new();
    for (op, image) in [
        (OpKind::Stop, None),
        (OpKind::Restart, None),
        (OpKind::Patch, Some(A_NEXT)),
        (OpKind::Remove, None),
    ] {
        failure(&w.op(op, image).await, ErrorCode::NotFound);
    }
    assert!(w.engine.calls().is_empty());
}

// --- SPEC §3: patch -------------------------------------------------------

#[tokio::test]
async fn patch_needs_semver_tags_and_says_which_is_not() {
    let w = World::new();
    w.given(RuntimeStatus::Running, "rtm-test/engine:latest");
    let message = failure(
        &w.op(OpKind::Patch, Some(A)).await,
        ErrorCode::ImageRefNotSemver,
    );
    assert!(message.starts_with("current image_ref"), "{message}");
    let w = World::new();
    w.given(RuntimeStatus::Running, A);
    for new in [
        "rtm-test/engine:1.4",
        "rtm-test/engine@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    ] {
        let message = failure(
            &w.op(OpKind::Patch, Some(new)).await,
            ErrorCode::ImageRefNotSemver,
        );
        assert!(message.starts_with("new image_ref"), "{message}");
    }
    assert_eq!(
        w.docker(),
        Some((true, A.into())),
        "a rejected patch never disturbs the game"
    );
}

#[tokio::test]
async fn patch_must_keep_major_and_minor() {
    let w = World::new();
    w.given(RuntimeStatus::Running, A);
    for new in ["rtm-test/engine:1.5.0", "rtm-test/engine:2.4.2"] {
        let message = failure(
            &w.op(OpKind::Patch, Some(new)).await,
            ErrorCode::SemverPatchOnly,
        );
        assert!(message.contains("current=1.4.2"), "{message}");
    }
    assert_eq!(w.docker(), Some((true, A.into())));
}

/// A patch out of the running image's patch series.
const OUT_OF_SERIES: &str = "rtm-test/engine:1.5.0";

/// A game a finished command stopped (the fence its command took has its
/// outcome), how many fences `begin` took so far, and a patch the record
/// refuses.
async fn settled_game_and_refused_patch() -> (World, usize, CommandRequest) {
    let w = World::new();
    w.given(RuntimeStatus::Running, A);
    success(&w.op(OpKind::Stop, None).await, false);
    let begun = w.store.fences_advanced();
    let request = w.request(OpKind::Patch, Some(OUT_OF_SERIES));
    (w, begun, request)
}

/// Issue 11: a patch the record refuses is one write, which takes the
/// game's next fence itself (no `begin` before it): the fence moves by one,
/// to the patch's command.
#[tokio::test]
async fn a_patch_the_record_refuses_takes_its_fence_with_its_entry() {
    let (w, begun, request) = settled_game_and_refused_patch().await;
    let command_id = request.command_id.clone();
    failure(&w.run(request).await, ErrorCode::SemverPatchOnly);
    assert_eq!(w.store.fences_advanced(), begun, "no begin");
    assert_eq!(w.store.fence(&w.game), (2, Some(command_id)));
    // A patch that goes ahead still takes its fence first.
    success(&w.op(OpKind::Patch, Some(A_NEXT)).await, false);
    assert_eq!(w.store.fences_advanced(), begun + 1);
    assert_eq!(w.store.fence(&w.game).0, 3);
}

/// The one-write answer only when the record read is final: not while the
/// command that took the fence has no outcome (an attempt that may still
/// write), nor for a command an earlier attempt of which left steps (it
/// resumes). Both take their fence first, as any command.
#[tokio::test]
async fn a_refused_patch_takes_its_fence_first_behind_an_unfinished_attempt_or_its_own_steps() {
    let w = World::new();
    w.given(RuntimeStatus::Running, A);
    w.store
        .advance_fence(&w.game, "an-attempt-that-died")
        .await
        .unwrap();
    let begun = w.store.fences_advanced();
    failure(
        &w.op(OpKind::Patch, Some(OUT_OF_SERIES)).await,
        ErrorCode::SemverPatchOnly,
    );
    assert_eq!(
        w.store.fences_advanced(),
        begun + 1,
        "behind an unfinished attempt"
    );

    let request = w.request(OpKind::Patch, Some(OUT_OF_SERIES));
    w.store.put_step(
        &request.command_id,
        Step::Begin {
            previous_image: ImageRef::parse(A).unwrap(),
        },
    );
    failure(&w.run(request).await, ErrorCode::SemverPatchOnly);
    assert_eq!(
        w.store.fences_advanced(),
        begun + 2,
        "with steps of its own"
    );
}

/// The game read for a one-write answer goes out with the lease request;
/// when anything takes the game between that read and the write, the write
/// is refused, and the patch takes its own fence and is decided again:
/// one outcome, from the game as it is.
#[tokio::test]
async fn a_refused_patch_whose_read_was_overtaken_takes_its_fence_and_decides_again() {
    let (w, begun, request) = settled_game_and_refused_patch().await;
    *w.store.take_after_peek.lock().unwrap() = Some("a-racing-attempt".into());
    let command_id = request.command_id.clone();
    failure(&w.run(request).await, ErrorCode::SemverPatchOnly);
    assert_eq!(
        w.store.fences_advanced(),
        begun + 2,
        "the racer's fence, then the patch's own"
    );
    assert_eq!(w.store.fence(&w.game), (3, Some(command_id.clone())));
    let outcomes = w
        .store
        .events()
        .iter()
        .filter(|e| e.command_id == command_id)
        .count();
    assert_eq!(outcomes, 1);
}

#[tokio::test]
async fn patch_allows_a_downgrade_the_same_tag_and_a_pre_release() {
    let w = World::new();
    w.given(RuntimeStatus::Running, A);
    for new in [
        "rtm-test/engine:1.4.1",
        "rtm-test/engine:1.4.1",
        "rtm-test/engine:v1.4.3-rc.1",
    ] {
        success(&w.op(OpKind::Patch, Some(new)).await, false);
        assert_eq!(w.status(), (RuntimeStatus::Running, new.into()));
    }
}

#[tokio::test]
async fn the_correlation_id_is_the_source_ref_else_the_command_id() {
    let w = World::new();
    w.given(RuntimeStatus::Running, A);
    let mut request = w.request(OpKind::Patch, Some(A_NEXT));
    request.source_ref = Some("lobby-77".into());
    w.run(request).await;
    let request = w.request(OpKind::Restart, None);
    let command_id = request.command_id.clone();
    w.run(request).await;
    for event in w.store.events() {
        let expected = if event.op.as_deref() == Some("restart")
            || event.outer_op.as_deref() == Some("restart")
        {
            command_id.as_str()
        } else {
            "lobby-77"
        };
        assert_eq!(event.correlation_id, expected, "{event:?}");
    }
}

#[tokio::test]
async fn a_lease_held_by_another_command_is_conflict() {
    let w = World::new();
    w.given(RuntimeStatus::Running, A);
    w.leases.hold(&w.game, "another-command");
    let event = w
        .service
        .handle(w.request(OpKind::Stop, None))
        .await
        .unwrap()
        .event;
    let message = failure(&event, ErrorCode::Conflict);
    assert_eq!(
        message,
        "another lifecycle operation is in progress for this game"
    );
}

#[tokio::test]
async fn a_lease_store_error_is_service_unavailable() {
    let w = World::new();
    w.given(RuntimeStatus::Running, A);
    w.leases
        .down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let event = w
        .service
        .handle(w.request(OpKind::Stop, None))
        .await
        .unwrap()
        .event;
    let message = failure(&event, ErrorCode::ServiceUnavailable);
    assert!(message.starts_with("acquire game lease: "), "{message}");
    assert_eq!(w.docker(), Some((true, A.into())));
}

#[tokio::test]
async fn a_pull_failure_leaves_the_game_untouched() {
    let w = World::new();
    w.given(RuntimeStatus::Running, A);
    w.engine.unpullable(A_NEXT);
    failure(
        &w.op(OpKind::Patch, Some(A_NEXT)).await,
        ErrorCode::ImagePullFailed,
    );
    assert_eq!(w.docker(), Some((true, A.into())));
    assert_eq!(w.status(), (RuntimeStatus::Running, A.into()));
}

#[tokio::test]
async fn a_patch_that_does_not_come_up_is_rolled_back() {
    let w = World::new();
    w.given(RuntimeStatus::Running, A);
    w.engine.crashing(A_NEXT);
    let event = w.op(OpKind::Patch, Some(A_NEXT)).await;
    let message = failure(&event, ErrorCode::ContainerStartFailed);
    assert!(event.rolled_back);
    assert!(message.contains("rolled back to"), "{message}");
    assert_eq!(w.status(), (RuntimeStatus::Running, A.into()));
    assert_eq!(w.docker(), Some((true, A.into())));
    let rollback = w
        .store
        .events()
        .into_iter()
        .find(|e| e.op.as_deref() == Some("start") && e.rolled_back);
    assert!(rollback.is_some_and(|e| e.error_code.is_none()));
}

#[tokio::test]
async fn without_rollback_a_failed_patch_leaves_the_game_stopped() {
    let w = World::with(LifecycleConfig {
        rollback: false,
        ..config()
    });
    w.given(RuntimeStatus::Running, A);
    w.engine.crashing(A_NEXT);
    let event = w.op(OpKind::Patch, Some(A_NEXT)).await;
    let message = failure(&event, ErrorCode::ContainerStartFailed);
    assert!(!event.rolled_back);
    assert!(message.contains("RTM_ROLLBACK=false"), "{message}");
    assert_eq!(w.status(), (RuntimeStatus::Stopped, A.into()));
    assert_eq!(w.docker(), None);
}

#[tokio::test]
async fn a_patch_whose_rollback_fails_too_leaves_the_game_stopped() {
    let w = World::new();
    w.given(RuntimeStatus::Running, A);
    w.engine.crashing(A_NEXT);
    w.engine.crashing(A);
    let event = w.op(OpKind::Patch, Some(A_NEXT)).await;
    let message = failure(&event, ErrorCode::ContainerStartFailed);
    assert!(!event.rolled_back);
    assert!(message.contains("failed too"), "{message}");
    assert_eq!(w.status(), (RuntimeStatus::Stopped, A.into()));
}

// --- Resumption from every journal step -----------------------------------

// --- SPEC §3: the downtime holds no create --------------------------------

#[tokio::test]
async fn a_patch_creates_its_new_container_before_the_old_one_stops() {
    let w = World::new();
    w.given(RuntimeStatus::Running, A);
    w.engine.clear_calls();
    success(&w.op(OpKind::Patch, Some(A_NEXT)).await, false);
    // c1 is the old container, c2 the new one.
    assert_eq!(
        w.engine.calls(),
        [
            format!("pull {A_NEXT}"),
            format!("create_next {A_NEXT}"),
            "stop c1".into(),
            "remove c1".into(),
            "rename c2".into(),
            "start c2".into(),
        ]
    );
    // Every Docker round trip: between the stop and the start (the
    // downtime) only the remove and the rename; the inspect after the start
    // is the up check (SPEC §4).
    assert_eq!(
        w.engine.trace(),
        [
            "image_present",
            "pull",
            "create_next",
            "inspect",
            "stop",
            "remove",
            "rename",
            "start",
            "inspect",
        ]
    );
    assert_eq!(w.docker(), Some((true, A_NEXT.into())));
    assert!(w.engine.next_container(&w.game).is_none());
}

#[tokio::test]
async fn a_restart_creates_its_new_container_before_the_old_one_stops() {
    let w = World::new();
    w.given(RuntimeStatus::Running, A);
    w.engine.clear_calls();
    success(&w.op(OpKind::Restart, None).await, false);
    assert_eq!(
        w.engine.trace(),
        [
            "image_present",
            "create_next",
            "inspect",
            "stop",
            "remove",
            "rename",
            "start",
            "inspect",
        ]
    );
    assert_eq!(w.docker(), Some((true, A.into())));
    assert!(w.engine.next_container(&w.game).is_none());
}

#[tokio::test]
async fn a_patch_replaces_a_new_container_another_attempt_left_behind() {
    let w = World::new();
    w.given(RuntimeStatus::Running, A);
    let leftover = w.engine.put_next_container(&w.game, A);
    success(&w.op(OpKind::Patch, Some(A_NEXT)).await, false);
    assert!(
        w.engine.calls().contains(&format!("remove {leftover}")),
        "{:?}",
        w.engine.calls()
    );
    assert_eq!(w.docker(), Some((true, A_NEXT.into())));
    assert!(w.engine.next_container(&w.game).is_none());
}

#[tokio::test]
async fn a_rolled_back_patch_leaves_no_new_container_behind() {
    let w = World::new();
    w.given(RuntimeStatus::Running, A);
    w.engine.crashing(A_NEXT);
    let event = w.op(OpKind::Patch, Some(A_NEXT)).await;
    failure(&event, ErrorCode::ContainerStartFailed);
    assert!(event.rolled_back);
    assert_eq!(w.docker(), Some((true, A.into())));
    assert!(w.engine.next_container(&w.game).is_none());
    assert_eq!(w.engine.running(&w.game), 1);
}

#[tokio::test]
async fn a_patch_whose_stop_fails_removes_its_new_container_and_leaves_the_game_running() {
    let w = World::new();
    w.given(RuntimeStatus::Running, A);
    w.engine.refuse_stops();
    let message = failure(
        &w.op(OpKind::Patch, Some(A_NEXT)).await,
        ErrorCode::ContainerStopFailed,
    );
    assert!(message.starts_with("inner stop failed"), "{message}");
    assert_eq!(w.docker(), Some((true, A.into())));
    assert!(w.engine.next_container(&w.game).is_none());
}

#[tokio::test]
async fn a_remove_takes_a_leftover_new_container_with_the_game() {
    let w = World::new();
    w.given(RuntimeStatus::Running, A);
    w.engine.put_next_container(&w.game, A_NEXT);
    success(&w.op(OpKind::Remove, None).await, false);
    assert_eq!(w.docker(), None);
    assert!(w.engine.next_container(&w.game).is_none());
}

// --- Resumption from every journal step -----------------------------------

/// Kills an attempt of `request` right after `point`: a journal step or an
/// entry (`entry stop/patch`) once written, or (`docker <call>`) an engine
/// call once it took effect. Returns the Docker calls the dead attempt made.
async fn die_after(w: &World, request: &CommandRequest, point: &str) -> Vec<String> {
    match point.strip_prefix("docker ") {
        Some(call) => *w.engine.die_after.lock().unwrap() = Some(call.to_owned()),
        None => *w.store.die_after.lock().unwrap() = Some(point.to_owned()),
    }
    tokio::select! {
        handled = w.service.handle(request.clone()) => panic!("never died at {point}: {handled:?}"),
        () = w.store.died.notified() => {}
        () = w.engine.died.notified() => {}
    }
    *w.store.die_after.lock().unwrap() = None;
    *w.engine.die_after.lock().unwrap() = None;
    let before = w.engine.calls();
    w.engine.clear_calls();
    before
}

/// Delivers `request` again once its dead attempt's lease is gone (it is
/// released as the attempt's future is dropped).
async fn redeliver(w: &World, request: &CommandRequest) -> OutcomeEvent {
    loop {
        match w.service.handle(request.clone()).await {
            Err(Interrupted::StillRunning(_)) => tokio::task::yield_now().await,
            other => break other.expect("handled").event,
        }
    }
}

/// Runs a patch whose worker dies right after `point` (see [`die_after`]),
/// then delivers the command again: it must finish as `crashing_new` says
/// (rolled back, or on the new image), no Docker call of the dead attempt
/// may be made again, and no container of the game is left beside the one
/// that runs.
async fn patch_resumed_after(point: &str, crashing_new: bool) {
    let w = World::new();
    w.given(RuntimeStatus::Running, A);
    if crashing_new {
        w.engine.crashing(A_NEXT);
    }
    w.engine.clear_calls();
    let request = w.request(OpKind::Patch, Some(A_NEXT));
    let before = die_after(&w, &request, point).await;
    let redelivered = redeliver(&w, &request).await;
    let after = w.engine.calls();
    for call in &after {
        assert!(
            !before.contains(call),
            "{point}: {call} done again; before {before:?}, after {after:?}"
        );
    }
    if crashing_new {
        failure(&redelivered, ErrorCode::ContainerStartFailed);
        assert!(redelivered.rolled_back, "{point}");
        assert_eq!(w.docker(), Some((true, A.into())), "{point}");
    } else {
        success(&redelivered, false);
        assert_eq!(w.docker(), Some((true, A_NEXT.into())), "{point}");
        assert_eq!(
            w.status(),
            (RuntimeStatus::Running, A_NEXT.into()),
            "{point}"
        );
    }
    assert!(
        w.engine.next_container(&w.game).is_none(),
        "{point}: a new container was left under the temporary name"
    );
    assert_eq!(w.engine.running(&w.game), 1, "{point}");
    let outers = w
        .store
        .events()
        .into_iter()
        .filter(|e| e.outer_op.is_none())
        .count();
    assert_eq!(outers, 1, "{point}: one outer outcome");
}

#[tokio::test]
async fn a_patch_resumes_from_every_step_of_its_new_start() {
    for point in [
        "begin",
        &format!("pull {A_NEXT}"),
        "start.staged",
        "stop",
        "entry stop/patch",
        "remove",
        "docker rename",
        "start.create",
        "start.start",
        "start.up",
        "entry start/patch",
    ] {
        patch_resumed_after(point, false).await;
    }
}

#[tokio::test]
async fn a_patch_resumes_from_every_step_of_its_rollback() {
    for point in [
        "start.staged",
        "start.create",
        "entry start/patch",
        "rollback.create",
        "rollback.start",
        "rollback.up",
        "entry start/patch rolled_back",
    ] {
        patch_resumed_after(point, true).await;
    }
}

/// The create under the temporary name took effect, but the worker died
/// before journaling it: the redelivery cannot know the container is its
/// own, so it replaces it (before stopping the old one) rather than leave it.
#[tokio::test]
async fn a_patch_that_died_before_journaling_its_new_container_replaces_it() {
    let w = World::new();
    w.given(RuntimeStatus::Running, A);
    w.engine.clear_calls();
    let request = w.request(OpKind::Patch, Some(A_NEXT));
    die_after(&w, &request, "docker create_next").await;
    let unjournaled = w.engine.next_container(&w.game).expect("created").id;
    assert_eq!(w.docker(), Some((true, A.into())), "the game still runs");
    success(&redeliver(&w, &request).await, false);
    let after = w.engine.calls();
    assert_eq!(
        after[..3],
        [
            format!("create_next {A_NEXT}"),
            format!("remove {unjournaled}"),
            format!("create_next {A_NEXT}"),
        ],
        "{after:?}"
    );
    assert_eq!(w.docker(), Some((true, A_NEXT.into())));
    assert!(w.engine.next_container(&w.game).is_none());
    assert_eq!(w.engine.running(&w.game), 1);
}

/// A restart resumes from its new steps too.
#[tokio::test]
async fn a_restart_resumes_between_its_create_and_its_rename() {
    for point in ["start.staged", "remove", "docker rename", "start.create"] {
        let w = World::new();
        w.given(RuntimeStatus::Running, A);
        w.engine.clear_calls();
        let request = w.request(OpKind::Restart, None);
        let before = die_after(&w, &request, point).await;
        success(&redeliver(&w, &request).await, false);
        for call in w.engine.calls() {
            assert!(!before.contains(&call), "{point}: {call} done again");
        }
        assert_eq!(w.docker(), Some((true, A.into())), "{point}");
        assert!(w.engine.next_container(&w.game).is_none(), "{point}");
        assert_eq!(w.engine.running(&w.game), 1, "{point}");
    }
}

// --- SPEC §11: exit, and `exited` in every op's rules ---------------------

mod exits {
    use super::*;
    use crate::config::RestartPolicy;
    use crate::lifecycle::ExitReport;

    const BUDGET: RestartPolicy = RestartPolicy {
        max: 2,
        window: Duration::from_secs(600),
    };

    /// The exit entries written for the game.
    fn exits(w: &World) -> Vec<OutcomeEvent> {
        w.store
            .events()
            .into_iter()
            .filter(|e| e.op.as_deref() == Some("exit"))
            .collect()
    }

    async fn report(w: &World, policy: RestartPolicy) -> ExitReport {
        let report = w
            .service
            .report_exit(&w.game, policy)
            .await
            .expect("looked");
        assert!(w.leases.is_free(&w.game), "the lease is released");
        report
    }

    #[tokio::test]
    async fn an_engine_that_exits_on_its_own_gets_one_exit_entry_then_a_restart() {
        let w = World::new();
        success(&w.op(OpKind::Start, Some(A)).await, false);
        let old = w.engine.container(&w.game).unwrap().id;
        w.engine.engine_exits(&w.game, 3, false);

        let ExitReport::Reported {
            operation_id,
            restart: Some(restart),
        } = report(&w, BUDGET).await
        else {
            panic!("reported with a restart")
        };
        let [exit] = exits(&w).try_into().expect("one exit entry");
        assert_eq!(exit.operation_id, Some(operation_id));
        assert_eq!(exit.op_source.as_deref(), Some("reconciler"));
        assert_eq!(exit.container_id.as_deref(), Some(old.as_str()));
        let message = failure(&exit, ErrorCode::EngineExited);
        assert!(message.contains("exit code 3"), "{message}");
        assert!(message.contains("OOM killed: no"), "{message}");
        assert!(
            message.contains("restarting (automatic restart 1 of 2"),
            "{message}"
        );
        assert_eq!(w.status().0, RuntimeStatus::Exited);
        assert_eq!(
            w.store.record(&w.game).unwrap().state.container_id(),
            Some(&old),
            "the record keeps the stopped container"
        );

        // A second look at the same exit, or another worker's: no second
        // entry (only the restart it still owes, the same command).
        assert!(matches!(
            report(&w, BUDGET).await,
            ExitReport::PendingRestart(r) if r.command_id == restart.command_id
        ));
        assert_eq!(exits(&w).len(), 1);

        // The restart it asks for: a normal restart, correlated to the exit.
        assert_eq!(restart.op_source.as_deref(), Some("reconciler"));
        let restarted = w.run(*restart.clone()).await;
        success(&restarted, false);
        assert_eq!(restarted.correlation_id, operation_id.to_string());
        assert_eq!(w.status().0, RuntimeStatus::Running);
        assert_eq!(w.docker(), Some((true, A.into())));
        // Asked twice (a look repeated), it runs once.
        let again = w.service.handle(*restart).await.expect("handled");
        assert!(again.duplicate);
    }

    #[tokio::test]
    async fn a_restart_its_worker_never_ran_is_asked_for_again_and_runs_once() {
        let w = World::new();
        success(&w.op(OpKind::Start, Some(A)).await, false);
        w.engine.engine_exits(&w.game, 1, false);
        let ExitReport::Reported {
            restart: Some(asked),
            ..
        } = report(&w, BUDGET).await
        else {
            panic!("reported with a restart")
        };
        // The worker died before the restart: the next look asks for it
        // again, the same command.
        let ExitReport::PendingRestart(again) = report(&w, BUDGET).await else {
            panic!("the restart is still owed")
        };
        assert_eq!(again.command_id, asked.command_id);
        assert_eq!(again.source_ref, asked.source_ref);
        success(&w.run(*again).await, false);
        assert_eq!(w.status().0, RuntimeStatus::Running);
        assert_eq!(report(&w, BUDGET).await, ExitReport::NotExited);
        // Past the budget nothing is owed.
        let w = World::new();
        success(&w.op(OpKind::Start, Some(A)).await, false);
        w.engine.engine_exits(&w.game, 1, false);
        report(&w, RestartPolicy::NEVER).await;
        assert_eq!(
            report(&w, RestartPolicy::NEVER).await,
            ExitReport::NotExited
        );
    }

    #[tokio::test]
    async fn once_the_budget_is_spent_the_game_stays_exited_and_the_exit_says_so() {
        let w = World::new();
        success(&w.op(OpKind::Start, Some(A)).await, false);
        for round in 1..=3 {
            w.engine.engine_exits(&w.game, 1, false);
            let ExitReport::Reported { restart, .. } = report(&w, BUDGET).await else {
                panic!("round {round}: reported");
            };
            match restart {
                Some(restart) => success(&w.run(*restart).await, false),
                None => {
                    assert_eq!(round, 3, "two restarts are within the budget");
                    let message = failure(exits(&w).last().unwrap(), ErrorCode::EngineExited);
                    assert!(
                        message.contains("budget RTM_RESTART_ON_EXIT=2/10m is spent"),
                        "{message}"
                    );
                    assert!(message.contains("stays exited"), "{message}");
                }
            }
        }
        assert_eq!(w.status().0, RuntimeStatus::Exited);
        assert_eq!(exits(&w).len(), 3);
    }

    #[tokio::test]
    async fn an_oom_kill_and_a_vanished_container_say_so() {
        let w = World::new();
        success(&w.op(OpKind::Start, Some(A)).await, false);
        w.engine.engine_exits(&w.game, 137, true);
        report(&w, RestartPolicy::NEVER).await;
        let message = failure(exits(&w).last().unwrap(), ErrorCode::EngineExited);
        assert!(
            message.contains("exit code 137, OOM killed: yes"),
            "{message}"
        );
        assert!(message.contains("RTM_RESTART_ON_EXIT=0"), "{message}");

        let w = World::new();
        success(&w.op(OpKind::Start, Some(A)).await, false);
        let old = w.engine.container(&w.game).unwrap().id;
        w.engine.vanish(&w.game);
        report(&w, RestartPolicy::NEVER).await;
        let message = failure(exits(&w).last().unwrap(), ErrorCode::EngineExited);
        assert!(
            message.contains(&format!("container {old} is gone")),
            "{message}"
        );
        let record = w.store.record(&w.game).unwrap();
        assert_eq!(record.state, RuntimeState::Exited { container_id: None });
    }

    #[tokio::test]
    async fn a_running_engine_a_stopped_game_or_a_command_holding_the_lease_is_no_exit() {
        let w = World::new();
        success(&w.op(OpKind::Start, Some(A)).await, false);
        assert_eq!(report(&w, BUDGET).await, ExitReport::NotExited);
        success(&w.op(OpKind::Stop, None).await, false);
        assert_eq!(report(&w, BUDGET).await, ExitReport::NotExited);

        let w = World::new();
        success(&w.op(OpKind::Start, Some(A)).await, false);
        w.engine.engine_exits(&w.game, 0, false);
        w.leases.hold(&w.game, "some-command");
        let looked = w
            .service
            .report_exit(&w.game, BUDGET)
            .await
            .expect("looked");
        assert_eq!(looked, ExitReport::Busy, "a command always wins");
        assert!(exits(&w).is_empty());
    }

    #[tokio::test]
    async fn an_engine_stopped_by_a_command_its_worker_died_in_is_not_an_exit() {
        let w = World::new();
        success(&w.op(OpKind::Start, Some(A)).await, false);
        // A patch took the game (its fence) and stopped the engine, then its
        // worker died: its lease expired, its redelivery will resume it.
        let patch = w.request(OpKind::Patch, Some(A_NEXT));
        w.store
            .begin(&w.game, &patch)
            .await
            .expect("the patch's attempt began");
        w.engine.engine_exits(&w.game, 0, false);
        assert_eq!(report(&w, BUDGET).await, ExitReport::CommandUnfinished);
        assert!(exits(&w).is_empty());
        assert_eq!(w.status().0, RuntimeStatus::Running);
        // Its redelivery finishes it; nothing to report after.
        success(&w.run(patch).await, false);
        assert_eq!(report(&w, BUDGET).await, ExitReport::NotExited);
    }

    #[tokio::test]
    async fn exit_is_not_a_command() {
        let w = World::new();
        success(&w.op(OpKind::Start, Some(A)).await, false);
        let mut request = w.request(OpKind::Exit, None);
        request.op_source = Some("reconciler".into());
        failure(&w.run(request).await, ErrorCode::InvalidRequest);
        assert_eq!(w.status().0, RuntimeStatus::Running);
    }

    #[tokio::test]
    async fn an_exited_game_behaves_like_a_stopped_one() {
        // start: the recorded image only.
        let w = World::new();
        w.given(RuntimeStatus::Exited, A);
        failure(
            &w.op(OpKind::Start, Some(A_NEXT)).await,
            ErrorCode::Conflict,
        );
        success(&w.op(OpKind::Start, Some(A)).await, false);
        assert_eq!(w.status(), (RuntimeStatus::Running, A.into()));
        // stop: recorded stopped, a no-op.
        let w = World::new();
        w.given(RuntimeStatus::Exited, A);
        success(&w.op(OpKind::Stop, None).await, true);
        assert_eq!(w.status().0, RuntimeStatus::Stopped);
        // restart and patch: run as usual, leave it running.
        let w = World::new();
        w.given(RuntimeStatus::Exited, A);
        success(&w.op(OpKind::Restart, None).await, false);
        assert_eq!(w.status(), (RuntimeStatus::Running, A.into()));
        let w = World::new();
        w.given(RuntimeStatus::Exited, A);
        success(&w.op(OpKind::Patch, Some(A_NEXT)).await, false);
        assert_eq!(w.status(), (RuntimeStatus::Running, A_NEXT.into()));
        // remove: removes.
        let w = World::new();
        w.given(RuntimeStatus::Exited, A);
        success(&w.op(OpKind::Remove, None).await, false);
        assert_eq!(w.status().0, RuntimeStatus::Removed);
        assert_eq!(w.docker(), None);
    }
}
