//! Worker pools: the scaler that sizes each pool from its queue — woken by events, not a polling
//! loop — and applies the decision through the pool's backend: local processes, a Kubernetes
//! Deployment, or nothing for workers managed elsewhere (`static`, which only reports).

pub mod kubernetes;
pub mod leader;
pub mod local;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::PoolConfig;
use crate::scaling::{self, Hysteresis, Load, Member, Policy};
use crate::signals::Signals;
use crate::store::{Store, StoreError};
use crate::workers::WorkerRegistry;
use kubernetes::KubernetesPool;
use leader::Leadership;
use local::{LocalError, LocalPool};

/// How often a busy scaler looks at the queue at most.
const STEP_SPACING: Duration = Duration::from_millis(25);
/// How many looks a scaler may take at once after a quiet spell.
const STEP_BURST: u32 = 8;

/// A token bucket: `burst` steps at once, then one per `spacing`.
#[derive(Debug)]
struct Pace {
    spacing: Duration,
    burst: u32,
    /// When the bucket is full again; in the past when it is full.
    full_at: tokio::time::Instant,
}

impl Pace {
    /// A full bucket at `now`.
    fn new(spacing: Duration, burst: u32, now: tokio::time::Instant) -> Pace {
        Pace { spacing, burst, full_at: now }
    }

    /// Takes a step at `now`: how long to wait before taking it.
    fn take(&mut self, now: tokio::time::Instant) -> Duration {
        let deepest = self.spacing * self.burst;
        // A bucket full since long ago holds only `burst` steps.
        let full_at = self.full_at.max(now);
        let start = (full_at + self.spacing).saturating_duration_since(now).saturating_sub(deepest);
        self.full_at = full_at + self.spacing;
        start
    }
}

/// What a pool needs of the master it runs in: the database, the workers connected here, the
/// wake-ups, and the builders the pool's workers run. Nothing else of the master is reachable.
#[derive(Debug, Clone)]
pub struct MasterPort {
    pub store: Store,
    pub workers: Arc<WorkerRegistry>,
    pub signals: Arc<Signals>,
    pub builderids: Vec<i64>,
}

/// Why a scaling step failed; the scaler backs off and the master keeps building.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("kubernetes API: {}", kubernetes::describe(.0))]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Local(#[from] LocalError),
}

/// Who runs a pool's workers.
#[derive(Debug)]
pub enum Backend {
    Local(Arc<LocalPool>),
    Kubernetes(Arc<KubernetesPool>),
    Static,
}

/// What a pool looks like now, for the API and the command line.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PoolStatus {
    pub name: String,
    pub backend: &'static str,
    /// Whether this master runs the pool's scaler.
    pub leader: bool,
    pub desired: u32,
    pub workers: u32,
    pub busy: u32,
    pub pending: u32,
    pub min: u32,
    pub max: u32,
    pub last_error: Option<String>,
}

/// A pool and its scaler.
#[derive(Debug)]
pub struct Pool {
    pub config: PoolConfig,
    backend: Backend,
    status: Mutex<PoolStatus>,
}

impl Pool {
    pub fn new(config: PoolConfig, backend: Backend) -> Pool {
        let policy = config.policy();
        let status = PoolStatus {
            name: config.name.clone(),
            backend: match backend {
                Backend::Local(_) => "local",
                Backend::Kubernetes(_) => "kubernetes",
                Backend::Static => "static",
            },
            min: policy.min,
            max: policy.max,
            ..PoolStatus::default()
        };
        Pool { config, backend, status: Mutex::new(status) }
    }

