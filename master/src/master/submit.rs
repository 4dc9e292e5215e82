//! Submission: changes stored and handed to the change schedulers, forced builds, and the
//! buildsets every scheduler submits.

use serde_json::Value;
use tracing::{debug, info, warn};

use crate::config::SchedulerConfig;
use crate::domain::{Change, Delivery, NewBuildset, NewChange, SourceStamp, Submitted};
use crate::plan::ChangeSchedulerPlan;
use crate::properties::Properties;
use crate::schedulers::{self, Classification};
use crate::store::StoreError;

use super::Master;

/// How old a change still unscheduled must be before housekeeping schedules it: its own master
/// schedules it within milliseconds of storing it, unless it died.
const LEFT_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// Why a build could not be submitted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("no scheduler named {0:?}")]
    UnknownScheduler(String),
    #[error("no builder named {0:?}")]
    UnknownBuilder(String),
    #[error("builder {builder:?} is not served by scheduler {scheduler:?}")]
    BuilderNotInScheduler { builder: String, scheduler: String },
    #[error("scheduler {0:?} is not a force scheduler")]
    NotForceable(String),
    #[error("scheduler {0:?} is disabled")]
    Disabled(String),
    #[error("invalid parameter {field}: {reason}")]
    InvalidParameter { field: String, reason: String },
    #[error("invalid parameters: {0:?}")]
    InvalidParameters(std::collections::BTreeMap<String, String>),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a force asks for, already decoded from the API.
#[derive(Debug, Clone, Default)]
pub struct ForceRequest {
    pub builder_names: Vec<String>,
    pub builderid: Option<i64>,
    pub reason: String,
    pub owner: String,
    pub priority: i64,
    pub sourcestamp: SourceStamp,
    pub properties: Vec<(String, Value)>,
}

/// Who submits a buildset, for its reason and properties.
pub(super) struct Origin<'a> {
    pub(super) kind: &'a str,
    pub(super) name: &'a str,
    pub(super) builder_names: &'a [String],
    pub(super) properties: &'a std::collections::BTreeMap<String, Value>,
}

/// What became of a webhook delivery.
#[derive(Debug)]
pub enum Delivered {
    /// Its changes were stored and scheduled.
    Now(Vec<Change>),
    /// The same delivery was stored before; nothing was.
    Before,
}

impl Master {
    /// Stores a change durably, then lets every matching scheduler turn it into build requests.
    pub async fn add_change(&self, change: NewChange) -> Result<Change, SubmitError> {
        let mut stored = self.add_changes(vec![change]).await?;
        Ok(stored.remove(0))
    }

    /// Stores the changes of one delivery in one transaction — all or none — then lets the
    /// schedulers act on each, in order.
    pub async fn add_changes(&self, changes: Vec<NewChange>) -> Result<Vec<Change>, SubmitError> {
        let stored = self.store.add_changes(&changes).await?;
        for change in &stored {
            self.schedule_change(change).await?;
        }
        Ok(stored)
    }

    /// Stores the changes of one webhook delivery — unless the same delivery was stored before,
    /// by this master or another — then lets the schedulers act on each. A change stored is
    /// built even when its scheduling fails here: housekeeping schedules it again (see
    /// [`Master::schedule_left_changes`]), so the delivery stays remembered and its redelivery
    /// (the sender's answer to the 5xx) stores nothing more.
    pub async fn add_delivered_changes(
        &self,
        delivery: &Delivery,
        changes: Vec<NewChange>,
    ) -> Result<Delivered, SubmitError> {
        let Some(stored) = self.store.add_delivered_changes(delivery, &changes).await? else {
            info!(source = %delivery.source, delivery = %delivery.id, "webhook delivery seen before; nothing stored");
            return Ok(Delivered::Before);
        };
        for change in &stored {
            self.schedule_change(change).await?;
        }
        Ok(Delivered::Now(stored))
    }

