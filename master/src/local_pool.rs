//! The local worker pool: `kiln-worker` processes the master starts and stops on its own machine,
//! as many as the queue needs — the embedded default, so one machine needs no cluster. The
//! scaler is also the supervisor: a worker that dies is replaced because the pool then has fewer
//! workers than it needs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::process::Command;
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use crate::config::LocalPoolConfig;
use crate::master::Master;
use crate::scaling::{self, Hysteresis, Load};

/// Why the pool could not start.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("workers.local.binary: {0} does not exist; build it with `cargo build --bins` or set the key")]
    MissingBinary(PathBuf),
    #[error("cannot prepare {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// A worker process of the pool.
#[derive(Debug, Clone, Copy)]
struct Process {
    pid: u32,
    /// Asked to leave: no longer counted as capacity.
    leaving: bool,
}

/// The pool and its processes.
#[derive(Debug)]
pub struct LocalPool {
    pub config: LocalPoolConfig,
    pub binary: PathBuf,
    pub master_url: String,
    pub token: String,
    pub data_dir: PathBuf,
    next_index: AtomicU32,
    processes: Mutex<HashMap<String, Process>>,
    /// Wakes the scaler when a process exits.
    exited: Notify,
}

impl LocalPool {
    pub fn new(
        config: LocalPoolConfig,
        binary: PathBuf,
        master_url: String,
        token: String,
        data_dir: PathBuf,
    ) -> LocalPool {
        LocalPool {
            config,
            binary,
            master_url,
            token,
            data_dir,
            next_index: AtomicU32::new(1),
            processes: Mutex::new(HashMap::new()),
            exited: Notify::new(),
        }
    }

