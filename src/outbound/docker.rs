//! The Docker adapter: [`ContainerEngine`] on the Docker Engine API through
//! bollard 0.21 (SPEC §4).
//!
//! - One client for the process; its API version is negotiated at connect
//!   (bollard defaults to 1.53, Debian's engine speaks 1.41).
//! - Containers are found by name, `<RTM_CONTAINER_PREFIX><game_id>`, so a
//!   lost container id is never a problem.
//! - Every call is repeatable (see the port): "already started", "not
//!   running" and "no such container" are successes where the port says so.
//!
//! # Error mapping
//!
//! A response from the daemon with an error status (404, 409, 500 …) means
//! the engine was reachable and *refused* this request: a missing image, a
//! name conflict, a start that failed in the runtime. Asking again gives the
//! same answer, so it is [`EngineError::Rejected`] with the daemon's message,
//! and the caller reports it under the step's own code
//! (`image_pull_failed`, `container_start_failed`, …). Anything where no
//! answer came back — connection refused, a missing socket, an I/O or hyper
//! error, a request timeout, an unreadable response — says nothing about the
//! request itself, only that the engine is not usable right now, so it is
//! [`EngineError::Unavailable`]: retried with backoff and, if it lasts,
//! reported as `service_unavailable`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, HealthStatusEnum, HostConfig,
    HostConfigLogConfig, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, EventsOptions,
    ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    RenameContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use bollard::{API_DEFAULT_VERSION, Docker};
use chrono::{DateTime, Utc};
use futures_util::StreamExt as _;
use futures_util::stream::BoxStream;

use crate::config::{DockerConfig, EngineUser};
use crate::domain::{ContainerId, GameId, ImageRef};
use crate::ports::{
    ContainerEngine, ContainerInfo, EngineAction, EngineError, EngineEvent, Health,
    ManagedContainer,
};

/// The label marking a container as managed by rtmanager (value `true`).
pub const LABEL_MANAGED: &str = "rtmanager.managed";
/// The label naming the game a container runs.
pub const LABEL_GAME_ID: &str = "rtmanager.game_id";

/// The local socket used when `DOCKER_HOST` is not set.
pub const DEFAULT_SOCKET: &str = "unix:///var/run/docker.sock";

/// Timeout of one API request (bollard counts it until the response headers
/// arrive; it has a resolution of whole seconds). Every call but `stop`,
/// `pull`, `start` and `remove` answers well within it; a hung daemon is
/// `Unavailable` after it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of `start` and `remove`: they set up or tear down the
/// container's network, which the daemon does one container at a time, so
/// with dozens in flight (a fleet started or patched at once, up to
/// `RTM_PREFETCH` commands) a healthy engine answers the last of them tens
/// of seconds late. Seen: a start answered after more than 30 s with 50
/// starts in flight on two cores, which a 30 s timeout failed as
/// `service_unavailable` with no retry left within `RTM_RETRY_FOR`.
const NETWORK_CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest a whole pull may take; past it the pull fails
/// (`image_pull_failed`).
const PULL_TIMEOUT: Duration = Duration::from_secs(600);
/// `ping` answers `/readyz`: it must not hang for long.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// `stop` answers only once the container is gone: its timeout is the grace
/// period plus this margin (the SIGKILL and the daemon's own bookkeeping).
const STOP_MARGIN: Duration = Duration::from_secs(30);
/// How long a concurrent removal ("removal … is already in progress") may
/// take before `remove` gives up as `Unavailable`.
const REMOVAL_WAIT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct DockerEngine {
    docker: Docker,
    cfg: Arc<DockerConfig>,
}