    /// Lets every change scheduler act on a stored change: build it now, or classify it under a
    /// tree-stable timer. Each scheduler acts at most once on a change, in the transaction that
    /// records it, so scheduling a change again after a master died midway does nothing twice;
    /// the change counts as scheduled once all have acted.
    pub(super) async fn schedule_change(&self, stored: &Change) -> Result<(), SubmitError> {
        let change = &stored.change;
        info!(changeid = stored.changeid, branch = ?change.branch, revision = ?change.revision, "change added");
        let disabled = self.store.disabled_schedulers().await?;
        for scheduler in self.change_schedulers.iter().filter(|s| !disabled.contains(&s.config.name)) {
            let classification = scheduler.compiled.classify(change);
            if classification == Classification::Ignored {
                continue;
            }
            match scheduler.compiled.tree_stable_ms {
                None if classification == Classification::Important => {
                    let buildset = self.buildset_for(scheduler, std::slice::from_ref(stored));
                    self.submit_for_change(&buildset, stored.changeid, &scheduler.compiled.name).await?;
                }
                None => {}
                Some(stable_ms) => {
                    let now = self.store.now_ms();
                    let key = scheduler.compiled.timer_key(change);
                    let important = classification == Classification::Important;
                    self.store
                        .classify_change(&scheduler.compiled.name, &key, stored.changeid, important, |running| {
                            schedulers::next_fire(running, classification, now, stable_ms)
                        })
                        .await?;
                    self.timers_changed.notify_one();
                }
            }
        }
        for timed in
            self.timed_schedulers.iter().filter(|t| t.config.only_if_changed && !disabled.contains(&t.config.name))
        {
            let classification = timed.rules.classify(change);
            if classification != Classification::Ignored {
                let important = classification == Classification::Important;
                self.store.remember_change(&timed.config.name, stored.changeid, important).await?;
            }
        }
        self.store.change_scheduled(stored.changeid).await?;
        Ok(())
    }

    /// Schedules the changes a master stored but did not finish scheduling (it was killed, or
    /// its database went away, in between), once they are older than [`LEFT_AFTER`]: a live
    /// master schedules its changes within milliseconds.
    pub(super) async fn schedule_left_changes(&self) {
        let before = self.store.now_ms() - LEFT_AFTER.as_millis() as i64;
        let left = match self.store.unscheduled_changes(before, 100).await {
            Ok(left) => left,
            Err(error) => {
                warn!(%error, "cannot read the changes left unscheduled");
                return;
            }
        };
        for change in &left {
            warn!(
                changeid = change.changeid,
                "a change was stored but not scheduled (its master stopped midway); scheduling it now"
            );
            if let Err(error) = self.schedule_change(change).await {
                warn!(changeid = change.changeid, %error, "cannot schedule a change left unscheduled; trying again later");
                return;
            }
        }
    }

    /// The buildset a change scheduler submits for `changes` (oldest first).
    pub(super) fn buildset_for(&self, scheduler: &ChangeSchedulerPlan, changes: &[Change]) -> NewBuildset {
        let config = &scheduler.config;
        let kind = if scheduler.compiled.per_branch { "AnyBranchScheduler" } else { "SingleBranchScheduler" };
        let origin =
            Origin { kind, name: &config.name, builder_names: &config.builder_names, properties: &config.properties };
        self.buildset_from(&origin, config.priority, changes, None)
    }

    /// A scheduler's buildset: the newest change's sources for each codebase (or `default` when
    /// there is no change), the scheduler's properties and the newest change's.
    pub(super) fn buildset_from(
        &self,
        origin: &Origin<'_>,
        priority: i64,
        changes: &[Change],
        default: Option<SourceStamp>,
    ) -> NewBuildset {
        let mut props = Properties::new();
        for (k, v) in origin.properties {
            props.set(k.clone(), v.clone(), "Scheduler");
        }
        props.set("scheduler", Value::from(origin.name), "Scheduler");
        let mut sourcestamps: Vec<SourceStamp> = Vec::new();
        for stored in changes {
            for (k, v, _) in stored.change.properties.iter() {
                props.set(k, v.clone(), "Change");
            }
            let ss = stored.change.sourcestamp();
            match sourcestamps.iter_mut().find(|s| s.codebase == ss.codebase) {
                Some(existing) => *existing = ss,
                None => sourcestamps.push(ss),
            }
        }
        if sourcestamps.is_empty() {
            sourcestamps.extend(default);
        }
        let builderids: Vec<i64> = origin.builder_names.iter().filter_map(|b| self.builder_id(b)).collect();
        NewBuildset {
            reason: format!("The {} scheduler named '{}' triggered this build", origin.kind, origin.name),
            external_idstring: None,
            properties: props,
            sourcestamps,
            collapse_builderids: self.collapsing(&builderids),
            builderids,
            priority,
            ..Default::default()
        }
    }

