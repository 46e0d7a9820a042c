//! `exit`: the reconciler's record of an engine that stopped without a
//! command (SPEC §11). Not a command anyone sends: the reconciler calls
//! [`Lifecycle::report_exit`] for a game whose `running` record Docker
//! contradicts, and it goes through the same gate as any command — the
//! game's lease, then the fence — so a command in progress always wins.
//!
//! Under the lease the record and Docker are read again: an exit the
//! manager caused (a stop, restart, patch, remove or rollback) has changed
//! the record, or the container it names, by then, and nothing is written.
//! Otherwise one `exit` entry (`engine_exited`) moves the record to
//! `exited`. The exit's command_id is derived from the game and the
//! container that was running, so every worker that sees the same exit
//! names it alike: one takes the lease, the others wait it out and find the
//! entry in the inbox (or the record no longer `running`).

use std::ops::ControlFlow;

use chrono::{DateTime, Utc};
use tracing::{info, warn};
use uuid::Uuid;

use super::gate::Gate;
use super::{Halt, Interrupted, Lifecycle, Op, record_metrics};
use crate::config::RestartPolicy;
use crate::domain::{
    Action, Command, CommandRequest, ContainerId, GameId, OpKind, OpSource, OutcomeEvent,
    RuntimeRecord, RuntimeState, RuntimeStatus,
};
use crate::error::{ErrorCode, Failure};
use crate::ports::{ContainerEngine, ContainerInfo, LeaseHolder, LeaseStore, RuntimeStore};
use crate::telemetry;

/// The namespace of exits' command ids (v5 of the game and the container).
const EXITS: Uuid = Uuid::from_u128(0x6c1f_0a3e_52d4_4b7a_9e2f_1d8c_40b6_a7e3);
/// The namespace of the reconciler's restarts' command ids (v5 of the
/// exit's command id), so a restart asked twice runs once.
const AUTO_RESTARTS: Uuid = Uuid::from_u128(0x0e47_b2d9_8a61_4f3c_b5d0_62c7_19fa_8e24);

/// What the reconciler's look at a game found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReport {
    /// Nothing to report: the record is not `running`, or Docker runs the
    /// container it names (perhaps after a command changed them meanwhile).
    NotExited,
    /// A command holds the game's lease: it wins; looked at again soon.
    Busy,
    /// A command took the game last and has not finished (its worker died
    /// part-way): what Docker shows is its doing, and its redelivery
    /// resumes it and sets the record. Not an exit; the next pass looks
    /// again.
    CommandUnfinished,
    /// This exit was reported already (by this worker or another).
    AlreadyReported,
    /// The game is `exited`, and its exit entry asked for a restart that
    /// never finished (its worker died first): the restart to run again
    /// (the same command, so the inbox makes it effect-once).
    PendingRestart(Box<CommandRequest>),
    /// The exit entry was written now.
    Reported {
        operation_id: i64,
        /// The restart to run, when `RTM_RESTART_ON_EXIT` has budget left.
        restart: Option<Box<CommandRequest>>,
    },
}

/// How the engine of a `running` record stopped, as Docker reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stopped {
    /// The container exists and is not running.
    Exited {
        id: ContainerId,
        exit_code: Option<i64>,
        oom_killed: bool,
        finished_at: Option<DateTime<Utc>>,
    },
    /// Docker has no container under the game's name (or another one than
    /// the record names: the recorded one is gone).
    Missing { other: Option<ContainerId> },
}

impl Stopped {
    /// The metric's `reason`.
    fn reason(&self) -> &'static str {
        match self {
            Stopped::Exited {
                oom_killed: true, ..
            } => "oom",
            Stopped::Exited { .. } => "exited",
            Stopped::Missing { .. } => "missing",
        }
    }
}

