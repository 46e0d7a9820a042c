//! The Docker steps the ops are made of. Each checks the lease first, is
//! repeatable, and is judged by what Docker reports afterwards, so an
//! interrupted operation can be resumed from any of them.

use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use super::{Halt, Interrupted, Op};
use crate::domain::{ContainerId, ImageRef, Stage, Step};
use crate::error::{ErrorCode, Failure};
use crate::ports::{ContainerEngine, ContainerInfo, EngineError, Health, LeaseStore, RuntimeStore};
use crate::telemetry;

/// How many log lines a start failure carries in its message.
const LOG_TAIL_LINES: usize = 20;
/// The most of a log tail a failure message carries: it travels in the
/// operation log, the outbox and the event.
const LOG_TAIL_BYTES: usize = 4096;
/// How `bring_up` ends early.
pub(super) enum BringUp {
    Halt(Halt),
    /// The engine refuses to start a container whose task survived an
    /// engine restart: recreate it.
    Stale(String),
}

impl From<Halt> for BringUp {
    fn from(h: Halt) -> Self {
        BringUp::Halt(h)
    }
}

impl From<Interrupted> for BringUp {
    fn from(i: Interrupted) -> Self {
        BringUp::Halt(i.into())
    }
}

/// How often start-up is polled.
const UP_POLL: Duration = Duration::from_millis(100);

fn unavailable(what: &str, e: &str) -> Failure {
    Failure::new(ErrorCode::ServiceUnavailable, format!("docker {what}: {e}"))
}

