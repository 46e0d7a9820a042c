//! The stable error codes of SPEC §5: one exhaustive list.
//!
//! The snake_case names are wire values (operation log, events, CLI exit
//! paths). Adding a variant is an interface change; renaming one breaks
//! consumers. Raw library messages never become codes: they go in the
//! entry's `error_message`.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A command that fails decoding or validation.
    InvalidRequest,
    /// No runtime record for the game.
    NotFound,
    /// The lease is held by another command, or the state forbids the op.
    Conflict,
    /// Redis, PostgreSQL or Docker failed or timed out (after retries).
    ServiceUnavailable,
    /// Anything unexpected: a bug, a panic, a corrupt record.
    Internal,
    /// A patch image tag is not semver.
    ImageRefNotSemver,
    /// A patch changes major or minor.
    SemverPatchOnly,
    /// The image is outside `RTM_ALLOWED_IMAGES`.
    ImageNotAllowed,
    /// The image is missing and could not be pulled.
    ImagePullFailed,
    /// The container did not start, exited, or never became healthy.
    ContainerStartFailed,
    /// Docker could not stop the container.
    ContainerStopFailed,
    /// (The reconciler, SPEC §11.) The engine stopped without a command, or
    /// its container is gone.
    EngineExited,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::InvalidRequest,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::ServiceUnavailable,
        ErrorCode::Internal,
        ErrorCode::ImageRefNotSemver,
        ErrorCode::SemverPatchOnly,
        ErrorCode::ImageNotAllowed,
        ErrorCode::ImagePullFailed,
        ErrorCode::ContainerStartFailed,
        ErrorCode::ContainerStopFailed,
        ErrorCode::EngineExited,
    ];

    /// The code of a wire name, as read back from `operation_log`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|code| code.as_str() == name)
    }

    /// The wire name, as stored in `operation_log.error_code`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::ServiceUnavailable => "service_unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::ImageRefNotSemver => "image_ref_not_semver",
            ErrorCode::SemverPatchOnly => "semver_patch_only",
            ErrorCode::ImageNotAllowed => "image_not_allowed",
            ErrorCode::ImagePullFailed => "image_pull_failed",
            ErrorCode::ContainerStartFailed => "container_start_failed",
            ErrorCode::ContainerStopFailed => "container_stop_failed",
            ErrorCode::EngineExited => "engine_exited",
        }
    }

    /// Parses a stored wire name; `None` for anything not in the list.
    pub fn from_wire(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed operation: the stable code and the operator-readable detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_match_serde_and_round_trip() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(ErrorCode::from_wire(code.as_str()), Some(code));
        }
        assert_eq!(ErrorCode::from_wire("nope"), None);
    }
}
