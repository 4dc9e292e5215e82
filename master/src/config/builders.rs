//! Builders and their steps in the configuration, with the steps' flags and Buildbot's default names.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use super::{SchedulerConfig, sanitize_dir, yes};

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BuilderConfig {
    /// Unique name, shown in the UI and used by schedulers' `builderNames`.
    pub name: String,
    /// Shown in the UI.
    #[serde(default)]
    pub description: Option<String>,
    /// Labels for the UI and for pools' `labels`.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Workers that may run this builder; empty means any.
    #[serde(default)]
    pub workernames: Vec<String>,
    /// Directory of the builder on the worker, relative to its base directory.
    #[serde(default)]
    pub builddir: Option<String>,
    /// Properties every build of this builder starts with.
    #[serde(default)]
    pub properties: BTreeMap<String, serde_json::Value>,
    /// Overrides the global `collapseRequests`.
    #[serde(default, rename = "collapseRequests")]
    pub collapse_requests: Option<bool>,
    /// The steps, run in order.
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

/// A step is a mapping with one key, its kind.
impl schemars::JsonSchema for StepConfig {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "StepConfig".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let kind = |name: &str, description: &str, schema: schemars::Schema| {
            schemars::json_schema!({
                "type": "object",
                "properties": { name: { "description": description, "allOf": [schema] } },
                "required": [name],
                "additionalProperties": false,
            })
        };
        let variants = vec![
            kind(
                "git",
                "Buildbot's Git step: check out the build's revision.",
                generator.subschema_for::<GitStepConfig>(),
            ),
            kind("shell", "Buildbot's ShellCommand: run a command.", generator.subschema_for::<ShellStepConfig>()),
            kind(
                "set_property_from_command",
                "Buildbot's SetPropertyFromCommand: run a command and set a property from its output.",
                generator.subschema_for::<SetPropertyStepConfig>(),
            ),
            kind("trigger", "Buildbot's Trigger step.", generator.subschema_for::<TriggerStepConfig>()),
        ];
        schemars::json_schema!({
            "description": "One step, written as a mapping with one key, its kind: git, shell, set_property_from_command or trigger.",
            "oneOf": variants,
        })
    }
}

/// Flags every step takes, with Buildbot's names and defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepFlags {
    /// `haltOnFailure`.
    pub halt_on_failure: Option<bool>,
    /// `flunkOnFailure`.
    pub flunk_on_failure: Option<bool>,
    /// `warnOnFailure`.
    pub warn_on_failure: Option<bool>,
    /// `alwaysRun`.
    pub always_run: Option<bool>,
}

/// Declares the configuration of a kind of step with the flags every step takes as fields of its
/// own (not a flattened struct), so that a mistake in any key names that key's line and the keys
/// the step allows.
macro_rules! step_config {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$field_meta:meta])* pub $field:ident: $type:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($(#[$field_meta])* pub $field: $type,)*
            /// Stop the build when this step fails (Buildbot's default: source steps only).
            #[serde(default, rename = "haltOnFailure")]
            pub halt_on_failure: Option<bool>,
            /// A failure of this step fails the build (default: yes).
            #[serde(default, rename = "flunkOnFailure")]
            pub flunk_on_failure: Option<bool>,
            /// A failure of this step only warns (default: no).
            #[serde(default, rename = "warnOnFailure")]
            pub warn_on_failure: Option<bool>,
            /// Run this step even after an earlier one halted the build (default: no).
            #[serde(default, rename = "alwaysRun")]
            pub always_run: Option<bool>,
        }

        impl $name {
            /// The step's flags as configured.
            pub fn flags(&self) -> StepFlags {
                StepFlags {
                    halt_on_failure: self.halt_on_failure,
                    flunk_on_failure: self.flunk_on_failure,
                    warn_on_failure: self.warn_on_failure,
                    always_run: self.always_run,
                }
            }
        }
    };
}

/// A command line as Buildbot takes it: a list of arguments, or one string for the shell.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum CommandLine {
    Argv(Vec<String>),
    Script(String),
}

step_config! {
pub struct ShellStepConfig {
    /// The step's name; default `shell_<index>`.
    #[serde(default)]
    pub name: Option<String>,
    /// What to run: a list of arguments, or one string for `/bin/sh -c`; Interpolate-able.
    pub command: CommandLine,
    /// Environment variables for the command; values Interpolate-able.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Directory to run in, relative to the builder's directory (default `build`).
    #[serde(default)]
    pub workdir: Option<String>,
    /// Seconds without output before the command is killed (Buildbot's default 1200).
    #[serde(default)]
    pub timeout: Option<u32>,
    /// Seconds the command may run in all before it is killed.
    #[serde(default, rename = "maxTime")]
    pub max_time: Option<u32>,
    /// Write the command's environment at the head of its log (default: yes).
    #[serde(default, rename = "logEnviron")]
    pub log_environ: Option<bool>,
}
}

step_config! {
pub struct GitStepConfig {
    /// The step's name; default `git`.
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
    /// Directory of the checkout, relative to the builder's directory (default `build`).
    #[serde(default)]
    pub workdir: Option<String>,
    /// Seconds without progress before the checkout is abandoned.
    #[serde(default)]
    pub timeout: Option<u32>,
}
}

