//! The master's Prometheus metrics: names, labels and units in one place. Counters and histograms
//! are recorded where things happen; gauges of the queue and the workers are read at scrape time.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::results::Results;

/// Every metric the master exports, for the dashboard test and the docs.
pub const METRICS: &[&str] = &[
    "kiln_buildrequests_pending",
    "kiln_buildrequests_oldest_pending_age_seconds",
    "kiln_buildrequests_submitted_total",
    "kiln_buildrequests_claimed_total",
    "kiln_buildrequests_completed_total",
    "kiln_builds_running",
    "kiln_builds_finished_total",
    "kiln_build_duration_seconds",
    "kiln_dispatch_latency_seconds",
    "kiln_workers",
    "kiln_pool_desired_workers",
    "kiln_pool_workers",
    "kiln_pool_pending_requests",
    "kiln_pool_scale_operations_total",
    "kiln_pool_scale_reaction_seconds",
    "kiln_pool_api_errors_total",
    "kiln_pool_leader",
    "kiln_pool_running_builds",
    "kiln_worker_connections_total",
    "kiln_worker_disconnections_total",
    "kiln_leases_expired_total",
    "kiln_buildrequests_cancelled_total",
    "kiln_buildrequests_collapsed_total",
    "kiln_store_errors_total",
    "kiln_log_bytes_total",
    "kiln_logs_deleted_total",
    "kiln_websocket_clients",
    "kiln_websocket_clients_dropped_total",
];

/// The process's recorder (installed once; several masters in one process share it).
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let seconds = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];
        let handle = PrometheusBuilder::new()
            .set_buckets(&seconds)
            .expect("valid buckets")
            .install_recorder()
            .expect("a Prometheus recorder can be installed");
        describe();
        for name in [
            "kiln_worker_connections_total",
            "kiln_worker_disconnections_total",
            "kiln_leases_expired_total",
            "kiln_buildrequests_cancelled_total",
            "kiln_buildrequests_collapsed_total",
            "kiln_log_bytes_total",
            "kiln_logs_deleted_total",
            "kiln_websocket_clients_dropped_total",
        ] {
            counter!(name).increment(0);
        }
        counter!("kiln_store_errors_total", "operation" => "dispatch").increment(0);
        handle
    })
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!("kiln_buildrequests_pending", "Build requests waiting to be claimed, per builder.");
    describe_gauge!(
        "kiln_buildrequests_oldest_pending_age_seconds",
        Unit::Seconds,
        "How long the oldest waiting build request has waited."
    );
    describe_counter!("kiln_buildrequests_submitted_total", "Build requests submitted by this master.");
    describe_counter!("kiln_buildrequests_claimed_total", "Build requests this master claimed for a worker.");
    describe_counter!("kiln_buildrequests_completed_total", "Build requests this master completed, per result.");
    describe_gauge!("kiln_builds_running", "Builds running on this master's workers, per builder.");
    describe_counter!("kiln_builds_finished_total", "Builds finished on this master, per builder and result.");
    describe_histogram!("kiln_build_duration_seconds", Unit::Seconds, "How long builds took, per builder.");
    describe_histogram!(
        "kiln_dispatch_latency_seconds",
        Unit::Seconds,
        "From a build request's submission to its claim for a worker, per builder."
    );
    describe_gauge!("kiln_workers", "Workers connected to this master, per state (idle, busy, draining) and pool.");
    describe_gauge!("kiln_pool_desired_workers", "Workers the pool's scaler wants, per pool.");
    describe_gauge!("kiln_pool_workers", "Workers the pool has or is starting (replicas), per pool.");
    describe_gauge!("kiln_pool_pending_requests", "Build requests waiting for the pool's workers, per pool.");
    describe_counter!("kiln_pool_scale_operations_total", "Scale calls made, per pool and direction (up, down).");
    describe_histogram!(
        "kiln_pool_scale_reaction_seconds",
        Unit::Seconds,
        "From the event that woke the scaler (such as a request entering the queue) to the scale-up call."
    );
    describe_counter!("kiln_pool_api_errors_total", "Failed scaling steps and backend API errors, per pool.");
    describe_gauge!("kiln_pool_leader", "1 when this master runs the pool's scaler, per pool.");
    describe_gauge!("kiln_pool_running_builds", "Builds running on the pool's workers (all masters), per pool.");
    describe_counter!("kiln_worker_connections_total", "Worker sessions this master admitted.");
    describe_counter!("kiln_worker_disconnections_total", "Worker sessions that ended on this master.");
    describe_counter!(
        "kiln_leases_expired_total",
        "Claimed build requests whose lease expired (their master vanished or stalled) and were re-queued."
    );
    describe_counter!("kiln_buildrequests_cancelled_total", "Build requests cancelled before they started.");
    describe_counter!(
        "kiln_buildrequests_collapsed_total",
        "Waiting build requests completed as SKIPPED because a newer compatible one arrived."
    );
    describe_counter!("kiln_store_errors_total", "Database errors in the master's loops, per operation.");
    describe_counter!("kiln_log_bytes_total", Unit::Bytes, "Build log text written to the database.");
    describe_counter!("kiln_logs_deleted_total", "Logs of builds older than logHorizon whose text was deleted.");
    describe_gauge!("kiln_websocket_clients", "Clients connected to the event stream at /ws.");
    describe_counter!(
        "kiln_websocket_clients_dropped_total",
        "Event stream clients closed because they fell behind or stopped reading."
    );
}

