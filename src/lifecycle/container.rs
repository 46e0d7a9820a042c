//! The Docker steps the ops are made of. Each checks the lease first, is
//! repeatable, and is judged by what Docker reports afterwards, so an
//! interrupted operation can be resumed from any of them.

use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use super::{Halt, Interrupted, Op};
use crate::domain::{ContainerId, ImageRef, OpKind, RuntimeRecord, Stage, Step};
use crate::error::{ErrorCode, Failure};
use crate::ports::{ContainerEngine, ContainerInfo, EngineError, Health, LeaseStore, RuntimeStore};
use crate::telemetry;

/// Logged when Docker refused to start a container for a task it kept from
/// before an engine restart, and the container is made again (the fault
/// suite reads it: that engine may boot twice).
pub const STALE_TASK_RECREATED: &str = "the engine kept a stale task; recreating the container";

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

/// How a restart's or patch's new container was got ready while the old
/// one may still run.
enum Next {
    /// Created under the game's temporary name, not started.
    Staged(ContainerId),
    /// An earlier attempt of this command renamed it to the game's name
    /// already, so the old container is gone.
    Promoted(ContainerId),
    /// Docker refused to create it, for another reason than a leftover in
    /// the way: the start creates the container the usual way, once the old
    /// one is gone.
    Refused(String),
}

/// How often start-up is polled.
const UP_POLL: Duration = Duration::from_millis(100);

fn unavailable(what: &str, e: &str) -> Failure {
    Failure::new(ErrorCode::ServiceUnavailable, format!("docker {what}: {e}"))
}

