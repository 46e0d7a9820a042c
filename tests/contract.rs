//! Contract tests (SPEC §6, STYLE practice 15): the example messages under
//! `tests/fixtures/` against the schemas under `schemas/` *and* against the
//! code that reads and writes them — the command decoder and validator, the
//! outcome-event struct. Needs no services.
//!
//! The fixture directories drive the tests, so a new file is picked up
//! without touching this one:
//! - `commands/valid/`: the schema accepts, the decoder decodes, validation
//!   passes;
//! - `commands/invalid/<field>--<what>.json`: the schema rejects, the
//!   decoder decodes, validation fails with `invalid_request` (the worker
//!   answers with an event) and a message naming `<field>`;
//! - `commands/undecodable/`: the schema rejects, the decoder returns
//!   `Undecodable` (the worker dead-letters it);
//! - `events/<routing key>[--what].json`: the schema accepts, the body
//!   round-trips through `OutcomeEvent`, and `routing_key()` is the name.

#[path = "support/schema.rs"]
mod schema;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use rtmanager::domain::event::SCHEMA_VERSION;
use rtmanager::domain::{
    Action, AllowedImages, EntryResult, GameId, ImageRef, NodeName, OpKind, OpSource,
    OperationEntry, Outcome, OutcomeEvent, StopReason,
};
use rtmanager::error::{ErrorCode, Failure};
use rtmanager::messages::{CommandMessage, Envelope, MAX_COMMAND_BYTES, decode_command};

// ---------------------------------------------------------------------------
// Fixtures

fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Every file of `tests/fixtures/<dir>` (dotfiles aside), sorted by name,
/// with its bytes. Panics on an empty directory: a renamed or emptied
/// directory must not turn a test into a silent pass.
fn fixtures(dir: &str) -> Vec<(String, Vec<u8>)> {
    let path = fixtures_root().join(dir);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.is_file())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_owned();
            (!name.starts_with('.')).then_some((name, p))
        })
        .map(|(name, p)| {
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            (name, bytes)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {}", path.display());
    files
}

/// Panics listing every problem, so one run shows every broken fixture.
fn assert_no_problems(what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{what}: {} problem(s):\n- {}",
        problems.len(),
        problems.join("\n- ")
    );
}

fn allow_any() -> AllowedImages {
    AllowedImages::any()
}

// ---------------------------------------------------------------------------
// Commands

#[test]
fn valid_commands_match_the_schema_decode_and_validate() {
    let validator = schema::command_schema_validator();
    let mut problems = Vec::new();
    for (name, body) in fixtures("commands/valid") {
        let value: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                problems.push(format!("{name}: not JSON: {e}"));
                continue;
            }
        };
        let errors = schema::validation_errors(&validator, &value);
        if !errors.is_empty() {
            problems.push(format!("{name}: the schema rejects it: {errors:?}"));
        }
        let request = match decode_command(&body, &Envelope::default()) {
            Ok(r) => r,
            Err(e) => {
                problems.push(format!("{name}: undecodable: {}", e.reason));
                continue;
            }
        };
        let command = match request.validate(&allow_any()) {
            Ok(c) => c,
            Err(f) => {
                problems.push(format!("{name}: fails validation: {f}"));
                continue;
            }
        };
        // The validated command carries what the body says.
        let text = |key: &str| value.get(key).and_then(Value::as_str);
        let mut expect = |what: &str, got: &str, want: Option<&str>| {
            if Some(got) != want {
                problems.push(format!("{name}: {what} is {got:?}, the body says {want:?}"));
            }
        };
        expect("op", command.action.op().as_str(), text("op"));
        expect("game_id", command.game_id.as_str(), text("game_id"));
        expect("op_source", command.op_source.as_str(), text("op_source"));
        if let Some(id) = text("command_id").filter(|id| !id.is_empty()) {
            expect("command_id", &command.command_id, Some(id));
        }
        match &command.action {
            Action::Start { image_ref } => {
                expect("image_ref", image_ref.as_str(), text("image_ref"))
            }
            Action::Patch { new_image_ref } => {
                expect(
                    "new_image_ref",
                    new_image_ref.as_str(),
                    text("new_image_ref"),
                );
            }
            Action::Stop { reason } => expect(
                "reason",
                reason.as_str(),
                Some(text("reason").unwrap_or(StopReason::default().as_str())),
            ),
            Action::Restart | Action::Remove => {}
            Action::Exit => {
                problems.push(format!("{name}: decoded as the reconciler's own op exit"))
            }
        }
        // A start's node reaches placement as sent (SPEC §12); any other
        // op's is ignored like an unknown field.
        let sent_node = text("node").filter(|_| request.op == OpKind::Start);
        match (request.placement_node(), sent_node) {
            (Ok(Some(node)), Some(sent)) if node.as_str() == sent => {}
            (Ok(None), None) => {}
            (got, sent) => problems.push(format!(
                "{name}: placement is asked for {got:?}, the body says {sent:?}"
            )),
        }
    }
    assert_no_problems("valid commands", &problems);
}

