//! The floors rtmanager is measured against, from the same run: the raw
//! Docker API sequence (bollard, the container shape of
//! `src/outbound/docker.rs`), the docker CLI with the same flags, Docker's
//! own event stream (for downtime), and the database's own floor for the
//! durable writes of one rejected command.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, HostConfig, HostConfigLogConfig, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, EventsOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use futures_util::StreamExt as _;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::Notify;

use crate::rig::{LABEL_GAME_ID, LABEL_MANAGED, prepare_state_dir};

/// The container shape, as the worker is configured (`Rig::worker_env`
/// passes these values): the defaults of SPEC §9.
pub struct Shape {
    pub network: &'static str,
    pub state_mount: &'static str,
    pub nano_cpus: i64,
    pub memory_bytes: i64,
    pub pids_limit: i64,
    pub log_max_bytes: u64,
    pub log_max_files: &'static str,
    /// `RTM_STOP_TIMEOUT` in seconds: the grace period of every stop.
    pub stop_timeout: i32,
}

pub const SHAPE: Shape = Shape {
    network: "bridge",
    state_mount: "/state",
    nano_cpus: 1_000_000_000,
    memory_bytes: 1 << 30,
    pids_limit: 512,
    log_max_bytes: 10 << 20,
    log_max_files: "3",
    stop_timeout: 10,
};

