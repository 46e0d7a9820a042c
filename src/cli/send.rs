//! `rtmanager send <op> …`: publishes one lifecycle command to the command
//! exchange, with a publisher confirm, and with `--wait` follows its outcome
//! events until the outer one arrives.
//!
//! With `--wait` the event queue (exclusive, auto-delete, server-named,
//! bound to `runtime.#` on the event exchange) is declared and consumed
//! *before* the command is published, so no event can slip past between the
//! publish and the subscription.

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use anyhow::{Context as _, bail};
use chrono::Utc;
use clap::builder::PossibleValuesParser;
use clap::{Args, Subcommand};
use futures_util::StreamExt as _;
use lapin::options::ConfirmSelectOptions;
use lapin::{BasicProperties, Channel, Connection};
use serde::Deserialize;
use uuid::Uuid;

use super::Exit;
use super::output::{Style, event_line, human_duration};
use crate::broker::{self, Outgoing, PublishError};
use crate::config::Config;
use crate::domain::{GameId, ImageRef, NodeName, OpKind, OpSource, OutcomeEvent, StopReason};
use crate::messages::CommandMessage;

/// The binding of the `--wait` queue: every outcome event, so inner steps
/// (`runtime.patch.stop.success`) and rejections (`runtime.rejected`) are
/// seen too. Filtering happens here, by correlation and command id.
const EVENT_BINDING: &str = "runtime.#";

#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct SendArgs {
    #[command(subcommand)]
    pub op: SendOp,

    /// The caller's reference; it becomes the correlation id of every event
    /// of this command (else the command id does).
    #[arg(long, global = true, value_name = "REF", value_parser = non_empty)]
    pub source_ref: Option<String>,

    /// Who sends the command.
    #[arg(
        long,
        global = true,
        default_value = "admin",
        value_name = "SOURCE",
        value_parser = PossibleValuesParser::new(OpSource::ALL.iter().map(|s| s.as_str()))
    )]
    pub op_source: String,

    /// The idempotency key [default: a fresh UUID v7].
    #[arg(long, global = true, value_name = "ID", value_parser = non_empty)]
    pub command_id: Option<String>,

    /// Wait for the outcome, printing each event of the command as it
    /// arrives; exit 0 on success, 1 on failure, 2 on timeout.
    #[arg(long, global = true)]
    pub wait: bool,

    /// How long --wait waits for the outer outcome (e.g. 30s, 2m, 1m30s).
    #[arg(long, global = true, default_value = "120s", value_name = "DURATION", value_parser = positive_duration)]
    pub timeout: Duration,

    /// Print JSON on stdout: the command body, or with --wait each event
    /// body exactly as published, one per line.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum SendOp {
    /// Start a game's engine (creates the game if unknown).
    Start {
        /// The game, e.g. g-1042
        #[arg(value_parser = game_id)]
        game_id: String,
        /// The engine image, e.g. registry.example:5000/galaxy/engine:1.4.2
        #[arg(value_parser = image_ref)]
        image_ref: String,
        /// The node to place a new game on [default: placement chooses]
        #[arg(long, value_name = "NODE", value_parser = node_name)]
        node: Option<String>,
    },
    /// Stop a game's container (keeps it).
    Stop {
        /// The game, e.g. g-1042
        #[arg(value_parser = game_id)]
        game_id: String,
        /// Why the game is stopped [the worker's default: lobby_request].
        #[arg(
            long,
            value_name = "REASON",
            value_parser = PossibleValuesParser::new(StopReason::ALL.iter().map(|r| r.as_str()))
        )]
        reason: Option<String>,
    },
    /// Stop, remove and start again with the current image.
    Restart {
        /// The game, e.g. g-1042
        #[arg(value_parser = game_id)]
        game_id: String,
    },
    /// Restart with a new image of the same major.minor series.
    Patch {
        /// The game, e.g. g-1042
        #[arg(value_parser = game_id)]
        game_id: String,
        /// The new engine image: same repository line, a semver patch release
        #[arg(value_parser = image_ref)]
        new_image_ref: String,
    },
    /// Stop and remove the container (the state directory is kept).
    Remove {
        /// The game, e.g. g-1042
        #[arg(value_parser = game_id)]
        game_id: String,
    },
}

