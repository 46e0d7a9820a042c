//! One integration-test binary against the real services (PostgreSQL, Redis,
//! Docker). Each test isolates itself: its own database, Redis key prefix,
//! container prefix, game ids and state directory.

mod docker_support;
mod engine;
mod fakes;
mod harness;
mod lease;
mod lifecycle;
mod recovery;
#[path = "../support/schema.rs"]
mod schema;
mod store;
mod worker;
