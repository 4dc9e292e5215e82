//! One step of a build: its remote command rendered from properties, followed to its end, and
//! its result and log recorded.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;
use tracing::warn;

use super::{BuildContext, LogWriter, StopReason, persist};
use crate::config::{CommandLine, StepConfig};
use crate::properties::{Properties, SourceView, interpolate};
use crate::remote::{BuildSlot, Command, CommandEvent, GitCommand, RunningCommand, ShellCommand, Stream, Update};
use crate::results::Results;
use crate::store::StoreError;

/// How following a running command ended.
pub(super) enum Followed {
    /// It completed.
    Completed(Ended),
    /// The session with its worker ended first.
    Lost,
}

/// How a command that completed ended.
pub(super) struct Ended {
    /// Why it could not run, if it could not.
    error: Option<String>,
    rc: Option<i32>,
    /// What it wrote to stdout, when asked to keep it.
    stdout: Vec<u8>,
    /// Whether a stop interrupted it.
    interrupted: bool,
}

/// What a step contributed.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct StepOutcome {
    pub(super) results: Results,
    pub(super) state: String,
}

pub(super) struct StepRunner<'a> {
    pub(super) ctx: &'a BuildContext,
    pub(super) slot: &'a BuildSlot,
    pub(super) buildid: i64,
    pub(super) number: i64,
    pub(super) name: &'a str,
    pub(super) sources: &'a [SourceView],
}

impl StepRunner<'_> {
    pub(super) fn render(&self, template: &str, props: &Properties) -> Result<String, String> {
        interpolate(template, props, self.sources).map_err(|e| e.to_string())
    }

    pub(super) fn render_command(
        &self,
        line: &CommandLine,
        props: &Properties,
    ) -> Result<(Vec<String>, Option<String>), String> {
        Ok(match line {
            CommandLine::Argv(argv) => (argv.iter().map(|a| self.render(a, props)).collect::<Result<_, _>>()?, None),
            CommandLine::Script(script) => (Vec::new(), Some(self.render(script, props)?)),
        })
    }

    pub(super) fn workdir(&self, workdir: &Option<String>, props: &Properties) -> Result<String, String> {
        let workdir = match workdir {
            Some(w) => self.render(w, props)?,
            None => "build".to_owned(),
        };
        Ok(if workdir.starts_with('/') { workdir } else { format!("{}/{workdir}", self.ctx.builder.builddir()) })
    }

    pub(super) async fn run(
        &self,
        step: &StepConfig,
        props: &mut Properties,
        stop: &mut watch::Receiver<Option<StopReason>>,
    ) -> Result<StepOutcome, StoreError> {
        if let StepConfig::Trigger(trigger) = step {
            return self.run_trigger(trigger, props, stop).await;
        }
        let command = self.build_command(step, props);
        let description = match &command {
            Ok(command) => describe(command),
            Err(_) => self.name.to_owned(),
        };
        let running_state = format!("{description} (running)");
        let (stepid, mut log) = self.begin(&running_state).await?;
        // Every way out of the step writes its log's last lines and its result in one go.
        let finish = |log: LogWriter, results: Results, state: String| self.finish(stepid, log, results, state);
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
        let capture = matches!(step, StepConfig::SetPropertyFromCommand(_));
        let followed = self.follow(&mut running, &mut log, props, stop, capture).await;
        let Ended { error, rc, stdout, interrupted } = match followed {
            Ok(Followed::Completed(ended)) => ended,
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

    /// Follows a running command to its end: streams its output to the log (flushing it at
    /// least every flush interval), keeps the properties it reports, and interrupts it once the
    /// build is stopped. `capture` keeps its stdout too.
    async fn follow(
        &self,
        running: &mut RunningCommand,
        log: &mut LogWriter,
        props: &mut Properties,
        stop: &mut watch::Receiver<Option<StopReason>>,
        capture: bool,
    ) -> Result<Followed, StoreError> {
        let mut rc = None;
        let mut stdout = Vec::new();
        let mut interrupted = false;
        let mut flush_tick = tokio::time::interval(LogWriter::FLUSH_INTERVAL);
        flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                        interrupt(running, "build stopped").await;
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
                CommandEvent::Complete(error) => {
                    return Ok(Followed::Completed(Ended { error, rc, stdout, interrupted }));
                }
                CommandEvent::Lost => return Ok(Followed::Lost),
            }
        }
    }

    /// Records the step as begun, in `state`; returns its id and the writer of its log.
    pub(super) async fn begin(&self, state: &str) -> Result<(i64, LogWriter), StoreError> {
        let store = &self.ctx.store;
        let (stepid, logid) =
            persist("begin a step", || store.begin_step(self.buildid, self.number, self.name, state)).await?;
        Ok((stepid, LogWriter::new(store.clone(), logid, self.ctx.log_limits)))
    }

    /// Records the step's end: its log's last lines, its result and its state, in one write.
    pub(super) async fn finish(
        &self,
        stepid: i64,
        log: LogWriter,
        results: Results,
        state: String,
    ) -> Result<StepOutcome, StoreError> {
        let tail = log.into_tail();
        persist("finish a step", || self.ctx.store.finish_step(stepid, results, &state, &tail)).await?;
        Ok(StepOutcome { results, state })
    }

    pub(super) fn build_command(&self, step: &StepConfig, props: &Properties) -> Result<Command, String> {
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

pub(super) async fn interrupt(running: &RunningCommand, reason: &str) {
    running.interrupt(reason).await;
}

/// Interrupts a command and waits until it has ended on the worker. A worker that does not
/// confirm within `limit` has its session closed, which makes it kill every command of the
/// session (and makes the build's slot free only once that is done).
pub(super) async fn stop_command(running: &mut RunningCommand, limit: Duration) {
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
pub(super) fn describe(command: &Command) -> String {
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