    pub fn status(&self) -> PoolStatus {
        self.status.lock().expect("pool status poisoned").clone()
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Runs the pool until `shutdown`: the scaler (when this master leads the pool) and, for
    /// Kubernetes, the pod watch; then stops local workers within `grace`.
    pub async fn run(self: Arc<Self>, master: MasterPort, shutdown: watch::Receiver<bool>, grace: Duration) {
        crate::telemetry::pool_started(&self.config.name);
        let watch = match &self.backend {
            Backend::Kubernetes(k8s) => {
                let (k8s, master, shutdown) = (Arc::clone(k8s), master.clone(), shutdown.clone());
                Some(tokio::spawn(async move { k8s.watch(&master, shutdown).await }))
            }
            _ => None,
        };
        self.scale(&master, shutdown).await;
        if let Some(watch) = watch {
            let _ = watch.await;
        }
        if let Backend::Local(local) = &self.backend {
            local.stop_all(grace).await;
        }
    }

    async fn scale(&self, master: &MasterPort, mut shutdown: watch::Receiver<bool>) {
        let policy = self.config.policy();
        let mut hysteresis = Hysteresis::default();
        // Local processes belong to this machine; other backends have one scaler per database.
        let mut leadership = match self.backend {
            Backend::Local(_) => None,
            _ => Some(Leadership::new(&master.store, &self.config.name)),
        };
        let sweep = Duration::from_secs(30);
        let mut wanted = master.signals.scale_events();
        let mut failures = 0u32;
        let mut pace = Pace::new(STEP_SPACING, STEP_BURST, tokio::time::Instant::now());
        while !*shutdown.borrow() {
            // Every submission and build start wakes the scalers: in a burst, one look per
            // STEP_SPACING sees all of them, while a wake after a quiet spell is taken at once.
            let wait = pace.take(tokio::time::Instant::now());
            if !wait.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => break,
                }
            }
            let leading = match &mut leadership {
                Some(l) => l.hold().await,
                None => true,
            };
            self.status.lock().expect("pool status poisoned").leader = leading;
            let wait = if !leading {
                hysteresis = Hysteresis::default();
                leader::RETRY
            } else {
                let woken = master.signals.take_scale_wake();
                match self.step(master, &policy, &mut hysteresis, woken).await {
                    Ok(recheck) => {
                        failures = 0;
                        self.status.lock().expect("pool status poisoned").last_error = None;
                        recheck.unwrap_or(sweep).min(sweep)
                    }
                    Err(error) => {
                        failures += 1;
                        crate::telemetry::pool_api_error(&self.config.name);
                        let backoff =
                            Duration::from_millis(500 * 2u64.pow(failures.min(7))).min(Duration::from_secs(60));
                        warn!(pool = %self.config.name, %error, retry_in = ?backoff, "scaling failed; keeping the workers there are");
                        self.status.lock().expect("pool status poisoned").last_error = Some(error.to_string());
                        backoff
                    }
                }
            };
            let backend_changed = async {
                match &self.backend {
                    Backend::Local(local) => local.changed().await,
                    Backend::Kubernetes(k8s) => k8s.changed().await,
                    Backend::Static => std::future::pending().await,
                }
            };
            tokio::select! {
                Ok(()) = wanted.changed(), if leading && failures == 0 => {}
                _ = backend_changed, if leading && failures == 0 => {}
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => break,
            }
        }
        if let Some(leadership) = &mut leadership {
            leadership.release().await;
        }
    }

    /// One decision: read the load, decide, act. Returns when to look again if nothing happens.
    async fn step(
        &self,
        master: &MasterPort,
        policy: &Policy,
        hysteresis: &mut Hysteresis,
        woken: Option<Instant>,
    ) -> Result<Option<Duration>, PoolError> {
        let name = &self.config.name;
        // Claimed requests are the builds running (or about to) on the pool's workers, on any
        // master; counting slots reserved in sessions instead would count a request twice while
        // a worker claims it.
        let (pending, claimed) = master.store.queue_counts(Some(&master.builderids)).await?;
        let claimable = u32::try_from(pending).unwrap_or(u32::MAX);
        let running = master.store.running_by_worker().await?;
        let (members, workers) = match &self.backend {
            Backend::Local(local) => (local.members(master, &running), local.capacity()),
            Backend::Kubernetes(k8s) => {
                for kept in k8s.kept_victims() {
                    warn!(pool = %name, worker = %kept, "the ReplicaSet kept a drained worker; returning it to service");
                    master.workers.undrain(&kept).await?;
                }
                (k8s.members(master, &running), k8s.replicas().await?)
            }
            Backend::Static => {
                let members = static_members(master, name, &running);
                let count = members.len() as u32;
                (members, count)
            }
        };
        let load = Load {
            claimable,
            running: u32::try_from(claimed).unwrap_or(u32::MAX),
            busy_workers: members.iter().filter(|m| m.running > 0).count() as u32,
            workers,
        };
        let decision = scaling::decide(policy, &load, hysteresis, Instant::now());
        {
            let mut status = self.status.lock().expect("pool status poisoned");
            status.desired = decision.desired;
            status.workers = workers;
            status.busy = load.busy_workers;
            status.pending = claimable;
        }
        crate::telemetry::pool_sizes(name, decision.desired, workers, claimable, load.running);
        if decision.desired > workers {
            info!(pool = %name, from = workers, to = decision.desired, claimable, running = load.running, "scaling up");
            let grown = match &self.backend {
                Backend::Local(local) => local.grow(decision.desired - workers)? > 0,
                Backend::Kubernetes(k8s) => {
                    k8s.set_replicas(decision.desired).await?;
                    true
                }
                Backend::Static => false,
            };
            if grown {
                crate::telemetry::pool_scaled(name, "up", woken.map(|at| at.elapsed()));
            }
        } else if decision.desired < workers {
            let victims = scaling::victims(&members, workers - decision.desired);
            let removed = match &self.backend {
                Backend::Local(local) => local.retire(master, &victims).await,
                Backend::Kubernetes(k8s) => self.shrink_deployment(master, k8s, &members, victims, workers).await?,
                Backend::Static => 0,
            };
            if removed > 0 {
                info!(pool = %name, from = workers, to = workers - removed, "scaling down");
                crate::telemetry::pool_scaled(name, "down", None);
            }
        }
        Ok(decision.recheck_after)
    }

    /// Scales a Deployment down by the victims only: drain them in the master, look again (a
    /// build that landed in between keeps its worker), give them the lowest deletion cost, then
    /// lower `replicas` by their number. A failure returns the victims to service.
    async fn shrink_deployment(
        &self,
        master: &MasterPort,
        k8s: &KubernetesPool,
        members: &[Member],
        victims: Vec<String>,
        replicas: u32,
    ) -> Result<u32, PoolError> {
        for victim in &victims {
            master.workers.drain(victim).await?;
        }
        let (victims, busy) = still_idle(master, victims).await?;
        for worker in &busy {
            master.workers.undrain(worker).await?;
        }
        if victims.is_empty() {
            return Ok(0);
        }
        k8s.note_drained(&victims);
        let costs = scaling::deletion_costs(members, &victims);
        let target = replicas - victims.len() as u32;
        if let Err(error) = k8s.apply_deletion_costs(&costs).await {
            self.call_off(master, k8s, &victims).await?;
            return Err(error.into());
        }
        // Look once more just before the call: should any victim hold a build after all, the
        // ReplicaSet must not be asked to remove a pod; the next decision starts afresh.
        if !still_idle(master, victims.clone()).await?.1.is_empty() {
            warn!(pool = %self.config.name, "a worker chosen for removal got a build; calling the scale-down off");
            self.call_off(master, k8s, &victims).await?;
            return Ok(0);
        }
        if let Err(error) = k8s.set_replicas(target).await {
            self.call_off(master, k8s, &victims).await?;
            return Err(error.into());
        }
        Ok(victims.len() as u32)
    }

    /// Returns the victims of a scale-down that did not happen to service.
    async fn call_off(&self, master: &MasterPort, k8s: &KubernetesPool, victims: &[String]) -> Result<(), PoolError> {
        k8s.forget_drained(victims);
        for victim in victims {
            master.workers.undrain(victim).await?;
        }
        Ok(())
    }
}

