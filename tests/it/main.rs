//! One integration-test binary against the real services (PostgreSQL, Redis,
//! Docker). Each test isolates itself: its own database, Redis key prefix,
//! container prefix, game ids and state directory.

mod docker_support;
mod engine;
mod fakes;
mod harness;
mod lease;
mod lifecycle;
mod outages;
// The fault suite's private service instances (spare ports, teardown
// manifests), for the tests that kill a dependency.
#[path = "../faults/procs.rs"]
#[allow(dead_code)]
mod procs;
mod private;
mod recovery;
mod relay;
#[path = "../support/schema.rs"]
mod schema;
#[path = "../faults/services.rs"]
#[allow(dead_code)]
mod services;
mod store;
mod topology;
mod worker;