#[test]
fn invalid_commands_are_rejected_by_the_schema_and_by_validation() {
    let validator = schema::command_schema_validator();
    let mut problems = Vec::new();
    for (name, body) in fixtures("commands/invalid") {
        let value: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                problems.push(format!("{name}: not JSON (belongs in undecodable/): {e}"));
                continue;
            }
        };
        if validator.is_valid(&value) {
            problems.push(format!("{name}: the schema accepts it"));
        }
        match decode_command(&body, &Envelope::default()) {
            Err(e) => problems.push(format!(
                "{name}: undecodable ({}), but a validation failure must be answered with invalid_request",
                e.reason
            )),
            Ok(request) => match request.validate(&allow_any()) {
                Ok(command) => problems.push(format!("{name}: validation accepts it: {command:?}")),
                Err(f) if f.code != ErrorCode::InvalidRequest => {
                    problems.push(format!("{name}: fails with {f}, not invalid_request"));
                }
                // Refused for the right reason: the lobby is told which
                // field to fix, not merely that something was wrong.
                Err(f) => match offending_field(&name) {
                    None => problems.push(format!(
                        "{name}: not named <field>--<what>.json, so which field it breaks is unknown"
                    )),
                    Some(field) if !names_word(&f.message, field) => problems.push(format!(
                        "{name}: the message does not name {field}: {}",
                        f.message
                    )),
                    Some(_) => {}
                },
            },
        }
    }
    assert_no_problems("invalid commands", &problems);
}

/// The field an invalid fixture breaks: its name up to `--`
/// (`game_id--too-long.json` breaks `game_id`).
fn offending_field(name: &str) -> Option<&str> {
    name.split_once("--")
        .map(|(field, _)| field)
        .filter(|f| !f.is_empty())
}

/// `text` has `word` with no identifier character either side: `image_ref`
/// is not named by a message about `new_image_ref`.
fn names_word(text: &str, word: &str) -> bool {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(word)
        .any(|(at, _)| !text[..at].ends_with(ident) && !text[at + word.len()..].starts_with(ident))
}

#[test]
fn a_field_is_named_as_a_whole_word() {
    assert!(names_word("image_ref: must not be empty", "image_ref"));
    assert!(names_word("bad (image_ref)", "image_ref"));
    assert!(!names_word("new_image_ref: missing", "image_ref"));
    assert!(!names_word("image_refs are odd", "image_ref"));
    assert_eq!(offending_field("game_id--empty.json"), Some("game_id"));
    assert_eq!(offending_field("game-id-empty.json"), None);
}

#[test]
fn undecodable_commands_are_rejected_by_the_schema_and_the_decoder() {
    let validator = schema::command_schema_validator();
    let envelope = Envelope {
        message_id: Some("amqp-message-id".into()),
        ..Envelope::default()
    };
    let mut problems = Vec::new();
    for (name, body) in fixtures("commands/undecodable") {
        // Not UTF-8 or not JSON: no JSON instance for the schema to accept.
        let value = std::str::from_utf8(&body)
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(text).ok());
        if let Some(value) = &value
            && validator.is_valid(value)
        {
            problems.push(format!("{name}: the schema accepts it"));
        }
        match decode_command(&body, &envelope) {
            Ok(request) => problems.push(format!("{name}: decodes: {request:?}")),
            Err(rejected) => {
                // What the worker can still read for its runtime.rejected event.
                let field = |key: &str| {
                    value
                        .as_ref()
                        .and_then(|v| v.get(key))
                        .and_then(Value::as_str)
                        .filter(|s| !s.is_empty())
                };
                // A body command_id that cannot travel as an AMQP short
                // string is not echoed; the message_id stands in.
                // An outcome event is answered by nothing: no id is read.
                let is_event = value.as_ref().is_some_and(|v| {
                    v.get("event_id").is_some() && v.get("schema_version").is_some()
                });
                let want_id = field("command_id")
                    .filter(|id| id.len() <= 255 && !id.chars().any(char::is_control))
                    .or(Some("amqp-message-id"))
                    .filter(|_| !is_event);
                if rejected.command_id.as_deref() != want_id {
                    problems.push(format!(
                        "{name}: command_id read as {:?}, expected {want_id:?}",
                        rejected.command_id
                    ));
                }
                if rejected.op.as_deref() != field("op").filter(|_| !is_event) {
                    problems.push(format!("{name}: op read as {:?}", rejected.op));
                }
                if rejected.reason.is_empty() {
                    problems.push(format!("{name}: no reason for x-rtm-reject-reason"));
                }
            }
        }
    }
    assert_no_problems("undecodable commands", &problems);
}