/// Whether `record` is `running` on a container Docker no longer runs, and
/// how it stopped; `None` when there is nothing to report.
fn judge(record: Option<&RuntimeRecord>, docker: Option<&ContainerInfo>) -> Option<Stopped> {
    let RuntimeState::Running { container_id, .. } = &record?.state else {
        return None;
    };
    match docker {
        // `docker rm -f` kills first (the die event) and removes after.
        Some(info) if info.id == *container_id && info.removing => {
            Some(Stopped::Missing { other: None })
        }
        Some(info) if info.id == *container_id && info.running => None,
        Some(info) if info.id == *container_id => Some(Stopped::Exited {
            id: info.id.clone(),
            exit_code: info.exit_code,
            oom_killed: info.oom_killed,
            finished_at: info.finished_at,
        }),
        Some(info) => Some(Stopped::Missing {
            other: Some(info.id.clone()),
        }),
        None => Some(Stopped::Missing { other: None }),
    }
}

/// The command_id naming the exit of `container` of `game`: the same for
/// every worker that sees it (a container is `running` in a record for one
/// life only: every start creates a fresh one).
/// It starts with [`EXIT_PREFIX`], so a command finding the game's lease
/// held by an exit's look knows to wait it out rather than answer
/// `conflict`.
pub fn exit_command_id(game: &GameId, container: &ContainerId) -> String {
    let id = Uuid::new_v5(&EXITS, format!("{game}\n{container}").as_bytes());
    format!("{EXIT_PREFIX}{id}")
}

/// The start of every exit's command_id.
pub const EXIT_PREFIX: &str = "exit-";

