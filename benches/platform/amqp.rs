//! The bench's side of RabbitMQ: a publisher of commands as the lobby
//! sends them (SPEC §6, publisher confirms), and an observer queue bound to
//! the event exchange with `#` that matches each outer event to its
//! command by `command_id` and takes every event's commit → received time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use chrono::{DateTime, Utc};
use futures_util::StreamExt as _;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, PublisherConfirm};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::rig::{Names, amqp_url};
use crate::say;

/// A command body as the lobby would publish it, with a fresh command_id.
pub fn command(op: &str, game: &str, image: Option<&str>) -> (String, Vec<u8>) {
    let id = uuid::Uuid::new_v4().to_string();
    let mut body = json!({
        "command_id": id,
        "op": op,
        "game_id": game,
        "op_source": "lobby",
        "requested_at": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    });
    match (op, image) {
        ("start", Some(image)) => body["image_ref"] = json!(image),
        ("patch", Some(image)) => body["new_image_ref"] = json!(image),
        _ => {}
    }
    (id, serde_json::to_vec(&body).expect("a command serializes"))
}

pub struct Publisher {
    _conn: Connection,
    channel: Channel,
    exchange: String,
}

impl Publisher {
    pub async fn connect(names: &Names) -> anyhow::Result<Self> {
        let conn = Connection::connect(
            &amqp_url(),
            ConnectionProperties::default()
                .with_connection_name("rtmanager bench publisher".into()),
        )
        .await
        .context("connect the publisher")?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self {
            _conn: conn,
            channel,
            exchange: names.command_exchange.clone(),
        })
    }

    /// Publishes one command (`runtime.<op>`, persistent); the confirm is
    /// returned to be awaited with [`confirmed`].
    pub async fn publish(
        &self,
        op: &str,
        command_id: &str,
        body: &[u8],
    ) -> anyhow::Result<PublisherConfirm> {
        self.channel
            .basic_publish(
                self.exchange.as_str().into(),
                format!("runtime.{op}").as_str().into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_message_id(command_id.into())
                    .with_delivery_mode(2),
            )
            .await
            .context("publish a command")
    }
}

/// Waits for a publish's confirm; anything but a plain ack is an error.
pub async fn confirmed(confirm: PublisherConfirm) -> anyhow::Result<()> {
    match confirm.await.context("the publish confirm")? {
        lapin::Confirmation::Ack(None) => Ok(()),
        other => bail!("the broker did not take a command: {other:?}"),
    }
}

/// An outer event as the observer received it.
#[derive(Debug, Clone)]
pub struct Got {
    pub at: Instant,
    pub outcome: String,
    pub error_code: Option<String>,
    pub container_id: Option<String>,
}

impl Got {
    pub fn success(&self) -> bool {
        self.outcome == "success"
    }

    pub fn code(&self) -> &str {
        self.error_code.as_deref().unwrap_or(&self.outcome)
    }
}

/// One event's commit → received latency (ms), with the tag of the phase
/// its command was published in.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub tag: u32,
    pub ms: f64,
}

#[derive(Default)]
struct HubState {
    waiting: HashMap<String, oneshot::Sender<Got>>,
    tags: HashMap<String, u32>,
    samples: Vec<Sample>,
}

/// The observer: one exclusive queue bound to the event exchange with `#`.
pub struct Hub {
    state: Mutex<HubState>,
    /// Outer events received, all commands together (for progress lines).
    pub outer_seen: AtomicUsize,
    /// Events of commands the bench did not publish (should stay 0).
    pub foreign: AtomicUsize,
}

