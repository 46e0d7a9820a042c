//! Wire messages (SPEC §6): decoding a command body into a
//! [`CommandRequest`], and the command body the CLI sends.
//! `schemas/command.schema.json` describes the same shape; the contract
//! tests hold the two together.
//!
//! Two kinds of bad input, handled differently:
//! - a body that cannot be decoded at all (too big, not UTF-8, not JSON, not
//!   an object, a missing or unknown `op`) is [`Undecodable`]: the consumer
//!   dead-letters it;
//! - a body that decodes but fails validation (a missing `game_id`, a field of
//!   the wrong type, an unknown `op_source`, …) becomes a request the
//!   lifecycle answers with `invalid_request`, like any other failure.

use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::domain::command::echo_cut;
use crate::domain::{CommandRequest, OpKind, ReplyTo};

/// The largest command body accepted.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// AMQP properties the decoder reads.
#[derive(Debug, Clone, Default)]
pub struct Envelope {
    pub message_id: Option<String>,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
}

/// The envelope the decoder reads from a delivery's properties: only these
/// three. Nothing else a publisher sets is trusted (the delivery count, for
/// one, is the broker's; see the consumer's session).
impl From<&BasicProperties> for Envelope {
    fn from(props: &BasicProperties) -> Self {
        Envelope {
            message_id: props.message_id().as_ref().map(ToString::to_string),
            reply_to: props.reply_to().as_ref().map(ToString::to_string),
            correlation_id: props.correlation_id().as_ref().map(ToString::to_string),
        }
    }
}

/// A body that is not a command at all, with what could still be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undecodable {
    pub reason: String,
    /// The body's `command_id`, else the AMQP `message_id`.
    pub command_id: Option<String>,
    pub op: Option<String>,
    pub game_id: Option<String>,
    pub source_ref: Option<String>,
}

/// The op a command may ask for: a known op, but not `exit`.
fn command_op(raw: &str) -> Option<OpKind> {
    OpKind::parse(raw).filter(|op| op.is_command())
}

