//! Dispatch: claimable requests handed to free workers the moment either appears, and the task
//! that runs each claimed build.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{error, warn};

use crate::domain::ClaimedRequest;
use crate::engine::{self, BuildContext, StopReason, Triggers};
use crate::remote::WorkerSession;
use crate::results::Results;
use crate::store::StoreError;

use super::Master;

pub(super) struct RunningBuild {
    pub(super) stop: watch::Sender<Option<StopReason>>,
    pub(super) claim_token: i64,
    pub(super) builderid: i64,
}

impl Master {
    /// Hands claimable requests to free workers until the queue or the free slots run out, then
    /// waits to be woken. A safety sweep every few seconds covers wake-ups lost with a database
    /// notification.
    pub async fn run_dispatcher(self: Arc<Self>) {
        let mut shutdown = self.signals.shutdown();
        let sweep = Duration::from_secs(5);
        loop {
            if *shutdown.borrow() {
                break;
            }
            if let Err(error) = self.dispatch_round().await {
                crate::telemetry::store_error("dispatch");
                error!(%error, "dispatch failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                self.signals.wake();
            }
            tokio::select! {
                _ = self.signals.dispatch_wanted() => {}
                _ = tokio::time::sleep(sweep) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Which builders a worker may run; `None` means all of them. A worker of a configured pool
    /// runs only the pool's builders; `workernames` narrows further.
    fn builders_for(&self, worker: &WorkerSession) -> Option<Vec<i64>> {
        let pool = worker.info.pool.as_deref().and_then(|p| self.pool_builders.get(p));
        if pool.is_none() && self.builders.iter().all(|b| b.config.workernames.is_empty()) {
            return None;
        }
        Some(runnable(self.builders.iter().map(|b| (b.id, b.config.workernames.as_slice())), pool, worker.name()))
    }

    async fn dispatch_round(self: &Arc<Self>) -> Result<(), StoreError> {
        let lease_ms = self.lease.as_millis() as i64;
        loop {
            if self.signals.is_shutting_down() {
                return Ok(());
            }
            let mut free: Vec<Arc<WorkerSession>> =
                self.workers.list().into_iter().filter(|w| w.has_free_slot()).collect();
            if free.is_empty() {
                return Ok(());
            }
            // Pauses live in the database so that they hold whichever master a worker is on.
            let paused = self.store.paused_workers().await?;
            free.retain(|w| !paused.contains(w.name()));
            if free.is_empty() {
                return Ok(());
            }
            // Spread builds: least busy workers first.
            free.sort_by_key(|w| w.running_builds());
            let mut progressed = false;
            let mut exhausted: HashSet<Option<Vec<i64>>> = HashSet::new();
            for worker in free {
                let builderids = self.builders_for(&worker);
                if exhausted.contains(&builderids) {
                    continue;
                }
                // The slot is reserved before the claim, so a scale-down that drains this
                // worker meanwhile either sees the build coming or is seen by it.
                let Some(slot) = worker.try_reserve() else {
                    // The reservation saw a drain and backed off; the drainer may have seen it
                    // and be waiting for a build that will never come.
                    self.reservation_unused(&worker).await;
                    continue;
                };
                match self.store.claim_next(self.masterid, builderids.as_deref(), lease_ms).await {
                    Ok(Some(request)) => {
                        progressed = true;
                        self.spawn_build(request, slot);
                    }
                    Ok(None) => {
                        drop(slot);
                        self.reservation_unused(&worker).await;
                        exhausted.insert(builderids);
                    }
                    Err(error) => {
                        drop(slot);
                        self.reservation_unused(&worker).await;
                        return Err(error);
                    }
                }
            }
            if !progressed {
                return Ok(());
            }
            // Builds started: the pools' busy workers changed, so their scalers look again
            // (and report what is so).
            self.signals.wake_scalers();
        }
    }

    /// A slot reserved for a claim that found nothing is free again: as if no build had run, a
    /// draining worker that now has nothing to do is told to exit, and the scaler, which may
    /// have seen the reservation as a build, looks again.
    async fn reservation_unused(&self, worker: &Arc<WorkerSession>) {
        if worker.is_draining() {
            self.workers.shutdown_if_drained(worker).await;
            self.signals.wake_scalers();
        }
    }

    /// Hands a request back to the queue after a build failed in the database, retrying while
    /// the database is unreachable, for up to a lease: past that the claim has expired and any
    /// master's housekeeping takes it back.
    async fn hand_back(&self, request: &ClaimedRequest) -> bool {
        let release = || self.store.release_request(request.brid, request.claim_token);
        match engine::persist_within("hand the request back", self.lease, release).await {
            Ok(released) => released,
            Err(error) => {
                warn!(brid = request.brid, %error, "cannot hand the request back; its lease will expire");
                false
            }
        }
    }

    fn spawn_build(self: &Arc<Self>, request: ClaimedRequest, slot: crate::remote::BuildSlot) {
        let (stop_tx, stop_rx) = watch::channel(None);
        self.running.lock().expect("running poisoned").insert(
            request.brid,
            RunningBuild { stop: stop_tx, claim_token: request.claim_token, builderid: request.builderid },
        );
        let master = Arc::clone(self);
        tokio::spawn(async move {
            let Some(builder) = master.builder_by_id(request.builderid) else {
                // The dispatcher claims only for configured builders; this is a bug guard.
                error!(brid = request.brid, builderid = request.builderid, "claimed a request of an unknown builder");
                let _ = master.store.release_request(request.brid, request.claim_token).await;
                master.running.lock().expect("running poisoned").remove(&request.brid);
                return;
            };
            let waited = master.store.now_ms() - request.submitted_at_ms;
            crate::telemetry::request_claimed(&builder.config.name, Duration::from_millis(waited.max(0) as u64));
            let started = Instant::now();
            let ctx = BuildContext {
                store: master.store.clone(),
                masterid: master.masterid,
                builderid: builder.id,
                builder: Arc::clone(&builder.config),
                triggers: Arc::clone(&master) as Arc<dyn Triggers>,
                log_limits: engine::LogLimits {
                    max: master.config.log_max_size,
                    tail: master.config.log_max_tail_size,
                },
                orphan_deadline: master.orphan_deadline(),
                reporters: master
                    .config
                    .services
                    .iter()
                    .filter(|s| s.coverage().covers(&builder.config))
                    .map(|s| (s.name().to_owned(), s.reports_starts()))
                    .collect(),
            };
            let outcome = engine::run_build(&ctx, &request, &slot, stop_rx).await;
            master.running.lock().expect("running poisoned").remove(&request.brid);
            if let Ok(outcome) = &outcome {
                crate::telemetry::build_finished(&builder.config.name, outcome.results, started.elapsed());
            }
            let requeued = match outcome {
                Ok(outcome) => outcome.recorded && outcome.results == Results::Retry,
                Err(error) => {
                    // The database failed mid-build. The engine has interrupted the command on
                    // the worker; hand the request back once the database answers again.
                    crate::telemetry::store_error("build");
                    error!(brid = request.brid, %error, "build failed in the database; re-queueing");
                    master.hand_back(&request).await
                }
            };
            if requeued {
                master.store.notify_queue().await;
            }
            master.buildsets_completed.notify_one();
            let session = Arc::clone(slot.session());
            drop(slot);
            master.workers.shutdown_if_drained(&session).await;
            master.signals.wake();
        });
    }
}

/// The builders, of `(id, workernames)`, that the worker `name` may run: those of its pool (all
/// without one) whose `workernames` are empty or name it.
pub(super) fn runnable<'a>(
    builders: impl Iterator<Item = (i64, &'a [String])>,
    pool: Option<&Vec<i64>>,
    name: &str,
) -> Vec<i64> {
    builders
        .filter(|(id, _)| pool.is_none_or(|ids| ids.contains(id)))
        .filter(|(_, names)| names.is_empty() || names.iter().any(|w| w == name))
        .map(|(id, _)| id)
        .collect()
}