impl Hub {
    pub async fn start(names: &Names) -> anyhow::Result<Arc<Self>> {
        let conn = Connection::connect(
            &amqp_url(),
            ConnectionProperties::default().with_connection_name("rtmanager bench observer".into()),
        )
        .await
        .context("connect the observer")?;
        let channel = conn.create_channel().await?;
        channel
            .queue_declare(
                names.observer_queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("declare the observer queue")?;
        channel
            .queue_bind(
                names.observer_queue.as_str().into(),
                names.event_exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("bind the observer queue to the event exchange")?;
        let mut consumer = channel
            .basic_consume(
                names.observer_queue.as_str().into(),
                "bench-observer".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("consume the observer queue")?;
        let hub = Arc::new(Self {
            state: Mutex::new(HubState::default()),
            outer_seen: AtomicUsize::new(0),
            foreign: AtomicUsize::new(0),
        });
        let me = hub.clone();
        tokio::spawn(async move {
            let _conn = conn;
            while let Some(delivery) = consumer.next().await {
                // Both clocks first, before any parsing.
                let at = Instant::now();
                let wall = Utc::now();
                let delivery = match delivery {
                    Ok(d) => d,
                    Err(e) => {
                        say(&format!("observer: {e}"));
                        return;
                    }
                };
                let Ok(event) = serde_json::from_slice::<Value>(&delivery.data) else {
                    me.foreign.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                me.take(&event, delivery.routing_key.as_str(), at, wall);
            }
            say("observer: the consumer ended");
        });
        Ok(hub)
    }

    fn take(&self, event: &Value, routing_key: &str, at: Instant, wall: DateTime<Utc>) {
        let text = |k: &str| event.get(k).and_then(Value::as_str).map(str::to_owned);
        let Some(command_id) = text("command_id") else {
            self.foreign.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let outer =
            event.get("outer_op").is_none_or(Value::is_null) && routing_key != "runtime.rejected";
        let latency = text("finished_at")
            .and_then(|f| DateTime::parse_from_rfc3339(&f).ok())
            .map(|f| {
                (wall - f.with_timezone(&Utc))
                    .num_microseconds()
                    .unwrap_or(i64::MAX) as f64
                    / 1000.0
            });
        let mut state = self.state.lock().unwrap();
        let Some(&tag) = state.tags.get(&command_id) else {
            self.foreign.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if let Some(ms) = latency {
            state.samples.push(Sample { tag, ms });
        }
        if outer {
            self.outer_seen.fetch_add(1, Ordering::Relaxed);
            if let Some(tx) = state.waiting.remove(&command_id) {
                let _ = tx.send(Got {
                    at,
                    outcome: text("outcome").unwrap_or_default(),
                    error_code: text("error_code"),
                    container_id: text("container_id"),
                });
            }
        }
    }

    /// Expects the outer event of `command_id` (call before publishing).
    pub fn expect(&self, command_id: &str, tag: u32) -> oneshot::Receiver<Got> {
        let (tx, rx) = oneshot::channel();
        let mut state = self.state.lock().unwrap();
        state.tags.insert(command_id.to_owned(), tag);
        state.waiting.insert(command_id.to_owned(), tx);
        rx
    }

    /// The latencies of every event of commands published under `tag`.
    pub fn samples(&self, tag: u32) -> Vec<Sample> {
        self.state
            .lock()
            .unwrap()
            .samples
            .iter()
            .filter(|s| s.tag == tag)
            .copied()
            .collect()
    }
}

/// Waits for every outer event, printing progress; fails after `within`.
pub async fn wait_all(
    hub: &Hub,
    receivers: Vec<oneshot::Receiver<Got>>,
    within: Duration,
    what: &str,
) -> anyhow::Result<Vec<Got>> {
    let total = receivers.len();
    let done = Arc::new(AtomicUsize::new(0));
    let all = futures_util::future::join_all(receivers.into_iter().map(|rx| {
        let done = done.clone();
        async move {
            let got = rx.await;
            done.fetch_add(1, Ordering::Relaxed);
            got
        }
    }));
    tokio::pin!(all);
    let deadline = tokio::time::Instant::now() + within;
    let mut tick = tokio::time::interval(Duration::from_secs(3));
    tick.tick().await;
    loop {
        tokio::select! {
            results = &mut all => {
                return results
                    .into_iter()
                    .map(|r| r.context("the observer stopped"))
                    .collect();
            }
            _ = tick.tick() => say(&format!("{what}: {}/{total} outcomes", done.load(Ordering::Relaxed))),
            _ = tokio::time::sleep_until(deadline) => {
                bail!(
                    "{what}: only {}/{total} outcomes within {within:?} (observer saw {} outer events in all, {} foreign)",
                    done.load(Ordering::Relaxed),
                    hub.outer_seen.load(Ordering::Relaxed),
                    hub.foreign.load(Ordering::Relaxed)
                );
            }
        }
    }
}

/// Publishes one command and waits for its outer event: (publish → outer
/// event, the event).
pub async fn round_trip(
    hub: &Hub,
    publisher: &Publisher,
    op: &str,
    game: &str,
    image: Option<&str>,
    tag: u32,
    within: Duration,
) -> anyhow::Result<(Duration, Got)> {
    let (id, body) = command(op, game, image);
    let rx = hub.expect(&id, tag);
    let t0 = Instant::now();
    let confirm = publisher.publish(op, &id, &body).await?;
    confirmed(confirm).await?;
    let got = tokio::time::timeout(within, rx)
        .await
        .with_context(|| format!("{op} of {game}: no outcome within {within:?}"))?
        .context("the observer stopped")?;
    Ok((got.at - t0, got))
}
