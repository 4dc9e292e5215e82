//! The build engine: runs one claimed build request on one worker, step by step, through the
//! remote-command interface, and records steps, logs, properties and the result.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde_json::Value;
use tokio::sync::watch;
use tracing::{Instrument, info, warn};

use crate::config::{BuilderConfig, CommandLine, StepConfig, StepFlags, TriggerStepConfig, step_name};
use crate::domain::{ClaimedRequest, SourceStamp, Submitted};
use crate::properties::{Properties, SourceView, interpolate};
use crate::remote::{BuildSlot, Command, CommandEvent, GitCommand, RunningCommand, ShellCommand, Stream, Update};
use crate::results::Results;
use crate::store::{LogTail, Store, StoreError};

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
}

/// How much of a step's log is kept: Buildbot's `logMaxSize` and `logMaxTailSize`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogLimits {
    /// Bytes kept from the start; `None` keeps all.
    pub max: Option<usize>,
    /// Bytes kept from the end once `max` is exceeded.
    pub tail: Option<usize>,
}

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

/// How a finished build ended, for the caller's bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildOutcome {
    pub buildid: i64,
    pub results: Results,
    /// False when the claim had been taken back and the result was discarded.
    pub recorded: bool,
}

/// How following a running command ended.
enum Followed {
    /// It completed; `Some` carries why it could not run.
    Completed(Option<String>),
    /// The session with its worker ended first.
    Lost,
}

/// What a step contributed.
#[derive(Debug, Clone, PartialEq)]
struct StepOutcome {
    results: Results,
    state: String,
}