/// A start command padded with an unknown field to exactly `len` bytes.
fn padded_command(len: usize) -> Vec<u8> {
    let head = r#"{"command_id":"c-big","op":"start","game_id":"g-1042","image_ref":"galaxy/engine:1.4.2","op_source":"lobby","pad":""#;
    let tail = r#""}"#;
    let pad = len - head.len() - tail.len();
    format!("{head}{}{tail}", "x".repeat(pad)).into_bytes()
}

#[test]
fn the_size_limit_is_the_decoders_not_the_schemas() {
    // JSON Schema cannot bound the size of a whole document: a big body is
    // a well-formed command to the schema, and undecodable to the worker.
    let validator = schema::command_schema_validator();

    let at_limit = padded_command(MAX_COMMAND_BYTES);
    let request = decode_command(&at_limit, &Envelope::default()).expect("64 KiB decodes");
    request.validate(&allow_any()).expect("and validates");

    for len in [MAX_COMMAND_BYTES + 1, 2 * 1024 * 1024] {
        let body = padded_command(len);
        let value: Value = serde_json::from_slice(&body).unwrap();
        assert!(validator.is_valid(&value), "the schema has no size limit");
        let envelope = Envelope {
            message_id: Some("m-big".into()),
            ..Envelope::default()
        };
        let rejected = decode_command(&body, &envelope).expect_err("over 64 KiB");
        assert!(rejected.reason.contains("64 KiB"), "{}", rejected.reason);
        // The body is not parsed at all: only the AMQP message_id is known.
        assert_eq!(rejected.command_id.as_deref(), Some("m-big"));
    }
}

#[test]
fn the_cli_command_body_matches_the_schema() {
    let at = Utc.with_ymd_and_hms(2026, 11, 26, 7, 0, 0).unwrap();
    for &op in OpKind::ALL.iter().filter(|op| op.is_command()) {
        for &source in OpSource::ALL {
            let message = CommandMessage {
                command_id: Uuid::now_v7().to_string(),
                op,
                game_id: "g-1042".into(),
                image_ref: (op == OpKind::Start).then(|| "galaxy/engine:1.4.2".into()),
                new_image_ref: (op == OpKind::Patch).then(|| "galaxy/engine:1.4.3".into()),
                op_source: source.as_str().into(),
                source_ref: Some("cli-1".into()),
                reason: (op == OpKind::Stop).then(|| StopReason::Idle.as_str().into()),
                node: (op == OpKind::Start).then(|| "node-b".into()),
                requested_at: at,
            };
            let body = serde_json::to_vec(&message).unwrap();
            schema::assert_valid_command(&serde_json::from_slice(&body).unwrap());
            decode_command(&body, &Envelope::default())
                .unwrap()
                .validate(&allow_any())
                .unwrap_or_else(|f| panic!("{op} from {source}: {f}"));
        }
    }
}

/// A validator for one `$defs` entry of a schema (they have no `$ref`).
fn def_validator(schema: &Value, name: &str) -> jsonschema::Validator {
    let def = schema
        .pointer(&format!("/$defs/{name}"))
        .unwrap_or_else(|| panic!("no $defs/{name}"));
    schema::validator_for(def)
}

#[test]
fn the_game_id_pattern_is_game_id_parse() {
    let command = schema::load_schema("command.schema.json");
    let validator = def_validator(&command, "game_id");
    let samples = [
        "g",
        "0",
        "g-1042",
        "A.b_c-9",
        "a..b",
        "a-",
        &"x".repeat(63),
        &"x".repeat(64),
        "",
        "-g",
        ".hidden",
        "_g",
        "../etc",
        "a/b",
        "a b",
        "g\n",
        "é",
        "gé",
        "g:1",
        "g@1",
    ];
    for raw in samples {
        assert_eq!(
            validator.is_valid(&json!(raw)),
            GameId::parse(raw).is_ok(),
            "{raw:?}: the schema and GameId::parse disagree"
        );
    }
    // The event schema checks game ids past validation with the same pattern.
    let event = schema::load_schema("event.schema.json");
    assert_eq!(
        event.pointer("/allOf/5/then/properties/game_id/pattern"),
        command.pointer("/$defs/game_id/pattern"),
    );
}

