//! The master's shared state and its two loops: the dispatcher, which hands claimable requests to
//! free workers the moment either appears, and housekeeping, which renews this master's leases
//! and takes back expired ones.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde_json::Value;
use tokio::sync::{Notify, mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::config::{BuilderConfig, ChangeSchedulerConfig, ChangeSourceConfig, Config, SchedulerConfig};
use crate::engine::{self, BuildContext, StopReason, TriggerRequest, Triggered, Triggers};
use crate::poller::GitPoller;
use crate::properties::Properties;
use crate::remote::{FromWorker, ToWorker, WorkerInfo, WorkerSession};
use crate::results::Results;
use crate::schedulers::{self, ChangeScheduler, Classification};
use crate::store::{
    Change, ClaimedRequest, NewBuildset, NewChange, Notification, SessionLock, SourceStamp, Store, StoreError,
};

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

/// Why a build could not be submitted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("no scheduler named {0:?}")]
    UnknownScheduler(String),
    #[error("no builder named {0:?}")]
    UnknownBuilder(String),
    #[error("builder {builder:?} is not served by scheduler {scheduler:?}")]
    BuilderNotInScheduler { builder: String, scheduler: String },
    #[error("scheduler {0:?} is not a force scheduler")]
    NotForceable(String),
    #[error("scheduler {0:?} is disabled")]
    Disabled(String),
    #[error("invalid parameter {field}: {reason}")]
    InvalidParameter { field: String, reason: String },
    #[error("invalid parameters: {0:?}")]
    InvalidParameters(std::collections::BTreeMap<String, String>),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a poll failed.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("no poller named {0:?}")]
    Unknown(String),
    #[error("git: {0}")]
    Git(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Submit(#[from] SubmitError),
}

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

/// What a force asks for, already decoded from the API.
#[derive(Debug, Clone, Default)]
pub struct ForceRequest {
    pub builder_names: Vec<String>,
    pub builderid: Option<i64>,
    pub reason: String,
    pub owner: String,
    pub priority: i64,
    pub sourcestamp: SourceStamp,
    pub properties: Vec<(String, Value)>,
}

struct Builder {
    id: i64,
    config: Arc<BuilderConfig>,
}

/// Who submits a buildset, for its reason and properties.
struct Origin<'a> {
    kind: &'a str,
    name: &'a str,
    builder_names: &'a [String],
    properties: &'a std::collections::BTreeMap<String, Value>,
}

/// How many logs the janitor deletes per transaction.
const LOG_BATCH: i64 = 200;

/// When a timed scheduler fires.
enum When {
    /// Every so many milliseconds (Periodic).
    Every(i64),
    /// On a cron schedule (Nightly).
    Cron(crate::timed::Cron),
}

impl When {
    /// The first time of a scheduler that has never fired: at once for Periodic, as in Buildbot.
    fn first_after(&self, now: i64) -> Option<i64> {
        match self {
            When::Every(_) => Some(now),
            When::Cron(cron) => cron.next_after(now),
        }
    }

    fn next_after(&self, now: i64) -> Option<i64> {
        match self {
            When::Every(ms) => Some(now + ms),
            When::Cron(cron) => cron.next_after(now),
        }
    }
}

/// A Periodic or Nightly scheduler.
struct TimedSchedulerEntry {
    config: crate::config::TimedSchedulerConfig,
    when: When,
    /// Classifies changes for `onlyIfChanged`.
    rules: ChangeScheduler,
}

impl TimedSchedulerEntry {
    /// A fingerprint of the schedule, to notice a changed configuration.
    fn spec(&self) -> String {
        match &self.when {
            When::Every(ms) => format!("every {ms} ms"),
            When::Cron(cron) => format!("cron {cron:?}"),
        }
    }
}

/// A git poller and what wakes it for a forced poll.
struct PollerEntry {
    poller: GitPoller,
    force: Notify,
    /// One poll at a time per poller on this master: two fetches into one bare repository
    /// collide on its lock files.
    busy: tokio::sync::Mutex<()>,
}

/// A single- or any-branch scheduler: its configuration and its compiled rules.
struct ChangeSchedulerEntry {
    config: ChangeSchedulerConfig,
    compiled: ChangeScheduler,
}

struct RunningBuild {
    stop: watch::Sender<Option<StopReason>>,
    claim_token: i64,
    builderid: i64,
}

/// One master: configuration, database and the workers connected to it.
pub struct Master {
    pub config: Arc<Config>,
    pub store: Store,
    pub masterid: i64,
    pub name: String,
    builders: Vec<Builder>,
    change_schedulers: Vec<ChangeSchedulerEntry>,
    timed_schedulers: Vec<TimedSchedulerEntry>,
    pollers: Vec<PollerEntry>,
    /// Wakes the timer loop when a change (re)starts a tree-stable timer.
    timers_changed: Notify,
    /// Wakes the completion loop when a build (and so perhaps a buildset) finished.
    buildsets_completed: Notify,
    workers: Mutex<HashMap<String, Arc<WorkerSession>>>,
    running: Mutex<HashMap<i64, RunningBuild>>,
    /// Wakes the dispatcher: a request entered the queue, a worker freed a slot or joined.
    wake: Notify,
    /// Wakes the pool scaler on the same events.
    scale_wake: Notify,
    /// Counts the same events for whoever waits on the queue's progress (`trigger` steps
    /// waiting for their children).
    queue_events: watch::Sender<u64>,
    /// When the oldest wake-up not yet seen by a scaler happened, to measure reaction time.
    scale_woken_at: Mutex<Option<Instant>>,
    /// The builders each pool's workers run, by pool name.
    pool_builders: HashMap<String, Vec<i64>>,
    /// The pools this master runs, for status.
    pools: Mutex<Vec<Arc<crate::pool::Pool>>>,
    /// Workers drained here for a scale-down (not by their own SIGTERM), which a failed
    /// scale-down may return to service.
    scale_drained: Mutex<HashSet<String>>,
    shutting_down: watch::Sender<bool>,
    lease: Duration,
    pub heartbeat: Duration,
    /// The lock saying that this process is the one running as `masterid` (see
    /// [`take_instance`]); `None` while another live process holds it.
    instance: tokio::sync::Mutex<Option<SessionLock>>,
    /// When the claims a previous run under this id left become takeable, if it left any.
    orphans_due: Option<Instant>,
}