    /// Forces a build through a force scheduler.
    pub async fn force(&self, scheduler_name: &str, request: ForceRequest) -> Result<Submitted, SubmitError> {
        let scheduler = self
            .config
            .schedulers
            .iter()
            .find(|s| s.name() == scheduler_name)
            .ok_or_else(|| SubmitError::UnknownScheduler(scheduler_name.to_owned()))?;
        let SchedulerConfig::Force(force) = scheduler else {
            return Err(SubmitError::NotForceable(scheduler_name.to_owned()));
        };
        if self.store.disabled_schedulers().await?.contains(scheduler_name) {
            return Err(SubmitError::Disabled(scheduler_name.to_owned()));
        }
        let (allowed, properties) = (&force.builder_names, &force.properties);
        let mut names = request.builder_names.clone();
        if let Some(id) = request.builderid {
            let builder = self.builder_by_id(id).ok_or_else(|| SubmitError::UnknownBuilder(id.to_string()))?;
            names.push(builder.config.name.clone());
        }
        if names.is_empty() {
            names = allowed.clone();
        }
        let mut builderids = Vec::new();
        for name in &names {
            let id = self.builder_id(name).ok_or_else(|| SubmitError::UnknownBuilder(name.clone()))?;
            if !allowed.contains(name) {
                return Err(SubmitError::BuilderNotInScheduler {
                    builder: name.clone(),
                    scheduler: scheduler_name.to_owned(),
                });
            }
            if !builderids.contains(&id) {
                builderids.push(id);
            }
        }
        let mut props = Properties::new();
        for (k, v) in properties {
            props.set(k.clone(), v.clone(), "Scheduler");
        }
        props.set("scheduler", Value::from(scheduler_name), "Scheduler");
        props.set("owner", Value::from(request.owner.clone()), "Force Build Form");
        props.set("reason", Value::from(request.reason.clone()), "Force Build Form");
        // Sources: one source stamp per configured codebase; a named codebase `cb` reads its
        // fields from `cb_branch`, `cb_revision`, `cb_repository` and `cb_project`.
        let mut extras = request.properties.clone();
        let mut sourcestamps = Vec::new();
        for codebase in &force.codebases {
            if codebase.is_empty() {
                sourcestamps.push(request.sourcestamp.clone());
                continue;
            }
            let mut take = |field: &str| {
                let key = format!("{codebase}_{field}");
                let position = extras.iter().position(|(k, _)| *k == key)?;
                let (_, value) = extras.remove(position);
                value.as_str().filter(|v| !v.is_empty()).map(str::to_owned)
            };
            sourcestamps.push(SourceStamp {
                branch: take("branch"),
                revision: take("revision"),
                repository: take("repository").unwrap_or_default(),
                project: take("project").unwrap_or_default(),
                codebase: codebase.clone(),
            });
        }
        // With declared parameters only they become properties, typed and checked; without,
        // whatever extra fields were submitted are passed on as they came.
        let submitted: Vec<(String, Value)> = if force.parameters.is_empty() {
            extras
        } else {
            let given = extras.into_iter().collect();
            crate::force::properties(&force.parameters, &given).map_err(SubmitError::InvalidParameters)?
        };
        for (k, v) in &submitted {
            props.set(k.clone(), v.clone(), "Force Build Form");
        }
        let buildset = NewBuildset {
            reason: format!("A build was forced by '{}': {}", request.owner, request.reason),
            external_idstring: None,
            properties: props,
            sourcestamps,
            builderids,
            priority: request.priority,
            rebuilt_buildid: None,
            ..Default::default()
        };
        Ok(self.submit(&buildset).await?)
    }

    pub(super) async fn submit(&self, buildset: &NewBuildset) -> Result<Submitted, StoreError> {
        let submitted = self.store.add_buildset(&self.collapsing_in(buildset)).await?;
        self.submitted(&submitted).await;
        Ok(submitted)
    }

    /// [`Master::submit`] for `scheduler` acting on a change; nothing when it acted on it before.
    async fn submit_for_change(
        &self,
        buildset: &NewBuildset,
        changeid: i64,
        scheduler: &str,
    ) -> Result<(), StoreError> {
        match self.store.add_buildset_for_change(&self.collapsing_in(buildset), changeid, scheduler).await? {
            Some(submitted) => self.submitted(&submitted).await,
            None => debug!(changeid, scheduler, "the scheduler acted on this change before"),
        }
        Ok(())
    }

    /// `buildset` with the builders whose older requests it collapses.
    fn collapsing_in(&self, buildset: &NewBuildset) -> NewBuildset {
        let mut buildset = buildset.clone();
        buildset.collapse_builderids = self.collapsing(&buildset.builderids);
        buildset
    }

    /// Counts a stored buildset and wakes whoever dispatches its requests.
    async fn submitted(&self, submitted: &Submitted) {
        crate::telemetry::request_submitted(submitted.requests.len());
        debug!(bsid = submitted.bsid, requests = submitted.requests.len(), "buildset submitted");
        self.store.notify_queue().await;
        self.signals.wake();
    }
}
