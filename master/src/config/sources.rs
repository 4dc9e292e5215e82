//! Where changes come from in the configuration: git pollers and the change hooks.

use std::collections::BTreeSet;

use serde::Deserialize;

use super::{resolve_secret, yes};

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ChangeSourceConfig {
    /// Buildbot's GitPoller: fetches a repository every `pollInterval` seconds and reports new
    /// commits as changes.
    GitPoller(GitPollerConfig),
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
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
    /// The category of the changes it reports.
    #[serde(default)]
    pub category: Option<String>,
    /// The project of the changes it reports.
    #[serde(default)]
    pub project: String,
    /// The codebase of the changes it reports.
    #[serde(default)]
    pub codebase: String,
}

impl GitPollerConfig {
    pub fn name(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.repourl.clone())
    }
}

/// Branches a poller follows.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(untagged)]
pub enum PolledBranches {
    /// The word `all`: every branch.
    All(String),
    List(Vec<String>),
}

pub(super) fn default_poll_interval() -> f64 {
    600.0
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
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
    /// Largest webhook body accepted on the change-hook routes, in bytes. The default is
    /// GitHub's own cap on a delivery (25 MB), so no push GitHub sends is refused; the rest of
    /// the API keeps `http.max_body_bytes`.
    #[serde(default = "default_hook_body_limit")]
    pub max_body_bytes: usize,
}

impl Default for ChangeHooksConfig {
    fn default() -> Self {
        Self { base: true, github: None, gitlab: None, poller: true, max_body_bytes: default_hook_body_limit() }
    }
}

pub(super) fn default_hook_body_limit() -> usize {
    25 << 20
}

#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GithubHookConfig {
    /// The webhook's secret. When set, every delivery must carry a valid signature.
    #[serde(default)]
    pub secret: Option<String>,
    /// …or the environment variable that holds it.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Regular expressions; a push whose head commit message matches one is not built.
    /// Default: Buildbot's `[ci skip]` and `[skip ci]`.
    #[serde(default)]
    pub skips: Option<Vec<String>>,
    /// The codebase of the changes it reports.
    #[serde(default)]
    pub codebase: String,
    /// `merge` (default) or `head`: the `refs/pull/<n>/…` ref a pull request builds.
    #[serde(default = "default_pullrequest_ref")]
    pub pullrequest_ref: String,
}

#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GitlabHookConfig {
    /// Compared with `X-Gitlab-Token`. When set, every delivery must carry it.
    #[serde(default)]
    pub secret: Option<String>,
    /// …or the environment variable that holds it.
    #[serde(default)]
    pub secret_env: Option<String>,
}

pub(super) fn default_pullrequest_ref() -> String {
    "merge".to_owned()
}

/// A secret given literally or by environment variable; `None` when neither is set.
pub(super) fn secret_value(literal: &Option<String>, env: &Option<String>) -> Option<String> {
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

/// The change hooks' secrets and patterns, and the pollers' repositories, intervals and names.
pub(super) fn validate(hooks: &ChangeHooksConfig, sources: &[ChangeSourceConfig]) -> Result<(), (String, String)> {
    if let Some(github) = &hooks.github {
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
    if let Some(gitlab) = &hooks.gitlab
        && (gitlab.secret.is_some() || gitlab.secret_env.is_some())
    {
        resolve_secret("change_hooks.gitlab", ("secret", &gitlab.secret), ("secret_env", &gitlab.secret_env))?;
    }
    let mut poller_names = BTreeSet::new();
    for (i, source) in sources.iter().enumerate() {
        let ChangeSourceConfig::GitPoller(poller) = source;
        if poller.repourl.is_empty() {
            return Err((format!("change_sources[{i}].repourl"), "must not be empty".into()));
        }
        super::seconds(&format!("change_sources[{i}].pollInterval"), poller.poll_interval, 0.1)?;
        if let Some(PolledBranches::All(word)) = &poller.branches
            && word != "all"
        {
            return Err((format!("change_sources[{i}].branches"), "give a list of branches or the word all".into()));
        }
        if !poller_names.insert(poller.name()) {
            return Err((format!("change_sources[{i}].name"), format!("duplicate poller {:?}", poller.name())));
        }
    }
    Ok(())
}
