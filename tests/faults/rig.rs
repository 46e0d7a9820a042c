//! One scenario's world: private Redis, PostgreSQL and RabbitMQ (and
//! optionally a private dockerd), worker processes, an observer bound to
//! the events exchange before anything is published, a publisher that rides
//! out broker restarts, and the ledger of every command sent.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bollard::Docker;
use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use rtmanager::config::{AmqpConfig, Config, SecretUrl};
use rtmanager::domain::OpKind;
use rtmanager::messages::CommandMessage;
use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection as _, Executor as _, PgPool};
use tokio::task::JoinHandle;

use crate::procs::{ScenarioDir, free_port, poll_for};
use crate::services::{Dep, Postgres, PrivateDocker, Rabbit, Redis};
use crate::worker::Worker;

/// The images a private engine gets copied in.
pub const PRIVATE_IMAGES: &[&str] = &["rtm-test/engine:1.4.2", "rtm-test/engine:1.4.3"];

#[derive(Debug, Clone)]
pub struct RigOptions {
    pub workers: usize,
    pub lease_ttl: &'static str,
    pub stop_timeout: &'static str,
    pub retry_for: &'static str,
    pub prefetch: Option<&'static str>,
    pub private_docker: bool,
    /// More worker settings (the reconciler's, say).
    pub extra_env: &'static [(&'static str, &'static str)],
}

impl Default for RigOptions {
    fn default() -> Self {
        Self {
            workers: 1,
            lease_ttl: "6s",
            stop_timeout: "2s",
            retry_for: "30s",
            prefetch: None,
            private_docker: false,
            extra_env: &[],
        }
    }
}

/// A lifecycle command as the lobby sends it.
#[derive(Debug, Clone)]
pub enum Cmd {
    Start(Cow<'static, str>),
    Stop,
    Restart,
    Patch(Cow<'static, str>),
    Remove,
}

impl Cmd {
    pub fn op(&self) -> OpKind {
        match self {
            Cmd::Start(_) => OpKind::Start,
            Cmd::Stop => OpKind::Stop,
            Cmd::Restart => OpKind::Restart,
            Cmd::Patch(_) => OpKind::Patch,
            Cmd::Remove => OpKind::Remove,
        }
    }
}

/// One command of the ledger.
#[derive(Debug, Clone)]
pub struct Sent {
    pub command_id: String,
    pub game: String,
    pub cmd: Cmd,
    pub copies: u32,
}

/// An event as the observer received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub routing_key: String,
    pub body: Value,
    pub message_id: Option<String>,
}

impl Seen {
    pub fn str(&self, field: &str) -> Option<&str> {
        self.body.get(field).and_then(Value::as_str)
    }

    pub fn is_outer(&self) -> bool {
        self.body.get("outer_op").is_some_and(Value::is_null)
    }
}

/// What Docker reports about a container.
#[derive(Debug, Clone)]
pub struct Observed {
    pub id: String,
    pub running: bool,
    pub image: String,
    pub health: Option<String>,
}

pub struct Rig {
    pub key: String,
    pub started: Instant,
    pub workers: Vec<Worker>,
    pub observer: Observer,
    pub docker: Docker,
    /// The engine `docker` and the workers talk to (`None`: the default).
    docker_host: Option<String>,
    pub db: PgPool,
    pub amqp: AmqpConfig,
    pub prefix: String,
    pub redis_prefix: String,
    pub state_root: PathBuf,
    pub ledger: Mutex<Vec<Sent>>,
    pub notes: Mutex<Vec<String>>,
    publisher: tokio::sync::Mutex<Option<(Connection, Channel)>>,
    pub redis: Redis,
    pub pg: Postgres,
    pub rmq: Rabbit,
    pub dockerd: Option<PrivateDocker>,
    /// A rig of several nodes (SPEC §12): each node's name and engine
    /// (empty: one node, on `docker`).
    pub node_engines: Vec<(String, Docker)>,
    /// Dropped last: its teardown removes containers, processes and files.
    dir: ScenarioDir,
}

impl Rig {
    /// Has the scenario's teardown remove `image` from the shared engine
    /// (after the scenario's containers).
    pub fn remove_image_at_teardown(&self, image: &str) {
        let host = self.docker_host.as_deref().unwrap_or("-");
        self.dir.manifest().record(&format!("image {host} {image}"));
    }

