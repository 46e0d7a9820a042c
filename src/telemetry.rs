//! Telemetry in one place: the tracing subscriber (JSON in production,
//! pretty locally, `RUST_LOG` to filter) and the Prometheus metrics, with
//! every metric name the service records.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

/// Operations recorded, by `op`, `outcome` and `error_code` (`none` on
/// success).
pub const OPERATIONS: &str = "rtmanager_operations_total";
/// Duration of outer operations, by `op`.
pub const OPERATION_SECONDS: &str = "rtmanager_operation_duration_seconds";
/// Time to take a game's lease.
pub const LEASE_ACQUIRE_SECONDS: &str = "rtmanager_lease_acquire_seconds";
/// Docker API calls, by `call`.
pub const DOCKER_CALL_SECONDS: &str = "rtmanager_docker_call_seconds";
/// Messages taken from the command queue.
pub const COMMANDS_CONSUMED: &str = "rtmanager_commands_consumed_total";
/// Commands answered with `invalid_request` or `image_not_allowed`.
pub const COMMANDS_REJECTED: &str = "rtmanager_commands_rejected_total";
/// Undecodable messages sent to the dead-letter exchange.
pub const COMMANDS_DEAD_LETTERED: &str = "rtmanager_commands_dead_lettered_total";
/// Commands forwarded to their game's node (SPEC §12), by node.
pub const COMMANDS_FORWARDED: &str = "rtmanager_commands_forwarded_total";
/// Events written but not yet published.
pub const OUTBOX_BACKLOG: &str = "rtmanager_outbox_backlog";
/// Events published by the relay.
pub const EVENTS_PUBLISHED: &str = "rtmanager_events_published_total";
/// Event publications the broker refused (`nack`) or returned unroutable;
/// each is retried.
pub const EVENTS_REFUSED: &str = "rtmanager_events_refused_total";
/// Replies to `reply_to` the broker refused or could not route (never
/// retried).
pub const REPLIES_FAILED: &str = "rtmanager_replies_failed_total";
/// Commands being handled right now.
pub const OPERATIONS_IN_FLIGHT: &str = "rtmanager_operations_in_flight";
/// Engines that stopped without a command, reported by the reconciler, by
/// `reason` (`exited`, `oom`, `missing`).
pub const ENGINE_EXITS: &str = "rtmanager_engine_exits_total";
/// Restarts the reconciler ran after an exit, by `outcome`.
pub const AUTO_RESTARTS: &str = "rtmanager_auto_restarts_total";
/// Managed containers of this worker's prefix that no record names (as of
/// the last periodic pass); never touched.
pub const ORPHAN_CONTAINERS: &str = "rtmanager_orphan_containers";

/// Installs the tracing subscriber and the Prometheus recorder. Call once.
pub fn init(config: &Config) -> anyhow::Result<PrometheusHandle> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,lapin=warn,sqlx=warn,bollard=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let installed = match config.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
    installed.map_err(|e| anyhow::anyhow!("install the log subscriber: {e}"))?;
    metrics_handle()
}

/// The Prometheus recorder (installed on first call; later calls return a
/// handle to the same one, so tests can run several workers in-process).
/// The install runs inside the `OnceLock`, so two workers starting at once
/// cannot both try it (the second install would fail).
pub fn metrics_handle() -> anyhow::Result<PrometheusHandle> {
    use std::sync::OnceLock;
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
            ];
            PrometheusBuilder::new()
                .set_buckets(&buckets)
                .map_err(|e| format!("metrics buckets: {e}"))?
                .install_recorder()
                .map_err(|e| format!("install the metrics recorder: {e}"))
        })
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

/// Describes every metric once, so `/metrics` carries HELP lines.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        OPERATIONS,
        "Operations recorded, by op, outcome and error_code"
    );
    describe_histogram!(
        OPERATION_SECONDS,
        metrics::Unit::Seconds,
        "Duration of outer operations, by op"
    );
    describe_histogram!(
        LEASE_ACQUIRE_SECONDS,
        metrics::Unit::Seconds,
        "Time to take a game's lease"
    );
    describe_histogram!(
        DOCKER_CALL_SECONDS,
        metrics::Unit::Seconds,
        "Docker API calls, by call"
    );
    describe_counter!(COMMANDS_CONSUMED, "Messages taken from the command queue");
    describe_counter!(
        COMMANDS_REJECTED,
        "Commands answered invalid_request or image_not_allowed"
    );
    describe_counter!(COMMANDS_DEAD_LETTERED, "Undecodable messages dead-lettered");
    describe_counter!(
        COMMANDS_FORWARDED,
        "Commands forwarded to the node their game is placed on"
    );
    describe_gauge!(
        OUTBOX_BACKLOG,
        "Outcome events written but not yet published"
    );
    describe_counter!(EVENTS_PUBLISHED, "Outcome events published by the relay");
    describe_counter!(
        EVENTS_REFUSED,
        "Event publications refused or returned unroutable by the broker (retried)"
    );
    describe_counter!(
        REPLIES_FAILED,
        "Replies the broker refused or could not route (not retried)"
    );
    describe_gauge!(OPERATIONS_IN_FLIGHT, "Commands being handled right now");
    describe_counter!(
        ENGINE_EXITS,
        "Engines that stopped without a command, by reason (exited, oom, missing)"
    );
    describe_counter!(
        AUTO_RESTARTS,
        "Restarts the reconciler ran after an exit, by outcome"
    );
    describe_gauge!(
        ORPHAN_CONTAINERS,
        "Managed containers no runtime record names (never touched)"
    );
    // Counters exist from the start (at 0), so an alert on a rate never
    // sees a missing series.
    for counter in [
        COMMANDS_CONSUMED,
        COMMANDS_REJECTED,
        COMMANDS_DEAD_LETTERED,
        EVENTS_PUBLISHED,
        EVENTS_REFUSED,
        REPLIES_FAILED,
    ] {
        metrics::counter!(counter).increment(0);
    }
}