/// The default flags of each kind of step, as in Buildbot: source steps halt the build on
/// failure; shell steps flunk it but go on.
fn effective_flags(step: &StepConfig) -> (bool, bool, bool, bool) {
    let (flags, halt_default): (&StepFlags, bool) = match step {
        StepConfig::Git(s) => (&s.flags, true),
        StepConfig::Shell(s) => (&s.flags, false),
        StepConfig::SetPropertyFromCommand(s) => (&s.flags, false),
        StepConfig::Trigger(s) => (&s.flags, false),
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
    let mut props = Properties::new();
    props.update(&details.properties);
    for (name, value) in &builder.properties {
        props.set(name.clone(), value.clone(), "Builder");
    }
    props.set("buildername", Value::from(builder.name.clone()), "Builder");
    props.set("builderid", Value::from(ctx.builderid), "Builder");
    props.set("workername", Value::from(session.name().to_owned()), "Worker");
    let builddir = builder.builddir();
    props.set("builddir", Value::from(format!("{}/{builddir}", session.info.basedir)), "Worker");
    if let Some(ss) = details.sourcestamps.first() {
        let text = |s: &Option<String>| s.clone().map_or(Value::Null, Value::from);
        props.set("branch", text(&ss.branch), "Build");
        props.set("revision", text(&ss.revision), "Build");
        props.set("repository", Value::from(ss.repository.clone()), "Build");
        props.set("project", Value::from(ss.project.clone()), "Build");
        props.set("codebase", Value::from(ss.codebase.clone()), "Build");
    }
    let sources: Vec<SourceView> = details
        .sourcestamps
        .iter()
        .map(|ss| SourceView {
            codebase: ss.codebase.clone(),
            branch: ss.branch.clone(),
            revision: ss.revision.clone(),
            repository: ss.repository.clone(),
            project: ss.project.clone(),
        })
        .collect();

    let build = ctx.store.new_build(ctx.builderid, request.brid, session.workerid, ctx.masterid, &props).await?;
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
            if matches!(outcome.results, Results::Failure | Results::Exception) && halt_on_failure {
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

struct StepRunner<'a> {
    ctx: &'a BuildContext,
    slot: &'a BuildSlot,
    buildid: i64,
    number: i64,
    name: &'a str,
    sources: &'a [SourceView],
}

impl StepRunner<'_> {
    fn render(&self, template: &str, props: &Properties) -> Result<String, String> {
        interpolate(template, props, self.sources).map_err(|e| e.to_string())
    }

    fn render_command(&self, line: &CommandLine, props: &Properties) -> Result<(Vec<String>, Option<String>), String> {
        Ok(match line {
            CommandLine::Argv(argv) => (argv.iter().map(|a| self.render(a, props)).collect::<Result<_, _>>()?, None),
            CommandLine::Script(script) => (Vec::new(), Some(self.render(script, props)?)),
        })
    }

    fn workdir(&self, workdir: &Option<String>, props: &Properties) -> Result<String, String> {
        let workdir = match workdir {
            Some(w) => self.render(w, props)?,
            None => "build".to_owned(),
        };
        Ok(if workdir.starts_with('/') { workdir } else { format!("{}/{workdir}", self.ctx.builder.builddir()) })
    }

    async fn run(
        &self,
        step: &StepConfig,
        props: &mut Properties,
        stop: &mut watch::Receiver<Option<StopReason>>,
    ) -> Result<StepOutcome, StoreError> {
        let store = &self.ctx.store;
        if let StepConfig::Trigger(trigger) = step {
            return self.run_trigger(trigger, props, stop).await;
        }
        let command = self.build_command(step, props);
        let description = match &command {
            Ok(command) => describe(command),
            Err(_) => self.name.to_owned(),
        };
        let running_state = format!("{description} (running)");
        let (stepid, logid) =
            persist("begin a step", || store.begin_step(self.buildid, self.number, self.name, &running_state)).await?;
        let mut log = LogWriter::new(store.clone(), logid, self.ctx.log_limits);
        // Every way out of the step writes its log's last lines and its result in one go.
        let finish = |log: LogWriter, results: Results, state: String| async move {
            let tail = log.into_tail();
            persist("finish a step", || store.finish_step(stepid, results, &state, &tail)).await?;
            Ok::<_, StoreError>(StepOutcome { results, state })
        };
        let command = match command {
            Ok(command) => command,
            Err(reason) => {
                log.header(&format!("{reason}\n"));
                return finish(log, Results::Exception, format!("exception: {reason}")).await;
            }
        };
        let session = self.slot.session();
        let mut running = match session.start(&self.ctx.builder.name, self.buildid, command).await {
            Ok(running) => running,
            Err(error) => {
                log.header(&format!("{error}\n"));
                let results = if session.is_closed() { Results::Retry } else { Results::Exception };
                return finish(log, results, format!("{description} ({error})")).await;
            }
        };
        let mut rc = None;
        let mut stdout = Vec::new();
        let capture = matches!(step, StepConfig::SetPropertyFromCommand(_));
        let mut interrupted = false;
        let mut flush_tick = tokio::time::interval(LogWriter::FLUSH_INTERVAL);
        flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let followed: Result<Followed, StoreError> = async {
            loop {
                let event = tokio::select! {
                    event = running.next() => event,
                    _ = flush_tick.tick() => {
                        log.flush().await?;
                        continue;
                    }
                    changed = stop.changed(), if !interrupted => {
                        if changed.is_ok() && stop.borrow().is_some() {
                            interrupted = true;
                            interrupt(&running, "build stopped").await;
                        }
                        continue;
                    }
                };
                match event {
                    CommandEvent::Update(Update::Output(stream, data)) => {
                        if capture && stream == Stream::Stdout {
                            stdout.extend_from_slice(&data);
                        }
                        log.append(stream, &data);
                        log.flush_if_due().await?;
                    }
                    CommandEvent::Update(Update::Rc(code)) => rc = Some(code),
                    CommandEvent::Update(Update::Property(name, value)) => props.set(name, value, "Git"),
                    CommandEvent::Update(Update::FailureReason(reason)) => {
                        log.header(&format!("failure reason: {reason}\n"))
                    }
                    CommandEvent::Update(_) => {}
                    CommandEvent::Complete(error) => return Ok(Followed::Completed(error)),
                    CommandEvent::Lost => return Ok(Followed::Lost),
                }
            }
        }
        .await;
        let error = match followed {
            Ok(Followed::Completed(error)) => error,
            Ok(Followed::Lost) => {
                // The session ended under the command. Its worker kills it within the orphan
                // deadline; only then may the build end RETRY and its request run elsewhere. A
                // cancellation ends it at once: nothing will run again.
                log.header("worker lost\n");
                tokio::select! {
                    _ = session.orphans_dead(self.ctx.orphan_deadline) => {}
                    Ok(_) = stop.wait_for(|r| *r == Some(StopReason::Cancelled)) => {}
                }
                return finish(log, Results::Retry, format!("{description} (worker lost)")).await;
            }
            Err(error) => {
                // The database failed while the command runs: the build will be handed back,
                // so the command must end first, or its retry would run beside it.
                stop_command(&mut running, self.ctx.orphan_deadline).await;
                return Err(error);
            }
        };
        // A command that ended by itself before the interrupt reached it (exit status 0) keeps
        // its result; one the interrupt killed ends as the stop says.
        let stopped = *stop.borrow();
        if let Some(reason) = stopped
            && interrupted
            && rc != Some(0)
        {
            let results = if reason == StopReason::Cancelled { Results::Cancelled } else { Results::Retry };
            return finish(log, results, format!("{description} (interrupted)")).await;
        }
        if let Some(error) = error {
            return finish(log, Results::Exception, format!("{description} (exception: {error})")).await;
        }
        let results = match rc {
            Some(0) => Results::Success,
            _ => Results::Failure,
        };
        if results == Results::Success
            && let StepConfig::SetPropertyFromCommand(s) = step
        {
            let text = String::from_utf8_lossy(&stdout);
            let value = if s.strip { text.trim().to_owned() } else { text.into_owned() };
            props.set(s.property.clone(), Value::from(value), "SetPropertyFromCommand Step");
        }
        let suffix = match results {
            Results::Success => String::new(),
            _ => format!(" (failure: exit code {})", rc.map_or("none".to_owned(), |c| c.to_string())),
        };
        finish(log, results, format!("{description}{suffix}")).await
    }

    fn build_command(&self, step: &StepConfig, props: &Properties) -> Result<Command, String> {
        Ok(match step {
            StepConfig::Shell(s) => {
                let (argv, script) = self.render_command(&s.command, props)?;
                let env = s
                    .env
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), self.render(v, props)?)))
                    .collect::<Result<_, String>>()?;
                Command::Shell(ShellCommand {
                    argv,
                    script,
                    workdir: self.workdir(&s.workdir, props)?,
                    env,
                    timeout_secs: s.timeout.unwrap_or(1200),
                    max_time_secs: s.max_time.unwrap_or(0),
                    log_environ: s.log_environ.unwrap_or(false),
                })
            }
            StepConfig::SetPropertyFromCommand(s) => {
                let (argv, script) = self.render_command(&s.command, props)?;
                Command::Shell(ShellCommand {
                    argv,
                    script,
                    workdir: self.workdir(&s.workdir, props)?,
                    timeout_secs: 1200,
                    ..Default::default()
                })
            }
            StepConfig::Trigger(_) => return Err("a trigger step runs no remote command".into()),
            StepConfig::Git(g) => {
                let source = self.sources.first();
                let repourl = match &g.repourl {
                    Some(url) => self.render(url, props)?,
                    None => source.map(|s| s.repository.clone()).unwrap_or_default(),
                };
                if repourl.is_empty() {
                    return Err("no repository: set repourl or build a change that names one".to_owned());
                }
                let branch = source.and_then(|s| s.branch.clone()).or_else(|| g.branch.clone());
                Command::Git(GitCommand {
                    repourl,
                    revision: source.and_then(|s| s.revision.clone()).filter(|r| !r.is_empty()),
                    branch,
                    workdir: self.workdir(&g.workdir, props)?,
                    mode: g.mode.clone().unwrap_or_else(|| "incremental".to_owned()),
                    timeout_secs: g.timeout.unwrap_or(1200),
                })
            }
        })
    }
}

