//! Control actions: stop, cancel, rebuild, priority and worker actions, wherever the build or
//! worker is (here at once, on another master through the database).

use std::time::Duration;

use tracing::{info, warn};

use crate::domain::{NewBuildset, Submitted};
use crate::engine::StopReason;
use crate::remote::ToWorker;
use crate::store::StoreError;

use super::Master;

/// Why a control action could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no such {0}")]
    NotFound(String),
    #[error("{0}")]
    Finished(String),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for ControlError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound(what) => ControlError::NotFound(what),
            other => ControlError::Store(other),
        }
    }
}

/// What a user may do to a worker, as Buildbot's worker control actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerAction {
    Pause,
    Unpause,
    /// Finish running builds, take no more, then exit.
    Stop,
    /// Disconnect now; running builds are retried elsewhere.
    Kill,
}

impl WorkerAction {
    pub fn parse(name: &str) -> Option<WorkerAction> {
        Some(match name {
            "pause" => WorkerAction::Pause,
            "unpause" => WorkerAction::Unpause,
            "stop" => WorkerAction::Stop,
            "kill" => WorkerAction::Kill,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            WorkerAction::Pause => "pause",
            WorkerAction::Unpause => "unpause",
            WorkerAction::Stop => "stop",
            WorkerAction::Kill => "kill",
        }
    }
}

impl Master {
    /// Stops the build of a request, wherever it runs: here at once, on another master through
    /// the database (a durable flag, plus a notification so it happens at once there too).
    pub async fn stop_request_build(&self, brid: i64) -> Result<(), ControlError> {
        if self.store.request_complete(brid).await? {
            return Ok(());
        }
        self.store.request_stop(brid).await?;
        if !self.stop_build(brid, StopReason::Cancelled) {
            self.store.notify_control(&format!("stop {brid}")).await;
        }
        Ok(())
    }

    /// Cancels a request: one still waiting completes as CANCELLED; a running one is stopped.
    pub async fn cancel_request(&self, brid: i64) -> Result<(), ControlError> {
        if self.store.cancel_unclaimed(brid).await? {
            crate::telemetry::request_cancelled();
            info!(brid, "request cancelled before it started");
            return Ok(());
        }
        self.stop_request_build(brid).await
    }

    /// Stops a build by its id.
    pub async fn stop_build_by_id(&self, buildid: i64) -> Result<(), ControlError> {
        let origin = self.store.build_origin(buildid).await?;
        self.stop_request_build(origin.brid).await
    }

    /// Builds a build's sources and properties again, as a new buildset.
    pub async fn rebuild(&self, buildid: i64) -> Result<Submitted, ControlError> {
        let origin = self.store.build_origin(buildid).await?;
        let details = self.store.buildset_details(origin.buildsetid).await?;
        let buildset = NewBuildset {
            reason: "rebuild".into(),
            external_idstring: None,
            properties: details.properties,
            sourcestamps: details.sourcestamps,
            builderids: vec![origin.builderid],
            priority: origin.priority,
            rebuilt_buildid: Some(buildid),
            ..Default::default()
        };
        Ok(self.submit(&buildset).await?)
    }

    /// Changes a request's priority; the next claim honours it.
    pub async fn set_priority(&self, brid: i64, priority: i64) -> Result<(), ControlError> {
        if !self.store.set_priority(brid, priority).await? {
            self.store.request_complete(brid).await?;
            return Err(ControlError::Finished(format!("build request {brid} is complete")));
        }
        self.store.notify_queue().await;
        self.signals.wake();
        Ok(())
    }

    /// Pauses, unpauses, gracefully stops or kills a worker, wherever it is connected.
    pub async fn worker_action(&self, name: &str, action: WorkerAction, reason: &str) -> Result<(), ControlError> {
        let known = match action {
            WorkerAction::Pause => self.store.set_worker_paused(name, true, Some(reason)).await?,
            WorkerAction::Unpause => self.store.set_worker_paused(name, false, None).await?,
            WorkerAction::Stop | WorkerAction::Kill => self.store.worker_exists(name).await?,
        };
        if !known {
            return Err(ControlError::NotFound(format!("worker {name}")));
        }
        if matches!(action, WorkerAction::Stop) {
            self.store.set_worker_graceful(name, true).await?;
        }
        if !self.apply_worker_action(name, action).await {
            self.store.notify_control(&format!("worker {} {name}", action.name())).await;
        }
        self.store.notify_queue().await;
        self.signals.wake();
        Ok(())
    }

    /// Applies a worker action if the worker is connected here; returns whether it was.
    async fn apply_worker_action(&self, name: &str, action: WorkerAction) -> bool {
        let session = self.workers.get(name);
        let Some(session) = session else { return false };
        match action {
            WorkerAction::Pause | WorkerAction::Unpause => {}
            WorkerAction::Stop => {
                info!(worker = name, "stopping the worker once its builds are done");
                session.set_draining();
                let _ = session.send(ToWorker::Drain).await;
                self.workers.shutdown_if_drained(&session).await;
            }
            WorkerAction::Kill => {
                warn!(worker = name, "killing the worker; its builds will be retried");
                session.set_draining();
                let _ = session.send(ToWorker::Shutdown { reason: "killed by a user".into() }).await;
                // The worker exits on Shutdown and its session ends with it; one that does not
                // comply is cut off.
                tokio::spawn(async move {
                    if tokio::time::timeout(Duration::from_secs(5), session.closed()).await.is_err() {
                        session.close();
                    }
                });
            }
        }
        true
    }

    /// Handles a control message from another master.
    pub(super) async fn on_control(&self, payload: &str) {
        let mut words = payload.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("stop"), Some(brid), None) => {
                if let Ok(brid) = brid.parse() {
                    self.stop_build(brid, StopReason::Cancelled);
                }
            }
            (Some("worker"), Some(action), Some(name)) => {
                if let Some(action) = WorkerAction::parse(action) {
                    self.apply_worker_action(name, action).await;
                }
            }
            _ => warn!(payload, "ignoring an unknown control message"),
        }
    }

    /// Stops a running build of this master by its request id. Returns false if none runs here.
    pub fn stop_build(&self, brid: i64, reason: StopReason) -> bool {
        match self.running.lock().expect("running poisoned").get(&brid) {
            Some(build) => {
                let _ = build.stop.send(Some(reason));
                true
            }
            None => false,
        }
    }
}
