//! The master's configuration: one typed YAML document, validated at start-up. Every error names
//! the file, the key and the reason.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {reason}")]
pub struct ConfigError {
    pub file: String,
    /// Dotted path of the offending key, e.g. `builders[0].steps[1].shell.command`.
    pub key: String,
    pub reason: String,
}

/// The whole configuration of a master.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Shown in the UI and logs.
    #[serde(default = "default_title")]
    pub title: String,
    /// Database URL: `sqlite://PATH` (the embedded default) or `postgres://…`.
    pub database: String,
    /// Where the master keeps local state: the SQLite file, local workers' directories.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// A unique name for this master when several share one database. Defaults to host:data_dir.
    #[serde(default)]
    pub master_name: Option<String>,
    #[serde(default)]
    pub http: HttpConfig,
    pub workers: WorkersConfig,
    pub builders: Vec<BuilderConfig>,
    #[serde(default)]
    pub schedulers: Vec<SchedulerConfig>,
    #[serde(default)]
    pub change_hooks: ChangeHooksConfig,
    /// Change sources the master runs itself, such as git pollers.
    #[serde(default)]
    pub change_sources: Vec<ChangeSourceConfig>,
    /// Worker pools the master sizes from the queue.
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    /// Collapse compatible pending requests of a builder (Buildbot's default: on).
    #[serde(default = "yes", rename = "collapseRequests")]
    pub collapse_requests: bool,
    /// Seconds after a build finishes that its logs are deleted (Buildbot's `logHorizon`); the
    /// build and its steps stay. Unset keeps logs forever.
    #[serde(default, rename = "logHorizon")]
    pub log_horizon: Option<f64>,
    /// Bytes of a step's log kept from its start (Buildbot's `logMaxSize`); beyond it the rest
    /// is dropped but for the last `logMaxTailSize` bytes. Unset keeps everything.
    #[serde(default, rename = "logMaxSize")]
    pub log_max_size: Option<usize>,
    #[serde(default, rename = "logMaxTailSize")]
    pub log_max_tail_size: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the REST API, change hooks and metrics.
    #[serde(default = "default_http_listen")]
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes.
    #[serde(default = "default_body_limit")]
    pub max_body_bytes: usize,
    /// When set, control actions (JSON-RPC POSTs to `/api/v2`) need a bearer token or HTTP basic
    /// credentials. Reading the API and the change hooks (which have their own secrets) stay open.
    #[serde(default)]
    pub auth: Option<AuthConfig>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { listen: default_http_listen(), max_body_bytes: default_body_limit(), auth: None }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Bearer tokens, for scripts.
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    /// Users with passwords, for HTTP basic authentication.
    #[serde(default)]
    pub users: Vec<UserConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub username: String,
    #[serde(default)]
    pub password: Option<String>,
    /// The environment variable that holds the password.
    #[serde(default)]
    pub password_env: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersConfig {
    /// Address of the gRPC endpoint workers connect to.
    #[serde(default = "default_grpc_listen")]
    pub listen: SocketAddr,
    /// Tokens that admit a worker. A worker may register under any name with a valid token.
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    /// Seconds between heartbeats; a session silent for three is lost.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval: f64,
    /// Seconds a claimed build request stays leased without renewal before another master may
    /// take it back.
    #[serde(default = "default_lease")]
    pub lease_seconds: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// A label for the token, for logs.
    pub name: String,
    /// The token itself…
    #[serde(default)]
    pub value: Option<String>,
    /// …or the environment variable that holds it.
    #[serde(default)]
    pub value_env: Option<String>,
}

/// A set of identical workers serving some builders, sized from the queue.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Unique among pools; workers name their pool when they register (`--pool`).
    pub name: String,
    /// Who runs the workers.
    pub backend: BackendKind,
    /// Builders the pool serves, by name…
    #[serde(default)]
    pub builders: Vec<String>,
    /// …and by tag: builders carrying any of these tags. With neither, every builder.
    #[serde(default)]
    pub labels: Vec<String>,
    /// A fixed number of workers (the same as `min` = `max` = `count`).
    #[serde(default)]
    pub count: Option<u32>,
    /// Fewest workers kept (default 1).
    #[serde(default)]
    pub min: Option<u32>,
    /// Most workers at once (default 4).
    #[serde(default)]
    pub max: Option<u32>,
    /// Builds each worker runs at once.
    #[serde(default = "one")]
    pub builds_per_worker: u32,
    /// Idle workers kept ready beyond what the queue needs.
    #[serde(default)]
    pub warm: u32,
    /// Seconds the queue must need fewer workers before the pool shrinks.
    #[serde(default = "default_scale_down_delay")]
    pub scale_down_delay: f64,
    /// Settings of the `local` backend.
    #[serde(default)]
    pub local: LocalBackendConfig,
    /// Settings of the `kubernetes` backend (required with it).
    #[serde(default)]
    pub kubernetes: Option<KubernetesBackendConfig>,
}