#[test]
fn the_node_pattern_is_node_name_parse() {
    let command = schema::load_schema("command.schema.json");
    let event = schema::load_schema("event.schema.json");
    // A start's node (the top-level one is any string: other ops ignore it).
    let validator = schema::validator_for(&command["allOf"][0]["then"]["properties"]["node"]);
    assert_eq!(
        command["allOf"][0]["if"]["properties"]["op"]["const"],
        "start"
    );
    let samples = [
        "a",
        "0",
        "node-b",
        "host.example",
        "N_2",
        "a..b",
        &"x".repeat(63),
        &"x".repeat(64),
        "",
        "-a",
        ".a",
        "_a",
        "a b",
        "a/b",
        "a#",
        "a\n",
        "ü",
    ];
    for raw in samples {
        assert_eq!(
            validator.is_valid(&json!(raw)),
            NodeName::parse(raw).is_ok(),
            "{raw:?}: the schema and NodeName::parse disagree"
        );
    }
    // An event's node is a node name too.
    assert_eq!(
        event.pointer("/properties/node/pattern"),
        command.pointer("/allOf/0/then/properties/node/pattern"),
    );
}

#[test]
fn the_image_ref_pattern_is_image_ref_parse() {
    let command = schema::load_schema("command.schema.json");
    let validator = def_validator(&command, "image_ref");
    let hex64 = "a".repeat(64);
    let samples: Vec<String> = [
        // Accepted by ImageRef::parse.
        "engine",
        "engine:1.4.2",
        "engine:v1.4.2",
        "engine:1.4.3-rc.1",
        "engine:latest",
        "engine:_x",
        "galaxy/engine:1.4.2",
        "registry:5000/galaxy/engine:1.4.2",
        "registry.example:5000/galaxy/engine:1.4.3",
        "Registry.Example/galaxy/engine:1",
        "localhost/engine:v2.0.0",
        "localhost:5000/engine",
        "localhost:5000",
        "example.com",
        "a.b-c/x__y/z-w:latest",
        "x--y/a---b",
        "my-host/engine",
        "docker.io/library/busybox:1.36.0",
        // Rejected by ImageRef::parse.
        "",
        " engine:1",
        "engine:1 ",
        "gal axy/engine",
        "Engine:1.0.0",
        "Registry/engine",
        "LOCALHOST/engine",
        "engine:",
        "engine:-1",
        "engine:.1",
        "/engine",
        "engine/",
        "galaxy//engine",
        "engine@sha256:xyz",
        "engine@nothex",
        "reg:port/engine",
        "reg:/engine",
        "reg:123456/engine",
        "a_b.c/engine",
        "-a.com/engine",
        "a-.com/engine",
        "a..b/engine",
        "x___y",
        "x.-y",
        "x_",
        "engine:1.0:2",
        "engine:1/2",
        "é/engine",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain([
        format!("engine@sha256:{hex64}"),
        format!("engine:1.4.2@sha256:{hex64}"),
        format!("registry:5000/engine@sha256:{}", "AB".repeat(16)),
        format!("engine@sha256:{}", "a".repeat(31)),
        format!("engine@SHA256:{hex64}"),
        format!("engine:{}", "1".repeat(128)),
        format!("engine:{}", "1".repeat(129)),
        format!("{}:1", "a".repeat(253)),
        format!("{}:1", "a".repeat(254)),
    ])
    .collect();
    let mut problems = Vec::new();
    for raw in &samples {
        let by_schema = validator.is_valid(&json!(raw));
        let by_code = ImageRef::parse(raw);
        if by_schema != by_code.is_ok() {
            problems.push(format!(
                "{raw:?}: schema says {by_schema}, ImageRef::parse says {by_code:?}"
            ));
        }
    }
    assert_no_problems("image_ref pattern", &problems);
}

#[test]
fn a_requested_at_the_schema_accepts_is_one_the_decoder_accepts() {
    let command = schema::load_schema("command.schema.json");
    let validator = schema::validator_for(&command["properties"]["requested_at"]);
    let samples = [
        "2026-11-26T07:00:00Z",
        "2026-11-26t07:00:00z",
        "2026-11-26T07:00:00.123456789Z",
        "2026-11-26T09:00:00+02:00",
        "2026-11-26T02:00:00-05:00",
        "2026-11-26T07:00:00",
        "2026-11-26",
        "2026-02-30T07:00:00Z",
        "2026-13-01T07:00:00Z",
        "2026-11-26T25:00:00Z",
        "yesterday",
        "",
    ];
    for raw in samples {
        let body = json!({"op": "stop", "game_id": "g", "op_source": "admin", "requested_at": raw});
        let decoded = decode_command(body.to_string().as_bytes(), &Envelope::default())
            .unwrap()
            .validate(&allow_any());
        // The schema may be stricter than the decoder (chrono also takes a
        // space for the `T`), never more lenient.
        if validator.is_valid(&json!(raw)) {
            assert!(
                decoded.is_ok(),
                "{raw:?}: the schema accepts it, the decoder does not"
            );
        }
    }
    // With format assertion on, the schema checks the calendar too.
    assert!(!validator.is_valid(&json!("2026-02-30T07:00:00Z")));
}

// ---------------------------------------------------------------------------
// The enums of the schemas are the code's lists

fn strings(values: impl IntoIterator<Item = impl AsRef<str>>) -> BTreeSet<String> {
    values.into_iter().map(|v| v.as_ref().to_owned()).collect()
}

/// The `enum` at `pointer`, split into its strings and whether it has null.
fn enum_at(schema: &Value, pointer: &str) -> (BTreeSet<String>, bool) {
    let values = schema
        .pointer(pointer)
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("no enum at {pointer}"));
    let names = values
        .iter()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect();
    (names, values.contains(&Value::Null))
}

