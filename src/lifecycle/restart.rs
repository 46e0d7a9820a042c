//! `restart`: stop → remove → start with the current image, under one lease.

use super::start::StartPlan;
use super::{Halt, Interrupted, Lifecycle, Op};
use crate::domain::{OpKind, RecordUpdate, RuntimeState, Stage};
use crate::error::{ErrorCode, Failure};
use crate::ports::{ContainerEngine, LeaseStore, Recorded, RuntimeStore};

impl<S, L, E> Lifecycle<S, L, E>
where
    S: RuntimeStore,
    L: LeaseStore,
    E: ContainerEngine,
{
    pub(super) async fn restart(&self, op: &Op<'_, L>) -> Result<Recorded, Interrupted> {
        let mut entry = op.outer_entry();
        let record = match self.load_existing(op).await {
            Ok(record) => record,
            Err(failure) => return self.fail_outer(op, entry, failure, None).await,
        };
        entry.image_ref = Some(record.image_ref.to_string());
        entry.container_id = record.state.container_id().map(ToString::to_string);
        if matches!(record.state, RuntimeState::Removed) {
            let failure = Failure::new(
                ErrorCode::Conflict,
                format!("runtime for game {} is removed; cannot restart", op.game()),
            );
            return self.fail_outer(op, entry, failure, None).await;
        }

        // Skipped when resuming past the new start.
        if !op.resumed_past_start(OpKind::Restart) {
            match self.stop_and_remove(op, OpKind::Restart, &record).await {
                Ok(()) => {}
                Err(Halt::Fail(failure)) => {
                    return self.fail_outer(op, entry, failure, None).await;
                }
                Err(Halt::Interrupt(i)) => return Err(i),
            }
        }

        let start = self
            .inner_start(
                op,
                StartPlan {
                    image: &record.image_ref,
                    outer: Some(OpKind::Restart),
                    previous_image: None,
                    rolled_back: false,
                    stage: Stage::Start,
                    on_failure: Some(RecordUpdate {
                        game_id: op.game().clone(),
                        image_ref: record.image_ref.clone(),
                        state: RuntimeState::Stopped { container_id: None },
                        state_dir: record.state_dir.clone(),
                    }),
                },
            )
            .await?;
        match start {
            Ok(info) => {
                entry.container_id = Some(info.id.to_string());
                entry.address = info.address;
                self.write(op, entry, None).await
            }
            Err(f) => {
                let failure = Failure::new(
                    f.code,
                    format!("inner start failed: {}; the game is stopped", f.message),
                );
                self.fail_outer(op, entry, failure, None).await
            }
        }
    }
}