/// Who starts and stops a pool's workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// `kiln-worker` processes the master starts on its own machine.
    Local,
    /// A Deployment whose replica count the master sets.
    Kubernetes,
    /// Workers managed elsewhere: the master only reports the size it would want.
    Static,
}

/// `kiln-worker` processes on the master's machine.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalBackendConfig {
    /// The `kiln-worker` binary; by default the one beside `kiln-master`.
    #[serde(default)]
    pub binary: Option<PathBuf>,
    /// Prefix of the workers' names (default: the pool's name): `local-1`, `local-2`, …
    #[serde(default)]
    pub name_prefix: Option<String>,
}

/// A Deployment of workers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesBackendConfig {
    /// The Deployment's namespace; by default the master's own (or the kubeconfig's).
    #[serde(default)]
    pub namespace: Option<String>,
    /// The Deployment's name.
    pub deployment: String,
}

impl PoolConfig {
    /// The pool's sizing rules.
    pub fn policy(&self) -> crate::scaling::Policy {
        let (min, max) = match self.count {
            Some(count) => (count, count),
            None => (self.min.unwrap_or(1), self.max.unwrap_or(4)),
        };
        crate::scaling::Policy {
            min,
            max,
            builds_per_worker: self.builds_per_worker.max(1),
            warm: self.warm,
            scale_down_delay: std::time::Duration::from_secs_f64(self.scale_down_delay.max(0.0)),
        }
    }

    /// Whether the pool serves a builder.
    pub fn serves(&self, builder: &BuilderConfig) -> bool {
        (self.builders.is_empty() && self.labels.is_empty())
            || self.builders.contains(&builder.name)
            || builder.tags.iter().any(|t| self.labels.contains(t))
    }

    /// Prefix of local workers' names.
    pub fn name_prefix(&self) -> &str {
        self.local.name_prefix.as_deref().unwrap_or(&self.name)
    }
}

fn default_scale_down_delay() -> f64 {
    60.0
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuilderConfig {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Workers that may run this builder; empty means any.
    #[serde(default)]
    pub workernames: Vec<String>,
    /// Directory of the builder on the worker, relative to its base directory.
    #[serde(default)]
    pub builddir: Option<String>,
    #[serde(default)]
    pub properties: BTreeMap<String, serde_json::Value>,
    /// Overrides the global `collapseRequests`.
    #[serde(default, rename = "collapseRequests")]
    pub collapse_requests: Option<bool>,
    pub steps: Vec<StepConfig>,
}

impl BuilderConfig {
    pub fn builddir(&self) -> String {
        self.builddir.clone().unwrap_or_else(|| sanitize_dir(&self.name))
    }
}

/// One step of a builder, written as a single-key map: `- shell: {...}`.
#[derive(Debug, Clone)]
pub enum StepConfig {
    Git(GitStepConfig),
    Shell(ShellStepConfig),
    SetPropertyFromCommand(SetPropertyStepConfig),
    Trigger(TriggerStepConfig),
}

impl<'de> Deserialize<'de> for StepConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StepVisitor;
        impl<'de> serde::de::Visitor<'de> for StepVisitor {
            type Value = StepConfig;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map with one key: git, shell or set_property_from_command")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<StepConfig, A::Error> {
                use serde::de::Error;
                let kind: String = map.next_key()?.ok_or_else(|| A::Error::custom("empty step: name its kind"))?;
                let step = match kind.as_str() {
                    "git" => StepConfig::Git(map.next_value()?),
                    "shell" => StepConfig::Shell(map.next_value()?),
                    "set_property_from_command" => StepConfig::SetPropertyFromCommand(map.next_value()?),
                    "trigger" => StepConfig::Trigger(map.next_value()?),
                    other => {
                        return Err(A::Error::unknown_variant(
                            other,
                            &["git", "shell", "set_property_from_command", "trigger"],
                        ));
                    }
                };
                if let Some(extra) = map.next_key::<String>()? {
                    return Err(A::Error::custom(format!("a step has exactly one kind; found also {extra:?}")));
                }
                Ok(step)
            }
        }
        deserializer.deserialize_map(StepVisitor)
    }
}

/// Flags every step takes, with Buildbot's names and defaults.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub struct StepFlags {
    #[serde(default, rename = "haltOnFailure")]
    pub halt_on_failure: Option<bool>,
    #[serde(default, rename = "flunkOnFailure")]
    pub flunk_on_failure: Option<bool>,
    #[serde(default, rename = "warnOnFailure")]
    pub warn_on_failure: Option<bool>,
    #[serde(default, rename = "alwaysRun")]
    pub always_run: Option<bool>,
}

