//! Reporters in the configuration (Buildbot's `services`): where build results go — GitHub commit
//! statuses and HTTP push — which builders each covers and in which of Buildbot's report modes.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::BuilderConfig;
use crate::results::Results;

/// One reporter, told apart by `type`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServiceConfig {
    /// GitHub commit statuses (`POST /repos/{owner}/{repo}/statuses/{sha}`): `pending` when a
    /// build starts, `success`, `failure` or `error` when it ends (Buildbot's `GitHubStatusPush`).
    GithubStatus(ForgeStatusConfig),
    /// GitLab commit statuses (`POST /api/v4/projects/{id}/statuses/{sha}`, the project found
    /// from the repository URL): `running` when a build starts, `success`, `failed` or `canceled`
    /// when it ends (Buildbot's `GitLabStatusPush`).
    GitlabStatus(ForgeStatusConfig),
    /// A comment on the pull request a finished build was for (Buildbot's `GitHubCommentPush`);
    /// builds of other changes say nothing.
    GithubComment(GithubCommentConfig),
    /// A JSON POST of each finished build to a URL (Buildbot's `HttpStatusPush`).
    HttpPush(HttpPushConfig),
}

/// Which builds a reporter covers.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Coverage {
    /// Builders covered, by name…
    #[serde(default)]
    pub builders: Vec<String>,
    /// …and by tag: builders carrying any of these tags. With neither, every builder.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Buildbot's report modes: `all` (the default), `failing`, `passing`, `problem`, `warnings`,
    /// `exception`, `cancelled`. A finished build is reported when any mode matches it.
    #[serde(default)]
    pub mode: Vec<ReportMode>,
}

/// Buildbot's report modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReportMode {
    All,
    Failing,
    Passing,
    /// A failure after a build that did not fail.
    Problem,
    Warnings,
    Exception,
    Cancelled,
}

/// A forge's commit statuses: GitHub's or GitLab's.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForgeStatusConfig {
    /// Unique among services; names the reporter in logs, metrics and the reports view.
    pub name: String,
    /// A file holding the API token (give this or `token_env`); read at each send, so a rotated
    /// token is picked up.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// An environment variable holding the API token (give this or `token_file`).
    #[serde(default)]
    pub token_env: Option<String>,
    /// The forge's base URL: `https://api.github.com` (GitHub Enterprise:
    /// `https://HOST/api/v3`) or `https://gitlab.com` (a self-managed GitLab's address).
    #[serde(default)]
    pub base_url: Option<String>,
    /// Certificate authorities (PEM) trusted for this reporter's HTTPS besides the system's:
    /// for a GitHub Enterprise, GitLab or in-house endpoint with a private CA.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The status's context, an Interpolate template (Buildbot's default `buildbot/<builder>`).
    #[serde(default = "default_context")]
    pub context: String,
    #[serde(flatten)]
    pub coverage: Coverage,
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GithubCommentConfig {
    /// Unique among services.
    pub name: String,
    /// A file holding the GitHub token (give this or `token_env`).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// An environment variable holding the GitHub token (give this or `token_file`).
    #[serde(default)]
    pub token_env: Option<String>,
    /// The API's base URL (GitHub Enterprise: `https://HOST/api/v3`).
    #[serde(default)]
    pub base_url: Option<String>,
    /// Certificate authorities (PEM) trusted for this reporter's HTTPS besides the system's:
    /// for a GitHub Enterprise, GitLab or in-house endpoint with a private CA.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The comment, an Interpolate template; besides the build's properties it may use
    /// `%(prop:result)s` (`success`, `failure`, …) and `%(prop:build_url)s`.
    #[serde(default = "default_comment")]
    pub template: String,
    #[serde(flatten)]
    pub coverage: Coverage,
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpPushConfig {
    /// Unique among services.
    pub name: String,
    /// Where each finished build is POSTed.
    pub url: String,
    /// Certificate authorities (PEM) trusted for this reporter's HTTPS besides the system's:
    /// for a GitHub Enterprise, GitLab or in-house endpoint with a private CA.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A bearer token from this environment variable, sent as `Authorization: Bearer …`.
    #[serde(default)]
    pub bearer_env: Option<String>,
    /// A user for basic authentication, with `password_env`.
    #[serde(default)]
    pub user: Option<String>,
    /// The environment variable holding the basic authentication password.
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(flatten)]
    pub coverage: Coverage,
}

fn default_context() -> String {
    "buildbot/%(prop:buildername)s".into()
}

fn default_comment() -> String {
    "Build %(prop:buildername)s #%(prop:buildnumber)s: **%(prop:result)s** (%(prop:build_url)s)".into()
}

/// A token read now from its file or environment variable.
fn read_token(file: &Option<PathBuf>, env: &Option<String>) -> Option<String> {
    match (file, env) {
        (Some(path), _) => std::fs::read_to_string(path).ok().map(|t| t.trim().to_owned()),
        (None, Some(var)) => std::env::var(var).ok().map(|t| t.trim().to_owned()),
        (None, None) => None,
    }
}