impl<S, L, E> Lifecycle<S, L, E>
where
    S: RuntimeStore,
    L: LeaseStore,
    E: ContainerEngine,
{
    /// Looks at a game the reconciler suspects: when its record says
    /// `running` and Docker disagrees, writes its `exit` entry under the
    /// game's lease and fence (record `exited`), deciding with `policy`
    /// whether a restart follows (the returned request, for
    /// [`Lifecycle::handle`]). Errors: a dependency still failing after
    /// `RTM_RETRY_FOR` (`Unrecorded`, `Blocked`), or a lease lost meanwhile;
    /// the next pass looks again.
    pub async fn report_exit(
        &self,
        game_id: &GameId,
        policy: RestartPolicy,
    ) -> Result<ExitReport, Interrupted> {
        // A first look without the lease: most games the passes ask about
        // run, and a look costs no lease.
        let (record, docker) = self.look(game_id).await?;
        if judge(record.as_ref(), docker.as_ref()).is_none() {
            if record.is_some_and(|r| r.status() == RuntimeStatus::Exited)
                && let Some(exit) = self
                    .store_retrying(|| self.store.last_exit(game_id))
                    .await?
                && let Some(restart) = pending_restart(&exit)
            {
                return Ok(ExitReport::PendingRestart(Box::new(restart)));
            }
            return Ok(ExitReport::NotExited);
        }
        let record = record.expect("judged on a record");
        let container = record
            .state
            .container_id()
            .cloned()
            .expect("a running record names its container");
        let command_id = exit_command_id(game_id, &container);
        let request = CommandRequest {
            command_id: command_id.clone(),
            op: OpKind::Exit,
            game_id: Some(game_id.to_string()),
            image_ref: Some(record.image_ref.to_string()),
            op_source: Some(OpSource::Reconciler.to_string()),
            source_ref: None,
            reason: None,
            requested_at: Some(Utc::now()),
            reply_to: None,
            malformed: None,
            node: None,
            refusal: None,
        };
        let command = Command {
            command_id: command_id.clone(),
            game_id: game_id.clone(),
            op_source: OpSource::Reconciler,
            correlation_id: command_id.clone(),
            action: Action::Exit,
        };
        if let crate::ports::InboxClaim::Finished(_) =
            self.store_retrying(|| self.store.lookup(&request)).await?
        {
            return Ok(ExitReport::AlreadyReported);
        }

        let holder = LeaseHolder::new(&command_id);
        let lease = match self.acquire_lease(&request, &command, &holder).await {
            Ok(Gate::Held(lease)) => lease,
            Ok(Gate::Answered(_)) => return Ok(ExitReport::AlreadyReported),
            Err(Halt::Interrupt(i)) => return Err(i),
            Err(Halt::Fail(f)) if f.code == ErrorCode::Conflict => return Ok(ExitReport::Busy),
            Err(Halt::Fail(f)) => return Err(Interrupted::Blocked(f.to_string())),
        };
        let reported = self
            .report_leased(&request, &command, &container, policy, &lease)
            .await;
        lease.release().await;
        reported
    }

    /// The record and what Docker reports for the game.
    async fn look(
        &self,
        game_id: &GameId,
    ) -> Result<(Option<RuntimeRecord>, Option<ContainerInfo>), Interrupted> {
        let record = self.store_retrying(|| self.store.load(game_id)).await?;
        if !matches!(
            record.as_ref().map(|r| &r.state),
            Some(RuntimeState::Running { .. })
        ) {
            return Ok((record, None));
        }
        let docker = self
            .retrying(
                || self.engine.inspect(game_id),
                |e| matches!(e, crate::ports::EngineError::Unavailable(_)),
            )
            .await
            .map_err(|e| Interrupted::Blocked(format!("inspect the container: {e}")))?;
        Ok((record, docker))
    }

    async fn report_leased(
        &self,
        request: &CommandRequest,
        command: &Command,
        container: &ContainerId,
        policy: RestartPolicy,
        lease: &super::lease::LeaseGuard<L>,
    ) -> Result<ExitReport, Interrupted> {
        let game_id = &command.game_id;
        let seen = self
            .store_retrying(|| self.store.observe_fence(game_id))
            .await?;
        if let Some(owner) = seen.taken_by.filter(|c| *c != command.command_id) {
            let progress = self.store_retrying(|| self.store.progress(&owner)).await?;
            if !progress.entries.iter().any(|e| e.outer_op.is_none()) {
                return Ok(ExitReport::CommandUnfinished);
            }
        }
        // Again under the lease: a command that ran meanwhile changed the
        // record or its container, and the exit was its own.
        let (record, docker) = self.look(game_id).await?;
        let Some(stopped) = judge(record.as_ref(), docker.as_ref()) else {
            return Ok(ExitReport::NotExited);
        };
        let record = record.expect("judged on a record");
        if record.state.container_id() != Some(container) {
            return Ok(ExitReport::NotExited);
        }
        let since = Utc::now() - chrono::Duration::from_std(policy.window).unwrap_or_default();
        let spent = if policy.max == 0 {
            0
        } else {
            self.store_retrying(|| self.store.auto_restarts_since(game_id, since))
                .await?
        };
        let restart = policy.max > 0 && spent < policy.max;

        let begun = match self.take_fence(request, command).await? {
            ControlFlow::Continue(begun) => begun,
            ControlFlow::Break(_) => return Ok(ExitReport::AlreadyReported),
        };
        let op = Op {
            lc: self,
            cmd: command,
            fence: begun.fence,
            lease,
            started_at: Utc::now(),
            progress: begun.progress,
            record: begun.record,
        };
        let message = op
            .exit_message(container, &stopped, policy, spent, restart)
            .await;
        let mut entry = op.outer_entry();
        entry.image_ref = Some(record.image_ref.to_string());
        entry.container_id = Some(container.to_string());
        let still_there = match &stopped {
            Stopped::Exited { id, .. } => Some(id.clone()),
            Stopped::Missing { .. } => None,
        };
        let update = record.update(RuntimeState::Exited {
            container_id: still_there,
        });
        let failure = Failure::new(ErrorCode::EngineExited, message);
        let recorded = op.finish(entry, Err(failure.into()), Some(update)).await?;
        record_metrics(&recorded.event);
        metrics::counter!(telemetry::ENGINE_EXITS, "reason" => stopped.reason()).increment(1);
        warn!(
            game_id = %game_id,
            operation_id = recorded.operation_id,
            error_message = recorded.event.error_message.as_deref().unwrap_or(""),
            "engine exited without a command"
        );
        let restart = restart.then(|| {
            info!(game_id = %game_id, "restarting the game after its exit (RTM_RESTART_ON_EXIT)");
            Box::new(auto_restart(
                &command.command_id,
                recorded.operation_id,
                game_id.as_str(),
            ))
        });
        Ok(ExitReport::Reported {
            operation_id: recorded.operation_id,
            restart,
        })
    }
}

