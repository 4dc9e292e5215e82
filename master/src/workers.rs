//! The registry of workers connected to this master: attaching and detaching their sessions,
//! their messages, draining (by a user, a pool's scale-down or the worker itself), retiring, a
//! gone pod's worker, and the builds on each.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::remote::{FromWorker, ToWorker, WorkerInfo, WorkerSession};
use crate::store::{Store, StoreError};

use crate::signals::Signals;

/// Why a worker could not attach.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("a worker named {0:?} is already connected")]
    NameTaken(String),
    #[error("invalid registration: {0}")]
    Invalid(String),
    #[error("the master is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The workers connected to this master, by name, and what their sessions need of the master:
/// the database, its id and name, the heartbeat it asks for, and its signals.
/// Which builders a worker may run, by what it says of itself.
pub type Configured = Box<dyn Fn(&WorkerInfo) -> Vec<i64> + Send + Sync>;

pub struct WorkerRegistry {
    store: Store,
    masterid: i64,
    master_name: String,
    heartbeat: Duration,
    signals: Arc<Signals>,
    sessions: Mutex<HashMap<String, Arc<WorkerSession>>>,
    /// The builders a worker may run here, recorded when it connects.
    configured: Configured,
    /// Workers drained here for a scale-down (not by their own SIGTERM), which a failed
    /// scale-down may return to service.
    scale_drained: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for WorkerRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerRegistry").field("workers", &self.list().len()).finish()
    }
}

impl WorkerRegistry {
    pub fn new(
        store: Store,
        masterid: i64,
        master_name: String,
        heartbeat: Duration,
        signals: Arc<Signals>,
        configured: Configured,
    ) -> Self {
        WorkerRegistry {
            store,
            masterid,
            master_name,
            heartbeat,
            signals,
            configured,
            sessions: Mutex::new(HashMap::new()),
            scale_drained: Mutex::new(HashSet::new()),
        }
    }

    /// The session of a worker connected here.
    pub fn get(&self, name: &str) -> Option<Arc<WorkerSession>> {
        self.sessions.lock().expect("workers poisoned").get(name).cloned()
    }

    /// Connected workers, by name.
    pub fn list(&self) -> Vec<Arc<WorkerSession>> {
        let mut list: Vec<_> = self.sessions.lock().expect("workers poisoned").values().cloned().collect();
        list.sort_by(|a, b| a.name().cmp(b.name()));
        list
    }

    /// Admits a worker that has registered on some transport; `outbound` carries messages to it.
    pub async fn attach(
        &self,
        info: WorkerInfo,
        outbound: mpsc::Sender<ToWorker>,
    ) -> Result<Arc<WorkerSession>, AttachError> {
        if self.signals.is_shutting_down() {
            return Err(AttachError::ShuttingDown);
        }
        if info.name.is_empty() || info.name.len() > 100 || info.name.chars().any(char::is_control) {
            return Err(AttachError::Invalid("the name must be 1 to 100 printable characters".into()));
        }
        {
            let workers = self.sessions.lock().expect("workers poisoned");
            if let Some(existing) = workers.get(&info.name)
                && !existing.is_closed()
            {
                warn!(
                    worker = %info.name,
                    host = %info.host,
                    connected_host = %existing.info.host,
                    "refused a worker: one of that name is connected (a stale session ends after three silent \
                     heartbeats; two live workers must not share a name)"
                );
                return Err(AttachError::NameTaken(info.name));
            }
        }
        let builderids = (self.configured)(&info);
        let workerid =
            self.store.worker_connected(&info.name, &info.to_json(), Some(self.masterid), &builderids).await?;
        let session = WorkerSession::new(workerid, info, outbound);
        {
            let mut workers = self.sessions.lock().expect("workers poisoned");
            if workers.get(session.name()).is_some_and(|s| !s.is_closed()) {
                return Err(AttachError::NameTaken(session.name().to_owned()));
            }
            workers.insert(session.name().to_owned(), Arc::clone(&session));
        }
        session
            .send(ToWorker::Registered {
                workerid,
                master_name: self.master_name.clone(),
                heartbeat_interval_ms: self.heartbeat.as_millis() as u32,
            })
            .await
            .map_err(|_| AttachError::Invalid("the worker went away while registering".into()))?;
        info!(worker = session.name(), workerid, max_builds = session.info.max_builds, "worker connected");
        crate::telemetry::worker_connected();
        self.signals.wake();
        Ok(session)
    }

