//! One test's own RabbitMQ topology on the shared broker (every exchange and
//! queue named after a unique id), with queues of its own bound to the
//! events exchange that the test reads with `basic.get`; all of it deleted
//! when the test ends, also when it panics.

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection};
use rtmanager::broker;
use rtmanager::config::{AmqpConfig, SecretUrl};

use crate::harness::{amqp_url, test_amqp, unique};

/// The longest one broker round trip of a test may take: far above what a
/// healthy broker needs, so only a stuck one (a blocked connection, a lost
/// channel) reaches it, and the test fails saying so instead of hanging.
const BROKER_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

pub struct Topology {
    pub amqp: AmqpConfig,
    pub channel: Channel,
    conn: Connection,
    queues: Vec<String>,
}

impl Topology {
    /// Declares the worker's topology under fresh names, as the worker
    /// would (so the test may publish and bind before any worker runs).
    pub async fn new() -> Self {
        let id = unique("r");
        let amqp = test_amqp(&id);
        let conn = broker::connect(&SecretUrl::new(amqp_url()), "rtmanager test")
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        broker::declare_topology(&channel, &amqp).await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Self {
            amqp,
            channel,
            conn,
            queues: Vec::new(),
        }
    }

    /// A durable queue bound to the events exchange with `binding`; with a
    /// `limit`, one at that length that refuses (`nack`s) what does not fit.
    pub async fn queue(&mut self, label: &str, binding: &str, limit: Option<i32>) -> String {
        let name = format!("{}.{label}", self.amqp.event_exchange);
        let mut arguments = FieldTable::default();
        if let Some(limit) = limit {
            arguments.insert("x-max-length".into(), AMQPValue::LongInt(limit));
            arguments.insert(
                "x-overflow".into(),
                AMQPValue::LongString(LongString::from("reject-publish")),
            );
        }
        self.channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .unwrap();
        self.channel
            .queue_bind(
                name.as_str().into(),
                self.amqp.event_exchange.as_str().into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        self.queues.push(name.clone());
        name
    }

    /// Publishes `body` through `exchange` with `routing_key` and checks the
    /// broker confirmed it, within [`BROKER_WAIT`]: a broker that blocks
    /// publishers (a resource alarm) or a lost connection fails the test
    /// instead of hanging it.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) {
        let confirmed = async {
            self.channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    body,
                    properties,
                )
                .await
                .unwrap()
                .await
                .unwrap()
        };
        let confirm = tokio::time::timeout(BROKER_WAIT, confirmed)
            .await
            .unwrap_or_else(|_| {
                panic!("publish to {exchange:?} ({routing_key}): no confirm within {BROKER_WAIT:?}")
            });
        assert!(
            matches!(confirm, lapin::Confirmation::Ack(None)),
            "{confirm:?}"
        );
    }

    /// Puts a message straight into `queue` (through the default exchange).
    pub async fn put(&self, queue: &str, body: &[u8]) {
        let properties = BasicProperties::default().with_message_id("filler".into());
        self.publish("", queue, body, properties).await;
    }

    /// Takes every message waiting in `queue`; returns their message ids
    /// (an event's is its event_id) and bodies.
    pub async fn drain_messages(&self, queue: &str) -> Vec<(String, Vec<u8>)> {
        let mut messages = Vec::new();
        loop {
            let got = self
                .channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: true });
            let Some(message) = tokio::time::timeout(BROKER_WAIT, got)
                .await
                .unwrap_or_else(|_| {
                    panic!("basic.get on {queue}: no answer within {BROKER_WAIT:?}")
                })
                .unwrap()
            else {
                break;
            };
            let id = message.delivery.properties.message_id().clone();
            messages.push((
                id.map(|id| id.to_string()).unwrap_or_default(),
                message.delivery.data,
            ));
        }
        messages
    }

    /// The message ids [`drain_messages`](Self::drain_messages) takes.
    pub async fn drain(&self, queue: &str) -> Vec<String> {
        let messages = self.drain_messages(queue).await;
        messages.into_iter().map(|(id, _)| id).collect()
    }

    /// Messages ready in `queue` (delivered, unacknowledged ones are not
    /// counted) and its consumers, as the broker has them.
    pub async fn depth(&self, queue: &str) -> (u32, u32) {
        let declared = declared_queue(&self.conn, queue)
            .await
            .expect("the queue exists");
        (declared.message_count(), declared.consumer_count())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.queues);
        delete_topology(self.amqp.clone(), SecretUrl::new(amqp_url()), queues);
    }
}

/// `queue` as the broker has it (passive declare), `None` if it does not
/// exist. A fresh channel each time: a passive declare's failure closes it.
pub async fn declared_queue(conn: &Connection, queue: &str) -> Option<lapin::Queue> {
    let channel = conn.create_channel().await.ok()?;
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .ok()?;
    let _ = channel.close(200, "probe".into()).await;
    Some(declared)
}

/// Deletes a test's durable topology (its exchanges, the command and dead
/// letter queues, and `extra_queues`) from a helper thread with its own
/// runtime, so it goes away even when the test panics: async drop is not a
/// thing. Shared by every test that declares a topology of its own.
pub fn delete_topology(amqp: AmqpConfig, url: SecretUrl, extra_queues: Vec<String>) {
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let Ok(conn) = broker::connect(&url, "rtmanager test cleanup").await else {
                return;
            };
            let Ok(ch) = conn.create_channel().await else {
                return;
            };
            // The queues of the nodes tests run as (SPEC §12).
            let node_queues =
                ["n1", "n2", "n3"].map(|node| format!("{}.node.{node}", amqp.command_queue));
            for queue in extra_queues
                .iter()
                .chain([&amqp.command_queue, &amqp.dead_letter_queue])
                .chain(&node_queues)
            {
                let _ = ch
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            for exchange in [
                &amqp.command_exchange,
                &amqp.event_exchange,
                &amqp.dead_letter_exchange,
            ] {
                let _ = ch
                    .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
            let _ = conn.close(200, "bye".into()).await;
        });
    })
    .join();
}