impl SendOp {
    pub fn kind(&self) -> OpKind {
        match self {
            SendOp::Start { .. } => OpKind::Start,
            SendOp::Stop { .. } => OpKind::Stop,
            SendOp::Restart { .. } => OpKind::Restart,
            SendOp::Patch { .. } => OpKind::Patch,
            SendOp::Remove { .. } => OpKind::Remove,
        }
    }

    pub fn game_id(&self) -> &str {
        match self {
            SendOp::Start { game_id, .. }
            | SendOp::Stop { game_id, .. }
            | SendOp::Restart { game_id }
            | SendOp::Patch { game_id, .. }
            | SendOp::Remove { game_id } => game_id,
        }
    }
}

impl SendArgs {
    /// Plain arguments for `op` (library callers and tests): `admin`, a
    /// fresh command id, no waiting, human output, a 120 s timeout.
    pub fn new(op: SendOp) -> Self {
        Self {
            op,
            source_ref: None,
            op_source: OpSource::Admin.as_str().to_owned(),
            command_id: None,
            wait: false,
            timeout: Duration::from_secs(120),
            json: false,
        }
    }

    /// The body to publish, with `command_id` fixed by the caller.
    pub fn message(&self, command_id: &str) -> CommandMessage {
        let node = match &self.op {
            SendOp::Start { node, .. } => node.clone(),
            _ => None,
        };
        let (image_ref, new_image_ref, reason) = match &self.op {
            SendOp::Start { image_ref, .. } => (Some(image_ref.clone()), None, None),
            SendOp::Patch { new_image_ref, .. } => (None, Some(new_image_ref.clone()), None),
            SendOp::Stop { reason, .. } => (None, None, reason.clone()),
            SendOp::Restart { .. } | SendOp::Remove { .. } => (None, None, None),
        };
        CommandMessage {
            command_id: command_id.to_owned(),
            op: self.op.kind(),
            game_id: self.op.game_id().to_owned(),
            image_ref,
            new_image_ref,
            op_source: self.op_source.clone(),
            source_ref: self.source_ref.clone().filter(|r| !r.is_empty()),
            reason,
            node,
            requested_at: Utc::now(),
        }
    }
}

/// The correlation id the worker gives every event of a command: its
/// `source_ref`, else its `command_id` (SPEC §6).
pub fn correlation_of(message: &CommandMessage) -> &str {
    message
        .source_ref
        .as_deref()
        .filter(|r| !r.is_empty())
        .unwrap_or(&message.command_id)
}

/// `--wait` gave up before the outer event arrived.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "timed out after {} waiting for the outer {op} event of game {game_id} \
     (command {command_id}, correlation {correlation_id}; {events_seen} event(s) of it seen so far). \
     The command may still be queued or running: see `rtmanager log {game_id} --correlation {correlation_id}`",
    human_duration(*.waited)
)]
pub struct WaitTimeout {
    pub waited: Duration,
    pub op: OpKind,
    pub game_id: String,
    pub command_id: String,
    pub correlation_id: String,
    pub events_seen: usize,
}

/// Publishes the command and, with `--wait`, follows its events; plain
/// output (no colours, UTC times) on `out`.
pub async fn send(config: &Config, args: SendArgs, out: &mut impl Write) -> anyhow::Result<Exit> {
    send_styled(config, args, Style::plain(), out).await
}

/// [`send`] with the given output style (the binary passes
/// [`Style::detect`]).
pub async fn send_styled(
    config: &Config,
    args: SendArgs,
    style: Style,
    out: &mut impl Write,
) -> anyhow::Result<Exit> {
    let command_id = args
        .command_id
        .clone()
        .unwrap_or_else(|| Uuid::now_v7().to_string());
    let message = args.message(&command_id);

    let connection = broker::connect(&config.amqp_url, "rtmanager send").await?;
    let result = publish_and_wait(&connection, config, &args, &message, style, out).await;
    // Closing also deletes the exclusive event queue; a failure to close
    // changes nothing the caller cares about.
    let _ = connection.close(200, "done".into()).await;
    result
}

