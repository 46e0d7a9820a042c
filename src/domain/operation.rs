//! Operation vocabulary: op kinds, sources, stop reasons, outcomes, and the
//! operation-log entry every lifecycle step writes (SPEC §2, §7).

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{ErrorCode, Failure};

macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $wire:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $(#[serde(rename = $wire)] $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub const fn as_str(self) -> &'static str {
                match self { $($name::$variant => $wire),+ }
            }

            pub fn parse(raw: &str) -> Option<Self> {
                match raw { $($wire => Some($name::$variant),)+ _ => None }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_enum!(
    /// The five lifecycle operations, and `exit`: the reconciler's record
    /// of an engine that stopped without a command (SPEC §11), never a
    /// command itself.
    OpKind {
        Start => "start",
        Stop => "stop",
        Restart => "restart",
        Patch => "patch",
        Remove => "remove",
        Exit => "exit",
    }
);

impl OpKind {
    /// Whether a command may ask for this op (`exit` is written by the
    /// reconciler only).
    pub const fn is_command(self) -> bool {
        !matches!(self, OpKind::Exit)
    }
}

wire_enum!(
    /// How a command entered the manager.
    OpSource {
        Lobby => "lobby",
        Admin => "admin",
        Reconciler => "reconciler",
    }
);

wire_enum!(
    /// Why a game is stopped.
    StopReason {
        AdminRequest => "admin_request",
        LobbyRequest => "lobby_request",
        GameFinished => "game_finished",
        Idle => "idle",
    }
);

// The wire_enum! macro derives the enum, so the default is written by hand.
#[allow(clippy::derivable_impls)]
impl Default for StopReason {
    fn default() -> Self {
        StopReason::LobbyRequest
    }
}

wire_enum!(
    Outcome {
        Success => "success",
        Failure => "failure",
    }
);

/// How an operation ended. A no-op is a success; a failure always carries
/// its stable code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryResult {
    Success { noop: bool },
    Failure(Failure),
}

impl EntryResult {
    pub const SUCCESS: EntryResult = EntryResult::Success { noop: false };
    pub const NOOP: EntryResult = EntryResult::Success { noop: true };

    pub fn outcome(&self) -> Outcome {
        match self {
            EntryResult::Success { .. } => Outcome::Success,
            EntryResult::Failure(_) => Outcome::Failure,
        }
    }

    pub fn noop(&self) -> bool {
        matches!(self, EntryResult::Success { noop: true })
    }

    pub fn error_code(&self) -> Option<ErrorCode> {
        match self {
            EntryResult::Failure(f) => Some(f.code),
            EntryResult::Success { .. } => None,
        }
    }

    pub fn error_message(&self) -> Option<&str> {
        match self {
            EntryResult::Failure(f) => Some(&f.message),
            EntryResult::Success { .. } => None,
        }
    }
}

/// One row of `operation_log`, before the database assigns its id.
///
/// `game_id`, `op_source`, `reason` and the image fields are the values as
/// sent: an `invalid_request` entry must record input that failed
/// validation, so these stay plain strings here; every entry written under
/// a lease is built from validated domain types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationEntry {
    pub game_id: String,
    pub op: OpKind,
    /// The outer operation this entry is a step of (`None` for an outer entry).
    pub outer_op: Option<OpKind>,
    pub op_source: String,
    pub reason: Option<String>,
    pub correlation_id: String,
    pub command_id: String,
    pub image_ref: Option<String>,
    pub previous_image_ref: Option<String>,
    pub container_id: Option<String>,
    pub address: Option<String>,
    pub result: EntryResult,
    pub rolled_back: bool,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
}

impl OperationEntry {
    pub fn is_outer(&self) -> bool {
        self.outer_op.is_none()
    }

    /// `runtime.<op>.<outcome>` for an outer entry,
    /// `runtime.<outer_op>.<op>.<outcome>` for an inner one (SPEC §6).
    pub fn routing_key(&self) -> String {
        let outcome = self.result.outcome();
        match self.outer_op {
            None => format!("runtime.{}.{}", self.op, outcome),
            Some(outer) => format!("runtime.{outer}.{}.{outcome}", self.op),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_round_trip() {
        for op in OpKind::ALL {
            assert_eq!(OpKind::parse(op.as_str()), Some(*op));
            assert_eq!(serde_json::to_value(op).unwrap(), op.as_str());
        }
        assert_eq!(OpSource::parse("lobby"), Some(OpSource::Lobby));
        assert_eq!(OpSource::parse("Lobby"), None);
        assert_eq!(StopReason::default(), StopReason::LobbyRequest);
        assert_eq!(StopReason::parse("idle"), Some(StopReason::Idle));
    }
}
