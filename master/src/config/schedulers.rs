//! Schedulers in the configuration: change, timed, force, triggerable and dependent ones, and change filters.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SchedulerConfig {
    /// Buildbot's SingleBranchScheduler: matching changes become build requests, with one
    /// tree-stable timer for the scheduler.
    SingleBranch(ChangeSchedulerConfig),
    /// Buildbot's AnyBranchScheduler: like `single_branch`, with a timer per branch.
    AnyBranch(ChangeSchedulerConfig),
    /// Buildbot's ForceScheduler: builds on demand through the REST control API.
    Force(ForceSchedulerConfig),
    /// Buildbot's Dependent scheduler: builds the sources of each buildset of `upstream` that
    /// completes with SUCCESS or WARNINGS.
    Dependent(DependentSchedulerConfig),
    /// Buildbot's Triggerable scheduler: builds when a `trigger` step asks.
    Triggerable(TriggerableSchedulerConfig),
    /// Buildbot's Periodic scheduler: builds every `periodicBuildTimer` seconds.
    Periodic(TimedSchedulerConfig),
    /// Buildbot's Nightly scheduler: builds at the times its cron fields name, on the wall clock of
    /// its `timezone` (default: the master's).
    Nightly(TimedSchedulerConfig),
}

/// A scheduler that follows another's successful buildsets.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DependentSchedulerConfig {
    /// Unique name of the scheduler.
    pub name: String,
    /// The scheduler whose buildsets this one follows.
    pub upstream: String,
    /// The builders it submits to (`builderNames`).
    #[serde(rename = "builderNames")]
    pub builder_names: Vec<String>,
    /// Priority of its build requests; higher builds first (default 0).
    #[serde(default)]
    pub priority: i64,
    /// Properties of the builds it starts.
    #[serde(default)]
    pub properties: BTreeMap<String, serde_json::Value>,
}

/// A scheduler that `trigger` steps submit to.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TriggerableSchedulerConfig {
    /// Unique name of the scheduler.
    pub name: String,
    /// The builders it submits to (`builderNames`).
    #[serde(rename = "builderNames")]
    pub builder_names: Vec<String>,
    /// Priority of its build requests; higher builds first (default 0).
    #[serde(default)]
    pub priority: i64,
    /// Properties of the builds it starts.
    #[serde(default)]
    pub properties: BTreeMap<String, serde_json::Value>,
}

/// A Periodic or Nightly scheduler.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TimedSchedulerConfig {
    /// Unique name of the scheduler.
    pub name: String,
    /// The builders it submits to (`builderNames`).
    #[serde(rename = "builderNames")]
    pub builder_names: Vec<String>,
    /// Periodic: seconds between builds.
    #[serde(default, rename = "periodicBuildTimer")]
    pub periodic_build_timer: Option<f64>,
    /// Nightly: Buildbot's cron fields (minute defaults to 0, the others to `*`; dayOfWeek 0 is
    /// Monday).
    #[serde(default)]
    pub minute: Option<crate::timed::CronField>,
    /// Nightly: hours (0–23), Buildbot's cron field; default `*`.
    #[serde(default)]
    pub hour: Option<crate::timed::CronField>,
    /// Nightly: days of the month (1–31); default `*`.
    #[serde(default, rename = "dayOfMonth")]
    pub day_of_month: Option<crate::timed::CronField>,
    /// Nightly: months (1–12); default `*`.
    #[serde(default)]
    pub month: Option<crate::timed::CronField>,
    /// Nightly: days of the week, 0 = Monday as in Buildbot; default `*`.
    #[serde(default, rename = "dayOfWeek")]
    pub day_of_week: Option<crate::timed::CronField>,
    /// Nightly: the time zone whose wall clock the cron fields follow, as an IANA name
    /// (`Europe/Berlin`, `UTC`). Default: the master's local time zone (`TZ`, else
    /// `/etc/localtime`), as in Buildbot.
    #[serde(default)]
    pub timezone: Option<String>,
    /// What to build when no change is pending: the tip of this branch of this repository.
    #[serde(default)]
    pub branch: Option<String>,
    /// The repository of what is built when no change is pending.
    #[serde(default)]
    pub repository: String,
    /// The project of what is built.
    #[serde(default)]
    pub project: String,
    /// The codebase of what is built.
    #[serde(default)]
    pub codebase: String,
    /// Build only if an important change arrived since the last build.
    #[serde(default, rename = "onlyIfChanged")]
    pub only_if_changed: bool,
    /// Which changes count for `onlyIfChanged`.
    #[serde(default)]
    pub change_filter: ChangeFilterConfig,
    /// Glob patterns of files that make a change important for `onlyIfChanged`; unset means every change is.
    #[serde(default, rename = "fileIsImportant")]
    pub file_is_important: Option<Vec<String>>,
    /// Priority of its build requests; higher builds first (default 0).
    #[serde(default)]
    pub priority: i64,
    /// Properties of the builds it starts.
    #[serde(default)]
    pub properties: BTreeMap<String, serde_json::Value>,
}

