//! `trigger` steps: the engine's port to submit to Triggerable schedulers and wait for the result.

use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;
use tracing::warn;

use crate::config::SchedulerConfig;
use crate::domain::NewBuildset;
use crate::engine::{TriggerError, TriggerRequest, Triggered, Triggers};
use crate::properties::Properties;
use crate::results::Results;

use super::Master;

impl Triggers for Master {
    fn trigger(&self, request: TriggerRequest) -> BoxFuture<'_, Result<Vec<Triggered>, TriggerError>> {
        Box::pin(async move {
            let mut submitted = Vec::new();
            for name in &request.scheduler_names {
                let Some(SchedulerConfig::Triggerable(scheduler)) =
                    self.config.schedulers.iter().find(|s| s.name() == name)
                else {
                    return Err(TriggerError::NotTriggerable(name.clone()));
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
                let buildset = self.submit(&buildset).await?;
                submitted.push(Triggered { scheduler: name.clone(), buildset });
            }
            Ok(submitted)
        })
    }

    fn wait(&self, bsids: Vec<i64>) -> BoxFuture<'_, Result<Vec<Results>, TriggerError>> {
        Box::pin(async move {
            // Completion is read from the database, again whenever the queue moves here or on
            // another master (its notification wakes this one); the sweep is a safety net.
            let mut events = self.signals.queue_events();
            loop {
                match self.store.buildset_results(&bsids).await {
                    Ok(results) if results.iter().all(Option::is_some) => {
                        return Ok(results.into_iter().flatten().collect());
                    }
                    Ok(_) => {}
                    Err(error) if error.is_unavailable() => {
                        warn!(%error, "cannot read the triggered buildsets' results; waiting for the database");
                    }
                    Err(error) => return Err(error.into()),
                }
                tokio::select! {
                    _ = events.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        })
    }
}
