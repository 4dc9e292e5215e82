//! The worker's optional HTTP port for Kubernetes and Prometheus: `/healthz` (the process
//! answers), `/readyz` (registered with a master and taking work) and `/metrics` (commands
//! running, output streamed, connection state).

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics::{counter, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static CONNECTED: AtomicBool = AtomicBool::new(false);
static DRAINING: AtomicBool = AtomicBool::new(false);

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
    CONNECTED.store(yes, Ordering::SeqCst);
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
        CommandGauge(())
    }
}

impl Drop for CommandGauge {
    fn drop(&mut self) {
        gauge!("kiln_worker_running_commands").decrement(1.0);
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

async fn ready() -> impl IntoResponse {
    match (CONNECTED.load(Ordering::SeqCst), DRAINING.load(Ordering::SeqCst)) {
        (true, false) => (StatusCode::OK, "ready"),
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
