//! Shared test harness: isolated resources on the real services, each
//! cleaned up when the test ends (also when it panics).

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use rtmanager::config::{AmqpConfig, Config, LifecycleConfig, SecretUrl};
use rtmanager::domain::AllowedImages;
use rtmanager::lifecycle::Lifecycle;
use rtmanager::outbound::docker::DockerEngine;
use rtmanager::outbound::postgres::PgStore;
use rtmanager::outbound::redis_lease::RedisLeases;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor, PgPool};
use uuid::Uuid;

use crate::docker_support::DockerTestEnv;

/// The server the tests create their databases on (any database works as
/// the admin connection).
pub fn admin_database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn redis_url() -> String {
    std::env::var("RTM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub fn amqp_url() -> String {
    std::env::var("RTM_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A short unique suffix for names (databases, prefixes, game ids).
pub fn unique(label: &str) -> String {
    format!("{label}-{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// A fresh database with the migrations applied, dropped on `Drop`.
pub struct TestDb {
    pub pool: PgPool,
    pub name: String,
    pub url: String,
    admin: PgConnectOptions,
}

impl TestDb {
    pub async fn new() -> Self {
        let admin: PgConnectOptions = admin_database_url().parse().expect("DATABASE_URL");
        let name = format!("rtm_test_{}", Uuid::new_v4().simple());
        let mut conn = admin
            .connect()
            .await
            .expect("connect to the admin database");
        conn.execute(sqlx::AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#)))
            .await
            .expect("create the test database");
        conn.close().await.ok();

        let options = admin.clone().database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .expect("connect to the test database");
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .expect("apply the migrations");
        let base = admin_database_url();
        let url = match base.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => base,
        };
        Self {
            pool,
            name,
            url,
            admin,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Async drop is not a thing: drop the database from a helper thread
        // with its own runtime, so it goes away even when a test panics.
        // The pool is not closed first: closing waits for connections that
        // only the (now blocked) test runtime could hand back. FORCE ends
        // them on the server side instead.
        let admin = self.admin.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                match admin.connect().await {
                    Ok(mut conn) => {
                        let drop = sqlx::AssertSqlSafe(format!(
                            r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#
                        ));
                        if let Err(e) = conn.execute(drop).await {
                            eprintln!("drop test database {name}: {e}");
                        }
                    }
                    Err(e) => eprintln!("drop test database {name}: {e}"),
                }
            });
        })
        .join();
    }
}

/// The lifecycle settings of every test: short enough to keep the suite
/// quick, long enough for the test engine to start and settle. A test that
/// needs another value names it: `LifecycleConfig { lease_ttl: …,
/// ..lifecycle_config() }`.
pub fn lifecycle_config() -> LifecycleConfig {
    LifecycleConfig {
        lease_ttl: Duration::from_secs(6),
        stop_timeout: Duration::from_secs(2),
        start_settle: Duration::from_millis(800),
        health_timeout: Duration::from_secs(15),
        rollback: true,
        allowed_images: AllowedImages::any(),
        retry_for: Duration::from_secs(2),
    }
}

/// One test's world on the real services: its own database, Redis prefix,
/// container prefix and state root, all gone when it drops. Lifecycles are
/// built over it with whichever port a test swaps for a wrapper.
pub struct World {
    pub db: TestDb,
    pub docker: DockerTestEnv,
    pub leases: RedisLeases,
}

impl World {
    pub async fn new() -> Self {
        let db = TestDb::new().await;
        let docker = DockerTestEnv::new().await;
        let prefix = format!("{}:", unique("rtmtest"));
        let leases = RedisLeases::connect(&SecretUrl::new(redis_url()), &prefix)
            .await
            .expect("connect to redis");
        Self { db, docker, leases }
    }

    pub fn store(&self) -> PgStore {
        PgStore::new(self.db.pool.clone())
    }

    /// The lifecycle on this world's real ports.
    pub fn lifecycle(
        &self,
        config: LifecycleConfig,
    ) -> Lifecycle<PgStore, RedisLeases, DockerEngine> {
        Lifecycle::new(
            self.store(),
            self.leases.clone(),
            self.docker.engine.clone(),
            config,
        )
    }
}

/// Names for one test's own AMQP topology on the shared broker, after `id`.
pub fn test_amqp(id: &str) -> AmqpConfig {
    AmqpConfig {
        command_exchange: format!("rtmt.{id}.commands"),
        command_queue: format!("rtmt.{id}.commands"),
        event_exchange: format!("rtmt.{id}.events"),
        dead_letter_exchange: format!("rtmt.{id}.dlx"),
        dead_letter_queue: format!("rtmt.{id}.dead-letters"),
        delivery_limit: 3,
        prefetch: 4,
    }
}

/// The whole worker's environment for one test: its database, topology,
/// container prefix and state root, a fresh Redis prefix and HTTP port, and
/// the test timings. An environment, not just a `Config`, so a test can run
/// the binary with it too; a test that needs another value inserts it.
/// The node every test worker is, unless a test names others.
pub const TEST_NODE: &str = "n1";

pub fn worker_env(
    database_url: &str,
    amqp: &AmqpConfig,
    container_prefix: &str,
    state_root: &Path,
) -> HashMap<String, String> {
    [
        ("RTM_AMQP_URL", amqp_url()),
        ("DATABASE_URL", database_url.to_owned()),
        ("RTM_REDIS_URL", redis_url()),
        ("RTM_REDIS_PREFIX", format!("{}:", unique("rtmtest"))),
        ("RTM_STATE_ROOT", state_root.display().to_string()),
        ("RTM_CONTAINER_PREFIX", container_prefix.to_owned()),
        ("RTM_COMMAND_EXCHANGE", amqp.command_exchange.clone()),
        ("RTM_COMMAND_QUEUE", amqp.command_queue.clone()),
        ("RTM_EVENT_EXCHANGE", amqp.event_exchange.clone()),
        (
            "RTM_DEAD_LETTER_EXCHANGE",
            amqp.dead_letter_exchange.clone(),
        ),
        ("RTM_DEAD_LETTER_QUEUE", amqp.dead_letter_queue.clone()),
        ("RTM_DELIVERY_LIMIT", amqp.delivery_limit.to_string()),
        ("RTM_CPUS", "0.5".into()),
        ("RTM_MEMORY", "128m".into()),
        ("RTM_STOP_TIMEOUT", "2s".into()),
        ("RTM_START_SETTLE", "800ms".into()),
        ("RTM_HEALTH_TIMEOUT", "15s".into()),
        ("RTM_LEASE_TTL", "6s".into()),
        ("RTM_RETRY_FOR", "3s".into()),
        ("RTM_SHUTDOWN_TIMEOUT", "20s".into()),
        (
            "RTM_HTTP_ADDR",
            format!("127.0.0.1:{}", crate::procs::free_port()),
        ),
        ("RTM_LOG_FORMAT", "pretty".into()),
        // A node of the test's own (SPEC §12): its queue is the test's
        // command queue's, deleted with it.
        ("RTM_NODE", TEST_NODE.into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// The worker `Config` that `env` (from `worker_env`) gives.
pub fn worker_config(env: &HashMap<String, String>) -> Config {
    Config::from_lookup(|k| env.get(k).cloned()).expect("test config")
}

/// A decoded command as the lobby would send it, with a fresh command_id.
pub fn command_request(
    op: rtmanager::domain::OpKind,
    game: &rtmanager::domain::GameId,
    image: Option<&str>,
) -> rtmanager::domain::CommandRequest {
    rtmanager::domain::CommandRequest {
        command_id: Uuid::new_v4().to_string(),
        op,
        game_id: Some(game.to_string()),
        image_ref: image.map(str::to_owned),
        op_source: Some("lobby".into()),
        source_ref: None,
        reason: None,
        requested_at: Some(chrono::Utc::now()),
        reply_to: None,
        malformed: None,
        node: None,
        refusal: None,
    }
}

/// Logs of the code under test, only when asked (`RUST_LOG=…`): tests are
/// quiet by default.
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Runs `probe` every 20 ms until it yields a value, and returns it; fails
/// the test, naming `what` it waited for, after `within`.
pub async fn eventually<T, F: Future<Output = Option<T>>>(
    within: Duration,
    what: &str,
    mut probe: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (up to 30 s) until an attempt of `command_id` holds the game's
/// lease: the command is under way, so what the test does next lands in the
/// middle of it rather than before it.
pub async fn wait_for_lease(
    leases: &rtmanager::outbound::redis_lease::RedisLeases,
    game: &rtmanager::domain::GameId,
    command_id: &str,
) {
    let what = format!("command {command_id} takes the lease of {game}");
    eventually(Duration::from_secs(30), &what, || async {
        let holder = leases.holder_of(game).await.expect("read the lease")?;
        (rtmanager::ports::LeaseHolder::command_of(&holder) == command_id).then_some(())
    })
    .await;
}

/// The event is a success (else the error code and message say why not).
#[track_caller]
pub fn assert_success(event: &rtmanager::domain::OutcomeEvent) {
    assert_eq!(
        event.outcome,
        rtmanager::domain::Outcome::Success,
        "expected success, got {:?}: {:?}",
        event.error_code,
        event.error_message
    );
}
