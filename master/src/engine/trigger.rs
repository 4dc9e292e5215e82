//! `trigger` steps: the port to the master's Triggerable schedulers and the step that submits to
//! them and waits for their builds.

use futures::future::BoxFuture;
use serde_json::Value;
use tokio::sync::watch;

use super::{LogWriter, StepOutcome, StepRunner, StopReason};
use crate::config::TriggerStepConfig;
use crate::domain::{SourceStamp, Submitted};
use crate::properties::Properties;
use crate::results::Results;
use crate::store::StoreError;

/// What a `trigger` step asks of the master.
#[derive(Debug, Clone)]
pub struct TriggerRequest {
    pub scheduler_names: Vec<String>,
    pub sourcestamps: Vec<SourceStamp>,
    pub properties: Properties,
    pub parent_buildid: i64,
    pub waited_for: bool,
}

/// A buildset a `trigger` step submitted, and the scheduler it went to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Triggered {
    pub scheduler: String,
    pub buildset: Submitted,
}

/// Why a `trigger` step could not submit or wait.
#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    /// The step names a scheduler that is not a Triggerable one.
    #[error("{0:?} is not a triggerable scheduler")]
    NotTriggerable(String),
    /// The database failed.
    #[error("the database failed: {0}")]
    Store(#[from] StoreError),
}

/// The master's side of `trigger` steps.
pub trait Triggers: Send + Sync {
    /// Submits a buildset to each named triggerable scheduler.
    fn trigger(&self, request: TriggerRequest) -> BoxFuture<'_, Result<Vec<Triggered>, TriggerError>>;
    /// Waits until every buildset is complete and returns their results. A database outage is
    /// waited out, not returned.
    fn wait(&self, bsids: Vec<i64>) -> BoxFuture<'_, Result<Vec<Results>, TriggerError>>;
}

impl std::fmt::Debug for dyn Triggers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Triggers")
    }
}

impl StepRunner<'_> {
    /// Runs a `trigger` step: submits to the triggerable schedulers and, if asked, waits for
    /// their builds, taking their worst result.
    pub(super) async fn run_trigger(
        &self,
        trigger: &TriggerStepConfig,
        props: &Properties,
        stop: &mut watch::Receiver<Option<StopReason>>,
    ) -> Result<StepOutcome, StoreError> {
        let names = trigger.scheduler_names.join(", ");
        let running_state = format!("triggering {names}");
        let (stepid, mut log) = self.begin(&running_state).await?;
        let finish = |log: LogWriter, results: Results, state: String| self.finish(stepid, log, results, state);
        let request = match self.trigger_request(trigger, props) {
            Ok(request) => request,
            Err(reason) => {
                log.header(&format!("{reason}\n"));
                return finish(log, Results::Exception, format!("exception: {reason}")).await;
            }
        };
        let submitted = match self.ctx.triggers.trigger(request).await {
            Ok(submitted) => submitted,
            Err(reason) => {
                log.header(&format!("{reason}\n"));
                return finish(log, Results::Exception, format!("trigger failed: {reason}")).await;
            }
        };
        for Triggered { scheduler, buildset } in &submitted {
            let brids: Vec<String> = buildset.requests.iter().map(|r| r.brid.to_string()).collect();
            log.header(&format!(
                "triggered {scheduler}: buildset {}, build requests {}\n",
                buildset.bsid,
                brids.join(", ")
            ));
        }
        if !trigger.wait_for_finish {
            return finish(log, Results::Success, format!("triggered {names}")).await;
        }
        let bsids = submitted.iter().map(|t| t.buildset.bsid).collect();
        let results = tokio::select! {
            results = self.ctx.triggers.wait(bsids) => results,
            reason = async { stop.wait_for(Option::is_some).await.ok().and_then(|r| *r) } => {
                log.header("stopped while waiting\n");
                let results = if reason == Some(StopReason::Cancelled) { Results::Cancelled } else { Results::Retry };
                return finish(log, results, format!("triggered {names} (interrupted)")).await;
            }
        };
        match results {
            Ok(results) => {
                let worst = results.iter().fold(Results::Success, |worst, r| worst.worst(*r));
                finish(log, worst, format!("triggered {names}: {worst}")).await
            }
            Err(reason) => {
                log.header(&format!("{reason}\n"));
                finish(log, Results::Exception, format!("triggered {names}: {reason}")).await
            }
        }
    }

    /// What the step asks the master for: its source stamps (the build's, at the revision the
    /// step's options say), and the properties it copies and sets.
    fn trigger_request(&self, trigger: &TriggerStepConfig, props: &Properties) -> Result<TriggerRequest, String> {
        let got_revision = props.get("got_revision").and_then(Value::as_str).map(str::to_owned);
        let sourcestamps = self
            .sources
            .iter()
            .map(|s| SourceStamp {
                branch: s.branch.clone(),
                revision: if trigger.always_use_latest {
                    None
                } else if trigger.update_source_stamp && self.sources.len() == 1 && got_revision.is_some() {
                    got_revision.clone()
                } else {
                    s.revision.clone()
                },
                repository: s.repository.clone(),
                project: s.project.clone(),
                codebase: s.codebase.clone(),
            })
            .collect();
        let mut properties = Properties::new();
        for name in &trigger.copy_properties {
            if let Some(value) = props.get(name) {
                properties.set(name.clone(), value.clone(), "Trigger");
            }
        }
        for (name, value) in &trigger.set_properties {
            let value = match value {
                Value::String(template) => match self.render(template, props) {
                    Ok(text) => Value::String(text),
                    Err(reason) => return Err(format!("{name}: {reason}")),
                },
                other => other.clone(),
            };
            properties.set(name.clone(), value, "Trigger");
        }
        Ok(TriggerRequest {
            scheduler_names: trigger.scheduler_names.clone(),
            sourcestamps,
            properties,
            parent_buildid: self.buildid,
            waited_for: trigger.wait_for_finish,
        })
    }
}