/// A command line as Buildbot takes it: a list of arguments, or one string for the shell.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum CommandLine {
    Argv(Vec<String>),
    Script(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShellStepConfig {
    #[serde(default)]
    pub name: Option<String>,
    pub command: CommandLine,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub workdir: Option<String>,
    /// Seconds without output before the command is killed (Buildbot's default 1200).
    #[serde(default)]
    pub timeout: Option<u32>,
    #[serde(default, rename = "maxTime")]
    pub max_time: Option<u32>,
    #[serde(default, rename = "logEnviron")]
    pub log_environ: Option<bool>,
    #[serde(flatten)]
    pub flags: StepFlags,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitStepConfig {
    #[serde(default)]
    pub name: Option<String>,
    /// Repository URL; defaults to the source stamp's repository.
    #[serde(default)]
    pub repourl: Option<String>,
    /// Branch to build when the source stamp names none.
    #[serde(default)]
    pub branch: Option<String>,
    /// `incremental` (default) or `full`.
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub timeout: Option<u32>,
    #[serde(flatten)]
    pub flags: StepFlags,
}

/// Buildbot's Trigger step: submits buildsets to triggerable schedulers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerStepConfig {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(rename = "schedulerNames")]
    pub scheduler_names: Vec<String>,
    /// Wait for the triggered builds; the step then takes their worst result.
    #[serde(default, rename = "waitForFinish")]
    pub wait_for_finish: bool,
    /// Build the revision this build checked out (`got_revision`), not the one it was asked for.
    #[serde(default = "yes", rename = "updateSourceStamp")]
    pub update_source_stamp: bool,
    /// Build the latest sources instead of this build's.
    #[serde(default, rename = "alwaysUseLatest")]
    pub always_use_latest: bool,
    /// Properties to set, rendered with this build's properties.
    #[serde(default)]
    pub set_properties: BTreeMap<String, serde_json::Value>,
    /// This build's properties to pass on.
    #[serde(default)]
    pub copy_properties: Vec<String>,
    #[serde(flatten)]
    pub flags: StepFlags,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetPropertyStepConfig {
    #[serde(default)]
    pub name: Option<String>,
    pub property: String,
    pub command: CommandLine,
    #[serde(default)]
    pub workdir: Option<String>,
    /// Strip surrounding white space from the output (Buildbot's default: yes).
    #[serde(default = "yes")]
    pub strip: bool,
    #[serde(flatten)]
    pub flags: StepFlags,
}

#[derive(Debug, Clone, Deserialize)]
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
    /// Buildbot's Nightly scheduler: builds at the times its cron fields name (UTC).
    Nightly(TimedSchedulerConfig),
}

/// A scheduler that follows another's successful buildsets.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DependentSchedulerConfig {
    pub name: String,
    /// The scheduler whose buildsets this one follows.
    pub upstream: String,
    #[serde(rename = "builderNames")]
    pub builder_names: Vec<String>,
    #[serde(default)]
    pub priority: i64,
    #[serde(default)]
    pub properties: BTreeMap<String, serde_json::Value>,
}

/// A scheduler that `trigger` steps submit to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerableSchedulerConfig {
    pub name: String,
    #[serde(rename = "builderNames")]
    pub builder_names: Vec<String>,
    #[serde(default)]
    pub priority: i64,
    #[serde(default)]
    pub properties: BTreeMap<String, serde_json::Value>,
}

/// A Periodic or Nightly scheduler.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimedSchedulerConfig {
    pub name: String,
    #[serde(rename = "builderNames")]
    pub builder_names: Vec<String>,
    /// Periodic: seconds between builds.
    #[serde(default, rename = "periodicBuildTimer")]
    pub periodic_build_timer: Option<f64>,
    /// Nightly: Buildbot's cron fields (minute defaults to 0, the others to `*`; dayOfWeek 0 is
    /// Monday).
    #[serde(default)]
    pub minute: Option<crate::timed::CronField>,
    #[serde(default)]
    pub hour: Option<crate::timed::CronField>,
    #[serde(default, rename = "dayOfMonth")]
    pub day_of_month: Option<crate::timed::CronField>,
    #[serde(default)]
    pub month: Option<crate::timed::CronField>,
    #[serde(default, rename = "dayOfWeek")]
    pub day_of_week: Option<crate::timed::CronField>,
    /// What to build when no change is pending: the tip of this branch of this repository.
    #[serde(default)]
    pub branch: Option<String>,
    #[serde(default)]
    pub repository: String,
    #[serde(default)]
    pub project: String,
    #[serde(default)]
    pub codebase: String,
    /// Build only if an important change arrived since the last build.
    #[serde(default, rename = "onlyIfChanged")]
    pub only_if_changed: bool,
    /// Which changes count for `onlyIfChanged`.
    #[serde(default)]
    pub change_filter: ChangeFilterConfig,
    #[serde(default, rename = "fileIsImportant")]
    pub file_is_important: Option<Vec<String>>,
    #[serde(default)]
    pub priority: i64,
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

    /// The Nightly schedule.
    pub fn cron(&self) -> Result<crate::timed::Cron, String> {
        use crate::timed::CronField;
        let star = CronField::Text("*".into());
        crate::timed::Cron::new(
            self.minute.as_ref().unwrap_or(&CronField::Number(0)),
            self.hour.as_ref().unwrap_or(&star),
            self.day_of_month.as_ref().unwrap_or(&star),
            self.month.as_ref().unwrap_or(&star),
            self.day_of_week.as_ref().unwrap_or(&star),
        )
    }
}

