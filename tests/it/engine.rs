//! The Docker adapter (`outbound::docker`) on the real engine, with the
//! `rtm-test/*` images built by `scripts/images.sh`.

use std::time::{Duration, Instant};

use bollard::API_DEFAULT_VERSION;
use bollard::Docker;
use bollard::models::RestartPolicyNameEnum;
use rtmanager::domain::{ContainerId, GameId, ImageRef};
use rtmanager::outbound::docker::{DockerEngine, LABEL_GAME_ID, LABEL_MANAGED};
use rtmanager::ports::{ContainerEngine, EngineError, Health};
use tempfile::TempDir;

use crate::docker_support::{
    DockerTestEnv, test_client, test_docker_config, wait_for_container, wait_for_file,
};

fn image(raw: &str) -> ImageRef {
    ImageRef::parse(raw).expect("valid image ref")
}

/// Creates and starts `image` for a fresh game; returns the game and id.
async fn started(env: &DockerTestEnv, raw: &str) -> (GameId, ContainerId) {
    let game = env.game();
    let id = env.engine.create(&game, &image(raw)).await.expect("create");
    env.engine.start(&id).await.expect("start");
    (game, id)
}

#[tokio::test]
async fn negotiates_the_api_version_and_pings() {
    let env = DockerTestEnv::new().await;
    env.engine.ping().await.expect("ping");

    let server = test_client().await.version().await.expect("version");
    let server_api = server.api_version.expect("server API version");
    let negotiated = env.engine.api_version();
    eprintln!("server API {server_api}, negotiated {negotiated}");
    let parse = |v: &str| -> (usize, usize) {
        let (major, minor) = v.split_once('.').expect("major.minor");
        (major.parse().unwrap(), minor.parse().unwrap())
    };
    let default = (
        API_DEFAULT_VERSION.major_version,
        API_DEFAULT_VERSION.minor_version,
    );
    assert_eq!(parse(&negotiated), parse(&server_api).min(default));
}