    pub async fn new(key: &str, opts: RigOptions) -> Result<Self, String> {
        crate::services::preflight()?;
        let started = Instant::now();
        let dir = ScenarioDir::new(key);
        let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let prefix = format!("rtmf-{id}-");
        let shared_docker_host = std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty());
        dir.manifest().record(&format!(
            "docker {} {prefix}",
            shared_docker_host.as_deref().unwrap_or("-")
        ));
        let state_root = dir.subdir("state", None);

        // The three services boot concurrently (RabbitMQ takes ~5 s).
        let (redis, pg, rmq, dockerd) = tokio::join!(
            Redis::launch(&dir),
            Postgres::launch(&dir),
            Rabbit::launch(&dir, &id),
            async {
                if opts.private_docker {
                    Some(PrivateDocker::launch(&dir, &id, PRIVATE_IMAGES).await)
                } else {
                    None
                }
            }
        );
        let (redis, pg, rmq) = (redis?, pg?, rmq?);
        let dockerd = dockerd.transpose()?;

        // The database exists before any worker starts.
        let mut admin = sqlx::PgConnection::connect(&pg.url("postgres"))
            .await
            .map_err(|e| format!("connect to the private PostgreSQL: {e}"))?;
        admin
            .execute("create database rtmanager")
            .await
            .map_err(|e| format!("create database: {e}"))?;
        admin.close().await.ok();
        let db = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&pg.url("rtmanager"))
            .await
            .map_err(|e| format!("connect to the scenario database: {e}"))?;

        let docker_host = match &dockerd {
            Some(d) => Some(d.host.clone()),
            None => shared_docker_host.clone(),
        };
        let docker = match &docker_host {
            Some(h) => Docker::connect_with_host(h),
            None => Docker::connect_with_local_defaults(),
        }
        .map_err(|e| format!("docker client: {e}"))?
        .negotiate_version()
        .await
        .map_err(|e| format!("docker is not reachable: {e}"))?;

