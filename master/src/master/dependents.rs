//! Dependent schedulers: completed buildsets, taken from the outbox once, start their dependents.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tracing::{info, warn};

use crate::config::SchedulerConfig;
use crate::results::Results;

use super::Master;
use super::submit::Origin;

impl Master {
    /// Acts on completed buildsets: each one whose scheduler has Dependent schedulers and whose
    /// result is SUCCESS or WARNINGS makes them submit a buildset of the same sources. The
    /// completions come from an outbox written with the completion, so each is acted on once.
    pub async fn run_completions(self: Arc<Self>) {
        let mut shutdown = self.signals.shutdown();
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
                        self.signals.wake();
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
}