/// An event stream client connected (`true`) or left.
pub fn websocket_client(connected: bool) {
    if connected {
        gauge!("kiln_websocket_clients").increment(1.0);
    } else {
        gauge!("kiln_websocket_clients").decrement(1.0);
    }
}

/// An event stream client was closed for falling behind.
pub fn websocket_client_dropped() {
    counter!("kiln_websocket_clients_dropped_total").increment(1);
}

pub fn worker_connected() {
    counter!("kiln_worker_connections_total").increment(1);
}

pub fn worker_disconnected() {
    counter!("kiln_worker_disconnections_total").increment(1);
}

pub fn leases_expired(count: usize) {
    counter!("kiln_leases_expired_total").increment(count as u64);
}

/// Counts requests a committed submission collapsed.
pub fn requests_collapsed(count: u64) {
    if count > 0 {
        counter!("kiln_buildrequests_collapsed_total").increment(count);
    }
}

pub fn request_cancelled() {
    counter!("kiln_buildrequests_cancelled_total").increment(1);
}

/// A database error in one of the master's loops; `operation` is a fixed name.
pub fn store_error(operation: &'static str) {
    counter!("kiln_store_errors_total", "operation" => operation).increment(1);
}

pub fn logs_deleted(count: u64) {
    if count > 0 {
        counter!("kiln_logs_deleted_total").increment(count);
    }
}

pub fn log_bytes(bytes: usize) {
    counter!("kiln_log_bytes_total").increment(bytes as u64);
}

/// Registers a pool's series at zero, so dashboards and alerts see the pool before it acts.
pub fn pool_started(pool: &str) {
    pool_sizes(pool, 0, 0, 0, 0);
    pool_leader(pool, false);
    for direction in ["up", "down"] {
        counter!("kiln_pool_scale_operations_total", "pool" => pool.to_owned(), "direction" => direction).increment(0);
    }
    counter!("kiln_pool_api_errors_total", "pool" => pool.to_owned()).increment(0);
    let _ = histogram!("kiln_pool_scale_reaction_seconds", "pool" => pool.to_owned());
}

pub fn pool_sizes(pool: &str, desired: u32, workers: u32, pending: u32, running: u32) {
    gauge!("kiln_pool_running_builds", "pool" => pool.to_owned()).set(f64::from(running));
    gauge!("kiln_pool_desired_workers", "pool" => pool.to_owned()).set(f64::from(desired));
    gauge!("kiln_pool_workers", "pool" => pool.to_owned()).set(f64::from(workers));
    gauge!("kiln_pool_pending_requests", "pool" => pool.to_owned()).set(f64::from(pending));
}

pub fn pool_scaled(pool: &str, direction: &'static str, reaction: Option<Duration>) {
    counter!("kiln_pool_scale_operations_total", "pool" => pool.to_owned(), "direction" => direction).increment(1);
    if let Some(reaction) = reaction {
        histogram!("kiln_pool_scale_reaction_seconds", "pool" => pool.to_owned()).record(reaction.as_secs_f64());
    }
}

pub fn pool_api_error(pool: &str) {
    counter!("kiln_pool_api_errors_total", "pool" => pool.to_owned()).increment(1);
}

pub fn pool_leader(pool: &str, leading: bool) {
    gauge!("kiln_pool_leader", "pool" => pool.to_owned()).set(if leading { 1.0 } else { 0.0 });
}

pub fn request_submitted(count: usize) {
    counter!("kiln_buildrequests_submitted_total").increment(count as u64);
}

pub fn request_claimed(builder: &str, waited: Duration) {
    counter!("kiln_buildrequests_claimed_total").increment(1);
    histogram!("kiln_dispatch_latency_seconds", "builder" => builder.to_owned()).record(waited.as_secs_f64());
}

pub fn build_finished(builder: &str, results: Results, took: Duration) {
    counter!("kiln_builds_finished_total", "builder" => builder.to_owned(), "result" => results.name()).increment(1);
    histogram!("kiln_build_duration_seconds", "builder" => builder.to_owned()).record(took.as_secs_f64());
    if results != Results::Retry {
        counter!("kiln_buildrequests_completed_total", "result" => results.name()).increment(1);
    }
}

/// A report's attempt: `sent`, `retried`, `failed` (refused for good), `skipped`.
pub fn report(reporter: &str, outcome: &'static str) {
    counter!("kiln_reports_total", "reporter" => reporter.to_owned(), "outcome" => outcome).increment(1);
}

/// Sets the gauges read at scrape time.
pub struct Snapshot<'a> {
    pub pending_by_builder: &'a [(String, i64)],
    pub oldest_pending_age: Option<Duration>,
    pub running_by_builder: &'a [(String, u32)],
    /// Connected workers by pool ("" for none) and state.
    pub workers_by_state: &'a [(String, &'static str, usize)],
}

pub fn record(snapshot: &Snapshot<'_>) {
    for (builder, pending) in snapshot.pending_by_builder {
        gauge!("kiln_buildrequests_pending", "builder" => builder.clone()).set(*pending as f64);
    }
    gauge!("kiln_buildrequests_oldest_pending_age_seconds")
        .set(snapshot.oldest_pending_age.map_or(0.0, |d| d.as_secs_f64()));
    for (builder, running) in snapshot.running_by_builder {
        gauge!("kiln_builds_running", "builder" => builder.clone()).set(f64::from(*running));
    }
    for (pool, state, count) in snapshot.workers_by_state {
        gauge!("kiln_workers", "state" => *state, "pool" => pool.clone()).set(*count as f64);
    }
}