impl<S, L, E> Op<'_, S, L, E>
where
    S: RuntimeStore,
    L: LeaseStore,
    E: ContainerEngine,
{
    /// An engine call, retried while Docker is unreachable (for
    /// `RTM_RETRY_FOR`) and the lease is still held; a refusal is returned
    /// at once. `Err` (outer) when the lease went during the retries: a
    /// retry is a Docker step like any other, never taken without it.
    async fn docker<T, F, Fut>(
        &self,
        name: &'static str,
        call: F,
    ) -> Result<Result<T, EngineError>, Interrupted>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, EngineError>>,
    {
        let since = Instant::now();
        let result = self
            .lc
            .retrying(call, |e| {
                matches!(e, EngineError::Unavailable(_)) && self.check_lease().is_ok()
            })
            .await;
        metrics::histogram!(telemetry::DOCKER_CALL_SECONDS, "call" => name)
            .record(since.elapsed().as_secs_f64());
        if result.is_err() {
            self.check_lease()?;
        }
        Ok(result)
    }

    /// The failure message with the exit code (when it exited) and the tail
    /// of the container's log.
    async fn diagnose(&self, id: &ContainerId, why: &str) -> String {
        let mut message = why.to_owned();
        match self.lc.engine.logs_tail(id, LOG_TAIL_LINES).await {
            Ok(tail) if !tail.trim().is_empty() => {
                message.push_str("; log tail:\n");
                message.push_str(&printable_tail(tail.trim_end()));
            }
            Ok(_) => message.push_str("; the container logged nothing"),
            Err(e) => message.push_str(&format!("; log tail unavailable: {e}")),
        }
        message
    }

    /// The image is present, pulling it if missing (`image_pull_failed`).
    pub(super) async fn ensure_image(&self, image: &ImageRef) -> Result<(), Halt> {
        self.check_lease()?;
        let present = self
            .docker("image_present", || self.lc.engine.image_present(image))
            .await?
            .map_err(|e| unavailable("image inspect", &e.to_string()))?;
        if present {
            return Ok(());
        }
        self.check_lease()?;
        self.docker("pull", || self.lc.engine.pull(image))
            .await?
            .map_err(|e| match e {
                EngineError::Rejected(msg) | EngineError::StaleTask(msg) => Failure::new(
                    ErrorCode::ImagePullFailed,
                    format!("image {image} is missing and could not be pulled: {msg}"),
                ),
                EngineError::Unavailable(msg) => unavailable("pull", &msg),
            })?;
        self.journal(&Step::Pull {
            image: image.clone(),
        })
        .await?;
        Ok(())
    }

    /// What Docker reports about the game's container.
    pub(super) async fn inspect(&self) -> Result<Option<ContainerInfo>, Halt> {
        Ok(self
            .docker("inspect", || self.lc.engine.inspect(self.game()))
            .await?
            .map_err(|e| unavailable("inspect", &e.to_string()))?)
    }

    /// Stops a container (SIGTERM, SIGKILL after the grace period) and
    /// checks that Docker reports it stopped (`container_stop_failed`).
    pub(super) async fn stop_container(&self, id: &ContainerId) -> Result<(), Halt> {
        self.check_lease()?;
        let grace = self.lc.cfg.stop_timeout;
        self.docker("stop", || self.lc.engine.stop(id, grace))
            .await?
            .map_err(|e| match e {
                EngineError::Rejected(msg) | EngineError::StaleTask(msg) => Failure::new(
                    ErrorCode::ContainerStopFailed,
                    format!("docker could not stop container {id}: {msg}"),
                ),
                EngineError::Unavailable(msg) => unavailable("stop", &msg),
            })?;
        match self.inspect().await? {
            Some(info) if info.running && info.id == *id => Err(Failure::new(
                ErrorCode::ContainerStopFailed,
                format!("container {id} is still running after stop"),
            )
            .into()),
            _ => Ok(()),
        }
    }

    /// Removes a container; the state directory is kept
    /// (`service_unavailable` on a Docker error, as the original).
    pub(super) async fn discard(&self, id: &ContainerId) -> Result<(), Halt> {
        self.check_lease()?;
        self.docker("remove", || self.lc.engine.remove(id))
            .await?
            .map_err(|e| unavailable("remove", &e.to_string()))?;
        self.journal(&Step::Remove {
            container_id: id.clone(),
        })
        .await?;
        Ok(())
    }

    /// Replaces any leftover container of the game: stop, then remove.
    pub(super) async fn clear_leftover(&self) -> Result<(), Halt> {
        if let Some(leftover) = self.inspect().await? {
            if leftover.running {
                self.stop_container(&leftover.id).await?;
            }
            self.discard(&leftover.id).await?;
        }
        Ok(())
    }

    /// Creates and starts the game's container and waits until it is up
    /// (SPEC §4). On failure the container's exit code and log tail go in
    /// the `container_start_failed` message and the container is removed.
    /// `stage` is the start the journal steps belong to.
    pub(super) async fn launch(
        &self,
        image: &ImageRef,
        stage: Stage,
    ) -> Result<ContainerInfo, Halt> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let id = self.create(image, stage).await?;
            match self.bring_up(&id, image, stage, false).await {
                // A start cut short by an engine restart leaves a task
                // behind that the engine refuses to start again ("already
                // exists", "id already in use"): replace the container once.
                Err(BringUp::Stale(msg)) if attempt == 1 => {
                    warn!(container_id = %id, error = %msg, "the engine kept a stale task; recreating the container");
                    self.discard(&id).await?;
                }
                Err(BringUp::Stale(msg)) => {
                    let failure = Failure::new(
                        ErrorCode::ContainerStartFailed,
                        format!("start container: {msg}"),
                    );
                    return Err(self.failed_start(&id, failure).await);
                }
                Err(BringUp::Halt(halt)) => return Err(halt),
                Ok(info) => return Ok(info),
            }
        }
    }

    /// Creates the game's container. Repeatable: a refused create may be
    /// the retry of one whose answer was lost after the engine made the
    /// container ("name already in use"). Whatever container of the game
    /// Docker then has, made under this lease, is replaced once, rather
    /// than failing the start and leaving it behind.
    async fn create(&self, image: &ImageRef, stage: Stage) -> Result<ContainerId, Halt> {
        let mut replaced = false;
        let id = loop {
            self.check_lease()?;
            let created = self
                .docker("create", || self.lc.engine.create(self.game(), image))
                .await?;
            match created {
                Ok(id) => break id,
                Err(EngineError::Unavailable(msg)) => {
                    return Err(unavailable("create", &msg).into());
                }
                Err(EngineError::Rejected(msg) | EngineError::StaleTask(msg)) => {
                    let in_the_way = if replaced {
                        None
                    } else {
                        self.inspect().await?
                    };
                    let Some(leftover) = in_the_way else {
                        return Err(Failure::new(
                            ErrorCode::ContainerStartFailed,
                            format!("create container from {image}: {msg}"),
                        )
                        .into());
                    };
                    warn!(container_id = %leftover.id, error = %msg, "create refused with a container of the game in the way (an earlier create's answer was lost?); replacing it");
                    if leftover.running {
                        self.stop_container(&leftover.id).await?;
                    }
                    self.discard(&leftover.id).await?;
                    replaced = true;
                }
            }
        };
        self.journal(&Step::Create {
            stage,
            container_id: id.clone(),
        })
        .await?;
        Ok(id)
    }

    /// Starts a created container (unless `running` already) and waits
    /// until it is up; journals both.
    async fn bring_up(
        &self,
        id: &ContainerId,
        image: &ImageRef,
        stage: Stage,
        running: bool,
    ) -> Result<ContainerInfo, BringUp> {
        if !running {
            self.check_lease().map_err(Halt::from)?;
            match self.docker("start", || self.lc.engine.start(id)).await? {
                Ok(()) => {}
                Err(EngineError::Unavailable(msg)) => {
                    return Err(Halt::from(unavailable("start", &msg)).into());
                }
                Err(refused @ (EngineError::Rejected(_) | EngineError::StaleTask(_))) => {
                    // The refused start may be a retry of one that took
                    // effect before the engine went away: judge by Docker.
                    let now = self.inspect().await?;
                    if !now.is_some_and(|info| info.id == *id && info.running) {
                        let msg = match refused {
                            EngineError::StaleTask(msg) => return Err(BringUp::Stale(msg)),
                            other => other.to_string(),
                        };
                        let failure = Failure::new(
                            ErrorCode::ContainerStartFailed,
                            format!("start container: {msg}"),
                        );
                        return Err(self.failed_start(id, failure).await.into());
                    }
                }
            }
            self.journal(&Step::Start {
                stage,
                container_id: id.clone(),
            })
            .await
            .map_err(Halt::from)?;
        }
        let info = match self.wait_up(id).await {
            Ok(info) => info,
            Err(Halt::Fail(failure)) if failure.code == ErrorCode::ContainerStartFailed => {
                return Err(self.failed_start(id, failure).await.into());
            }
            Err(other) => return Err(other.into()),
        };
        let up = Step::Up {
            stage,
            container_id: info.id.clone(),
            address: info.address.clone(),
            image: image.clone(),
        };
        self.journal(&up).await.map_err(Halt::from)?;
        Ok(info)
    }

    /// A failed start: the diagnosis (exit code, log tail) in the message,
    /// and the container removed.
    async fn failed_start(&self, id: &ContainerId, failure: Failure) -> Halt {
        // No Docker step without the lease, not even this clean-up.
        if let Err(lost) = self.check_lease() {
            return lost.into();
        }
        let message = self.diagnose(id, &failure.message).await;
        if let Err(e) = self.lc.engine.remove(id).await {
            warn!(container_id = %id, error = %e, "could not remove the failed container");
        }
        Failure::new(ErrorCode::ContainerStartFailed, message).into()
    }

    /// Resuming a start an earlier attempt left at `stage`: the container it
    /// journaled, if Docker still has it with the right image, is brought up
    /// (started only if it is not running yet) instead of being replaced —
    /// so an engine that was already booting is not booted twice.
    pub(super) async fn resume_launch(
        &self,
        image: &ImageRef,
        stage: Stage,
    ) -> Result<Option<ContainerInfo>, Halt> {
        let Some(journaled) = self.progress.container(stage) else {
            return Ok(None);
        };
        let Some(info) = self
            .inspect()
            .await?
            .filter(|info| info.id == *journaled && info.image_ref == image.as_str())
        else {
            return Ok(None);
        };
        match self.bring_up(&info.id, image, stage, info.running).await {
            Ok(info) => Ok(Some(info)),
            // Could not resume it: start afresh.
            Err(BringUp::Stale(_)) => Ok(None),
            Err(BringUp::Halt(halt)) => Err(halt),
        }
    }

    /// Up means up: healthy within `RTM_HEALTH_TIMEOUT` when the image has a
    /// HEALTHCHECK, else still running after `RTM_START_SETTLE`.
    async fn wait_up(&self, id: &ContainerId) -> Result<ContainerInfo, Halt> {
        let since = Instant::now();
        let failed = |why: String| Halt::Fail(Failure::new(ErrorCode::ContainerStartFailed, why));
        loop {
            self.check_lease()?;
            let info = match self.inspect().await? {
                Some(info) if info.id == *id => info,
                _ => {
                    return Err(failed(format!(
                        "container {id} disappeared during start-up"
                    )));
                }
            };
            if !info.running {
                return Err(failed(match info.exit_code {
                    Some(code) => format!("container exited with code {code} during start-up"),
                    None => "container is not running after start".to_owned(),
                }));
            }
            let waited = since.elapsed();
            match info.health {
                Some(Health::Healthy) => return Ok(info),
                Some(Health::Unhealthy) => {
                    return Err(failed("container reported unhealthy".to_owned()));
                }
                Some(Health::Starting) if waited >= self.lc.cfg.health_timeout => {
                    return Err(failed(format!(
                        "container did not become healthy within {:?}",
                        self.lc.cfg.health_timeout
                    )));
                }
                None if waited >= self.lc.cfg.start_settle => return Ok(info),
                Some(Health::Starting) | None => tokio::time::sleep(UP_POLL).await,
            }
        }
    }
}

/// The end of a log tail, at most `LOG_TAIL_BYTES`, cut on a character
/// boundary, with control characters (NUL above all, which PostgreSQL text
/// refuses) replaced; line breaks and tabs are kept.
fn printable_tail(tail: &str) -> String {
    let mut start = tail.len().saturating_sub(LOG_TAIL_BYTES);
    while !tail.is_char_boundary(start) {
        start += 1;
    }
    let cut = if start > 0 { "…" } else { "" };
    let kept: String = tail[start..]
        .chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                '\u{FFFD}'
            } else {
                c
            }
        })
        .collect();
    format!("{cut}{kept}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tails_are_bounded_and_storable() {
        assert_eq!(
            printable_tail("fatal\0error\n\tat x"),
            "fatal\u{FFFD}error\n\tat x"
        );
        let long = "é".repeat(LOG_TAIL_BYTES);
        let tail = printable_tail(&long);
        assert!(tail.len() <= LOG_TAIL_BYTES + "…".len());
        assert!(tail.starts_with('…'));
    }
}
