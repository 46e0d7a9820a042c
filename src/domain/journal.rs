//! The operation journal (`operation_journal`, SPEC §10 "A crash
//! mid-operation is recovered"): the Docker steps an attempt of a command
//! has done, and what a redelivered command reads back to resume.
//!
//! A row is stored as a step name and a jsonb detail. The names and details
//! are the ones every build since the journal began has written (`begin`,
//! `pull <image>`, `stop`, `remove`, `<stage>.create`, `<stage>.start`,
//! `<stage>.up`), with their meaning kept, so a command an older build left
//! mid-operation resumes across an upgrade: [`Step::name`] and
//! [`Step::detail`] write that form, [`Step::from_stored`] reads it. One
//! step was added since: `start.staged`, a patch's or restart's new
//! container created under the game's temporary name before the old one
//! stops (an older build never wrote it, and a command it left behind
//! resumes as before). Inside the code a step is one tagged enum, its
//! detail its fields.

use serde::{Deserialize, Serialize};

use super::{ContainerId, EntryResult, ImageRef, OpKind, OutcomeEvent};
use crate::error::Failure;

/// Which start a container step belongs to: the op's own start, or the
/// rollback to the previous image after a patch's new start failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Start,
    Rollback,
}

impl Stage {
    pub const fn as_str(self) -> &'static str {
        match self {
            Stage::Start => "start",
            Stage::Rollback => "rollback",
        }
    }

    fn parse(raw: &str) -> Option<Self> {
        match raw {
            "start" => Some(Stage::Start),
            "rollback" => Some(Stage::Rollback),
            _ => None,
        }
    }
}

/// A Docker step journaled as done. The serde tag (`step`) and the stage are
/// carried by the stored name; the other fields are the stored detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// A patch began: the image the game ran before it, which a resumed
    /// patch rolls back to even once the record shows the new image.
    Begin { previous_image: ImageRef },
    /// The image was pulled.
    Pull { image: ImageRef },
    /// The running container is being stopped: journaled *before* the stop,
    /// so a redelivery after a death in the grace period does not call its
    /// own stop a no-op.
    Stop { container_id: ContainerId },
    /// A container of the game was removed.
    Remove { container_id: ContainerId },
    /// The stage's container was created under the game's temporary name
    /// while the old container may still run (a patch's or a restart's
    /// new container, created before the downtime begins).
    Staged {
        stage: Stage,
        container_id: ContainerId,
    },
    /// The stage's container holds the game's name, not started yet: it
    /// was created under it, or it is the staged one, renamed to it once
    /// the old container was removed. Either way the old container is gone.
    Create {
        stage: Stage,
        container_id: ContainerId,
    },
    /// The stage's container was started (not known to be up yet).
    Start {
        stage: Stage,
        container_id: ContainerId,
    },
    /// The stage's container is up (SPEC §4).
    Up {
        stage: Stage,
        container_id: ContainerId,
        address: Option<String>,
        image: ImageRef,
    },
}

/// A stored journal row that does not read back as a [`Step`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("journal step {name:?} with detail {detail} is not a known step: {why}")]
pub struct UnknownStep {
    pub name: String,
    pub detail: serde_json::Value,
    pub why: String,
}

impl Step {
    /// The stored name (`operation_journal.step`): one row per name and
    /// command, so a step done again replaces its detail.
    pub fn name(&self) -> String {
        match self {
            Step::Begin { .. } => "begin".to_owned(),
            Step::Pull { image } => format!("pull {image}"),
            Step::Stop { .. } => "stop".to_owned(),
            Step::Remove { .. } => "remove".to_owned(),
            Step::Staged { stage, .. } => format!("{}.staged", stage.as_str()),
            Step::Create { stage, .. } => format!("{}.create", stage.as_str()),
            Step::Start { stage, .. } => format!("{}.start", stage.as_str()),
            Step::Up { stage, .. } => format!("{}.up", stage.as_str()),
        }
    }

