//! The RabbitMQ topology of SPEC §6, declared by the worker (and by the CLI
//! before it publishes), and the connection settings both use.
//!
//! ```text
//! rtmanager.commands (topic) --runtime.#--> rtmanager.commands (quorum queue)
//!        x-delivery-limit, x-dead-letter-exchange = rtmanager.dlx
//! rtmanager.dlx (fanout) --> rtmanager.dead-letters (durable queue)
//! rtmanager.events (topic)   <- outcome events, runtime.<op>.<outcome>
//! ```

use anyhow::Context as _;
use lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::config::{AmqpConfig, SecretUrl};

/// The header carrying why the worker dead-lettered a message itself.
pub const REJECT_REASON_HEADER: &str = "x-rtm-reject-reason";
/// The binding of the command queue: every `runtime.<op>`.
pub const COMMAND_BINDING: &str = "runtime.#";

/// Connects to the broker; `name` shows in the management UI.
pub async fn connect(url: &SecretUrl, name: &str) -> anyhow::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url.expose(), properties)
        .await
        .with_context(|| format!("cannot connect to RabbitMQ at {url}"))
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
    channel
        .queue_declare(cfg.command_queue.as_str().into(), durable_queue, arguments)
        .await
        .with_context(|| {
            format!(
                "declare quorum queue {} (if it exists with other arguments, delete it or change RTM_COMMAND_QUEUE)",
                cfg.command_queue
            )
        })?;
    channel
        .queue_bind(
            cfg.command_queue.as_str().into(),
            cfg.command_exchange.as_str().into(),
            COMMAND_BINDING.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("bind queue {}", cfg.command_queue))?;

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