impl std::fmt::Debug for DockerEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerEngine")
            .field("api_version", &self.docker.client_version().to_string())
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl DockerEngine {
    /// Connects to `cfg.host` (`unix://…`, `tcp://…`/`http://…`, or a bare
    /// socket path) or, when it is `None`, the local socket, and negotiates
    /// the API version. Fails when the engine cannot be reached.
    pub async fn connect(cfg: DockerConfig) -> anyhow::Result<Self> {
        let host = cfg
            .host
            .clone()
            .unwrap_or_else(|| DEFAULT_SOCKET.to_owned());
        let docker = client_for(&host).with_context(|| format!("docker at {host}"))?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| anyhow::anyhow!(error_chain(&e)))
            .with_context(|| format!("docker at {host}: negotiate the API version"))?;
        Ok(Self::from_client(docker, cfg))
    }

    /// Wraps an already built client, without negotiating or checking it
    /// (tests use it to point at a dead socket).
    pub fn from_client(docker: Docker, mut cfg: DockerConfig) -> Self {
        // A relative bind source would be taken for a named volume by Docker.
        if let Ok(absolute) = std::path::absolute(&cfg.state_root) {
            cfg.state_root = absolute;
        }
        Self {
            docker,
            cfg: Arc::new(cfg),
        }
    }

    /// The underlying client (tests inspect containers with it).
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    pub fn config(&self) -> &DockerConfig {
        &self.cfg
    }

    /// The negotiated API version, e.g. `1.41`.
    pub fn api_version(&self) -> String {
        self.docker.client_version().to_string()
    }

    /// Whether the engine answers (`/_ping`), within a few seconds.
    pub async fn ping(&self) -> Result<(), EngineError> {
        self.docker
            .clone()
            .with_timeout(PING_TIMEOUT)
            .ping()
            .await
            .map(drop)
            .map_err(|e| map_err("ping", e))
    }

    /// `<prefix><game_id>`.
    pub fn container_name(&self, game_id: &GameId) -> String {
        format!("{}{}", self.cfg.container_prefix, game_id.as_str())
    }

    /// `<prefix>_next.<game_id>`: the name a patch creates the game's new
    /// container under while the old one still runs. A game id starts with
    /// a letter or digit, so this is never a game's own name (a suffix
    /// such as `.next` would be: `g-1.next` is a valid game id).
    pub fn next_container_name(&self, game_id: &GameId) -> String {
        format!("{}_next.{}", self.cfg.container_prefix, game_id.as_str())
    }

    /// The container named exactly `name`, if any.
    async fn inspect_named(&self, name: &str) -> Result<Option<ContainerInfo>, EngineError> {
        match self.docker.inspect_container(name, None).await {
            // Docker also resolves a name as an id prefix when no container
            // has that name: only an exact name match is the game's.
            Ok(c) if c.name.as_deref().map(|n| n.trim_start_matches('/')) != Some(name) => Ok(None),
            Ok(c) => self.info_from(c).map(Some),
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(map_err(&format!("inspect container {name}"), e)),
        }
    }

    /// Creates a container of the game named `name` (SPEC §4 shape), its
    /// state directory prepared first.
    async fn create_named(
        &self,
        game_id: &GameId,
        image: &ImageRef,
        name: &str,
    ) -> Result<ContainerId, EngineError> {
        let state_dir = self.state_dir(game_id);
        prepare_state_dir(&state_dir, self.cfg.engine_user)
            .await
            .map_err(|e| {
                // A local file-system refusal (permissions, a file in the
                // way): retrying will not help.
                EngineError::Rejected(format!(
                    "prepare state directory {}: {e}",
                    state_dir.display()
                ))
            })?;
        let state_dir = state_dir.to_str().ok_or_else(|| {
            EngineError::Rejected(format!(
                "state directory {} is not valid UTF-8",
                state_dir.display()
            ))
        })?;
        let body = self.create_body(game_id, image, state_dir);
        let options = CreateContainerOptionsBuilder::default().name(name).build();
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| map_err(&format!("create container {name} from {image}"), e))?;
        Ok(ContainerId(created.id))
    }

    fn create_body(
        &self,
        game_id: &GameId,
        image: &ImageRef,
        state_dir: &str,
    ) -> ContainerCreateBody {
        let cfg = &self.cfg;
        let labels = HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_GAME_ID.to_owned(), game_id.as_str().to_owned()),
        ]);
        ContainerCreateBody {
            image: Some(image.as_str().to_owned()),
            labels: Some(labels),
            user: cfg.engine_user.map(EngineUser::docker_user),
            host_config: Some(HostConfig {
                binds: Some(vec![format!("{state_dir}:{}:rw", cfg.state_mount)]),
                network_mode: Some(cfg.network.clone()),
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::NO),
                    maximum_retry_count: None,
                }),
                init: Some(true),
                nano_cpus: Some(cfg.nano_cpus),
                memory: Some(cfg.memory_bytes),
                // Swap equal to memory means none beyond the limit.
                memory_swap: Some(cfg.memory_bytes),
                log_config: Some(HostConfigLogConfig {
                    typ: Some("json-file".to_owned()),
                    config: Some(HashMap::from([
                        ("max-size".to_owned(), cfg.log_max_bytes.to_string()),
                        ("max-file".to_owned(), cfg.log_max_files.to_string()),
                    ])),
                }),
                pids_limit: Some(cfg.pids_limit),
                cap_drop: Some(vec!["ALL".to_owned()]),
                cap_add: Some(cfg.cap_add.clone()),
                security_opt: Some(vec!["no-new-privileges".to_owned()]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn info_from(&self, c: ContainerInspectResponse) -> Result<ContainerInfo, EngineError> {
        let id = c
            .id
            .filter(|id| !id.is_empty())
            .ok_or_else(|| EngineError::Unavailable("container inspect without an id".into()))?;
        let state = c.state.unwrap_or_default();
        let running = state.running.unwrap_or(false);
        let health = state
            .health
            .and_then(|h| h.status)
            .and_then(|status| match status {
                HealthStatusEnum::STARTING => Some(Health::Starting),
                HealthStatusEnum::HEALTHY => Some(Health::Healthy),
                HealthStatusEnum::UNHEALTHY => Some(Health::Unhealthy),
                HealthStatusEnum::NONE | HealthStatusEnum::EMPTY => None,
            });
        let address = c
            .network_settings
            .and_then(|n| n.networks)
            .and_then(|mut networks| networks.remove(&self.cfg.network))
            .and_then(|endpoint| endpoint.ip_address)
            .filter(|ip| !ip.is_empty());
        Ok(ContainerInfo {
            id: ContainerId(id),
            image_ref: c.config.and_then(|cfg| cfg.image).unwrap_or_default(),
            running,
            // Docker reports 0 for a running (or never started) container:
            // an exit code only means something once it has stopped.
            exit_code: if running { None } else { state.exit_code },
            health,
            address,
            oom_killed: state.oom_killed.unwrap_or(false),
            removing: state.status == Some(bollard::models::ContainerStateStatusEnum::REMOVING),
            finished_at: if running {
                None
            } else {
                state.finished_at.as_deref().and_then(docker_time)
            },
        })
    }

    /// Waits until a container that another request is removing is gone.
    async fn wait_removed(&self, id: &ContainerId) -> Result<(), EngineError> {
        let deadline = Instant::now() + REMOVAL_WAIT;
        loop {
            match self.docker.inspect_container(id.as_str(), None).await {
                Err(e) if status_of(&e) == Some(404) => return Ok(()),
                Err(e) => return Err(map_err(&format!("remove container {id}"), e)),
                Ok(_) if Instant::now() >= deadline => {
                    return Err(EngineError::Unavailable(format!(
                        "remove container {id}: a removal already in progress did not finish within {}s",
                        REMOVAL_WAIT.as_secs()
                    )));
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

impl ContainerEngine for DockerEngine {
    async fn image_present(&self, image: &ImageRef) -> Result<bool, EngineError> {
        match self.docker.inspect_image(image.as_str()).await {
            Ok(_) => Ok(true),
            Err(e) if status_of(&e) == Some(404) => Ok(false),
            Err(e) => Err(map_err(&format!("inspect image {image}"), e)),
        }
    }

    async fn pull(&self, image: &ImageRef) -> Result<(), EngineError> {
        let mut options = CreateImageOptionsBuilder::default().from_image(image.as_str());
        // Without a tag or digest the daemon would pull every tag of the
        // repository (the CLI adds `latest`; the API does not).
        if image.tag().is_none() && !image.as_str().contains('@') {
            options = options.tag("latest");
        }
        let context = format!("pull {image}");
        // The request timeout only bounds the wait for the response headers,
        // which the daemon sends at once; the download itself may take long.
        let mut progress = self.docker.create_image(Some(options.build()), None, None);
        let download = async {
            while let Some(item) = progress.next().await {
                item.map_err(|e| map_err(&context, e))?;
            }
            Ok(())
        };
        // A stalled registry must not hold the game's lease forever.
        tokio::time::timeout(PULL_TIMEOUT, download)
            .await
            .unwrap_or_else(|_| {
                Err(EngineError::Rejected(format!(
                    "{context}: not done within {PULL_TIMEOUT:?}"
                )))
            })
    }

    async fn inspect(&self, game_id: &GameId) -> Result<Option<ContainerInfo>, EngineError> {
        self.inspect_named(&self.container_name(game_id)).await
    }

    async fn create(&self, game_id: &GameId, image: &ImageRef) -> Result<ContainerId, EngineError> {
        self.create_named(game_id, image, &self.container_name(game_id))
            .await
    }

    async fn create_next(
        &self,
        game_id: &GameId,
        image: &ImageRef,
    ) -> Result<ContainerId, EngineError> {
        self.create_named(game_id, image, &self.next_container_name(game_id))
            .await
    }

    async fn inspect_next(&self, game_id: &GameId) -> Result<Option<ContainerInfo>, EngineError> {
        self.inspect_named(&self.next_container_name(game_id)).await
    }

    async fn rename_to_game(&self, id: &ContainerId, game_id: &GameId) -> Result<(), EngineError> {
        let name = self.container_name(game_id);
        let options = RenameContainerOptionsBuilder::new().name(&name).build();
        let context = format!("rename container {id} to {name}");
        match self.docker.rename_container(id.as_str(), options).await {
            Ok(()) => Ok(()),
            // Refused: judge by what Docker reports, since the refusal may
            // answer a retry of a rename that took effect (Docker refuses
            // a container's own name as its new one).
            Err(e @ DockerError::DockerResponseServerError { .. }) => {
                match self.inspect_named(&name).await? {
                    Some(info) if info.id == *id => Ok(()),
                    _ => Err(map_err(&context, e)),
                }
            }
            Err(e) => Err(map_err(&context, e)),
        }
    }

    async fn start(&self, id: &ContainerId) -> Result<(), EngineError> {
        // 304 (already started) is a success in bollard.
        self.docker
            .clone()
            .with_timeout(NETWORK_CALL_TIMEOUT)
            .start_container(id.as_str(), None)
            .await
            .map_err(|e| start_err(&format!("start container {id}"), e))
    }

    async fn stop(&self, id: &ContainerId, grace: Duration) -> Result<(), EngineError> {
        let secs = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
        let t = i32::try_from(secs).unwrap_or(i32::MAX);
        let options = StopContainerOptionsBuilder::default().t(t).build();
        // The daemon answers once the container has stopped, up to `t`
        // seconds later: the request timeout must outlast the grace period.
        let docker = self
            .docker
            .clone()
            .with_timeout(Duration::from_secs(secs) + STOP_MARGIN);
        match docker.stop_container(id.as_str(), Some(options)).await {
            // 304 (not running) is a success in bollard.
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            Err(e) => Err(map_err(&format!("stop container {id}"), e)),
        }
    }

    async fn remove(&self, id: &ContainerId) -> Result<(), EngineError> {
        // `v` removes anonymous volumes an image may declare; bind mounts
        // (the state directory) are never touched.
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match self
            .docker
            .clone()
            .with_timeout(NETWORK_CALL_TIMEOUT)
            .remove_container(id.as_str(), Some(options))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            Err(DockerError::DockerResponseServerError {
                status_code: 409,
                message,
            }) if message.contains("already in progress") => {
                tracing::debug!(container = %id, "{message}: waiting for it to disappear");
                self.wait_removed(id).await
            }
            Err(e) => Err(map_err(&format!("remove container {id}"), e)),
        }
    }

    async fn logs_tail(&self, id: &ContainerId, lines: usize) -> Result<String, EngineError> {
        let options = LogsOptionsBuilder::default()
            .stdout(true)
            .stderr(true)
            .tail(&lines.to_string())
            .build();
        let context = format!("logs of container {id}");
        let read = async {
            let mut out = Vec::new();
            let mut stream = self.docker.logs(id.as_str(), Some(options));
            while let Some(item) = stream.next().await {
                match item {
                    Ok(chunk) => out.extend_from_slice(chunk.as_ref()),
                    Err(e) if status_of(&e) == Some(404) => return Ok(Vec::new()),
                    Err(e) => return Err(map_err(&context, e)),
                }
            }
            Ok(out)
        };
        // The request timeout covers the headers only; bound the body too.
        let out = tokio::time::timeout(REQUEST_TIMEOUT, read)
            .await
            .map_err(|_| EngineError::Unavailable(format!("{context}: timed out")))??;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    fn state_dir(&self, game_id: &GameId) -> PathBuf {
        self.cfg.state_root.join(game_id.as_str())
    }

    async fn managed_containers(&self) -> Result<Vec<ManagedContainer>, EngineError> {
        let filters = HashMap::from([("label", vec![format!("{LABEL_MANAGED}=true")])]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let listed = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| map_err("list managed containers", e))?;
        Ok(listed
            .into_iter()
            .filter_map(|c| {
                let name = c
                    .names
                    .as_ref()
                    .and_then(|n| n.first())
                    .map(|n| n.trim_start_matches('/').to_owned())?;
                Some(ManagedContainer {
                    id: ContainerId(c.id?),
                    name,
                    game_id: c
                        .labels
                        .and_then(|mut l| l.remove(LABEL_GAME_ID))
                        .unwrap_or_default(),
                    running: matches!(
                        c.state,
                        Some(bollard::models::ContainerSummaryStateEnum::RUNNING)
                    ),
                })
            })
            .collect())
    }

    fn events(&self) -> BoxStream<'static, Result<EngineEvent, EngineError>> {
        let filters = HashMap::from([
            ("type".to_owned(), vec!["container".to_owned()]),
            ("label".to_owned(), vec![format!("{LABEL_MANAGED}=true")]),
            (
                "event".to_owned(),
                vec!["die".to_owned(), "oom".to_owned(), "destroy".to_owned()],
            ),
        ]);
        let options = EventsOptions {
            filters: Some(filters),
            ..Default::default()
        };
        self.docker
            .events(Some(options))
            .filter_map(|item| async move {
                match item {
                    Err(e) => Some(Err(map_err("watch engine events", e))),
                    Ok(event) => {
                        let action = match event.action.as_deref()? {
                            "die" => EngineAction::Die,
                            "oom" => EngineAction::Oom,
                            "destroy" => EngineAction::Destroy,
                            _ => return None,
                        };
                        let actor = event.actor?;
                        let mut attributes = actor.attributes.unwrap_or_default();
                        Some(Ok(EngineEvent {
                            game_id: attributes.remove(LABEL_GAME_ID).unwrap_or_default(),
                            container_id: ContainerId(actor.id?),
                            action,
                            name: attributes.remove("name").unwrap_or_default(),
                        }))
                    }
                }
            })
            .boxed()
    }
}

/// A time as Docker's API writes it (RFC 3339); Docker's zero time
/// (`0001-01-01T00:00:00Z`, never started or stopped) is `None`.
fn docker_time(raw: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(raw)
        .ok()
        .map(|t| t.with_timezone(&Utc))
        .filter(|t| t.timestamp() > 0)
}

/// A client for `host`, with the default request timeout and the newest API
/// version bollard knows (lowered by `negotiate_version`).
fn client_for(host: &str) -> anyhow::Result<Docker> {
    let timeout = REQUEST_TIMEOUT.as_secs();
    let docker = if host.starts_with("unix://") || host.starts_with('/') {
        Docker::connect_with_unix(host, timeout, API_DEFAULT_VERSION)?
    } else if host.starts_with("tcp://") || host.starts_with("http://") {
        Docker::connect_with_http(host, timeout, API_DEFAULT_VERSION)?
    } else {
        anyhow::bail!(
            "unsupported DOCKER_HOST scheme (expected unix://, tcp:// or http://; TLS is not built in)"
        );
    };
    Ok(docker)
}

/// The HTTP status of an error the daemon answered with.
fn status_of(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// See the module documentation: the daemon answering with an error is
/// `Rejected`; no usable answer is `Unavailable`.
fn map_err(context: &str, e: DockerError) -> EngineError {
    match e {
        DockerError::DockerResponseServerError {
            status_code,
            message,
        } => EngineError::Rejected(format!("{context}: {message} (HTTP {status_code})")),
        // Errors the daemon reports inside a streamed answer (a pull that
        // fails after it began, a wait that failed).
        DockerError::DockerStreamError { error } => {
            EngineError::Rejected(format!("{context}: {error}"))
        }
        DockerError::DockerContainerWaitError { error, code } => {
            EngineError::Rejected(format!("{context}: {error} (exit code {code})"))
        }
        other => EngineError::Unavailable(format!("{context}: {}", error_chain(&other))),
    }
}

/// A refused start is [`EngineError::StaleTask`] when the runtime kept a
/// task of the container across an engine restart: the daemon says so only
/// in its message ("already exists", "id already in use").
fn start_err(context: &str, e: DockerError) -> EngineError {
    match map_err(context, e) {
        EngineError::Rejected(msg)
            if msg.contains("already exists") || msg.contains("already in use") =>
        {
            EngineError::StaleTask(msg)
        }
        other => other,
    }
}

/// An error with its sources ("client error (Connect): Connection refused"),
/// since hyper's top-level messages alone say little.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            let _ = write!(message, ": {text}");
        }
        source = cause.source();
    }
    message
}

/// Creates a game's state directory (or tightens an existing one) as
/// `0700`, owned by the engine user when one is set: an engine running as
/// root in its container could otherwise leave a setuid file there that any
/// local user of the host could run.
async fn prepare_state_dir(dir: &std::path::Path, user: Option<EngineUser>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    tokio::fs::create_dir_all(dir).await?;
    tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).await?;
    if let Some(user) = user {
        let dir = dir.to_owned();
        tokio::task::spawn_blocking(move || {
            std::os::unix::fs::chown(&dir, Some(user.uid), Some(user.gid))
        })
        .await
        .map_err(std::io::Error::other)??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_answers_are_rejections_and_transport_failures_unavailable() {
        let refused = map_err(
            "create container x",
            DockerError::DockerResponseServerError {
                status_code: 409,
                message: "Conflict. The container name \"/x\" is already in use".into(),
            },
        );
        assert!(matches!(refused, EngineError::Rejected(m) if m.contains("already in use")));
        let timeout = map_err("stop container x", DockerError::RequestTimeoutError);
        assert!(matches!(timeout, EngineError::Unavailable(_)));
        let io = map_err(
            "inspect container x",
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into(),
        );
        assert!(matches!(io, EngineError::Unavailable(_)));
    }

    #[test]
    fn a_start_refused_for_a_kept_task_is_a_stale_task() {
        let stale = start_err(
            "start container x",
            DockerError::DockerResponseServerError {
                status_code: 500,
                message: "failed to create task for container: id already in use".into(),
            },
        );
        assert!(matches!(stale, EngineError::StaleTask(m) if m.contains("already in use")));
        let refused = start_err(
            "start container x",
            DockerError::DockerResponseServerError {
                status_code: 404,
                message: "No such container: x".into(),
            },
        );
        assert!(matches!(refused, EngineError::Rejected(_)));
    }

    #[test]
    fn unsupported_hosts_are_refused() {
        assert!(client_for("ssh://host").is_err());
        assert!(client_for("tcp://127.0.0.1:2375").is_ok());
    }
}
