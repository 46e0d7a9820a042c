//! One integration-test binary against the real services (PostgreSQL, Redis,
//! RabbitMQ, Docker). Each test isolates itself: its own database, Redis key prefix,
//! container prefix, game ids and state directory.

mod consumer;
mod docker_support;
mod engine;
mod fakes;
mod harness;
mod lease;
mod lifecycle;
mod nodes;
mod outages;
mod placement;
mod private;
// The fault suite's process plumbing, and (`services`, below) its private
// Redis/PostgreSQL instances on spare ports, for the tests that kill one.
#[path = "../faults/procs.rs"]
#[allow(dead_code)]
mod procs;
mod reconciler;
mod recovery;
mod relay;
#[path = "../support/schema.rs"]
mod schema;
mod secrets;
#[path = "../faults/services.rs"]
#[allow(dead_code)]
mod services;
mod store;
mod topology;
mod worker;