    /// The stored detail (`operation_journal.detail`): the fields, without
    /// the tag and stage the name carries.
    pub fn detail(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).expect("a step serializes");
        if let Some(fields) = value.as_object_mut() {
            fields.remove("step");
            fields.remove("stage");
        }
        value
    }

    /// Reads a stored row back: the tag and stage from the name, the rest
    /// from the detail.
    pub fn from_stored(name: &str, detail: serde_json::Value) -> Result<Step, UnknownStep> {
        let unknown = |why: String| UnknownStep {
            name: name.to_owned(),
            detail: detail.clone(),
            why,
        };
        let (tag, stage) = match name.split_once(['.', ' ']) {
            None => (name, None),
            Some(("pull", _)) => ("pull", None),
            Some((stage, tag)) => {
                let stage =
                    Stage::parse(stage).ok_or_else(|| unknown(format!("no stage {stage:?}")))?;
                (tag, Some(stage))
            }
        };
        let mut fields = match &detail {
            serde_json::Value::Object(fields) => fields.clone(),
            serde_json::Value::Null => serde_json::Map::new(),
            other => return Err(unknown(format!("the detail {other} is not an object"))),
        };
        fields.insert("step".into(), tag.into());
        if let Some(stage) = stage {
            fields.insert("stage".into(), stage.as_str().into());
        }
        let step: Step =
            serde_json::from_value(fields.into()).map_err(|e| unknown(e.to_string()))?;
        // The name is the row's key: it must be the one this step writes.
        if step.name() != name {
            return Err(unknown(format!("it reads back as {:?}", step.name())));
        }
        Ok(step)
    }
}

/// An operation-log entry an earlier attempt of the command wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriorEntry {
    pub op: OpKind,
    /// The outer op this entry is a step of; `None` for an outer entry.
    pub outer_op: Option<OpKind>,
    /// A rollback start (after a patch's new start failed).
    pub rolled_back: bool,
    pub result: EntryResult,
    pub container_id: Option<ContainerId>,
}

impl PriorEntry {
    /// The entry an outcome event reports (the outbox keeps an entry's
    /// event, so it is how the entry is read back).
    pub fn from_event(event: &OutcomeEvent) -> Result<Self, String> {
        let kind = |raw: &str| OpKind::parse(raw).ok_or_else(|| format!("unknown op {raw:?}"));
        let op = kind(event.op.as_deref().unwrap_or_default())?;
        let outer_op = event.outer_op.as_deref().map(kind).transpose()?;
        let result = match event.error_code {
            None => EntryResult::Success { noop: event.noop },
            Some(code) => EntryResult::Failure(Failure::new(
                code,
                event.error_message.clone().unwrap_or_default(),
            )),
        };
        Ok(Self {
            op,
            outer_op,
            rolled_back: event.rolled_back,
            result,
            container_id: event.container_id.clone().map(ContainerId),
        })
    }
}

/// What earlier attempts of a command already did: the entries they wrote
/// (in write order) and the Docker steps they journaled. Empty on a first
/// attempt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    pub entries: Vec<PriorEntry>,
    pub steps: Vec<Step>,
}