/// Every `enum` and `const` anywhere in `schema` under a property named
/// `key`, as (JSON pointer, string values).
fn enums_under(schema: &Value, key: &str) -> Vec<(String, BTreeSet<String>)> {
    fn walk(v: &Value, key: &str, at: &str, out: &mut Vec<(String, BTreeSet<String>)>) {
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    let here = format!("{at}/{k}");
                    if k == key
                        && let Some(prop) = child.as_object()
                    {
                        let values: Vec<&Value> = match (prop.get("enum"), prop.get("const")) {
                            (Some(Value::Array(e)), _) => e.iter().collect(),
                            (_, Some(c)) => vec![c],
                            _ => Vec::new(),
                        };
                        if !values.is_empty() {
                            out.push((
                                here.clone(),
                                values
                                    .into_iter()
                                    .filter_map(Value::as_str)
                                    .map(str::to_owned)
                                    .collect(),
                            ));
                        }
                    }
                    walk(child, key, &here, out);
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    walk(child, key, &format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(schema, key, "", &mut out);
    out
}

/// Every enum of `key` in the schema is a subset of the code's list.
fn assert_enums_within(schema: &Value, file: &str, key: &str, code: &BTreeSet<String>) {
    let found = enums_under(schema, key);
    assert!(!found.is_empty(), "{file}: no enum for {key}");
    for (at, values) in found {
        assert!(
            values.is_subset(code),
            "{file} {at}: {:?} are not in the code's list {code:?}",
            values.difference(code).collect::<Vec<_>>()
        );
    }
}

#[test]
fn the_schema_enums_are_the_code_lists() {
    // `exit` is an entry's op (the reconciler's), never a command's or a
    // step's.
    let commands = strings(
        OpKind::ALL
            .iter()
            .filter(|o| o.is_command())
            .map(|o| o.as_str()),
    );
    let ops = strings(OpKind::ALL.iter().map(|o| o.as_str()));
    let sources = strings(OpSource::ALL.iter().map(|o| o.as_str()));
    let reasons = strings(StopReason::ALL.iter().map(|o| o.as_str()));
    let codes = strings(ErrorCode::ALL.iter().map(|o| o.as_str()));
    let outcomes = strings(Outcome::ALL.iter().map(|o| o.as_str()));

    let command = schema::load_schema("command.schema.json");
    assert_eq!(
        enum_at(&command, "/properties/op/enum"),
        (commands.clone(), false)
    );
    assert_eq!(
        enum_at(&command, "/properties/op_source/enum"),
        (sources.clone(), false)
    );
    assert_eq!(
        enum_at(&command, "/allOf/2/then/properties/reason/enum"),
        (reasons.clone(), false)
    );
    for (key, list) in [
        ("op", &commands),
        ("op_source", &sources),
        ("reason", &reasons),
    ] {
        assert_enums_within(&command, "command.schema.json", key, list);
    }

    let event = schema::load_schema("event.schema.json");
    assert_eq!(
        enum_at(&event, "/properties/error_code/enum"),
        (codes.clone(), true)
    );
    assert_eq!(enum_at(&event, "/$defs/op/enum"), (ops.clone(), false));
    assert_eq!(
        enum_at(&event, "/properties/outer_op/enum"),
        (commands.clone(), true)
    );
    assert_eq!(
        enum_at(&event, "/properties/outcome/enum"),
        (outcomes.clone(), false)
    );
    assert_eq!(
        enum_at(&event, "/allOf/5/then/properties/op_source/enum"),
        (sources.clone(), false)
    );
    assert_eq!(
        enum_at(&event, "/allOf/5/then/properties/reason/enum"),
        (reasons.clone(), true)
    );
    for (key, list) in [
        ("op", &ops),
        ("outer_op", &commands),
        ("op_source", &sources),
        ("reason", &reasons),
        ("error_code", &codes),
        ("outcome", &outcomes),
    ] {
        assert_enums_within(&event, "event.schema.json", key, list);
    }
    assert_eq!(
        event["properties"]["schema_version"]["const"],
        json!(SCHEMA_VERSION)
    );
}

#[test]
fn the_schemas_are_draft_2020_12_documents() {
    for file in ["command.schema.json", "event.schema.json"] {
        let doc = schema::load_schema(file);
        assert_eq!(
            doc["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{file}"
        );
        let id = doc["$id"].as_str().unwrap_or_default();
        assert!(id.ends_with(file), "{file}: $id {id:?}");
        assert!(
            doc["title"].is_string() && doc["description"].is_string(),
            "{file}"
        );
        // Building checks the document against the draft 2020-12 meta-schema.
        schema::validator_for(&doc);
    }
}

// ---------------------------------------------------------------------------
// Events

#[test]
fn event_fixtures_match_the_schema_and_round_trip_through_the_struct() {
    let validator = schema::event_schema_validator();
    let mut problems = Vec::new();
    for (name, body) in fixtures("events") {
        let Some(stem) = name.strip_suffix(".json") else {
            problems.push(format!("{name}: an event fixture is a .json file"));
            continue;
        };
        let value: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                problems.push(format!("{name}: not JSON: {e}"));
                continue;
            }
        };
        let errors = schema::validation_errors(&validator, &value);
        if !errors.is_empty() {
            problems.push(format!("{name}: the schema rejects it: {errors:?}"));
        }
        let event: OutcomeEvent = match serde_json::from_value(value.clone()) {
            Ok(e) => e,
            Err(e) => {
                problems.push(format!("{name}: not an OutcomeEvent: {e}"));
                continue;
            }
        };
        let again = serde_json::to_value(&event).unwrap();
        if again != value {
            problems.push(format!("{name}: serializes back as {again:#}"));
        }
        let routing_key = stem.split_once("--").map_or(stem, |(key, _)| key);
        if event.routing_key() != routing_key {
            problems.push(format!(
                "{name}: routing key is {}, the file name says {routing_key}",
                event.routing_key()
            ));
        }
    }
    assert_no_problems("event fixtures", &problems);
}

fn at(second: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 26, 7, 0, second).unwrap() + chrono::Duration::milliseconds(125)
}