/// Splits workers into those still idle and those holding a build, here (including a slot
/// reserved for a claim) or on any master.
async fn still_idle(master: &MasterPort, workers: Vec<String>) -> Result<(Vec<String>, Vec<String>), PoolError> {
    let running = master.store.running_by_worker().await?;
    Ok(workers.into_iter().partition(|w| master.workers.builds_on(w) == 0 && running.get(w).is_none_or(|r| r.0 == 0)))
}

/// Workers of a static pool connected to this master.
fn static_members(master: &MasterPort, pool: &str, running: &HashMap<String, (u32, i64)>) -> Vec<Member> {
    master
        .workers
        .list()
        .iter()
        .filter(|s| s.info.pool.as_deref() == Some(pool))
        .map(|s| Member {
            name: s.name().to_owned(),
            starting: false,
            running: s.running_builds().max(running.get(s.name()).map_or(0, |r| r.0)),
            busy_for_secs: 0,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scaler_steps_at_once_after_a_quiet_spell_and_once_per_spacing_in_a_burst() {
        let spacing = Duration::from_millis(25);
        let start = tokio::time::Instant::now();
        let mut pace = Pace::new(spacing, 2, start);
        assert_eq!(pace.take(start), Duration::ZERO);
        assert_eq!(pace.take(start), Duration::ZERO, "two at once");
        assert_eq!(pace.take(start), spacing, "then one per spacing");
        assert_eq!(pace.take(start + spacing), spacing);
        let later = start + Duration::from_secs(10);
        assert_eq!(pace.take(later), Duration::ZERO, "a quiet spell fills the bucket");
        assert_eq!(pace.take(later), Duration::ZERO);
        assert_eq!(pace.take(later + Duration::from_millis(5)), Duration::from_millis(20));
    }
}