async fn publish_and_wait(
    connection: &Connection,
    config: &Config,
    args: &SendArgs,
    message: &CommandMessage,
    style: Style,
    out: &mut impl Write,
) -> anyhow::Result<Exit> {
    let channel = connection
        .create_channel()
        .await
        .context("open a broker channel")?;
    broker::declare_topology(&channel, &config.amqp).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .context("enable publisher confirms")?;

    // Subscribe before publishing: the outcome may be faster than us.
    let events = if args.wait {
        Some(subscribe(&channel, &config.amqp.event_exchange).await?)
    } else {
        None
    };

    let body = serde_json::to_vec(message).context("encode the command")?;
    publish(&channel, &config.amqp.command_exchange, message, &body).await?;

    let correlation_id = correlation_of(message);
    let sent = format!(
        "sent {} {} (command {}, correlation {correlation_id})",
        message.op, message.game_id, message.command_id
    );
    let Some(events) = events else {
        if args.json {
            out.write_all(&body)?;
            writeln!(out)?;
        } else {
            writeln!(out, "{sent}")?;
        }
        out.flush()?;
        return Ok(Exit::Success);
    };

    if args.json {
        // stdout carries only events; progress goes to stderr.
        eprintln!("{sent}; waiting up to {}", human_duration(args.timeout));
    } else {
        writeln!(out, "{sent}")?;
        out.flush()?;
    }
    let mut waiter = Waiter::new(message);
    let deadline = tokio::time::Instant::now() + args.timeout;
    let mut events = events;
    loop {
        let delivery = match tokio::time::timeout_at(deadline, events.next()).await {
            Err(_elapsed) => {
                return Err(WaitTimeout {
                    waited: args.timeout,
                    op: message.op,
                    game_id: message.game_id.clone(),
                    command_id: message.command_id.clone(),
                    correlation_id: correlation_id.to_owned(),
                    events_seen: waiter.seen(),
                }
                .into());
            }
            Ok(None) => {
                bail!("the broker cancelled the event subscription before the outcome arrived")
            }
            Ok(Some(Err(e))) => return Err(e).context("receive outcome events"),
            Ok(Some(Ok(delivery))) => delivery,
        };
        let property = delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str());
        let Some(seen) = waiter.offer(&delivery.data, property) else {
            continue;
        };
        if args.json {
            out.write_all(&delivery.data)?;
            writeln!(out)?;
        } else {
            match serde_json::from_slice::<OutcomeEvent>(&delivery.data) {
                Ok(event) => writeln!(out, "{}", event_line(&event, &style))?,
                Err(e) => {
                    eprintln!(
                        "rtmanager: an event on {} does not match the event schema ({e}): {}",
                        delivery.routing_key,
                        String::from_utf8_lossy(&delivery.data)
                    );
                }
            }
        }
        out.flush()?;
        if let Some(exit) = seen.finished {
            return Ok(exit);
        }
    }
}

/// Declares the private event queue, binds it and starts consuming it.
async fn subscribe(channel: &Channel, event_exchange: &str) -> anyhow::Result<lapin::Consumer> {
    broker::subscribe_events(channel, event_exchange, EVENT_BINDING).await
}

