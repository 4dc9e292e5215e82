//! The local worker pool: `kiln-worker` processes that the master starts, supervises and stops on
//! its own machine — the embedded default, so one machine needs no cluster.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::LocalPoolConfig;

/// Why the pool could not start.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("workers.local.binary: {0} does not exist; build it with `cargo build --bins` or set the key")]
    MissingBinary(PathBuf),
    #[error("cannot prepare {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// What each local worker is started with.
#[derive(Debug, Clone)]
pub struct LocalPool {
    pub config: LocalPoolConfig,
    pub binary: PathBuf,
    pub master_url: String,
    pub token: String,
    pub data_dir: PathBuf,
}

impl LocalPool {
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

    fn worker_names(&self) -> Vec<String> {
        (1..=self.config.count).map(|i| format!("{}-{i}", self.config.name_prefix)).collect()
    }

    fn spawn(&self, name: &str) -> Result<Child, PoolError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| PoolError::Io { path, source }
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
        Command::new(&self.binary)
            .arg("--master")
            .arg(&self.master_url)
            .arg("--name")
            .arg(name)
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
            .map_err(io(&self.binary))
    }

    /// Runs the pool until `shutdown` turns true, restarting workers that exit. On shutdown each
    /// worker gets SIGTERM (it finishes its build first) and is killed if it outlives `grace`.
    pub async fn run(self, shutdown: watch::Receiver<bool>, grace: Duration) {
        let mut tasks = tokio::task::JoinSet::new();
        for name in self.worker_names() {
            let pool = self.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move { pool.supervise(name, shutdown, grace).await });
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn supervise(&self, name: String, mut shutdown: watch::Receiver<bool>, grace: Duration) {
        let mut backoff = Duration::from_millis(250);
        while !*shutdown.borrow() {
            let mut child = match self.spawn(&name) {
                Ok(child) => {
                    info!(worker = %name, pid = child.id(), "started local worker");
                    child
                }
                Err(error) => {
                    warn!(worker = %name, %error, "cannot start local worker");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            };
            tokio::select! {
                status = child.wait() => {
                    warn!(worker = %name, status = ?status, "local worker exited; restarting");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
                _ = shutdown.changed() => {
                    if let Some(pid) = child.id() {
                        // SAFETY: kill(2) on a child we started and have not yet reaped.
                        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                    }
                    if tokio::time::timeout(grace, child.wait()).await.is_err() {
                        warn!(worker = %name, "local worker did not stop in time; killing it");
                        let _ = child.kill().await;
                    }
                    return;
                }
            }
        }
    }
}
