//! `restart`: stop → remove → start with the current image, under one lease.
//! As a patch does, it creates the new container under the game's temporary
//! name before the stop, so the game is down for stop + remove + rename +
//! start only.

use super::start::StartPlan;
use super::{Halt, Interrupted, Op};
use crate::domain::{OpKind, OperationEntry, RecordUpdate, RuntimeState, Stage};
use crate::error::{ErrorCode, Failure};
use crate::ports::{ContainerEngine, LeaseStore, Recorded, RuntimeStore};

impl<S, L, E> Op<'_, S, L, E>
where
    S: RuntimeStore,
    L: LeaseStore,
    E: ContainerEngine,
{
    pub(super) async fn restart(&self) -> Result<Recorded, Interrupted> {
        let mut entry = self.outer_entry();
        let result = self.restart_steps(&mut entry).await;
        self.finish(entry, result, None).await
    }

    async fn restart_steps(
        &self,
        entry: &mut OperationEntry,
    ) -> Result<Option<RecordUpdate>, Halt> {
        let record = self.load_existing().await?;
        entry.image_ref = Some(record.image_ref.to_string());
        entry.container_id = record.state.container_id().map(ToString::to_string);
        if matches!(record.state, RuntimeState::Removed) {
            return Err(Failure::new(
                ErrorCode::Conflict,
                format!(
                    "runtime for game {} is removed; cannot restart",
                    self.game()
                ),
            )
            .into());
        }

        // Skipped when resuming past the rename.
        let mut prepared = None;
        if !self.resumed_past_start(OpKind::Restart) {
            self.ensure_image(&record.image_ref).await?;
            prepared = self
                .replace_with_next(OpKind::Restart, &record, &record.image_ref)
                .await?;
        }

        let start = self
            .inner_start(StartPlan {
                image: &record.image_ref,
                outer: Some(OpKind::Restart),
                previous_image: None,
                rolled_back: false,
                stage: Stage::Start,
                on_failure: Some(record.update(RuntimeState::Stopped { container_id: None })),
                prepared,
            })
            .await?;
        match start {
            Ok(info) => {
                entry.container_id = Some(info.id.to_string());
                entry.address = info.address;
                Ok(None)
            }
            Err(f) => Err(Failure::new(
                f.code,
                format!("inner start failed: {}; the game is stopped", f.message),
            )
            .into()),
        }
    }
}