/// Publishes persistently to `runtime.<op>` and waits for the broker's
/// confirm. Mandatory: a command no queue would receive is an error, not a
/// silent loss.
async fn publish(
    channel: &Channel,
    exchange: &str,
    message: &CommandMessage,
    body: &[u8],
) -> anyhow::Result<()> {
    let routing_key = format!("runtime.{}", message.op);
    let timestamp = u64::try_from(message.requested_at.timestamp()).unwrap_or_default();
    let properties = BasicProperties::default()
        .with_message_id(message.command_id.as_str().into())
        .with_content_type("application/json".into())
        .with_delivery_mode(broker::PERSISTENT)
        .with_timestamp(timestamp)
        .with_app_id("rtmanager-cli".into());
    let command = Outgoing {
        exchange,
        routing_key: routing_key.as_str().into(),
        mandatory: true,
        body,
        properties,
    };
    match broker::publish_confirmed(channel, command).await {
        Ok(()) => Ok(()),
        Err(PublishError::Returned) => bail!(
            "no queue is bound to {exchange} for {routing_key}: the broker returned the command"
        ),
        Err(PublishError::Nacked) => {
            bail!("the broker refused the command (nack) on {exchange} with {routing_key}")
        }
        Err(PublishError::Unconfirmed) => {
            bail!("the broker did not confirm the command (confirms not enabled)")
        }
        Err(PublishError::Link(e)) => Err(e).with_context(|| {
            format!("publish the command to {exchange} with {routing_key} and wait for the broker's confirm")
        }),
    }
}

/// The parts of an event body the waiter needs; read leniently so a body
/// that does not fully decode as an [`OutcomeEvent`] can still be matched.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct EventHead {
    event_id: Option<String>,
    command_id: Option<String>,
    correlation_id: Option<String>,
    outer_op: Option<String>,
    outcome: Option<String>,
}

/// What the waiter made of one matching event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// `Some` when this was the command's outer event: the exit it means.
    pub finished: Option<Exit>,
}

/// Decides which events belong to the command and when it is done.
#[derive(Debug)]
pub struct Waiter {
    command_id: String,
    correlation_id: String,
    /// event_ids already shown: the outbox relay publishes at least once.
    shown: HashSet<String>,
}

impl Waiter {
    pub fn new(message: &CommandMessage) -> Self {
        Self {
            command_id: message.command_id.clone(),
            correlation_id: correlation_of(message).to_owned(),
            shown: HashSet::new(),
        }
    }

    /// How many distinct events of the command were shown.
    pub fn seen(&self) -> usize {
        self.shown.len()
    }

    /// Looks at one event body (and its AMQP `correlation_id` property):
    /// `None` when it is not ours (or a repeat), else whether it ends the
    /// wait.
    ///
    /// Ours: its correlation id (the property or the body's) is the
    /// command's, or its command_id is (that catches a `runtime.rejected`
    /// event, whose correlation may be the bare command id). The end: the
    /// command's outer event — `outer_op` null and the same command_id — a
    /// success exits 0, anything else 1.
    pub fn offer(&mut self, body: &[u8], correlation_property: Option<&str>) -> Option<Seen> {
        let head: EventHead = serde_json::from_slice(body).ok()?;
        let ours_by_correlation = correlation_property == Some(self.correlation_id.as_str())
            || head.correlation_id.as_deref() == Some(self.correlation_id.as_str());
        let same_command = head.command_id.as_deref() == Some(self.command_id.as_str());
        if !(ours_by_correlation || same_command) {
            return None;
        }
        if let Some(event_id) = head.event_id
            && !self.shown.insert(event_id)
        {
            return None;
        }
        let finished = (same_command && head.outer_op.is_none()).then(|| {
            if head.outcome.as_deref() == Some("success") {
                Exit::Success
            } else {
                Exit::Failure
            }
        });
        Some(Seen { finished })
    }
}

// clap value parsers: reject what the worker would refuse before anything
// is published.

fn non_empty(raw: &str) -> Result<String, String> {
    if raw.trim().is_empty() {
        Err("must not be empty".into())
    } else if !crate::messages::is_identifier(raw) {
        // It travels as an AMQP short string (message_id, correlation_id),
        // and the worker refuses what would not.
        Err(format!(
            "must be at most {} bytes, without control characters",
            crate::messages::MAX_IDENTIFIER_BYTES
        ))
    } else {
        Ok(raw.to_owned())
    }
}

fn node_name(raw: &str) -> Result<String, String> {
    NodeName::parse(raw).map(|_| raw.to_owned())
}

fn game_id(raw: &str) -> Result<String, String> {
    GameId::parse(raw)
        .map(|_| raw.to_owned())
        .map_err(|e| e.to_string())
}