/// Checks that a token is configured and readable now.
fn check_token(
    key: &dyn Fn(&str) -> String,
    file: &Option<PathBuf>,
    env: &Option<String>,
) -> Result<(), (String, String)> {
    let readable = read_token(file, env).is_some_and(|t| !t.is_empty());
    match (file, env) {
        (None, None) => Err((key("token_env"), "this reporter needs token_file or token_env".into())),
        (Some(path), _) if !readable => {
            Err((key("token_file"), format!("cannot read a token from {}", path.display())))
        }
        (None, Some(var)) if !readable => {
            Err((key("token_env"), format!("environment variable {var} is not set or empty")))
        }
        _ => Ok(()),
    }
}

/// Checks that `path` holds at least one PEM certificate.
fn check_ca_file(path: &Path) -> Result<(), String> {
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    match certs.collect::<Result<Vec<_>, _>>() {
        Ok(certs) if !certs.is_empty() => Ok(()),
        Ok(_) => Err(format!("{} holds no PEM certificate", path.display())),
        Err(error) => Err(format!("{}: {error}", path.display())),
    }
}

fn check_base_url(key: &dyn Fn(&str) -> String, base_url: &Option<String>) -> Result<(), (String, String)> {
    match base_url {
        Some(url) if !(url.starts_with("https://") || url.starts_with("http://")) => {
            Err((key("base_url"), format!("{url:?} is not an http(s) URL")))
        }
        _ => Ok(()),
    }
}

impl ServiceConfig {
    pub fn name(&self) -> &str {
        match self {
            ServiceConfig::GithubStatus(c) | ServiceConfig::GitlabStatus(c) => &c.name,
            ServiceConfig::GithubComment(c) => &c.name,
            ServiceConfig::HttpPush(c) => &c.name,
        }
    }

    pub fn coverage(&self) -> &Coverage {
        match self {
            ServiceConfig::GithubStatus(c) | ServiceConfig::GitlabStatus(c) => &c.coverage,
            ServiceConfig::GithubComment(c) => &c.coverage,
            ServiceConfig::HttpPush(c) => &c.coverage,
        }
    }

    /// The extra certificate authorities its HTTPS trusts.
    pub fn ca_file(&self) -> Option<&Path> {
        match self {
            ServiceConfig::GithubStatus(c) | ServiceConfig::GitlabStatus(c) => c.ca_file.as_deref(),
            ServiceConfig::GithubComment(c) => c.ca_file.as_deref(),
            ServiceConfig::HttpPush(c) => c.ca_file.as_deref(),
        }
    }

    /// Whether the reporter says anything when a build starts (commit statuses do).
    pub fn reports_starts(&self) -> bool {
        matches!(self, ServiceConfig::GithubStatus(_) | ServiceConfig::GitlabStatus(_))
    }

    /// The secret the reporter sends, read now from its file or environment.
    pub fn credential(&self) -> Option<String> {
        match self {
            ServiceConfig::GithubStatus(c) | ServiceConfig::GitlabStatus(c) => read_token(&c.token_file, &c.token_env),
            ServiceConfig::GithubComment(c) => read_token(&c.token_file, &c.token_env),
            ServiceConfig::HttpPush(c) => c.bearer_env.as_ref().and_then(|v| std::env::var(v).ok()),
        }
    }
}

impl ForgeStatusConfig {
    /// The configured base URL, or the public forge's.
    pub fn base_url(&self, default: &str) -> String {
        base_url_or(&self.base_url, default)
    }
}

impl GithubCommentConfig {
    /// The configured base URL, or GitHub's.
    pub fn base_url(&self, default: &str) -> String {
        base_url_or(&self.base_url, default)
    }
}

fn base_url_or(base_url: &Option<String>, default: &str) -> String {
    base_url.clone().unwrap_or_else(|| default.to_owned()).trim_end_matches('/').to_owned()
}

impl Coverage {
    /// Whether the reporter covers builds of `builder`.
    pub fn covers(&self, builder: &BuilderConfig) -> bool {
        (self.builders.is_empty() && self.tags.is_empty())
            || self.builders.contains(&builder.name)
            || builder.tags.iter().any(|t| self.tags.contains(t))
    }

    /// Whether deciding needs the results of the builder's previous build.
    pub fn needs_previous(&self) -> bool {
        self.mode.contains(&ReportMode::Problem)
    }

    /// Whether a finished build with `results` is reported; `previous` is the results of the
    /// builder's build before it, for `problem`.
    pub fn reports(&self, results: Results, previous: Option<Results>) -> bool {
        if self.mode.is_empty() {
            return true;
        }
        self.mode.iter().any(|mode| match mode {
            ReportMode::All => true,
            ReportMode::Failing => results == Results::Failure,
            ReportMode::Passing => results == Results::Success,
            ReportMode::Problem => results == Results::Failure && previous != Some(Results::Failure),
            ReportMode::Warnings => matches!(results, Results::Warnings | Results::Failure),
            ReportMode::Exception => results == Results::Exception,
            ReportMode::Cancelled => results == Results::Cancelled,
        })
    }
}

