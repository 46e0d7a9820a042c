//! `stop`: the outer handle and the inner run that restart, patch and
//! remove reuse. A stop keeps the container; a stop of a container Docker
//! reports as not running is a no-op (and corrects the record).

use super::{Halt, Interrupted, Op};
use crate::domain::{
    ContainerId, EntryResult, OpKind, RuntimeRecord, RuntimeState, Step, StopReason,
};
use crate::error::Failure;
use crate::ports::{ContainerEngine, LeaseStore, Recorded, RuntimeStore};

/// An inner stop's entry and how it ended.
pub(super) struct StopRun {
    pub recorded: Recorded,
    pub result: Result<(), Failure>,
    /// The container it found (stopped now, or not running before).
    pub container: Option<ContainerId>,
}

/// How the inner stop of an outer op went.
pub(super) enum InnerStop {
    /// An earlier attempt of the command recorded it.
    Recorded,
    /// This attempt ran it; the container it found, now stopped.
    Ran(Option<ContainerId>),
}

impl<S, L, E> Op<'_, S, L, E>
where
    S: RuntimeStore,
    L: LeaseStore,
    E: ContainerEngine,
{
    pub(super) async fn stop(&self, reason: StopReason) -> Result<Recorded, Interrupted> {
        let record = match self.load_existing().await {
            Ok(record) => record,
            Err(failure) => {
                let mut entry = self.outer_entry();
                entry.reason = Some(reason.to_string());
                return self.finish(entry, Err(failure.into()), None).await;
            }
        };
        Ok(self.run_stop(reason, None, &record, true).await?.recorded)
    }

    /// The inner stop. Writes its own entry; the caller owns the lease. A
    /// container that is not `kept` is removed by the caller right after.
    pub(super) async fn run_stop(
        &self,
        reason: StopReason,
        outer: Option<OpKind>,
        record: &RuntimeRecord,
        kept: bool,
    ) -> Result<StopRun, Interrupted> {
        let mut entry = self.entry(OpKind::Stop, outer);
        entry.reason = Some(reason.to_string());
        entry.image_ref = Some(record.image_ref.to_string());

        let halted: Result<(Option<ContainerId>, bool), Halt> = async {
            match self.inspect().await? {
                Some(info) if info.running => {
                    // Journaled before the stop: if this worker dies during
                    // the grace period, Docker still finishes the stop and
                    // the redelivery must not call it a no-op.
                    let stop = Step::Stop {
                        container_id: info.id.clone(),
                    };
                    self.journal(&stop).await?;
                    self.stop_container(&info.id, kept).await?;
                    Ok((Some(info.id), false))
                }
                // Not a no-op if an earlier attempt of this command did work.
                Some(info) => Ok((Some(info.id), self.progress.is_empty())),
                None => Ok((None, self.progress.is_empty())),
            }
        }
        .await;

        let result = match &halted {
            Err(Halt::Fail(failure)) => Err(failure.clone()),
            _ => Ok(()),
        };
        let container = halted.as_ref().ok().and_then(|(id, _)| id.clone());
        let update = halted.map(|(container_id, noop)| {
            entry.container_id = container_id.as_ref().map(ToString::to_string);
            entry.result = EntryResult::Success { noop };
            // A removed game stays removed; otherwise the record now says
            // what Docker says.
            match record.state {
                RuntimeState::Removed => None,
                _ => Some(record.update(RuntimeState::Stopped { container_id })),
            }
        });
        let recorded = self.finish(entry, update, None).await?;
        Ok(StopRun {
            recorded,
            result,
            container,
        })
    }

    /// Inner stop (reason `admin_request`), then removal of the container if
    /// there is one: the first half of restart and patch. An inner failure's
    /// code becomes the outer failure's code. The container the inner stop
    /// found is the one removed; only a resumed attempt, whose earlier one
    /// recorded the stop, asks Docker again.
    pub(super) async fn stop_and_remove(
        &self,
        outer: OpKind,
        record: &RuntimeRecord,
    ) -> Result<(), Halt> {
        let old = match self.inner_stop(outer, record, false).await? {
            InnerStop::Ran(container) => container,
            InnerStop::Recorded => match self.inspect().await? {
                Some(info) if info.running => {
                    // Resumed after a recorded stop, yet running: stop it
                    // again (gracefully: the forced removal would kill it).
                    self.stop_container(&info.id, false).await?;
                    Some(info.id)
                }
                info => info.map(|info| info.id),
            },
        };
        if let Some(id) = old {
            self.discard(&id).await?;
        }
        Ok(())
    }

    /// The inner stop (reason `admin_request`) of `outer`, unless an earlier
    /// attempt of this command already recorded it. Its failure becomes the
    /// outer failure, with its code. A container that is not `kept` is
    /// removed by the caller right after.
    pub(super) async fn inner_stop(
        &self,
        outer: OpKind,
        record: &RuntimeRecord,
        kept: bool,
    ) -> Result<InnerStop, Halt> {
        let recorded = self
            .progress
            .entry(OpKind::Stop, Some(outer), false)
            .is_some_and(|e| e.result.error_code().is_none());
        if recorded {
            return Ok(InnerStop::Recorded);
        }
        let stop = self
            .run_stop(StopReason::AdminRequest, Some(outer), record, kept)
            .await?;
        if let Err(f) = stop.result {
            return Err(Failure::new(f.code, format!("inner stop failed: {}", f.message)).into());
        }
        Ok(InnerStop::Ran(stop.container))
    }
}
