//! The HTTP adapter: Buildbot's REST data API v2 and JSON-RPC control, its WebSocket event
//! stream, the change hooks, the web UI and the health probes. Handlers decode, call the master
//! or the store, and encode; errors become HTTP responses in exactly one place ([`errors`]).

mod errors;
pub(crate) mod hooks;
pub(crate) mod login;
pub(crate) mod rest;
pub(crate) mod rpc;
pub mod ws;
pub mod www;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};

use crate::master::Master;

pub use errors::ApiError;

/// The router of the master's HTTP port.
pub async fn router(master: Arc<Master>) -> Result<Router, crate::store::StoreError> {
    let limit = master.config.http.max_body_bytes;
    // Forges send big pushes (GitHub caps a delivery at 25 MB); the hooks get their own limit.
    let hook_limit = DefaultBodyLimit::max(master.config.change_hooks.max_body_bytes);
    let hook_body = axum::middleware::from_fn_with_state(Arc::clone(&master), hook_body_in_time);
    crate::telemetry::handle();
    let ui = match &master.config.http.www {
        Some(dir) => www::Ui::open(dir).map_err(|error| tracing::error!(%error, "http.www: the web UI is off")).ok(),
        None => www::Ui::discover(),
    };
    match &ui {
        Some(ui) => {
            tracing::info!(dir = %ui.static_dir.display(), plugins = ui.plugins.len(), "serving Buildbot's web UI at /")
        }
        None => tracing::info!("no buildbot-www installed: / says how to install it"),
    }
    let https = master.config.http.tls.is_some();
    let users = match master.config.control_access() {
        crate::config::ControlAccess::Credentials { users, .. } => users,
        _ => Vec::new(),
    };
    let sessions = Arc::new(login::Sessions::new(master.store.shared_key("ui-session").await?, &users, https));
    let ui = www::routes(ui, master.config.title.clone(), https, Arc::clone(&sessions));
    let hub = ws::Hub::start(Arc::clone(&master));
    Ok(Router::new()
        .route("/api/v2", get(rest::root))
        .route("/api/v2/", get(rest::root))
        .route("/api/v2/pools", get(pools))
        .route("/api/v2/reports", get(reports))
        .route("/api/v2/{*path}", get(rest::get).post(rpc::post))
        .route("/change_hook", any(hooks::base_dialect).layer(hook_limit).layer(hook_body.clone()))
        .route("/change_hook/{dialect}", any(hooks::dialect).layer(hook_limit).layer(hook_body))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/ws", get(ws::upgrade))
        .merge(ui)
        .merge(login::routes(Arc::clone(&sessions)))
        .layer(axum::Extension(hub))
        .layer(axum::Extension(sessions))
        .layer(axum::Extension(Arc::new(hooks::Hooks::from_config(&master.config.change_hooks))))
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn(refuse_nul_in_uri))
        .with_state(master))
}

/// Reads a change hook's body whole within `http.request_timeout` before the hook sees it: a
/// sender slower than that (or one that stalls) is answered 408 and nothing is stored, so
/// deliveries trickled in cannot hold connections open for long.
async fn hook_body_in_time(
    axum::extract::State(master): axum::extract::State<Arc<Master>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let limit = master.config.change_hooks.max_body_bytes;
    let deadline = std::time::Duration::from_secs_f64(master.config.http.request_timeout);
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(deadline, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(body)) => next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(body))).await,
        Ok(Err(error)) if is_too_large(&error) => (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than change_hooks.max_body_bytes ({limit} bytes)\n"),
        )
            .into_response(),
        Ok(Err(_)) => (StatusCode::BAD_REQUEST, "the body could not be read\n").into_response(),
        Err(_) => (
            StatusCode::REQUEST_TIMEOUT,
            format!("the body did not arrive within http.request_timeout ({} s)\n", deadline.as_secs_f64()),
        )
            .into_response(),
    }
}

