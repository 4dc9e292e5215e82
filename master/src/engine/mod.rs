//! The build engine: runs one claimed build request on one worker, step by step, through the
//! remote-command interface, and records steps, logs, properties and the result.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::watch;
use tracing::{Instrument, info, warn};

use crate::config::{BuilderConfig, StepConfig, StepFlags, step_name};
use crate::domain::{BuildsetDetails, ClaimedRequest};
use crate::properties::{Properties, SourceView};
use crate::remote::BuildSlot;
use crate::results::Results;
use crate::store::{NewReport, ReportEvent, Store, StoreError};

mod log;
mod step;
mod trigger;

use log::LogWriter;
use step::{StepOutcome, StepRunner};
pub use trigger::{TriggerError, TriggerRequest, Triggered, Triggers};

/// Why a build stops early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A user cancelled it.
    Cancelled,
    /// This master no longer holds the claim (its lease expired); another master may run it.
    ClaimLost,
    /// The master is shutting down and hands the request back.
    Shutdown,
}

/// Everything a build needs from the master around it.
#[derive(Debug, Clone)]
pub struct BuildContext {
    pub store: Store,
    pub masterid: i64,
    pub builderid: i64,
    pub builder: Arc<BuilderConfig>,
    pub triggers: Arc<dyn Triggers>,
    pub log_limits: LogLimits,
    /// How long after a lost session the worker's commands may still run (see
    /// [`crate::remote::WorkerSession::orphans_dead`]); a build lost with its worker ends RETRY
    /// only after it, so its retry never overlaps the command.
    pub orphan_deadline: Duration,
    /// The reporters covering this builder, each with whether it reports a build's start.
    pub reporters: Vec<(String, bool)>,
}

/// How much of a step's log is kept: Buildbot's `logMaxSize` and `logMaxTailSize`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogLimits {
    /// Bytes kept from the start; `None` keeps all.
    pub max: Option<usize>,
    /// Bytes kept from the end once `max` is exceeded.
    pub tail: Option<usize>,
}

/// How a finished build ended, for the caller's bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildOutcome {
    pub buildid: i64,
    pub results: Results,
    /// False when the claim had been taken back and the result was discarded.
    pub recorded: bool,
}

/// The default flags of each kind of step, as in Buildbot: source steps halt the build on
/// failure; shell steps flunk it but go on.
pub(super) fn effective_flags(step: &StepConfig) -> (bool, bool, bool, bool) {
    let (flags, halt_default): (StepFlags, bool) = match step {
        StepConfig::Git(s) => (s.flags(), true),
        StepConfig::Shell(s) => (s.flags(), false),
        StepConfig::SetPropertyFromCommand(s) => (s.flags(), false),
        StepConfig::Trigger(s) => (s.flags(), false),
    };
    (
        flags.halt_on_failure.unwrap_or(halt_default),
        flags.flunk_on_failure.unwrap_or(true),
        flags.warn_on_failure.unwrap_or(false),
        flags.always_run.unwrap_or(false),
    )
}

/// How a step's result counts towards the build's, by Buildbot's rules.
pub fn contribution(step: Results, flunk_on_failure: bool, warn_on_failure: bool) -> Results {
    match step {
        Results::Failure if flunk_on_failure => Results::Failure,
        Results::Failure if warn_on_failure => Results::Warnings,
        Results::Failure => Results::Success,
        other => other,
    }
}

/// Buildbot's state string of a finished build.
pub fn build_state(results: Results, failed_step: Option<&str>) -> String {
    match (results, failed_step) {
        (Results::Success, _) => "build successful".to_owned(),
        (Results::Warnings, _) => "build finished with warnings".to_owned(),
        (Results::Failure, Some(step)) => format!("failed {step}"),
        (Results::Failure, None) => "failed".to_owned(),
        (Results::Exception, _) => "exception".to_owned(),
        (Results::Retry, _) => "retry".to_owned(),
        (Results::Cancelled, _) => "cancelled".to_owned(),
        (Results::Skipped, _) => "skipped".to_owned(),
    }
}