/// Decodes a command body (SPEC §6).
pub fn decode_command(body: &[u8], envelope: &Envelope) -> Result<CommandRequest, Undecodable> {
    let undecodable = |reason: String, object: Option<&Map<String, Value>>| {
        // Only values that can travel in an event and an AMQP property.
        let raw = |key: &str| object.and_then(|o| o.get(key)).and_then(Value::as_str);
        let identifier = |key: &str| raw(key).filter(|s| is_identifier(s)).map(str::to_owned);
        let echo = |key: &str| raw(key).map(echo_text);
        Undecodable {
            reason,
            command_id: identifier("command_id")
                .or_else(|| envelope.message_id.clone().filter(|id| is_identifier(id))),
            op: echo("op"),
            game_id: echo("game_id"),
            source_ref: identifier("source_ref"),
        }
    };

    if body.len() > MAX_COMMAND_BYTES {
        return Err(undecodable(
            format!("message is {} bytes, over the 64 KiB limit", body.len()),
            None,
        ));
    }
    let text = std::str::from_utf8(body)
        .map_err(|e| undecodable(format!("message is not UTF-8: {e}"), None))?;
    let value: Value = serde_json::from_str(text)
        .map_err(|e| undecodable(format!("message is not JSON: {e}"), None))?;
    let Value::Object(object) = value else {
        return Err(undecodable(
            format!("message is a JSON {}, not an object", json_type(&value)),
            None,
        ));
    };
    // An outcome event carries an `op` and a `command_id` too: taken for a
    // command it would be answered, and the answer could come back the same
    // way. It is dead-lettered, and with no command_id echoed no event
    // answers it (SPEC §6, issue 10).
    if object.contains_key("event_id") && object.contains_key("schema_version") {
        return Err(Undecodable {
            reason: "message is an rtmanager outcome event, not a command".into(),
            command_id: None,
            op: None,
            game_id: None,
            source_ref: None,
        });
    }
    let op = match object.get("op") {
        None | Some(Value::Null) => {
            return Err(undecodable("op is missing".into(), Some(&object)));
        }
        // `exit` is the reconciler's entry, never a command (SPEC §11).
        Some(Value::String(op)) => command_op(op).ok_or_else(|| {
            undecodable(
                format!(
                    "op {:?} is unknown (expected start, stop, restart, patch or remove)",
                    echo_cut(op)
                ),
                Some(&object),
            )
        })?,
        Some(other) => {
            return Err(undecodable(
                format!("op must be a string, not a JSON {}", json_type(other)),
                Some(&object),
            ));
        }
    };

    // From here on the message is a command; a wrongly typed field is a
    // validation failure (`invalid_request`), not a reason to dead-letter.
    let mut problems = Vec::new();
    let mut text = |key: &str| match object.get(key) {
        None | Some(Value::Null) => None,
        // Control characters (NUL above all) cannot be stored in a text
        // column: the value is echoed with them replaced, and refused.
        Some(Value::String(s)) if s.chars().any(char::is_control) => {
            problems.push(format!("{key} must not contain control characters"));
            Some(echo_text(s))
        }
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => {
            problems.push(format!(
                "{key} must be a string, not a JSON {}",
                json_type(other)
            ));
            None
        }
    };
    // The command_id and source_ref have limits of their own (below); every
    // other field is cut to what an echo may hold.
    let command_id = text("command_id");
    let source_ref = text("source_ref");
    let mut echoed = |key: &str| text(key).as_deref().map(echo_cut);
    let game_id = echoed("game_id");
    let image_ref = match op {
        OpKind::Start => echoed("image_ref"),
        OpKind::Patch => echoed("new_image_ref"),
        _ => None,
    };
    let op_source = echoed("op_source");
    let reason = echoed("reason");
    let node = echoed("node");
    let requested_at = echoed("requested_at");
    let requested_at = requested_at.and_then(|raw| match DateTime::parse_from_rfc3339(&raw) {
        Ok(t) => Some(t.with_timezone(&Utc)),
        Err(e) => {
            problems.push(format!("requested_at {raw:?} is not an RFC 3339 time: {e}"));
            None
        }
    });
    // The command_id and the correlation id travel as AMQP properties: at
    // most 255 bytes. A command_id that cannot is no idempotency key at all;
    // a source_ref that cannot is a validation failure.
    let command_id = match command_id.filter(|id| !id.is_empty()) {
        Some(id) if !is_identifier(&id) => {
            return Err(undecodable(
                "command_id must be 1 to 255 bytes without control characters".into(),
                Some(&object),
            ));
        }
        Some(id) => id,
        None => envelope
            .message_id
            .clone()
            .filter(|id| is_identifier(id))
            // Derived from the body, so a redelivery keeps its idempotency
            // key and resumes instead of starting over.
            .unwrap_or_else(|| Uuid::new_v5(&BODY_IDS, body).to_string()),
    };
    let source_ref = match source_ref {
        Some(r) if r.len() > MAX_IDENTIFIER_BYTES => {
            problems.push(format!(
                "source_ref is {} bytes, over the {MAX_IDENTIFIER_BYTES}-byte limit",
                r.len()
            ));
            None
        }
        other => other,
    };
    Ok(CommandRequest {
        command_id,
        op,
        game_id,
        image_ref,
        op_source,
        source_ref,
        // Only a stop has a reason; on other ops it is ignored like an
        // unknown field.
        reason: if op == OpKind::Stop { reason } else { None },
        requested_at,
        reply_to: envelope
            .reply_to
            .clone()
            .filter(|q| !q.is_empty())
            .map(|queue| ReplyTo {
                queue,
                correlation_id: envelope.correlation_id.clone(),
            }),
        malformed: (!problems.is_empty()).then(|| problems.join("; ")),
        // Only a start is placed; on other ops it is ignored like an
        // unknown field (a game never leaves its node).
        node: if op == OpKind::Start { node } else { None },
        refusal: None,
    })
}

