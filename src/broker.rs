//! The RabbitMQ topology of SPEC §6, declared by the worker (and by the CLI
//! before it publishes), and the connection settings both use.
//!
//! ```text
//! rtmanager.commands (topic) --runtime.#--> rtmanager.commands (quorum queue)
//!        x-delivery-limit, x-dead-letter-exchange = rtmanager.dlx
//!        --node.<node>--> rtmanager.commands.node.<node> (quorum queue, one per
//!                         node, same arguments; SPEC §12)
//! rtmanager.dlx (fanout) --> rtmanager.dead-letters (durable queue)
//! rtmanager.events (topic)   <- outcome events, runtime.<op>.<outcome>
//! ```
//!
//! Every publish goes through [`publish_confirmed`]: one place reads the
//! broker's `Confirmation`, and its callers branch on a [`PublishError`].

use std::time::Duration;

use anyhow::Context as _;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
    PublisherConfirm,
};

use crate::config::{AmqpConfig, SecretUrl};
use crate::domain::NodeName;

/// The header carrying why the worker dead-lettered a message itself.
pub const REJECT_REASON_HEADER: &str = "x-rtm-reject-reason";
/// The binding of the command queue: every `runtime.<op>`.
pub const COMMAND_BINDING: &str = "runtime.#";

/// AMQP `delivery_mode` of a persistent message: it survives a broker
/// restart once confirmed.
pub const PERSISTENT: u8 = 2;

/// How long the TCP connect plus the AMQP handshake may take. lapin puts no
/// bound on the handshake: a broker that accepts the socket but never
/// answers (still booting, wedged, a wrong port) would otherwise stall the
/// consumer's and the relay's reconnect loops for good. lapin offers no way
/// to cancel an attempt: one given up on keeps its socket (and lapin's I/O
/// thread) until the peer closes it, which RabbitMQ does to an unfinished
/// handshake after its own `handshake_timeout` (10 s by default).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Connects to the broker; `name` shows in the management UI.
pub async fn connect(url: &SecretUrl, name: &str) -> anyhow::Result<Connection> {
    connect_within(url, name, CONNECT_TIMEOUT).await
}

async fn connect_within(
    url: &SecretUrl,
    name: &str,
    limit: Duration,
) -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(limit, Connection::connect(url.expose(), properties)).await {
        Ok(connected) => connected.with_context(|| format!("cannot connect to RabbitMQ at {url}")),
        Err(_) => {
            anyhow::bail!("cannot connect to RabbitMQ at {url}: no AMQP handshake within {limit:?}")
        }
    }
}

/// Why a confirmed publish did not land.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker refused it (`basic.nack`), e.g. a queue at its length
    /// limit with `reject-publish`. Nobody may have it: retry or report.
    #[error("the broker refused it (nack)")]
    Nacked,
    /// Published `mandatory` and no queue took it (`basic.return`).
    #[error("the broker returned it: no queue is bound for its routing key")]
    Returned,
    /// The channel or connection failed before the confirm: whether the
    /// broker has it is unknown.
    #[error("the broker link failed: {0}")]
    Link(#[from] lapin::Error),
    /// The channel is not in confirm mode (`confirm_select` was never
    /// sent): a bug of the caller's, never a broker's answer.
    #[error("the broker did not confirm it (confirms not enabled)")]
    Unconfirmed,
}

/// One message to publish.
pub struct Outgoing<'a> {
    pub exchange: &'a str,
    pub routing_key: ShortString,
    /// Have the broker return it when no queue takes it, rather than drop
    /// it silently.
    pub mandatory: bool,
    pub body: &'a [u8],
    pub properties: BasicProperties,
}

/// Publishes `message` on `channel` (in confirm mode) and waits for the
/// broker's confirm: `Ok` once the broker has taken it.
pub async fn publish_confirmed(
    channel: &Channel,
    message: Outgoing<'_>,
) -> Result<(), PublishError> {
    confirmed(publish(channel, message).await?).await
}

/// Sends `message` on `channel` (in confirm mode) without waiting for its
/// confirm: [`confirmed`] waits for it. Many sent before their confirms are
/// awaited share the round trips to the broker.
pub async fn publish(
    channel: &Channel,
    message: Outgoing<'_>,
) -> Result<PublisherConfirm, PublishError> {
    Ok(channel
        .basic_publish(
            message.exchange.into(),
            message.routing_key,
            BasicPublishOptions {
                mandatory: message.mandatory,
                ..BasicPublishOptions::default()
            },
            message.body,
            message.properties,
        )
        .await?)
}

/// Waits for the broker's answer to a [`publish`]: `Ok` once it has taken
/// the message.
pub async fn confirmed(confirm: PublisherConfirm) -> Result<(), PublishError> {
    match confirm.await? {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_returned)) => Err(PublishError::Returned),
        Confirmation::Nack(_) => Err(PublishError::Nacked),
        Confirmation::NotRequested => Err(PublishError::Unconfirmed),
    }
}

