//! The master's configuration: one typed YAML document, validated at start-up. Every error names
//! the file, the key and the reason.

mod builders;
mod pools;
mod schedulers;
mod sources;

pub use builders::{
    BuilderConfig, CommandLine, GitStepConfig, SetPropertyStepConfig, ShellStepConfig, StepConfig, StepFlags,
    TriggerStepConfig, step_name,
};
pub use pools::{BackendKind, KubernetesBackendConfig, LocalBackendConfig, PoolConfig};
pub use schedulers::{
    ChangeFilterConfig, ChangeSchedulerConfig, DependentSchedulerConfig, ForceSchedulerConfig, OneOrMany,
    SchedulerConfig, TimedSchedulerConfig, TriggerableSchedulerConfig,
};
pub use sources::{
    ChangeHooksConfig, ChangeSourceConfig, GitPollerConfig, GithubHookConfig, GitlabHookConfig, PolledBranches,
};

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
    /// Who may use control actions (JSON-RPC POSTs to `/api/v2`): holders of a bearer token or
    /// HTTP basic credentials, or — only when it says `open` — anyone. Without it, control
    /// actions are refused. Reading the API and the change hooks (which have their own secrets)
    /// stay open.
    #[serde(default)]
    pub auth: Option<AuthSetting>,
    /// Serve HTTPS with this certificate; plain HTTP without it.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// A listener's TLS: a certificate chain and its key in PEM files, read again when they change.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs (PEM). On the
    /// worker endpoint the certificate replaces the token: a worker may register only under a
    /// DNS name its certificate carries.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// `http.auth`: the word `open`, or credentials.
#[derive(Debug, Clone)]
pub enum AuthSetting {
    Word(String),
    Credentials(AuthConfig),
}

/// Read by hand rather than as an untagged enum, so that a mistake inside the credentials is
/// reported as itself (say, an unknown field) instead of "matches no variant".
impl<'de> Deserialize<'de> for AuthSetting {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Setting;
        impl<'de> serde::de::Visitor<'de> for Setting {
            type Value = AuthSetting;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("the word open, or a mapping with tokens and users")
            }

            fn visit_str<E: serde::de::Error>(self, word: &str) -> Result<AuthSetting, E> {
                Ok(AuthSetting::Word(word.to_owned()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<AuthSetting, A::Error> {
                AuthConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(AuthSetting::Credentials)
            }
        }
        deserializer.deserialize_any(Setting)
    }
}

/// Who may use control actions, as the configuration says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlAccess {
    /// No `http.auth`: nobody.
    Closed,
    /// `http.auth: open`: anybody who reaches the port.
    Open,
    /// Holders of one of these bearer tokens or `user:password` pairs (basic authentication).
    Credentials { tokens: Vec<String>, users: Vec<String> },
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { listen: default_http_listen(), max_body_bytes: default_body_limit(), auth: None, tls: None }
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
    /// Serve the worker endpoint over TLS with this certificate; plain HTTP/2 without it.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
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

pub(super) fn yes() -> bool {
    true
}

pub(super) fn one() -> u32 {
    1
}

pub(super) fn default_title() -> String {
    "Kiln".to_owned()
}

pub(super) fn default_data_dir() -> PathBuf {
    PathBuf::from("kiln-data")
}

pub(super) fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8010))
}

pub(super) fn default_grpc_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9989))
}

pub(super) fn default_body_limit() -> usize {
    1 << 20
}

/// How long a worker's commands may outlive its session (see `kiln.proto`): four heartbeats
/// (at least three seconds) and one second more.
pub fn orphan_deadline(heartbeat: Duration) -> Duration {
    (heartbeat * 4).max(Duration::from_secs(3)) + Duration::from_secs(1)
}

/// The longest span of seconds a setting may give (a year): longer is a mistake, and would not fit
/// the timers the setting drives.
pub const LONGEST_SECONDS: f64 = 365.0 * 86_400.0;

/// Checks a setting in seconds: a finite number from `least` up to a year.
pub(super) fn seconds(key: &str, value: f64, least: f64) -> Result<(), (String, String)> {
    if value.is_finite() && value >= least && value > 0.0 && value <= LONGEST_SECONDS {
        return Ok(());
    }
    let range = if least > 0.0 { format!("from {least}") } else { "above 0".to_owned() };
    Err((
        key.to_owned(),
        format!("must be a number of seconds {range}, at most a year ({LONGEST_SECONDS}), not {value}"),
    ))
}

/// As [`seconds`], where zero means "at once".
pub(super) fn seconds_or_zero(key: &str, value: f64) -> Result<(), (String, String)> {
    if value == 0.0 { Ok(()) } else { seconds(key, value, 0.0) }
}

pub(super) fn default_heartbeat() -> f64 {
    5.0
}