        let redis_prefix = format!("rtmf:{id}:");
        let mut env: Vec<(String, String)> = vec![
            ("PATH", std::env::var("PATH").unwrap_or_default()),
            ("RUST_LOG", "info".into()),
            ("RTM_FAULTS_DIR", dir.path.display().to_string()),
            ("RTM_AMQP_URL", rmq.url()),
            ("DATABASE_URL", pg.url("rtmanager")),
            ("RTM_REDIS_URL", redis.url()),
            ("RTM_REDIS_PREFIX", redis_prefix.clone()),
            ("RTM_STATE_ROOT", state_root.display().to_string()),
            ("RTM_CONTAINER_PREFIX", prefix.clone()),
            ("RTM_CPUS", "0.5".into()),
            ("RTM_MEMORY", "128m".into()),
            ("RTM_PIDS_LIMIT", "64".into()),
            ("RTM_STOP_TIMEOUT", opts.stop_timeout.into()),
            ("RTM_START_SETTLE", "800ms".into()),
            ("RTM_HEALTH_TIMEOUT", "20s".into()),
            ("RTM_LEASE_TTL", opts.lease_ttl.into()),
            ("RTM_RETRY_FOR", opts.retry_for.into()),
            ("RTM_SHUTDOWN_TIMEOUT", "60s".into()),
            ("RTM_LOG_FORMAT", "json".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        if let Some(h) = &docker_host {
            env.push(("DOCKER_HOST".into(), h.clone()));
        }
        if let Some(p) = opts.prefetch {
            env.push(("RTM_PREFETCH".into(), p.into()));
        }
        for (k, v) in opts.extra_env {
            env.push(((*k).into(), (*v).into()));
        }
        let lookup: HashMap<String, String> = env.iter().cloned().collect();
        let config = Config::from_lookup(|k| lookup.get(k).cloned())
            .map_err(|e| format!("the suite's worker settings are invalid: {e}"))?;
        let amqp = config.amqp.clone();

        let observer = Observer::start(rmq.url(), amqp.event_exchange.clone()).await?;

        let logs = dir.subdir("logs", None);
        let workers = (1..=opts.workers)
            .map(|n| {
                let port = free_port();
                let mut env = env.clone();
                env.push(("RTM_HTTP_ADDR".into(), format!("127.0.0.1:{port}")));
                Worker::new(
                    &format!("w{n}"),
                    logs.join(format!("w{n}.log")),
                    port,
                    env,
                    dir.manifest(),
                )
            })
            .collect();

        let rig = Self {
            key: key.to_owned(),
            started,
            workers,
            observer,
            docker,
            docker_host,
            db,
            amqp,
            prefix,
            redis_prefix,
            state_root,
            ledger: Mutex::new(Vec::new()),
            notes: Mutex::new(Vec::new()),
            publisher: tokio::sync::Mutex::new(None),
            redis,
            pg,
            rmq,
            dockerd,
            node_engines: Vec::new(),
            dir,
        };
        // The topology exists before the first publish (the worker declares
        // the same, idempotently).
        rig.publish_raw("runtime.none", None).await?;
        Ok(rig)
    }

    /// Starts every worker and waits until each reports ready.
    pub async fn start_workers(&self) -> Result<(), String> {
        for w in &self.workers {
            w.spawn();
        }
        for w in &self.workers {
            w.wait_ready(Duration::from_secs(90)).await?;
        }
        Ok(())
    }

    pub fn note(&self, line: impl Into<String>) {
        let line = line.into();
        println!("[{}] {line}", self.key);
        self.notes.lock().unwrap().push(line);
    }

    pub fn container_name(&self, game: &str) -> String {
        format!("{}{game}", self.prefix)
    }

    /// The name a patch or restart creates the game's new container under
    /// before the old one stops (the worker's `<prefix>_next.<game>`).
    pub fn next_container_name(&self, game: &str) -> String {
        format!("{}_next.{game}", self.prefix)
    }

    // -------------------------------------------------------- publishing

    /// The body the lobby would send (the CLI's [`CommandMessage`]).
    pub fn command_body(command_id: &str, game: &str, cmd: &Cmd) -> Value {
        let image = |i: &Cow<'static, str>| Some(i.to_string());
        let message = CommandMessage {
            command_id: command_id.to_owned(),
            op: cmd.op(),
            game_id: game.to_owned(),
            image_ref: match cmd {
                Cmd::Start(i) => image(i),
                _ => None,
            },
            new_image_ref: match cmd {
                Cmd::Patch(i) => image(i),
                _ => None,
            },
            op_source: "lobby".into(),
            source_ref: None,
            reason: matches!(cmd, Cmd::Stop).then(|| "lobby_request".into()),
            node: None,
            requested_at: chrono::Utc::now(),
        };
        serde_json::to_value(message).expect("a command serializes")
    }

    /// Publishes a command `copies` times (same command_id, back to back)
    /// and enters it in the ledger; returns its command_id.
    pub async fn send(&self, game: &str, cmd: Cmd, copies: u32) -> String {
        let command_id = uuid::Uuid::now_v7().to_string();
        let body = Self::command_body(&command_id, game, &cmd);
        self.ledger.lock().unwrap().push(Sent {
            command_id: command_id.clone(),
            game: game.to_owned(),
            cmd: cmd.clone(),
            copies,
        });
        for _ in 0..copies {
            if let Err(e) = self
                .publish_raw(&format!("runtime.{}", cmd.op()), Some(&body))
                .await
            {
                panic!("could not publish {command_id}: {e}");
            }
        }
        command_id
    }

    /// Publishes to the command exchange with a confirm, reconnecting
    /// through broker restarts, for up to three minutes. `None` only
    /// declares the topology.
    async fn publish_raw(&self, routing_key: &str, body: Option<&Value>) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(180);
        let bytes = body.map(|b| serde_json::to_vec(b).expect("a command serializes"));
        let mut last;
        loop {
            let attempt = async {
                let mut link = self.publisher.lock().await;
                if link.is_none() {
                    let conn = rtmanager::broker::connect(
                        &SecretUrl::new(self.rmq.url()),
                        "rtmanager faults publisher",
                    )
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                    let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
                    channel
                        .confirm_select(ConfirmSelectOptions::default())
                        .await
                        .map_err(|e| e.to_string())?;
                    rtmanager::broker::declare_topology(&channel, &self.amqp)
                        .await
                        .map_err(|e| format!("{e:#}"))?;
                    *link = Some((conn, channel));
                }
                let Some(bytes) = &bytes else { return Ok(()) };
                let (_, channel) = link.as_ref().expect("just connected");
                let result = async {
                    let confirm = channel
                        .basic_publish(
                            self.amqp.command_exchange.as_str().into(),
                            routing_key.into(),
                            BasicPublishOptions::default(),
                            bytes,
                            BasicProperties::default()
                                .with_content_type("application/json".into())
                                .with_delivery_mode(2),
                        )
                        .await
                        .map_err(|e| e.to_string())?
                        .await
                        .map_err(|e| e.to_string())?;
                    match confirm {
                        lapin::Confirmation::Ack(None) => Ok(()),
                        other => Err(format!("not confirmed: {other:?}")),
                    }
                }
                .await;
                if result.is_err() {
                    *link = None;
                }
                result
            };
            match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => last = e,
                Err(_) => {
                    last = "publish timed out".into();
                    *self.publisher.lock().await = None;
                }
            }
            if Instant::now() >= deadline {
                return Err(last);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Ready messages in the command queue (unacked ones are not counted).
    pub async fn queue_ready(&self) -> Option<u32> {
        self.ready_in(&self.amqp.command_queue).await
    }

    // --------------------------------------------------------- observing

    /// The first outer event of `command_id`, waiting up to `timeout`.
    pub async fn wait_outer(&self, command_id: &str, timeout: Duration) -> Option<Seen> {
        poll_for(timeout, Duration::from_millis(50), || {
            std::future::ready(
                self.observer
                    .find(|s| s.is_outer() && s.str("command_id") == Some(command_id)),
            )
        })
        .await
    }

    /// The game's container; on a rig of several nodes, on whichever
    /// engine has it (an error if more than one has).
    pub async fn inspect(&self, game: &str) -> Result<Option<Observed>, String> {
        if !self.node_engines.is_empty() {
            return self.inspect_on_one_node(game).await;
        }
        self.inspect_named(&self.container_name(game)).await
    }

    /// The game's container under its temporary name, if any.
    pub async fn inspect_next(&self, game: &str) -> Result<Option<Observed>, String> {
        self.inspect_named(&self.next_container_name(game)).await
    }

    async fn inspect_named(&self, name: &str) -> Result<Option<Observed>, String> {
        inspect_on(&self.docker, name).await
    }

    /// Polls the game's lease key every 2 ms until an attempt of
    /// `command_id` holds it (not the previous command's lease, which may
    /// still be there a moment after its outcome was published); returns
    /// when it was seen and its value.
    pub async fn wait_lease(
        &self,
        game: &str,
        command_id: &str,
        timeout: Duration,
    ) -> Option<(Instant, String)> {
        let conn = self.lease_conn().await.ok()?;
        poll_for(timeout, Duration::from_millis(2), || {
            let mut conn = conn.clone();
            async move {
                // A read error counts as "not yet".
                let value = self.lease_value(&mut conn, game).await.ok().flatten()?;
                (rtmanager::ports::LeaseHolder::command_of(&value) == command_id)
                    .then(|| (Instant::now(), value))
            }
        })
        .await
    }

    /// Waits until the game's lease key is gone (expired or released);
    /// `false` if it is still there at `timeout`. A read error is not
    /// "gone".
    pub async fn wait_lease_gone(&self, game: &str, timeout: Duration) -> Result<bool, String> {
        let conn = self.lease_conn().await?;
        let gone = poll_for(timeout, Duration::from_millis(100), || {
            let mut conn = conn.clone();
            async move { matches!(self.lease_value(&mut conn, game).await, Ok(None)).then_some(()) }
        })
        .await;
        Ok(gone.is_some())
    }

    async fn lease_conn(&self) -> Result<redis::aio::MultiplexedConnection, String> {
        redis::Client::open(self.redis.url())
            .map_err(|e| format!("redis client: {e}"))?
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| format!("connect to the private redis: {e}"))
    }

    async fn lease_value(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
        game: &str,
    ) -> Result<Option<String>, String> {
        redis::cmd("GET")
            .arg(format!("{}lease:{game}", self.redis_prefix))
            .query_async(conn)
            .await
            .map_err(|e| format!("read the lease: {e}"))
    }

    /// Takes a dependency away and brings it back after `down`.
    pub async fn stop_dep(&self, dep: Dep) -> Result<(), String> {
        match dep {
            Dep::RabbitMq => self.rmq.stop().await,
            Dep::Redis => self.redis.stop().await,
            Dep::Postgres => self.pg.stop().await,
            Dep::Docker => match &self.dockerd {
                Some(d) => d.stop().await,
                None => Err("no private dockerd in this rig".into()),
            },
        }
    }

    pub async fn start_dep(&self, dep: Dep) -> Result<(), String> {
        match dep {
            Dep::RabbitMq => self.rmq.start().await,
            Dep::Redis => self.redis.start().await,
            Dep::Postgres => self.pg.start().await,
            Dep::Docker => match &self.dockerd {
                Some(d) => d.start().await,
                None => Err("no private dockerd in this rig".into()),
            },
        }
    }

    /// Where the worker logs of this scenario are kept after the run.
    pub fn kept_logs_dir(&self) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join("faults-logs")
            .join(&self.key)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Keep the logs (the scenario directory goes away): worker logs and
        // the private services' logs, under target/faults-logs/<scenario>/.
        let keep = self.kept_logs_dir();
        let _ = std::fs::remove_dir_all(&keep);
        if std::fs::create_dir_all(&keep).is_ok() {
            for w in &self.workers {
                let _ = std::fs::copy(&w.log, keep.join(w.log.file_name().unwrap_or_default()));
            }
            let base = &self.dir.path;
            for (from, to) in [
                (base.join("redis/redis.log"), "redis.log"),
                (base.join("pg/postgres.log"), "postgres.log"),
                (base.join("dk/dockerd.log"), "dockerd.log"),
            ] {
                let _ = std::fs::copy(from, keep.join(to));
            }
            if let Ok(entries) = std::fs::read_dir(base.join("rmq/log")) {
                for e in entries.flatten() {
                    let _ = std::fs::copy(e.path(), keep.join(e.file_name()));
                }
            }
        }
        for w in &self.workers {
            w.kill();
        }
        self.observer.stop();
    }
}