impl<S, L, E> Op<'_, S, L, E>
where
    S: RuntimeStore,
    L: LeaseStore,
    E: ContainerEngine,
{
    /// The exit entry's message: how and when the engine stopped, what
    /// happens next, and the log tail when the container is still there.
    async fn exit_message(
        &self,
        container: &ContainerId,
        stopped: &Stopped,
        policy: RestartPolicy,
        spent: u32,
        restart: bool,
    ) -> String {
        let next = if restart {
            format!(
                "{RESTARTING}{} of {} within {})",
                spent + 1,
                policy.max,
                policy_window(policy)
            )
        } else if policy.max == 0 {
            "not restarted (RTM_RESTART_ON_EXIT=0); the game stays exited".to_owned()
        } else {
            format!(
                "not restarted: the restart budget RTM_RESTART_ON_EXIT={policy} is spent \
                 ({spent} automatic restarts within {}); the game stays exited",
                policy_window(policy)
            )
        };
        match stopped {
            Stopped::Exited {
                id,
                exit_code,
                oom_killed,
                finished_at,
            } => {
                let code = exit_code.map_or_else(|| "unknown".to_owned(), |c| c.to_string());
                let when = finished_at.map_or_else(
                    || "an unknown time".to_owned(),
                    |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                );
                let why = format!(
                    "engine exited without a command: exit code {code}, OOM killed: {}, \
                     stopped at {when}; {next}",
                    if *oom_killed { "yes" } else { "no" }
                );
                self.diagnose(id, &why).await
            }
            Stopped::Missing { other } => {
                let mut why =
                    format!("container {container} is gone (removed behind the manager's back");
                if let Some(other) = other {
                    why.push_str(&format!(
                        "; Docker has another container {other} under the game's name"
                    ));
                }
                why.push_str(&format!(
                    "), noticed at {}; {next}",
                    Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                ));
                why
            }
        }
    }
}

/// The reconciler's restart after the exit `exit_command_id` (entry
/// `operation_id`): its command_id derived from the exit's, its correlation
/// id the exit entry's operation id.
fn auto_restart(exit_command_id: &str, operation_id: i64, game_id: &str) -> CommandRequest {
    CommandRequest {
        command_id: Uuid::new_v5(&AUTO_RESTARTS, exit_command_id.as_bytes()).to_string(),
        op: OpKind::Restart,
        game_id: Some(game_id.to_owned()),
        image_ref: None,
        op_source: Some(OpSource::Reconciler.to_string()),
        source_ref: Some(operation_id.to_string()),
        reason: None,
        requested_at: Some(Utc::now()),
        reply_to: None,
        malformed: None,
        node: None,
        refusal: None,
    }
}

/// What an exit entry's message says when a restart follows.
const RESTARTING: &str = "restarting (automatic restart ";

/// The restart an exit entry asked for, if it did.
fn pending_restart(exit: &OutcomeEvent) -> Option<CommandRequest> {
    let asked = exit
        .error_message
        .as_deref()
        .is_some_and(|m| m.lines().next().unwrap_or_default().contains(RESTARTING));
    Some(auto_restart(
        &exit.command_id,
        exit.operation_id?,
        &exit.game_id,
    ))
    .filter(|_| asked)
}

fn policy_window(policy: RestartPolicy) -> String {
    policy
        .to_string()
        .split_once('/')
        .map_or_else(String::new, |(_, w)| w.to_owned())
}
