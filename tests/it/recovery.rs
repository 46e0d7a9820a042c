//! SPEC §10 at the lifecycle level: a redelivered command resumes where its
//! dead attempt stopped, a duplicate of a running command waits for its
//! outcome, a lost lease stops the holder before its next Docker step, and a
//! paused holder's late write is refused by the fence.

use std::sync::atomic::Ordering;
use std::time::Duration;

use rtmanager::config::LifecycleConfig;
use rtmanager::domain::{CommandRequest, GameId, OpKind};
use rtmanager::lifecycle::{Handled, Interrupted, Lifecycle};
use rtmanager::outbound::docker::DockerEngine;
use rtmanager::outbound::postgres::PgStore;
use rtmanager::outbound::redis_lease::RedisLeases;
use rtmanager::ports::{ContainerEngine, ContainerInfo, LeaseHolder, LeaseStore, RuntimeStore};

use crate::fakes::{FlakyLeases, HangingEngine, StallingStore};
use crate::harness::{
    World, assert_success, command_request, eventually, lifecycle_config, wait_for_lease,
};

/// This file's settings: a short lease TTL, so a lost lease expires quickly.
fn config() -> LifecycleConfig {
    LifecycleConfig {
        lease_ttl: Duration::from_secs(3),
        ..lifecycle_config()
    }
}

/// The shared test world, with the wrappers these tests put in place of
/// one real port.
impl World {
    /// The lifecycle on the real adapters.
    fn plain(&self) -> Lifecycle<PgStore, RedisLeases, DockerEngine> {
        self.with_engine(self.docker.engine.clone())
    }

    /// The lifecycle with `store` in place of the real one.
    fn with_store<S: RuntimeStore>(&self, store: S) -> Lifecycle<S, RedisLeases, DockerEngine> {
        Lifecycle::new(
            store,
            self.leases.clone(),
            self.docker.engine.clone(),
            config(),
        )
    }

    /// The lifecycle with `leases` in place of the real ones.
    fn with_leases<L: LeaseStore>(&self, leases: L) -> Lifecycle<PgStore, L, DockerEngine> {
        Lifecycle::new(self.store(), leases, self.docker.engine.clone(), config())
    }

    /// The lifecycle with `engine` in place of the real one.
    fn with_engine<E: ContainerEngine>(&self, engine: E) -> Lifecycle<PgStore, RedisLeases, E> {
        Lifecycle::new(self.store(), self.leases.clone(), engine, config())
    }

    fn request(&self, op: OpKind, game: &GameId, image: Option<&str>) -> CommandRequest {
        command_request(op, game, image)
    }

    async fn started(&self, image: &str) -> GameId {
        let game = self.docker.game();
        let handled = self
            .plain()
            .handle(self.request(OpKind::Start, &game, Some(image)))
            .await
            .unwrap();
        assert_success(&handled.event);
        game
    }

    /// `op[.outer]:outcome` of every entry of a command, in order.
    async fn entries(&self, command_id: &str) -> Vec<String> {
        let rows: Vec<(String, Option<String>, String, bool)> = sqlx::query_as(
            "select op, outer_op, outcome, rolled_back from operation_log
             where command_id = $1 order by operation_id",
        )
        .bind(command_id)
        .fetch_all(&self.db.pool)
        .await
        .unwrap();
        rows.into_iter()
            .map(|(op, outer, outcome, rolled_back)| {
                let rb = if rolled_back { "(rollback)" } else { "" };
                match outer {
                    Some(outer) => format!("{outer}.{op}.{outcome}{rb}"),
                    None => format!("{op}.{outcome}"),
                }
            })
            .collect()
    }