/// Runs a build for `request` on the worker behind `slot` and records it, completing the request
/// (or, for RETRY, returning it to the queue) in the same transaction as the build's end.
pub async fn run_build(
    ctx: &BuildContext,
    request: &ClaimedRequest,
    slot: &BuildSlot,
    mut stop: watch::Receiver<Option<StopReason>>,
) -> Result<BuildOutcome, StoreError> {
    let session = slot.session();
    let builder = &ctx.builder;
    let details = ctx.store.buildset_details(request.buildsetid).await?;
    let (mut props, sources) = initial_properties(ctx, &details, session.name(), &session.info.basedir);

    // Reports of one builder's builds of one revision go out in order, per reporter.
    let revision = details.sourcestamps.first().and_then(|s| s.revision.clone()).unwrap_or_default();
    let report = |name: &str, event| NewReport {
        reporter: name.to_owned(),
        order_key: format!("{name}\n{}\n{revision}", ctx.builderid),
        event,
    };
    let reports: Vec<NewReport> = ctx
        .reporters
        .iter()
        .filter(|(_, starts)| *starts)
        .map(|(n, _)| report(n, ReportEvent::Started))
        .chain(ctx.reporters.iter().map(|(n, _)| report(n, ReportEvent::Finished)))
        .collect();
    let build =
        ctx.store.new_build(ctx.builderid, request.brid, session.workerid, ctx.masterid, &props, &reports).await?;
    props.set("buildnumber", Value::from(build.number), "Build");
    let span = tracing::info_span!("build", buildid = build.buildid, builder = %builder.name, number = build.number);
    async {
        info!(worker = session.name(), brid = request.brid, "build started");
        let mut results = Results::Success;
        let mut halted = false;
        let mut failed_step = None;
        // Whether a stop cut the build short. A stop that comes after the last step ended (say,
        // a master that could not renew its lease during an outage) changes nothing: the build
        // did all it had to, and its claim token decides whether its result is recorded.
        let mut cut_short = false;
        for (index, step) in builder.steps.iter().enumerate() {
            let name = step_name(step, index);
            let (halt_on_failure, flunk, warn_flag, always_run) = effective_flags(step);
            let stopped = stop.borrow().is_some();
            cut_short |= stopped;
            if (halted && !always_run) || stopped {
                persist("skip a step", || ctx.store.skip_step(build.buildid, index as i64, &name)).await?;
                continue;
            }
            let runner =
                StepRunner { ctx, slot, buildid: build.buildid, number: index as i64, name: &name, sources: &sources };
            let outcome = runner.run(step, &mut props, &mut stop).await?;
            if matches!(outcome.results, Results::Retry | Results::Cancelled) {
                results = outcome.results;
                cut_short = true;
                break;
            }
            let counted = contribution(outcome.results, flunk, warn_flag);
            if counted.worst(results) != results && failed_step.is_none() && counted != Results::Warnings {
                failed_step = Some(name.clone());
            }
            results = results.worst(counted);
            // As in Buildbot: an exception always ends the build (only `alwaysRun` steps follow),
            // a failure only with `haltOnFailure`.
            if outcome.results == Results::Exception || (outcome.results == Results::Failure && halt_on_failure) {
                halted = true;
            }
        }
        if let Some(reason) = *stop.borrow()
            && cut_short
        {
            results = match reason {
                StopReason::Cancelled => Results::Cancelled,
                StopReason::ClaimLost | StopReason::Shutdown => Results::Retry,
            };
        }
        let state = build_state(results, failed_step.as_deref());
        let recorded =
            persist("finish the build", || ctx.store.finish_build(build.buildid, results, &state, &props, request))
                .await?;
        if recorded {
            info!(results = %results, "build finished");
        } else {
            warn!(results = %results, "the claim was taken back before the build finished; result not recorded");
        }
        Ok(BuildOutcome { buildid: build.buildid, results, recorded })
    }
    .instrument(span)
    .await
}

