//! The runtime record: what the manager believes runs for a game.

use std::fmt;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{GameId, ImageRef};

/// A Docker container id as Docker reports it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ContainerId(pub String);

impl ContainerId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeStatus {
    Running,
    Stopped,
    Removed,
    /// The engine stopped without a command (SPEC §11); treated like
    /// `Stopped` by every op.
    Exited,
}

impl RuntimeStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            RuntimeStatus::Running => "running",
            RuntimeStatus::Stopped => "stopped",
            RuntimeStatus::Removed => "removed",
            RuntimeStatus::Exited => "exited",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "running" => Some(RuntimeStatus::Running),
            "stopped" => Some(RuntimeStatus::Stopped),
            "removed" => Some(RuntimeStatus::Removed),
            "exited" => Some(RuntimeStatus::Exited),
            _ => None,
        }
    }
}

impl fmt::Display for RuntimeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state a record can be in; a running game always has a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeState {
    Running {
        container_id: ContainerId,
        address: Option<String>,
    },
    /// Stopped, keeping its container when there is one (a stop keeps it; a
    /// failed start leaves none).
    Stopped { container_id: Option<ContainerId> },
    /// The container is gone; the state directory is kept.
    Removed,
    /// The engine stopped without a command (SPEC §11): crashed, OOM-killed,
    /// or stopped or removed behind the manager's back. Keeps its container
    /// when Docker still has it. Every op treats it as `Stopped`.
    Exited { container_id: Option<ContainerId> },
}

impl RuntimeState {
    pub fn status(&self) -> RuntimeStatus {
        match self {
            RuntimeState::Running { .. } => RuntimeStatus::Running,
            RuntimeState::Stopped { .. } => RuntimeStatus::Stopped,
            RuntimeState::Removed => RuntimeStatus::Removed,
            RuntimeState::Exited { .. } => RuntimeStatus::Exited,
        }
    }

    pub fn container_id(&self) -> Option<&ContainerId> {
        match self {
            RuntimeState::Running { container_id, .. } => Some(container_id),
            RuntimeState::Stopped { container_id } | RuntimeState::Exited { container_id } => {
                container_id.as_ref()
            }
            RuntimeState::Removed => None,
        }
    }

    pub fn address(&self) -> Option<&str> {
        match self {
            RuntimeState::Running { address, .. } => address.as_deref(),
            _ => None,
        }
    }
}

/// A new state for a game's record, written by an operation under its fence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordUpdate {
    pub game_id: GameId,
    pub image_ref: ImageRef,
    pub state: RuntimeState,
    pub state_dir: PathBuf,
}

/// A row of `runtime_records`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeRecord {
    pub game_id: GameId,
    /// The image the game runs, or ran last. Every record is born from a
    /// successful start, so there always is one.
    pub image_ref: ImageRef,
    pub state: RuntimeState,
    pub state_dir: PathBuf,
    /// The fence of the operation that wrote the record last.
    pub fence: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl RuntimeRecord {
    pub fn status(&self) -> RuntimeStatus {
        self.state.status()
    }

    /// This record moved to `state`, on its image and state directory.
    pub fn update(&self, state: RuntimeState) -> RecordUpdate {
        self.update_to(self.image_ref.clone(), state)
    }

    /// This record moved to `state` on `image_ref`; the state directory
    /// outlives every container of the game.
    pub fn update_to(&self, image_ref: ImageRef, state: RuntimeState) -> RecordUpdate {
        RecordUpdate {
            game_id: self.game_id.clone(),
            image_ref,
            state,
            state_dir: self.state_dir.clone(),
        }
    }
}