    /// Finds the worker binary: the configured one, or `kiln-worker` beside this executable.
    pub fn locate_binary(config: &LocalPoolConfig) -> Result<PathBuf, PoolError> {
        let binary = match &config.binary {
            Some(path) => path.clone(),
            None => std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|dir| dir.join("kiln-worker")))
                .unwrap_or_else(|| PathBuf::from("kiln-worker")),
        };
        if binary.is_file() { Ok(binary) } else { Err(PoolError::MissingBinary(binary)) }
    }

    /// Whether a worker of that name belongs to this pool.
    pub fn owns(&self, name: &str) -> bool {
        self.processes.lock().expect("processes poisoned").contains_key(name)
    }

    /// Processes counted as capacity: running or starting, not leaving.
    pub fn capacity(&self) -> u32 {
        self.processes.lock().expect("processes poisoned").values().filter(|p| !p.leaving).count() as u32
    }

    /// Names of the processes counted as capacity.
    fn staying(&self) -> Vec<String> {
        let processes = self.processes.lock().expect("processes poisoned");
        let mut names: Vec<String> = processes.iter().filter(|(_, p)| !p.leaving).map(|(n, _)| n.clone()).collect();
        names.sort();
        names
    }

    /// Starts one more worker.
    fn spawn(self: &Arc<Self>) -> Result<String, PoolError> {
        let name = format!("{}-{}", self.config.name_prefix, self.next_index.fetch_add(1, Ordering::SeqCst));
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| PoolError::Io { path, source }
        };
        let basedir = self.data_dir.join("workers").join(&name);
        let cache = self.data_dir.join("cache");
        let logs = self.data_dir.join("logs");
        for dir in [&basedir, &cache, &logs] {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        let log_path = logs.join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(io(&log_path))?;
        let log_err = log.try_clone().map_err(io(&log_path))?;
        let mut child = Command::new(&self.binary)
            .arg("--master")
            .arg(&self.master_url)
            .arg("--name")
            .arg(&name)
            .arg("--basedir")
            .arg(&basedir)
            .arg("--cache-dir")
            .arg(&cache)
            .arg("--max-builds")
            .arg(self.config.max_builds.to_string())
            .env("KILN_WORKER_TOKEN", &self.token)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .map_err(io(&self.binary))?;
        let pid = child.id().unwrap_or_default();
        self.processes.lock().expect("processes poisoned").insert(name.clone(), Process { pid, leaving: false });
        let pool = Arc::clone(self);
        let watched = name.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let leaving =
                pool.processes.lock().expect("processes poisoned").remove(&watched).is_some_and(|p| p.leaving);
            if leaving {
                info!(worker = %watched, "local worker left the pool");
            } else {
                warn!(worker = %watched, ?status, "local worker exited unexpectedly");
            }
            pool.exited.notify_one();
        });
        info!(worker = %name, pid, "started local worker");
        Ok(name)
    }

    /// Marks a worker as leaving: it no longer counts as capacity.
    fn mark_leaving(&self, name: &str) {
        if let Some(process) = self.processes.lock().expect("processes poisoned").get_mut(name) {
            process.leaving = true;
        }
    }

    fn signal(&self, name: &str, signal: i32) {
        if let Some(process) = self.processes.lock().expect("processes poisoned").get(name) {
            // SAFETY: kill(2) on a child of ours that has not been reaped (it is still in the map).
            unsafe { libc::kill(process.pid as i32, signal) };
        }
    }

    /// The pool's load as the scaler sees it.
    fn load(&self, master: &Master, claimable: u32) -> Load {
        let sessions: Vec<_> = master.workers().into_iter().filter(|s| self.owns(s.name())).collect();
        Load {
            claimable,
            running: sessions.iter().map(|s| s.running_builds()).sum(),
            busy_workers: sessions.iter().filter(|s| s.running_builds() > 0).count() as u32,
            workers: self.capacity(),
        }
    }

    /// Keeps the pool at the size the queue needs until `shutdown`, then stops every worker:
    /// SIGTERM (a worker finishes its build first), then SIGKILL after `grace`.
    pub async fn run(self: Arc<Self>, master: Arc<Master>, mut shutdown: watch::Receiver<bool>, grace: Duration) {
        let policy = self.config.policy();
        let mut hysteresis = Hysteresis::default();
        let sweep = Duration::from_secs(30);
        while !*shutdown.borrow() {
            let claimable = match master.store.pending_count().await {
                Ok(n) => u32::try_from(n).unwrap_or(u32::MAX),
                Err(error) => {
                    warn!(%error, "cannot read the queue; keeping the pool as it is");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = shutdown.changed() => break,
                    }
                }
            };
            let load = self.load(&master, claimable);
            let decision = scaling::decide(&policy, &load, &mut hysteresis, Instant::now());
            if decision.desired > load.workers {
                info!(
                    from = load.workers,
                    to = decision.desired,
                    claimable,
                    running = load.running,
                    "scaling the local pool up"
                );
                for _ in load.workers..decision.desired {
                    if let Err(error) = self.spawn() {
                        warn!(%error, "cannot start a local worker");
                        break;
                    }
                }
            } else if decision.desired < load.workers {
                let retired = self.retire(&master, load.workers - decision.desired).await;
                info!(from = load.workers, to = load.workers - retired, "scaling the local pool down");
            }
            let recheck = decision.recheck_after.unwrap_or(sweep).min(sweep);
            tokio::select! {
                _ = master.scaling_wanted() => {}
                _ = self.exited.notified() => {}
                _ = tokio::time::sleep(recheck) => {}
                _ = shutdown.changed() => break,
            }
        }
        self.stop_all(grace).await;
    }

    /// Retires up to `count` idle workers: each is drained in the master first, so no build lands
    /// on it, and told to exit. Workers still starting go first, then idle connected ones; a
    /// busy worker is never chosen.
    async fn retire(&self, master: &Master, count: u32) -> u32 {
        let sessions: HashMap<String, _> = master.workers().into_iter().map(|s| (s.name().to_owned(), s)).collect();
        let members: Vec<scaling::Member> = self
            .staying()
            .into_iter()
            .map(|name| {
                let running = sessions.get(&name).map_or(0, |s| s.running_builds());
                scaling::Member { starting: !sessions.contains_key(&name), running, busy_for_secs: 0, name }
            })
            .collect();
        let mut retired = 0;
        for name in scaling::victims(&members, count) {
            match sessions.get(&name) {
                // Still starting: it holds nothing; stop the process.
                None => {
                    self.mark_leaving(&name);
                    self.signal(&name, libc::SIGTERM);
                    retired += 1;
                }
                // Drain first, then look again: a build assigned in between keeps the worker
                // until it is done, and the master sends Shutdown afterwards.
                Some(session) => {
                    if master.retire_worker(session).await {
                        self.mark_leaving(&name);
                        retired += 1;
                    }
                }
            }
        }
        retired
    }

    async fn stop_all(&self, grace: Duration) {
        let names: Vec<String> = self.processes.lock().expect("processes poisoned").keys().cloned().collect();
        for name in &names {
            self.mark_leaving(name);
            self.signal(name, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while !self.processes.lock().expect("processes poisoned").is_empty() && Instant::now() < deadline {
            tokio::select! {
                _ = self.exited.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        for name in self.processes.lock().expect("processes poisoned").keys() {
            warn!(worker = %name, "local worker did not stop in time; killing it");
        }
        let names: Vec<String> = self.processes.lock().expect("processes poisoned").keys().cloned().collect();
        for name in names {
            self.signal(&name, libc::SIGKILL);
        }
    }
}
