//! Docker test helpers: an isolated [`DockerEngine`] per test (its own
//! container prefix and state root) whose containers are force-removed when
//! the test ends, also when it panics.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::query_parameters::{ListContainersOptionsBuilder, RemoveContainerOptionsBuilder};
use rtmanager::config::DockerConfig;
use rtmanager::domain::GameId;
use rtmanager::outbound::docker::DockerEngine;
use rtmanager::ports::{ContainerEngine, ContainerInfo};
use tempfile::TempDir;

use crate::harness::unique;

/// The settings the tests use: the given prefix and state root, the default
/// bridge network, small limits.
pub fn test_docker_config(prefix: &str, state_root: &Path) -> DockerConfig {
    DockerConfig {
        host: std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty()),
        state_root: state_root.to_path_buf(),
        state_mount: "/state".into(),
        container_prefix: prefix.to_owned(),
        network: "bridge".into(),
        nano_cpus: 500_000_000,
        memory_bytes: 128 * 1024 * 1024,
        pids_limit: 64,
        cap_add: Vec::new(),
        engine_user: None,
        log_max_bytes: 1 << 20,
        log_max_files: 2,
    }
}

/// A negotiated bollard client for checks the port does not expose.
pub async fn test_client() -> Docker {
    let docker = match std::env::var("DOCKER_HOST") {
        Ok(host) if !host.is_empty() => Docker::connect_with_host(&host),
        _ => Docker::connect_with_local_defaults(),
    }
    .expect("docker client");
    docker
        .negotiate_version()
        .await
        .expect("docker reachable (negotiate the API version)")
}

/// Force-removes every container whose name starts with `prefix`; returns
/// how many it removed.
pub async fn remove_containers_named(prefix: &str) -> Result<usize, bollard::errors::Error> {
    let docker = test_client().await;
    let filters = HashMap::from([("name", vec![prefix])]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let mut removed = 0;
    for c in docker.list_containers(Some(options)).await? {
        // The name filter matches anywhere in the name: keep true prefixes.
        let ours = c
            .names
            .unwrap_or_default()
            .iter()
            .any(|n| n.trim_start_matches('/').starts_with(prefix));
        if let (true, Some(id)) = (ours, c.id) {
            let options = RemoveContainerOptionsBuilder::default()
                .force(true)
                .v(true)
                .build();
            match docker.remove_container(&id, Some(options)).await {
                Ok(()) => removed += 1,
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404 | 409,
                    ..
                }) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

/// On drop, force-removes the containers named with its prefix, from a
/// helper thread with its own runtime (async drop is not a thing).
pub struct ContainerGuard {
    prefix: String,
}

impl ContainerGuard {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        let prefix = self.prefix.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            if let Err(e) = rt.block_on(remove_containers_named(&prefix)) {
                eprintln!("cleanup of containers {prefix}*: {e}");
            }
        })
        .join();
    }
}

/// One test's Docker world: an engine with its own container prefix
/// (`rtmt-<unique>-`) and state root (a temporary directory).
pub struct DockerTestEnv {
    // Declared first: dropped first, so containers go before their state.
    _guard: ContainerGuard,
    pub engine: DockerEngine,
    pub prefix: String,
    pub state_root: TempDir,
}

impl DockerTestEnv {
    pub async fn new() -> Self {
        Self::with(|_| {}).await
    }

    /// Like `new`, with the settings edited first.
    pub async fn with(edit: impl FnOnce(&mut DockerConfig)) -> Self {
        let prefix = format!("{}-", unique("rtmt"));
        let guard = ContainerGuard::new(&prefix);
        let state_root = TempDir::new().expect("temporary state root");
        let mut cfg = test_docker_config(&prefix, state_root.path());
        edit(&mut cfg);
        let engine = DockerEngine::connect(cfg).await.expect("connect to docker");
        Self {
            _guard: guard,
            engine,
            prefix,
            state_root,
        }
    }

    /// A fresh game id.
    pub fn game(&self) -> GameId {
        GameId::parse(&unique("g")).expect("valid game id")
    }

    pub fn container_name(&self, game: &GameId) -> String {
        format!("{}{}", self.prefix, game.as_str())
    }
}

/// Polls `inspect` until the container exists and `done` holds, or panics
/// after `timeout`.
pub async fn wait_for_container(
    engine: &DockerEngine,
    game: &GameId,
    timeout: Duration,
    what: &str,
    done: impl Fn(&ContainerInfo) -> bool,
) -> ContainerInfo {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        let info = engine.inspect(game).await.expect("inspect");
        if let Some(info) = &info
            && done(info)
        {
            return info.clone();
        }
        if Instant::now() >= deadline {
            panic!("{game}: not {what} after {timeout:?}; last seen {last:?}");
        }
        last = info;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls for a file to contain `needle`, or panics after `timeout`.
pub async fn wait_for_file(path: &Path, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = tokio::fs::read_to_string(path).await.unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        if Instant::now() >= deadline {
            panic!(
                "{} does not contain {needle:?} after {timeout:?}: {text:?}",
                path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An image name of the test's own (`rtmt-<unique>/engine:<tag>`), tagged
/// onto an image that exists, so a test can later point it at another
/// image (what a registry tag moved under a running game looks like). The
/// name is untagged on drop; the images it pointed at stay.
pub struct TestImageTag {
    pub name: String,
}

impl TestImageTag {
    pub async fn new(tag: &str, source: &str) -> Self {
        let this = Self {
            name: format!("{}/engine:{tag}", unique("rtmt")),
        };
        this.point_at(source).await;
        this
    }

    /// Moves the name onto `source`.
    pub async fn point_at(&self, source: &str) {
        let (repo, tag) = self.name.rsplit_once(':').expect("repo:tag");
        let options = bollard::query_parameters::TagImageOptionsBuilder::default()
            .repo(repo)
            .tag(tag)
            .build();
        test_client()
            .await
            .tag_image(source, Some(options))
            .await
            .unwrap_or_else(|e| panic!("tag {source} as {}: {e}", self.name));
    }
}

impl Drop for TestImageTag {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let options = bollard::query_parameters::RemoveImageOptionsBuilder::default()
                    .noprune(true)
                    .build();
                if let Err(e) = test_client()
                    .await
                    .remove_image(&name, Some(options), None)
                    .await
                {
                    eprintln!("untag {name}: {e}");
                }
            });
        })
        .join();
    }
}
