//! The local backend: `kiln-worker` processes the master starts and stops on its own machine —
//! the embedded default, so one machine needs no cluster. The scaler is also the supervisor: a
//! worker that dies is replaced because the pool then has fewer workers than it needs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::process::Command;
use tokio::sync::Notify;
use tracing::{info, warn};

use super::MasterPort;
use crate::config::PoolConfig;
use crate::scaling::Member;

/// Why a local worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("pool {pool}: local.binary: {binary} does not exist; build it with `cargo build --bins` or set the key")]
    MissingBinary { pool: String, binary: PathBuf },
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

/// The pool's processes.
#[derive(Debug)]
pub struct LocalPool {
    pub config: PoolConfig,
    pub binary: PathBuf,
    pub master_url: String,
    pub token: String,
    pub data_dir: PathBuf,
    processes: Mutex<HashMap<String, Process>>,
    /// Wakes the scaler when a process exits.
    exited: Notify,
}

impl LocalPool {
    pub fn new(config: PoolConfig, binary: PathBuf, master_url: String, token: String, data_dir: PathBuf) -> LocalPool {
        LocalPool {
            config,
            binary,
            master_url,
            token,
            data_dir,
            processes: Mutex::new(HashMap::new()),
            exited: Notify::new(),
        }
    }

    /// Finds the worker binary: the configured one, or `kiln-worker` beside this executable.
    pub fn locate_binary(config: &PoolConfig) -> Result<PathBuf, LocalError> {
        let binary = match &config.local.binary {
            Some(path) => path.clone(),
            None => std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|dir| dir.join("kiln-worker")))
                .unwrap_or_else(|| PathBuf::from("kiln-worker")),
        };
        if binary.is_file() { Ok(binary) } else { Err(LocalError::MissingBinary { pool: config.name.clone(), binary }) }
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

    /// Wakes the scaler: a process exited.
    pub async fn changed(&self) {
        self.exited.notified().await;
    }

    /// The pool's processes as a scale-down sees them.
    pub fn members(&self, master: &MasterPort, running: &HashMap<String, (u32, i64)>) -> Vec<Member> {
        let connected: HashMap<String, u32> =
            master.workers.list().iter().map(|s| (s.name().to_owned(), s.running_builds())).collect();
        self.staying()
            .into_iter()
            .map(|name| {
                let db = running.get(&name).map_or(0, |r| r.0);
                let here = connected.get(&name).copied();
                Member { starting: here.is_none(), running: db.max(here.unwrap_or(0)), busy_for_secs: 0, name }
            })
            .collect()
    }

    /// Starts `count` more workers; returns how many started.
    pub fn grow(self: &Arc<Self>, count: u32) -> Result<u32, LocalError> {
        for started in 0..count {
            if let Err(error) = self.spawn() {
                return if started == 0 { Err(error) } else { Ok(started) };
            }
        }
        Ok(count)
    }

    /// Takes the first free name of the pool, `<prefix>-1` … : a name is free once its process has
    /// exited, so a pool that shrinks and grows reuses its names (and their build directories)
    /// instead of adding new workers to the list for ever.
    fn reserve_name(&self) -> String {
        let mut processes = self.processes.lock().expect("processes poisoned");
        let prefix = self.config.name_prefix();
        let name = (1..)
            .map(|index| format!("{prefix}-{index}"))
            .find(|name| !processes.contains_key(name))
            .expect("fewer processes than names");
        // No pid yet: nothing is signalled until the process exists.
        processes.insert(name.clone(), Process { pid: 0, leaving: false });
        name
    }

    /// Starts one more worker.
    fn spawn(self: &Arc<Self>) -> Result<String, LocalError> {
        let name = self.reserve_name();
        let started = self.start(&name);
        if started.is_err() {
            self.processes.lock().expect("processes poisoned").remove(&name);
        }
        started.map(|()| name)
    }

    /// Starts the process of the worker `name`, reserved by [`Self::reserve_name`].
    fn start(self: &Arc<Self>, name: &str) -> Result<(), LocalError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| LocalError::Io { path, source }
        };
        let basedir = self.data_dir.join("workers").join(name);
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
            .arg(name)
            .arg("--basedir")
            .arg(&basedir)
            .arg("--cache-dir")
            .arg(&cache)
            .arg("--max-builds")
            .arg(self.config.builds_per_worker.to_string())
            .arg("--pool")
            .arg(&self.config.name)
            .env("KILN_WORKER_TOKEN", &self.token)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .map_err(io(&self.binary))?;
        let pid = child.id().unwrap_or_default();
        if let Some(process) = self.processes.lock().expect("processes poisoned").get_mut(name) {
            process.pid = pid;
        }
        let pool = Arc::clone(self);
        let watched = name.to_owned();
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
        Ok(())
    }

    /// Marks a worker as leaving: it no longer counts as capacity.
    fn mark_leaving(&self, name: &str) {
        if let Some(process) = self.processes.lock().expect("processes poisoned").get_mut(name) {
            process.leaving = true;
        }
    }

    fn signal(&self, name: &str, signal: i32) {
        if let Some(process) = self.processes.lock().expect("processes poisoned").get(name)
            && process.pid > 0
        {
            // SAFETY: kill(2) on a child of ours that has not been reaped (it is still in the map);
            // a pid of 0 (not started yet) would signal our own process group, and is skipped.
            unsafe { libc::kill(process.pid as i32, signal) };
        }
    }

    /// Retires the chosen victims: each is drained in the master first, so no build lands on
    /// it, and told to exit. Returns how many leave.
    pub async fn retire(&self, master: &MasterPort, victims: &[String]) -> u32 {
        let sessions: HashMap<String, _> =
            master.workers.list().into_iter().map(|s| (s.name().to_owned(), s)).collect();
        let mut retired = 0;
        for name in victims {
            match sessions.get(name) {
                // Still starting: it holds nothing; stop the process.
                None => {
                    self.mark_leaving(name);
                    self.signal(name, libc::SIGTERM);
                    retired += 1;
                }
                // Drain first, then look again: a build assigned in between keeps the worker
                // until it is done, and the master sends Shutdown afterwards.
                Some(session) => {
                    if master.workers.retire(session).await {
                        self.mark_leaving(name);
                        retired += 1;
                    }
                }
            }
        }
        retired
    }

    /// Stops every worker: SIGTERM (a worker finishes its build first), then SIGKILL after
    /// `grace`.
    pub async fn stop_all(&self, grace: Duration) {
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
