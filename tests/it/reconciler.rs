//! The reconciler (SPEC §11) end to end: the worker (`serve`, in-process)
//! on a real engine notices engines that stop without a command, through
//! Docker's event stream and its periodic pass, and only those.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::query_parameters::{
    EventsOptions, KillContainerOptionsBuilder, RemoveContainerOptionsBuilder,
};
use futures_util::StreamExt as _;
use rtmanager::domain::{GameId, OutcomeEvent};
use rtmanager::error::ErrorCode;
use serde_json::json;
use tokio::task::JoinHandle;

use crate::docker_support::test_client;
use crate::fakes::HangingEngine;
use crate::harness::eventually;
use crate::worker::{Seen, WorkerRig};

const ENGINE: &str = "rtm-test/engine:1.4.2";
const EXITS: &str = "rtm-test/exits:1.4.2";
const WAIT: Duration = Duration::from_secs(60);

/// A rig whose worker has the reconciler's settings `interval` and
/// `restart_on_exit`.
async fn rig(interval: &str, restart_on_exit: &str, more: &[(&str, &str)]) -> WorkerRig {
    let mut pairs = vec![
        ("RTM_RECONCILE_INTERVAL", interval),
        ("RTM_RESTART_ON_EXIT", restart_on_exit),
    ];
    pairs.extend_from_slice(more);
    let pairs: Vec<(String, String)> = pairs
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    WorkerRig::prepare_with(move |env: &mut HashMap<String, String>| env.extend(pairs)).await
}

fn container_name(rig: &WorkerRig, game: &GameId) -> String {
    format!("{}{}", rig.config.docker.container_prefix, game)
}

/// The game's `exit` entries, as the operation log has them.
async fn exit_entries(rig: &WorkerRig, game: &GameId) -> Vec<(i64, String)> {
    sqlx::query_as(
        "select operation_id, coalesce(error_message, '') from operation_log
         where game_id = $1 and op = 'exit' order by operation_id",
    )
    .bind(game.as_str())
    .fetch_all(&rig._db.pool)
    .await
    .unwrap()
}

/// Every `exit` entry of the test's database.
async fn all_exit_entries(rig: &WorkerRig) -> Vec<(String, String)> {
    sqlx::query_as(
        "select game_id, coalesce(error_message, '') from operation_log
         where op = 'exit' order by operation_id",
    )
    .fetch_all(&rig._db.pool)
    .await
    .unwrap()
}

async fn record_status(rig: &WorkerRig, game: &GameId) -> (String, Option<String>) {
    sqlx::query_as("select status, current_container_id from runtime_records where game_id = $1")
        .bind(game.as_str())
        .fetch_one(&rig._db.pool)
        .await
        .unwrap()
}

/// Events until one with routing key `key` (inclusive).
async fn until_key(rig: &mut WorkerRig, key: &str) -> Vec<Seen> {
    let mut seen = Vec::new();
    loop {
        let event = rig.next_event().await;
        let done = event.routing_key == key;
        seen.push(event);
        if done {
            return seen;
        }
    }
}

fn last(seen: &[Seen]) -> &OutcomeEvent {
    &seen.last().expect("an event").event
}

/// Starts `game` on `image` and checks the start succeeded.
async fn start(rig: &mut WorkerRig, game: &GameId, image: &str) {
    let seen = rig
        .run(json!({"op": "start", "game_id": game.as_str(), "image_ref": image}))
        .await;
    assert_eq!(
        last(&seen).error_code,
        None,
        "{:?}",
        last(&seen).error_message
    );
}

/// When Docker reports `action` next for the container named `name`
/// (subscribed before this returns).
async fn docker_event_at(
    name: String,
    action: &'static str,
) -> JoinHandle<(Instant, chrono::DateTime<chrono::Utc>)> {
    docker_event_on(test_client().await, name, action).await
}