step_config! {
/// Buildbot's Trigger step: submits buildsets to triggerable schedulers.
pub struct TriggerStepConfig {
    /// The step's name; default `trigger`.
    #[serde(default)]
    pub name: Option<String>,
    /// The triggerable schedulers to submit to.
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
}
}

step_config! {
pub struct SetPropertyStepConfig {
    /// The step's name; default `set_property_<property>`.
    #[serde(default)]
    pub name: Option<String>,
    /// The property set from the command's output.
    pub property: String,
    /// What to run: a list of arguments, or one string for `/bin/sh -c`; Interpolate-able.
    pub command: CommandLine,
    /// Directory to run in, relative to the builder's directory (default `build`).
    #[serde(default)]
    pub workdir: Option<String>,
    /// Strip surrounding white space from the output (Buildbot's default: yes).
    #[serde(default = "yes")]
    pub strip: bool,
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

/// The key a step's kind is written under.
fn step_kind(step: &StepConfig) -> &'static str {
    match step {
        StepConfig::Git(_) => "git",
        StepConfig::Shell(_) => "shell",
        StepConfig::SetPropertyFromCommand(_) => "set_property_from_command",
        StepConfig::Trigger(_) => "trigger",
    }
}

/// Every text of a step rendered as an `Interpolate` template, with its key below the step.
fn templates(step: &StepConfig) -> Vec<(String, &str)> {
    let kind = step_kind(step);
    match step {
        StepConfig::Shell(s) => {
            let env = s.env.iter().map(|(k, v)| (format!("{kind}.env.{k}"), v.as_str()));
            command_templates(kind, &s.command)
                .into_iter()
                .chain(env)
                .chain(workdir_template(kind, &s.workdir))
                .collect()
        }
        StepConfig::SetPropertyFromCommand(s) => {
            command_templates(kind, &s.command).into_iter().chain(workdir_template(kind, &s.workdir)).collect()
        }
        StepConfig::Git(g) => g
            .repourl
            .iter()
            .map(|r| (format!("{kind}.repourl"), r.as_str()))
            .chain(workdir_template(kind, &g.workdir))
            .collect(),
        StepConfig::Trigger(t) => t
            .set_properties
            .iter()
            .filter_map(|(k, v)| v.as_str().map(|text| (format!("{kind}.set_properties.{k}"), text)))
            .collect(),
    }
}

fn command_templates<'a>(kind: &str, line: &'a CommandLine) -> Vec<(String, &'a str)> {
    match line {
        CommandLine::Argv(argv) => {
            argv.iter().enumerate().map(|(i, a)| (format!("{kind}.command[{i}]"), a.as_str())).collect()
        }
        CommandLine::Script(script) => vec![(format!("{kind}.command"), script.as_str())],
    }
}

fn workdir_template<'a>(kind: &str, workdir: &'a Option<String>) -> Option<(String, &'a str)> {
    workdir.as_deref().map(|w| (format!("{kind}.workdir"), w))
}

/// Each builder and its steps; returns the builders' names.
pub(super) fn validate<'a>(
    builders: &'a [BuilderConfig],
    schedulers: &[SchedulerConfig],
) -> Result<BTreeSet<&'a str>, (String, String)> {
    if builders.is_empty() {
        return Err(("builders".into(), "at least one builder is needed".into()));
    }
    let mut names = BTreeSet::new();
    for (i, builder) in builders.iter().enumerate() {
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
            validate_step(&key, step, schedulers)?;
            let name = step_name(step, j);
            if !step_names.insert(name.clone()) {
                return Err((format!("{key}.name"), format!("duplicate step name {name:?} in this builder")));
            }
        }
    }
    Ok(names)
}

/// One step at `key`: a command to run, schedulers to trigger that are Triggerable, a known git mode.
fn validate_step(key: &str, step: &StepConfig, schedulers: &[SchedulerConfig]) -> Result<(), (String, String)> {
    // A template that cannot render would fail every build at that step: say so now.
    for (place, template) in templates(step) {
        if let Err(error) = crate::properties::check_template(template) {
            return Err((format!("{key}.{place}"), error.to_string()));
        }
    }
    match step {
        StepConfig::Shell(ShellStepConfig { command, .. })
        | StepConfig::SetPropertyFromCommand(SetPropertyStepConfig { command, .. }) => {
            let empty = match command {
                CommandLine::Argv(argv) => argv.is_empty(),
                CommandLine::Script(script) => script.trim().is_empty(),
            };
            if empty {
                return Err((format!("{key}.{}.command", step_kind(step)), "must not be empty".into()));
            }
        }
        StepConfig::Trigger(trigger) => {
            if trigger.scheduler_names.is_empty() {
                return Err((format!("{key}.trigger.schedulerNames"), "name at least one scheduler".into()));
            }
            for (k, name) in trigger.scheduler_names.iter().enumerate() {
                let triggerable =
                    schedulers.iter().any(|s| matches!(s, SchedulerConfig::Triggerable(t) if &t.name == name));
                if !triggerable {
                    return Err((
                        format!("{key}.trigger.schedulerNames[{k}]"),
                        format!("{name:?} is not a triggerable scheduler"),
                    ));
                }
            }
        }
        StepConfig::Git(git) => {
            if let Some(mode) = &git.mode
                && mode != "incremental"
                && mode != "full"
            {
                return Err((format!("{key}.git.mode"), "must be incremental or full".into()));
            }
        }
    }
    Ok(())
}
