//! Git pollers: one poll at a time per repository, on the master that holds its lease.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::poller::GitPoller;
use crate::store::StoreError;

use super::Master;
use super::SubmitError;

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

/// A git poller and what wakes it for a forced poll.
pub(super) struct PollerEntry {
    pub(super) poller: GitPoller,
    pub(super) force: Notify,
    /// One poll at a time per poller on this master: two fetches into one bare repository
    /// collide on its lock files.
    pub(super) busy: tokio::sync::Mutex<()>,
}

impl Master {
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
        let mut shutdown = self.signals.shutdown();
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
}