/// An entry as the lifecycle writes it for `op` (a step of `outer`).
fn entry(op: OpKind, outer: Option<OpKind>, result: EntryResult) -> OperationEntry {
    let images = matches!(op, OpKind::Start | OpKind::Patch);
    OperationEntry {
        game_id: "g-1042".into(),
        op,
        outer_op: outer,
        op_source: OpSource::Lobby.as_str().into(),
        reason: (op == OpKind::Stop).then(|| {
            let reason = if outer.is_some() {
                StopReason::AdminRequest
            } else {
                StopReason::GameFinished
            };
            reason.as_str().into()
        }),
        correlation_id: "lobby-req-77".into(),
        command_id: "0192f0c4-5b7e-7c3a-9d2e-4f1a2b3c4d5e".into(),
        image_ref: images.then(|| "registry.example:5000/galaxy/engine:1.4.3".into()),
        previous_image_ref: (op == OpKind::Patch || outer == Some(OpKind::Patch))
            .then(|| "registry.example:5000/galaxy/engine:1.4.2".into()),
        container_id: Some("3f2a9c1b7d4e".into()),
        address: images.then(|| "172.18.0.5".into()),
        result,
        rolled_back: false,
        started_at: at(1),
        finished_at: at(3),
    }
}

/// Every result an entry can have: success, no-op, and a failure per code.
fn results() -> Vec<EntryResult> {
    let mut all = vec![EntryResult::SUCCESS, EntryResult::NOOP];
    all.extend(
        ErrorCode::ALL
            .into_iter()
            .map(|code| EntryResult::Failure(Failure::new(code, format!("{code}: details")))),
    );
    all
}