impl StepRunner<'_> {
    /// Runs a `trigger` step: submits to the triggerable schedulers and, if asked, waits for
    /// their builds, taking their worst result.
    async fn run_trigger(
        &self,
        trigger: &TriggerStepConfig,
        props: &Properties,
        stop: &mut watch::Receiver<Option<StopReason>>,
    ) -> Result<StepOutcome, StoreError> {
        let store = &self.ctx.store;
        let names = trigger.scheduler_names.join(", ");
        let running_state = format!("triggering {names}");
        let (stepid, logid) =
            persist("begin a step", || store.begin_step(self.buildid, self.number, self.name, &running_state)).await?;
        let mut log = LogWriter::new(store.clone(), logid, self.ctx.log_limits);
        let finish = |log: LogWriter, results: Results, state: String| async move {
            let tail = log.into_tail();
            persist("finish a step", || store.finish_step(stepid, results, &state, &tail)).await?;
            Ok::<_, StoreError>(StepOutcome { results, state })
        };
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
                    Err(reason) => {
                        log.header(&format!("{name}: {reason}\n"));
                        return finish(log, Results::Exception, format!("exception: {reason}")).await;
                    }
                },
                other => other.clone(),
            };
            properties.set(name.clone(), value, "Trigger");
        }
        let request = TriggerRequest {
            scheduler_names: trigger.scheduler_names.clone(),
            sourcestamps,
            properties,
            parent_buildid: self.buildid,
            waited_for: trigger.wait_for_finish,
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
}