impl TimedSchedulerConfig {
    /// The change scheduler that classifies changes for `onlyIfChanged`.
    pub fn change_rules(&self) -> ChangeSchedulerConfig {
        ChangeSchedulerConfig {
            name: self.name.clone(),
            builder_names: self.builder_names.clone(),
            branch: None,
            change_filter: ChangeFilterConfig {
                branch: self.branch.clone().map(OneOrMany::One).or(self.change_filter.branch.clone()),
                ..self.change_filter.clone()
            },
            tree_stable_timer: None,
            file_is_important: self.file_is_important.clone(),
            priority: self.priority,
            properties: self.properties.clone(),
        }
    }

    /// The Nightly schedule; an error names the field (`minute`, `timezone`, …) and why.
    pub fn cron(&self) -> Result<crate::timed::Cron, (&'static str, String)> {
        use crate::timed::CronField;
        let star = CronField::Text("*".into());
        let zone = crate::timed::zone(self.timezone.as_deref()).map_err(|reason| ("timezone", reason))?;
        crate::timed::Cron::new(
            self.minute.as_ref().unwrap_or(&CronField::Number(0)),
            self.hour.as_ref().unwrap_or(&star),
            self.day_of_month.as_ref().unwrap_or(&star),
            self.month.as_ref().unwrap_or(&star),
            self.day_of_week.as_ref().unwrap_or(&star),
            zone,
        )
    }
}

/// A scheduler that builds changes.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeSchedulerConfig {
    /// Unique name of the scheduler.
    pub name: String,
    /// The builders it submits to (`builderNames`).
    #[serde(rename = "builderNames")]
    pub builder_names: Vec<String>,
    /// Only changes on this branch (shorthand for `change_filter: {branch: …}`).
    #[serde(default)]
    pub branch: Option<String>,
    /// Which changes the scheduler takes (Buildbot's ChangeFilter).
    #[serde(default)]
    pub change_filter: ChangeFilterConfig,
    /// Seconds the tree must be quiet before building all changes seen so far; unset builds each
    /// important change at once.
    #[serde(default, rename = "treeStableTimer")]
    pub tree_stable_timer: Option<f64>,
    /// Glob patterns of files that make a change important; unset means every change is.
    #[serde(default, rename = "fileIsImportant")]
    pub file_is_important: Option<Vec<String>>,
    /// Priority of its build requests; higher builds first (default 0).
    #[serde(default)]
    pub priority: i64,
    /// Properties of the builds it starts.
    #[serde(default)]
    pub properties: BTreeMap<String, serde_json::Value>,
}

/// Buildbot's ChangeFilter: for each of project, repository, branch, category and codebase, an
/// equality (one value or a list), its negation, a regular expression and its negation.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeFilterConfig {
    /// Take changes whose project equals one of these.
    pub project: Option<OneOrMany>,
    /// Take changes whose project equals none of these.
    pub project_not_eq: Option<OneOrMany>,
    /// Take changes whose project matches this regular expression.
    pub project_re: Option<String>,
    /// Take changes whose project does not match this regular expression.
    pub project_not_re: Option<String>,
    /// Take changes whose repository equals one of these.
    pub repository: Option<OneOrMany>,
    /// Take changes whose repository equals none of these.
    pub repository_not_eq: Option<OneOrMany>,
    /// Take changes whose repository matches this regular expression.
    pub repository_re: Option<String>,
    /// Take changes whose repository does not match this regular expression.
    pub repository_not_re: Option<String>,
    /// Take changes whose branch equals one of these.
    pub branch: Option<OneOrMany>,
    /// Take changes whose branch equals none of these.
    pub branch_not_eq: Option<OneOrMany>,
    /// Take changes whose branch matches this regular expression.
    pub branch_re: Option<String>,
    /// Take changes whose branch does not match this regular expression.
    pub branch_not_re: Option<String>,
    /// Take changes whose category equals one of these.
    pub category: Option<OneOrMany>,
    /// Take changes whose category equals none of these.
    pub category_not_eq: Option<OneOrMany>,
    /// Take changes whose category matches this regular expression.
    pub category_re: Option<String>,
    /// Take changes whose category does not match this regular expression.
    pub category_not_re: Option<String>,
    /// Take changes whose codebase equals one of these.
    pub codebase: Option<OneOrMany>,
    /// Take changes whose codebase equals none of these.
    pub codebase_not_eq: Option<OneOrMany>,
    /// Take changes whose codebase matches this regular expression.
    pub codebase_re: Option<String>,
    /// Take changes whose codebase does not match this regular expression.
    pub codebase_not_re: Option<String>,
}

