//! The relay's HTTP endpoint: `/metrics` (Prometheus text format) and
//! `/health`, `/health/live`, `/health/ready` (JSON).
//!
//! | path | 200 when | 503 when |
//! |---|---|---|
//! | `/health/live` | the publishing loop turned within [`LIVENESS_LIMIT`] and no partition has been stalled that long while Kafka answers | either; the body lists stalled partitions with their errors |
//! | `/health/ready` | PostgreSQL and Kafka answered their last check | either did not |
//! | `/health` | live and ready | otherwise |
//!
//! [`LIVENESS_LIMIT`]: consign_relay::health::LIVENESS_LIMIT

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use consign_relay::{Health, Liveness, Readiness};

#[derive(Clone)]
struct Shared {
    health: Health,
    metrics: Option<PrometheusHandle>,
}

/// Serves the endpoint on `listener` until `stop` is cancelled. Without a
/// Prometheus handle, `/metrics` answers 404.
///
/// # Errors
/// If the listener fails.
pub(crate) async fn serve(
    listener: TcpListener,
    health: Health,
    metrics: Option<PrometheusHandle>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render))
        .route("/health", get(overall))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .with_state(Shared { health, metrics });
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

async fn render(State(shared): State<Shared>) -> impl IntoResponse {
    match &shared.metrics {
        Some(handle) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        ),
        None => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "text/plain")],
            "no metrics recorder installed\n".to_owned(),
        ),
    }
}

fn status(ok: bool) -> StatusCode {
    if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn live(State(shared): State<Shared>) -> impl IntoResponse {
    let liveness = shared.health.liveness();
    (status(liveness.live), Json(liveness))
}

async fn ready(State(shared): State<Shared>) -> impl IntoResponse {
    let readiness = shared.health.readiness();
    (status(readiness.ready), Json(readiness))
}

#[derive(Serialize)]
struct Overall {
    #[serde(flatten)]
    liveness: Liveness,
    #[serde(flatten)]
    readiness: Readiness,
}

async fn overall(State(shared): State<Shared>) -> impl IntoResponse {
    let liveness = shared.health.liveness();
    let readiness = shared.health.readiness();
    (
        status(liveness.live && readiness.ready),
        Json(Overall {
            liveness,
            readiness,
        }),
    )
}
