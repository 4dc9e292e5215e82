//! The worker's optional HTTP port for Kubernetes and Prometheus: `/healthz` (the process
//! answers), `/readyz` (registered with a master and taking work) and `/metrics` (commands
//! running, output streamed, connection state).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics::{counter, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static CONNECTED: AtomicBool = AtomicBool::new(false);
static DRAINING: AtomicBool = AtomicBool::new(false);
static RUNNING: AtomicU64 = AtomicU64::new(0);
/// Why the worker cannot take work before it has even connected: a directory it cannot write.
static UNUSABLE: Mutex<Option<String>> = Mutex::new(None);
/// When the last session ended, in milliseconds since the process started (0: never).
static DISCONNECTED_AT_MS: AtomicU64 = AtomicU64::new(0);

/// How long a worker that lost its master still reads as ready: a short disconnect must not
/// make it the ReplicaSet's first choice for deletion.
const READY_WHILE_RECONNECTING: Duration = Duration::from_secs(30);

fn uptime_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Every metric the worker exports.
pub const METRICS: &[&str] = &[
    "kiln_worker_connected",
    "kiln_worker_draining",
    "kiln_worker_running_commands",
    "kiln_worker_commands_total",
    "kiln_worker_output_bytes_total",
];

fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let handle = PrometheusBuilder::new().install_recorder().expect("a Prometheus recorder can be installed");
        use metrics::{Unit, describe_counter, describe_gauge};
        describe_gauge!("kiln_worker_connected", "1 while the worker is registered with a master.");
        describe_gauge!("kiln_worker_draining", "1 once the worker takes no new work (SIGTERM or the master's drain).");
        describe_gauge!("kiln_worker_running_commands", "Remote commands running now.");
        describe_counter!("kiln_worker_commands_total", "Remote commands started.");
        describe_counter!("kiln_worker_output_bytes_total", Unit::Bytes, "Command output streamed to the master.");
        connected(false);
        draining(false);
        gauge!("kiln_worker_running_commands").set(0.0);
        counter!("kiln_worker_commands_total").increment(0);
        counter!("kiln_worker_output_bytes_total").increment(0);
        handle
    })
}

/// The session registered with a master (`true`) or ended (`false`).
pub fn connected(yes: bool) {
    let was = CONNECTED.swap(yes, Ordering::SeqCst);
    if was && !yes {
        DISCONNECTED_AT_MS.store(uptime_ms(), Ordering::SeqCst);
    }
    gauge!("kiln_worker_connected").set(if yes { 1.0 } else { 0.0 });
}

/// The worker stopped taking work.
pub fn draining(yes: bool) {
    DRAINING.store(yes, Ordering::SeqCst);
    gauge!("kiln_worker_draining").set(if yes { 1.0 } else { 0.0 });
}

/// Counts a running command for as long as it lives, however its task ends.
#[derive(Debug)]
pub struct CommandGauge(());

impl CommandGauge {
    pub fn start() -> CommandGauge {
        counter!("kiln_worker_commands_total").increment(1);
        gauge!("kiln_worker_running_commands").increment(1.0);
        RUNNING.fetch_add(1, Ordering::SeqCst);
        CommandGauge(())
    }
}

impl Drop for CommandGauge {
    fn drop(&mut self) {
        gauge!("kiln_worker_running_commands").decrement(1.0);
        RUNNING.fetch_sub(1, Ordering::SeqCst);
    }
}

pub fn output(bytes: usize) {
    counter!("kiln_worker_output_bytes_total").increment(bytes as u64);
}

/// Serves the probes on `listener` until the process exits.
pub fn serve(listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
    let _ = handle();
    let router = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(|| async { handle().render() }));
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    })
}

/// Marks the worker unable to work (not ready, with the reason) or able again.
pub fn unusable(reason: Option<String>) {
    *UNUSABLE.lock().expect("probe state poisoned") = reason;
}

async fn ready() -> axum::response::Response {
    if let Some(reason) = UNUSABLE.lock().expect("probe state poisoned").clone() {
        return (StatusCode::SERVICE_UNAVAILABLE, reason).into_response();
    }
    let disconnected_at = DISCONNECTED_AT_MS.load(Ordering::SeqCst);
    let reconnecting = disconnected_at > 0
        && uptime_ms().saturating_sub(disconnected_at) < READY_WHILE_RECONNECTING.as_millis() as u64;
    readiness(
        CONNECTED.load(Ordering::SeqCst),
        DRAINING.load(Ordering::SeqCst),
        RUNNING.load(Ordering::SeqCst) > 0,
        reconnecting,
    )
    .into_response()
}

/// Whether the pod reads as ready. A worker running a command stays ready whatever else holds,
/// so the ReplicaSet, which deletes not-ready pods first, never prefers a busy one; one that
/// just lost its master stays ready while it reconnects.
fn readiness(connected: bool, draining: bool, busy: bool, reconnecting: bool) -> (StatusCode, &'static str) {
    match (connected, draining) {
        _ if busy => (StatusCode::OK, "ready: running a build"),
        (true, false) => (StatusCode::OK, "ready"),
        (false, false) if reconnecting => (StatusCode::OK, "ready: reconnecting to the master"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "not registered with a master"),
        (true, true) => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
    }
}

/// Binds the probe port, naming the flag in the error.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("--http-listen: cannot listen on {addr}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_worker_stays_ready_and_a_draining_idle_one_does_not() {
        assert_eq!(readiness(true, false, false, false).0, StatusCode::OK);
        assert_eq!(readiness(false, false, true, false).0, StatusCode::OK, "busy while disconnected");
        assert_eq!(readiness(true, true, true, false).0, StatusCode::OK, "busy while draining");
        assert_eq!(readiness(false, false, false, true).0, StatusCode::OK, "reconnecting");
        assert_eq!(readiness(false, false, false, false).0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(readiness(true, true, false, false).0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(readiness(false, true, false, true).0, StatusCode::SERVICE_UNAVAILABLE);
    }
}