/// One value or a list of them.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn values(&self) -> Vec<String> {
        match self {
            OneOrMany::One(v) => vec![v.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// Buildbot's ForceScheduler.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForceSchedulerConfig {
    /// Unique name of the scheduler.
    pub name: String,
    /// The builders it submits to (`builderNames`).
    #[serde(rename = "builderNames")]
    pub builder_names: Vec<String>,
    /// The force button's text in the UI.
    #[serde(default, rename = "buttonName")]
    pub button_name: Option<String>,
    /// The force form's title in the UI.
    #[serde(default)]
    pub label: Option<String>,
    /// Fixed properties of every forced build.
    #[serde(default)]
    pub properties: BTreeMap<String, serde_json::Value>,
    /// Typed fields a user fills in; each sets the property of its name.
    #[serde(default)]
    pub parameters: Vec<crate::force::ForceParameter>,
    /// Named codebases a force sets sources for, with `<codebase>_branch`, `_revision`,
    /// `_repository` and `_project` fields; the default codebase (`""`) uses the plain names.
    #[serde(default = "default_codebases")]
    pub codebases: Vec<String>,
}

pub(super) fn default_codebases() -> Vec<String> {
    vec![String::new()]
}

impl SchedulerConfig {
    pub fn name(&self) -> &str {
        match self {
            SchedulerConfig::SingleBranch(c) | SchedulerConfig::AnyBranch(c) => &c.name,
            SchedulerConfig::Force(f) => &f.name,
            SchedulerConfig::Periodic(t) | SchedulerConfig::Nightly(t) => &t.name,
            SchedulerConfig::Triggerable(t) => &t.name,
            SchedulerConfig::Dependent(d) => &d.name,
        }
    }

    pub fn builder_names(&self) -> &[String] {
        match self {
            SchedulerConfig::SingleBranch(c) | SchedulerConfig::AnyBranch(c) => &c.builder_names,
            SchedulerConfig::Force(f) => &f.builder_names,
            SchedulerConfig::Periodic(t) | SchedulerConfig::Nightly(t) => &t.builder_names,
            SchedulerConfig::Triggerable(t) => &t.builder_names,
            SchedulerConfig::Dependent(d) => &d.builder_names,
        }
    }
}

/// Each scheduler: a unique name, known builders, and what its kind needs.
pub(super) fn validate(schedulers: &[SchedulerConfig], builder_names: &BTreeSet<&str>) -> Result<(), (String, String)> {
    let mut scheduler_names = BTreeSet::new();
    for (i, scheduler) in schedulers.iter().enumerate() {
        if !scheduler_names.insert(scheduler.name()) {
            return Err((format!("schedulers[{i}].name"), format!("duplicate scheduler {:?}", scheduler.name())));
        }
        if scheduler.builder_names().is_empty() {
            return Err((format!("schedulers[{i}].builderNames"), "name at least one builder".into()));
        }
        for (j, builder) in scheduler.builder_names().iter().enumerate() {
            if !builder_names.contains(builder.as_str()) {
                return Err((format!("schedulers[{i}].builderNames[{j}]"), format!("unknown builder {builder:?}")));
            }
        }
        if let SchedulerConfig::Force(f) = scheduler {
            for (j, parameter) in f.parameters.iter().enumerate() {
                crate::force::check_definition(parameter)
                    .map_err(|reason| (format!("schedulers[{i}].parameters[{j}]"), reason))?;
            }
        }
        if let SchedulerConfig::Dependent(d) = scheduler
            && (d.upstream == d.name || !schedulers.iter().any(|s| s.name() == d.upstream))
        {
            return Err((format!("schedulers[{i}].upstream"), format!("no other scheduler named {:?}", d.upstream)));
        }
        match scheduler {
            SchedulerConfig::Periodic(t) => {
                let key = format!("schedulers[{i}].periodicBuildTimer");
                let seconds =
                    t.periodic_build_timer.ok_or_else(|| (key.clone(), "give the seconds between builds".into()))?;
                super::seconds(&key, seconds, 1.0)?;
                if t.timezone.is_some() {
                    return Err((
                        format!("schedulers[{i}].timezone"),
                        "a periodic scheduler counts seconds; only nightly schedules follow a time zone".into(),
                    ));
                }
            }
            SchedulerConfig::Nightly(t) => {
                let cron = t.cron().map_err(|(field, reason)| (format!("schedulers[{i}].{field}"), reason))?;
                if cron.next_after(0).is_none() && cron.next_after(crate::clock::system_now_ms()).is_none() {
                    return Err((format!("schedulers[{i}]"), "this schedule never fires".into()));
                }
            }
            _ => {}
        }
    }
    Ok(())
}