/// How long a build waits for an unreachable database to record what it did, before it gives
/// up and leaves its request to the lease.
const OUTAGE_PATIENCE: Duration = Duration::from_secs(300);

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
async fn persist<T, F, Fut>(what: &str, write: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    persist_within(what, OUTAGE_PATIENCE, write).await
}

async fn interrupt(running: &RunningCommand, reason: &str) {
    running.interrupt(reason).await;
}

/// Interrupts a command and waits until it has ended on the worker. A worker that does not
/// confirm within `limit` has its session closed, which makes it kill every command of the
/// session (and makes the build's slot free only once that is done).
async fn stop_command(running: &mut RunningCommand, limit: Duration) {
    interrupt(running, "the build cannot be recorded").await;
    let ended = tokio::time::timeout(limit, async {
        loop {
            match running.next().await {
                CommandEvent::Complete(_) | CommandEvent::Lost => return,
                CommandEvent::Update(_) => {}
            }
        }
    })
    .await;
    if ended.is_err() {
        warn!(command = %running.command_id, "the worker did not confirm the interrupt; ending its session");
        let session = Arc::clone(running.session());
        session.close();
        session.orphans_dead(limit).await;
    }
}

/// A short description of a command for state strings.
fn describe(command: &Command) -> String {
    match command {
        Command::Shell(s) => {
            let text = if s.argv.is_empty() { s.script.clone().unwrap_or_default() } else { s.argv.join(" ") };
            let text: String = text.chars().take(60).collect();
            format!("'{text}'")
        }
        Command::Git(g) => format!("git {}", g.revision.as_deref().or(g.branch.as_deref()).unwrap_or("HEAD")),
        other => other.name().to_owned(),
    }
}

/// Buffers a step's output into lines with Buildbot's channel prefixes and writes them to the
/// store in chunks while the step runs: when enough has gathered or every flush interval.
struct LogWriter {
    store: Store,
    logid: i64,
    next_line: i64,
    /// Complete, prefixed lines not yet written.
    pending: String,
    /// Incomplete last line of each stream (stdout, stderr, header).
    partial: [Vec<u8>; 3],
    last_flush: Instant,
    limits: LogLimits,
    /// Bytes of lines kept so far.
    kept: usize,
    /// Once the log exceeded `limits.max`: what was dropped, and the last lines kept for the tail.
    truncated: Option<Truncated>,
}

#[derive(Default)]
struct Truncated {
    dropped: usize,
    tail: std::collections::VecDeque<String>,
    tail_bytes: usize,
}

impl LogWriter {
    const FLUSH_BYTES: usize = 64 * 1024;
    const FLUSH_INTERVAL: Duration = Duration::from_millis(500);
    /// Output kept in memory while the database is unreachable before the build gives up.
    const OUTAGE_BUFFER: usize = 16 * 1024 * 1024;

    fn new(store: Store, logid: i64, limits: LogLimits) -> Self {
        Self {
            store,
            logid,
            next_line: 0,
            pending: String::new(),
            partial: Default::default(),
            last_flush: Instant::now(),
            limits,
            kept: 0,
            truncated: None,
        }
    }

    fn header(&mut self, text: &str) {
        self.append(Stream::Header, text.as_bytes());
    }

    fn append(&mut self, stream: Stream, data: &[u8]) {
        let index = match stream {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
            Stream::Header => 2,
        };
        let partial = &mut self.partial[index];
        partial.extend_from_slice(data);
        let Some(last_newline) = partial.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        let complete: Vec<u8> = partial.drain(..=last_newline).collect();
        for line in String::from_utf8_lossy(&complete).split_inclusive('\n') {
            self.line(format!("{}{line}", stream.prefix()));
        }
    }

