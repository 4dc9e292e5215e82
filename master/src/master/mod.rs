//! One master: its shared state (configuration, database, builders, the worker registry and
//! signals) and start-up. Each use case lives in a file of its own: `submit` (changes and forces
//! into buildsets), `dispatch` (claims to free workers), `control` (stop, cancel, rebuild,
//! priority, worker actions), `timers` and `dependents` (timed, tree-stable and Dependent
//! schedulers), `pollers`, `housekeeping` (leases, the instance lock, log janitor, notifications
//! from other masters), `metrics` and `triggers`.

mod control;
mod dependents;
mod dispatch;
mod housekeeping;
mod metrics;
mod pollers;
mod reports;
mod submit;
mod timers;
mod triggers;

pub use control::{ControlError, WorkerAction};
pub use pollers::PollError;
pub use submit::{Delivered, ForceRequest, SubmitError};

use dispatch::RunningBuild;
use housekeeping::take_instance;
use pollers::PollerEntry;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::info;

use crate::config::{BuilderConfig, ChangeSourceConfig, Config};
use crate::engine::StopReason;
use crate::plan::{ChangeSchedulerPlan, Plan, TimedSchedulerPlan};
use crate::poller::GitPoller;
use crate::signals::Signals;
use crate::store::{SessionLock, Store, StoreError};
use crate::workers::WorkerRegistry;

struct Builder {
    id: i64,
    config: Arc<BuilderConfig>,
}

/// One master: configuration, database and the workers connected to it.
pub struct Master {
    pub config: Arc<Config>,
    pub store: Store,
    pub masterid: i64,
    pub name: String,
    builders: Vec<Builder>,
    change_schedulers: Vec<ChangeSchedulerPlan>,
    timed_schedulers: Vec<TimedSchedulerPlan>,
    pollers: Vec<PollerEntry>,
    /// Wakes the timer loop when a change (re)starts a tree-stable timer.
    timers_changed: Notify,
    /// Wakes the completion loop when a build (and so perhaps a buildset) finished.
    buildsets_completed: Notify,
    /// The workers connected here.
    pub workers: Arc<WorkerRegistry>,
    /// Wake-ups and the shutdown flag, shared with the registry and the pool scalers.
    pub signals: Arc<Signals>,
    running: Mutex<HashMap<i64, RunningBuild>>,
    /// The builders each pool's workers run, by pool name.
    pool_builders: HashMap<String, Vec<i64>>,
    /// The pools this master runs, for status.
    pools: Mutex<Vec<Arc<crate::pool::Pool>>>,
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

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_else(|_| "localhost".to_owned())
}

impl Master {
    /// Registers the master and its builders in the database, to run `plan` (compiled from
    /// `config`).
    pub async fn start(config: Arc<Config>, plan: Plan, store: Store) -> Result<Arc<Master>, StoreError> {
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
        let Plan { change_schedulers, timed_schedulers } = plan;
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
        let pool_builders: HashMap<String, Vec<i64>> = config
            .pools
            .iter()
            .map(|pool| {
                let ids = builders.iter().filter(|b| pool.serves(&b.config)).map(|b| b.id).collect();
                (pool.name.clone(), ids)
            })
            .collect();
        let signals = Arc::new(Signals::default());
        let configured: crate::workers::Configured = {
            let builders: Vec<(i64, Vec<String>)> =
                builders.iter().map(|b| (b.id, b.config.workernames.clone())).collect();
            let pools = pool_builders.clone();
            Box::new(move |info| {
                let pool = info.pool.as_deref().and_then(|p| pools.get(p));
                dispatch::runnable(builders.iter().map(|(id, names)| (*id, names.as_slice())), pool, &info.name)
            })
        };
        let workers = Arc::new(WorkerRegistry::new(
            store.clone(),
            masterid,
            name.clone(),
            heartbeat,
            Arc::clone(&signals),
            configured,
        ));
        let master = Arc::new(Master {
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
            workers,
            signals,
            running: Mutex::new(HashMap::new()),
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

    /// How long after a worker's session ended its commands may still run: the worker kills
    /// them within four heartbeats of last hearing from the master (three of silence, one
    /// tick), and a frozen worker's commands are killed by their supervisor after three
    /// heartbeats (at least 3 s) without a feed; one more second covers clock granularity. A
    /// lost worker's builds are re-queued only after it. Leases are validated to be longer.
    pub fn orphan_deadline(&self) -> Duration {
        crate::config::orphan_deadline(self.heartbeat)
    }

    /// Begins a graceful shutdown: no new claims or workers; running builds are stopped and their
    /// requests handed back to the queue for another master or the next start.
    pub fn begin_shutdown(&self) {
        self.signals.begin_shutdown();
        for build in self.running.lock().expect("running poisoned").values() {
            let _ = build.stop.send(Some(StopReason::Shutdown));
        }
        self.signals.wake();
    }

    /// Ends every worker session, so workers reconnect to another master (or to this one when it
    /// is back). Their builds have already been handed back by [`Master::begin_shutdown`].
    pub fn close_sessions(&self) {
        for session in self.workers.list() {
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
