//! `rtmanager serve`: wires the adapters, the lifecycle, the consumer, the
//! outbox relay, the HTTP endpoints and the readiness probes, and runs them
//! until `shutdown` resolves (mini-redis `server.rs` style).
//!
//! Shutdown order: stop consuming → let in-flight commands finish (within
//! `RTM_SHUTDOWN_TIMEOUT`; their leases are released as they end) → one
//! last relay pass → close the broker connections → stop HTTP.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use backon::{ExponentialBuilder, Retryable};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::config::{Config, NodeConfig};
use crate::inbound::consumer::Consumer;
use crate::inbound::http;
use crate::lifecycle::Lifecycle;
use crate::outbound::docker::DockerEngine;
use crate::outbound::postgres::{HEARTBEAT, PgStore};
use crate::outbound::redis_lease::RedisLeases;
use crate::outbound::relay::Relay;
use crate::ports::ContainerEngine;
use crate::readiness::Readiness;
use crate::reconciler::Reconciler;
use crate::shutdown::{self, Shutdown};
use crate::telemetry;

/// How often the readiness probes run.
const PROBE_EVERY: Duration = Duration::from_secs(2);
/// How long one probe may take before its dependency counts as down.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the metrics recorder folds histogram samples into its buckets.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

async fn within<E: std::fmt::Display>(
    limit: Duration,
    probe: impl Future<Output = Result<(), E>>,
) -> Result<(), String> {
    match tokio::time::timeout(limit, probe).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {limit:?}")),
    }
}

/// Runs the worker until `shutdown` resolves, then stops gracefully.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_with(config, |docker| docker, shutdown).await
}

/// [`run`], with the lifecycle's engine made from the Docker adapter by
/// `engine`: how tests put a fault-injecting engine inside an otherwise
/// real worker. The readiness probe still pings Docker itself.
pub async fn run_with<E: ContainerEngine>(
    config: Config,
    engine: impl FnOnce(DockerEngine) -> E,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    telemetry::describe_metrics();
    let metrics = telemetry::metrics_handle()?;
    let (trigger, stop) = shutdown::channel();
    tokio::spawn(async move {
        shutdown.await;
        info!("shutdown requested");
        trigger.fire();
    });

    // At start-up a dependency may still be coming up: retry for
    // RTM_RETRY_FOR before giving up.
    let store = at_startup(&config, "PostgreSQL", || {
        PgStore::connect(&config.database_url)
    })
    .await?;
    store.migrate().await?;
    // Registered before consuming, so placement can choose this node (and
    // a record from before nodes finds its node) once commands arrive.
    let node = config.node.clone();
    let store = store.on_node(node.name.clone());
    at_startup(&config, "PostgreSQL", || async {
        store.heartbeat(&node).await?;
        Ok(())
    })
    .await?;
    let adopted = store.adopt_unplaced(&node.name).await?;
    if adopted > 0 {
        info!(adopted, node = %node.name, "this first node took the records written before nodes");
    }
    let leases = RedisLeases::connect_lazy(&config.redis_url, &config.redis_prefix)?;
    let docker = at_startup(&config, "Docker", || {
        DockerEngine::connect(config.docker.clone())
    })
    .await?;
    info!(docker_api = %docker.api_version(), "connected to PostgreSQL and Docker");

    let readiness = Arc::new(Readiness::default());
    let listener = TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("listen on RTM_HTTP_ADDR {}", config.http_addr))?;
    info!(addr = %config.http_addr, "serving /healthz, /readyz and /metrics");
    // The recorder drains histogram samples only in its upkeep, which its
    // own HTTP listener would run; ours is axum's, so it is run here, or
    // samples pile up in memory until `/metrics` is scraped.
    let upkeep = {
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(METRICS_UPKEEP);
            loop {
                every.tick().await;
                metrics.run_upkeep();
            }
        })
    };
    let app = http::router(readiness.clone(), metrics);
    let mut http_stop = stop.clone();
    let http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { http_stop.wait().await })
            .await
    });

    let heartbeat = tokio::spawn(heartbeat(store.clone(), node.clone(), stop.clone()));
    let probes = tokio::spawn(probe(
        store.clone(),
        leases.clone(),
        docker.clone(),
        readiness.clone(),
        stop.clone(),
    ));

    // The store wakes the relay after each outbox write.
    let relay_wake = Arc::new(Notify::new());
    let store = store.notifying(relay_wake.clone());
    let (relay_trigger, relay_stop) = shutdown::channel();
    // Supervised: a relay that panics (a bug) is started again, so events
    // never stop for every game because of one bad pass.
    let relay = {
        let (store, url, amqp) = (store.clone(), config.amqp_url.clone(), config.amqp.clone());
        let (wake, readiness) = (relay_wake.clone(), readiness.clone());
        let retention = config.retention;
        tokio::spawn(async move {
            loop {
                let relay = Relay::new(
                    store.clone(),
                    url.clone(),
                    amqp.clone(),
                    wake.clone(),
                    readiness.clone(),
                )
                .with_retention(retention);
                match tokio::spawn(relay.run(relay_stop.clone())).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::error!(error = %e, "the outbox relay crashed; restarting it");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        })
    };

    let lifecycle = Lifecycle::new(store, leases, engine(docker), config.lifecycle.clone());
    let reconciler = tokio::spawn(
        Reconciler::new(
            lifecycle.clone(),
            config.reconciler,
            config.docker.container_prefix.clone(),
        )
        .run(stop.clone(), config.shutdown_timeout),
    );
    Consumer::new(
        lifecycle.clone(),
        config.amqp_url.clone(),
        config.amqp.clone(),
        node.name.clone(),
        readiness,
        relay_wake.clone(),
        stop,
    )
    .run(config.shutdown_timeout)
    .await;
    // Operations stopped at the shutdown timeout released their leases as
    // they unwound; one whose Docker call never returned keeps it until it
    // expires, rather than let another worker in mid-call.
    if lifecycle.leases_held() > 0 {
        warn!(
            leases = lifecycle.leases_held(),
            "exiting with leases held by operations still in a Docker call; they expire within RTM_LEASE_TTL"
        );
    }

    // The reconciler drains its looks in flight alongside the consumer (both
    // began at the same signal) and bounds its own wait, so this waits only
    // out of caution. The relay outlives both by one pass, so the last
    // outcomes go out.
    if tokio::time::timeout(
        config.shutdown_timeout + crate::shutdown::STOPPING_GRACE + Duration::from_secs(5),
        reconciler,
    )
    .await
    .is_err()
    {
        warn!("the reconciler did not stop in time");
    }
    relay_trigger.fire();
    relay_wake.notify_one();
    if tokio::time::timeout(Duration::from_secs(10), relay)
        .await
        .is_err()
    {
        warn!("the outbox relay did not stop in time; unsent events stay in the outbox");
    }
    probes.abort();
    upkeep.abort();
    heartbeat.abort();
    match http.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "HTTP server error"),
        Err(e) => warn!(error = %e, "HTTP server task failed"),
    }
    info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

