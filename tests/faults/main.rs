//! The fault suite (`make faults`): SPEC §10's guarantees proved against
//! real processes. Every scenario starts its own RabbitMQ node, PostgreSQL
//! cluster and Redis on spare ports (never touching the shared services),
//! runs `rtmanager serve` as child processes configured by environment
//! variables, breaks something (SIGKILL a worker mid-patch, restart a
//! dependency mid-stream, duplicate every command, two competing workers,
//! a paused worker), then checks the outcome against the database, the
//! events it observed and Docker. Results go to `FAULTS.md`.
//!
//! `make faults` runs it (`cargo test --test faults -- --test-threads=1`),
//! and `make test` runs it after the other tests. Scenarios take a
//! process-wide lock, so they never overlap whatever the thread count.
//! Worker and service logs of the last run stay under
//! `target/faults-logs/<scenario>/`.

mod checks;
mod procs;
mod registry;
mod report;
mod rig;
mod scenarios;
#[path = "../support/schema.rs"]
mod schema;
mod services;
mod worker;

use std::future::Future;
use std::sync::Mutex;
use std::time::Instant;

use report::Row;
use scenarios::{KillAt, KillIn};
use services::Dep;

/// One scenario at a time: they share the host's two cores and the shared
/// Docker engine, and their timings matter.
static SERIAL: Mutex<()> = Mutex::new(());

/// A test: takes the serial lock, then runs the scenario (a future, inert
/// until polled) on a runtime of its own.
fn run<F>(key: &'static str, body: F)
where
    F: Future<Output = Result<Row, String>> + Send + 'static,
{
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(scenario(key, body));
}

/// Runs one scenario in its own task (a panic becomes a failed row, not a
/// missing one), records its row in `FAULTS.md`, and fails the test on any
/// violation.
async fn scenario<F>(key: &'static str, body: F)
where
    F: Future<Output = Result<Row, String>> + Send + 'static,
{
    report::suite_started();
    let started = Instant::now();
    let title = report::title(key);
    let row = match tokio::spawn(body).await {
        Ok(Ok(row)) => row,
        Ok(Err(setup)) => {
            let mut row = Row::new(key, title);
            row.violations.push(format!("scenario aborted: {setup}"));
            row.wall = started.elapsed();
            row
        }
        Err(join) => {
            let mut row = Row::new(key, title);
            let why = if join.is_panic() {
                let p = join.into_panic();
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "a panic".into())
            } else {
                join.to_string()
            };
            row.violations.push(format!("scenario panicked: {why}"));
            row.wall = started.elapsed();
            row
        }
    };
    let failed = !row.passed();
    let summary = row.violations.join("\n  ");
    report::record(row);
    assert!(!failed, "{key}: guarantees violated:\n  {summary}");
}

#[test]
fn kill_after_lease() {
    run(
        "kill_after_lease",
        scenarios::kill_mid_patch(KillAt::AfterLease),
    );
}

#[test]
fn kill_during_pull() {
    run(
        "kill_during_pull",
        scenarios::kill_mid_patch(KillAt::DuringPull),
    );
}

#[test]
fn kill_during_inner_stop() {
    run(
        "kill_during_inner_stop",
        scenarios::kill_mid_patch(KillAt::InnerStop),
    );
}

#[test]
fn kill_after_old_removed() {
    run(
        "kill_after_old_removed",
        scenarios::kill_mid_patch(KillAt::OldRemoved),
    );
}

#[test]
fn kill_after_rename() {
    run(
        "kill_after_rename",
        scenarios::kill_mid_patch(KillAt::Renamed),
    );
}

#[test]
fn kill_after_create() {
    run(
        "kill_after_create",
        scenarios::kill_mid_patch(KillAt::NewCreated),
    );
}

#[test]
fn kill_during_start() {
    run(
        "kill_during_start",
        scenarios::kill_mid_patch(KillAt::NewStarting),
    );
}

#[test]
fn kill_during_rollback() {
    run(
        "kill_during_rollback",
        scenarios::kill_mid_op(KillIn::Rollback),
    );
}

#[test]
fn kill_during_restart() {
    run(
        "kill_during_restart",
        scenarios::kill_mid_op(KillIn::Restart),
    );
}

#[test]
fn kill_during_remove() {
    run("kill_during_remove", scenarios::kill_mid_op(KillIn::Remove));
}

#[test]
fn restart_rabbitmq() {
    run("restart_rabbitmq", scenarios::restart_dep(Dep::RabbitMq));
}

#[test]
fn restart_redis() {
    run("restart_redis", scenarios::restart_dep(Dep::Redis));
}

#[test]
fn restart_postgres() {
    run("restart_postgres", scenarios::restart_dep(Dep::Postgres));
}

#[test]
fn restart_dockerd() {
    run("restart_dockerd", scenarios::restart_dep(Dep::Docker));
}

#[test]
fn duplicates() {
    run("duplicates", scenarios::duplicates());
}

#[test]
fn two_workers() {
    run("two_workers", scenarios::two_workers());
}

#[test]
fn two_workers_closed_loop_kill() {
    run(
        "two_workers_closed_loop_kill",
        scenarios::two_workers_closed_loop_kill(),
    );
}

#[test]
fn engines_crash_during_commands() {
    run(
        "engines_crash_during_commands",
        scenarios::engines_crash_during_commands(),
    );
}

#[test]
fn paused_worker_fenced() {
    run("paused_worker_fenced", scenarios::paused_worker_fenced());
}

#[test]
fn downstream_queue_full() {
    run("downstream_queue_full", scenarios::downstream_queue_full());
}

#[test]
fn two_nodes_kill_mid_forward() {
    run(
        "two_nodes_kill_mid_forward",
        scenarios::two_nodes_kill_mid_forward(),
    );
}