/// Every entry shape the lifecycle writes (SPEC §2-3), with every result.
fn every_entry() -> Vec<OperationEntry> {
    let mut entries = Vec::new();
    for result in results() {
        for &op in OpKind::ALL.iter().filter(|op| op.is_command()) {
            entries.push(entry(op, None, result.clone()));
        }
        for outer in [OpKind::Restart, OpKind::Patch, OpKind::Remove] {
            for inner in [OpKind::Start, OpKind::Stop] {
                entries.push(entry(inner, Some(outer), result.clone()));
            }
        }
        // The rollback start of a patch, whatever its own outcome.
        let mut rollback = entry(OpKind::Start, Some(OpKind::Patch), result.clone());
        rollback.rolled_back = true;
        entries.push(rollback);
    }
    // A patch that failed and was rolled back.
    let mut rolled_back = entry(
        OpKind::Patch,
        None,
        EntryResult::Failure(Failure::new(
            ErrorCode::ContainerStartFailed,
            "inner start failed: exited with code 1; rolled back",
        )),
    );
    rolled_back.rolled_back = true;
    entries.push(rolled_back);
    // The reconciler's exit entry (SPEC §11): the only shape an exit has.
    let mut exit = entry(
        OpKind::Exit,
        None,
        EntryResult::Failure(Failure::new(
            ErrorCode::EngineExited,
            "engine exited without a command: exit code 137, OOM killed: yes",
        )),
    );
    exit.op_source = "reconciler".into();
    exit.reason = None;
    entries.push(exit);
    // Requests rejected by validation echo the raw input.
    for &op in OpKind::ALL.iter().filter(|op| op.is_command()) {
        for code in [ErrorCode::InvalidRequest, ErrorCode::ImageNotAllowed] {
            let mut e = entry(
                op,
                None,
                EntryResult::Failure(Failure::new(code, "bad input")),
            );
            e.game_id = if code == ErrorCode::InvalidRequest {
                String::new()
            } else {
                "../etc".into()
            };
            e.op_source = String::new();
            e.reason = Some("bored".into());
            e.image_ref = Some("Not An Image".into());
            entries.push(e);
        }
    }
    entries
}

#[test]
fn every_event_the_code_builds_matches_the_schema() {
    let entries = every_entry();
    assert!(entries.len() > 100, "{} entries", entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let event = OutcomeEvent::from_entry(entry, 1000 + i as i64, Uuid::now_v7());
        let value = serde_json::to_value(&event).unwrap();
        schema::assert_valid_event(&value);
        let back: OutcomeEvent = serde_json::from_value(value).unwrap();
        assert_eq!(back, event);
    }
}