    /// Keeps a prefixed line, or counts it dropped (and perhaps keeps it for the tail) once the
    /// log is over its limit.
    fn line(&mut self, line: String) {
        let Some(max) = self.limits.max else {
            self.pending.push_str(&line);
            return;
        };
        if self.truncated.is_none() && self.kept + line.len() <= max {
            self.kept += line.len();
            self.pending.push_str(&line);
            return;
        }
        let truncated = self.truncated.get_or_insert_with(|| {
            self.pending.push_str(&format!("hOutput exceeded logMaxSize ({max} bytes): the rest is not kept\n"));
            Truncated::default()
        });
        truncated.dropped += line.len();
        if let Some(tail) = self.limits.tail.filter(|t| *t > 0) {
            truncated.tail_bytes += line.len();
            truncated.tail.push_back(line);
            while truncated.tail_bytes > tail {
                let first = truncated.tail.pop_front().expect("over the limit, so not empty");
                truncated.tail_bytes -= first.len();
            }
        }
    }

    async fn flush_if_due(&mut self) -> Result<(), StoreError> {
        if self.pending.len() >= Self::FLUSH_BYTES || self.last_flush.elapsed() >= Self::FLUSH_INTERVAL {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), StoreError> {
        self.last_flush = Instant::now();
        if self.pending.is_empty() {
            return Ok(());
        }
        let text = std::mem::take(&mut self.pending);
        match self.store.append_log(self.logid, self.next_line, &text).await {
            Ok(next) => {
                self.next_line = next;
                crate::telemetry::log_bytes(text.len());
                Ok(())
            }
            // While the database is unreachable the output is kept here and written with the
            // next flush, up to a bound; the command goes on.
            Err(error) if error.is_unavailable() && text.len() < Self::OUTAGE_BUFFER => {
                self.pending = text + &self.pending;
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    /// Ends the log: terminates unfinished lines, adds the tail of a truncated log, and returns
    /// what is left to write.
    fn into_tail(mut self) -> LogTail {
        for (index, stream) in [Stream::Stdout, Stream::Stderr, Stream::Header].into_iter().enumerate() {
            if !self.partial[index].is_empty() {
                self.append(stream, b"\n");
            }
        }
        if let Some(truncated) = self.truncated.take() {
            let shown = truncated.tail_bytes;
            let lost = truncated.dropped - shown;
            if shown == 0 {
                self.pending.push_str(&format!("h{lost} bytes of output were not kept\n"));
            } else {
                self.pending.push_str(&format!("h{lost} bytes of output were not kept; the last {shown} follow\n"));
                self.pending.extend(truncated.tail);
            }
        }
        LogTail { logid: self.logid, first_line: self.next_line, text: std::mem::take(&mut self.pending) }
    }
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

    async fn writer(limits: LogLimits) -> LogWriter {
        let store = Store::connect("sqlite::memory:").await.unwrap();
        LogWriter::new(store, 1, limits)
    }

    fn lines(from: usize, to: usize) -> String {
        (from..to).map(|i| format!("line {i:03}\n")).collect()
    }

    #[tokio::test]
    async fn a_log_over_its_limit_keeps_its_start_and_its_tail() {
        // Each stored line is 10 bytes: the prefix, "line NNN" and the newline.
        let mut log = writer(LogLimits { max: Some(30), tail: Some(20) }).await;
        log.append(Stream::Stdout, lines(0, 10).as_bytes());
        let text = log.into_tail().text;
        let expected = "oline 000\noline 001\noline 002\n\
                        hOutput exceeded logMaxSize (30 bytes): the rest is not kept\n\
                        h50 bytes of output were not kept; the last 20 follow\n\
                        oline 008\noline 009\n";
        assert_eq!(text, expected);
    }

    #[tokio::test]
    async fn without_a_tail_the_rest_is_counted_and_without_a_limit_all_is_kept() {
        let mut log = writer(LogLimits { max: Some(25), tail: None }).await;
        log.append(Stream::Stderr, lines(0, 4).as_bytes());
        let text = log.into_tail().text;
        assert!(text.starts_with("eline 000\neline 001\nhOutput exceeded"), "{text}");
        assert!(text.ends_with("h20 bytes of output were not kept\n"), "{text}");

        let mut log = writer(LogLimits::default()).await;
        log.append(Stream::Stdout, lines(0, 100).as_bytes());
        assert_eq!(log.into_tail().text.len(), 1000);
    }

    #[test]
    fn state_strings_follow_buildbot() {
        assert_eq!(build_state(Results::Success, None), "build successful");
        assert_eq!(build_state(Results::Failure, Some("test")), "failed test");
    }
}