/// A build's properties before its first step (Buildbot's: the buildset's, the builder's, the
/// worker's, the first source stamp's) and the sources its steps interpolate.
fn initial_properties(
    ctx: &BuildContext,
    details: &BuildsetDetails,
    workername: &str,
    basedir: &str,
) -> (Properties, Vec<SourceView>) {
    let builder = &ctx.builder;
    let mut props = Properties::new();
    props.update(&details.properties);
    for (name, value) in &builder.properties {
        props.set(name.clone(), value.clone(), "Builder");
    }
    props.set("buildername", Value::from(builder.name.clone()), "Builder");
    props.set("builderid", Value::from(ctx.builderid), "Builder");
    props.set("workername", Value::from(workername.to_owned()), "Worker");
    // Buildbot's `owners`: whoever forced the build and the authors of its changes.
    let mut owners = details.authors.clone();
    if let Some(Value::String(owner)) = details.properties.get("owner")
        && !owners.contains(owner)
    {
        owners.push(owner.clone());
    }
    if !owners.is_empty() {
        owners.sort();
        props.set("owners", Value::from(owners), "Build");
    }
    let builddir = builder.builddir();
    props.set("builddir", Value::from(format!("{basedir}/{builddir}")), "Worker");
    if let Some(ss) = details.sourcestamps.first() {
        let text = |s: &Option<String>| s.clone().map_or(Value::Null, Value::from);
        props.set("branch", text(&ss.branch), "Build");
        props.set("revision", text(&ss.revision), "Build");
        props.set("repository", Value::from(ss.repository.clone()), "Build");
        props.set("project", Value::from(ss.project.clone()), "Build");
        props.set("codebase", Value::from(ss.codebase.clone()), "Build");
    }
    let sources: Vec<SourceView> = details.sourcestamps.iter().map(SourceView::from).collect();
    (props, sources)
}

/// How long a build waits for an unreachable database to record what it did, before it gives
/// up and leaves its request to the lease.
pub(super) const OUTAGE_PATIENCE: Duration = Duration::from_secs(300);

/// Runs a store write, again and again while the database is unreachable (for up to
/// `patience`), so that a build whose command has finished during an outage is recorded once
/// the database is back instead of being run again. Whether the claim still holds is decided by
/// the write itself (its claim token). Other errors return at once.
pub(crate) async fn persist_within<T, F, Fut>(what: &str, patience: Duration, mut write: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let deadline = Instant::now() + patience;
    let mut delay = Duration::from_millis(100);
    let mut warned = false;
    loop {
        match write().await {
            Err(error) if error.is_unavailable() && Instant::now() + delay < deadline => {
                if !warned {
                    warn!(%error, "cannot {what}: the database is unavailable; trying again");
                    warned = true;
                }
                crate::telemetry::store_error("build");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            outcome => return outcome,
        }
    }
}

/// [`persist_within`] the build's [`OUTAGE_PATIENCE`].
pub(super) async fn persist<T, F, Fut>(what: &str, write: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    persist_within(what, OUTAGE_PATIENCE, write).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_counts_by_the_steps_flags() {
        assert_eq!(contribution(Results::Failure, true, false), Results::Failure);
        assert_eq!(contribution(Results::Failure, false, true), Results::Warnings);
        assert_eq!(contribution(Results::Failure, false, false), Results::Success);
        assert_eq!(contribution(Results::Exception, false, false), Results::Exception);
    }

    #[test]
    fn state_strings_follow_buildbot() {
        assert_eq!(build_state(Results::Success, None), "build successful");
        assert_eq!(build_state(Results::Failure, Some("test")), "failed test");
    }
}