/// A scheduler that builds changes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeSchedulerConfig {
    pub name: String,
    #[serde(rename = "builderNames")]
    pub builder_names: Vec<String>,
    /// Only changes on this branch (shorthand for `change_filter: {branch: …}`).
    #[serde(default)]
    pub branch: Option<String>,
    #[serde(default)]
    pub change_filter: ChangeFilterConfig,
    /// Seconds the tree must be quiet before building all changes seen so far; unset builds each
    /// important change at once.
    #[serde(default, rename = "treeStableTimer")]
    pub tree_stable_timer: Option<f64>,
    /// Glob patterns of files that make a change important; unset means every change is.
    #[serde(default, rename = "fileIsImportant")]
    pub file_is_important: Option<Vec<String>>,
    #[serde(default)]
    pub priority: i64,
    #[serde(default)]
    pub properties: BTreeMap<String, serde_json::Value>,
}

/// Buildbot's ChangeFilter: for each of project, repository, branch, category and codebase, an
/// equality (one value or a list), its negation, a regular expression and its negation.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeFilterConfig {
    pub project: Option<OneOrMany>,
    pub project_not_eq: Option<OneOrMany>,
    pub project_re: Option<String>,
    pub project_not_re: Option<String>,
    pub repository: Option<OneOrMany>,
    pub repository_not_eq: Option<OneOrMany>,
    pub repository_re: Option<String>,
    pub repository_not_re: Option<String>,
    pub branch: Option<OneOrMany>,
    pub branch_not_eq: Option<OneOrMany>,
    pub branch_re: Option<String>,
    pub branch_not_re: Option<String>,
    pub category: Option<OneOrMany>,
    pub category_not_eq: Option<OneOrMany>,
    pub category_re: Option<String>,
    pub category_not_re: Option<String>,
    pub codebase: Option<OneOrMany>,
    pub codebase_not_eq: Option<OneOrMany>,
    pub codebase_re: Option<String>,
    pub codebase_not_re: Option<String>,
}

/// One value or a list of them.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
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
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForceSchedulerConfig {
    pub name: String,
    #[serde(rename = "builderNames")]
    pub builder_names: Vec<String>,
    #[serde(default, rename = "buttonName")]
    pub button_name: Option<String>,
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

fn default_codebases() -> Vec<String> {
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

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ChangeSourceConfig {
    /// Buildbot's GitPoller: fetches a repository every `pollInterval` seconds and reports new
    /// commits as changes.
    GitPoller(GitPollerConfig),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitPollerConfig {
    /// Names the poller for `/change_hook/poller?poller=…`; defaults to the URL.
    #[serde(default)]
    pub name: Option<String>,
    /// URL or local path of the repository.
    pub repourl: String,
    /// Branches to follow: a list, or `all`. Default: `[main]`.
    #[serde(default)]
    pub branches: Option<PolledBranches>,
    /// Seconds between polls (Buildbot's default: 600).
    #[serde(default = "default_poll_interval", rename = "pollInterval")]
    pub poll_interval: f64,
    #[serde(default)]
    pub category: Option<String>,
    #[serde(default)]
    pub project: String,
    #[serde(default)]
    pub codebase: String,
}

impl GitPollerConfig {
    pub fn name(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.repourl.clone())
    }
}

/// Branches a poller follows.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum PolledBranches {
    /// The word `all`: every branch.
    All(String),
    List(Vec<String>),
}

fn default_poll_interval() -> f64 {
    600.0
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeHooksConfig {
    /// Enables `/change_hook/base`.
    #[serde(default = "yes")]
    pub base: bool,
    /// Enables `/change_hook/github`.
    #[serde(default)]
    pub github: Option<GithubHookConfig>,
    /// Enables `/change_hook/gitlab`.
    #[serde(default)]
    pub gitlab: Option<GitlabHookConfig>,
    /// Enables `/change_hook/poller`, which makes named git pollers poll at once.
    #[serde(default = "yes")]
    pub poller: bool,
}

impl Default for ChangeHooksConfig {
    fn default() -> Self {
        Self { base: true, github: None, gitlab: None, poller: true }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GithubHookConfig {
    /// The webhook's secret. When set, every delivery must carry a valid signature.
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Regular expressions; a push whose head commit message matches one is not built.
    /// Default: Buildbot's `[ci skip]` and `[skip ci]`.
    #[serde(default)]
    pub skips: Option<Vec<String>>,
    #[serde(default)]
    pub codebase: String,
    /// `merge` (default) or `head`: the `refs/pull/<n>/…` ref a pull request builds.
    #[serde(default = "default_pullrequest_ref")]
    pub pullrequest_ref: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitlabHookConfig {
    /// Compared with `X-Gitlab-Token`. When set, every delivery must carry it.
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub secret_env: Option<String>,
}

fn default_pullrequest_ref() -> String {
    "merge".to_owned()
}

/// A secret given literally or by environment variable; `None` when neither is set.
fn secret_value(literal: &Option<String>, env: &Option<String>) -> Option<String> {
    literal.clone().or_else(|| env.as_ref().and_then(|v| std::env::var(v).ok())).filter(|s| !s.is_empty())
}

impl GithubHookConfig {
    pub fn secret(&self) -> Option<String> {
        secret_value(&self.secret, &self.secret_env)
    }
}

impl GitlabHookConfig {
    pub fn secret(&self) -> Option<String> {
        secret_value(&self.secret, &self.secret_env)
    }
}

fn yes() -> bool {
    true
}
fn one() -> u32 {
    1
}
fn default_title() -> String {
    "Kiln".to_owned()
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("kiln-data")
}
fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8010))
}
fn default_grpc_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9989))
}
fn default_body_limit() -> usize {
    1 << 20
}
/// How long a worker's commands may outlive its session (see `kiln.proto`): four heartbeats
/// (at least three seconds) and one second more.
pub fn orphan_deadline(heartbeat: Duration) -> Duration {
    (heartbeat * 4).max(Duration::from_secs(3)) + Duration::from_secs(1)
}

