//! The bench's private world on the shared services — database names,
//! exchanges and queues, a Redis prefix, a container prefix and a state
//! root, all derived from one random id — the worker processes run in it,
//! and the cleanup that removes all of it (also after an error, a panic or
//! Ctrl-C).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bollard::Docker;
use bollard::query_parameters::{ListContainersOptionsBuilder, RemoveContainerOptionsBuilder};
use futures_util::StreamExt as _;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions as _, Connection as _, Executor as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::say;

/// The label rtmanager puts on every container it manages (SPEC §4); the
/// floor containers carry the same labels, so they have the same shape.
pub const LABEL_MANAGED: &str = "rtmanager.managed";
pub const LABEL_GAME_ID: &str = "rtmanager.game_id";

pub fn admin_database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn amqp_url() -> String {
    std::env::var("RTM_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn redis_url() -> String {
    std::env::var("RTM_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Every name the bench uses, after one random id.
#[derive(Debug, Clone)]
pub struct Names {
    pub id: String,
    pub worker_db: String,
    pub floor_db: String,
    pub command_exchange: String,
    pub command_queue: String,
    pub event_exchange: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    pub observer_queue: String,
    pub redis_prefix: String,
    /// Every container of the bench (rtmanager's and the floors') starts
    /// with this.
    pub container_prefix: String,
    /// Every game id of the bench (rtmanager's and the floors') starts
    /// with this.
    pub game_prefix: String,
    pub node: String,
}

impl Names {
    pub fn new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        Self {
            worker_db: format!("rtm_bench_{id}"),
            floor_db: format!("rtm_bench_floor_{id}"),
            command_exchange: format!("rtmb.{id}.commands"),
            command_queue: format!("rtmb.{id}.commands"),
            event_exchange: format!("rtmb.{id}.events"),
            dead_letter_exchange: format!("rtmb.{id}.dlx"),
            dead_letter_queue: format!("rtmb.{id}.dead-letters"),
            observer_queue: format!("rtmb.{id}.observer"),
            redis_prefix: format!("rtmb:{id}:"),
            container_prefix: format!("rtmb-{id}-"),
            game_prefix: format!("b{id}-"),
            node: format!("bench-{id}"),
            id,
        }
    }

    /// The URL of database `name` on the admin URL's server.
    pub fn database_url(name: &str) -> String {
        let base = admin_database_url();
        match base.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => base,
        }
    }

    /// A game id of the bench.
    pub fn game(&self, label: &str) -> String {
        format!("{}{label}", self.game_prefix)
    }
}

/// What the bench made and must take away again.
pub struct Rig {
    pub names: Names,
    pub state_root: tempfile::TempDir,
    pub workers: Mutex<Vec<Arc<Worker>>>,
}

impl Rig {
    pub fn new() -> anyhow::Result<Self> {
        let names = Names::new();
        let state_root = tempfile::Builder::new()
            .prefix(&format!("rtm-bench-{}-", names.id))
            .tempdir()
            .context("create the state root")?;
        Ok(Self {
            names,
            state_root,
            workers: Mutex::new(Vec::new()),
        })
    }

    /// The worker's environment (SPEC §9) on the bench's private names.
    pub fn worker_env(&self, http_port: u16) -> Vec<(String, String)> {
        let n = &self.names;
        [
            ("RTM_AMQP_URL", amqp_url()),
            ("DATABASE_URL", Names::database_url(&n.worker_db)),
            ("RTM_REDIS_URL", redis_url()),
            ("RTM_REDIS_PREFIX", n.redis_prefix.clone()),
            (
                "RTM_STATE_ROOT",
                self.state_root.path().display().to_string(),
            ),
            ("RTM_CONTAINER_PREFIX", n.container_prefix.clone()),
            ("RTM_COMMAND_EXCHANGE", n.command_exchange.clone()),
            ("RTM_COMMAND_QUEUE", n.command_queue.clone()),
            ("RTM_EVENT_EXCHANGE", n.event_exchange.clone()),
            ("RTM_DEAD_LETTER_EXCHANGE", n.dead_letter_exchange.clone()),
            ("RTM_DEAD_LETTER_QUEUE", n.dead_letter_queue.clone()),
            // Both workers are one node (they share this Docker engine).
            ("RTM_NODE", n.node.clone()),
            ("RTM_PREFETCH", "128".into()),
            ("RTM_START_SETTLE", "0s".into()),
            // The container shape, named here so the floors use the very
            // same values (these are the defaults).
            ("RTM_DOCKER_NETWORK", crate::floor::SHAPE.network.into()),
            ("RTM_CPUS", "1".into()),
            ("RTM_MEMORY", "1g".into()),
            ("RTM_PIDS_LIMIT", crate::floor::SHAPE.pids_limit.to_string()),
            ("RTM_LOG_MAX_SIZE", "10m".into()),
            (
                "RTM_LOG_MAX_FILES",
                crate::floor::SHAPE.log_max_files.into(),
            ),
            (
                "RTM_STOP_TIMEOUT",
                format!("{}s", crate::floor::SHAPE.stop_timeout),
            ),
            ("RTM_STATE_MOUNT", crate::floor::SHAPE.state_mount.into()),
            ("RTM_SHUTDOWN_TIMEOUT", "20s".into()),
            ("RTM_HTTP_ADDR", format!("127.0.0.1:{http_port}")),
            ("RTM_LOG_FORMAT", "json".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Starts `rtmanager serve` (the release binary) and waits until its
    /// `/readyz` says every dependency is up.
    pub async fn spawn_worker(&self, name: &str) -> anyhow::Result<Arc<Worker>> {
        let port = free_port()?;
        // Beside the state root, not in it (no game is named like a log).
        let dir = self.state_root.path().parent().unwrap_or(Path::new("/tmp"));
        let log = dir.join(format!("rtm-bench-{}-{name}.log", self.names.id));
        let worker = Arc::new(Worker::spawn(name, &self.worker_env(port), port, log)?);
        self.workers.lock().unwrap().push(worker.clone());
        worker.wait_ready(Duration::from_secs(90)).await?;
        say(&format!(
            "worker {name} ready (pid {}, log {})",
            worker.pid(),
            worker.log.display()
        ));
        Ok(worker)
    }

    /// Removes everything the bench may have made, whatever state the run
    /// ended in: every step is best effort and says what it could not do.
    pub async fn cleanup(&self, keep_logs: bool) {
        say("cleanup: stopping workers");
        let workers: Vec<_> = self.workers.lock().unwrap().drain(..).collect();
        for w in &workers {
            match w.terminate(Duration::from_secs(40)).await {
                Ok(Some(status)) if !status.success() => {
                    say(&format!("cleanup: worker {} exited {status}", w.name));
                }
                Ok(_) => {}
                Err(e) => say(&format!("cleanup: worker {}: {e:#}", w.name)),
            }
        }
        say("cleanup: removing containers");
        match remove_containers(&self.names).await {
            Ok(n) => say(&format!("cleanup: removed {n} container(s)")),
            Err(e) => say(&format!("cleanup: containers: {e:#}")),
        }
        if let Err(e) = delete_topology(&self.names).await {
            say(&format!("cleanup: broker: {e:#}"));
        }
        for db in [&self.names.worker_db, &self.names.floor_db] {
            if let Err(e) = drop_database(db).await {
                say(&format!("cleanup: database {db}: {e:#}"));
            }
        }
        if let Err(e) = delete_redis_keys(&self.names.redis_prefix).await {
            say(&format!("cleanup: redis: {e:#}"));
        }
        for w in &workers {
            if keep_logs {
                say(&format!("worker {} log kept: {}", w.name, w.log.display()));
            } else {
                let _ = std::fs::remove_file(&w.log);
            }
        }
        say("cleanup: done");
    }
}

/// A `rtmanager serve` process.
pub struct Worker {
    pub name: String,
    pub http_port: u16,
    pub log: PathBuf,
    child: Mutex<Option<Child>>,
    pid: u32,
}

impl Worker {
    fn spawn(
        name: &str,
        env: &[(String, String)],
        http_port: u16,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt as _;
        let out = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = Command::new(env!("CARGO_BIN_EXE_rtmanager"))
            .arg("serve")
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            // Its own process group: Ctrl-C reaches the bench, whose
            // cleanup then stops the worker with SIGTERM.
            .process_group(0)
            .spawn()
            .context("spawn rtmanager serve")?;
        let pid = child.id();
        Ok(Self {
            name: name.to_owned(),
            http_port,
            log,
            child: Mutex::new(Some(child)),
            pid,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `VmHWM` and `VmRSS` from `/proc/<pid>/status`, in MiB.
    pub fn memory(&self) -> Option<Memory> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let field = |name: &str| -> Option<f64> {
            let line = status.lines().find(|l| l.starts_with(name))?;
            let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib / 1024.0)
        };
        Some(Memory {
            hwm_mib: field("VmHWM:")?,
            rss_mib: field("VmRSS:")?,
        })
    }

    fn exited(&self) -> Option<ExitStatus> {
        self.child
            .lock()
            .unwrap()
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    async fn wait_ready(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.exited() {
                bail!(
                    "worker {} exited ({status}) before it was ready:\n{}",
                    self.name,
                    self.log_tail(30)
                );
            }
            if let Ok((200, _)) = self.http_get("/readyz").await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "worker {} not ready within {within:?}:\n{}",
                    self.name,
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One plain HTTP/1.1 GET on the worker's HTTP address.
    pub async fn http_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let port = self.http_port;
        let io = async move {
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await?;
            let mut response = String::new();
            stream.read_to_string(&mut response).await?;
            Ok::<_, std::io::Error>(response)
        };
        let response = tokio::time::timeout(Duration::from_secs(5), io)
            .await
            .context("timed out")??;
        let status = response
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .context("no HTTP status")?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    }

    /// SIGTERM, then waits up to `within` for the exit (SIGKILL after it).
    /// `None` when it was already stopped.
    pub async fn terminate(&self, within: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let taken = self.child.lock().unwrap().take();
        let Some(mut child) = taken else {
            return Ok(None);
        };
        if let Ok(Some(status)) = child.try_wait() {
            return Ok(Some(status));
        }
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("did not exit within {within:?} of SIGTERM (SIGKILLed)");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Memory {
    pub hwm_mib: f64,
    pub rss_mib: f64,
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

pub fn admin_options() -> anyhow::Result<PgConnectOptions> {
    admin_database_url()
        .parse()
        .context("DATABASE_URL (the admin database)")
}

pub async fn create_database(name: &str) -> anyhow::Result<()> {
    let mut conn = admin_options()?
        .connect()
        .await
        .context("connect to PostgreSQL")?;
    conn.execute(sqlx::AssertSqlSafe(format!(r#"CREATE DATABASE "{name}""#)))
        .await
        .with_context(|| format!("create database {name}"))?;
    conn.close().await.ok();
    Ok(())
}

async fn drop_database(name: &str) -> anyhow::Result<()> {
    let mut conn = admin_options()?.connect().await?;
    conn.execute(sqlx::AssertSqlSafe(format!(
        r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#
    )))
    .await?;
    conn.close().await.ok();
    Ok(())
}

/// Every container of the bench: named with its prefix, or labelled with
/// one of its game ids (a container rtmanager made under a temporary name
/// still carries its game's label).
async fn remove_containers(names: &Names) -> anyhow::Result<usize> {
    let docker = Docker::connect_with_unix_defaults()?
        .negotiate_version()
        .await?;
    let filters = HashMap::from([("label", vec![format!("{LABEL_MANAGED}=true")])]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let ours: Vec<String> = docker
        .list_containers(Some(options))
        .await?
        .into_iter()
        .filter(|c| {
            let named = c.names.iter().flatten().any(|n| {
                n.trim_start_matches('/')
                    .starts_with(&names.container_prefix)
            });
            let labelled = c
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_GAME_ID))
                .is_some_and(|g| g.starts_with(&names.game_prefix));
            named || labelled
        })
        .filter_map(|c| c.id)
        .collect();
    let count = ours.len();
    let results: Vec<_> = futures_util::stream::iter(ours)
        .map(|id| {
            let docker = docker.clone();
            async move {
                let options = RemoveContainerOptionsBuilder::default()
                    .force(true)
                    .v(true)
                    .build();
                docker.remove_container(&id, Some(options)).await
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    for r in results {
        if let Err(e) = r {
            say(&format!("cleanup: remove a container: {e}"));
        }
    }
    Ok(count)
}

async fn delete_topology(names: &Names) -> anyhow::Result<()> {
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .context("connect to RabbitMQ")?;
    // A fresh channel for each: a refused delete closes its channel.
    let node_queue = format!("{}.node.{}", names.command_queue, names.node);
    for queue in [
        &names.command_queue,
        &names.dead_letter_queue,
        &names.observer_queue,
        &node_queue,
    ] {
        let ch = conn.create_channel().await?;
        let _ = ch
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for exchange in [
        &names.command_exchange,
        &names.event_exchange,
        &names.dead_letter_exchange,
    ] {
        let ch = conn.create_channel().await?;
        let _ = ch
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "bench done".into()).await;
    Ok(())
}

async fn delete_redis_keys(prefix: &str) -> anyhow::Result<()> {
    let client = redis::Client::open(redis_url())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// A state directory as rtmanager prepares one (0700).
pub fn prepare_state_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}
