//! The message schemas of `schemas/` as ready validators, shared by the
//! contract tests (`tests/contract.rs`) and the integration tests
//! (`tests/it/`): include it with `#[path = "support/schema.rs"] mod schema;`
//! (or `"../support/schema.rs"` from `tests/it/`).
//!
//! Formats are *asserted* (`date-time`, `uuid`): JSON Schema 2020-12 treats
//! `format` as an annotation unless the validator is told otherwise, and the
//! worker's decoder does check that `requested_at` is RFC 3339.

// Each including test binary uses a different subset.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use serde_json::Value;

/// `schemas/<file>` in this crate.
pub fn schema_path(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("schemas")
        .join(file)
}

/// The parsed schema document `schemas/<file>`.
pub fn load_schema(file: &str) -> Value {
    let path = schema_path(file);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// A draft 2020-12 validator for `schema`, asserting formats.
pub fn validator_for(schema: &Value) -> jsonschema::Validator {
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(schema)
        .unwrap_or_else(|e| panic!("the schema does not compile: {e}"))
}

/// A validator for `schemas/command.schema.json`.
pub fn command_schema_validator() -> jsonschema::Validator {
    validator_for(&load_schema("command.schema.json"))
}

/// A validator for `schemas/event.schema.json`.
pub fn event_schema_validator() -> jsonschema::Validator {
    validator_for(&load_schema("event.schema.json"))
}

/// Every error `validator` finds in `value`, one line each (`/path: why`).
pub fn validation_errors(validator: &jsonschema::Validator, value: &Value) -> Vec<String> {
    validator
        .iter_errors(value)
        .map(|e| format!("{}: {e}", display_path(&e.instance_path().to_string())))
        .collect()
}

/// Panics, listing every validation error, unless `value` is a valid
/// outcome event body.
pub fn assert_valid_event(value: &Value) {
    static EVENTS: LazyLock<jsonschema::Validator> = LazyLock::new(event_schema_validator);
    let errors = validation_errors(&EVENTS, value);
    assert!(
        errors.is_empty(),
        "the event does not match schemas/event.schema.json:\n  {}\nevent: {value:#}",
        errors.join("\n  ")
    );
}

/// Panics, listing every validation error, unless `value` is a valid
/// command body.
pub fn assert_valid_command(value: &Value) {
    static COMMANDS: LazyLock<jsonschema::Validator> = LazyLock::new(command_schema_validator);
    let errors = validation_errors(&COMMANDS, value);
    assert!(
        errors.is_empty(),
        "the command does not match schemas/command.schema.json:\n  {}\ncommand: {value:#}",
        errors.join("\n  ")
    );
}

fn display_path(pointer: &str) -> &str {
    if pointer.is_empty() {
        "(root)"
    } else {
        pointer
    }
}