/// Checks names, builders, templates and credentials of the services.
pub fn validate(services: &[ServiceConfig], builders: &[BuilderConfig]) -> Result<(), (String, String)> {
    let mut names = std::collections::BTreeSet::new();
    for (i, service) in services.iter().enumerate() {
        let key = |field: &str| format!("services[{i}].{field}");
        if service.name().is_empty() || !names.insert(service.name()) {
            return Err((key("name"), format!("{:?}: service names must be non-empty and unique", service.name())));
        }
        for (j, name) in service.coverage().builders.iter().enumerate() {
            if !builders.iter().any(|b| &b.name == name) {
                return Err((key(&format!("builders[{j}]")), format!("no builder named {name:?}")));
            }
        }
        if let Some(ca) = service.ca_file() {
            check_ca_file(ca).map_err(|reason| (key("ca_file"), reason))?;
        }
        match service {
            ServiceConfig::GithubStatus(c) | ServiceConfig::GitlabStatus(c) => {
                check_token(&key, &c.token_file, &c.token_env)?;
                crate::properties::check_template(&c.context).map_err(|e| (key("context"), e.to_string()))?;
                check_base_url(&key, &c.base_url)?;
            }
            ServiceConfig::GithubComment(c) => {
                check_token(&key, &c.token_file, &c.token_env)?;
                crate::properties::check_template(&c.template).map_err(|e| (key("template"), e.to_string()))?;
                check_base_url(&key, &c.base_url)?;
            }
            ServiceConfig::HttpPush(c) => {
                if !(c.url.starts_with("https://") || c.url.starts_with("http://")) {
                    return Err((key("url"), format!("{:?} is not an http(s) URL", c.url)));
                }
                if let Some(var) = &c.bearer_env
                    && std::env::var(var).map_or(true, |v| v.is_empty())
                {
                    return Err((key("bearer_env"), format!("environment variable {var} is not set or empty")));
                }
                if c.user.is_some() != c.password_env.is_some() {
                    return Err((key("user"), "basic authentication needs both user and password_env".into()));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::super::tests::MINIMAL;

    fn with(services: &str) -> Result<Config, super::super::ConfigError> {
        Config::parse("c.yaml", &format!("{MINIMAL}services:\n{services}"))
    }

    #[test]
    fn a_reporter_without_a_token_or_builder_or_with_a_bad_template_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "t0k\n").unwrap();
        let ok = format!("  - {{type: github_status, name: gh, token_file: \"{}\", builders: [b]}}\n", token.display());
        let config = with(&ok).unwrap();
        assert_eq!(config.services[0].credential().as_deref(), Some("t0k"));

        let no_token = with("  - {type: github_status, name: gh}\n").unwrap_err();
        let entry_line = format!("{MINIMAL}services:\n").lines().count() + 1;
        assert_eq!((no_token.key.as_str(), no_token.line), ("services[0].token_env", Some(entry_line)), "{no_token}");
        let unset = with("  - {type: github_status, name: gh, token_env: KILN_NO_SUCH_VARIABLE}\n").unwrap_err();
        assert!(unset.reason.contains("KILN_NO_SUCH_VARIABLE is not set"), "{unset}");
        let unknown = with(&ok.replace("[b]", "[nope]")).unwrap_err();
        assert_eq!(unknown.key, "services[0].builders[0]", "{unknown}");
        let template = with(&ok.replace("builders: [b]", "context: \"%(prop:x\"")).unwrap_err();
        assert_eq!(template.key, "services[0].context", "{template}");
        let twice = with(&format!("{ok}{ok}")).unwrap_err();
        assert_eq!(twice.key, "services[1].name", "{twice}");
        let push = with("  - {type: http_push, name: chat, url: \"ftp://x\"}\n").unwrap_err();
        assert_eq!(push.key, "services[0].url", "{push}");
        let missing_ca =
            with("  - {type: http_push, name: chat, url: \"https://x\", ca_file: /no/such/ca.pem}\n").unwrap_err();
        assert_eq!(missing_ca.key, "services[0].ca_file", "{missing_ca}");
        let not_pem = dir.path().join("not-a-ca.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let empty_ca = with(&ok.replace("builders: [b]", &format!("ca_file: \"{}\"", not_pem.display()))).unwrap_err();
        assert!(empty_ca.key == "services[0].ca_file" && empty_ca.reason.contains("no PEM certificate"), "{empty_ca}");
    }

    #[test]
    fn modes_pick_the_results_they_report() {
        use super::{Coverage, ReportMode};
        use crate::results::Results;
        let modes = |mode: Vec<ReportMode>| Coverage { mode, ..Default::default() };
        assert!(modes(vec![]).reports(Results::Success, None), "all by default");
        let failing = modes(vec![ReportMode::Failing, ReportMode::Cancelled]);
        assert!(failing.reports(Results::Failure, None) && failing.reports(Results::Cancelled, None));
        assert!(!failing.reports(Results::Success, None));
        let problem = modes(vec![ReportMode::Problem]);
        assert!(problem.reports(Results::Failure, Some(Results::Success)));
        assert!(!problem.reports(Results::Failure, Some(Results::Failure)));
    }
}
