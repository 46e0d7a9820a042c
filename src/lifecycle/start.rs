//! `start`: the outer handle's state rules (SPEC §2) and the inner run that
//! restart, patch and a rollback reuse under their own lease.

use super::{Halt, Interrupted, Op};
use crate::domain::{
    ContainerId, EntryResult, ImageRef, OpKind, RecordUpdate, RuntimeRecord, RuntimeState, Stage,
};
use crate::error::{ErrorCode, Failure};
use crate::ports::{ContainerEngine, ContainerInfo, LeaseStore, Recorded, RuntimeStore};

/// What an inner start is asked to do.
pub(super) struct StartPlan<'a> {
    pub image: &'a ImageRef,
    /// The op this start is a step of; `None` for a plain start.
    pub outer: Option<OpKind>,
    pub previous_image: Option<&'a ImageRef>,
    /// This start restores the previous image after a failed patch.
    pub rolled_back: bool,
    /// The start its journal steps belong to.
    pub stage: Stage,
    /// The record as a failed start leaves it; `None` leaves no record (a
    /// first start that failed: nothing runs, nothing to track).
    pub on_failure: Option<RecordUpdate>,
    /// A container from `image` that already holds the game's name, not
    /// started (a restart's or patch's new one, created before the old one
    /// stopped): started as it is, without a create.
    pub prepared: Option<ContainerId>,
}

/// An inner start's entry and how it ended.
pub(super) struct StartRun {
    pub recorded: Recorded,
    pub result: Result<ContainerInfo, Failure>,
}