#[test]
fn the_event_schema_lists_exactly_the_struct_fields() {
    let schema = schema::load_schema("event.schema.json");
    let mut event = OutcomeEvent::from_entry(
        &entry(OpKind::Start, None, EntryResult::SUCCESS),
        1,
        Uuid::now_v7(),
    );
    // `node` is left out of an event that has none (one stored before nodes
    // existed), so it is not required; every event a worker writes has it.
    let without_node = strings(
        serde_json::to_value(&event)
            .unwrap()
            .as_object()
            .unwrap()
            .keys(),
    );
    event.node = Some("node-a".into());
    let serialized = serde_json::to_value(&event).unwrap();
    let fields = strings(serialized.as_object().unwrap().keys());
    assert_eq!(
        fields.difference(&without_node).collect::<Vec<_>>(),
        ["node"]
    );
    let required = strings(
        schema["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap()),
    );
    let properties = strings(schema["properties"].as_object().unwrap().keys());
    assert_eq!(required, without_node, "required vs OutcomeEvent");
    assert_eq!(properties, fields, "properties vs OutcomeEvent");
    assert_eq!(schema["additionalProperties"], json!(false));
}

#[test]
fn the_event_schema_rejects_what_the_code_never_sends() {
    let validator = schema::event_schema_validator();
    let base: Value = serde_json::from_slice(
        &std::fs::read(fixtures_root().join("events/runtime.patch.success.json")).unwrap(),
    )
    .unwrap();
    assert!(validator.is_valid(&base));

    // Every field is always present, but `node`: an event stored before
    // nodes existed has none.
    assert!(base.get("node").is_some(), "the fixture names its node");
    for key in base.as_object().unwrap().keys() {
        let mut v = base.clone();
        v.as_object_mut().unwrap().remove(key);
        assert_eq!(
            validator.is_valid(&v),
            key == "node",
            "without {key}: {v:#}"
        );
    }

    type Edit = fn(&mut Value);
    let cases: &[(&str, Edit)] = &[
        ("an unknown field", |v| v["extra"] = json!(1)),
        ("schema_version 2", |v| v["schema_version"] = json!(2)),
        ("an uppercase event_id", |v| {
            v["event_id"] = json!("0192F0C4-6000-7000-8000-000000000981")
        }),
        ("a non-UTC timestamp", |v| {
            v["finished_at"] = json!("2026-11-26T09:00:04.870+02:00")
        }),
        ("a date that is not a time", |v| {
            v["started_at"] = json!("2026-11-26")
        }),
        ("operation_id 0", |v| v["operation_id"] = json!(0)),
        ("an empty command_id", |v| v["command_id"] = json!("")),
        ("an unknown error code", |v| {
            v["outcome"] = json!("failure");
            v["error_code"] = json!("exploded");
            v["error_message"] = json!("boom");
        }),
        ("a failure without a code", |v| {
            v["outcome"] = json!("failure");
            v["error_message"] = json!("boom");
        }),
        ("a failure without a message", |v| {
            v["outcome"] = json!("failure");
            v["error_code"] = json!("internal");
        }),
        ("a success with a code", |v| {
            v["error_code"] = json!("internal")
        }),
        ("a success with a message", |v| {
            v["error_message"] = json!("boom")
        }),
        ("a failed no-op", |v| {
            v["outcome"] = json!("failure");
            v["error_code"] = json!("internal");
            v["error_message"] = json!("boom");
            v["noop"] = json!(true);
        }),
        ("an entry without an op", |v| v["op"] = Value::Null),
        ("an entry with an unknown op", |v| {
            v["op"] = json!("explode")
        }),
        ("an entry without op_source", |v| {
            v["op_source"] = Value::Null
        }),
        ("a successful rejected event", |v| {
            v["operation_id"] = Value::Null
        }),
        ("an inner patch", |v| v["outer_op"] = json!("patch")),
        ("an inner step of a start", |v| {
            v["op"] = json!("stop");
            v["outer_op"] = json!("start");
        }),
        ("a successful rolled-back patch", |v| {
            v["rolled_back"] = json!(true)
        }),
        ("a rolled-back stop", |v| {
            v["op"] = json!("stop");
            v["rolled_back"] = json!(true);
        }),
        ("an invalid game_id past validation", |v| {
            v["game_id"] = json!("../etc")
        }),
        ("an empty game_id past validation", |v| {
            v["game_id"] = json!("")
        }),
        ("an unknown op_source past validation", |v| {
            v["op_source"] = json!("hacker")
        }),
        ("an unknown reason past validation", |v| {
            v["reason"] = json!("bored")
        }),
        ("a null node", |v| v["node"] = Value::Null),
        ("an empty node", |v| v["node"] = json!("")),
        ("a node that is no node name", |v| {
            v["node"] = json!("node b")
        }),
    ];
    for (what, edit) in cases {
        let mut v = base.clone();
        edit(&mut v);
        assert!(!validator.is_valid(&v), "the schema accepts {what}: {v:#}");
    }
}

#[test]
fn assert_valid_event_lists_every_error() {
    let mut v = serde_json::to_value(OutcomeEvent::from_entry(
        &entry(OpKind::Stop, None, EntryResult::SUCCESS),
        7,
        Uuid::now_v7(),
    ))
    .unwrap();
    schema::assert_valid_event(&v);
    v["schema_version"] = json!(2);
    v["extra"] = json!(true);
    let panic = std::panic::catch_unwind(|| schema::assert_valid_event(&v)).unwrap_err();
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("/schema_version"), "{message}");
    assert!(message.contains("extra"), "{message}");
}

#[test]
fn the_event_schema_allows_an_exit_only_as_the_reconcilers_engine_exited_failure() {
    let validator = schema::event_schema_validator();
    let base: Value = serde_json::from_slice(
        &std::fs::read(fixtures_root().join("events/runtime.exit.failure.json")).unwrap(),
    )
    .unwrap();
    assert!(validator.is_valid(&base));
    for (key, value) in [
        ("op_source", json!("lobby")),
        ("error_code", json!("container_start_failed")),
        ("outer_op", json!("restart")),
        ("noop", json!(true)),
    ] {
        let mut v = base.clone();
        v[key] = value.clone();
        assert!(
            !validator.is_valid(&v),
            "accepted an exit with {key} {value}"
        );
    }
    let mut v = base.clone();
    v["outcome"] = json!("success");
    v["error_code"] = Value::Null;
    v["error_message"] = Value::Null;
    assert!(!validator.is_valid(&v), "accepted a successful exit");
}
