//! HTTP on `RTM_HTTP_ADDR`: `/healthz` (the process is alive), `/readyz`
//! (each dependency named with its state) and `/metrics` (Prometheus).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

/// The last known state of each dependency, written by the probes, the
/// consumer and the relay, read by `/readyz`.
#[derive(Debug, Default)]
pub struct Readiness {
    pub broker: AtomicBool,
    pub database: AtomicBool,
    pub redis: AtomicBool,
    pub docker: AtomicBool,
}

impl Readiness {
    pub fn set(flag: &AtomicBool, up: bool) {
        flag.store(up, Ordering::Relaxed);
    }

    /// `(name, up)` for every dependency, in a stable order.
    pub fn states(&self) -> [(&'static str, bool); 4] {
        [
            ("broker", self.broker.load(Ordering::Relaxed)),
            ("database", self.database.load(Ordering::Relaxed)),
            ("redis", self.redis.load(Ordering::Relaxed)),
            ("docker", self.docker.load(Ordering::Relaxed)),
        ]
    }

    pub fn ready(&self) -> bool {
        self.states().iter().all(|(_, up)| *up)
    }
}

#[derive(Clone)]
struct AppState {
    readiness: Arc<Readiness>,
    metrics: PrometheusHandle,
}

pub fn router(readiness: Arc<Readiness>, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { readiness, metrics })
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> Response {
    let deps: serde_json::Map<String, serde_json::Value> = state
        .readiness
        .states()
        .iter()
        .map(|(name, up)| ((*name).to_owned(), json!(if *up { "up" } else { "down" })))
        .collect();
    let ready = state.readiness.ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({ "status": if ready { "ready" } else { "not ready" }, "dependencies": deps });
    (status, axum::Json(body)).into_response()
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