fn default_heartbeat() -> f64 {
    5.0
}
fn default_lease() -> u64 {
    60
}

impl TokenConfig {
    /// The token's value, from the file or the environment.
    pub fn resolve(&self) -> Option<String> {
        self.value.clone().or_else(|| self.value_env.as_ref().and_then(|v| std::env::var(v).ok()))
    }
}

/// Checks that exactly one of a literal secret and an environment variable naming it is given,
/// and that the variable is set.
fn resolve_secret(
    key: &str,
    (literal_key, literal): (&str, &Option<String>),
    (env_key, env): (&str, &Option<String>),
) -> Result<(), (String, String)> {
    match (literal, env) {
        (Some(v), None) if v.is_empty() => Err((format!("{key}.{literal_key}"), "must not be empty".into())),
        (Some(_), None) => Ok(()),
        (None, Some(var)) => match std::env::var(var) {
            Ok(v) if !v.is_empty() => Ok(()),
            _ => Err((format!("{key}.{env_key}"), format!("environment variable {var} is not set or empty"))),
        },
        _ => Err((key.to_owned(), format!("give exactly one of {literal_key} and {env_key}"))),
    }
}

fn validate_pool(key: &str, pool: &PoolConfig, builders: &[BuilderConfig]) -> Result<(), (String, String)> {
    let valid_name = |n: &str| {
        !n.is_empty() && n.len() <= 63 && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if !valid_name(&pool.name) {
        return Err((format!("{key}.name"), "must be 1 to 63 letters, digits, '-' or '_'".into()));
    }
    if pool.count.is_some() && (pool.min.is_some() || pool.max.is_some()) {
        return Err((key.to_owned(), "give count, or min and max, not both".into()));
    }
    let policy = pool.policy();
    if policy.max == 0 || pool.builds_per_worker == 0 {
        return Err((key.to_owned(), "max (or count) and builds_per_worker must be at least 1".into()));
    }
    if policy.min > policy.max {
        return Err((format!("{key}.min"), format!("min {} is above max {}", policy.min, policy.max)));
    }
    if !(pool.scale_down_delay.is_finite() && pool.scale_down_delay >= 0.0) {
        return Err((format!("{key}.scale_down_delay"), "must be a number of seconds".into()));
    }
    for (i, name) in pool.builders.iter().enumerate() {
        if !builders.iter().any(|b| &b.name == name) {
            return Err((format!("{key}.builders[{i}]"), format!("no builder is named {name:?}")));
        }
    }
    if !builders.iter().any(|b| pool.serves(b)) {
        return Err((key.to_owned(), "serves no builder: no builder has one of its names or labels".into()));
    }
    match (pool.backend, &pool.kubernetes) {
        (BackendKind::Kubernetes, None) => {
            return Err((format!("{key}.kubernetes"), "the kubernetes backend needs the deployment to scale".into()));
        }
        (BackendKind::Kubernetes, Some(k)) if k.deployment.is_empty() => {
            return Err((format!("{key}.kubernetes.deployment"), "must not be empty".into()));
        }
        (BackendKind::Local | BackendKind::Static, Some(_)) => {
            return Err((format!("{key}.kubernetes"), "only for the kubernetes backend".into()));
        }
        _ => {}
    }
    if pool.backend != BackendKind::Local && (pool.local.binary.is_some() || pool.local.name_prefix.is_some()) {
        return Err((format!("{key}.local"), "only for the local backend".into()));
    }
    Ok(())
}

/// Makes a name safe as one directory component.
pub fn sanitize_dir(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' }).collect()
}

impl Config {
    /// Reads, parses and validates a configuration file. Relative paths in it are taken relative
    /// to the current directory, like Buildbot's basedir.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError {
            file: file.clone(),
            key: "(file)".to_owned(),
            reason: error.to_string(),
        })?;
        Self::parse(&file, &text)
    }

    /// Replaces the database URL (from `--database` or `KILN_DATABASE_URL`) and validates again.
    pub fn with_database(mut self, file: &str, url: String) -> Result<Config, ConfigError> {
        self.database = url;
        self.validate().map_err(|(key, reason)| ConfigError { file: file.to_owned(), key, reason })?;
        Ok(self)
    }

    /// Parses and validates configuration text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
        let error = |key: String, reason: String| ConfigError { file: file.to_owned(), key, reason };
        let deserializer = serde_yaml_ng::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { "(document)".to_owned() } else { key };
            // serde_yaml's message carries a position; keep it, it helps find the line.
            error(key, e.into_inner().to_string())
        })?;
        config.validate().map_err(|(key, reason)| error(key, reason))?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let db = &self.database;
        if !(db.starts_with("sqlite:") || db.starts_with("postgres://") || db.starts_with("postgresql://")) {
            return Err((
                "database".into(),
                format!("unsupported database URL {db:?}: use sqlite://PATH or postgres://…"),
            ));
        }
        if self.workers.heartbeat_interval <= 0.0 || !self.workers.heartbeat_interval.is_finite() {
            return Err(("workers.heartbeat_interval".into(), "must be a positive number of seconds".into()));
        }
        if let Some(horizon) = self.log_horizon
            && !(horizon.is_finite() && horizon > 0.0)
        {
            return Err(("logHorizon".into(), "must be a positive number of seconds".into()));
        }
        if self.log_max_size == Some(0) {
            return Err(("logMaxSize".into(), "must be a positive number of bytes".into()));
        }
        if self.log_max_tail_size.is_some() && self.log_max_size.is_none() {
            return Err(("logMaxTailSize".into(), "only applies with logMaxSize".into()));
        }
        if self.workers.lease_seconds < 5 {
            return Err(("workers.lease_seconds".into(), "must be at least 5 seconds".into()));
        }
        // A lease must outlast the time a worker's commands may outlive their master (four
        // heartbeats and a second), or another master could re-run a build still running.
        let orphan_seconds = orphan_deadline(Duration::from_secs_f64(self.workers.heartbeat_interval)).as_secs_f64();
        if (self.workers.lease_seconds as f64) <= orphan_seconds {
            return Err((
                "workers.lease_seconds".into(),
                format!(
                    "must be longer than {orphan_seconds} s (4 × workers.heartbeat_interval, at least 3 s, plus \
                     1 s): a worker's commands may outlive a lost master that long"
                ),
            ));
        }
        for (i, token) in self.workers.tokens.iter().enumerate() {
            resolve_secret(&format!("workers.tokens[{i}]"), ("value", &token.value), ("value_env", &token.value_env))?;
        }
        if let Some(auth) = &self.http.auth {
            if auth.tokens.is_empty() && auth.users.is_empty() {
                return Err(("http.auth".into(), "give at least one token or user, or remove the key".into()));
            }
            for (i, token) in auth.tokens.iter().enumerate() {
                resolve_secret(
                    &format!("http.auth.tokens[{i}]"),
                    ("value", &token.value),
                    ("value_env", &token.value_env),
                )?;
            }
            for (i, user) in auth.users.iter().enumerate() {
                if user.username.is_empty() || user.username.contains(':') {
                    return Err((format!("http.auth.users[{i}].username"), "must be non-empty and without ':'".into()));
                }
                resolve_secret(
                    &format!("http.auth.users[{i}]"),
                    ("password", &user.password),
                    ("password_env", &user.password_env),
                )?;
            }
        }
        if let Some(github) = &self.change_hooks.github {
            if github.secret.is_some() || github.secret_env.is_some() {
                resolve_secret("change_hooks.github", ("secret", &github.secret), ("secret_env", &github.secret_env))?;
            }
            for (i, pattern) in github.skips.iter().flatten().enumerate() {
                regex::Regex::new(pattern).map_err(|e| (format!("change_hooks.github.skips[{i}]"), e.to_string()))?;
            }
            if github.pullrequest_ref != "merge" && github.pullrequest_ref != "head" {
                return Err(("change_hooks.github.pullrequest_ref".into(), "must be merge or head".into()));
            }
        }
        if let Some(gitlab) = &self.change_hooks.gitlab
            && (gitlab.secret.is_some() || gitlab.secret_env.is_some())
        {
            resolve_secret("change_hooks.gitlab", ("secret", &gitlab.secret), ("secret_env", &gitlab.secret_env))?;
        }
        let mut poller_names = BTreeSet::new();
        for (i, source) in self.change_sources.iter().enumerate() {
            let ChangeSourceConfig::GitPoller(poller) = source;
            if poller.repourl.is_empty() {
                return Err((format!("change_sources[{i}].repourl"), "must not be empty".into()));
            }
            if !(poller.poll_interval.is_finite() && poller.poll_interval >= 0.1) {
                return Err((format!("change_sources[{i}].pollInterval"), "must be at least 0.1 seconds".into()));
            }
            if let Some(PolledBranches::All(word)) = &poller.branches
                && word != "all"
            {
                return Err((
                    format!("change_sources[{i}].branches"),
                    "give a list of branches or the word all".into(),
                ));
            }
            if !poller_names.insert(poller.name()) {
                return Err((format!("change_sources[{i}].name"), format!("duplicate poller {:?}", poller.name())));
            }
        }
        let mut pool_names = BTreeSet::new();
        for (i, pool) in self.pools.iter().enumerate() {
            let key = format!("pools[{i}]");
            validate_pool(&key, pool, &self.builders)?;
            if !pool_names.insert(pool.name.as_str()) {
                return Err((format!("{key}.name"), format!("another pool is named {:?}", pool.name)));
            }
        }
        if self.builders.is_empty() {
            return Err(("builders".into(), "at least one builder is needed".into()));
        }
        let mut names = BTreeSet::new();
        for (i, builder) in self.builders.iter().enumerate() {
            if builder.name.is_empty() || builder.name.len() > 100 {
                return Err((format!("builders[{i}].name"), "must be 1 to 100 characters".into()));
            }
            if !names.insert(builder.name.as_str()) {
                return Err((format!("builders[{i}].name"), format!("duplicate builder {:?}", builder.name)));
            }
            if builder.steps.is_empty() {
                return Err((format!("builders[{i}].steps"), "a builder needs at least one step".into()));
            }
            let mut step_names = BTreeSet::new();
            for (j, step) in builder.steps.iter().enumerate() {
                let key = format!("builders[{i}].steps[{j}]");
                if let StepConfig::Shell(ShellStepConfig { command, .. })
                | StepConfig::SetPropertyFromCommand(SetPropertyStepConfig { command, .. }) = step
                {
                    match command {
                        CommandLine::Argv(argv) if argv.is_empty() => {
                            return Err((format!("{key}.command"), "must not be empty".into()));
                        }
                        CommandLine::Script(s) if s.trim().is_empty() => {
                            return Err((format!("{key}.command"), "must not be empty".into()));
                        }
                        _ => {}
                    }
                }
                if let StepConfig::Trigger(trigger) = step {
                    if trigger.scheduler_names.is_empty() {
                        return Err((format!("{key}.trigger.schedulerNames"), "name at least one scheduler".into()));
                    }
                    for (k, name) in trigger.scheduler_names.iter().enumerate() {
                        let triggerable = self
                            .schedulers
                            .iter()
                            .any(|s| matches!(s, SchedulerConfig::Triggerable(t) if &t.name == name));
                        if !triggerable {
                            return Err((
                                format!("{key}.trigger.schedulerNames[{k}]"),
                                format!("{name:?} is not a triggerable scheduler"),
                            ));
                        }
                    }
                }
                if let StepConfig::Git(git) = step
                    && let Some(mode) = &git.mode
                    && mode != "incremental"
                    && mode != "full"
                {
                    return Err((format!("{key}.git.mode"), "must be incremental or full".into()));
                }
                let name = step_name(step, j);
                if !step_names.insert(name.clone()) {
                    return Err((format!("{key}.name"), format!("duplicate step name {name:?} in this builder")));
                }
            }
        }
        let mut scheduler_names = BTreeSet::new();
        for (i, scheduler) in self.schedulers.iter().enumerate() {
            if !scheduler_names.insert(scheduler.name()) {
                return Err((format!("schedulers[{i}].name"), format!("duplicate scheduler {:?}", scheduler.name())));
            }
            if scheduler.builder_names().is_empty() {
                return Err((format!("schedulers[{i}].builderNames"), "name at least one builder".into()));
            }
            for (j, builder) in scheduler.builder_names().iter().enumerate() {
                if !names.contains(builder.as_str()) {
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
                && (d.upstream == d.name || !self.schedulers.iter().any(|s| s.name() == d.upstream))
            {
                return Err((
                    format!("schedulers[{i}].upstream"),
                    format!("no other scheduler named {:?}", d.upstream),
                ));
            }
            match scheduler {
                SchedulerConfig::Periodic(t) => match t.periodic_build_timer {
                    Some(seconds) if seconds.is_finite() && seconds >= 1.0 => {}
                    _ => {
                        return Err((
                            format!("schedulers[{i}].periodicBuildTimer"),
                            "give the seconds between builds, at least 1".into(),
                        ));
                    }
                },
                SchedulerConfig::Nightly(t) => {
                    let cron = t.cron().map_err(|reason| (format!("schedulers[{i}]"), reason))?;
                    if cron.next_after(0).is_none() && cron.next_after(crate::clock::system_now_ms()).is_none() {
                        return Err((format!("schedulers[{i}]"), "this schedule never fires".into()));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The worker tokens in effect, resolved from the environment where asked.
    pub fn worker_tokens(&self) -> Vec<String> {
        self.workers.tokens.iter().filter_map(TokenConfig::resolve).collect()
    }

    /// Credentials that admit control actions: bearer tokens, and `user:password` pairs for basic
    /// authentication. `None` when control actions are open.
    pub fn control_credentials(&self) -> Option<(Vec<String>, Vec<String>)> {
        let auth = self.http.auth.as_ref()?;
        let tokens = auth.tokens.iter().filter_map(TokenConfig::resolve).collect();
        let users = auth
            .users
            .iter()
            .filter_map(|u| {
                let password =
                    u.password.clone().or_else(|| u.password_env.as_ref().and_then(|v| std::env::var(v).ok()))?;
                Some(format!("{}:{password}", u.username))
            })
            .collect();
        Some((tokens, users))
    }

    pub fn builder(&self, name: &str) -> Option<&BuilderConfig> {
        self.builders.iter().find(|b| b.name == name)
    }
}

/// The name a step shows: its configured name, or Buildbot's default for its kind.
pub fn step_name(step: &StepConfig, index: usize) -> String {
    let (configured, default) = match step {
        StepConfig::Git(s) => (&s.name, "git".to_owned()),
        StepConfig::Shell(s) => (&s.name, format!("shell_{index}")),
        StepConfig::SetPropertyFromCommand(s) => (&s.name, format!("set_property_{}", s.property)),
        StepConfig::Trigger(s) => (&s.name, "trigger".to_owned()),
    };
    configured.clone().unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
database: sqlite://kiln.sqlite
workers:
  tokens: [{name: t, value: secret}]
builders:
  - name: b
    steps:
      - shell: {command: [echo, hi], haltOnFailure: true}
      - git: {repourl: /tmp/repo}
      - set_property_from_command: {property: v, command: "echo 1"}
schedulers:
  - {type: force, name: force, builderNames: [b]}
  - {type: single_branch, name: main, branch: main, builderNames: [b]}
"#;

    #[test]
    fn a_minimal_config_parses_with_buildbot_defaults() {
        let config = Config::parse("mem.yaml", MINIMAL).unwrap();
        assert_eq!(config.http.listen.port(), 8010);
        assert_eq!(config.workers.listen.port(), 9989);
        assert!(config.collapse_requests);
        let StepConfig::Shell(shell) = &config.builders[0].steps[0] else { panic!("not a shell step") };
        assert_eq!(shell.flags.halt_on_failure, Some(true));
        assert_eq!(config.worker_tokens(), vec!["secret".to_owned()]);
    }

    #[test]
    fn an_unknown_key_is_named_with_its_path() {
        let text = MINIMAL.replace("haltOnFailure", "haltOnFailur");
        let error = Config::parse("mem.yaml", &text).unwrap_err();
        assert_eq!(error.file, "mem.yaml");
        assert!(error.key.starts_with("builders[0].steps[0]"), "{error}");
        assert!(error.reason.contains("haltOnFailur"), "{error}");
    }

    #[test]
    fn a_scheduler_naming_an_unknown_builder_is_refused() {
        let text = MINIMAL.replace("builderNames: [b]}\n  - {type: single", "builderNames: [nope]}\n  - {type: single");
        let error = Config::parse("mem.yaml", &text).unwrap_err();
        assert_eq!(error.key, "schedulers[0].builderNames[0]");
        assert!(error.reason.contains("nope"));
    }

    #[test]
    fn a_wrong_type_names_the_key() {
        let text = MINIMAL.replace("database: sqlite://kiln.sqlite", "database: [1]");
        let error = Config::parse("mem.yaml", &text).unwrap_err();
        assert_eq!(error.key, "database");
    }

    #[test]
    fn log_limits_are_checked() {
        let table = [
            ("logHorizon: 0", Some("logHorizon")),
            ("logHorizon: 86400", None),
            ("logMaxSize: 0", Some("logMaxSize")),
            ("logMaxTailSize: 100", Some("logMaxTailSize")),
            ("logMaxSize: 1000000\nlogMaxTailSize: 100000", None),
        ];
        for (line, key) in table {
            let result = Config::parse("mem.yaml", &format!("{line}\n{MINIMAL}"));
            assert_eq!(result.as_ref().err().map(|e| e.key.as_str()), key, "{line}");
        }
    }

    #[test]
    fn an_unsupported_database_is_refused() {
        let text = MINIMAL.replace("sqlite://kiln.sqlite", "mysql://x");
        let error = Config::parse("mem.yaml", &text).unwrap_err();
        assert_eq!(error.key, "database");
    }
}