/// Whether reading a body failed because it passed its limit.
fn is_too_large(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = source {
        if cause.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// Refuses a request whose path or query holds a NUL byte (`%00`), which no database stores the
/// same way, with 400 naming the place, before any handler sees it.
async fn refuse_nul_in_uri(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match nul_in_uri(request.uri()) {
        Some(place) => ApiError::BadRequest(format!("{place}: text must not contain NUL bytes")).into_response(),
        None => next.run(request).await,
    }
}

fn nul_in_uri(uri: &axum::http::Uri) -> Option<String> {
    if uri.path().contains("%00") {
        return Some("the path".into());
    }
    let query = uri.query()?;
    query.split('&').find(|pair| pair.contains("%00")).map(|pair| {
        let key = pair.split('=').next().unwrap_or_default().replace("%00", "\\0");
        format!("query parameter {key:?}")
    })
}

/// Kiln's worker pools as this master sees them (an extension of the data API, in its envelope):
/// desired and actual workers, whether this master leads the pool's scaler, the last error.
async fn pools(axum::extract::State(master): axum::extract::State<Arc<Master>>) -> Response {
    let mut pools = Vec::new();
    for pool in master.pools() {
        let mut status = pool.status();
        // The queue as it is now, not as the scaler last looked at it; without the database,
        // what the scaler saw.
        if let Some(ids) = master.pool_builder_ids(&pool.config.name)
            && let Ok((pending, _)) = master.store.queue_counts(Some(ids)).await
        {
            status.pending = u32::try_from(pending).unwrap_or(u32::MAX);
        }
        pools.push(status);
    }
    let total = pools.len();
    axum::Json(serde_json::json!({ "pools": pools, "meta": { "total": total } })).into_response()
}

/// `GET /api/v2/reports[?state=pending|sent|skipped|failed|abandoned][&limit=N]`: what happened to
/// the newest reports (default 100, at most 1000), newest first, with the forge's last answer.
async fn reports(
    axum::extract::State(master): axum::extract::State<Arc<Master>>,
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    const STATES: [&str; 6] = ["held", "pending", "sent", "skipped", "failed", "abandoned"];
    for key in query.keys() {
        if key != "state" && key != "limit" {
            return ApiError::BadRequest(format!("unrecognized query parameter '{key}'")).into_response();
        }
    }
    let state = query.get("state").map(String::as_str);
    if let Some(state) = state
        && !STATES.contains(&state)
    {
        return ApiError::BadRequest(format!("state must be one of {}", STATES.join(", "))).into_response();
    }
    let limit = match query.get("limit").map(|l| l.parse::<i64>()) {
        None => 100,
        Some(Ok(n)) if (1..=1000).contains(&n) => n,
        Some(_) => return ApiError::BadRequest("limit must be a whole number from 1 to 1000".into()).into_response(),
    };
    match master.store.list_reports(state, limit).await {
        Ok(reports) => {
            let total = reports.len();
            axum::Json(serde_json::json!({ "reports": reports, "meta": { "total": total } })).into_response()
        }
        Err(error) => ApiError::from(error).into_response(),
    }
}

/// Prometheus's scrape: gauges read now, counters and histograms as recorded.
async fn metrics(axum::extract::State(master): axum::extract::State<Arc<Master>>) -> Response {
    if let Err(error) = master.record_metrics().await {
        tracing::warn!(%error, "metrics without the queue: the database did not answer");
    }
    let text = crate::telemetry::handle().render();
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn ready(axum::extract::State(master): axum::extract::State<Arc<Master>>) -> Response {
    // A probe must answer quickly even when the database hangs.
    let check = tokio::time::timeout(std::time::Duration::from_secs(2), master.store.schema_is_current()).await;
    match check {
        Ok(Ok(true)) if !master.signals.is_shutting_down() => (StatusCode::OK, "ready").into_response(),
        Ok(Ok(true)) => (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response(),
        Ok(Ok(false)) => (StatusCode::SERVICE_UNAVAILABLE, "database schema is not current").into_response(),
        Ok(Err(error)) => {
            tracing::debug!(%error, "not ready: the database is unreachable");
            (StatusCode::SERVICE_UNAVAILABLE, "database unreachable").into_response()
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "database does not answer").into_response(),
    }
}