impl Progress {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.steps.is_empty()
    }

    /// The recorded entry of `op` run as a step of `outer`, if any (the
    /// rollback start is told apart by `rolled_back`).
    pub fn entry(
        &self,
        op: OpKind,
        outer: Option<OpKind>,
        rolled_back: bool,
    ) -> Option<&PriorEntry> {
        // The latest: a later attempt's entry supersedes an earlier one's.
        self.entries
            .iter()
            .rev()
            .find(|e| e.op == op && e.outer_op == outer && e.rolled_back == rolled_back)
    }

    /// The image a patch began from, as its first attempt journaled it.
    pub fn previous_image(&self) -> Option<&ImageRef> {
        self.steps.iter().find_map(|step| match step {
            Step::Begin { previous_image } => Some(previous_image),
            _ => None,
        })
    }

    /// The stage's container created under the game's temporary name, if
    /// one was journaled.
    pub fn staged(&self, stage: Stage) -> Option<&ContainerId> {
        self.steps.iter().find_map(|step| match step {
            Step::Staged {
                stage: s,
                container_id,
            } if *s == stage => Some(container_id),
            _ => None,
        })
    }

    /// Whether the stage's new container holds the game's name (created
    /// there, or staged and renamed), so the old container is gone.
    pub fn created(&self, stage: Stage) -> bool {
        self.reached(stage).any(|(how_far, _)| how_far == 0)
    }

    /// The stage's container as far as it got: the one journaled up, else
    /// started, else created.
    pub fn container(&self, stage: Stage) -> Option<&ContainerId> {
        self.reached(stage)
            .max_by_key(|(how_far, _)| *how_far)
            .map(|(_, id)| id)
    }

    /// The stage's container steps: how far each got (created 0, started 1,
    /// up 2) and its container.
    fn reached(&self, stage: Stage) -> impl Iterator<Item = (u8, &ContainerId)> {
        self.steps.iter().filter_map(move |step| match step {
            Step::Create {
                stage: s,
                container_id,
            } if *s == stage => Some((0, container_id)),
            Step::Start {
                stage: s,
                container_id,
            } if *s == stage => Some((1, container_id)),
            Step::Up {
                stage: s,
                container_id,
                ..
            } if *s == stage => Some((2, container_id)),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn image(raw: &str) -> ImageRef {
        ImageRef::parse(raw).unwrap()
    }

    fn id(raw: &str) -> ContainerId {
        ContainerId(raw.to_owned())
    }

    /// Every step, stored as the builds before the typed journal stored it
    /// (`start.staged` as the build that added it does).
    fn stored_forms() -> Vec<(Step, &'static str, serde_json::Value)> {
        vec![
            (
                Step::Begin {
                    previous_image: image("rtm-test/engine:1.4.2"),
                },
                "begin",
                json!({ "previous_image": "rtm-test/engine:1.4.2" }),
            ),
            (
                Step::Pull {
                    image: image("registry:5000/rtm-test/engine:1.4.3"),
                },
                "pull registry:5000/rtm-test/engine:1.4.3",
                json!({ "image": "registry:5000/rtm-test/engine:1.4.3" }),
            ),
            (
                Step::Stop {
                    container_id: id("c1"),
                },
                "stop",
                json!({ "container_id": "c1" }),
            ),
            (
                Step::Remove {
                    container_id: id("c1"),
                },
                "remove",
                json!({ "container_id": "c1" }),
            ),
            (
                Step::Staged {
                    stage: Stage::Start,
                    container_id: id("c2"),
                },
                "start.staged",
                json!({ "container_id": "c2" }),
            ),
            (
                Step::Create {
                    stage: Stage::Start,
                    container_id: id("c2"),
                },
                "start.create",
                json!({ "container_id": "c2" }),
            ),
            (
                Step::Start {
                    stage: Stage::Rollback,
                    container_id: id("c3"),
                },
                "rollback.start",
                json!({ "container_id": "c3" }),
            ),
            (
                Step::Up {
                    stage: Stage::Start,
                    container_id: id("c2"),
                    address: Some("172.18.0.5".into()),
                    image: image("rtm-test/engine:1.4.3"),
                },
                "start.up",
                json!({ "container_id": "c2", "address": "172.18.0.5", "image": "rtm-test/engine:1.4.3" }),
            ),
            (
                Step::Up {
                    stage: Stage::Rollback,
                    container_id: id("c3"),
                    address: None,
                    image: image("rtm-test/engine:1.4.2"),
                },
                "rollback.up",
                json!({ "container_id": "c3", "address": null, "image": "rtm-test/engine:1.4.2" }),
            ),
        ]
    }

    #[test]
    fn steps_keep_the_stored_form_older_builds_wrote() {
        for (step, name, detail) in stored_forms() {
            assert_eq!(step.name(), name);
            assert_eq!(step.detail(), detail, "{name}");
            assert_eq!(Step::from_stored(name, detail).unwrap(), step);
        }
    }

    #[test]
    fn unknown_rows_are_refused_with_their_name() {
        for (name, detail) in [
            ("stopped_old", json!({})),
            ("start.create", serde_json::Value::Null),
            ("boot.create", json!({ "container_id": "c" })),
            ("pull x:1", json!({ "image": "y:1" })),
        ] {
            let err = Step::from_stored(name, detail).unwrap_err();
            assert_eq!(err.name, name);
        }
    }

    #[test]
    fn a_stage_container_is_the_furthest_journaled() {
        let mut progress = Progress::default();
        assert_eq!(progress.container(Stage::Start), None);
        progress.steps.push(Step::Create {
            stage: Stage::Start,
            container_id: id("created"),
        });
        progress.steps.push(Step::Up {
            stage: Stage::Rollback,
            container_id: id("rollback"),
            address: None,
            image: image("a:1.0.0"),
        });
        assert_eq!(progress.container(Stage::Start), Some(&id("created")));
        assert!(progress.created(Stage::Start));
        assert!(!progress.created(Stage::Rollback));
        progress.steps.push(Step::Start {
            stage: Stage::Start,
            container_id: id("started"),
        });
        assert_eq!(progress.container(Stage::Start), Some(&id("started")));
        assert_eq!(progress.container(Stage::Rollback), Some(&id("rollback")));
    }
}
