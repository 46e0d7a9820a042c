//! Dead-lettering an undecodable message: its `runtime.rejected` event
//! (when a command_id could be read) is stored first, then a copy of the
//! message goes to the dead-letter exchange with the reason in
//! `x-rtm-reject-reason`, then the original is acked.

use std::time::Duration;

use chrono::Utc;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, LongString};
use tracing::warn;
use uuid::Uuid;

use super::CommandHandler;
use super::attempt::{DeadLetterReason, Decision, retry_until_shutdown};
use crate::broker::{self, Outgoing, PublishError, REJECT_REASON_HEADER};
use crate::domain::event::{REJECTED_ROUTING_KEY, SCHEMA_VERSION};
use crate::domain::{Outcome, OutcomeEvent};
use crate::error::ErrorCode;
use crate::messages::Undecodable;
use crate::shutdown::Shutdown;

/// Stores the `runtime.rejected` event of an undecodable message, then
/// decides to dead-letter it. The event first, retried while the database
/// is out (the message waits unacked in its own task, holding up nothing),
/// rather than dead-lettered with its event lost; at shutdown it is left
/// to come back. Its id is derived from the command_id, so handling the
/// message twice stores it once.
pub(super) async fn reject(
    handler: &dyn CommandHandler,
    undecodable: Undecodable,
    shutdown: &Shutdown,
) -> Decision {
    warn!(reason = %undecodable.reason, command_id = ?undecodable.command_id, "undecodable message: dead-lettering");
    if let Some(event) = rejected_event(&undecodable) {
        let stored = retry_until_shutdown(shutdown, "record the runtime.rejected event", || {
            handler.append_rejected(&event)
        })
        .await;
        if stored.is_none() {
            return Decision::Leave;
        }
    }
    Decision::DeadLetter(DeadLetterReason::Undecodable(undecodable.reason))
}

/// How long the broker may take to confirm a copy (to the dead-letter
/// exchange, or forwarded to a node's queue).
pub(super) const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Copies `delivery` to the dead-letter exchange ([`copy_to`]) until the
/// broker confirms it: `false` if shutdown came first or the channel is
/// gone (the message comes back then, unacked).
pub(super) async fn copy_until_confirmed(
    channel: &Channel,
    exchange: &str,
    delivery: &Delivery,
    reason: &str,
    shutdown: &Shutdown,
) -> bool {
    retry_until_shutdown(shutdown, "dead-letter the message", move || async move {
        if !channel.status().connected() {
            // Not an error to retry: the message returns with the channel.
            return Ok(false);
        }
        match tokio::time::timeout(
            CONFIRM_TIMEOUT,
            copy_to(channel, exchange, delivery, reason),
        )
        .await
        {
            Ok(Ok(())) => Ok(true),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no confirm within {CONFIRM_TIMEOUT:?}")),
        }
    })
    .await
    .unwrap_or(false)
}

/// Publishes a copy of `delivery` to `exchange` with `reason` in
/// `x-rtm-reject-reason`, and waits for the broker's confirm.
pub(super) async fn copy_to(
    channel: &Channel,
    exchange: &str,
    delivery: &Delivery,
    reason: &str,
) -> Result<(), PublishError> {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(
        REJECT_REASON_HEADER.into(),
        AMQPValue::LongString(LongString::from(reason)),
    );
    let copy = Outgoing {
        exchange,
        routing_key: delivery.routing_key.clone(),
        mandatory: false,
        body: &delivery.data,
        properties: delivery.properties.clone().with_headers(headers),
    };
    broker::publish_confirmed(channel, copy).await
}

/// The namespace of `runtime.rejected` event ids (UUID v5 of the command_id).
const REJECTED_EVENTS: Uuid = Uuid::from_u128(0x5f1c_2a4e_9b7d_4c1a_8e3f_6d2b_0a9c_7e41);

/// The `runtime.rejected` event of an undecodable message whose command_id
/// could be read.
pub(super) fn rejected_event(undecodable: &Undecodable) -> Option<OutcomeEvent> {
    let command_id = undecodable.command_id.clone()?;
    let now = Utc::now();
    Some(OutcomeEvent {
        node: None,
        event_id: Uuid::new_v5(&REJECTED_EVENTS, command_id.as_bytes()),
        schema_version: SCHEMA_VERSION,
        occurred_at: now,
        operation_id: None,
        correlation_id: undecodable
            .source_ref
            .clone()
            .unwrap_or_else(|| command_id.clone()),
        command_id,
        game_id: undecodable.game_id.clone().unwrap_or_default(),
        op: undecodable.op.clone(),
        outer_op: None,
        op_source: None,
        reason: None,
        outcome: Outcome::Failure,
        error_code: Some(ErrorCode::InvalidRequest),
        error_message: Some(undecodable.reason.clone()),
        image_ref: None,
        previous_image_ref: None,
        container_id: None,
        address: None,
        noop: false,
        rolled_back: false,
        started_at: now,
        finished_at: now,
    })
    .filter(|e| e.routing_key() == REJECTED_ROUTING_KEY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn undecodable(command_id: Option<&str>) -> Undecodable {
        Undecodable {
            reason: "op \"explode\" is unknown".into(),
            command_id: command_id.map(str::to_owned),
            op: Some("explode".into()),
            game_id: Some("g-1".into()),
            source_ref: None,
        }
    }

    #[test]
    fn a_rejected_event_is_the_same_event_each_time_it_is_handled() {
        let first = rejected_event(&undecodable(Some("c-7"))).unwrap();
        let again = rejected_event(&undecodable(Some("c-7"))).unwrap();
        assert_eq!(
            first.event_id, again.event_id,
            "stored once, however often handled"
        );
        assert_ne!(
            first.event_id,
            rejected_event(&undecodable(Some("c-8"))).unwrap().event_id
        );
        assert_eq!(first.routing_key(), "runtime.rejected");
        assert_eq!(first.correlation_id, "c-7");
        assert_eq!(first.error_code, Some(ErrorCode::InvalidRequest));
        assert!(
            rejected_event(&undecodable(None)).is_none(),
            "no command_id, no event"
        );
    }
}