    /// Handles a message from a worker.
    pub async fn message(&self, session: &Arc<WorkerSession>, message: FromWorker) {
        let draining = matches!(message, FromWorker::Draining);
        if draining {
            // Its own decision now: a failed scale-down must not return it to service.
            self.scale_drained.lock().expect("scale_drained poisoned").remove(session.name());
        }
        session.on_message(message).await;
        if draining {
            info!(worker = session.name(), running = session.running_builds(), "worker is draining");
            self.shutdown_if_drained(session).await;
        }
    }

    pub async fn shutdown_if_drained(&self, session: &Arc<WorkerSession>) {
        if session.is_draining() && session.running_builds() == 0 {
            let _ = session.send(ToWorker::Shutdown { reason: "drained".into() }).await;
        }
    }

    /// Forgets a worker whose session ended. Its running builds see the loss and end as RETRY.
    pub async fn detach(&self, session: &Arc<WorkerSession>) {
        session.close();
        {
            let mut workers = self.sessions.lock().expect("workers poisoned");
            if workers.get(session.name()).is_some_and(|s| Arc::ptr_eq(s, session)) {
                workers.remove(session.name());
            }
        }
        if let Err(error) = self.store.worker_disconnected(session.workerid, self.masterid).await {
            if self.signals.is_shutting_down() {
                // The master's stop records every worker of it as disconnected at once.
                tracing::debug!(worker = session.name(), %error, "disconnection left to the master's stop");
            } else {
                warn!(worker = session.name(), %error, "could not record the disconnection");
            }
        }
        info!(worker = session.name(), "worker disconnected");
        crate::telemetry::worker_disconnected();
        self.signals.wake();
    }

    /// Takes a worker out of service for a scale-down: no new build goes to it, and it is told to
    /// exit once idle (at once if it is idle now). Returns false if its session is already gone.
    pub async fn retire(&self, session: &Arc<WorkerSession>) -> bool {
        if session.is_closed() {
            return false;
        }
        // Drain first, then look at running builds (see WorkerSession::try_reserve).
        session.set_draining();
        let _ = session.send(ToWorker::Drain).await;
        self.shutdown_if_drained(session).await;
        true
    }

    /// Takes a worker out of service without telling it to exit: no new build goes to it here
    /// or (through the pause in the database) on any other master. Used before a Deployment
    /// scale-down, where the ReplicaSet stops the pod; a pod that exits by itself is restarted.
    pub async fn drain(&self, name: &str) -> Result<(), StoreError> {
        self.store.pause_for_scale_down(name).await?;
        if let Some(session) = self.sessions.lock().expect("workers poisoned").get(name).cloned()
            && !session.is_draining()
        {
            session.set_draining();
            self.scale_drained.lock().expect("scale_drained poisoned").insert(name.to_owned());
        }
        Ok(())
    }

    /// Returns a worker drained for a scale-down to service (the scale-down did not happen).
    pub async fn undrain(&self, name: &str) -> Result<(), StoreError> {
        self.store.set_worker_paused(name, false, None).await?;
        if self.scale_drained.lock().expect("scale_drained poisoned").remove(name)
            && let Some(session) = self.sessions.lock().expect("workers poisoned").get(name).cloned()
        {
            session.clear_draining();
        }
        self.signals.wake();
        Ok(())
    }

    /// Running builds of a worker connected here (0 when it is not).
    pub fn builds_on(&self, name: &str) -> u32 {
        self.sessions.lock().expect("workers poisoned").get(name).map_or(0, |s| s.running_builds())
    }

    /// A worker's machine is gone (its pod was deleted): end its session here at once rather
    /// than waiting for missed heartbeats; its builds end as RETRY and are re-queued.
    pub async fn gone(&self, name: &str) {
        let session = self.sessions.lock().expect("workers poisoned").get(name).cloned();
        if let Some(session) = session {
            warn!(worker = name, running = session.running_builds(), "the worker's pod is gone; ending its session");
            session.close_gone();
            self.detach(&session).await;
        }
    }
}
