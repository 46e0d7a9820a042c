//! Commands: the decoded request as sent, and the validated command the
//! lifecycle services run.

use chrono::{DateTime, Utc};

use super::image_ref::{AllowedImages, ImageRef};
use super::operation::{OpKind, OpSource, StopReason};
use super::{GameId, NodeName};
use crate::error::{ErrorCode, Failure};

/// The most bytes of a raw value an `invalid_request` echoes (SPEC §6).
pub const MAX_ECHO_BYTES: usize = 256;

/// Cuts a raw value to at most [`MAX_ECHO_BYTES`] bytes, a trailing `…`
/// included, on a character boundary. A cut value never passes validation
/// (no game_id, image, op_source, reason or time holds a `…`), so cutting
/// at decode time only bounds what is stored and echoed: an 8,000-character
/// game_id is answered `invalid_request` instead of failing the write of
/// its answer on an index (issue 10).
pub fn echo_cut(raw: &str) -> String {
    if raw.len() <= MAX_ECHO_BYTES {
        return raw.to_owned();
    }
    const ELLIPSIS: char = '…';
    let mut end = MAX_ECHO_BYTES - ELLIPSIS.len_utf8();
    while !raw.is_char_boundary(end) {
        end -= 1;
    }
    let mut cut = String::with_capacity(MAX_ECHO_BYTES);
    cut.push_str(&raw[..end]);
    cut.push(ELLIPSIS);
    cut
}

/// Where a request/reply caller wants its outer outcome (AMQP `reply_to`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTo {
    pub queue: String,
    pub correlation_id: Option<String>,
}

/// A command as decoded from the wire: the op is known, everything else is
/// still the raw text the sender wrote (missing fields are `None`), each
/// field cut by [`echo_cut`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandRequest {
    /// The idempotency key: the message's `command_id`, else the AMQP
    /// `message_id`, else a fresh id.
    pub command_id: String,
    pub op: OpKind,
    pub game_id: Option<String>,
    /// `image_ref` for start, `new_image_ref` for patch.
    pub image_ref: Option<String>,
    pub op_source: Option<String>,
    pub source_ref: Option<String>,
    pub reason: Option<String>,
    pub requested_at: Option<DateTime<Utc>>,
    pub reply_to: Option<ReplyTo>,
    /// Why the body, though a command, is malformed (a field of the wrong
    /// JSON type): a validation failure, answered with `invalid_request`.
    pub malformed: Option<String>,
    /// A start's `node` (SPEC §12): where to place the game; `None` lets
    /// placement choose.
    pub node: Option<String>,
    /// An answer decided before the command reached the lifecycle: a start
    /// placement refused (SPEC §12). Validation returns it, so it is
    /// recorded like any refusal.
    pub refusal: Option<Failure>,
}

/// What a validated command asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Start {
        image_ref: ImageRef,
    },
    Stop {
        reason: StopReason,
    },
    Restart,
    Patch {
        new_image_ref: ImageRef,
    },
    Remove,
    /// The reconciler's record of an engine that stopped without a command
    /// (SPEC §11); built by the reconciler, never decoded from a message.
    Exit,
}

impl Action {
    pub fn op(&self) -> OpKind {
        match self {
            Action::Start { .. } => OpKind::Start,
            Action::Stop { .. } => OpKind::Stop,
            Action::Restart => OpKind::Restart,
            Action::Patch { .. } => OpKind::Patch,
            Action::Remove => OpKind::Remove,
            Action::Exit => OpKind::Exit,
        }
    }
}

/// A validated command: nothing in it needs checking again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub command_id: String,
    pub game_id: GameId,
    pub op_source: OpSource,
    pub correlation_id: String,
    pub action: Action,
}

impl CommandRequest {
    /// The node a start asks to be placed on, if it names one that can be
    /// a node's name at all (whether it exists is placement's question).
    pub fn placement_node(&self) -> Result<Option<NodeName>, String> {
        match self.node.as_deref() {
            None => Ok(None),
            Some(raw) => NodeName::parse(raw).map(Some),
        }
    }

    /// Refuses a `reply_to` that names one of this service's own queues
    /// (SPEC §6): the reply would come back as a command, be answered, and
    /// be replied to again, without end. The reply is dropped and the
    /// command answered `invalid_request` (to the events exchange only).
    pub fn refuse_reply_to(&mut self, is_own_queue: impl Fn(&str) -> bool) {
        if let Some(reply) = self.reply_to.take_if(|r| is_own_queue(&r.queue)) {
            let problem = format!(
                "reply_to {:?} names this service's own queue",
                echo_cut(&reply.queue)
            );
            self.add_problem(problem);
        }
    }