/// The name a new container is created under.
#[derive(Debug, Clone, Copy)]
enum NewName {
    /// The game's own, `<prefix><game_id>`.
    Game,
    /// The temporary `<prefix>_next.<game_id>` of a restart's or patch's
    /// new container, made before the old one is stopped.
    Next,
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
    pub(super) async fn diagnose(&self, id: &ContainerId, why: &str) -> String {
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

    /// What Docker reports about the game's container under its temporary
    /// name.
    async fn inspect_next(&self) -> Result<Option<ContainerInfo>, Halt> {
        Ok(self
            .docker("inspect", || self.lc.engine.inspect_next(self.game()))
            .await?
            .map_err(|e| unavailable("inspect", &e.to_string()))?)
    }

    /// Stops a container (SIGTERM, SIGKILL after the grace period). A
    /// container that is `kept` (a plain stop) is then checked: Docker must
    /// report it stopped (`container_stop_failed`). Otherwise its forced
    /// removal follows at once, which a container still running cannot
    /// outlive, so asking Docker again would only lengthen the downtime.
    pub(super) async fn stop_container(&self, id: &ContainerId, kept: bool) -> Result<(), Halt> {
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
        if !kept {
            return Ok(());
        }
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

    /// Removes a container that is not the game's (a next container left
    /// behind, or one that could not be renamed); not journaled, since
    /// `remove` names the old container's removal.
    async fn drop_container(&self, id: &ContainerId) -> Result<(), Halt> {
        self.check_lease()?;
        self.docker("remove", || self.lc.engine.remove(id))
            .await?
            .map_err(|e| unavailable("remove", &e.to_string()))?;
        Ok(())
    }

    /// Removes the game's container under its temporary name, if any.
    pub(super) async fn drop_leftover_next(&self) -> Result<(), Halt> {
        let next = self.inspect_next().await?;
        if let Some(next) = next {
            warn!(container_id = %next.id, "removing a new container of the game an earlier patch or restart left behind");
            self.drop_container(&next.id).await?;
        }
        Ok(())
    }

    /// The first half of restart and patch, arranged so that the game is
    /// down only for stop + remove + rename + start, never a create: the
    /// new container from `image` is created under the game's temporary
    /// name while the old one still runs (journaled `start.staged`), then
    /// the inner stop, the old container's removal, and the rename to the
    /// game's name (journaled `start.create`, as a container created under
    /// it). Returns the container that now holds the game's name, ready to
    /// start; `None` when Docker refused the early create or the rename,
    /// so the inner start creates the container the usual way. A failure
    /// on the way removes the new container again.
    pub(super) async fn replace_with_next(
        &self,
        outer: OpKind,
        record: &RuntimeRecord,
        image: &ImageRef,
    ) -> Result<Option<ContainerId>, Halt> {
        let staged = match self.stage_next(image).await? {
            Next::Staged(id) => id,
            Next::Promoted(id) => {
                self.journal(&Step::Create {
                    stage: Stage::Start,
                    container_id: id.clone(),
                })
                .await?;
                return Ok(Some(id));
            }
            Next::Refused(msg) => {
                warn!(error = %msg, "could not create the new container before stopping the old one; creating it once the old one is gone");
                self.stop_and_remove(outer, record).await?;
                return Ok(None);
            }
        };
        let promoted = async {
            self.stop_and_remove(outer, record).await?;
            self.promote(&staged).await
        }
        .await;
        match promoted {
            Ok(true) => Ok(Some(staged)),
            Ok(false) => Ok(None),
            Err(Halt::Fail(failure)) => {
                // Best effort: a Docker that failed the step may fail this
                // too, and then the next patch replaces the leftover.
                if self.check_lease().is_ok()
                    && let Err(e) = self.lc.engine.remove(&staged).await
                {
                    warn!(container_id = %staged, error = %e, "could not remove the new container");
                }
                Err(failure.into())
            }
            Err(interrupted) => Err(interrupted),
        }
    }

    /// Creates the new container under the game's temporary name. The one
    /// an earlier attempt of this command journaled is reused while Docker
    /// still has it as it was made (never started, from `image`); any other
    /// container in the way under that name (a create whose answer or
    /// journal write was lost) is replaced once.
    async fn stage_next(&self, image: &ImageRef) -> Result<Next, Halt> {
        if let Some(journaled) = self.progress.staged(Stage::Start) {
            let made_here =
                |info: &ContainerInfo| info.id == *journaled && info.image_ref == image.as_str();
            let next = self
                .docker("inspect", || self.lc.engine.inspect_next(self.game()))
                .await?
                .map_err(|e| unavailable("inspect", &e.to_string()))?;
            if let Some(info) = next.filter(|info| made_here(info) && !info.running) {
                return Ok(Next::Staged(info.id));
            }
            // Gone from the temporary name: renamed already, if the game's
            // name holds it now.
            if let Some(info) = self.inspect().await?.filter(made_here) {
                return Ok(Next::Promoted(info.id));
            }
        }
        match self.create_as(NewName::Next, image).await? {
            Ok(id) => {
                self.journal(&Step::Staged {
                    stage: Stage::Start,
                    container_id: id.clone(),
                })
                .await?;
                Ok(Next::Staged(id))
            }
            Err(refused) => Ok(Next::Refused(refused)),
        }
    }

    /// Renames the staged container to the game's name, which the old one
    /// left, and journals it as the start's container. `false` when Docker
    /// refused: the staged container is removed, and the start creates one
    /// the usual way.
    async fn promote(&self, id: &ContainerId) -> Result<bool, Halt> {
        self.check_lease()?;
        match self
            .docker("rename", || self.lc.engine.rename_to_game(id, self.game()))
            .await?
        {
            Ok(()) => {}
            Err(EngineError::Unavailable(msg)) => return Err(unavailable("rename", &msg).into()),
            Err(EngineError::Rejected(msg) | EngineError::StaleTask(msg)) => {
                warn!(container_id = %id, error = %msg, "could not rename the new container to the game's name; creating it afresh");
                self.drop_container(id).await?;
                return Ok(false);
            }
        }
        self.journal(&Step::Create {
            stage: Stage::Start,
            container_id: id.clone(),
        })
        .await?;
        Ok(true)
    }

    /// Replaces any leftover container of the game: stop, then remove.
    pub(super) async fn clear_leftover(&self) -> Result<(), Halt> {
        if let Some(leftover) = self.inspect().await? {
            if leftover.running {
                self.stop_container(&leftover.id, false).await?;
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
                    warn!(container_id = %id, error = %msg, "{STALE_TASK_RECREATED}");
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

    /// Starts `id`, a container that already holds the game's name (a
    /// restart's or patch's new one, renamed), and waits until it is up; as
    /// [`Self::launch`] otherwise, which it falls back to when the engine
    /// refuses to start it for a stale task.
    pub(super) async fn launch_prepared(
        &self,
        id: &ContainerId,
        image: &ImageRef,
        stage: Stage,
    ) -> Result<ContainerInfo, Halt> {
        match self.bring_up(id, image, stage, false).await {
            Ok(info) => Ok(info),
            Err(BringUp::Stale(msg)) => {
                warn!(container_id = %id, error = %msg, "{STALE_TASK_RECREATED}");
                self.discard(id).await?;
                self.launch(image, stage).await
            }
            Err(BringUp::Halt(halt)) => Err(halt),
        }
    }

    /// Creates a container of the game under `name`. Repeatable: a
    /// refused create may be the retry of one whose answer was lost after
    /// the engine made the container ("name already in use"), so whatever
    /// container Docker then has under that name, made under this lease, is
    /// replaced once: stopped and discarded under the game's name, dropped
    /// under the temporary one (never started). `Ok(Err(why))` when Docker
    /// refuses with nothing in the way, or again after the replacement.
    async fn create_as(
        &self,
        name: NewName,
        image: &ImageRef,
    ) -> Result<Result<ContainerId, String>, Halt> {
        let mut replaced = false;
        loop {
            self.check_lease()?;
            let engine = &self.lc.engine;
            let created = match name {
                NewName::Game => {
                    self.docker("create", || engine.create(self.game(), image))
                        .await?
                }
                NewName::Next => {
                    self.docker("create", || engine.create_next(self.game(), image))
                        .await?
                }
            };
            let msg = match created {
                Ok(id) => return Ok(Ok(id)),
                Err(EngineError::Unavailable(msg)) => {
                    return Err(unavailable("create", &msg).into());
                }
                Err(EngineError::Rejected(msg) | EngineError::StaleTask(msg)) => msg,
            };
            let in_the_way = match (replaced, name) {
                (true, _) => None,
                (false, NewName::Game) => self.inspect().await?,
                (false, NewName::Next) => self.inspect_next().await?,
            };
            let Some(leftover) = in_the_way else {
                return Ok(Err(format!("create container from {image}: {msg}")));
            };
            warn!(container_id = %leftover.id, error = %msg, ?name, "create refused with a container in the way (an earlier create whose answer was lost?); replacing it");
            match name {
                NewName::Game => {
                    if leftover.running {
                        self.stop_container(&leftover.id, false).await?;
                    }
                    self.discard(&leftover.id).await?;
                }
                NewName::Next => self.drop_container(&leftover.id).await?,
            }
            replaced = true;
        }
    }

    /// Creates the game's container under its own name ([`Self::create_as`])
    /// and journals it; a refusal fails the start `container_start_failed`.
    async fn create(&self, image: &ImageRef, stage: Stage) -> Result<ContainerId, Halt> {
        let id = match self.create_as(NewName::Game, image).await? {
            Ok(id) => id,
            Err(refused) => {
                return Err(Failure::new(ErrorCode::ContainerStartFailed, refused).into());
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
