//! README "Dependencies come and go" and "Leases hold", on real services:
//! a Redis or Docker outage longer than `RTM_RETRY_FOR` ends the command
//! `service_unavailable` (after retrying, not at once), and an operation
//! longer than the lease TTL keeps its lease by renewing it.

use std::time::{Duration, Instant};

use rtmanager::config::{LifecycleConfig, SecretUrl};
use rtmanager::domain::{GameId, OpKind, OutcomeEvent};
use rtmanager::error::ErrorCode;
use rtmanager::lifecycle::Lifecycle;
use rtmanager::outbound::docker::DockerEngine;
use rtmanager::outbound::postgres::PgStore;
use rtmanager::outbound::redis_lease::RedisLeases;
use rtmanager::ports::{ContainerEngine, LeaseStore};

use crate::docker_support::{DockerTestEnv, test_docker_config};
use crate::harness::{
    TestDb, World, assert_success, command_request, lifecycle_config, redis_url, unique,
    wait_for_lease,
};
use crate::procs::ScenarioDir;
use crate::services;

const RETRY_FOR: Duration = Duration::from_secs(3);

/// The shared settings with this file's retry budget.
fn config() -> LifecycleConfig {
    LifecycleConfig {
        retry_for: RETRY_FOR,
        ..lifecycle_config()
    }
}

/// Runs one start of `game` and returns its outcome and how long it took.
async fn start<L: LeaseStore, E: ContainerEngine>(
    lifecycle: &Lifecycle<PgStore, L, E>,
    game: &GameId,
) -> (OutcomeEvent, Duration) {
    let began = Instant::now();
    let request = command_request(OpKind::Start, game, Some("rtm-test/engine:1.4.2"));
    let handled = tokio::time::timeout(RETRY_FOR * 10, lifecycle.handle(request))
        .await
        .expect("the command ends, not hangs")
        .expect("the outcome is recorded");
    (handled.event, began.elapsed())
}

/// The command failed `service_unavailable`, and only after retrying for
/// `RTM_RETRY_FOR` (an error mapped at once would be a different bug).
#[track_caller]
fn assert_unavailable_after_retrying(event: &OutcomeEvent, took: Duration) {
    assert_eq!(
        event.error_code,
        Some(ErrorCode::ServiceUnavailable),
        "expected service_unavailable, got {:?}: {:?}",
        event.error_code,
        event.error_message
    );
    assert!(
        took >= RETRY_FOR,
        "gave up after {took:?}, before RTM_RETRY_FOR ({RETRY_FOR:?}): it did not retry"
    );
}

#[tokio::test]
async fn a_redis_outage_longer_than_retry_for_fails_the_command_service_unavailable() {
    crate::harness::init_logs();
    // A private Redis: this test kills it, which the shared one must not see.
    let dir = ScenarioDir::new("it-redis-outage");
    let redis = services::Redis::launch(&dir)
        .await
        .expect("a private redis");
    let leases = RedisLeases::connect(&SecretUrl::new(redis.url()), "rtmtest:")
        .await
        .expect("connect to the private redis");
    let db = TestDb::new().await;
    let docker = DockerTestEnv::new().await;
    let lifecycle = Lifecycle::new(
        PgStore::new(db.pool.clone()),
        leases,
        docker.engine.clone(),
        config(),
    );

    redis.stop().await.expect("kill the private redis");
    let game = docker.game();
    let (event, took) = start(&lifecycle, &game).await;
    assert_unavailable_after_retrying(&event, took);
    assert!(
        docker.engine.inspect(&game).await.unwrap().is_none(),
        "no Docker work without the lease"
    );
}

#[tokio::test]
async fn a_docker_outage_longer_than_retry_for_fails_the_command_service_unavailable() {
    crate::harness::init_logs();
    // A socket file nobody serves: every Docker call is refused, as while
    // the engine is down.
    let state = tempfile::TempDir::new().unwrap();
    let socket = state.path().join("docker.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let host = format!("unix://{}", socket.display());
    let client = bollard::Docker::connect_with_unix(&host, 5, bollard::API_DEFAULT_VERSION)
        .expect("a client for the dead socket");
    let mut cfg = test_docker_config(&format!("{}-", unique("rtmt")), state.path());
    cfg.host = Some(host);
    let engine = DockerEngine::from_client(client, cfg);

    let db = TestDb::new().await;
    let prefix = format!("{}:", unique("rtmtest"));
    let leases = RedisLeases::connect(&SecretUrl::new(redis_url()), &prefix)
        .await
        .unwrap();
    let lifecycle = Lifecycle::new(
        PgStore::new(db.pool.clone()),
        leases.clone(),
        engine,
        config(),
    );

    let game = GameId::parse(&unique("g")).unwrap();
    let (event, took) = start(&lifecycle, &game).await;
    assert_unavailable_after_retrying(&event, took);
    assert_eq!(
        leases.holder_of(&game).await.unwrap(),
        None,
        "the failed command released its lease"
    );
}

#[tokio::test]
async fn an_operation_longer_than_the_lease_ttl_keeps_its_lease() {
    crate::harness::init_logs();
    let ttl = Duration::from_secs(2);
    // The slow engine ignores SIGTERM: its stop lasts the whole grace
    // period, several TTLs.
    let grace = Duration::from_secs(7);
    let cfg = LifecycleConfig {
        lease_ttl: ttl,
        stop_timeout: grace,
        ..config()
    };
    let world = World::new().await;
    let (docker, leases) = (&world.docker, &world.leases);
    let lifecycle = || world.lifecycle(cfg.clone());
    let game = docker.game();
    let started = lifecycle()
        .handle(command_request(
            OpKind::Start,
            &game,
            Some("rtm-test/slow:1.4.2"),
        ))
        .await
        .unwrap();
    assert_success(&started.event);

    let stop = command_request(OpKind::Stop, &game, None);
    let running = {
        let (lifecycle, stop) = (lifecycle(), stop.clone());
        tokio::spawn(async move { lifecycle.handle(stop).await })
    };
    wait_for_lease(leases, &game, &stop.command_id).await;
    let held = leases.holder_of(&game).await.unwrap();
    let since = Instant::now();

    // Watch the key for the whole stop: it must hold the same value past
    // the TTL. Once two TTLs have passed, a competing command must still
    // find it held.
    let mut competitor = None;
    while !running.is_finished() {
        let now = leases.holder_of(&game).await.unwrap();
        assert_eq!(
            now,
            held,
            "the lease changed {:?} into the stop (TTL {ttl:?}): it was not renewed",
            since.elapsed()
        );
        if competitor.is_none() && since.elapsed() >= ttl * 2 {
            let other = lifecycle()
                .handle(command_request(OpKind::Restart, &game, None))
                .await
                .unwrap();
            assert!(
                !running.is_finished(),
                "premise: the stop still runs when the competitor is answered"
            );
            competitor = Some(other.event);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let competitor = competitor.expect("premise: the stop outlasted two lease TTLs");
    assert_eq!(
        competitor.error_code,
        Some(ErrorCode::Conflict),
        "a competing command past the TTL: {:?}",
        competitor.error_message
    );
    let stopped = running.await.unwrap().expect("the stop is recorded");
    assert_success(&stopped.event);
    let info = docker.engine.inspect(&game).await.unwrap();
    assert!(
        info.as_ref().is_none_or(|i| !i.running),
        "the engine was stopped: {info:?}"
    );
    assert_eq!(leases.holder_of(&game).await.unwrap(), None, "released");
}
