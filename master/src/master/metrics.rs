//! The gauges a Prometheus scrape reads: the queue per builder, builds running here, workers by
//! state.

use std::time::Duration;

use crate::store::StoreError;

use super::Master;

impl Master {
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
        for worker in self.workers.list() {
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
}