async fn at_startup<T, F, Fut>(config: &Config, what: &str, connect: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let backoff = ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .without_max_times()
        .with_total_delay(Some(config.lifecycle.retry_for));
    connect
        .retry(backoff)
        .sleep(tokio::time::sleep)
        .notify(|e, delay| warn!(error = format!("{e:#}"), retry_in = ?delay, "{what} is not reachable yet"))
        .await
        .with_context(|| format!("{what} stayed unreachable for RTM_RETRY_FOR"))
}

/// Tells the database every [`HEARTBEAT`] that this node is alive, so
/// placement keeps choosing it (SPEC §12). A missed beat (the database is
/// out) is only logged: three in a row and placement skips the node.
async fn heartbeat(store: PgStore, node: NodeConfig, mut stop: Shutdown) {
    let mut every = tokio::time::interval(HEARTBEAT);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = stop.wait() => return,
        }
        if let Err(e) = store.heartbeat(&node).await {
            warn!(error = %e, node = %node.name, "node heartbeat failed");
        }
    }
}

/// Keeps `/readyz` current: pings each dependency every few seconds.
async fn probe(
    store: PgStore,
    leases: RedisLeases,
    engine: DockerEngine,
    readiness: Arc<Readiness>,
    mut stop: Shutdown,
) {
    loop {
        // Each probe is time-boxed, so one slow dependency (a pool waiting
        // for a connection) cannot hide the state of the others.
        let (db, redis, docker) = tokio::join!(
            within(PROBE_TIMEOUT, store.ping()),
            within(PROBE_TIMEOUT, leases.ping()),
            within(PROBE_TIMEOUT, engine.ping()),
        );
        for (flag, name, result) in [
            (
                &readiness.database,
                "database",
                db.map_err(|e| e.to_string()),
            ),
            (&readiness.redis, "redis", redis.map_err(|e| e.to_string())),
            (
                &readiness.docker,
                "docker",
                docker.map_err(|e| e.to_string()),
            ),
        ] {
            let was_up = flag.load(std::sync::atomic::Ordering::Relaxed);
            match &result {
                Ok(()) if !was_up => info!(dependency = name, "dependency is up"),
                Err(e) if was_up => warn!(dependency = name, error = %e, "dependency is down"),
                _ => {}
            }
            Readiness::set(flag, result.is_ok());
        }
        tokio::select! {
            () = tokio::time::sleep(PROBE_EVERY) => {}
            () = stop.wait() => return,
        }
    }
}
