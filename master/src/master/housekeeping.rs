//! Housekeeping: this process's leases and instance lock, expired claims taken back, old logs
//! and webhook deliveries forgotten, and notifications from the other masters sharing the database.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use crate::engine::StopReason;
use crate::store::{Notification, SessionLock, Store, StoreError};

use super::Master;

/// How long a webhook delivery's id is remembered, so that its redelivery stores nothing: longer
/// than GitHub and GitLab offer redelivery of a past delivery (three days).
pub(super) const DELIVERY_MEMORY: Duration = Duration::from_secs(7 * 86_400);

/// How many logs the janitor deletes per transaction.
pub(super) const LOG_BATCH: i64 = 200;

/// How long a settled report (sent, skipped, refused or abandoned) stays in the `reports` view.
pub(super) const REPORT_MEMORY: Duration = Duration::from_secs(7 * 86_400);

/// How many settled reports the janitor deletes per transaction.
const REPORT_BATCH: i64 = 1_000;

/// The name of the lock held by the process running as master `masterid`.
pub(super) fn instance_lock_name(masterid: i64) -> String {
    format!("kiln-master:{masterid}")
}

/// Takes the instance lock of `masterid`. Holding it proves that no other live process runs
/// under this id, so claims carrying the id are a previous run's orphans: their leases are
/// brought forward to `deadline` from now — when that run's commands are surely dead, since its
/// workers lost their sessions no later than this start — instead of running a whole lease.
/// Without the lock (two masters share a name, or a predecessor's database session has not
/// ended yet) the claims are left to their leases. Returns the lock and when orphans are due.
pub(super) async fn take_instance(
    store: &Store,
    masterid: i64,
    name: &str,
    deadline: Duration,
) -> Result<(Option<SessionLock>, Option<Instant>), StoreError> {
    let Some(lock) = store.try_session_lock(&instance_lock_name(masterid)).await? else {
        warn!(
            master = %name,
            masterid,
            "another live process holds this master's instance lock: two masters run under one name, or the \
             previous one's database session has not ended yet; the claims it left are taken back when their \
             leases expire"
        );
        return Ok((None, None));
    };
    // Reports a previous run claimed and did not settle go out again now (a forge's commit
    // status is the same however often it is set).
    let reports = store.release_report_claims(masterid).await?;
    if reports > 0 {
        warn!(reports, "a previous run of this master left reports unsent; sending them");
    }
    let shortened = store.shorten_claims(masterid, store.now_ms() + deadline.as_millis() as i64).await?;
    if shortened == 0 {
        return Ok((Some(lock), None));
    }
    warn!(requests = shortened, after = ?deadline, "a previous run of this master left claimed requests; re-running them");
    Ok((Some(lock), Some(Instant::now() + deadline)))
}

/// How long housekeeping sleeps: one period, or less to reap orphans the moment they are due.
pub(super) fn next_round(period: Duration, orphans_due: &mut Option<Instant>) -> Duration {
    let Some(due) = *orphans_due else { return period };
    let until = due.saturating_duration_since(Instant::now()) + Duration::from_millis(20);
    if until <= period {
        *orphans_due = None;
        return until;
    }
    period
}

