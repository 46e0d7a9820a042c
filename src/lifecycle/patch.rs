//! `patch`: restart with a new image that keeps semver major.minor (SPEC §3,
//! after the original `patchruntime.go`).
//!
//! Every check that can reject a patch — the record, both semver tags, the
//! patch series, and (beyond the original) the pull of the new image — runs
//! before the first Docker step that touches the game, so a rejected patch
//! never disturbs a running game. The new container is created under the
//! game's temporary name while the old one still runs, so the game's
//! downtime is the stop, remove, rename and start, never a download or a
//! create (`Op::replace_with_next`). When the new container does not come
//! up (beyond the original) the previous image is started again on the
//! same state directory.

use super::start::StartPlan;
use super::{Halt, Interrupted, Op};
use crate::domain::image_ref::same_patch_series;
use crate::domain::{
    EntryResult, ImageRef, OpKind, OperationEntry, RecordUpdate, RuntimeRecord, RuntimeState,
    Stage, Step,
};
use crate::error::{ErrorCode, Failure};
use crate::ports::{ContainerEngine, LeaseStore, Recorded, RuntimeStore};

impl<S, L, E> Op<'_, S, L, E>
where
    S: RuntimeStore,
    L: LeaseStore,
    E: ContainerEngine,
{
    pub(super) async fn patch(&self, new_image: &ImageRef) -> Result<Recorded, Interrupted> {
        let mut entry = self.outer_entry();
        let result = self.patch_steps(new_image, &mut entry).await;
        self.finish(entry, result, None).await
    }

    /// The patch's outer entry when the record refuses it (SPEC §3's checks
    /// before any Docker work: no record, removed, tags not semver or not
    /// of one patch series), as [`Self::patch`] would write it; `None` when
    /// the patch goes ahead.
    pub(super) async fn refusal(&self, new_image: &ImageRef) -> Option<OperationEntry> {
        let (failure, image_ref) = self.patchable_record(new_image).await.err()?;
        let mut entry = self.outer_entry();
        entry.image_ref = image_ref;
        entry.result = EntryResult::Failure(failure);
        Some(entry)
    }

    async fn patch_steps(
        &self,
        new_image: &ImageRef,
        entry: &mut OperationEntry,
    ) -> Result<Option<RecordUpdate>, Halt> {
        let record = self
            .patchable_record(new_image)
            .await
            .map_err(|(failure, image_ref)| {
                // As the original: the image the failure is about, if any.
                entry.image_ref = image_ref;
                failure
            })?;
        entry.image_ref = Some(new_image.to_string());
        // The image the game ran before this patch. A resumed patch may find
        // the record already on the new image: the first attempt journaled
        // the previous one.
        let previous = self
            .progress
            .previous_image()
            .unwrap_or(&record.image_ref)
            .clone();
        let previous = &previous;
        let begin = Step::Begin {
            previous_image: previous.clone(),
        };
        self.journal(&begin).await?;
        entry.previous_image_ref = Some(previous.to_string());
        entry.container_id = record.state.container_id().map(ToString::to_string);

        // Beyond the original: pull and create first, so a pull failure
        // leaves the running game untouched and the downtime holds no
        // create. Skipped when resuming past the rename.
        let mut prepared = None;
        if !self.resumed_past_start(OpKind::Patch) {
            self.ensure_image(new_image).await?;
            prepared = self
                .replace_with_next(OpKind::Patch, &record, new_image)
                .await?;
        }

        let stopped_on_previous = record.update_to(
            previous.clone(),
            RuntimeState::Stopped { container_id: None },
        );
        let start = self
            .inner_start(StartPlan {
                image: new_image,
                outer: Some(OpKind::Patch),
                previous_image: Some(previous),
                rolled_back: false,
                stage: Stage::Start,
                on_failure: Some(stopped_on_previous.clone()),
                prepared,
            })
            .await?;
        let start_failure = match start {
            Ok(info) => {
                entry.container_id = Some(info.id.to_string());
                entry.address = info.address;
                return Ok(None);
            }
            Err(f) => f,
        };
        entry.container_id = None;
        let failed = format!("inner start failed: {}", start_failure.message);

        let rollback_applies = start_failure.code == ErrorCode::ContainerStartFailed;
        if !rollback_applies || !self.lc.cfg.rollback {
            let why = if rollback_applies {
                "rollback is disabled (RTM_ROLLBACK=false)"
            } else {
                "no rollback for this failure"
            };
            return Err(Failure::new(
                start_failure.code,
                format!("{failed}; {why}; the game is stopped on {previous}"),
            )
            .into());
        }

        // Beyond the original: restore the previous image on the same state.
        let rollback = self
            .inner_start(StartPlan {
                image: previous,
                outer: Some(OpKind::Patch),
                previous_image: Some(new_image),
                rolled_back: true,
                stage: Stage::Rollback,
                on_failure: Some(stopped_on_previous),
                prepared: None,
            })
            .await?;
        let failure = match rollback {
            Ok(info) => {
                entry.rolled_back = true;
                entry.container_id = Some(info.id.to_string());
                entry.address = info.address;
                Failure::new(
                    start_failure.code,
                    format!("{failed}; rolled back to {previous}"),
                )
            }
            Err(rollback_failure) => Failure::new(
                start_failure.code,
                format!(
                    "{failed}; rollback to {previous} failed too: {}; the game is stopped",
                    rollback_failure.message
                ),
            ),
        };
        Err(failure.into())
    }

    /// The record checks and semver pre-checks of SPEC §3 steps 3-4. A
    /// failure comes with the image it is about (the current one, the new
    /// one, or none), which the outer entry records.
    async fn patchable_record(
        &self,
        new_image: &ImageRef,
    ) -> Result<RuntimeRecord, (Failure, Option<String>)> {
        let record = self.load_existing().await.map_err(|f| (f, None))?;
        if matches!(record.state, RuntimeState::Removed) {
            return Err((
                Failure::new(
                    ErrorCode::Conflict,
                    format!("runtime for game {} is removed; cannot patch", self.game()),
                ),
                None,
            ));
        }
        let current = record.image_ref.semver().map_err(|e| {
            (
                Failure::new(
                    ErrorCode::ImageRefNotSemver,
                    format!("current image_ref: {e}"),
                ),
                Some(record.image_ref.to_string()),
            )
        })?;
        let new = new_image.semver().map_err(|e| {
            (
                Failure::new(ErrorCode::ImageRefNotSemver, format!("new image_ref: {e}")),
                Some(new_image.to_string()),
            )
        })?;
        if !same_patch_series(&current, &new) {
            return Err((
                Failure::new(
                    ErrorCode::SemverPatchOnly,
                    format!("patch must keep major.minor; current={current} new={new}"),
                ),
                Some(new_image.to_string()),
            ));
        }
        Ok(record)
    }
}
