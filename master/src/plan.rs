//! The runtime plan: what a validated configuration compiles to, compiled once — change
//! schedulers with their filters, and Periodic and Nightly schedulers with their clocks. Start-up
//! and `kiln-master --check` both compile through here, so a configuration that checks is one
//! that starts.

use crate::config::{ChangeSchedulerConfig, Config, SchedulerConfig, TimedSchedulerConfig};
use crate::schedulers::ChangeScheduler;
use crate::timed::Cron;

/// What the master runs, compiled from its configuration.
#[derive(Debug)]
pub struct Plan {
    pub change_schedulers: Vec<ChangeSchedulerPlan>,
    pub timed_schedulers: Vec<TimedSchedulerPlan>,
}

/// A single- or any-branch scheduler: its configuration and its compiled rules.
#[derive(Debug)]
pub struct ChangeSchedulerPlan {
    pub config: ChangeSchedulerConfig,
    pub compiled: ChangeScheduler,
}

/// A Periodic or Nightly scheduler.
#[derive(Debug)]
pub struct TimedSchedulerPlan {
    pub config: TimedSchedulerConfig,
    pub when: When,
    /// Classifies changes for `onlyIfChanged`.
    pub rules: ChangeScheduler,
}

/// When a timed scheduler fires.
#[derive(Debug)]
pub enum When {
    /// Every so many milliseconds (Periodic).
    Every(i64),
    /// On a cron schedule (Nightly).
    Cron(Cron),
}

impl When {
    /// The first time of a scheduler that has never fired: at once for Periodic, as in Buildbot.
    pub fn first_after(&self, now: i64) -> Option<i64> {
        match self {
            When::Every(_) => Some(now),
            When::Cron(cron) => cron.next_after(now),
        }
    }

    pub fn next_after(&self, now: i64) -> Option<i64> {
        match self {
            When::Every(ms) => Some(now + ms),
            When::Cron(cron) => cron.next_after(now),
        }
    }
}

impl TimedSchedulerPlan {
    /// A fingerprint of the schedule, to notice a changed configuration.
    pub fn spec(&self) -> String {
        match &self.when {
            When::Every(ms) => format!("every {ms} ms"),
            When::Cron(cron) => format!("cron {cron:?}"),
        }
    }
}

impl Plan {
    /// Compiles a validated configuration; an error names the offending key and why.
    pub fn compile(config: &Config) -> Result<Plan, (String, String)> {
        let mut plan = Plan { change_schedulers: Vec::new(), timed_schedulers: Vec::new() };
        for (i, scheduler) in config.schedulers.iter().enumerate() {
            let at = |(key, reason): (String, String)| (format!("schedulers[{i}].{key}"), reason);
            match scheduler {
                SchedulerConfig::SingleBranch(c) | SchedulerConfig::AnyBranch(c) => {
                    let per_branch = matches!(scheduler, SchedulerConfig::AnyBranch(_));
                    let compiled = ChangeScheduler::compile(c, per_branch).map_err(at)?;
                    plan.change_schedulers.push(ChangeSchedulerPlan { config: c.clone(), compiled });
                }
                SchedulerConfig::Periodic(t) | SchedulerConfig::Nightly(t) => {
                    let when = match scheduler {
                        SchedulerConfig::Periodic(_) => {
                            When::Every((t.periodic_build_timer.unwrap_or(600.0) * 1000.0) as i64)
                        }
                        _ => When::Cron(
                            t.cron().map_err(|(field, reason)| (format!("schedulers[{i}].{field}"), reason))?,
                        ),
                    };
                    let rules = ChangeScheduler::compile(&t.change_rules(), false).map_err(at)?;
                    plan.timed_schedulers.push(TimedSchedulerPlan { config: t.clone(), when, rules });
                }
                _ => {}
            }
        }
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(schedulers: &str) -> Config {
        let text = format!(
            "database: 'sqlite://x'\nworkers: {{listen: '127.0.0.1:0'}}\nbuilders:\n  - name: b\n    steps: [{{shell: {{command: 'true'}}}}]\nschedulers:\n{schedulers}"
        );
        Config::parse("plan.yaml", &text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn schedulers_compile_once_each_with_their_kind() {
        let plan = Plan::compile(&config(
            "  - {type: single_branch, name: one, builderNames: [b]}\n  - {type: any_branch, name: any, builderNames: [b]}\n  - {type: periodic, name: p, builderNames: [b], periodicBuildTimer: 60}\n",
        ))
        .unwrap();
        let per_branch: Vec<bool> = plan.change_schedulers.iter().map(|s| s.compiled.per_branch).collect();
        assert_eq!(per_branch, [false, true]);
        assert_eq!(plan.timed_schedulers[0].spec(), "every 60000 ms");
    }

    use crate::config::tests::MINIMAL;

    /// Every setting in seconds drives a timer: one too large for it is refused here, not met as
    /// a panic when the master starts.
    #[test]
    fn spans_of_seconds_beyond_a_year_are_refused() {
        let poller = "change_sources: [{type: git_poller, repourl: /srv/r.git, pollInterval: %}]";
        let pool = "pools: [{name: p, backend: static, max: 1, scale_down_delay: %}]";
        let scheduler = MINIMAL.replace("branch: main, builderNames", "branch: main, treeStableTimer: %, builderNames");
        let table = [
            (
                format!(
                    "workers: {{heartbeat_interval: %, tokens: [{{name: t, value: s}}]}}\n{}",
                    MINIMAL.replace("workers:\n  tokens: [{name: t, value: secret}]\n", "")
                ),
                "workers.heartbeat_interval",
            ),
            (format!("{poller}\n{MINIMAL}"), "change_sources[0].pollInterval"),
            (format!("{pool}\n{MINIMAL}"), "pools[0].scale_down_delay"),
            (scheduler, "schedulers[1]"),
            (format!("logHorizon: %\n{MINIMAL}"), "logHorizon"),
            (
                format!("{MINIMAL}  - {{type: periodic, name: p, builderNames: [b], periodicBuildTimer: %}}\n"),
                "schedulers[2]",
            ),
        ];
        // As the master reads a configuration: parsed, validated, then compiled into its plan.
        let refused_key = |text: &str| match Config::parse("mem.yaml", text) {
            Ok(config) => Plan::compile(&config).err().map(|(key, _)| key),
            Err(error) => Some(error.key),
        };
        for (template, key) in table {
            assert_eq!(refused_key(&template.replace('%', "2")), None, "{key} = 2 is fine");
            for huge in ["4611686018427387648", "1.0e300", ".inf", ".nan", "-1"] {
                let refused = refused_key(&template.replace('%', huge)).unwrap_or_default();
                assert!(refused.starts_with(key), "{key} = {huge}: refused at {refused:?}");
            }
        }
    }

    #[test]
    fn a_bad_filter_is_named_by_its_key() {
        let error = Plan::compile(&config(
            "  - {type: single_branch, name: one, builderNames: [b], change_filter: {branch_re: '('}}\n",
        ))
        .unwrap_err();
        assert_eq!(error.0, "schedulers[0].change_filter.branch_re");
    }
}
