//! `remove`: stop if running, remove the container, record `removed`. The
//! state directory is kept, so a later start is a new life on the old data.

use super::stop::InnerStop;
use super::{Halt, Interrupted, Op};
use crate::domain::{EntryResult, OpKind, OperationEntry, RecordUpdate, RuntimeState};
use crate::ports::{ContainerEngine, LeaseStore, Recorded, RuntimeStore};

impl<S, L, E> Op<'_, S, L, E>
where
    S: RuntimeStore,
    L: LeaseStore,
    E: ContainerEngine,
{
    pub(super) async fn remove(&self) -> Result<Recorded, Interrupted> {
        let mut entry = self.outer_entry();
        let result = self.remove_steps(&mut entry).await;
        self.finish(entry, result, None).await
    }

    async fn remove_steps(&self, entry: &mut OperationEntry) -> Result<Option<RecordUpdate>, Halt> {
        let record = self.load_existing().await?;
        entry.image_ref = Some(record.image_ref.to_string());
        let container = self.inspect().await?;
        // A no-op is decided from what Docker reports, not the record alone.
        if matches!(record.state, RuntimeState::Removed) && container.is_none() {
            // A no-op, unless an earlier attempt of this command did it.
            let noop = self.progress.is_empty();
            entry.result = EntryResult::Success { noop };
            return Ok((!noop).then(|| record.update(RuntimeState::Removed)));
        }
        let old = match self.inner_stop(OpKind::Remove, &record, false).await? {
            InnerStop::Ran(container) => container,
            InnerStop::Recorded => self.inspect().await?.map(|info| info.id),
        };
        if let Some(id) = old {
            entry.container_id = Some(id.to_string());
            self.discard(&id).await?;
        }
        // A new container a failed patch or restart could not clean up
        // goes with the game.
        self.drop_leftover_next().await?;
        Ok(Some(record.update(RuntimeState::Removed)))
    }
}