pub(super) fn default_lease() -> u64 {
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
pub(super) fn resolve_secret(
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
        self.validate_basics()?;
        self.validate_auth()?;
        self.validate_tls()?;
        sources::validate(&self.change_hooks, &self.change_sources)?;
        pools::validate(&self.pools, &self.builders)?;
        let builder_names = builders::validate(&self.builders, &self.schedulers)?;
        schedulers::validate(&self.schedulers, &builder_names)
    }

    /// The database, the workers' timing and tokens, and log limits.
    fn validate_basics(&self) -> Result<(), (String, String)> {
        let db = &self.database;
        if !(db.starts_with("sqlite:") || db.starts_with("postgres://") || db.starts_with("postgresql://")) {
            return Err((
                "database".into(),
                format!("unsupported database URL {db:?}: use sqlite://PATH or postgres://…"),
            ));
        }
        seconds("workers.heartbeat_interval", self.workers.heartbeat_interval, 0.0)?;
        if let Some(horizon) = self.log_horizon {
            // Logs may be kept for many years; the bound only keeps the arithmetic in range.
            if !(horizon.is_finite() && horizon > 0.0 && horizon <= 1000.0 * LONGEST_SECONDS) {
                return Err(("logHorizon".into(), "must be a positive number of seconds, at most 1000 years".into()));
            }
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
        Ok(())
    }

    /// The listeners' certificate files exist, and no local pool needs a plain worker endpoint.
    fn validate_tls(&self) -> Result<(), (String, String)> {
        if self.workers.tls.is_some()
            && let Some(i) = self.pools.iter().position(|p| p.backend == BackendKind::Local)
        {
            return Err((
                format!("pools[{i}].backend"),
                "local pools connect in plain text on loopback, which workers.tls turns off; use a static or \
                 kubernetes pool with TLS"
                    .into(),
            ));
        }
        if self.workers.tls.as_ref().is_some_and(|t| t.client_ca.is_some()) && !self.workers.tokens.is_empty() {
            return Err((
                "workers.tokens".into(),
                "workers.tls.client_ca makes workers authenticate by certificate; give tokens or client_ca, not both"
                    .into(),
            ));
        }
        for (key, tls) in [("workers.tls", &self.workers.tls), ("http.tls", &self.http.tls)] {
            let Some(tls) = tls else { continue };
            let files = [("cert", Some(&tls.cert)), ("key", Some(&tls.key)), ("client_ca", tls.client_ca.as_ref())];
            for (name, path) in files {
                if let Some(path) = path
                    && let Err(error) = std::fs::metadata(path)
                {
                    return Err((format!("{key}.{name}"), format!("{}: {error}", path.display())));
                }
            }
        }
        Ok(())
    }

    /// Who may use control actions.
    fn validate_auth(&self) -> Result<(), (String, String)> {
        if let Some(AuthSetting::Word(word)) = &self.http.auth
            && word != "open"
        {
            return Err((
                "http.auth".into(),
                format!("{word:?}: give tokens or users, or the word open to let anyone use control actions"),
            ));
        }
        if let Some(AuthSetting::Credentials(auth)) = &self.http.auth {
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
        Ok(())
    }

    /// The worker tokens in effect, resolved from the environment where asked.
    pub fn worker_tokens(&self) -> Vec<String> {
        self.workers.tokens.iter().filter_map(TokenConfig::resolve).collect()
    }

    /// Who may use control actions.
    pub fn control_access(&self) -> ControlAccess {
        let auth = match &self.http.auth {
            None => return ControlAccess::Closed,
            Some(AuthSetting::Word(_)) => return ControlAccess::Open,
            Some(AuthSetting::Credentials(auth)) => auth,
        };
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
        ControlAccess::Credentials { tokens, users }
    }

    /// A warning for the start-up log when anyone who reaches a non-loopback address may use
    /// control actions.
    pub fn open_api_warning(&self) -> Option<String> {
        let listen = self.http.listen;
        (self.control_access() == ControlAccess::Open && !listen.ip().is_loopback()).then(|| {
            format!(
                "http.auth is open and http.listen is {listen}: anyone who reaches that address can stop builds \
                 and workers; give tokens or users, or listen on 127.0.0.1"
            )
        })
    }

    pub fn builder(&self, name: &str) -> Option<&BuilderConfig> {
        self.builders.iter().find(|b| b.name == name)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small valid configuration, for tests to vary.
    pub(crate) const MINIMAL: &str = r#"
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
    fn http_auth_is_open_or_credentials_and_a_mistake_in_them_says_what_it_is() {
        let with = |auth: &str| Config::parse("c.yaml", &format!("http:\n  auth: {auth}\n{MINIMAL}"));
        assert_eq!(with("open").unwrap().control_access(), ControlAccess::Open);
        let tokens = with("{tokens: [{name: ci, value: s}]}").unwrap().control_access();
        assert_eq!(tokens, ControlAccess::Credentials { tokens: vec!["s".into()], users: vec![] });
        let typo = with("{tokns: [{name: ci, value: s}]}").unwrap_err();
        assert!(typo.key.starts_with("http.auth"), "{typo}");
        assert!(typo.reason.contains("unknown field `tokns`"), "{typo}");
        assert_eq!(with("opne").unwrap_err().key, "http.auth");
        assert_eq!(Config::parse("c.yaml", MINIMAL).unwrap().control_access(), ControlAccess::Closed);
    }

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
    fn a_nightly_time_zone_is_checked_and_only_nightly_schedules_take_one() {
        let with = |scheduler: &str| Config::parse("mem.yaml", &format!("{MINIMAL}  - {scheduler}\n"));
        let nightly = "{type: nightly, name: n, builderNames: [b], hour: 3, timezone: Europe/Berlin}";
        assert!(with(nightly).is_ok());
        let error = with(&nightly.replace("Europe/Berlin", "Europe/Atlantis")).unwrap_err();
        assert_eq!(error.key, "schedulers[2].timezone");
        assert!(error.reason.contains("Europe/Atlantis"), "{error}");
        let error = with("{type: nightly, name: n, builderNames: [b], hour: 24}").unwrap_err();
        assert_eq!(error.key, "schedulers[2].hour");
        let periodic = "{type: periodic, name: p, builderNames: [b], periodicBuildTimer: 60, timezone: UTC}";
        assert_eq!(with(periodic).unwrap_err().key, "schedulers[2].timezone");
    }

    #[test]
    fn an_unsupported_database_is_refused() {
        let text = MINIMAL.replace("sqlite://kiln.sqlite", "mysql://x");
        let error = Config::parse("mem.yaml", &text).unwrap_err();
        assert_eq!(error.key, "database");
    }
}