#[tokio::test]
async fn an_unreachable_engine_is_unavailable() {
    let dir = TempDir::new().unwrap();
    // A socket file nobody listens on: connecting is refused.
    let path = dir.path().join("docker.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let host = format!("unix://{}", path.display());

    let mut cfg = test_docker_config("rtmt-dead-", dir.path());
    cfg.host = Some(host.clone());
    let err = DockerEngine::connect(cfg.clone()).await.unwrap_err();
    eprintln!("connect: {err:#}");

    let client = Docker::connect_with_unix(&host, 5, API_DEFAULT_VERSION).unwrap();
    let engine = DockerEngine::from_client(client, cfg);
    let game = GameId::parse("g-1").unwrap();
    let unavailable = |r: &EngineError| matches!(r, EngineError::Unavailable(_));
    let e = engine.ping().await.unwrap_err();
    assert!(unavailable(&e), "{e:?}");
    let e = engine.inspect(&game).await.unwrap_err();
    assert!(unavailable(&e), "{e:?}");
    eprintln!("inspect: {e}");
    let e = engine
        .create(&game, &image("rtm-test/engine:1.4.2"))
        .await
        .unwrap_err();
    assert!(unavailable(&e), "{e:?}");
    let e = engine
        .stop(&ContainerId("x".into()), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(unavailable(&e), "{e:?}");

    let mut cfg = test_docker_config("rtmt-dead-", dir.path());
    cfg.host = Some(format!("unix://{}/missing.sock", dir.path().display()));
    assert!(DockerEngine::connect(cfg).await.is_err());
}

#[tokio::test]
async fn image_presence_and_a_failed_pull() {
    let env = DockerTestEnv::new().await;
    let engine = &env.engine;
    assert!(
        engine
            .image_present(&image("rtm-test/engine:1.4.2"))
            .await
            .unwrap()
    );
    assert!(
        !engine
            .image_present(&image("rtm-test/engine:9.9.9"))
            .await
            .unwrap()
    );
    assert!(
        !engine
            .image_present(&image("rtm-test/absent:1.0.0"))
            .await
            .unwrap()
    );

    let started = Instant::now();
    let err = engine
        .pull(&image("rtm-test/absent:1.0.0"))
        .await
        .unwrap_err();
    let took = started.elapsed();
    eprintln!("failed pull took {took:?}: {err}");
    assert!(
        matches!(&err, EngineError::Rejected(m) if !m.is_empty()),
        "{err:?}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[tokio::test]
async fn create_gives_the_spec_shape() {
    let env = DockerTestEnv::with(|cfg| {
        // A state root that does not exist yet: created on demand.
        cfg.state_root = cfg.state_root.join("games");
        cfg.cap_add = vec!["NET_BIND_SERVICE".into()];
    })
    .await;
    let game = env.game();
    let state_dir = env.engine.state_dir(&game);
    assert_eq!(
        state_dir,
        env.state_root.path().join("games").join(game.as_str())
    );
    assert!(!state_dir.exists());

    let id = env
        .engine
        .create(&game, &image("rtm-test/engine:1.4.2"))
        .await
        .expect("create");
    assert!(state_dir.is_dir(), "the state directory is created");

    let c = test_client()
        .await
        .inspect_container(id.as_str(), None)
        .await
        .expect("inspect");
    let name = env.container_name(&game);
    assert_eq!(c.name.as_deref(), Some(format!("/{name}").as_str()));

    let config = c.config.expect("config");
    assert_eq!(config.image.as_deref(), Some("rtm-test/engine:1.4.2"));
    let labels = config.labels.expect("labels");
    assert_eq!(labels.get(LABEL_MANAGED).map(String::as_str), Some("true"));
    assert_eq!(
        labels.get(LABEL_GAME_ID).map(String::as_str),
        Some(game.as_str())
    );

    let host = c.host_config.expect("host config");
    assert_eq!(
        host.binds,
        Some(vec![format!("{}:/state:rw", state_dir.display())])
    );
    let mounts = c.mounts.expect("mounts");
    let state = mounts
        .iter()
        .find(|m| m.destination.as_deref() == Some("/state"))
        .expect("a mount at /state");
    assert_eq!(state.typ.as_deref(), Some("bind"));
    assert_eq!(state.rw, Some(true));
    assert_eq!(state.source.as_deref(), state_dir.to_str());

    assert_eq!(host.network_mode.as_deref(), Some("bridge"));
    assert_eq!(host.init, Some(true));
    assert_eq!(
        host.restart_policy.and_then(|p| p.name),
        Some(RestartPolicyNameEnum::NO)
    );
    assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
    let cap_add = host.cap_add.unwrap_or_default();
    assert!(
        cap_add.len() == 1 && cap_add[0].ends_with("NET_BIND_SERVICE"),
        "{cap_add:?}"
    );
    assert_eq!(
        host.security_opt,
        Some(vec!["no-new-privileges".to_owned()])
    );
    assert_eq!(host.nano_cpus, Some(500_000_000));
    assert_eq!(host.memory, Some(128 * 1024 * 1024));
    assert_eq!(host.pids_limit, Some(64));

    // The port's view of a created, never started container.
    let info = env
        .engine
        .inspect(&game)
        .await
        .unwrap()
        .expect("found by name");
    assert_eq!(info.id, id);
    assert_eq!(info.image_ref, "rtm-test/engine:1.4.2");
    assert!(!info.running);
    assert_eq!(info.health, None);
    assert_eq!(info.address, None);

    // A leftover container of that name: create refuses.
    let err = env
        .engine
        .create(&game, &image("rtm-test/engine:1.4.3"))
        .await
        .unwrap_err();
    eprintln!("create over a leftover: {err}");
    assert!(
        matches!(&err, EngineError::Rejected(m) if m.contains("409")),
        "{err:?}"
    );
}

#[tokio::test]
async fn start_stop_remove_round_trip() {
    let env = DockerTestEnv::new().await;
    let engine = &env.engine;
    let game = env.game();

    let t0 = Instant::now();
    let id = engine
        .create(&game, &image("rtm-test/engine:1.4.3"))
        .await
        .expect("create");
    engine.start(&id).await.expect("start");
    let create_start = t0.elapsed();

    let info = engine.inspect(&game).await.unwrap().expect("found");
    assert_eq!(info.id, id);
    assert!(info.running, "{info:?}");
    assert_eq!(info.exit_code, None);
    assert_eq!(info.health, None);
    assert_eq!(info.image_ref, "rtm-test/engine:1.4.3");
    let address = info.address.expect("an address on the bridge network");
    assert!(address.parse::<std::net::IpAddr>().is_ok(), "{address}");

    let boots = engine.state_dir(&game).join("boots");
    wait_for_file(&boots, "1.4.3", Duration::from_secs(10)).await;

    // Starting a running container again is fine.
    engine.start(&id).await.expect("start again");

    let t1 = Instant::now();
    engine
        .stop(&id, Duration::from_secs(10))
        .await
        .expect("stop");
    let stop = t1.elapsed();
    let info = engine
        .inspect(&game)
        .await
        .unwrap()
        .expect("kept after stop");
    assert!(!info.running);
    assert_eq!(
        info.exit_code,
        Some(0),
        "the engine exits cleanly on SIGTERM"
    );
    assert_eq!(info.address, None);
    engine
        .stop(&id, Duration::from_secs(10))
        .await
        .expect("stop of a stopped container");

    let t2 = Instant::now();
    engine.remove(&id).await.expect("remove");
    let remove = t2.elapsed();
    engine.remove(&id).await.expect("remove again");
    assert_eq!(engine.inspect(&game).await.unwrap(), None);
    assert!(
        engine.state_dir(&game).join("boots").exists(),
        "state is kept"
    );

    eprintln!(
        "create+start {create_start:?}, stop {stop:?}, remove {remove:?}, stop+remove {:?}",
        stop + remove
    );
    assert!(stop < Duration::from_secs(2), "stop took {stop:?}");
}

#[tokio::test]
async fn remove_force_kills_a_running_container() {
    let env = DockerTestEnv::new().await;
    let (game, id) = started(&env, "rtm-test/engine:1.4.2").await;
    env.engine
        .remove(&id)
        .await
        .expect("remove a running container");
    assert_eq!(env.engine.inspect(&game).await.unwrap(), None);
}

#[tokio::test]
async fn concurrent_removes_both_succeed() {
    // The loser may be told "removal … is already in progress" (409): it
    // waits for the container to disappear and succeeds too.
    let env = DockerTestEnv::new().await;
    for _ in 0..3 {
        let (game, id) = started(&env, "rtm-test/slow:1.4.2").await;
        let (a, b, c) = tokio::join!(
            env.engine.remove(&id),
            env.engine.remove(&id),
            env.engine.remove(&id)
        );
        a.expect("first remove");
        b.expect("second remove");
        c.expect("third remove");
        assert_eq!(env.engine.inspect(&game).await.unwrap(), None);
    }
}

#[tokio::test]
async fn missing_containers_are_not_errors_where_the_port_says_so() {
    let env = DockerTestEnv::new().await;
    let engine = &env.engine;
    let missing = ContainerId(format!("{}nothing-here", env.prefix));
    assert_eq!(engine.inspect(&env.game()).await.unwrap(), None);
    engine
        .stop(&missing, Duration::from_secs(1))
        .await
        .expect("stop of a missing one");
    engine
        .remove(&missing)
        .await
        .expect("remove of a missing one");
    assert_eq!(engine.logs_tail(&missing, 10).await.unwrap(), "");
    let err = engine.start(&missing).await.unwrap_err();
    assert!(
        matches!(&err, EngineError::Rejected(m) if m.contains("404")),
        "{err:?}"
    );
    let err = engine
        .create(&env.game(), &image("rtm-test/absent:1.0.0"))
        .await
        .unwrap_err();
    assert!(matches!(&err, EngineError::Rejected(_)), "{err:?}");
}

#[tokio::test]
async fn a_slow_engine_is_killed_after_the_grace_period() {
    let env = DockerTestEnv::new().await;
    let (game, id) = started(&env, "rtm-test/slow:1.4.3").await;
    // Let it install its SIGTERM trap (right after it records its boot).
    let boots = env.engine.state_dir(&game).join("boots");
    wait_for_file(&boots, "1.4.3", Duration::from_secs(10)).await;
    wait_for_logs(&env.engine, &id, "starting").await;

    let t0 = Instant::now();
    env.engine
        .stop(&id, Duration::from_secs(1))
        .await
        .expect("stop");
    let took = t0.elapsed();
    eprintln!("stop of the slow engine with 1 s grace took {took:?}");
    assert!(
        took >= Duration::from_millis(900),
        "{took:?}: SIGTERM was not ignored?"
    );
    assert!(took < Duration::from_secs(8), "{took:?}");
    let info = env.engine.inspect(&game).await.unwrap().expect("kept");
    assert!(!info.running);
    assert_eq!(info.exit_code, Some(137), "killed");
}

#[tokio::test]
async fn a_crashing_engine_reports_its_exit_code_and_logs() {
    let env = DockerTestEnv::new().await;
    let (game, id) = started(&env, "rtm-test/crash:1.4.3").await;
    let info = wait_for_container(&env.engine, &game, Duration::from_secs(10), "exited", |i| {
        !i.running
    })
    .await;
    assert_eq!(info.exit_code, Some(3));
    let logs = env.engine.logs_tail(&id, 20).await.unwrap();
    assert!(logs.contains("fatal"), "{logs:?}");
    let last = env.engine.logs_tail(&id, 1).await.unwrap();
    assert_eq!(last.lines().count(), 1, "{last:?}");
}

#[tokio::test]
async fn a_healthy_engine_goes_from_starting_to_healthy() {
    let env = DockerTestEnv::new().await;
    let t0 = Instant::now();
    let (game, _id) = started(&env, "rtm-test/healthy:1.4.3").await;
    let info = env.engine.inspect(&game).await.unwrap().expect("found");
    assert_eq!(info.health, Some(Health::Starting));
    let info = wait_for_container(
        &env.engine,
        &game,
        Duration::from_secs(20),
        "healthy",
        |i| i.health == Some(Health::Healthy),
    )
    .await;
    eprintln!("healthy after {:?}", t0.elapsed());
    assert!(info.running);
}

#[tokio::test]
async fn an_unhealthy_engine_reports_unhealthy() {
    let env = DockerTestEnv::new().await;
    let (game, _id) = started(&env, "rtm-test/unhealthy:1.4.3").await;
    let info = wait_for_container(
        &env.engine,
        &game,
        Duration::from_secs(20),
        "unhealthy",
        |i| i.health == Some(Health::Unhealthy),
    )
    .await;
    assert!(info.running, "unhealthy, but still running");
}

async fn wait_for_logs(engine: &DockerEngine, id: &ContainerId, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logs = engine.logs_tail(id, 50).await.expect("logs");
        if logs.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} not in the logs: {logs:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Issue 10, point 6 and 11: what an engine can do to its host. Its state
/// directory is `0700` (a setuid file an engine leaves there is out of
/// other host users' reach), it has no swap beyond its memory limit, and
/// its output is rotated.
#[tokio::test]
async fn a_state_directory_is_private_and_the_container_has_no_swap_and_rotated_logs() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let env = DockerTestEnv::new().await;
    let game = env.game();
    let state_dir = env.engine.state_dir(&game);
    // A directory left open by an older version is tightened too.
    std::fs::create_dir_all(&state_dir).unwrap();
    std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o755)).unwrap();

    let id = env
        .engine
        .create(&game, &image("rtm-test/engine:1.4.2"))
        .await
        .expect("create");
    let mode = std::fs::metadata(&state_dir).unwrap().mode() & 0o7777;
    assert_eq!(mode, 0o700, "state directory mode {mode:o}");

    let c = test_client()
        .await
        .inspect_container(id.as_str(), None)
        .await
        .expect("inspect");
    let host = c.host_config.expect("host config");
    assert_eq!(host.memory, Some(128 * 1024 * 1024));
    assert_eq!(host.memory_swap, host.memory, "no swap beyond the limit");
    let log = host.log_config.expect("log config");
    assert_eq!(log.typ.as_deref(), Some("json-file"));
    let opts = log.config.unwrap_or_default();
    assert_eq!(opts.get("max-size").map(String::as_str), Some("1048576"));
    assert_eq!(opts.get("max-file").map(String::as_str), Some("2"));
    assert_eq!(c.config.and_then(|c| c.user).unwrap_or_default(), "");

    // The engine, as root in its container, still writes its state.
    env.engine.start(&id).await.expect("start");
    wait_for_file(&state_dir.join("boots"), "1.4.2", Duration::from_secs(10)).await;
}

/// With `RTM_ENGINE_USER`, the state directory belongs to that user and the
/// engine runs as it: what it writes there is that user's, not root's.
#[tokio::test]
async fn an_engine_user_owns_the_state_directory_and_runs_the_engine() {
    use std::os::unix::fs::MetadataExt as _;
    let env = DockerTestEnv::with(|cfg| {
        cfg.engine_user = Some(rtmanager::config::EngineUser {
            uid: 4242,
            gid: 4343,
        });
    })
    .await;
    let (game, id) = started(&env, "rtm-test/engine:1.4.2").await;
    let state_dir = env.engine.state_dir(&game);
    let dir = std::fs::metadata(&state_dir).unwrap();
    assert_eq!((dir.uid(), dir.gid()), (4242, 4343));
    assert_eq!(dir.mode() & 0o7777, 0o700);

    let c = test_client()
        .await
        .inspect_container(id.as_str(), None)
        .await
        .expect("inspect");
    assert_eq!(c.config.and_then(|c| c.user).as_deref(), Some("4242:4343"));
    let boots = state_dir.join("boots");
    wait_for_file(&boots, "1.4.2", Duration::from_secs(10)).await;
    let file = std::fs::metadata(&boots).unwrap();
    assert_eq!(
        (file.uid(), file.gid()),
        (4242, 4343),
        "the engine wrote its state as the engine user"
    );
}

#[tokio::test]
async fn a_next_container_is_made_beside_the_game_and_renamed_to_its_name() {
    let env = DockerTestEnv::new().await;
    let engine = &env.engine;
    let (game, old) = started(&env, "rtm-test/engine:1.4.2").await;

    // Created beside the running one, under the temporary name.
    let next = engine
        .create_next(&game, &image("rtm-test/engine:1.4.3"))
        .await
        .expect("create next");
    let name = engine.next_container_name(&game);
    assert!(name.starts_with(&env.prefix), "{name}");
    assert!(name.ends_with(&format!("_next.{game}")), "{name}");
    let staged = engine.inspect_next(&game).await.unwrap().expect("staged");
    assert_eq!(staged.id, next);
    assert!(!staged.running);
    assert_eq!(staged.image_ref, "rtm-test/engine:1.4.3");
    assert_eq!(engine.inspect(&game).await.unwrap().unwrap().id, old);
    let again = engine
        .create_next(&game, &image("rtm-test/engine:1.4.3"))
        .await
        .unwrap_err();
    assert!(matches!(again, EngineError::Rejected(_)), "{again:?}");

    // The game's name is taken: the rename is refused.
    let refused = engine.rename_to_game(&next, &game).await.unwrap_err();
    assert!(matches!(refused, EngineError::Rejected(_)), "{refused:?}");

    engine.remove(&old).await.unwrap();
    engine.rename_to_game(&next, &game).await.expect("rename");
    assert_eq!(engine.inspect(&game).await.unwrap().unwrap().id, next);
    assert_eq!(engine.inspect_next(&game).await.unwrap(), None);
    // Repeatable: a retry of a rename that took effect succeeds.
    engine
        .rename_to_game(&next, &game)
        .await
        .expect("rename again");

    // It runs as a container created under the game's name would.
    engine.start(&next).await.expect("start");
    let info = wait_for_container(engine, &game, Duration::from_secs(10), "running", |i| {
        i.running
    })
    .await;
    assert!(info.address.is_some(), "{info:?}");
    let boots = wait_for_file(
        &engine.state_dir(&game).join("boots"),
        "1.4.3",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(boots, "1.4.2\n1.4.3\n");
}