impl std::fmt::Debug for Master {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Master").field("name", &self.name).field("masterid", &self.masterid).finish()
    }
}

impl Master {
    /// Registers the master and its builders in the database.
    pub async fn start(config: Arc<Config>, store: Store) -> Result<Arc<Master>, StoreError> {
        let name = config.master_name.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(hostname);
            format!("{host}:{}", config.data_dir.display())
        });
        let masterid = store.register_master(&name).await?;
        let heartbeat = Duration::from_secs_f64(config.workers.heartbeat_interval);
        let (instance, orphans_due) =
            take_instance(&store, masterid, &name, crate::config::orphan_deadline(heartbeat)).await?;
        let mut builders = Vec::new();
        for builder in &config.builders {
            let id = store.upsert_builder(&builder.name, builder.description.as_deref(), &builder.tags).await?;
            builders.push(Builder { id, config: Arc::new(builder.clone()) });
        }
        for scheduler in &config.schedulers {
            store.upsert_scheduler(scheduler.name()).await?;
        }
        let change_schedulers = config
            .schedulers
            .iter()
            .filter_map(|s| match s {
                SchedulerConfig::SingleBranch(c) => Some((c, false)),
                SchedulerConfig::AnyBranch(c) => Some((c, true)),
                _ => None,
            })
            .map(|(c, per_branch)| ChangeSchedulerEntry {
                config: c.clone(),
                compiled: ChangeScheduler::compile(c, per_branch).expect("validated with the configuration"),
            })
            .collect();
        let timed_schedulers = config
            .schedulers
            .iter()
            .filter_map(|s| match s {
                SchedulerConfig::Periodic(t) => {
                    let ms = (t.periodic_build_timer.unwrap_or(600.0) * 1000.0) as i64;
                    Some((t, When::Every(ms)))
                }
                SchedulerConfig::Nightly(t) => {
                    Some((t, When::Cron(t.cron().expect("validated with the configuration"))))
                }
                _ => None,
            })
            .map(|(t, when)| TimedSchedulerEntry {
                rules: ChangeScheduler::compile(&t.change_rules(), false).expect("validated with the configuration"),
                config: t.clone(),
                when,
            })
            .collect();
        let pollers = config
            .change_sources
            .iter()
            .map(|source| {
                let ChangeSourceConfig::GitPoller(poller) = source;
                PollerEntry {
                    poller: GitPoller::new(poller.clone(), &config.data_dir),
                    force: Notify::new(),
                    busy: tokio::sync::Mutex::new(()),
                }
            })
            .collect();
        let pool_builders = config
            .pools
            .iter()
            .map(|pool| {
                let ids = builders.iter().filter(|b| pool.serves(&b.config)).map(|b| b.id).collect();
                (pool.name.clone(), ids)
            })
            .collect();
        let (shutting_down, _) = watch::channel(false);
        let master = Arc::new(Master {
            scale_woken_at: Mutex::new(None),
            scale_drained: Mutex::new(HashSet::new()),
            pools: Mutex::new(Vec::new()),
            pool_builders,
            change_schedulers,
            timed_schedulers,
            pollers,
            timers_changed: Notify::new(),
            buildsets_completed: Notify::new(),
            lease: Duration::from_secs(config.workers.lease_seconds),
            heartbeat,
            instance: tokio::sync::Mutex::new(instance),
            orphans_due,
            config,
            store,
            masterid,
            name,
            builders,
            workers: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            scale_wake: Notify::new(),
            queue_events: watch::channel(0).0,
            shutting_down,
        });
        info!(master = %master.name, masterid, "master registered");
        Ok(master)
    }

    pub fn builder_id(&self, name: &str) -> Option<i64> {
        self.builders.iter().find(|b| b.config.name == name).map(|b| b.id)
    }

    fn builder_by_id(&self, id: i64) -> Option<&Builder> {
        self.builders.iter().find(|b| b.id == id)
    }

    /// Wakes the dispatcher and the pool scaler.
    pub fn wake(&self) {
        self.wake.notify_one();
        self.queue_events.send_modify(|n| *n = n.wrapping_add(1));
        self.scale_wake.notify_one();
        self.scale_woken_at.lock().expect("scale_woken_at poisoned").get_or_insert_with(Instant::now);
    }

    /// When the earliest wake-up since the last call happened, if any (for the reaction-time
    /// histogram of the scalers).
    pub fn take_scale_wake(&self) -> Option<Instant> {
        self.scale_woken_at.lock().expect("scale_woken_at poisoned").take()
    }

    /// Records the pools this master runs.
    pub fn set_pools(&self, pools: Vec<Arc<crate::pool::Pool>>) {
        *self.pools.lock().expect("pools poisoned") = pools;
    }

    /// The pools this master runs.
    pub fn pools(&self) -> Vec<Arc<crate::pool::Pool>> {
        self.pools.lock().expect("pools poisoned").clone()
    }

    /// The builders a pool serves (its workers run only these).
    pub fn pool_builder_ids(&self, pool: &str) -> Option<&[i64]> {
        self.pool_builders.get(pool).map(Vec::as_slice)
    }

    /// Waits until something happened that may change how many workers a pool needs: a request
    /// entered the queue, a build ended, a worker joined or left.
    pub async fn scaling_wanted(&self) {
        self.scale_wake.notified().await;
    }

    /// Takes a worker out of service for a scale-down: no new build goes to it, and it is told to
    /// exit once idle (at once if it is idle now). Returns false if its session is already gone.
    pub async fn retire_worker(&self, session: &Arc<WorkerSession>) -> bool {
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
    pub async fn drain_worker(&self, name: &str) -> Result<(), StoreError> {
        self.store.pause_for_scale_down(name).await?;
        if let Some(session) = self.workers.lock().expect("workers poisoned").get(name).cloned()
            && !session.is_draining()
        {
            session.set_draining();
            self.scale_drained.lock().expect("scale_drained poisoned").insert(name.to_owned());
        }
        Ok(())
    }

    /// Returns a worker drained for a scale-down to service (the scale-down did not happen).
    pub async fn undrain_worker(&self, name: &str) -> Result<(), StoreError> {
        self.store.set_worker_paused(name, false, None).await?;
        if self.scale_drained.lock().expect("scale_drained poisoned").remove(name)
            && let Some(session) = self.workers.lock().expect("workers poisoned").get(name).cloned()
        {
            session.clear_draining();
        }
        self.wake();
        Ok(())
    }

    /// Running builds of a worker connected here (0 when it is not).
    pub fn builds_on(&self, name: &str) -> u32 {
        self.workers.lock().expect("workers poisoned").get(name).map_or(0, |s| s.running_builds())
    }

    /// A worker's machine is gone (its pod was deleted): end its session here at once rather
    /// than waiting for missed heartbeats; its builds end as RETRY and are re-queued.
    pub async fn worker_gone(&self, name: &str) {
        let session = self.workers.lock().expect("workers poisoned").get(name).cloned();
        if let Some(session) = session {
            warn!(worker = name, running = session.running_builds(), "the worker's pod is gone; ending its session");
            session.close_gone();
            self.detach_worker(&session).await;
        }
    }

    /// How long after a worker's session ended its commands may still run: the worker kills
    /// them within four heartbeats of last hearing from the master (three of silence, one
    /// tick), and a frozen worker's commands are killed by their supervisor after three
    /// heartbeats (at least 3 s) without a feed; one more second covers clock granularity. A
    /// lost worker's builds are re-queued only after it. Leases are validated to be longer.
    pub fn orphan_deadline(&self) -> Duration {
        crate::config::orphan_deadline(self.heartbeat)
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutting_down.borrow()
    }

    /// The gauges of a scrape: the queue per builder, builds running here, workers by state.
    pub async fn record_metrics(&self) -> Result<(), StoreError> {
        let (pending, oldest) = self.store.pending_by_builder().await?;
        let mut running: Vec<(String, u32)> = self.builders.iter().map(|b| (b.config.name.clone(), 0)).collect();
        for build in self.running.lock().expect("running poisoned").values() {
            if let Some(name) = self.builder_by_id(build.builderid).map(|b| b.config.name.clone())
                && let Some(entry) = running.iter_mut().find(|(n, _)| *n == name)
            {
                entry.1 += 1;
            }
        }
        let mut pools: Vec<String> = self.config.pools.iter().map(|p| p.name.clone()).collect();
        pools.push(String::new());
        let mut by_state: Vec<(String, &'static str, usize)> = Vec::new();
        for pool in pools {
            for state in ["idle", "busy", "draining"] {
                by_state.push((pool.clone(), state, 0));
            }
        }
        for worker in self.workers() {
            let pool = worker.info.pool.clone().filter(|p| self.pool_builders.contains_key(p)).unwrap_or_default();
            let state = if worker.is_draining() {
                "draining"
            } else if worker.running_builds() > 0 {
                "busy"
            } else {
                "idle"
            };
            if let Some(entry) = by_state.iter_mut().find(|(p, s, _)| *p == pool && *s == state) {
                entry.2 += 1;
            }
        }
        let oldest_age = oldest.map(|at| Duration::from_millis((self.store.now_ms() - at).max(0) as u64));
        crate::telemetry::record(&crate::telemetry::Snapshot {
            pending_by_builder: &pending,
            oldest_pending_age: oldest_age,
            running_by_builder: &running,
            workers_by_state: &by_state,
        });
        Ok(())
    }

    /// Connected workers, by name.
    pub fn workers(&self) -> Vec<Arc<WorkerSession>> {
        let mut list: Vec<_> = self.workers.lock().expect("workers poisoned").values().cloned().collect();
        list.sort_by(|a, b| a.name().cmp(b.name()));
        list
    }

    // ---------------------------------------------------------------------------------------
    // Workers

    /// Admits a worker that has registered on some transport; `outbound` carries messages to it.
    pub async fn attach_worker(
        self: &Arc<Self>,
        info: WorkerInfo,
        outbound: mpsc::Sender<ToWorker>,
    ) -> Result<Arc<WorkerSession>, AttachError> {
        if self.is_shutting_down() {
            return Err(AttachError::ShuttingDown);
        }
        if info.name.is_empty() || info.name.len() > 100 || info.name.chars().any(char::is_control) {
            return Err(AttachError::Invalid("the name must be 1 to 100 printable characters".into()));
        }
        {
            let workers = self.workers.lock().expect("workers poisoned");
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
        let workerid = self.store.worker_connected(&info.name, &info.to_json(), Some(self.masterid)).await?;
        let session = WorkerSession::new(workerid, info, outbound);
        {
            let mut workers = self.workers.lock().expect("workers poisoned");
            if workers.get(session.name()).is_some_and(|s| !s.is_closed()) {
                return Err(AttachError::NameTaken(session.name().to_owned()));
            }
            workers.insert(session.name().to_owned(), Arc::clone(&session));
        }
        session
            .send(ToWorker::Registered {
                workerid,
                master_name: self.name.clone(),
                heartbeat_interval_ms: self.heartbeat.as_millis() as u32,
            })
            .await
            .map_err(|_| AttachError::Invalid("the worker went away while registering".into()))?;
        info!(worker = session.name(), workerid, max_builds = session.info.max_builds, "worker connected");
        crate::telemetry::worker_connected();
        self.wake();
        Ok(session)
    }

    /// Handles a message from a worker.
    pub async fn worker_message(&self, session: &Arc<WorkerSession>, message: FromWorker) {
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

    async fn shutdown_if_drained(&self, session: &Arc<WorkerSession>) {
        if session.is_draining() && session.running_builds() == 0 {
            let _ = session.send(ToWorker::Shutdown { reason: "drained".into() }).await;
        }
    }

    /// Forgets a worker whose session ended. Its running builds see the loss and end as RETRY.
    pub async fn detach_worker(&self, session: &Arc<WorkerSession>) {
        session.close();
        {
            let mut workers = self.workers.lock().expect("workers poisoned");
            if workers.get(session.name()).is_some_and(|s| Arc::ptr_eq(s, session)) {
                workers.remove(session.name());
            }
        }
        if let Err(error) = self.store.worker_disconnected(session.workerid, self.masterid).await {
            warn!(worker = session.name(), %error, "could not record the disconnection");
        }
        info!(worker = session.name(), "worker disconnected");
        crate::telemetry::worker_disconnected();
        self.wake();
    }

    // ---------------------------------------------------------------------------------------
    // Changes and build submission

    /// Stores a change durably, then lets every matching scheduler turn it into build requests.
    pub async fn add_change(&self, change: NewChange) -> Result<Change, SubmitError> {
        let mut stored = self.add_changes(vec![change]).await?;
        Ok(stored.remove(0))
    }

    /// Stores the changes of one delivery in one transaction — all or none — then lets the
    /// schedulers act on each, in order.
    pub async fn add_changes(&self, changes: Vec<NewChange>) -> Result<Vec<Change>, SubmitError> {
        let stored = self.store.add_changes(&changes).await?;
        for change in &stored {
            self.schedule_change(change).await?;
        }
        Ok(stored)
    }

    /// Lets every change scheduler act on a stored change: build it now, or classify it under a
    /// tree-stable timer.
    async fn schedule_change(&self, stored: &Change) -> Result<(), SubmitError> {
        let change = &stored.change;
        info!(changeid = stored.changeid, branch = ?change.branch, revision = ?change.revision, "change added");
        let disabled = self.store.disabled_schedulers().await?;
        for scheduler in self.change_schedulers.iter().filter(|s| !disabled.contains(&s.config.name)) {
            let classification = scheduler.compiled.classify(change);
            if classification == Classification::Ignored {
                continue;
            }
            match scheduler.compiled.tree_stable_ms {
                None if classification == Classification::Important => {
                    let buildset = self.buildset_for(scheduler, std::slice::from_ref(stored));
                    self.submit(&buildset).await?;
                }
                None => {}
                Some(stable_ms) => {
                    let now = self.store.now_ms();
                    let key = scheduler.compiled.timer_key(change);
                    let important = classification == Classification::Important;
                    self.store
                        .classify_change(&scheduler.compiled.name, &key, stored.changeid, important, |running| {
                            schedulers::next_fire(running, classification, now, stable_ms)
                        })
                        .await?;
                    self.timers_changed.notify_one();
                }
            }
        }
        for timed in
            self.timed_schedulers.iter().filter(|t| t.config.only_if_changed && !disabled.contains(&t.config.name))
        {
            let classification = timed.rules.classify(change);
            if classification != Classification::Ignored {
                let important = classification == Classification::Important;
                self.store.remember_change(&timed.config.name, stored.changeid, important).await?;
            }
        }
        Ok(())
    }

    /// Polls one git poller now, wherever its schedule runs; returns how many changes it found.
    /// Safe to run on several masters at once: the store records a poll only if nobody recorded
    /// another since it began.
    pub async fn poll(&self, name: &str) -> Result<usize, PollError> {
        let entry =
            self.pollers.iter().find(|p| p.poller.name == name).ok_or_else(|| PollError::Unknown(name.to_owned()))?;
        let _busy = entry.busy.lock().await;
        let (started, known) = self.store.poller_tips(name).await?;
        let poller = entry.poller.clone();
        let expected = known.clone();
        let poll = tokio::task::spawn_blocking(move || poller.poll(&known, !started))
            .await
            .map_err(|e| PollError::Git(e.to_string()))?
            .map_err(PollError::Git)?;
        match self.store.record_poll(name, &expected, &poll.tips, &poll.changes).await? {
            Some(stored) => {
                for change in &stored {
                    self.schedule_change(change).await?;
                }
                if !started {
                    info!(poller = name, branches = poll.tips.len(), "poller learned the branch tips");
                }
                Ok(stored.len())
            }
            None => {
                debug!(poller = name, "another poll recorded first; nothing to do");
                Ok(0)
            }
        }
    }

    /// Names of the configured pollers.
    pub fn poller_names(&self) -> Vec<String> {
        self.pollers.iter().map(|p| p.poller.name.clone()).collect()
    }

    /// Polls each poller every `pollInterval` on the master that holds its lease, and at once
    /// when forced.
    pub async fn run_pollers(self: Arc<Self>) {
        let mut tasks = tokio::task::JoinSet::new();
        for index in 0..self.pollers.len() {
            let master = Arc::clone(&self);
            tasks.spawn(async move { master.run_poller(index).await });
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn run_poller(&self, index: usize) {
        let entry = &self.pollers[index];
        let name = entry.poller.name.clone();
        let interval = Duration::from_secs_f64(entry.poller.config.poll_interval);
        let lease = (interval * 3).max(Duration::from_secs(30));
        let mut shutdown = self.shutting_down.subscribe();
        loop {
            match self.store.claim_poller(&name, self.masterid, lease.as_millis() as i64).await {
                Ok(true) => match self.poll(&name).await {
                    Ok(0) => {}
                    Ok(found) => info!(poller = %name, changes = found, "polled new commits"),
                    Err(error) => warn!(poller = %name, %error, "poll failed; will try again"),
                },
                Ok(false) => debug!(poller = %name, "another master polls this repository"),
                Err(error) => warn!(poller = %name, %error, "cannot claim the poller"),
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = entry.force.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// The buildset a change scheduler submits for `changes` (oldest first).
    fn buildset_for(&self, scheduler: &ChangeSchedulerEntry, changes: &[Change]) -> NewBuildset {
        let config = &scheduler.config;
        let kind = if scheduler.compiled.per_branch { "AnyBranchScheduler" } else { "SingleBranchScheduler" };
        let origin =
            Origin { kind, name: &config.name, builder_names: &config.builder_names, properties: &config.properties };
        self.buildset_from(&origin, config.priority, changes, None)
    }

    /// A scheduler's buildset: the newest change's sources for each codebase (or `default` when
    /// there is no change), the scheduler's properties and the newest change's.
    fn buildset_from(
        &self,
        origin: &Origin<'_>,
        priority: i64,
        changes: &[Change],
        default: Option<SourceStamp>,
    ) -> NewBuildset {
        let mut props = Properties::new();
        for (k, v) in origin.properties {
            props.set(k.clone(), v.clone(), "Scheduler");
        }
        props.set("scheduler", Value::from(origin.name), "Scheduler");
        let mut sourcestamps: Vec<SourceStamp> = Vec::new();
        for stored in changes {
            for (k, v, _) in stored.change.properties.iter() {
                props.set(k, v.clone(), "Change");
            }
            let ss = stored.change.sourcestamp();
            match sourcestamps.iter_mut().find(|s| s.codebase == ss.codebase) {
                Some(existing) => *existing = ss,
                None => sourcestamps.push(ss),
            }
        }
        if sourcestamps.is_empty() {
            sourcestamps.extend(default);
        }
        let builderids: Vec<i64> = origin.builder_names.iter().filter_map(|b| self.builder_id(b)).collect();
        NewBuildset {
            reason: format!("The {} scheduler named '{}' triggered this build", origin.kind, origin.name),
            external_idstring: None,
            properties: props,
            sourcestamps,
            collapse_builderids: self.collapsing(&builderids),
            builderids,
            priority,
            ..Default::default()
        }
    }

    /// Acts on completed buildsets: each one whose scheduler has Dependent schedulers and whose
    /// result is SUCCESS or WARNINGS makes them submit a buildset of the same sources. The
    /// completions come from an outbox written with the completion, so each is acted on once.
    pub async fn run_completions(self: Arc<Self>) {
        let mut shutdown = self.shutting_down.subscribe();
        loop {
            let taken = self
                .store
                .take_completed_buildsets(100, |completed| {
                    let upstream =
                        completed.details.properties.get("scheduler").and_then(Value::as_str).unwrap_or_default();
                    if !matches!(completed.results, Results::Success | Results::Warnings) {
                        return Vec::new();
                    }
                    self.config
                        .schedulers
                        .iter()
                        .filter_map(|s| match s {
                            SchedulerConfig::Dependent(d) if d.upstream == upstream => Some(d),
                            _ => None,
                        })
                        .map(|d| {
                            let origin = Origin {
                                kind: "Dependent",
                                name: &d.name,
                                builder_names: &d.builder_names,
                                properties: &d.properties,
                            };
                            let mut buildset = self.buildset_from(&origin, d.priority, &[], None);
                            buildset.sourcestamps = completed.details.sourcestamps.clone();
                            buildset.collapse_builderids.clear();
                            buildset
                        })
                        .collect()
                })
                .await;
            let more = match taken {
                Ok((count, submitted)) => {
                    if !submitted.is_empty() {
                        info!(buildsets = submitted.len(), "dependent schedulers fired");
                        self.store.notify_queue().await;
                        self.wake();
                    }
                    count == 100
                }
                Err(error) => {
                    warn!(%error, "could not act on completed buildsets");
                    false
                }
            };
            if more {
                continue;
            }
            tokio::select! {
                _ = self.buildsets_completed.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Fires Periodic and Nightly schedulers on time, on exactly one master: the next time lives
    /// in the database and firing moves it forward with a compare-and-swap. A master that was
    /// down fires a missed time once when it returns.
    pub async fn run_timed(self: Arc<Self>) {
        let mut tasks = tokio::task::JoinSet::new();
        for index in 0..self.timed_schedulers.len() {
            let master = Arc::clone(&self);
            tasks.spawn(async move { master.run_timed_scheduler(index).await });
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn run_timed_scheduler(&self, index: usize) {
        let entry = &self.timed_schedulers[index];
        let name = &entry.config.name;
        let mut shutdown = self.shutting_down.subscribe();
        let sweep = Duration::from_secs(30);
        loop {
            // Sleeps end at an instant read with `now`, so they end when the clock reads `due`
            // however long the database takes to answer.
            let (now, read_at) = (self.store.now_ms(), tokio::time::Instant::now());
            // A new Periodic scheduler fires at once; a changed period counts from now.
            let (Some(first), Some(changed)) = (entry.when.first_after(now), entry.when.next_after(now)) else {
                return;
            };
            let due = match self.store.scheduler_next_fire(name, &entry.spec(), first, changed).await {
                Ok(due) => due,
                Err(error) => {
                    warn!(scheduler = %name, %error, "cannot read the scheduler's next time");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(5)) => continue,
                        _ = shutdown.changed() => return,
                    }
                }
            };
            if due > now {
                let wait = Duration::from_millis((due - now) as u64).min(sweep);
                tokio::select! {
                    _ = tokio::time::sleep_until(read_at + wait) => continue,
                    _ = shutdown.changed() => return,
                }
            }
            let Some(next) = entry.when.next_after(now) else { return };
            let config = &entry.config;
            let disabled = self.store.disabled_schedulers().await.map(|d| d.contains(name)).unwrap_or(false);
            let origin = Origin {
                kind: if matches!(entry.when, When::Every(_)) { "Periodic" } else { "Nightly" },
                name,
                builder_names: &config.builder_names,
                properties: &config.properties,
            };
            let fired = self
                .store
                .fire_scheduled(name, due, next, |remembered| {
                    if disabled {
                        return None;
                    }
                    if config.only_if_changed && !remembered.iter().any(|(_, important)| *important) {
                        return None;
                    }
                    let changes: Vec<Change> = remembered.iter().map(|(c, _)| c.clone()).collect();
                    let default = SourceStamp {
                        branch: config.branch.clone(),
                        revision: None,
                        repository: config.repository.clone(),
                        project: config.project.clone(),
                        codebase: config.codebase.clone(),
                    };
                    Some(self.buildset_from(&origin, config.priority, &changes, Some(default)))
                })
                .await;
            match fired {
                Ok(Some(Some((bsid, _)))) => {
                    info!(scheduler = %name, bsid, "timed scheduler fired");
                    self.store.notify_queue().await;
                    self.wake();
                }
                Ok(Some(None)) => info!(scheduler = %name, "nothing changed; no build"),
                Ok(None) => debug!(scheduler = %name, "another master fired this time"),
                Err(error) => warn!(scheduler = %name, %error, "could not fire the scheduler"),
            }
        }
    }

    /// The builders among `builderids` whose requests collapse.
    fn collapsing(&self, builderids: &[i64]) -> Vec<i64> {
        builderids
            .iter()
            .copied()
            .filter(|id| {
                self.builder_by_id(*id)
                    .is_some_and(|b| b.config.collapse_requests.unwrap_or(self.config.collapse_requests))
            })
            .collect()
    }

    /// Fires tree-stable timers when they are due. Timers live in the database, so a restarted
    /// master — or any other master sharing the database — picks them up; each fires once.
    pub async fn run_timers(self: Arc<Self>) {
        let mut shutdown = self.shutting_down.subscribe();
        let sweep = Duration::from_secs(5);
        loop {
            // As for timed schedulers: the sleep ends at an instant read with `now`.
            let (now, read_at) = (self.store.now_ms(), tokio::time::Instant::now());
            let wait = match self.store.next_timer_at().await {
                Ok(Some(at)) => Duration::from_millis((at - now).clamp(0, sweep.as_millis() as i64) as u64),
                Ok(None) => sweep,
                Err(error) => {
                    warn!(%error, "cannot read scheduler timers");
                    sweep
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(read_at + wait) => {}
                _ = self.timers_changed.notified() => continue,
                _ = shutdown.changed() => return,
            }
            let disabled = self.store.disabled_schedulers().await.unwrap_or_default();
            let fired = self
                .store
                .fire_due_timers(self.store.now_ms(), |name, changes| {
                    if disabled.contains(name) {
                        return None;
                    }
                    let scheduler = self.change_schedulers.iter().find(|s| s.config.name == name)?;
                    (!changes.is_empty()).then(|| self.buildset_for(scheduler, changes))
                })
                .await;
            match fired {
                Ok(buildsets) if !buildsets.is_empty() => {
                    info!(buildsets = buildsets.len(), "tree-stable timers fired");
                    self.store.notify_queue().await;
                    self.wake();
                }
                Ok(_) => {}
                Err(error) => warn!(%error, "could not fire scheduler timers"),
            }
        }
    }

    /// Deletes the logs of builds older than `logHorizon`, if set: a pass every quarter of the
    /// horizon (between a minute and an hour), in batches of [`LOG_BATCH`] logs, each its own
    /// short transaction, so the janitor never holds the database for long. Every master may
    /// run it; deleting twice is harmless.
    pub async fn run_log_janitor(self: Arc<Self>) {
        let Some(horizon) = self.config.log_horizon else { return };
        let horizon_ms = (horizon * 1000.0) as i64;
        let every =
            Duration::from_millis((horizon_ms / 4) as u64).clamp(Duration::from_secs(60), Duration::from_secs(3600));
        let mut shutdown = self.shutting_down.subscribe();
        loop {
            let (now, read_at) = (self.store.now_ms(), tokio::time::Instant::now());
            let mut deleted = 0;
            loop {
                match self.store.delete_old_logs(now - horizon_ms, LOG_BATCH).await {
                    Ok(count) => {
                        deleted += count;
                        crate::telemetry::logs_deleted(count);
                        if count < LOG_BATCH as u64 || self.is_shutting_down() {
                            break;
                        }
                        tokio::task::yield_now().await;
                    }
                    Err(error) => {
                        warn!(%error, "could not delete old logs");
                        break;
                    }
                }
            }
            if deleted > 0 {
                info!(logs = deleted, horizon_seconds = horizon, "deleted the logs of old builds");
            }
            tokio::select! {
                _ = tokio::time::sleep_until(read_at + every) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Forces a build through a force scheduler.
    pub async fn force(
        &self,
        scheduler_name: &str,
        request: ForceRequest,
    ) -> Result<(i64, Vec<(i64, i64)>), SubmitError> {
        let scheduler = self
            .config
            .schedulers
            .iter()
            .find(|s| s.name() == scheduler_name)
            .ok_or_else(|| SubmitError::UnknownScheduler(scheduler_name.to_owned()))?;
        let SchedulerConfig::Force(force) = scheduler else {
            return Err(SubmitError::NotForceable(scheduler_name.to_owned()));
        };
        if self.store.disabled_schedulers().await?.contains(scheduler_name) {
            return Err(SubmitError::Disabled(scheduler_name.to_owned()));
        }
        let (allowed, properties) = (&force.builder_names, &force.properties);
        let mut names = request.builder_names.clone();
        if let Some(id) = request.builderid {
            let builder = self.builder_by_id(id).ok_or_else(|| SubmitError::UnknownBuilder(id.to_string()))?;
            names.push(builder.config.name.clone());
        }
        if names.is_empty() {
            names = allowed.clone();
        }
        let mut builderids = Vec::new();
        for name in &names {
            let id = self.builder_id(name).ok_or_else(|| SubmitError::UnknownBuilder(name.clone()))?;
            if !allowed.contains(name) {
                return Err(SubmitError::BuilderNotInScheduler {
                    builder: name.clone(),
                    scheduler: scheduler_name.to_owned(),
                });
            }
            if !builderids.contains(&id) {
                builderids.push(id);
            }
        }
        let mut props = Properties::new();
        for (k, v) in properties {
            props.set(k.clone(), v.clone(), "Scheduler");
        }
        props.set("scheduler", Value::from(scheduler_name), "Scheduler");
        props.set("owner", Value::from(request.owner.clone()), "Force Build Form");
        props.set("reason", Value::from(request.reason.clone()), "Force Build Form");
        // Sources: one source stamp per configured codebase; a named codebase `cb` reads its
        // fields from `cb_branch`, `cb_revision`, `cb_repository` and `cb_project`.
        let mut extras = request.properties.clone();
        let mut sourcestamps = Vec::new();
        for codebase in &force.codebases {
            if codebase.is_empty() {
                sourcestamps.push(request.sourcestamp.clone());
                continue;
            }
            let mut take = |field: &str| {
                let key = format!("{codebase}_{field}");
                let position = extras.iter().position(|(k, _)| *k == key)?;
                let (_, value) = extras.remove(position);
                value.as_str().filter(|v| !v.is_empty()).map(str::to_owned)
            };
            sourcestamps.push(SourceStamp {
                branch: take("branch"),
                revision: take("revision"),
                repository: take("repository").unwrap_or_default(),
                project: take("project").unwrap_or_default(),
                codebase: codebase.clone(),
            });
        }
        // With declared parameters only they become properties, typed and checked; without,
        // whatever extra fields were submitted are passed on as they came.
        let submitted: Vec<(String, Value)> = if force.parameters.is_empty() {
            extras
        } else {
            let given = extras.into_iter().collect();
            crate::force::properties(&force.parameters, &given).map_err(SubmitError::InvalidParameters)?
        };
        for (k, v) in &submitted {
            props.set(k.clone(), v.clone(), "Force Build Form");
        }
        let buildset = NewBuildset {
            reason: format!("A build was forced by '{}': {}", request.owner, request.reason),
            external_idstring: None,
            properties: props,
            sourcestamps,
            builderids,
            priority: request.priority,
            rebuilt_buildid: None,
            ..Default::default()
        };
        Ok(self.submit(&buildset).await?)
    }

    async fn submit(&self, buildset: &NewBuildset) -> Result<(i64, Vec<(i64, i64)>), StoreError> {
        let mut buildset = buildset.clone();
        buildset.collapse_builderids = self.collapsing(&buildset.builderids);
        let submitted = self.store.add_buildset(&buildset).await?;
        crate::telemetry::request_submitted(submitted.1.len());
        debug!(bsid = submitted.0, requests = submitted.1.len(), "buildset submitted");
        self.store.notify_queue().await;
        self.wake();
        Ok(submitted)
    }

    // ---------------------------------------------------------------------------------------
    // Dispatch

    /// Hands claimable requests to free workers until the queue or the free slots run out, then
    /// waits to be woken. A safety sweep every few seconds covers wake-ups lost with a database
    /// notification.
    pub async fn run_dispatcher(self: Arc<Self>) {
        let mut shutdown = self.shutting_down.subscribe();
        let sweep = Duration::from_secs(5);
        loop {
            if *shutdown.borrow() {
                break;
            }
            if let Err(error) = self.dispatch_round().await {
                crate::telemetry::store_error("dispatch");
                error!(%error, "dispatch failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                self.wake();
            }
            tokio::select! {
                _ = self.wake.notified() => {}
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
        let name = worker.name();
        Some(
            self.builders
                .iter()
                .filter(|b| pool.is_none_or(|ids| ids.contains(&b.id)))
                .filter(|b| b.config.workernames.is_empty() || b.config.workernames.iter().any(|w| w == name))
                .map(|b| b.id)
                .collect(),
        )
    }

    async fn dispatch_round(self: &Arc<Self>) -> Result<(), StoreError> {
        let lease_ms = self.lease.as_millis() as i64;
        loop {
            if self.is_shutting_down() {
                return Ok(());
            }
            let mut free: Vec<Arc<WorkerSession>> = self.workers().into_iter().filter(|w| w.has_free_slot()).collect();
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
        }
    }

    /// A slot reserved for a claim that found nothing is free again: as if no build had run, a
    /// draining worker that now has nothing to do is told to exit, and the scaler, which may
    /// have seen the reservation as a build, looks again.
    async fn reservation_unused(&self, worker: &Arc<WorkerSession>) {
        if worker.is_draining() {
            self.shutdown_if_drained(worker).await;
            self.scale_wake.notify_one();
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
            master.shutdown_if_drained(&session).await;
            master.wake();
        });
    }

    // ---------------------------------------------------------------------------------------
    // Control actions

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
    pub async fn rebuild(&self, buildid: i64) -> Result<(i64, Vec<(i64, i64)>), ControlError> {
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
        self.wake();
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
        self.wake();
        Ok(())
    }

    /// Applies a worker action if the worker is connected here; returns whether it was.
    async fn apply_worker_action(&self, name: &str, action: WorkerAction) -> bool {
        let session = self.workers.lock().expect("workers poisoned").get(name).cloned();
        let Some(session) = session else { return false };
        match action {
            WorkerAction::Pause | WorkerAction::Unpause => {}
            WorkerAction::Stop => {
                info!(worker = name, "stopping the worker once its builds are done");
                session.set_draining();
                let _ = session.send(ToWorker::Drain).await;
                self.shutdown_if_drained(&session).await;
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
    async fn on_control(&self, payload: &str) {
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

    // ---------------------------------------------------------------------------------------
    // Housekeeping

    /// Renews this master's leases, stops builds whose claim was taken back, and re-queues
    /// requests whose lease expired anywhere. If renewal keeps failing for most of a lease, this
    /// master stops its own builds: another master will run them once the lease expires, and the
    /// same build must never run twice at once.
    pub async fn run_housekeeping(self: Arc<Self>) {
        let mut shutdown = self.shutting_down.subscribe();
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
                    self.wake();
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

    /// Listens for queue changes made by other masters sharing the database (PostgreSQL only).
    pub async fn run_queue_listener(self: Arc<Self>, database_url: String) {
        let mut shutdown = self.shutting_down.subscribe();
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
                        Ok(Notification::Queue) => self.wake(),
                        Ok(Notification::Control(payload)) => self.on_control(&payload).await,
                        Err(error) => {
                            warn!(%error, "queue notifications interrupted; reconnecting");
                            self.wake();
                            break;
                        }
                    },
                    _ = shutdown.changed() => return,
                }
            }
        }
    }

    /// Begins a graceful shutdown: no new claims or workers; running builds are stopped and their
    /// requests handed back to the queue for another master or the next start.
    pub fn begin_shutdown(&self) {
        let _ = self.shutting_down.send(true);
        for build in self.running.lock().expect("running poisoned").values() {
            let _ = build.stop.send(Some(StopReason::Shutdown));
        }
        self.wake();
    }

    /// Ends every worker session, so workers reconnect to another master (or to this one when it
    /// is back). Their builds have already been handed back by [`Master::begin_shutdown`].
    pub fn close_sessions(&self) {
        for session in self.workers() {
            session.close();
        }
    }

    /// Waits until no build runs on this master, up to `limit`.
    pub async fn wait_idle(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.running.lock().expect("running poisoned").is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The name of the lock held by the process running as master `masterid`.
fn instance_lock_name(masterid: i64) -> String {
    format!("kiln-master:{masterid}")
}

/// Takes the instance lock of `masterid`. Holding it proves that no other live process runs
/// under this id, so claims carrying the id are a previous run's orphans: their leases are
/// brought forward to `deadline` from now — when that run's commands are surely dead, since its
/// workers lost their sessions no later than this start — instead of running a whole lease.
/// Without the lock (two masters share a name, or a predecessor's database session has not
/// ended yet) the claims are left to their leases. Returns the lock and when orphans are due.
async fn take_instance(
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
    let shortened = store.shorten_claims(masterid, store.now_ms() + deadline.as_millis() as i64).await?;
    if shortened == 0 {
        return Ok((Some(lock), None));
    }
    warn!(requests = shortened, after = ?deadline, "a previous run of this master left claimed requests; re-running them");
    Ok((Some(lock), Some(Instant::now() + deadline)))
}

/// How long housekeeping sleeps: one period, or less to reap orphans the moment they are due.
fn next_round(period: Duration, orphans_due: &mut Option<Instant>) -> Duration {
    let Some(due) = *orphans_due else { return period };
    let until = due.saturating_duration_since(Instant::now()) + Duration::from_millis(20);
    if until <= period {
        *orphans_due = None;
        return until;
    }
    period
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_else(|_| "localhost".to_owned())
}

impl Triggers for Master {
    fn trigger(&self, request: TriggerRequest) -> BoxFuture<'_, Result<Vec<Triggered>, String>> {
        Box::pin(async move {
            let mut submitted = Vec::new();
            for name in &request.scheduler_names {
                let Some(SchedulerConfig::Triggerable(scheduler)) =
                    self.config.schedulers.iter().find(|s| s.name() == name)
                else {
                    return Err(format!("{name:?} is not a triggerable scheduler"));
                };
                let mut properties = Properties::new();
                for (k, v) in &scheduler.properties {
                    properties.set(k.clone(), v.clone(), "Scheduler");
                }
                properties.set("scheduler", Value::from(name.clone()), "Scheduler");
                properties.update(&request.properties);
                let builderids: Vec<i64> = scheduler.builder_names.iter().filter_map(|b| self.builder_id(b)).collect();
                let buildset = NewBuildset {
                    reason: format!("The Triggerable scheduler named '{name}' triggered this build"),
                    properties,
                    sourcestamps: request.sourcestamps.clone(),
                    builderids,
                    priority: scheduler.priority,
                    parent_buildid: Some(request.parent_buildid),
                    parent_relationship: Some("Triggered from".into()),
                    waited_for: request.waited_for,
                    ..Default::default()
                };
                let (bsid, requests) = self.submit(&buildset).await.map_err(|e| e.to_string())?;
                submitted.push((name.clone(), bsid, requests));
            }
            Ok(submitted)
        })
    }

    fn wait(&self, bsids: Vec<i64>) -> BoxFuture<'_, Result<Vec<Results>, String>> {
        Box::pin(async move {
            // Completion is read from the database, again whenever the queue moves here or on
            // another master (its notification wakes this one); the sweep is a safety net.
            let mut events = self.queue_events.subscribe();
            loop {
                let results = self.store.buildset_results(&bsids).await.map_err(|e| e.to_string())?;
                if results.iter().all(Option::is_some) {
                    return Ok(results.into_iter().flatten().collect());
                }
                tokio::select! {
                    _ = events.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        })
    }
}