/// Declares every exchange, queue and binding (idempotent). A queue that
/// exists with other arguments makes the broker refuse: the error says so.
pub async fn declare_topology(channel: &Channel, cfg: &AmqpConfig) -> anyhow::Result<()> {
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };

    channel
        .exchange_declare(
            cfg.command_exchange.as_str().into(),
            ExchangeKind::Topic,
            durable_exchange,
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declare exchange {}", cfg.command_exchange))?;
    channel
        .exchange_declare(
            cfg.dead_letter_exchange.as_str().into(),
            ExchangeKind::Fanout,
            durable_exchange,
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declare exchange {}", cfg.dead_letter_exchange))?;
    channel
        .queue_declare(
            cfg.dead_letter_queue.as_str().into(),
            durable_queue,
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declare queue {}", cfg.dead_letter_queue))?;
    channel
        .queue_bind(
            cfg.dead_letter_queue.as_str().into(),
            cfg.dead_letter_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("bind queue {}", cfg.dead_letter_queue))?;

    declare_command_queue(channel, cfg, &cfg.command_queue, COMMAND_BINDING).await?;

    channel
        .exchange_declare(
            cfg.event_exchange.as_str().into(),
            ExchangeKind::Topic,
            durable_exchange,
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declare exchange {}", cfg.event_exchange))?;
    Ok(())
}

/// Declares `node`'s own command queue, `<RTM_COMMAND_QUEUE>.node.<node>`,
/// bound with `node.<node>` (SPEC §12): by the node's workers, and by a
/// worker forwarding a command there, so the command waits for the node
/// even if the queue was lost with a broker reset.
pub async fn declare_node_queue(
    channel: &Channel,
    cfg: &AmqpConfig,
    node: &NodeName,
) -> anyhow::Result<()> {
    declare_command_queue(
        channel,
        cfg,
        &node.queue(&cfg.command_queue),
        &node.routing_key(),
    )
    .await
}

/// A command queue: a durable quorum queue with the delivery limit and the
/// dead-letter exchange, bound to the command exchange with `binding`.
async fn declare_command_queue(
    channel: &Channel,
    cfg: &AmqpConfig,
    queue: &str,
    binding: &str,
) -> anyhow::Result<()> {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    arguments.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(i32::try_from(cfg.delivery_limit).unwrap_or(i32::MAX)),
    );
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(cfg.dead_letter_exchange.as_str())),
    );
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.into(), durable_queue, arguments)
        .await
        .with_context(|| {
            format!(
                "declare quorum queue {queue} (if it exists with other arguments, delete it or change RTM_COMMAND_QUEUE)"
            )
        })?;
    channel
        .queue_bind(
            queue.into(),
            cfg.command_exchange.as_str().into(),
            binding.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("bind queue {queue}"))?;
    Ok(())
}

/// A private (exclusive, auto-delete, server-named) queue, consumed without
/// acks: a watcher's own queue, or a request/reply caller's reply queue.
/// Returns its name and its consumer.
pub async fn private_queue(channel: &Channel) -> anyhow::Result<(String, lapin::Consumer)> {
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .context("declare a private queue")?;
    let consumer = channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            // The queue is the watcher's alone and dies with it: nothing to ack.
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .context("consume the private queue")?;
    Ok((queue.name().to_string(), consumer))
}

/// A [`private_queue`] bound to `event_exchange` with `binding`: how a
/// watcher (`send --wait`, tests) sees outcome events. Subscribe before
/// publishing, so no event is missed.
pub async fn subscribe_events(
    channel: &Channel,
    event_exchange: &str,
    binding: &str,
) -> anyhow::Result<lapin::Consumer> {
    let (queue, consumer) = private_queue(channel).await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            event_exchange.into(),
            binding.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("bind the event queue to {event_exchange} with {binding}"))?;
    Ok(consumer)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listener that never accepts still completes the TCP handshake (the
    /// kernel's backlog does), so the client waits on the AMQP handshake:
    /// the case lapin leaves unbounded.
    #[tokio::test]
    async fn a_silent_broker_fails_the_connect_within_the_limit() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a local port");
        let port = silent.local_addr().expect("local addr").port();
        let url = SecretUrl::new(format!("amqp://guest:secret@127.0.0.1:{port}/%2f"));

        // The outer bound only keeps a regression from hanging the suite.
        let attempt = connect_within(&url, "test", Duration::from_millis(300));
        let err = tokio::time::timeout(Duration::from_secs(30), attempt)
            .await
            .expect("connect_within ignored its limit")
            .expect_err("nothing answers the handshake");

        let message = format!("{err:#}");
        assert!(
            message.contains("no AMQP handshake within 300ms"),
            "{message}"
        );
        assert!(
            !message.contains("secret"),
            "the password leaked: {message}"
        );
        drop(silent);
    }
}