fn image_ref(raw: &str) -> Result<String, String> {
    ImageRef::parse(raw)
        .map(|_| raw.to_owned())
        .map_err(|e| e.to_string())
}

fn positive_duration(raw: &str) -> Result<Duration, String> {
    match crate::config::parse_duration(raw)? {
        d if d.is_zero() => Err("must be longer than 0".into()),
        d => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn patch_args() -> SendArgs {
        SendArgs::new(SendOp::Patch {
            game_id: "g-1042".into(),
            new_image_ref: "rtm-test/engine:1.4.3".into(),
        })
    }

    #[test]
    fn the_message_carries_the_op_fields() {
        let mut args = patch_args();
        args.source_ref = Some("lobby-req-77".into());
        let m = args.message("c-1");
        let body = serde_json::to_value(&m).unwrap();
        assert_eq!(body["op"], "patch");
        assert_eq!(body["game_id"], "g-1042");
        assert_eq!(body["new_image_ref"], "rtm-test/engine:1.4.3");
        assert_eq!(body["op_source"], "admin");
        assert_eq!(body["source_ref"], "lobby-req-77");
        assert!(body.get("image_ref").is_none());
        assert_eq!(correlation_of(&m), "lobby-req-77");

        let stop = SendArgs::new(SendOp::Stop {
            game_id: "g".into(),
            reason: Some("idle".into()),
        })
        .message("c-2");
        assert_eq!(stop.reason.as_deref(), Some("idle"));
        assert_eq!(
            correlation_of(&stop),
            "c-2",
            "no source_ref: the command id"
        );
    }

    fn event(
        command_id: &str,
        correlation: &str,
        outer_op: Option<&str>,
        outcome: &str,
    ) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "event_id": Uuid::new_v4().to_string(),
            "command_id": command_id,
            "correlation_id": correlation,
            "outer_op": outer_op,
            "outcome": outcome,
        }))
        .unwrap()
    }

    #[test]
    fn the_waiter_follows_one_command() {
        let mut args = patch_args();
        args.source_ref = Some("req-77".into());
        let mut w = Waiter::new(&args.message("c-1"));
        let not_done = Some(Seen { finished: None });

        // Another command, another correlation: not ours.
        assert_eq!(
            w.offer(&event("c-2", "req-78", None, "success"), None),
            None
        );
        // Inner steps of ours.
        assert_eq!(
            w.offer(&event("c-1", "req-77", Some("patch"), "success"), None),
            not_done
        );
        // The correlation as an AMQP property only.
        assert_eq!(
            w.offer(&event("c-1", "", Some("patch"), "failure"), Some("req-77")),
            not_done
        );
        // Another command of the same correlation is shown, but does not end the wait.
        assert_eq!(
            w.offer(&event("c-0", "req-77", None, "success"), None),
            not_done
        );
        // Not JSON at all: ignored.
        assert_eq!(w.offer(b"\xff", Some("req-77")), None);
        // The outer event ends it.
        assert_eq!(
            w.offer(&event("c-1", "req-77", None, "success"), None),
            Some(Seen {
                finished: Some(Exit::Success)
            })
        );
        assert_eq!(w.seen(), 4);
    }

    #[test]
    fn failures_rejections_and_repeats() {
        let mut w = Waiter::new(&patch_args().message("c-1"));
        assert_eq!(
            w.offer(&event("c-1", "c-1", None, "failure"), None),
            Some(Seen {
                finished: Some(Exit::Failure)
            })
        );

        // A runtime.rejected event names the command, whatever its correlation.
        let mut w = Waiter::new(&patch_args().message("c-3"));
        let rejected = serde_json::to_vec(&json!({
            "event_id": "e-1", "command_id": "c-3", "correlation_id": "whatever",
            "op": null, "outer_op": null, "outcome": "failure",
            "error_code": "invalid_request",
        }))
        .unwrap();
        assert_eq!(
            w.offer(&rejected, None),
            Some(Seen {
                finished: Some(Exit::Failure)
            })
        );
        // The relay may publish an event twice: shown once.
        assert_eq!(w.offer(&rejected, None), None);
    }
}
