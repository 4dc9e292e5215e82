//! Time-driven schedulers: Periodic and Nightly, and the tree-stable timers of change
//! schedulers, each firing once across masters.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::domain::{Change, Firing, SourceStamp};
use crate::plan::When;

use super::Master;
use super::submit::Origin;

impl Master {
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
        let mut shutdown = self.signals.shutdown();
        let sweep = Duration::from_secs(30);
        if let When::Cron(cron) = &entry.when {
            info!(scheduler = %name, zone = cron.zone_name(), "nightly schedule follows the wall clock of its zone");
        }
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
                Ok(Firing::Fired(Some(submitted))) => {
                    info!(scheduler = %name, bsid = submitted.bsid, "timed scheduler fired");
                    self.store.notify_queue().await;
                    self.signals.wake();
                }
                Ok(Firing::Fired(None)) => info!(scheduler = %name, "nothing changed; no build"),
                Ok(Firing::TakenElsewhere) => debug!(scheduler = %name, "another master fired this time"),
                Err(error) => warn!(scheduler = %name, %error, "could not fire the scheduler"),
            }
        }
    }

    /// Fires tree-stable timers when they are due. Timers live in the database, so a restarted
    /// master — or any other master sharing the database — picks them up; each fires once.
    pub async fn run_timers(self: Arc<Self>) {
        let mut shutdown = self.signals.shutdown();
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
                    self.signals.wake();
                }
                Ok(_) => {}
                Err(error) => warn!(%error, "could not fire scheduler timers"),
            }
        }
    }
}