impl Master {
    /// Renews this master's leases, stops builds whose claim was taken back, and re-queues
    /// requests whose lease expired anywhere. If renewal keeps failing for most of a lease, this
    /// master stops its own builds: another master will run them once the lease expires, and the
    /// same build must never run twice at once.
    pub async fn run_housekeeping(self: Arc<Self>) {
        let mut shutdown = self.signals.shutdown();
        let period = (self.lease / 4).max(Duration::from_millis(250));
        let mut last_renewal = Instant::now();
        let mut orphans_due = self.orphans_due;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(next_round(period, &mut orphans_due)) => {}
                _ = shutdown.changed() => return,
            }
            self.keep_instance_lock().await;
            let held: Vec<(i64, i64)> =
                self.running.lock().expect("running poisoned").iter().map(|(brid, b)| (*brid, b.claim_token)).collect();
            match self.store.renew_leases(self.masterid, &held, self.lease.as_millis() as i64).await {
                Ok(renewed) => {
                    last_renewal = Instant::now();
                    for (brid, _) in held.iter().filter(|(brid, _)| !renewed.contains(brid)) {
                        if self.running.lock().expect("running poisoned").contains_key(brid) {
                            warn!(brid, "claim taken back; stopping the build");
                            self.stop_build(*brid, StopReason::ClaimLost);
                        }
                    }
                }
                Err(error) => {
                    crate::telemetry::store_error("renew_leases");
                    warn!(%error, "could not renew leases");
                    if last_renewal.elapsed() > self.lease * 2 / 3 {
                        error!("leases could not be renewed for most of a lease; stopping this master's builds");
                        for build in self.running.lock().expect("running poisoned").values() {
                            let _ = build.stop.send(Some(StopReason::ClaimLost));
                        }
                    }
                    continue;
                }
            }
            self.schedule_left_changes().await;
            match self.store.stops_requested(self.masterid).await {
                Ok(brids) => {
                    for brid in brids {
                        self.stop_build(brid, StopReason::Cancelled);
                    }
                }
                Err(error) => warn!(%error, "could not read stop requests"),
            }
            match self.store.reap_expired_claims().await {
                Ok(reaped) if !reaped.requeued.is_empty() || !reaped.cancelled.is_empty() => {
                    crate::telemetry::leases_expired(reaped.requeued.len() + reaped.cancelled.len());
                    warn!(
                        requests = ?reaped.requeued,
                        cancelled = ?reaped.cancelled,
                        builds = ?reaped.retried_builds,
                        "took back requests with expired leases"
                    );
                    self.buildsets_completed.notify_one();
                    self.store.notify_queue().await;
                    self.signals.wake();
                }
                Ok(_) => {}
                Err(error) => {
                    crate::telemetry::store_error("reap_leases");
                    warn!(%error, "could not reap expired claims");
                }
            }
        }
    }

    /// Checks that this process still holds its instance lock (a database restart ends the
    /// session holding it) and takes it again when it is free.
    async fn keep_instance_lock(&self) {
        let mut instance = self.instance.lock().await;
        if let Some(lock) = instance.as_mut() {
            if lock.check().await.is_ok() {
                return;
            }
            warn!("lost the database session holding this master's instance lock");
            *instance = None;
        }
        match self.store.try_session_lock(&instance_lock_name(self.masterid)).await {
            Ok(Some(lock)) => {
                info!(master = %self.name, "holding this master's instance lock again");
                *instance = Some(lock);
            }
            Ok(None) => debug!(master = %self.name, "another process holds this master's instance lock"),
            Err(error) => debug!(%error, "cannot take this master's instance lock"),
        }
    }

    /// Forgets what is kept only for a while: webhook deliveries after [`DELIVERY_MEMORY`],
    /// settled reports after [`REPORT_MEMORY`], and — with `logHorizon` set — the logs of builds
    /// older than the horizon. A pass every quarter of the horizon (between a minute and an hour;
    /// hourly without one); logs and reports go in batches, each its own short transaction, so
    /// the janitor never holds the database for long. Every master may run it; deleting twice is
    /// harmless.
    pub async fn run_janitor(self: Arc<Self>) {
        let horizon_ms = self.config.log_horizon.map(|horizon| (horizon * 1000.0) as i64);
        let every = horizon_ms.map_or(Duration::from_secs(3600), |ms| {
            Duration::from_millis((ms / 4) as u64).clamp(Duration::from_secs(60), Duration::from_secs(3600))
        });
        let mut shutdown = self.signals.shutdown();
        loop {
            let (now, read_at) = (self.store.now_ms(), tokio::time::Instant::now());
            if let Some(horizon_ms) = horizon_ms {
                let store = &self.store;
                let deleted = self
                    .in_batches("delete old logs", LOG_BATCH, |limit| async move {
                        let count = store.delete_old_logs(now - horizon_ms, limit).await?;
                        crate::telemetry::logs_deleted(count);
                        Ok(count)
                    })
                    .await;
                if deleted > 0 {
                    info!(logs = deleted, "deleted the logs of old builds");
                }
            }
            let settled_before = now - REPORT_MEMORY.as_millis() as i64;
            let forgotten = self
                .in_batches("forget old reports", REPORT_BATCH, |limit| {
                    self.store.forget_reports_settled_before(settled_before, limit)
                })
                .await;
            if forgotten > 0 {
                debug!(reports = forgotten, "forgot reports settled long ago");
            }
            match self.store.forget_deliveries_before(now - DELIVERY_MEMORY.as_millis() as i64).await {
                Ok(0) => {}
                Ok(count) => debug!(deliveries = count, "forgot old webhook deliveries"),
                Err(error) => warn!(%error, "could not forget old webhook deliveries"),
            }
            if let Err(error) =
                self.store.forget_change_schedulings_before(now - DELIVERY_MEMORY.as_millis() as i64).await
            {
                warn!(%error, "could not forget which schedulers acted on old changes");
            }
            tokio::select! {
                _ = tokio::time::sleep_until(read_at + every) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Runs `delete` (given the batch size, answering how many it deleted: fewer than the batch
    /// when none is left) until nothing is left or the master stops; returns how many in all.
    async fn in_batches<F, Fut>(&self, what: &str, batch: i64, mut delete: F) -> u64
    where
        F: FnMut(i64) -> Fut,
        Fut: std::future::Future<Output = Result<u64, StoreError>>,
    {
        let mut deleted = 0;
        loop {
            match delete(batch).await {
                Ok(count) => {
                    deleted += count;
                    if count < batch as u64 || self.signals.is_shutting_down() {
                        return deleted;
                    }
                    tokio::task::yield_now().await;
                }
                Err(error) => {
                    warn!(%error, "could not {what}");
                    return deleted;
                }
            }
        }
    }

    /// Listens for queue changes made by other masters sharing the database (PostgreSQL only).
    pub async fn run_queue_listener(self: Arc<Self>, database_url: String) {
        let mut shutdown = self.signals.shutdown();
        loop {
            let listener = self.store.listen_queue(&database_url).await;
            let mut listener = match listener {
                Ok(Some(listener)) => listener,
                Ok(None) => return,
                Err(error) => {
                    warn!(%error, "cannot listen for queue notifications; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                        _ = shutdown.changed() => return,
                    }
                }
            };
            loop {
                tokio::select! {
                    event = listener.recv() => match event {
                        Ok(Notification::Queue) => self.signals.wake(),
                        Ok(Notification::Control(payload)) => self.on_control(&payload).await,
                        Ok(Notification::Events(payload)) => self.store.events().receive(&payload),
                        Err(error) => {
                            warn!(%error, "queue notifications interrupted; reconnecting");
                            self.signals.wake();
                            break;
                        }
                    },
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}