/// What `DockerEngine::create_body` asks Docker for: labels, the state
/// directory bound read-write, the network, restart `no`, init, limits,
/// no swap, rotated json-file logs, every capability dropped,
/// no-new-privileges.
fn create_body(game_id: &str, image: &str, state_dir: &Path) -> ContainerCreateBody {
    let s = &SHAPE;
    ContainerCreateBody {
        image: Some(image.to_owned()),
        labels: Some(HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_GAME_ID.to_owned(), game_id.to_owned()),
        ])),
        host_config: Some(HostConfig {
            binds: Some(vec![format!(
                "{}:{}:rw",
                state_dir.display(),
                s.state_mount
            )]),
            network_mode: Some(s.network.to_owned()),
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            init: Some(true),
            nano_cpus: Some(s.nano_cpus),
            memory: Some(s.memory_bytes),
            memory_swap: Some(s.memory_bytes),
            log_config: Some(HostConfigLogConfig {
                typ: Some("json-file".to_owned()),
                config: Some(HashMap::from([
                    ("max-size".to_owned(), s.log_max_bytes.to_string()),
                    ("max-file".to_owned(), s.log_max_files.to_owned()),
                ])),
            }),
            pids_limit: Some(s.pids_limit),
            cap_drop: Some(vec!["ALL".to_owned()]),
            cap_add: Some(Vec::new()),
            security_opt: Some(vec!["no-new-privileges".to_owned()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A floor game: its container name, game id (label) and state directory.
#[derive(Debug, Clone)]
pub struct FloorGame {
    pub name: String,
    pub game_id: String,
    pub state_dir: std::path::PathBuf,
}

/// `create` + `start`, as a fresh game would be.
pub async fn api_create_start(
    docker: &Docker,
    g: &FloorGame,
    image: &str,
) -> anyhow::Result<String> {
    prepare_state_dir(&g.state_dir)?;
    let options = CreateContainerOptionsBuilder::default()
        .name(&g.name)
        .build();
    let id = docker
        .create_container(Some(options), create_body(&g.game_id, image, &g.state_dir))
        .await
        .with_context(|| format!("create {}", g.name))?
        .id;
    docker
        .start_container(&id, None)
        .await
        .with_context(|| format!("start {}", g.name))?;
    Ok(id)
}

/// The raw four calls of a patch: stop, remove, create, start. Returns
/// the new container's id.
pub async fn api_replace(docker: &Docker, g: &FloorGame, image: &str) -> anyhow::Result<String> {
    Ok(api_replace_timed(docker, g, image).await?.0)
}

/// How long each of the four calls took, in the order they ran.
pub type CallTimes = [(&'static str, Duration); 4];

/// [`api_replace`], timing each call: where a patch's time goes.
pub async fn api_replace_timed(
    docker: &Docker,
    g: &FloorGame,
    image: &str,
) -> anyhow::Result<(String, CallTimes)> {
    let stop = StopContainerOptionsBuilder::default()
        .t(SHAPE.stop_timeout)
        .build();
    let t = Instant::now();
    docker
        .stop_container(&g.name, Some(stop))
        .await
        .with_context(|| format!("stop {}", g.name))?;
    let stopped = t.elapsed();
    let remove = RemoveContainerOptionsBuilder::default()
        .force(true)
        .v(true)
        .build();
    let t = Instant::now();
    docker
        .remove_container(&g.name, Some(remove))
        .await
        .with_context(|| format!("remove {}", g.name))?;
    let removed = t.elapsed();
    prepare_state_dir(&g.state_dir)?;
    let options = CreateContainerOptionsBuilder::default()
        .name(&g.name)
        .build();
    let t = Instant::now();
    let id = docker
        .create_container(Some(options), create_body(&g.game_id, image, &g.state_dir))
        .await
        .with_context(|| format!("create {}", g.name))?
        .id;
    let created = t.elapsed();
    let t = Instant::now();
    docker
        .start_container(&id, None)
        .await
        .with_context(|| format!("start {}", g.name))?;
    let started = t.elapsed();
    Ok((
        id,
        [
            ("stop", stopped),
            ("remove", removed),
            ("create", created),
            ("start", started),
        ],
    ))
}

/// The docker CLI binary (Debian's client matches the engine's API).
pub fn docker_cli() -> String {
    std::env::var("DOCKER").unwrap_or_else(|_| {
        if Path::new("/usr/bin/docker").exists() {
            "/usr/bin/docker".into()
        } else {
            "docker".into()
        }
    })
}

/// `docker run -d` with the flags that give the same shape as the API body.
pub async fn cli_run(g: &FloorGame, image: &str) -> anyhow::Result<String> {
    prepare_state_dir(&g.state_dir)?;
    let s = &SHAPE;
    let out = tokio::process::Command::new(docker_cli())
        .args(["run", "-d", "--name", &g.name])
        .args(["--label", &format!("{LABEL_MANAGED}=true")])
        .args(["--label", &format!("{LABEL_GAME_ID}={}", g.game_id)])
        .args([
            "-v",
            &format!("{}:{}:rw", g.state_dir.display(), s.state_mount),
        ])
        .args(["--network", s.network, "--restart", "no", "--init"])
        .args(["--cpus", &format!("{}", s.nano_cpus as f64 / 1e9)])
        .args(["--memory", &s.memory_bytes.to_string()])
        .args(["--memory-swap", &s.memory_bytes.to_string()])
        .args(["--pids-limit", &s.pids_limit.to_string()])
        .args(["--log-driver", "json-file"])
        .args(["--log-opt", &format!("max-size={}", s.log_max_bytes)])
        .args(["--log-opt", &format!("max-file={}", s.log_max_files)])
        .args(["--cap-drop", "ALL", "--security-opt", "no-new-privileges"])
        .arg(image)
        .output()
        .await
        .context("run the docker CLI")?;
    if !out.status.success() {
        bail!(
            "docker run {}: {}",
            g.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

async fn cli(args: &[&str]) -> anyhow::Result<()> {
    let out = tokio::process::Command::new(docker_cli())
        .args(args)
        .output()
        .await
        .context("run the docker CLI")?;
    if !out.status.success() {
        bail!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `docker stop; docker rm; docker run -d …`: the new container's id.
pub async fn cli_replace(g: &FloorGame, image: &str) -> anyhow::Result<String> {
    cli(&["stop", "-t", &SHAPE.stop_timeout.to_string(), &g.name]).await?;
    cli(&["rm", &g.name]).await?;
    cli_run(g, image).await
}

/// Docker's container events (kill, die, start) of the bench's
/// containers, as the daemon timestamps them.
pub struct DockerEvents {
    seen: Mutex<Vec<DockerEvent>>,
    arrived: Notify,
}

#[derive(Debug, Clone)]
struct DockerEvent {
    id: String,
    action: String,
    time_nano: i64,
}

impl DockerEvents {
    /// Subscribes now; events of containers whose game label starts with
    /// `game_prefix` are kept.
    pub async fn watch(docker: Docker, game_prefix: String) -> anyhow::Result<Arc<Self>> {
        let this = Arc::new(Self {
            seen: Mutex::new(Vec::new()),
            arrived: Notify::new(),
        });
        let filters = HashMap::from([
            ("type", vec!["container"]),
            ("event", vec!["kill", "die", "start"]),
            ("label", vec!["rtmanager.managed=true"]),
        ]);
        let options = EventsOptionsBuilder::default().filters(&filters).build();
        let mut stream = Box::pin(docker.events(Some(options)));
        let (subscribed, ready) = tokio::sync::oneshot::channel();
        let me = this.clone();
        tokio::spawn(async move {
            // The daemon sends the response headers at once; a cheap way to
            // know the subscription is live is the first poll returning
            // Pending, so signal after the stream was first polled.
            let mut subscribed = Some(subscribed);
            loop {
                let next = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
                if let Some(tx) = subscribed.take() {
                    let _ = tx.send(());
                }
                let item = match next {
                    Err(_) => continue,
                    Ok(None) => {
                        crate::say("docker events: the stream ended");
                        return;
                    }
                    Ok(Some(Err(e))) => {
                        crate::say(&format!("docker events: {e}"));
                        return;
                    }
                    Ok(Some(Ok(item))) => item,
                };
                let Some(actor) = item.actor else { continue };
                let ours = actor
                    .attributes
                    .as_ref()
                    .and_then(|a| a.get(LABEL_GAME_ID))
                    .is_some_and(|g| g.starts_with(&game_prefix));
                if !ours {
                    continue;
                }
                let (Some(id), Some(action), Some(time_nano)) =
                    (actor.id, item.action, item.time_nano)
                else {
                    continue;
                };
                me.seen.lock().unwrap().push(DockerEvent {
                    id,
                    action,
                    time_nano,
                });
                me.arrived.notify_waiters();
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(5), ready).await;
        Ok(this)
    }

    /// The game's downtime in one replacement, by Docker's clock: from the
    /// old container's first `kill` or `die` to the new one's `start`.
    /// Waits (up to `within`) for both to arrive.
    pub async fn downtime(&self, old_id: &str, new_id: &str, within: Duration) -> Option<Duration> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.arrived.notified();
            {
                let seen = self.seen.lock().unwrap();
                let down = seen
                    .iter()
                    .filter(|e| e.id == old_id && (e.action == "kill" || e.action == "die"))
                    .map(|e| e.time_nano)
                    .min();
                let up = seen
                    .iter()
                    .filter(|e| e.id == new_id && e.action == "start")
                    .map(|e| e.time_nano)
                    .max();
                if let (Some(down), Some(up)) = (down, up) {
                    return u64::try_from(up - down).ok().map(Duration::from_nanos);
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

/// The database's own floor for what one rejected patch must make
/// durable, run straight at PostgreSQL with sqlx: the inbox claim, the
/// fence advance, and the log entry with its outbox row and the inbox
/// outcome as one statement (three commits, as `src/outbound/postgres`
/// writes them, on the schema of `migrations/`).
pub struct DbFloor {
    pool: PgPool,
}

/// Connections the floor's pool may open: as many as the pgbench
/// reference used.
pub const FLOOR_POOL: u32 = 16;

impl DbFloor {
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(FLOOR_POOL)
            .test_before_acquire(false)
            .connect(url)
            .await
            .context("connect to the floor database")?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .context("migrate the floor database")?;
        Ok(Self { pool })
    }

    /// `total` rejected commands over `games`, one task per game (a game's
    /// commands run one after another, as the worker's lanes run them):
    /// commands per second.
    pub async fn run(&self, games: &[String], total: usize) -> anyhow::Result<f64> {
        let next = Arc::new(AtomicUsize::new(0));
        let t0 = Instant::now();
        let tasks: Vec<_> = games
            .iter()
            .map(|game| {
                let pool = self.pool.clone();
                let next = next.clone();
                let game = game.clone();
                tokio::spawn(async move {
                    while next.fetch_add(1, Ordering::Relaxed) < total {
                        rejected_command(&pool, &game).await?;
                    }
                    Ok::<_, anyhow::Error>(())
                })
            })
            .collect();
        for t in tasks {
            t.await.context("a floor task panicked")??;
        }
        Ok(total as f64 / t0.elapsed().as_secs_f64())
    }

    pub async fn close(self) {
        self.pool.close().await;
    }
}

async fn rejected_command(pool: &PgPool, game: &str) -> anyhow::Result<()> {
    let command_id = uuid::Uuid::new_v4().to_string();
    let event_id = uuid::Uuid::new_v4();
    let new_image = crate::REJECTED_IMAGE;
    let current = "rtm-test/engine:1.4.2";
    let fingerprint = serde_json::json!(["patch", game, new_image, null]).to_string();
    // 1. The inbox claim.
    sqlx::query(
        "insert into inbox (command_id, game_id, op, reply_to, reply_correlation_id, fingerprint)
         values ($1, $2, 'patch', null, null, $3)
         on conflict (command_id) do nothing",
    )
    .bind(&command_id)
    .bind(game)
    .bind(&fingerprint)
    .execute(pool)
    .await
    .context("floor: inbox claim")?;
    // 2. The fence advance.
    let fence: i64 = sqlx::query_scalar(
        "insert into game_fences (game_id, fence, command_id) values ($1, 1, $2)
         on conflict (game_id) do update
             set fence = game_fences.fence + 1, command_id = excluded.command_id
         returning fence",
    )
    .bind(game)
    .bind(&command_id)
    .fetch_one(pool)
    .await
    .context("floor: fence advance")?;
    // 3. The fenced log entry, its outbox event and the inbox outcome.
    let now = chrono::Utc::now();
    let message = format!(
        "patch must keep major.minor; current={} new={}",
        "1.4.2", "1.5.0"
    );
    let payload = serde_json::json!({
        "event_id": event_id, "schema_version": 1, "occurred_at": now,
        "operation_id": null, "command_id": command_id, "correlation_id": command_id,
        "game_id": game, "op": "patch", "outer_op": null, "op_source": "lobby",
        "reason": null, "outcome": "failure", "error_code": "semver_patch_only",
        "error_message": message, "image_ref": new_image, "previous_image_ref": current,
        "container_id": null, "address": null, "noop": false, "rolled_back": false,
        "started_at": now, "finished_at": now,
    });
    let done = sqlx::query(
        "with f as (select fence from game_fences where game_id = $1 for share),
         l as (
             insert into operation_log (game_id, op, outer_op, op_source, reason, correlation_id,
                 command_id, image_ref, previous_image_ref, container_id, address, outcome,
                 error_code, error_message, noop, rolled_back, started_at, finished_at, fence)
             select $1, 'patch', null, 'lobby', null, $2, $2, $3, $4, null, null, 'failure',
                 'semver_patch_only', $5, false, false, $6, $6, f.fence
             from f where f.fence = $7
             returning operation_id),
         o as (
             insert into outbox (event_id, operation_id, game_id, routing_key, correlation_id,
                                 payload)
             select $8, l.operation_id, $1, 'runtime.patch.failure', $2,
                    jsonb_set($9::jsonb, '{operation_id}', to_jsonb(l.operation_id))
             from l
             returning event_id)
         update inbox set finished_at = now(), outcome_event_id = o.event_id
         from o
         where inbox.command_id = $2 and inbox.outcome_event_id is null",
    )
    .bind(game)
    .bind(&command_id)
    .bind(new_image)
    .bind(current)
    .bind(&message)
    .bind(now)
    .bind(fence)
    .bind(event_id)
    .bind(sqlx::types::Json(&payload))
    .execute(pool)
    .await
    .context("floor: log entry + outbox + inbox outcome")?;
    if done.rows_affected() != 1 {
        bail!("floor: the fenced append wrote nothing (fence {fence} of {game} moved?)");
    }
    Ok(())
}