    fn boots(&self, game: &GameId) -> String {
        let path = self.docker.engine.state_dir(game).join("boots");
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// What Docker has for the game.
    async fn container(&self, game: &GameId) -> Option<ContainerInfo> {
        self.docker.engine.inspect(game).await.unwrap()
    }

    /// What Docker has for the game under its temporary name.
    async fn next_container(&self, game: &GameId) -> Option<ContainerInfo> {
        self.docker.engine.inspect_next(game).await.unwrap()
    }

    async fn running_image(&self, game: &GameId) -> Option<String> {
        self.docker
            .engine
            .inspect(game)
            .await
            .unwrap()
            .filter(|i| i.running)
            .map(|i| i.image_ref)
    }
}

/// Runs `handle` until `died` fires, then drops it: the worker died there.
async fn die_at<F: Future>(handle: F, died: &tokio::sync::Notify) {
    tokio::select! {
        _ = handle => panic!("the attempt finished; it was meant to die"),
        () = died.notified() => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_that_died_before_recording_its_new_start_resumes_without_a_second_boot() {
    let world = World::new().await;
    let game = world.started("rtm-test/engine:1.4.2").await;
    let request = world.request(OpKind::Patch, &game, Some("rtm-test/engine:1.4.3"));

    // The first attempt gets the new engine up, then dies before recording it.
    let stalling = StallingStore::new(world.store(), |w| {
        w.entry.op == OpKind::Start && w.entry.outer_op == Some(OpKind::Patch)
    });
    let first = world.with_store(stalling.clone());
    die_at(first.handle(request.clone()), &stalling.stalled).await;
    assert_eq!(
        world.boots(&game),
        "1.4.2\n1.4.3\n",
        "the new engine booted once"
    );

    // Redelivered: the journal says the new container is up; it is recorded,
    // not started again.
    let handled = world.plain().handle(request.clone()).await.unwrap();
    assert_success(&handled.event);
    assert_eq!(world.boots(&game), "1.4.2\n1.4.3\n", "no second boot");
    assert_eq!(
        world.entries(&request.command_id).await,
        ["patch.stop.success", "patch.start.success", "patch.success"]
    );
    assert_eq!(
        world.running_image(&game).await.as_deref(),
        Some("rtm-test/engine:1.4.3")
    );
    let record = world.store().load(&game).await.unwrap().unwrap();
    assert_eq!(record.image_ref.as_str(), "rtm-test/engine:1.4.3");
    assert_eq!(
        handled.event.previous_image_ref.as_deref(),
        Some("rtm-test/engine:1.4.2")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_that_died_before_its_outer_entry_only_records_it() {
    let world = World::new().await;
    let game = world.started("rtm-test/engine:1.4.2").await;
    let request = world.request(OpKind::Patch, &game, Some("rtm-test/engine:1.4.3"));
    let stalling = StallingStore::new(world.store(), |w| {
        w.entry.op == OpKind::Patch && w.entry.outer_op.is_none()
    });
    let first = world.with_store(stalling.clone());
    die_at(first.handle(request.clone()), &stalling.stalled).await;
    let container = world
        .docker
        .engine
        .inspect(&game)
        .await
        .unwrap()
        .unwrap()
        .id;

    let handled = world.plain().handle(request.clone()).await.unwrap();
    assert_success(&handled.event);
    assert_eq!(
        handled.event.container_id.as_deref(),
        Some(container.as_str())
    );
    assert_eq!(
        world.boots(&game),
        "1.4.2\n1.4.3\n",
        "no Docker work on resume"
    );
    assert_eq!(
        world.entries(&request.command_id).await,
        ["patch.stop.success", "patch.start.success", "patch.success"]
    );
    assert_eq!(
        handled.event.previous_image_ref.as_deref(),
        Some("rtm-test/engine:1.4.2"),
        "the previous image comes from the journal, not the updated record"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_that_died_during_the_stop_resumes_and_finishes() {
    let world = World::new().await;
    let game = world.started("rtm-test/engine:1.4.2").await;
    let request = world.request(OpKind::Patch, &game, Some("rtm-test/engine:1.4.3"));
    let hanging = HangingEngine::new(world.docker.engine.clone());
    hanging.hang_stop.store(true, Ordering::SeqCst);
    let first = world.with_engine(hanging.clone());
    die_at(first.handle(request.clone()), &hanging.reached).await;

    // The new container was created before the stop began.
    let staged = world
        .next_container(&game)
        .await
        .expect("the new container");

    let handled = world.plain().handle(request.clone()).await.unwrap();
    assert_success(&handled.event);
    assert_eq!(world.boots(&game), "1.4.2\n1.4.3\n");
    assert_eq!(
        world.entries(&request.command_id).await,
        ["patch.stop.success", "patch.start.success", "patch.success"]
    );
    assert_eq!(
        handled.event.container_id.as_deref(),
        Some(staged.id.as_str()),
        "the dead attempt's new container is reused"
    );
    assert_eq!(world.next_container(&game).await, None);
}

/// Killed after the old container was removed and before the new one,
/// created under the temporary name, was renamed: the redelivery renames
/// and starts that container, with no second create and no second boot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_that_died_before_its_rename_renames_the_container_it_created() {
    let world = World::new().await;
    let game = world.started("rtm-test/engine:1.4.2").await;
    let request = world.request(OpKind::Patch, &game, Some("rtm-test/engine:1.4.3"));
    let hanging = HangingEngine::new(world.docker.engine.clone());
    hanging.hang_before_rename.store(true, Ordering::SeqCst);
    let first = world.with_engine(hanging.clone());
    die_at(first.handle(request.clone()), &hanging.reached).await;
    assert_eq!(world.container(&game).await, None, "the old one is gone");
    let staged = world.next_container(&game).await.expect("not renamed yet");
    assert!(!staged.running);

    let handled = world.plain().handle(request.clone()).await.unwrap();
    assert_success(&handled.event);
    assert_eq!(
        handled.event.container_id.as_deref(),
        Some(staged.id.as_str()),
        "the dead attempt's container, renamed, not a new one"
    );
    assert_eq!(world.next_container(&game).await, None);
    assert_eq!(world.boots(&game), "1.4.2\n1.4.3\n", "one boot of 1.4.3");
    assert_eq!(
        world.entries(&request.command_id).await,
        ["patch.stop.success", "patch.start.success", "patch.success"]
    );
    assert_eq!(
        world.running_image(&game).await.as_deref(),
        Some("rtm-test/engine:1.4.3")
    );
}

/// Killed once Docker had renamed the new container, before the rename was
/// journaled: the redelivery finds it under the game's name and starts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_that_died_after_its_rename_starts_the_renamed_container() {
    let world = World::new().await;
    let game = world.started("rtm-test/engine:1.4.2").await;
    let request = world.request(OpKind::Patch, &game, Some("rtm-test/engine:1.4.3"));
    let hanging = HangingEngine::new(world.docker.engine.clone());
    hanging.hang_rename.store(true, Ordering::SeqCst);
    let first = world.with_engine(hanging.clone());
    die_at(first.handle(request.clone()), &hanging.reached).await;
    assert_eq!(world.next_container(&game).await, None, "renamed");
    let renamed = world.container(&game).await.expect("renamed");
    assert!(!renamed.running);
    assert_eq!(renamed.image_ref, "rtm-test/engine:1.4.3");

    let handled = world.plain().handle(request.clone()).await.unwrap();
    assert_success(&handled.event);
    assert_eq!(
        handled.event.container_id.as_deref(),
        Some(renamed.id.as_str())
    );
    assert_eq!(world.boots(&game), "1.4.2\n1.4.3\n", "one boot of 1.4.3");
    assert_eq!(
        world.entries(&request.command_id).await,
        ["patch.stop.success", "patch.start.success", "patch.success"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_died_after_docker_started_the_engine_ends_with_one_running_container() {
    let world = World::new().await;
    let game = world.docker.game();
    let request = world.request(OpKind::Start, &game, Some("rtm-test/engine:1.4.2"));
    let hanging = HangingEngine::new(world.docker.engine.clone());
    hanging.hang_start.store(true, Ordering::SeqCst);
    let first = world.with_engine(hanging.clone());
    die_at(first.handle(request.clone()), &hanging.reached).await;
    // Docker reported the start; the engine appends its boot line a moment
    // later.
    eventually(Duration::from_secs(10), "the engine boots", || async {
        (world.boots(&game) == "1.4.2\n").then_some(())
    })
    .await;
    let started = world.container(&game).await.unwrap();
    assert!(started.running);

    // The resumption adopts the container the dead attempt started: no
    // second create, no second boot.
    let handled = world.plain().handle(request.clone()).await.unwrap();
    assert_success(&handled.event);
    assert_eq!(world.entries(&request.command_id).await, ["start.success"]);
    assert_eq!(world.boots(&game), "1.4.2\n", "no second boot");
    assert_eq!(
        handled.event.container_id.as_deref(),
        Some(started.id.as_str()),
        "the dead attempt's container, not a new one"
    );
    assert_eq!(
        world.running_image(&game).await.as_deref(),
        Some("rtm-test/engine:1.4.2")
    );
    let record = world.store().load(&game).await.unwrap().unwrap();
    assert_eq!(record.state.container_id(), Some(&started.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_attempts_lease_is_waited_out_not_a_conflict() {
    let world = World::new().await;
    let game = world.started("rtm-test/engine:1.4.2").await;
    let request = world.request(OpKind::Restart, &game, None);
    // The dead attempt's lease: same command, another token; it expires.
    let dead = LeaseHolder::new(&request.command_id);
    world
        .leases
        .acquire(&game, &dead, Duration::from_secs(2))
        .await
        .unwrap();

    let since = std::time::Instant::now();
    let handled = world.plain().handle(request).await.unwrap();
    assert_success(&handled.event);
    assert!(
        since.elapsed() >= Duration::from_millis(1500),
        "it waited for the lease to expire"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_of_a_running_command_waits_for_its_outcome() {
    let world = World::new().await;
    let game = world.started("rtm-test/slow:1.4.2").await;
    // The restart of a slow engine takes the 2 s grace period.
    let request = world.request(OpKind::Restart, &game, None);
    let first = spawn_handle(world.plain(), &request);
    wait_for_lease(&world.leases, &game, &request.command_id).await;
    // The grace period has just begun: the first attempt has not answered.
    assert!(world.entries(&request.command_id).await.len() < 3);

    // The duplicate waits up to two of its lease lifetimes for the running
    // attempt: a long lease here, so that wait outlasts the restart on a
    // slow machine, and giving up (`StillRunning`) is a failure.
    let waiting = Lifecycle::new(
        world.store(),
        world.leases.clone(),
        world.docker.engine.clone(),
        LifecycleConfig {
            lease_ttl: Duration::from_secs(60),
            ..config()
        },
    );
    let second = match waiting.handle(request.clone()).await {
        Ok(handled) => handled,
        Err(e) => panic!("the duplicate did not wait for the running attempt: {e}"),
    };
    assert_eq!(
        world.entries(&request.command_id).await.len(),
        3,
        "it answered once the first attempt's outcome was recorded"
    );
    let first = first.await.unwrap().unwrap();
    assert!(!first.duplicate);
    assert!(
        second.duplicate,
        "answered with the first attempt's outcome, not conflict"
    );
    assert_eq!(second.event, first.event);
    assert_eq!(
        world.entries(&request.command_id).await.len(),
        3,
        "ran once"
    );
}

/// Two copies of one command on two workers: the first is refused the lease
/// (another command holds the game) and is about to record `conflict` when
/// the game frees up and the second copy takes it and runs the command. The
/// refusal must not stand, or the command would be answered `conflict`
/// while its effect happened all the same: the first copy answers with the
/// second's outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_refused_the_lease_yields_to_a_copy_that_ran_the_command() {
    let world = World::new().await;
    let game = world.started("rtm-test/engine:1.4.2").await;
    let request = world.request(OpKind::Stop, &game, None);
    let other = LeaseHolder::new("another-command");
    world
        .leases
        .acquire(&game, &other, Duration::from_secs(30))
        .await
        .unwrap();

    let stalling = StallingStore::new(world.store(), |w| {
        w.entry.outer_op.is_none()
            && w.entry.result.error_code() == Some(rtmanager::error::ErrorCode::Conflict)
    });
    let refused = world.with_store(stalling.clone());
    let first = spawn_handle(refused, &request);
    stalling.stalled.notified().await;

    world.leases.release(&game, &other).await.unwrap();
    let second = world.plain().handle(request.clone()).await.unwrap();
    assert_success(&second.event);

    stalling.release.notify_one();
    let first = first.await.unwrap().unwrap();
    assert!(first.duplicate, "the refusal gave way");
    assert_eq!(first.event, second.event);
    assert_eq!(world.entries(&request.command_id).await, ["stop.success"]);
}

/// The copy that claimed a command first but was slow to ask for the lease
/// finds it already run by another copy: it answers with that outcome, it
/// does not run the command a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_overtaken_by_another_does_not_run_the_command_again() {
    let world = World::new().await;
    let game = world.started("rtm-test/engine:1.4.2").await;
    let request = world.request(OpKind::Restart, &game, None);

    let slow = FlakyLeases::new(world.leases.clone());
    slow.slow_next_acquire.store(true, Ordering::SeqCst);
    let late = world.with_leases(slow.clone());
    let first = spawn_handle(late, &request);
    slow.waiting.notified().await;

    let second = world.plain().handle(request.clone()).await.unwrap();
    assert!(!second.duplicate);
    assert_success(&second.event);

    slow.release.notify_one();
    let first = first.await.unwrap().unwrap();
    assert!(first.duplicate, "answered with the other copy's outcome");
    assert_eq!(first.event, second.event);
    assert_eq!(
        world.entries(&request.command_id).await,
        [
            "restart.stop.success",
            "restart.start.success",
            "restart.success"
        ]
    );
    assert_eq!(
        world.boots(&game),
        "1.4.2\n1.4.2\n",
        "one restart, one boot"
    );
}

/// A copy cut off from the lease store cannot tell who holds the game. When
/// an attempt of its own command took the game last (here another copy,
/// still creating the container, nothing journaled yet), it must not answer
/// `service_unavailable` over it: it leaves the command for later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_cut_off_from_the_lease_store_does_not_answer_over_a_running_copy() {
    let world = World::new().await;
    let game = world.docker.game();
    let request = world.request(OpKind::Start, &game, Some("rtm-test/engine:1.4.2"));

    let hanging = HangingEngine::new(world.docker.engine.clone());
    hanging.hang_create.store(true, Ordering::SeqCst);
    let running = world.with_engine(hanging.clone());
    let holder = spawn_handle(running, &request);
    hanging.reached.notified().await;

    let flaky = FlakyLeases::new(world.leases.clone());
    flaky.down.store(true, Ordering::SeqCst);
    let cut_off = world.with_leases(flaky);
    let answered = cut_off.handle(request.clone()).await;
    assert!(
        matches!(answered, Err(Interrupted::Blocked(_))),
        "{answered:?}"
    );
    assert_eq!(
        world.entries(&request.command_id).await,
        Vec::<String>::new(),
        "not answered"
    );
    holder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_renewals_fail_stops_before_its_next_docker_step() {
    let world = World::new().await;
    let game = world.started("rtm-test/slow:1.4.2").await;
    let flaky = FlakyLeases::new(world.leases.clone());
    flaky.fail_renewals.store(true, Ordering::SeqCst);
    let mut cfg = config();
    cfg.lease_ttl = Duration::from_millis(1500);
    let service = Lifecycle::new(world.store(), flaky, world.docker.engine.clone(), cfg);
    let request = world.request(OpKind::Patch, &game, Some("rtm-test/slow:1.4.3"));
    let old = world.container(&game).await.unwrap().id;

    // The stop of the slow engine outlasts the lease: the holder must give up
    // instead of removing and starting containers without it.
    let result = service.handle(request.clone()).await;
    assert!(
        matches!(result, Err(Interrupted::LeaseLost(_))),
        "{result:?}"
    );
    assert!(
        !world
            .entries(&request.command_id)
            .await
            .iter()
            .any(|e| e == "patch.start.success"),
        "no start after the lease was lost"
    );
    assert_eq!(
        world.container(&game).await.map(|i| i.id),
        Some(old.clone()),
        "the old container was not removed without the lease"
    );
    assert_eq!(world.boots(&game), "1.4.2\n", "nothing booted without it");

    // Redelivered with working leases, the command resumes and finishes:
    // one new container, booted once.
    let handled = world.plain().handle(request.clone()).await.unwrap();
    assert_success(&handled.event);
    assert_eq!(world.boots(&game), "1.4.2\n1.4.3\n", "one boot of 1.4.3");
    let running = world.container(&game).await.unwrap();
    assert!(running.running);
    assert_eq!(running.image_ref, "rtm-test/slow:1.4.3");
    assert_ne!(running.id, old);
    assert_eq!(
        handled.event.container_id.as_deref(),
        Some(running.id.as_str())
    );
    assert_eq!(
        world.entries(&request.command_id).await,
        ["patch.stop.success", "patch.start.success", "patch.success"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_holders_late_write_is_refused_by_the_fence() {
    let world = World::new().await;
    let game = world.started("rtm-test/engine:1.4.2").await;

    // Holder A pauses right before writing its stop entry (a GC pause, a
    // frozen VM): its lease expires meanwhile.
    let stalling = StallingStore::new(world.store(), |w| w.entry.op == OpKind::Stop);
    let flaky = FlakyLeases::new(world.leases.clone());
    flaky.fail_renewals.store(true, Ordering::SeqCst);
    let mut cfg = config();
    cfg.lease_ttl = Duration::from_secs(1);
    let paused = Lifecycle::new(stalling.clone(), flaky, world.docker.engine.clone(), cfg);
    let stop_a = world.request(OpKind::Stop, &game, None);
    let a = tokio::spawn(async move { paused.handle(stop_a).await });
    stalling.stalled.notified().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // B takes the expired lease and a newer fence, and starts the game again.
    let start_b = world.request(OpKind::Start, &game, Some("rtm-test/engine:1.4.2"));
    let b = world.plain().handle(start_b).await.unwrap();
    assert_success(&b.event);

    // A wakes up and tries to write "stopped": refused.
    stalling.release.notify_one();
    let a = a.await.unwrap();
    assert!(matches!(a, Err(Interrupted::FenceLost(_))), "{a:?}");
    let record = world.store().load(&game).await.unwrap().unwrap();
    assert_eq!(record.status().as_str(), "running", "B's record stands");
    assert_eq!(
        world.running_image(&game).await.as_deref(),
        Some("rtm-test/engine:1.4.2")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_internal_answer_leaves_the_record_matching_docker() {
    let world = World::new().await;
    let game = world.started("rtm-test/engine:1.4.2").await;
    let request = world.request(OpKind::Restart, &game, None);
    // The attempt dies once its new container runs, before recording it: the
    // record still says stopped (its inner stop was recorded).
    let hanging = HangingEngine::new(world.docker.engine.clone());
    hanging.hang_start.store(true, Ordering::SeqCst);
    let first = world.with_engine(hanging.clone());
    die_at(first.handle(request.clone()), &hanging.reached).await;
    let stale = world.store().load(&game).await.unwrap().unwrap();
    assert_eq!(stale.status().as_str(), "stopped");

    // The command is given up on (say it kept killing workers).
    let handled = world
        .plain()
        .fail_internal(&request, "gave up".into())
        .await
        .unwrap();
    assert_eq!(
        handled.event.error_code,
        Some(rtmanager::error::ErrorCode::Internal)
    );
    let record = world.store().load(&game).await.unwrap().unwrap();
    let running = world.docker.engine.inspect(&game).await.unwrap().unwrap();
    assert!(running.running);
    assert_eq!(
        record.status().as_str(),
        "running",
        "the record follows Docker"
    );
    assert_eq!(record.state.container_id(), Some(&running.id));
}

/// Handles a copy of `request` on its own task (the test keeps the original).
fn spawn_handle<S: RuntimeStore, L: LeaseStore, E: ContainerEngine>(
    lifecycle: Lifecycle<S, L, E>,
    request: &CommandRequest,
) -> tokio::task::JoinHandle<Result<Handled, Interrupted>> {
    let request = request.clone();
    tokio::spawn(async move { lifecycle.handle(request).await })
}

/// Issue 10, point 10: a create whose answer was lost after Docker made the
/// container is retried; the retry meets "name already in use", and the
/// container in the way (made under this very lease) is replaced. It used
/// to fail `container_start_failed` and leave the container behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_whose_answer_was_lost_is_repeated_and_the_start_succeeds() {
    let world = World::new().await;
    let game = world.docker.game();
    let engine = HangingEngine::new(world.docker.engine.clone());
    engine.lose_create_answer.store(true, Ordering::SeqCst);
    let handled = world
        .with_engine(engine.clone())
        .handle(world.request(OpKind::Start, &game, Some("rtm-test/engine:1.4.2")))
        .await
        .unwrap();
    assert!(
        !engine.lose_create_answer.load(Ordering::SeqCst),
        "the fault fired"
    );
    assert_success(&handled.event);
    let info = world
        .docker
        .engine
        .inspect(&game)
        .await
        .unwrap()
        .expect("the game's container");
    assert!(info.running);
    assert_eq!(
        handled.event.container_id.as_deref(),
        Some(info.id.as_str()),
        "the container the event names is the one Docker runs"
    );
    assert_eq!(world.boots(&game), "1.4.2\n", "booted once");
}

/// Issue 10, point 10: Docker retries are Docker steps, never taken without
/// the lease. With Docker unreachable for a stop and the lease lost
/// meanwhile, the stop is abandoned for redelivery at once; it used to go on
/// calling Docker for all of `RTM_RETRY_FOR`, then record
/// `service_unavailable` for a game another worker may hold by then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_retries_stop_once_the_lease_is_lost() {
    let world = World::new().await;
    let game = world.started("rtm-test/engine:1.4.2").await;
    let engine = HangingEngine::new(world.docker.engine.clone());
    engine.stop_unavailable.store(true, Ordering::SeqCst);
    let leases = FlakyLeases::new(world.leases.clone());
    leases.fail_renewals.store(true, Ordering::SeqCst);
    let lifecycle = Lifecycle::new(
        world.store(),
        leases,
        engine.clone(),
        LifecycleConfig {
            retry_for: Duration::from_secs(120),
            ..config()
        },
    );
    let stop = world.request(OpKind::Stop, &game, None);
    let since = std::time::Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(60), lifecycle.handle(stop.clone()))
        .await
        .expect("the stop gives up long before RTM_RETRY_FOR");
    assert!(
        matches!(outcome, Err(Interrupted::LeaseLost(_))),
        "{outcome:?}"
    );
    assert!(
        since.elapsed() < Duration::from_secs(30),
        "{:?}",
        since.elapsed()
    );
    let calls = engine.stop_calls.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        engine.stop_calls.load(Ordering::SeqCst),
        calls,
        "no Docker call after giving up"
    );
    assert!(
        world.entries(&stop.command_id).await.is_empty(),
        "nothing recorded"
    );
}
