//! The outcome event (SPEC §6): one per operation-log entry, inner ones
//! included. This struct is the wire body; `schemas/event.schema.json`
//! describes the same shape.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::operation::{OperationEntry, Outcome};
use crate::error::ErrorCode;

pub const SCHEMA_VERSION: u32 = 1;

/// Routing key of the event published for a message that could not be
/// decoded as a command but whose command_id could be read.
pub const REJECTED_ROUTING_KEY: &str = "runtime.rejected";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeEvent {
    pub event_id: Uuid,
    pub schema_version: u32,
    pub occurred_at: DateTime<Utc>,
    /// `None` only for a `runtime.rejected` event, which has no log entry.
    pub operation_id: Option<i64>,
    pub command_id: String,
    pub correlation_id: String,
    /// As sent: an `invalid_request` event echoes a game_id that failed
    /// validation.
    pub game_id: String,
    /// As sent; `None` only for a rejected message without a readable op.
    pub op: Option<String>,
    pub outer_op: Option<String>,
    pub op_source: Option<String>,
    pub reason: Option<String>,
    pub outcome: Outcome,
    pub error_code: Option<ErrorCode>,
    pub error_message: Option<String>,
    pub image_ref: Option<String>,
    pub previous_image_ref: Option<String>,
    pub container_id: Option<String>,
    pub address: Option<String>,
    pub noop: bool,
    pub rolled_back: bool,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// The node whose worker wrote the entry (SPEC §12); absent from events
    /// stored before nodes existed and from stores that name no node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl OutcomeEvent {
    /// The event of a written entry; `event_id` is fixed by the caller at
    /// write time so a relay retry or a duplicate command republishes the
    /// same id.
    pub fn from_entry(entry: &OperationEntry, operation_id: i64, event_id: Uuid) -> Self {
        Self {
            event_id,
            schema_version: SCHEMA_VERSION,
            occurred_at: entry.finished_at,
            operation_id: Some(operation_id),
            command_id: entry.command_id.clone(),
            correlation_id: entry.correlation_id.clone(),
            game_id: entry.game_id.clone(),
            op: Some(entry.op.as_str().to_owned()),
            outer_op: entry.outer_op.map(|o| o.as_str().to_owned()),
            op_source: Some(entry.op_source.clone()),
            reason: entry.reason.clone(),
            outcome: entry.result.outcome(),
            error_code: entry.result.error_code(),
            error_message: entry.result.error_message().map(str::to_owned),
            image_ref: entry.image_ref.clone(),
            previous_image_ref: entry.previous_image_ref.clone(),
            container_id: entry.container_id.clone(),
            address: entry.address.clone(),
            noop: entry.result.noop(),
            rolled_back: entry.rolled_back,
            started_at: entry.started_at,
            finished_at: entry.finished_at,
            node: None,
        }
    }

    /// The routing key this event is published with (SPEC §6).
    pub fn routing_key(&self) -> String {
        let Some(op) = self.op.as_deref().filter(|_| self.operation_id.is_some()) else {
            return REJECTED_ROUTING_KEY.to_owned();
        };
        match self.outer_op.as_deref() {
            None => format!("runtime.{op}.{}", self.outcome),
            Some(outer) => format!("runtime.{outer}.{op}.{}", self.outcome),
        }
    }
}
