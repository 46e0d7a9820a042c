//! Writing what an op did: its entries (each with its event and record
//! update, under the op's fence), its journaled Docker steps, and the reads
//! of the game's record the ops start from.

use chrono::Utc;
use uuid::Uuid;

use super::{Halt, Interrupted, Lifecycle, Op};
use crate::domain::{
    EntryResult, ImageRef, OperationEntry, RecordUpdate, RuntimeRecord, RuntimeState, Step,
};
use crate::error::{ErrorCode, Failure};
use crate::ports::{
    Answers, ContainerEngine, LeaseStore, OperationWrite, Recorded, RuntimeStore, StoreError,
    WriteFence,
};

impl<S, L, E> Lifecycle<S, L, E>
where
    S: RuntimeStore,
    L: LeaseStore,
    E: ContainerEngine,
{
    pub(super) async fn append(&self, write: OperationWrite) -> Result<Recorded, Interrupted> {
        // The event id is fixed before the first attempt, so a retried write
        // that did commit cannot produce a second id for the same entry.
        self.append_as(write, Uuid::now_v7()).await
    }

    /// [`Self::append`] with the event id given: one derived from the
    /// message makes a redelivery of it find its answer instead of writing
    /// a second one.
    pub(super) async fn append_as(
        &self,
        write: OperationWrite,
        event_id: Uuid,
    ) -> Result<Recorded, Interrupted> {
        Ok(self
            .store_retrying(|| self.store.append(write.clone(), event_id))
            .await?)
    }
}

impl<S, L, E> Op<'_, S, L, E>
where
    S: RuntimeStore,
    L: LeaseStore,
    E: ContainerEngine,
{
    /// The game's record as Docker reports it now, for a command answered
    /// without running to the end; `None` (leave it) when there is no
    /// record, Docker cannot be asked, or they already agree.
    pub(super) async fn observed_record(&self) -> Option<RecordUpdate> {
        let record = self.lc.store.load(self.game()).await.ok().flatten()?;
        let info = self.lc.engine.inspect(self.game()).await.ok()?;
        let (image_ref, state) = match info {
            Some(info) if info.running => (
                ImageRef::parse(&info.image_ref).unwrap_or_else(|_| record.image_ref.clone()),
                RuntimeState::Running {
                    container_id: info.id,
                    address: info.address,
                },
            ),
            Some(info) => (
                record.image_ref.clone(),
                RuntimeState::Stopped {
                    container_id: Some(info.id),
                },
            ),
            None if matches!(record.state, RuntimeState::Removed) => return None,
            None => (
                record.image_ref.clone(),
                RuntimeState::Stopped { container_id: None },
            ),
        };
        if state == record.state && image_ref == record.image_ref {
            return None;
        }
        Some(record.update_to(image_ref, state))
    }

    /// Writes an entry of this op (with its event and record update) under
    /// its fence.
    pub(super) async fn write(
        &self,
        mut entry: OperationEntry,
        record: Option<RecordUpdate>,
    ) -> Result<Recorded, Interrupted> {
        entry.finished_at = Utc::now();
        self.lc
            .append(OperationWrite {
                entry,
                fence: WriteFence::Held(self.fence),
                record,
                answers: Answers::Command,
            })
            .await
            .map_err(|e| match e {
                Interrupted::Unrecorded(StoreError::FenceLost(_)) => {
                    Interrupted::FenceLost(self.game().to_string())
                }
                other => other,
            })
    }

    /// Journals a Docker step as done, so a redelivered command can resume
    /// after it.
    pub(super) async fn journal(&self, step: &Step) -> Result<(), Interrupted> {
        self.lc
            .store_retrying(|| {
                self.lc
                    .store
                    .journal(self.game(), self.fence, &self.cmd.command_id, step)
            })
            .await
            .map_err(|e| match e {
                StoreError::FenceLost(_) => Interrupted::FenceLost(self.game().to_string()),
                other => Interrupted::Unrecorded(other),
            })
    }

    /// Writes `entry` as its op's steps ended: on success as they left it,
    /// with their record update; on a business failure as that failure, with
    /// `on_failure`; an interruption is handed back unwritten. Every entry
    /// written under the lease goes through here.
    pub(super) async fn finish(
        &self,
        mut entry: OperationEntry,
        ended: Result<Option<RecordUpdate>, Halt>,
        on_failure: Option<RecordUpdate>,
    ) -> Result<Recorded, Interrupted> {
        let record = match ended {
            Ok(update) => update,
            Err(Halt::Fail(failure)) => {
                entry.result = EntryResult::Failure(failure);
                on_failure
            }
            Err(Halt::Interrupt(i)) => return Err(i),
        };
        self.write(entry, record).await
    }

    /// The game's record, if any, as read when the fence was taken (a
    /// database error there interrupted the command before any op ran); a
    /// corrupt row is `internal`.
    pub(super) async fn load_record(&self) -> Result<Option<RuntimeRecord>, Failure> {
        self.record
            .clone()
            .map_err(|why| Failure::new(ErrorCode::Internal, why))
    }

    /// The game's record, which must exist (`not_found`).
    pub(super) async fn load_existing(&self) -> Result<RuntimeRecord, Failure> {
        self.load_record().await?.ok_or_else(|| {
            Failure::new(
                ErrorCode::NotFound,
                format!(
                    "runtime record for game {:?} does not exist",
                    self.game().as_str()
                ),
            )
        })
    }
}