/// Like [`docker_event_at`], on the engine `docker` talks to.
async fn docker_event_on(
    docker: Docker,
    name: String,
    action: &'static str,
) -> JoinHandle<(Instant, chrono::DateTime<chrono::Utc>)> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let watcher = tokio::spawn(async move {
        let filters = HashMap::from([
            ("type".to_owned(), vec!["container".to_owned()]),
            ("container".to_owned(), vec![name]),
            ("event".to_owned(), vec![action.to_owned()]),
        ]);
        let mut events = docker.events(Some(EventsOptions {
            filters: Some(filters),
            ..Default::default()
        }));
        let first = events.next();
        let _ = ready_tx.send(());
        first
            .await
            .expect("the event stream is open")
            .expect("an event");
        (Instant::now(), chrono::Utc::now())
    });
    let _ = ready_rx.await;
    // The request goes out once the stream is first polled: give it a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    watcher
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_exits_on_its_own_is_reported_restarted_and_then_left_exited() {
    // Two automatic restarts in the window: the third exit is left alone.
    let mut rig = rig("30s", "2/10m", &[]).await;
    rig.launch();
    let game = rig.game();
    start(&mut rig, &game, EXITS).await;

    for round in 1..=3 {
        let died = docker_event_at(container_name(&rig, &game), "die").await;
        let (died, died_at) = tokio::time::timeout(WAIT, died).await.unwrap().unwrap();
        let seen = until_key(&mut rig, "runtime.exit.failure").await;
        let latency = died.elapsed();
        let exit = last(&seen).clone();
        println!(
            "round {round}: runtime.exit.failure received {latency:?} after Docker's die event \
             (look began {} ms, entry written {} ms after it): {}",
            (exit.started_at - died_at).num_milliseconds(),
            (exit.finished_at - died_at).num_milliseconds(),
            exit.error_message.as_deref().unwrap_or("")
        );
        assert!(
            latency < Duration::from_secs(2),
            "reported {latency:?} after the die event"
        );
        assert_eq!(exit.op_source.as_deref(), Some("reconciler"));
        assert_eq!(exit.error_code, Some(ErrorCode::EngineExited));
        let message = exit.error_message.clone().unwrap();
        assert!(message.contains("exit code 7, OOM killed: no"), "{message}");
        assert!(
            message.contains("fatal: lost the world"),
            "the log tail: {message}"
        );
        if round < 3 {
            assert!(
                message.contains(&format!("restarting (automatic restart {round} of 2")),
                "{message}"
            );
            // The restart, correlated to the exit entry, with its steps.
            let seen = until_key(&mut rig, "runtime.restart.success").await;
            let restart = last(&seen);
            assert_eq!(restart.op_source.as_deref(), Some("reconciler"));
            let correlation = exit.operation_id.unwrap().to_string();
            assert_eq!(restart.correlation_id, correlation);
            assert!(
                seen.iter()
                    .any(|s| s.routing_key == "runtime.restart.start.success"
                        && s.event.correlation_id == correlation),
                "{:?}",
                seen.iter().map(|s| &s.routing_key).collect::<Vec<_>>()
            );
            assert_eq!(record_status(&rig, &game).await.0, "running");
        } else {
            assert!(
                message.contains("the restart budget RTM_RESTART_ON_EXIT=2/10m is spent"),
                "{message}"
            );
        }
    }
    // No restart after the third: the game stays exited.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(record_status(&rig, &game).await.0, "exited");
    assert_eq!(exit_entries(&rig, &game).await.len(), 3);
    let boots = rig.boots(&game);
    assert_eq!(boots.lines().count(), 3, "boots: {boots:?}");
    println!("boots file: {:?}", boots);
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_killed_by_its_memory_limit_is_reported_as_oom() {
    let mut rig = rig("30s", "0", &[("RTM_MEMORY", "32m")]).await;
    rig.launch();
    let game = rig.game();
    start(&mut rig, &game, "rtm-test/hog:1.4.2").await;
    let seen = until_key(&mut rig, "runtime.exit.failure").await;
    let message = last(&seen).error_message.clone().unwrap();
    println!("OOM exit: {message}");
    assert!(
        message.contains("exit code 137, OOM killed: yes"),
        "{message}"
    );
    assert!(message.contains("RTM_RESTART_ON_EXIT=0"), "{message}");
    assert_eq!(record_status(&rig, &game).await.0, "exited");
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_removed_behind_the_managers_back_is_reported_gone() {
    let mut rig = rig("30s", "0", &[]).await;
    rig.launch();
    let game = rig.game();
    start(&mut rig, &game, ENGINE).await;
    let (_, container) = record_status(&rig, &game).await;
    test_client()
        .await
        .remove_container(
            &container_name(&rig, &game),
            Some(RemoveContainerOptionsBuilder::default().force(true).build()),
        )
        .await
        .unwrap();
    let seen = until_key(&mut rig, "runtime.exit.failure").await;
    let exit = last(&seen);
    let message = exit.error_message.clone().unwrap();
    println!("docker rm -f: {message}");
    assert_eq!(exit.error_code, Some(ErrorCode::EngineExited));
    assert!(
        message.contains(&format!("container {} is gone", container.unwrap())),
        "{message}"
    );
    // The die and the destroy are one exit.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(exit_entries(&rig, &game).await.len(), 1);
    assert_eq!(record_status(&rig, &game).await, ("exited".into(), None));
    rig.shutdown().await;
}

/// Every op that stops an engine, many times over on several games at once,
/// with the periodic pass every 100 ms on top of the event stream: not one
/// exit entry. A rollback's crashing engine dies under the game's own name
/// too (it was renamed before its start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exits_the_manager_causes_are_never_reported() {
    let mut rig = rig("100ms", "3/10m", &[("RTM_START_SETTLE", "300ms")]).await;
    rig.launch();
    let games: Vec<GameId> = (0..4).map(|_| rig.game()).collect();
    let rounds = 3;
    let cycle = |game: &GameId| {
        let g = game.as_str();
        vec![
            json!({"op": "start", "game_id": g, "image_ref": ENGINE}),
            json!({"op": "restart", "game_id": g}),
            json!({"op": "patch", "game_id": g, "new_image_ref": "rtm-test/engine:1.4.3"}),
            // Rolled back: the crash engine dies at boot.
            json!({"op": "patch", "game_id": g, "new_image_ref": "rtm-test/crash:1.4.3"}),
            json!({"op": "stop", "game_id": g}),
            json!({"op": "start", "game_id": g, "image_ref": "rtm-test/engine:1.4.3"}),
            json!({"op": "patch", "game_id": g, "new_image_ref": ENGINE}),
            json!({"op": "remove", "game_id": g}),
        ]
    };
    let mut commands = 0;
    for _ in 0..rounds {
        // One command per game at a time, all games at once: the commands
        // of a round interleave across games.
        let plans: Vec<Vec<serde_json::Value>> = games.iter().map(cycle).collect();
        for step in 0..plans[0].len() {
            let mut ids = Vec::new();
            for plan in &plans {
                ids.push(rig.publish(plan[step].clone()).await);
            }
            let mut outstanding: std::collections::HashSet<String> = ids.into_iter().collect();
            while !outstanding.is_empty() {
                let seen = rig.next_event().await;
                assert_ne!(
                    seen.event.op.as_deref(),
                    Some("exit"),
                    "a spurious exit: {:?}",
                    seen.event.error_message
                );
                if seen.event.outer_op.is_none() && outstanding.remove(&seen.event.command_id) {
                    assert!(
                        seen.event.error_code.is_none()
                            || seen.event.error_code == Some(ErrorCode::ContainerStartFailed),
                        "{}: {:?} {:?}",
                        seen.routing_key,
                        seen.event.error_code,
                        seen.event.error_message
                    );
                    commands += 1;
                }
            }
        }
    }
    // Passes keep running over what the commands left: still nothing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let exits = all_exit_entries(&rig).await;
    println!(
        "{commands} commands on {} games, reconcile interval 100ms: {} exit entries",
        games.len(),
        exits.len()
    );
    assert!(exits.is_empty(), "{exits:?}");
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_watching_one_engine_write_one_exit_entry_per_exit() {
    let mut rig = rig("300ms", "0", &[]).await;
    rig.launch();
    // A second worker on the same engine, database, Redis and queues.
    let mut env = rig.env.clone();
    env.insert(
        "RTM_HTTP_ADDR".into(),
        format!("127.0.0.1:{}", crate::procs::free_port()),
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let second = tokio::spawn(rtmanager::serve::run(
        crate::harness::worker_config(&env),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let games: Vec<GameId> = (0..3).map(|_| rig.game()).collect();
    for game in &games {
        rig.publish(json!({"op": "start", "game_id": game.as_str(), "image_ref": EXITS}))
            .await;
    }
    // Every event, the starts' and the exits' (an engine may die while
    // another game still starts).
    let mut exited = std::collections::HashSet::new();
    while exited.len() < games.len() {
        let seen = rig.next_event().await;
        match seen.routing_key.as_str() {
            "runtime.start.success" => {}
            "runtime.exit.failure" => assert!(
                exited.insert(seen.event.game_id.clone()),
                "a second exit event of {}",
                seen.event.game_id
            ),
            other => panic!("{other}: {:?}", seen.event.error_message),
        }
    }
    // Both workers have seen every die event and run passes since.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for game in &games {
        let exits = exit_entries(&rig, game).await;
        assert!(exited.contains(game.as_str()));
        assert_eq!(exits.len(), 1, "{game}: {exits:?}");
        assert_eq!(record_status(&rig, game).await.0, "exited");
    }
    println!("3 exits watched by two workers: 3 exit entries");
    let _ = stop_tx.send(());
    tokio::time::timeout(WAIT, second)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_while_the_worker_was_down_is_reported_at_start_up() {
    // An hour between passes: only the start-up pass can report it.
    let mut rig = rig("1h", "0", &[]).await;
    rig.launch();
    let game = rig.game();
    start(&mut rig, &game, ENGINE).await;
    rig.shutdown().await;
    test_client()
        .await
        .kill_container(
            &container_name(&rig, &game),
            Some(
                KillContainerOptionsBuilder::default()
                    .signal("KILL")
                    .build(),
            ),
        )
        .await
        .unwrap();
    assert_eq!(record_status(&rig, &game).await.0, "running");

    let started = Instant::now();
    rig.launch();
    let seen = until_key(&mut rig, "runtime.exit.failure").await;
    let message = last(&seen).error_message.clone().unwrap();
    println!(
        "reported {:?} after the worker started: {message}",
        started.elapsed()
    );
    assert!(
        message.contains("exit code 137, OOM killed: no"),
        "{message}"
    );
    assert_eq!(record_status(&rig, &game).await.0, "exited");
    rig.shutdown().await;
}

/// The event stream breaks (as when the engine restarts) and cannot be had
/// for a while (an injected fault: `HangingEngine`'s `break_events` and
/// `events_down`, over the real Docker): an exit meanwhile is reported by a
/// pass, and once the stream is back the watch resumes and reports the next
/// exit from its event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_event_stream_is_resumed_and_a_pass_reports_what_it_missed() {
    let mut rig = rig("2s", "0", &[]).await;
    let engine = std::sync::Arc::new(std::sync::Mutex::new(None));
    let kept = engine.clone();
    rig.launch_with(move |docker| {
        let faulty = HangingEngine::new(docker);
        *kept.lock().unwrap() = Some(faulty.clone());
        faulty
    });
    let (a, b) = (rig.game(), rig.game());
    start(&mut rig, &a, ENGINE).await;
    start(&mut rig, &b, ENGINE).await;
    let faulty = engine.lock().unwrap().clone().expect("the worker's engine");
    let subscribed = faulty.subscriptions.load(Ordering::SeqCst);
    assert!(subscribed >= 1);

    // Down: every open stream breaks, and no new one can be had.
    faulty.events_down.store(true, Ordering::SeqCst);
    faulty.break_events.notify_waiters();
    eventually(Duration::from_secs(10), "the watch tries again", || async {
        (faulty.subscriptions.load(Ordering::SeqCst) > subscribed + 1).then_some(())
    })
    .await;
    let docker = test_client().await;
    let kill = || {
        KillContainerOptionsBuilder::default()
            .signal("KILL")
            .build()
    };
    docker
        .kill_container(&container_name(&rig, &a), Some(kill()))
        .await
        .unwrap();
    let seen = until_key(&mut rig, "runtime.exit.failure").await;
    assert_eq!(last(&seen).game_id, a.as_str());
    println!("while the stream was down: {:?}", last(&seen).error_message);

    // Back: the watch resumes.
    let before = faulty.subscriptions.load(Ordering::SeqCst);
    faulty.events_down.store(false, Ordering::SeqCst);
    eventually(Duration::from_secs(10), "the watch resumes", || async {
        (faulty.subscriptions.load(Ordering::SeqCst) > before).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let died = docker_event_at(container_name(&rig, &b), "die").await;
    docker
        .kill_container(&container_name(&rig, &b), Some(kill()))
        .await
        .unwrap();
    let (died, _) = died.await.unwrap();
    let seen = until_key(&mut rig, "runtime.exit.failure").await;
    assert_eq!(last(&seen).game_id, b.as_str());
    println!(
        "after the watch resumed: reported {:?} after the die event",
        died.elapsed()
    );
    assert_eq!(exit_entries(&rig, &a).await.len(), 1);
    assert_eq!(exit_entries(&rig, &b).await.len(), 1);
    rig.shutdown().await;
}

/// The Docker engine itself restarts mid-run (a private dockerd with
/// `--live-restore`, so the other engines keep running): the watch's event
/// stream breaks, and an engine killed while dockerd is down dies with no
/// one to see its `die` event (Docker replays no events to a new
/// subscriber). Passes are an hour apart, so only a pass the watch asks
/// for as it subscribes again can report that exit. Once dockerd is back,
/// two more exits 2.5 s apart are each reported within 1.5 s of their `die`
/// events: the resumed event stream's doing (a watch still failing would
/// retry, and pass, 5-10 s apart: it could not catch both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_restarted_mid_run_the_watch_resumes_and_a_pass_reports_the_exit_meanwhile() {
    // Dropped last: stops the private dockerd and removes its containers,
    // also after a panic.
    let dir = crate::procs::ScenarioDir::new("it-reconciler-dockerd");
    let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let dockerd = crate::services::PrivateDocker::launch(&dir, &id, &[ENGINE])
        .await
        .expect("a private dockerd");
    let docker = Docker::connect_with_host(&dockerd.host)
        .expect("a client of the private dockerd")
        .negotiate_version()
        .await
        .expect("the private dockerd answers");
    let mut rig = rig("1h", "0", &[("DOCKER_HOST", &dockerd.host)]).await;
    rig.launch();
    let games: Vec<GameId> = (0..3).map(|_| rig.game()).collect();
    for game in &games {
        start(&mut rig, game, ENGINE).await;
    }
    let a = &games[0];
    let pid = docker
        .inspect_container(&container_name(&rig, a), None)
        .await
        .unwrap()
        .state
        .and_then(|s| s.pid)
        .filter(|p| *p > 0)
        .expect("a running container has a pid") as u32;

    // dockerd goes; with live-restore the engines stay. Kill a's meanwhile.
    let down = Instant::now();
    dockerd.stop().await.expect("stop the private dockerd");
    assert!(crate::procs::signal(pid, "KILL"), "kill {pid}");
    eventually(Duration::from_secs(10), "a's engine is gone", || async {
        (!crate::procs::pid_alive(pid)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let restarted_at = chrono::Utc::now();
    dockerd
        .start()
        .await
        .expect("start the private dockerd again");
    let up = Instant::now();
    println!(
        "dockerd down {:?}; a's engine (pid {pid}) killed meanwhile",
        up - down
    );
    let seen = until_key(&mut rig, "runtime.exit.failure").await;
    let exit = last(&seen);
    assert_eq!(exit.game_id, a.as_str());
    let message = exit.error_message.clone().unwrap();
    println!(
        "a's exit reported {:?} after dockerd was back: {message}",
        up.elapsed()
    );
    assert!(
        message.contains("exit code 137, OOM killed: no"),
        "{message}"
    );
    assert_eq!(record_status(&rig, a).await.0, "exited");
    // Did dockerd itself say `die` on its way back up, before it answered
    // (so before anyone could subscribe)? For the record.
    let logged = docker
        .events(Some(EventsOptions {
            since: Some(restarted_at.timestamp().to_string()),
            until: Some((chrono::Utc::now().timestamp() + 1).to_string()),
            filters: Some(HashMap::from([
                ("container".to_owned(), vec![container_name(&rig, a)]),
                ("event".to_owned(), vec!["die".to_owned()]),
            ])),
        }))
        .count()
        .await;
    println!("die events dockerd logged for a since its restart: {logged}");

    // Between failed subscriptions the watch waits at most 10 s (5 s plus
    // jitter): past that it has subscribed again.
    tokio::time::sleep(Duration::from_secs(11).saturating_sub(up.elapsed())).await;
    let kill = || {
        KillContainerOptionsBuilder::default()
            .signal("KILL")
            .build()
    };
    for (n, game) in games[1..].iter().enumerate() {
        let killed_at = Instant::now();
        let died = docker_event_on(docker.clone(), container_name(&rig, game), "die").await;
        docker
            .kill_container(&container_name(&rig, game), Some(kill()))
            .await
            .unwrap();
        let (died, _) = tokio::time::timeout(WAIT, died).await.unwrap().unwrap();
        let seen = until_key(&mut rig, "runtime.exit.failure").await;
        let latency = died.elapsed();
        assert_eq!(last(&seen).game_id, game.as_str());
        println!(
            "exit {} after the restart: reported {latency:?} after its die event",
            n + 1
        );
        assert!(
            latency < Duration::from_millis(1500),
            "reported {latency:?} after the die event: not by the event stream"
        );
        tokio::time::sleep(Duration::from_millis(2500).saturating_sub(killed_at.elapsed())).await;
    }
    for game in &games {
        assert_eq!(exit_entries(&rig, game).await.len(), 1, "{game}");
    }
    rig.shutdown().await;
    drop(rig);
    drop(dockerd);
}
