//! Forwarding (SPEC §12): a command for a game placed on another node is
//! published, unchanged (body and properties), to the command exchange with
//! routing key `node.<node>`, where that node's queue takes it; only once
//! the broker confirms it is the original acked. A worker that dies in
//! between leaves both copies: the inbox answers the second as a duplicate.

use tracing::info;

use super::attempt::{Decision, retry_until_shutdown};
use super::dead_letter::CONFIRM_TIMEOUT;
use super::{Consumer, Job};
use crate::broker::{self, Outgoing, PublishError};
use crate::domain::NodeName;
use crate::telemetry;

impl Consumer {
    /// Forwards `job` to `node`'s queue until the broker confirms it:
    /// `Ack` then, `Leave` if shutdown came first or the channel is gone
    /// (the original comes back and is routed again).
    pub(super) async fn forward(&self, job: &Job, node: &NodeName) -> Decision {
        let routing_key = node.routing_key();
        let forwarded = retry_until_shutdown(
            &self.shutdown,
            "forward the command to its game's node",
            || async {
                if !job.channel.status().connected() {
                    return Ok(false);
                }
                let copy = Outgoing {
                    exchange: &self.amqp.command_exchange,
                    routing_key: routing_key.as_str().into(),
                    // A node's queue that is gone must not drop the command.
                    mandatory: true,
                    body: &job.delivery.data,
                    properties: job.delivery.properties.clone(),
                };
                match tokio::time::timeout(
                    CONFIRM_TIMEOUT,
                    broker::publish_confirmed(&job.channel, copy),
                )
                .await
                {
                    Ok(Ok(())) => Ok(true),
                    // Its queue was lost (a broker reset) or never declared
                    // (placed by name before its worker ever ran): declared
                    // here, the command waits in it for the node.
                    Ok(Err(PublishError::Returned)) => {
                        broker::declare_node_queue(&job.channel, &self.amqp, node)
                            .await
                            .map_err(|e| format!("{e:#}"))?;
                        Err(format!(
                            "no queue took it for node {node}; declared the node's queue"
                        ))
                    }
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no confirm within {CONFIRM_TIMEOUT:?}")),
                }
            },
        )
        .await;
        match forwarded {
            Some(true) => {
                metrics::counter!(telemetry::COMMANDS_FORWARDED, "node" => node.to_string())
                    .increment(1);
                info!(%node, "forwarded to the game's node");
                Decision::Ack
            }
            Some(false) | None => Decision::Leave,
        }
    }
}
