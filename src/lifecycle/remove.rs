//! `remove`: stop if running, remove the container, record `removed`. The
//! state directory is kept, so a later start is a new life on the old data.

use super::{Halt, Interrupted, Lifecycle, Op};
use crate::domain::{EntryResult, OpKind, RecordUpdate, RuntimeState};
use crate::ports::{ContainerEngine, LeaseStore, Recorded, RuntimeStore};

impl<S, L, E> Lifecycle<S, L, E>
where
    S: RuntimeStore,
    L: LeaseStore,
    E: ContainerEngine,
{
    pub(super) async fn remove(&self, op: &Op<'_, L>) -> Result<Recorded, Interrupted> {
        let mut entry = op.outer_entry();
        let record = match self.load_existing(op).await {
            Ok(record) => record,
            Err(failure) => return self.fail_outer(op, entry, failure, None).await,
        };
        entry.image_ref = Some(record.image_ref.to_string());

        let removed: Result<bool, Halt> = async {
            let container = self.inspect(op).await?;
            // A no-op is decided from what Docker reports, not the record alone.
            if matches!(record.state, RuntimeState::Removed) && container.is_none() {
                // A no-op, unless an earlier attempt of this command did it.
                return Ok(op.progress.is_empty());
            }
            self.inner_stop(op, OpKind::Remove, &record).await?;
            if let Some(info) = self.inspect(op).await? {
                entry.container_id = Some(info.id.to_string());
                self.discard(op, &info.id).await?;
            }
            Ok(false)
        }
        .await;

        match removed {
            Ok(noop) => {
                entry.result = EntryResult::Success { noop };
                let update = RecordUpdate {
                    game_id: op.game().clone(),
                    image_ref: record.image_ref.clone(),
                    state: RuntimeState::Removed,
                    state_dir: record.state_dir.clone(),
                };
                self.write(op, entry, (!noop).then_some(update)).await
            }
            Err(Halt::Fail(failure)) => self.fail_outer(op, entry, failure, None).await,
            Err(Halt::Interrupt(i)) => Err(i),
        }
    }
}