impl<S, L, E> Op<'_, S, L, E>
where
    S: RuntimeStore,
    L: LeaseStore,
    E: ContainerEngine,
{
    pub(super) async fn start(&self, image: &ImageRef) -> Result<Recorded, Interrupted> {
        let mut entry = self.outer_entry();
        entry.image_ref = Some(image.to_string());

        let record = match self.load_record().await {
            Ok(record) => record,
            Err(failure) => return self.finish(entry, Err(failure.into()), None).await,
        };

        if let Some(record) = &record {
            entry.previous_image_ref = Some(record.image_ref.to_string());
            match self.start_rule(record, image).await {
                Ok(StartRule::Go) => {}
                Ok(StartRule::Noop(info)) => {
                    // Running as asked; a no-op unless an earlier attempt of
                    // this command is what started it.
                    entry.result = EntryResult::Success {
                        noop: self.progress.is_empty(),
                    };
                    entry.previous_image_ref = None;
                    entry.container_id = Some(info.id.to_string());
                    entry.address = info.address.clone();
                    let update = record.update_to(
                        image.clone(),
                        RuntimeState::Running {
                            container_id: info.id,
                            address: info.address,
                        },
                    );
                    return self.finish(entry, Ok(Some(update)), None).await;
                }
                Err(halt) => return self.finish(entry, Err(halt), None).await,
            }
        }

        let on_failure = record.as_ref().map(|r| {
            r.update(match r.state {
                RuntimeState::Removed => RuntimeState::Removed,
                _ => RuntimeState::Stopped { container_id: None },
            })
        });
        let run = self
            .run_start(StartPlan {
                image,
                outer: None,
                previous_image: record.as_ref().map(|r| &r.image_ref),
                rolled_back: false,
                stage: Stage::Start,
                on_failure,
                prepared: None,
            })
            .await?;
        Ok(run.recorded)
    }

    /// SPEC §2 for a start on a known game, decided from what Docker reports.
    async fn start_rule(
        &self,
        record: &RuntimeRecord,
        image: &ImageRef,
    ) -> Result<StartRule, Halt> {
        let current = &record.image_ref;
        let same_image = current.as_str() == image.as_str();
        match &record.state {
            RuntimeState::Removed => Ok(StartRule::Go),
            // `exited` behaves like `stopped` (SPEC §2).
            RuntimeState::Stopped { .. } | RuntimeState::Exited { .. } if same_image => {
                Ok(StartRule::Go)
            }
            RuntimeState::Stopped { .. } | RuntimeState::Exited { .. } => Err(Failure::new(
                ErrorCode::Conflict,
                format!(
                    "game {} is {} with image {current}; start it with that image, or patch it to {image}",
                    self.game(),
                    record.status()
                ),
            )
            .into()),
            RuntimeState::Running { .. } if same_image => {
                match self.inspect().await? {
                    Some(info) if info.running && info.image_ref == image.as_str() => {
                        Ok(StartRule::Noop(info))
                    }
                    // The record says running but Docker disagrees: start afresh.
                    _ => Ok(StartRule::Go),
                }
            }
            RuntimeState::Running { .. } => Err(Failure::new(
                ErrorCode::Conflict,
                format!(
                    "game {} is running image {current}; use patch to change its image",
                    self.game()
                ),
            )
            .into()),
        }
    }

    /// The inner start of an outer op (restart, patch), unless an earlier
    /// attempt of the command recorded it: its failure stands, and so does
    /// its success while Docker still runs the container it recorded.
    pub(super) async fn inner_start(
        &self,
        plan: StartPlan<'_>,
    ) -> Result<Result<ContainerInfo, Failure>, Interrupted> {
        if let Some(done) = self
            .progress
            .entry(OpKind::Start, plan.outer, plan.rolled_back)
        {
            match &done.result {
                EntryResult::Failure(failure) => return Ok(Err(failure.clone())),
                EntryResult::Success { .. } => {
                    let running = self.inspect().await.ok().flatten().filter(|info| {
                        info.running
                            && Some(&info.id) == done.container_id.as_ref()
                            && info.image_ref == plan.image.as_str()
                    });
                    // Docker no longer runs what was recorded: start again.
                    if let Some(info) = running {
                        return Ok(Ok(info));
                    }
                }
            }
        }
        Ok(self.run_start(plan).await?.result)
    }

    /// The inner start: image present (pulled if missing), any leftover
    /// container replaced, a fresh container created and started and up.
    /// Writes its own entry; the caller owns the lease.
    pub(super) async fn run_start(&self, plan: StartPlan<'_>) -> Result<StartRun, Interrupted> {
        let mut entry = self.entry(OpKind::Start, plan.outer);
        entry.image_ref = Some(plan.image.to_string());
        entry.previous_image_ref = plan.previous_image.map(ToString::to_string);
        entry.rolled_back = plan.rolled_back;

        let launched = async {
            if let Some(id) = &plan.prepared {
                return self.launch_prepared(id, plan.image, plan.stage).await;
            }
            if let Some(info) = self.resume_launch(plan.image, plan.stage).await? {
                return Ok(info);
            }
            self.ensure_image(plan.image).await?;
            self.clear_leftover().await?;
            self.launch(plan.image, plan.stage).await
        }
        .await;

        let (result, update) = match launched {
            Ok(info) => {
                entry.container_id = Some(info.id.to_string());
                entry.address = info.address.clone();
                // A first start has no record to derive from: the engine
                // names the state directory.
                let update = RecordUpdate {
                    game_id: self.game().clone(),
                    image_ref: plan.image.clone(),
                    state: RuntimeState::Running {
                        container_id: info.id.clone(),
                        address: info.address.clone(),
                    },
                    state_dir: self.lc.engine.state_dir(self.game()),
                };
                (Ok(info), Ok(Some(update)))
            }
            Err(Halt::Fail(failure)) => (Err(failure.clone()), Err(failure.into())),
            Err(Halt::Interrupt(i)) => return Err(i),
        };
        let recorded = self.finish(entry, update, plan.on_failure).await?;
        Ok(StartRun { recorded, result })
    }
}

enum StartRule {
    Go,
    /// Already running the requested image, as Docker confirms.
    Noop(ContainerInfo),
}