/// The namespace of command ids derived from a body without one.
const BODY_IDS: Uuid = Uuid::from_u128(0x8d3e_61a2_47c9_4b0f_9a15_c2e7_3f08_b6d4);

/// The longest command_id or source_ref: they travel as AMQP short strings.
pub const MAX_IDENTIFIER_BYTES: usize = 255;

/// Fits an AMQP short string and a text column: 1 to
/// [`MAX_IDENTIFIER_BYTES`] bytes, no control characters.
pub fn is_identifier(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_IDENTIFIER_BYTES && !s.chars().any(char::is_control)
}

/// A raw value as an event may echo it: control characters (which no text
/// column holds) replaced, cut by [`echo_cut`].
fn echo_text(raw: &str) -> String {
    echo_cut(&raw.replace(char::is_control, "\u{FFFD}"))
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// A command body as the CLI (or any producer) sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommandMessage {
    pub command_id: String,
    pub op: OpKind,
    pub game_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_ref: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_image_ref: Option<String>,
    pub op_source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_ref: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A start's node (SPEC §12).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub requested_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(body: &str) -> Result<CommandRequest, Undecodable> {
        decode_command(body.as_bytes(), &Envelope::default())
    }

    #[test]
    fn decodes_a_patch() {
        let r = decode(
            r#"{"command_id":"c1","op":"patch","game_id":"g-1042",
                "new_image_ref":"registry.example:5000/galaxy/engine:1.4.3",
                "op_source":"lobby","source_ref":"lobby-req-77",
                "requested_at":"2026-11-26T07:00:00Z","extra":{"ignored":true}}"#,
        )
        .unwrap();
        assert_eq!(r.command_id, "c1");
        assert_eq!(r.op, OpKind::Patch);
        assert_eq!(
            r.image_ref.as_deref(),
            Some("registry.example:5000/galaxy/engine:1.4.3")
        );
        assert_eq!(r.correlation_id(), "lobby-req-77");
        assert!(r.malformed.is_none());
    }

    #[test]
    fn command_id_falls_back_to_message_id() {
        let envelope = Envelope {
            message_id: Some("m-9".into()),
            ..Envelope::default()
        };
        let r = decode_command(br#"{"op":"restart","game_id":"g"}"#, &envelope).unwrap();
        assert_eq!(r.command_id, "m-9");
        let r = decode(r#"{"op":"restart","game_id":"g"}"#).unwrap();
        assert!(Uuid::parse_str(&r.command_id).is_ok(), "a derived id");
        let again = decode(r#"{"op":"restart","game_id":"g"}"#).unwrap();
        assert_eq!(r.command_id, again.command_id, "the same on redelivery");
    }

    #[test]
    fn undecodable_bodies() {
        let big = format!(
            r#"{{"op":"start","pad":"{}"}}"#,
            "x".repeat(MAX_COMMAND_BYTES)
        );
        let cases: [(&[u8], &str); 7] = [
            (b"{not json", "not JSON"),
            (b"\xff\xfe", "not UTF-8"),
            (b"[1,2]", "array"),
            (b"\"start\"", "string"),
            (br#"{"game_id":"g"}"#, "op is missing"),
            (br#"{"op":"explode","command_id":"c7"}"#, "unknown"),
            (big.as_bytes(), "64 KiB"),
        ];
        for (body, why) in cases {
            let err = decode_command(body, &Envelope::default()).unwrap_err();
            assert!(
                err.reason.contains(why),
                "{:?}: {}",
                String::from_utf8_lossy(body),
                err.reason
            );
        }
        let err = decode(r#"{"op":"explode","command_id":"c7"}"#).unwrap_err();
        assert_eq!(err.command_id.as_deref(), Some("c7"));
        assert_eq!(err.op.as_deref(), Some("explode"));
    }

    #[test]
    fn every_echoed_value_is_cut_to_256_bytes() {
        let long = "g".repeat(8000);
        let r = decode(&format!(
            r#"{{"op":"start","game_id":"{long}","image_ref":"{long}","op_source":"{long}","requested_at":"{long}"}}"#
        ))
        .unwrap();
        for value in [&r.game_id, &r.image_ref, &r.op_source] {
            let value = value.as_deref().unwrap();
            assert!(value.len() <= 256 && value.ends_with('…'), "{value}");
        }
        assert!(
            r.malformed.unwrap().len() < 1024,
            "the problem is bounded too"
        );
        let err = decode(&format!(r#"{{"op":"{long}","game_id":"{long}"}}"#)).unwrap_err();
        assert!(err.op.unwrap().len() <= 256);
        assert!(err.game_id.unwrap().len() <= 256);
    }

    #[test]
    fn an_outcome_event_is_never_taken_for_a_command() {
        let event = include_str!("../tests/fixtures/events/runtime.stop.success--noop.json");
        let err = decode(event).unwrap_err();
        assert!(err.reason.contains("outcome event"), "{}", err.reason);
        assert_eq!(err.command_id, None, "no event answers it");
    }

    #[test]
    fn wrong_types_are_validation_failures() {
        let r =
            decode(r#"{"op":"start","game_id":42,"image_ref":"e:1","op_source":"admin"}"#).unwrap();
        assert!(r.malformed.unwrap().contains("game_id must be a string"));
        let r =
            decode(r#"{"op":"stop","game_id":"g","op_source":"admin","requested_at":"yesterday"}"#)
                .unwrap();
        assert!(r.malformed.unwrap().contains("requested_at"));
    }

    #[test]
    fn identifiers_must_fit_an_amqp_short_string() {
        let long = "x".repeat(300);
        let err = decode(&format!(
            r#"{{"op":"restart","game_id":"g","command_id":"{long}"}}"#
        ))
        .unwrap_err();
        assert!(err.reason.contains("command_id"), "{}", err.reason);
        assert_eq!(
            err.command_id, None,
            "not echoed: it could not be published"
        );

        let r = decode(&format!(
            r#"{{"op":"restart","game_id":"g","op_source":"admin","command_id":"c","source_ref":"{long}"}}"#
        ))
        .unwrap();
        assert!(r.malformed.as_deref().unwrap().contains("source_ref"));
        assert_eq!(r.correlation_id(), "c");
    }

    #[test]
    fn control_characters_are_refused_and_never_stored() {
        let r = decode(r#"{"op":"restart","game_id":"g","op_source":"ad\u0000min"}"#).unwrap();
        assert!(r.malformed.unwrap().contains("op_source"));
        assert!(!r.op_source.unwrap().contains('\0'));
    }

    #[test]
    fn the_cli_body_decodes_back() {
        let msg = CommandMessage {
            command_id: "c".into(),
            op: OpKind::Start,
            game_id: "g".into(),
            image_ref: Some("e:1.0.0".into()),
            new_image_ref: None,
            op_source: "admin".into(),
            source_ref: None,
            reason: None,
            node: Some("node-b".into()),
            requested_at: Utc::now(),
        };
        let body = serde_json::to_vec(&msg).unwrap();
        let r = decode_command(&body, &Envelope::default()).unwrap();
        assert_eq!(r.node.as_deref(), Some("node-b"));
        assert_eq!(r.image_ref.as_deref(), Some("e:1.0.0"));
        assert_eq!(r.op_source.as_deref(), Some("admin"));
    }
}

/// The decoder against arbitrary input (issue 10): arbitrary bytes,
/// arbitrary JSON (objects biased towards the command's own fields), and
/// arbitrary AMQP properties. Whatever comes in, it never panics, never
/// lets a value past its limits, and every input ends as a command, an
/// `invalid_request` (or `image_not_allowed`), or a dead-letter reason.
#[cfg(test)]
mod properties {
    use arbtest::arbitrary::{Result, Unstructured};
    use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

    use super::*;
    use crate::domain::AllowedImages;
    use crate::domain::command::MAX_ECHO_BYTES;
    use crate::error::ErrorCode;

    /// A bound on any reason or message the decoder or validation writes:
    /// every raw value in one is cut, so they stay short.
    const MAX_MESSAGE_BYTES: usize = 4 * 1024;

    const FIELDS: [&str; 13] = [
        "command_id",
        "op",
        "game_id",
        "image_ref",
        "new_image_ref",
        "op_source",
        "source_ref",
        "reason",
        "requested_at",
        "event_id",
        "schema_version",
        "extra",
        "",
    ];
    const OPS: [&str; 7] = [
        "start", "stop", "restart", "patch", "remove", "Stop", "explode",
    ];
    const GOOD: [&str; 8] = [
        "g-1042",
        "rtm-test/engine:1.4.2",
        "registry.example:5000/galaxy/engine:1.4.3",
        "lobby",
        "admin",
        "game_finished",
        "2026-11-26T07:00:00Z",
        "c-1",
    ];

    fn text(u: &mut Unstructured) -> Result<String> {
        Ok(match u.int_in_range(0..=5)? {
            0 => u.choose(&GOOD)?.to_string(),
            1 => u.choose(&OPS)?.to_string(),
            // Long enough to pass every limit.
            2 => u
                .choose(&["x", "é", "😀", "\0", "a/"])?
                .repeat(u.int_in_range(60..=9000)?),
            3 => format!("{}\u{0}{}", u.choose(&GOOD)?, u.choose(&GOOD)?),
            _ => u.arbitrary()?,
        })
    }

    fn json(u: &mut Unstructured, depth: u32) -> Result<Value> {
        let kinds = if depth == 0 { 4 } else { 6 };
        Ok(match u.int_in_range(0..=kinds)? {
            0 => Value::Null,
            1 => Value::Bool(u.arbitrary()?),
            2 => Value::from(u.arbitrary::<f64>()?),
            3 => Value::from(u.arbitrary::<i64>()?),
            4 => Value::String(text(u)?),
            5 => {
                let len = u.int_in_range(0..=4)?;
                Value::Array(
                    (0..len)
                        .map(|_| json(u, depth - 1))
                        .collect::<Result<_>>()?,
                )
            }
            _ => object(u, depth - 1)?,
        })
    }

    fn object(u: &mut Unstructured, depth: u32) -> Result<Value> {
        let mut object = Map::new();
        for _ in 0..u.int_in_range(0..=10)? {
            let key = if u.ratio(4, 5)? {
                u.choose(&FIELDS)?.to_string()
            } else {
                u.arbitrary()?
            };
            let value = match key.as_str() {
                "op" if u.ratio(3, 4)? => Value::String(u.choose(&OPS)?.to_string()),
                _ if u.ratio(1, 2)? => Value::String(text(u)?),
                _ => json(u, depth)?,
            };
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }

    fn body(u: &mut Unstructured) -> Result<Vec<u8>> {
        Ok(match u.int_in_range(0..=5)? {
            0 => u.arbitrary()?,
            1 => json(u, 3)?.to_string().into_bytes(),
            2 => {
                // Just over the limit, but otherwise a fine command.
                let mut o = object(u, 1)?;
                o["pad"] = Value::String("x".repeat(MAX_COMMAND_BYTES));
                o.to_string().into_bytes()
            }
            _ => object(u, 2)?.to_string().into_bytes(),
        })
    }

    fn short(u: &mut Unstructured) -> Result<Option<ShortString>> {
        Ok(if u.arbitrary()? {
            // An AMQP short string: the wire holds at most 255 bytes.
            let mut s = text(u)?;
            while s.len() > 255 {
                s.pop();
            }
            Some(ShortString::from(s))
        } else {
            None
        })
    }

    fn properties(u: &mut Unstructured) -> Result<BasicProperties> {
        let mut props = BasicProperties::default();
        if let Some(id) = short(u)? {
            props = props.with_message_id(id);
        }
        if let Some(queue) = short(u)? {
            props = props.with_reply_to(queue);
        }
        if let Some(id) = short(u)? {
            props = props.with_correlation_id(id);
        }
        if u.arbitrary()? {
            let mut headers = FieldTable::default();
            let count = match u.int_in_range(0..=2)? {
                0 => AMQPValue::LongLongInt(u.arbitrary()?),
                1 => AMQPValue::LongString(LongString::from(text(u)?)),
                _ => AMQPValue::Boolean(u.arbitrary()?),
            };
            headers.insert("x-delivery-count".into(), count);
            props = props.with_headers(headers);
        }
        Ok(props)
    }

    fn bounded(what: &str, value: Option<&str>, limit: usize) {
        if let Some(value) = value {
            assert!(value.len() <= limit, "{what} is {} bytes", value.len());
            assert!(!value.chars().any(char::is_control), "{what} {value:?}");
        }
    }

    /// The property: see the module comment.
    fn check(body: &[u8], props: &BasicProperties) {
        let envelope = Envelope::from(props);
        match decode_command(body, &envelope) {
            Ok(request) => {
                assert!(
                    is_identifier(&request.command_id),
                    "{:?}",
                    request.command_id
                );
                bounded("game_id", request.game_id.as_deref(), MAX_ECHO_BYTES);
                bounded("image", request.image_ref.as_deref(), MAX_ECHO_BYTES);
                bounded("op_source", request.op_source.as_deref(), MAX_ECHO_BYTES);
                bounded("reason", request.reason.as_deref(), MAX_ECHO_BYTES);
                bounded(
                    "source_ref",
                    request.source_ref.as_deref(),
                    MAX_IDENTIFIER_BYTES,
                );
                bounded("malformed", request.malformed.as_deref(), MAX_MESSAGE_BYTES);
                match request.validate(&AllowedImages::parse("rtm-test")) {
                    Ok(command) => assert_eq!(command.command_id, request.command_id),
                    Err(failure) => {
                        assert!(
                            matches!(
                                failure.code,
                                ErrorCode::InvalidRequest | ErrorCode::ImageNotAllowed
                            ),
                            "{failure:?}"
                        );
                        assert!(!failure.message.is_empty());
                        assert!(
                            failure.message.len() <= MAX_MESSAGE_BYTES,
                            "{}",
                            failure.message.len()
                        );
                    }
                }
            }
            Err(undecodable) => {
                assert!(!undecodable.reason.is_empty(), "a dead-letter reason");
                bounded("reason", Some(&undecodable.reason), MAX_MESSAGE_BYTES);
                if let Some(id) = &undecodable.command_id {
                    assert!(is_identifier(id), "{id:?}");
                }
                bounded("op", undecodable.op.as_deref(), MAX_ECHO_BYTES);
                bounded("game_id", undecodable.game_id.as_deref(), MAX_ECHO_BYTES);
                bounded(
                    "source_ref",
                    undecodable.source_ref.as_deref(),
                    MAX_IDENTIFIER_BYTES,
                );
            }
        }
    }

    #[test]
    fn any_input_is_a_command_an_invalid_request_or_a_dead_letter_reason() {
        arbtest::arbtest(|u| {
            let body = body(u)?;
            let props = properties(u)?;
            check(&body, &props);
            Ok(())
        })
        .budget_ms(3_000)
        .run();
    }

    #[test]
    fn any_bytes_at_all() {
        arbtest::arbtest(|u| {
            let body: Vec<u8> = u.arbitrary()?;
            check(&body, &BasicProperties::default());
            Ok(())
        })
        .budget_ms(1_000)
        .run();
    }
}