    /// Records one more reason the request is malformed.
    pub fn add_problem(&mut self, problem: String) {
        self.malformed = Some(match self.malformed.take() {
            Some(earlier) => format!("{earlier}; {problem}"),
            None => problem,
        });
    }

    /// What makes this command this command, as far as its command_id is
    /// concerned (SPEC §6): op, game, image and reason as sent. A message
    /// that repeats the command_id with another fingerprint is not a
    /// duplicate but a reuse. Every part is already cut by [`echo_cut`].
    pub fn fingerprint(&self) -> String {
        serde_json::json!([self.op.as_str(), self.game_id, self.image_ref, self.reason]).to_string()
    }

    /// The correlation id linking the outer operation to its inner ones:
    /// the `source_ref`, else the `command_id` (so a redelivered command
    /// keeps its correlation).
    pub fn correlation_id(&self) -> String {
        match self.source_ref.as_deref() {
            Some(s) if !s.is_empty() => s.to_owned(),
            _ => self.command_id.clone(),
        }
    }

    /// Validates the request (SPEC §3 step 1, §6 "Bad input"). The failure
    /// is `invalid_request`, or `image_not_allowed` for an image outside the
    /// allow-list.
    pub fn validate(&self, allowed: &AllowedImages) -> Result<Command, Failure> {
        let invalid = |msg: String| Failure::new(ErrorCode::InvalidRequest, msg);
        if let Some(refusal) = &self.refusal {
            return Err(refusal.clone());
        }
        if let Some(problem) = &self.malformed {
            return Err(invalid(problem.clone()));
        }

        let game_id = GameId::parse(self.game_id.as_deref().unwrap_or_default())
            .map_err(|e| invalid(e.to_string()))?;
        let op_source = match self.op_source.as_deref() {
            None | Some("") => return Err(invalid("op_source is required".into())),
            Some(raw) => OpSource::parse(raw).ok_or_else(|| {
                invalid(format!(
                    "op_source {raw:?} is unsupported (expected lobby, admin or reconciler)"
                ))
            })?,
        };
        let image = |field: &str| -> Result<ImageRef, Failure> {
            let raw = self.image_ref.as_deref().unwrap_or_default();
            if raw.is_empty() {
                return Err(invalid(format!("{field} must not be empty")));
            }
            let image = ImageRef::parse(raw).map_err(|e| invalid(format!("{field}: {e}")))?;
            if !allowed.allows(&image) {
                return Err(Failure::new(
                    ErrorCode::ImageNotAllowed,
                    format!(
                        "{field} {raw:?} is outside RTM_ALLOWED_IMAGES ({})",
                        allowed.prefixes().join(", ")
                    ),
                ));
            }
            Ok(image)
        };

        let action = match self.op {
            OpKind::Start => {
                self.placement_node().map_err(invalid)?;
                Action::Start {
                    image_ref: image("image_ref")?,
                }
            }
            OpKind::Patch => Action::Patch {
                new_image_ref: image("new_image_ref")?,
            },
            OpKind::Stop => Action::Stop {
                reason: match self.reason.as_deref() {
                    None => StopReason::default(),
                    Some(raw) => StopReason::parse(raw).ok_or_else(|| {
                        invalid(format!(
                            "reason {raw:?} is unsupported (expected admin_request, lobby_request, game_finished or idle)"
                        ))
                    })?,
                },
            },
            OpKind::Restart => Action::Restart,
            OpKind::Remove => Action::Remove,
            OpKind::Exit => {
                return Err(invalid(
                    "op exit is the reconciler's own record, not a command".into(),
                ));
            }
        };

        Ok(Command {
            command_id: self.command_id.clone(),
            game_id,
            op_source,
            correlation_id: self.correlation_id(),
            action,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(op: OpKind) -> CommandRequest {
        CommandRequest {
            command_id: "c-1".into(),
            op,
            game_id: Some("g-1".into()),
            image_ref: Some("galaxy/engine:1.4.2".into()),
            op_source: Some("lobby".into()),
            source_ref: None,
            reason: None,
            requested_at: None,
            reply_to: None,
            malformed: None,
            node: None,
            refusal: None,
        }
    }

    #[test]
    fn validates_a_good_patch() {
        let cmd = request(OpKind::Patch)
            .validate(&AllowedImages::any())
            .unwrap();
        assert_eq!(cmd.game_id.as_str(), "g-1");
        assert_eq!(cmd.correlation_id, "c-1");
        assert!(matches!(cmd.action, Action::Patch { .. }));
    }

    #[test]
    fn a_starts_node_must_be_a_node_name() {
        let mut r = request(OpKind::Start);
        r.image_ref = Some("rtm/engine:1.4.2".into());
        r.node = Some("node-b".into());
        assert!(r.validate(&AllowedImages::any()).is_ok());
        assert_eq!(r.placement_node().unwrap().unwrap().as_str(), "node-b");
        for bad in ["", "a b", "-b", "b/c"] {
            r.node = Some(bad.into());
            let e = r.validate(&AllowedImages::any()).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{bad:?}");
        }
    }

    #[test]
    fn correlation_prefers_source_ref() {
        let mut r = request(OpKind::Restart);
        r.source_ref = Some("lobby-req-77".into());
        assert_eq!(r.correlation_id(), "lobby-req-77");
        r.source_ref = Some(String::new());
        assert_eq!(r.correlation_id(), "c-1");
    }

    #[test]
    fn validation_failures_have_the_right_code() {
        type Edit = fn(&mut CommandRequest);
        let cases: [(OpKind, Edit, ErrorCode); 9] = [
            (
                OpKind::Start,
                |r| r.game_id = None,
                ErrorCode::InvalidRequest,
            ),
            (
                OpKind::Start,
                |r| r.game_id = Some("../x".into()),
                ErrorCode::InvalidRequest,
            ),
            (
                OpKind::Start,
                |r| r.image_ref = None,
                ErrorCode::InvalidRequest,
            ),
            (
                OpKind::Patch,
                |r| r.image_ref = Some(String::new()),
                ErrorCode::InvalidRequest,
            ),
            (
                OpKind::Patch,
                |r| r.image_ref = Some("Bad Ref".into()),
                ErrorCode::InvalidRequest,
            ),
            (
                OpKind::Start,
                |r| r.op_source = Some("hacker".into()),
                ErrorCode::InvalidRequest,
            ),
            (
                OpKind::Stop,
                |r| r.op_source = None,
                ErrorCode::InvalidRequest,
            ),
            (
                OpKind::Stop,
                |r| r.reason = Some("bored".into()),
                ErrorCode::InvalidRequest,
            ),
            (
                OpKind::Start,
                |r| r.image_ref = Some("evil/engine:1.0.0".into()),
                ErrorCode::ImageNotAllowed,
            ),
        ];
        let allowed = AllowedImages::parse("galaxy");
        for (op, edit, code) in cases {
            let mut r = request(op);
            edit(&mut r);
            let failure = r.validate(&allowed).unwrap_err();
            assert_eq!(failure.code, code, "{r:?}: {}", failure.message);
        }
    }

    #[test]
    fn an_echo_is_cut_to_256_bytes_on_a_character_boundary() {
        assert_eq!(echo_cut("g-1"), "g-1");
        let exact = "x".repeat(MAX_ECHO_BYTES);
        assert_eq!(echo_cut(&exact), exact, "256 bytes fit");
        for raw in ["x".repeat(8000), "é".repeat(4000), "😀".repeat(2000)] {
            let cut = echo_cut(&raw);
            assert!(cut.len() <= MAX_ECHO_BYTES, "{} bytes", cut.len());
            assert!(cut.ends_with('…'));
            assert!(raw.starts_with(cut.trim_end_matches('…')));
        }
    }

    #[test]
    fn a_reply_to_one_of_our_own_queues_is_refused() {
        let mut r = request(OpKind::Stop);
        r.reply_to = Some(ReplyTo {
            queue: "rtmanager.commands".into(),
            correlation_id: None,
        });
        r.refuse_reply_to(|q| q == "rtmanager.commands");
        assert_eq!(r.reply_to, None, "never replied to");
        let failure = r.validate(&AllowedImages::any()).unwrap_err();
        assert_eq!(failure.code, ErrorCode::InvalidRequest);
        assert!(failure.message.contains("own queue"), "{}", failure.message);

        let mut r = request(OpKind::Stop);
        r.reply_to = Some(ReplyTo {
            queue: "lobby.replies".into(),
            correlation_id: None,
        });
        r.refuse_reply_to(|q| q == "rtmanager.commands");
        assert!(r.reply_to.is_some());
        assert!(r.validate(&AllowedImages::any()).is_ok());
    }

    #[test]
    fn stop_reason_defaults_to_lobby_request() {
        let cmd = request(OpKind::Stop)
            .validate(&AllowedImages::any())
            .unwrap();
        assert_eq!(
            cmd.action,
            Action::Stop {
                reason: StopReason::LobbyRequest
            }
        );
    }
}