// ---------------------------------------------------------------- observer

/// A durable queue bound to `runtime.#` on the events exchange, consumed
/// with acks and reconnected through broker restarts, so the suite sees
/// every event the workers publish (duplicates included).
pub struct Observer {
    seen: Arc<Mutex<Vec<Seen>>>,
    stopping: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

const OBSERVER_QUEUE: &str = "rtmfaults.observer";

impl Observer {
    /// Binds within a minute or fails naming the last error. Every attempt
    /// (connect, declare, bind, consume) is bounded, so a broker that
    /// accepts the socket but never answers is retried rather than waited
    /// on for good, both here and when the observer reconnects after a
    /// broker restart.
    async fn start(url: String, exchange: String) -> Result<Self, String> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stopping = Arc::new(AtomicBool::new(false));
        let last_error = Arc::new(Mutex::new(String::from("no attempt finished")));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn({
            let (seen, stopping, last_error) = (seen.clone(), stopping.clone(), last_error.clone());
            async move {
                let mut ready = Some(ready_tx);
                while !stopping.load(Ordering::Relaxed) {
                    if let Err(e) = observe(&url, &exchange, &seen, &mut ready).await {
                        *last_error.lock().unwrap() = e;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        });
        if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(60), ready_rx).await {
            return Ok(Self {
                seen,
                stopping,
                task,
            });
        }
        task.abort();
        let last = last_error.lock().unwrap().clone();
        Err(format!(
            "the event observer did not bind within 60 s: {last}"
        ))
    }

    pub fn snapshot(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The first event seen that matches, without copying the others.
    pub fn find(&self, matches: impl Fn(&Seen) -> bool) -> Option<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .find(|s| matches(s))
            .cloned()
    }

    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.task.abort();
    }
}

/// The observer's durable queue, bound to every outcome, being consumed.
async fn bind(url: &str, exchange: &str) -> Result<(Connection, lapin::Consumer), String> {
    let conn = rtmanager::broker::connect(&SecretUrl::new(url), "rtmanager faults observer")
        .await
        .map_err(|e| format!("{e:#}"))?;
    let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    channel
        .queue_declare(
            OBSERVER_QUEUE.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    channel
        .queue_bind(
            OBSERVER_QUEUE.into(),
            exchange.into(),
            "runtime.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let consumer = channel
        .basic_consume(
            OBSERVER_QUEUE.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok((conn, consumer))
}

async fn observe(
    url: &str,
    exchange: &str,
    seen: &Mutex<Vec<Seen>>,
    ready: &mut Option<tokio::sync::oneshot::Sender<()>>,
) -> Result<(), String> {
    let (_conn, mut consumer) = tokio::time::timeout(Duration::from_secs(20), bind(url, exchange))
        .await
        .map_err(|_| "binding took over 20 s".to_owned())??;
    if let Some(tx) = ready.take() {
        let _ = tx.send(());
    }
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery.map_err(|e| e.to_string())?;
        let body = serde_json::from_slice(&delivery.data)
            .unwrap_or_else(|_| json!({"unparsable": String::from_utf8_lossy(&delivery.data)}));
        seen.lock().unwrap().push(Seen {
            routing_key: delivery.routing_key.to_string(),
            body,
            message_id: delivery
                .properties
                .message_id()
                .as_ref()
                .map(ToString::to_string),
        });
        delivery
            .ack(BasicAckOptions::default())
            .await
            .map_err(|e| e.to_string())?;
    }
    Err("the observer's consumer was cancelled".into())
}

/// What `docker` reports about the container `name` (`None`: no such
/// container).
async fn inspect_on(docker: &Docker, name: &str) -> Result<Option<Observed>, String> {
    match docker.inspect_container(name, None).await {
        Ok(c) => {
            let state = c.state.unwrap_or_default();
            Ok(Some(Observed {
                id: c.id.unwrap_or_default(),
                running: state.running.unwrap_or(false),
                image: c.config.and_then(|c| c.image).unwrap_or_default(),
                health: state.health.and_then(|h| h.status).map(|s| s.to_string()),
            }))
        }
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

// ------------------------------------------------- two nodes (SPEC §12)

/// The nodes of a two-node rig: `w1` is `n1` on the shared engine, `w2` is
/// `n2` on the rig's private dockerd.
pub const NODES: [&str; 2] = ["n1", "n2"];

impl Rig {
    /// Two nodes on this machine, one worker each (`opts.workers` and
    /// `opts.private_docker` are overridden): one database, broker and
    /// Redis, one state root (both engines run here), each worker its own
    /// `RTM_NODE` and `DOCKER_HOST`. `docker` is n2's engine; `inspect`
    /// looks on both.
    pub async fn two_nodes(key: &str, opts: RigOptions) -> Result<Self, String> {
        let mut rig = Self::new(
            key,
            RigOptions {
                workers: 2,
                private_docker: true,
                ..opts
            },
        )
        .await?;
        let shared_host = std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty());
        let shared = match &shared_host {
            Some(h) => Docker::connect_with_host(h),
            None => Docker::connect_with_local_defaults(),
        }
        .map_err(|e| format!("docker client: {e}"))?
        .negotiate_version()
        .await
        .map_err(|e| format!("the shared docker is not reachable: {e}"))?;
        rig.workers[0].set_env("RTM_NODE", Some(NODES[0]));
        rig.workers[0].set_env("DOCKER_HOST", shared_host.as_deref());
        rig.workers[1].set_env("RTM_NODE", Some(NODES[1]));
        rig.node_engines = vec![
            (NODES[0].to_owned(), shared),
            (NODES[1].to_owned(), rig.docker.clone()),
        ];
        Ok(rig)
    }

    /// The game's container (under its name) on each node's engine that
    /// has one.
    pub async fn inspect_nodes(&self, game: &str) -> Result<Vec<(String, Observed)>, String> {
        let mut found = Vec::new();
        for (node, docker) in &self.node_engines {
            if let Some(c) = inspect_on(docker, &self.container_name(game)).await? {
                found.push((node.clone(), c));
            }
        }
        Ok(found)
    }

    async fn inspect_on_one_node(&self, game: &str) -> Result<Option<Observed>, String> {
        let mut found = self.inspect_nodes(game).await?;
        match found.len() {
            0 => Ok(None),
            1 => Ok(found.pop().map(|(_, c)| c)),
            _ => Err(format!(
                "{game} has containers on several engines: {:?}",
                found
                    .iter()
                    .map(|(n, c)| format!("{n}: {} running={}", c.id, c.running))
                    .collect::<Vec<_>>()
            )),
        }
    }

    /// Like [`send`](Self::send), for a start that names its `node`.
    pub async fn send_placed(&self, game: &str, image: &'static str, node: &str) -> String {
        let command_id = uuid::Uuid::now_v7().to_string();
        let cmd = Cmd::Start(Cow::Borrowed(image));
        let mut body = Self::command_body(&command_id, game, &cmd);
        body["node"] = json!(node);
        self.ledger.lock().unwrap().push(Sent {
            command_id: command_id.clone(),
            game: game.to_owned(),
            cmd,
            copies: 1,
        });
        if let Err(e) = self.publish_raw("runtime.start", Some(&body)).await {
            panic!("could not publish {command_id}: {e}");
        }
        command_id
    }

    /// A node's own command queue (`<RTM_COMMAND_QUEUE>.node.<node>`).
    pub fn node_queue(&self, node: &str) -> String {
        format!("{}.node.{node}", self.amqp.command_queue)
    }

    /// Ready messages in `queue` (unacked ones are not counted), `None` if
    /// the broker does not say.
    pub async fn ready_in(&self, queue: &str) -> Option<u32> {
        let link = self.publisher.lock().await;
        let (conn, _) = link.as_ref()?;
        // A channel of its own: a failed passive declare closes it.
        let channel = conn.create_channel().await.ok()?;
        let q = tokio::time::timeout(
            Duration::from_secs(5),
            channel.queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await
        .ok()?
        .ok()?;
        let _ = channel.close(200, "probe".into()).await;
        Some(q.message_count())
    }

    /// Holds placement (SPEC §12): takes the advisory lock every
    /// `rtm_route` of a new game's start waits for (migration 0012), on a
    /// connection of its own, until the returned connection is closed or
    /// unlocks it.
    pub async fn hold_placements(&self) -> Result<sqlx::PgConnection, String> {
        let mut conn = sqlx::PgConnection::connect(&self.pg.url("rtmanager"))
            .await
            .map_err(|e| format!("connect to hold placements: {e}"))?;
        conn.execute("select pg_advisory_lock(hashtextextended('rtmanager.placement', 0))")
            .await
            .map_err(|e| format!("take the placement lock: {e}"))?;
        Ok(conn)
    }
}
