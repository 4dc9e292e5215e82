//! The master's configuration: one typed YAML document, validated at start-up. Every error names
//! the file, the key and the reason.

mod builders;
mod lines;
mod pools;
pub mod reference;
mod schedulers;
mod services;
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
pub use services::{Coverage, ForgeStatusConfig, GithubCommentConfig, HttpPushConfig, ReportMode, ServiceConfig};
pub use sources::{
    ChangeHooksConfig, ChangeSourceConfig, GitPollerConfig, GithubHookConfig, GitlabHookConfig, PolledBranches,
};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    /// Dotted path of the offending key, e.g. `builders[0].steps[1].shell.command`.
    pub key: String,
    /// The key's line in the file (1-based), when it is in the file.
    pub line: Option<usize>,
    pub reason: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}: {}", self.file, self.key, self.reason),
            None => write!(f, "{}: {}: {}", self.file, self.key, self.reason),
        }
    }
}

/// The whole configuration of a master.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
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
    /// The HTTP port: REST API, control actions, change hooks, metrics and probes.
    #[serde(default)]
    pub http: HttpConfig,
    /// The gRPC endpoint workers connect to, and who may connect.
    pub workers: WorkersConfig,
    /// What to build and how: Buildbot's builders, each a list of steps.
    pub builders: Vec<BuilderConfig>,
    /// What starts builds: Buildbot's schedulers, told apart by `type`.
    #[serde(default)]
    pub schedulers: Vec<SchedulerConfig>,
    /// The webhook routes (`/change_hook/…`) and their secrets.
    #[serde(default)]
    pub change_hooks: ChangeHooksConfig,
    /// Change sources the master runs itself, such as git pollers.
    #[serde(default)]
    pub change_sources: Vec<ChangeSourceConfig>,
    /// Worker pools the master sizes from the queue.
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    /// The web UI's address as people reach it (Buildbot's `buildbotURL`), for the links in
    /// reports. Defaults to `http://<http.listen>/`.
    #[serde(default, rename = "buildbotURL")]
    pub buildbot_url: Option<String>,
    /// Where build results are reported (Buildbot's `services`): commit statuses, HTTP push.
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
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
    /// Bytes kept from the end of a log cut by `logMaxSize` (Buildbot's `logMaxTailSize`).
    #[serde(default, rename = "logMaxTailSize")]
    pub log_max_tail_size: Option<usize>,
    /// The line of each key in the file, to point errors found after parsing at their line.
    #[serde(skip)]
    lines: std::sync::Arc<std::collections::HashMap<String, usize>>,
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the REST API, change hooks and metrics.
    #[serde(default = "default_http_listen")]
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes.
    #[serde(default = "default_body_limit")]
    pub max_body_bytes: usize,
    /// Seconds a client may take to send a request's headers (also the longest a kept-alive
    /// connection waits for its next request) — on this port and in the WebSocket handshake of
    /// Buildbot's workers on the worker port — and to send a change hook's body. A slower client
    /// is disconnected, or answered 408, so connections that never finish a request cannot pile
    /// up. GitHub and GitLab send a delivery within their own 10 s timeout.
    #[serde(default = "default_request_timeout")]
    pub request_timeout: f64,
    /// Who may use control actions (JSON-RPC POSTs to `/api/v2`): holders of a bearer token or
    /// HTTP basic credentials, or — only when it says `open` — anyone. Without it, control
    /// actions are refused. Reading the API and the change hooks (which have their own secrets)
    /// stay open.
    #[serde(default)]
    pub auth: Option<AuthSetting>,
    /// Serve HTTPS with this certificate; plain HTTP without it.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Buildbot's web UI: the `static` directory of an installed `buildbot-www` package (or the
    /// package's directory). Unset, the master looks for the package where Python installs it.
    #[serde(default)]
    pub www: Option<PathBuf>,
}

/// A listener's TLS: a certificate chain and its key in PEM files, read again when they change.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, PEM.
    pub cert: PathBuf,
    /// The private key, PEM.
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

impl schemars::JsonSchema for AuthSetting {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "AuthSetting".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "oneOf": [
                { "type": "string", "enum": ["open"], "description": "Anyone who reaches the port may use control actions." },
                generator.subschema_for::<AuthConfig>(),
            ]
        })
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
        Self {
            listen: default_http_listen(),
            max_body_bytes: default_body_limit(),
            request_timeout: default_request_timeout(),
            auth: None,
            tls: None,
            www: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Bearer tokens, for scripts.
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    /// Users with passwords, for HTTP basic authentication.
    #[serde(default)]
    pub users: Vec<UserConfig>,
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// The user name of HTTP basic authentication.
    pub username: String,
    /// The password…
    #[serde(default)]
    pub password: Option<String>,
    /// The environment variable that holds the password.
    #[serde(default)]
    pub password_env: Option<String>,
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
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
    /// Buildbot's own workers (`buildbot-worker` with `protocol = 'msgpack_experimental_v7'`),
    /// as Buildbot's `workers` list names them: each connects to the same port as kiln-workers
    /// (`workers.listen`) with its name and password.
    #[serde(default)]
    pub buildbot: Vec<BuildbotWorkerConfig>,
}

/// One `buildbot-worker` allowed to connect.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildbotWorkerConfig {
    /// The worker's name, as in its `buildbot.tac`…
    #[serde(default)]
    pub name: String,
    /// …or the start of the names of the workers it admits, for a pool's pods named after
    /// their Deployment (`kiln-worker-macs-`): each joins under its own name.
    #[serde(default)]
    pub name_prefix: Option<String>,
    /// Its password…
    #[serde(default)]
    pub password: Option<String>,
    /// …or the environment variable that holds it…
    #[serde(default)]
    pub password_env: Option<String>,
    /// …or a file that holds it (a mounted Secret).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Builds it runs at once (Buildbot's `max_builds`).
    #[serde(default = "one")]
    pub max_builds: u32,
    /// The pool it counts in, if any: it then runs that pool's builders.
    #[serde(default)]
    pub pool: Option<String>,
}

impl BuildbotWorkerConfig {
    /// Whether this entry admits a worker called `name`.
    pub fn admits(&self, name: &str) -> bool {
        match &self.name_prefix {
            Some(prefix) => name.len() > prefix.len() && name.starts_with(prefix.as_str()),
            None => self.name == name,
        }
    }

    /// The password, read now.
    pub fn password(&self) -> Option<String> {
        match (&self.password, &self.password_env, &self.password_file) {
            (Some(p), _, _) => Some(p.clone()),
            (None, Some(var), _) => std::env::var(var).ok(),
            (None, None, Some(file)) => {
                std::fs::read_to_string(file).ok().map(|p| p.trim_end_matches(['\n', '\r']).to_owned())
            }
            (None, None, None) => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
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

pub(super) fn default_request_timeout() -> f64 {
    30.0
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

/// A YAML or type error as a [`ConfigError`]: the key once (the parser's message repeats it), the
/// key's own line (an unknown key's, not its mapping's), and a hint when the file is Python.
fn parse_error(file: &str, text: &str, path: &str, error: &serde_yaml_ng::Error) -> ConfigError {
    let mut key = if path == "." { "(document)".to_owned() } else { path.to_owned() };
    if looks_like_python(text) {
        let reason = "this is a Buildbot master.cfg (Python), and Kiln reads YAML: \"Coming from Buildbot\" in \
                      the README shows how each part of a master.cfg is written"
            .to_owned();
        return ConfigError { file: file.to_owned(), key, line: None, reason };
    }
    let mut reason = error.to_string();
    if let Some(at) = reason.rfind(" at line ") {
        reason.truncate(at);
    }
    // The parser prefixes the path it knows, which may stop short of the key.
    if let Some((prefix, rest)) = reason.split_once(": ")
        && !prefix.contains(' ')
        && path.starts_with(prefix)
    {
        reason = rest.to_owned();
    }
    if let Some(unknown) = reason.strip_prefix("unknown field `").and_then(|r| r.split('`').next()) {
        if !key.ends_with(unknown) {
            key = if key == "(document)" { unknown.to_owned() } else { format!("{key}.{unknown}") };
        }
        if let Some(near) = nearest_allowed(unknown, &reason) {
            reason = format!("{reason} (did you mean `{near}`?)");
        }
    }
    let lines = lines::key_lines(text);
    let line = lines::line_of(&lines, &key).or_else(|| error.location().map(|l| l.line()));
    ConfigError { file: file.to_owned(), key, line, reason }
}

/// The allowed key (from serde's "expected one of `a`, `b`" list) a mistyped one most likely
/// meant: at most a third of its letters different.
fn nearest_allowed(unknown: &str, reason: &str) -> Option<String> {
    let (_, allowed) = reason.split_once("expected one of ")?;
    let candidates = allowed.split(", ").map(|k| k.trim_matches('`'));
    let (distance, best) = candidates.map(|k| (edit_distance(unknown, k), k)).min()?;
    (distance > 0 && distance * 3 <= unknown.len().max(3)).then(|| best.to_owned())
}

/// Levenshtein distance, case-insensitive.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.to_lowercase().chars().collect(), b.to_lowercase().chars().collect());
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

/// Whether the text is Python rather than YAML, as a Buildbot `master.cfg` is.
fn looks_like_python(text: &str) -> bool {
    text.lines().map(str::trim_start).any(|line| {
        line.starts_with("from buildbot")
            || line.starts_with("import buildbot")
            || line.starts_with("c = BuildmasterConfig")
            || line.starts_with("BuildmasterConfig")
    })
}

impl Config {
    /// Reads, parses and validates a configuration file. Relative paths in it are taken relative
    /// to the current directory, like Buildbot's basedir.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError {
            file: file.clone(),
            key: "(file)".to_owned(),
            line: None,
            reason: error.to_string(),
        })?;
        Self::parse(&file, &text)
    }

    /// Replaces the database URL (from `--database` or `KILN_DATABASE_URL`) and validates again.
    pub fn with_database(mut self, file: &str, url: String) -> Result<Config, ConfigError> {
        self.database = url;
        self.validate().map_err(|(key, reason)| ConfigError { file: file.to_owned(), key, line: None, reason })?;
        Ok(self)
    }

    /// An error about `key` of this configuration, read from `file`, with the key's line.
    pub fn error_at(&self, file: &str, key: String, reason: String) -> ConfigError {
        ConfigError { file: file.to_owned(), line: lines::line_of(&self.lines, &key), key, reason }
    }

    /// Parses and validates configuration text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Config, ConfigError> {
        let deserializer = serde_yaml_ng::Deserializer::from_str(text);
        let mut config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = e.path().to_string();
            let error = e.into_inner();
            parse_error(file, text, &path, &error)
        })?;
        config.lines = std::sync::Arc::new(lines::key_lines(text));
        config.validate().map_err(|(key, reason)| config.error_at(file, key, reason))?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        self.validate_basics()?;
        self.validate_auth()?;
        self.validate_tls()?;
        sources::validate(&self.change_hooks, &self.change_sources)?;
        pools::validate(&self.pools, &self.builders)?;
        services::validate(&self.services, &self.builders)?;
        self.validate_workernames()?;
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
        seconds("http.request_timeout", self.http.request_timeout, 0.0)?;
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
        let mut names = std::collections::BTreeSet::new();
        for (i, worker) in self.workers.buildbot.iter().enumerate() {
            let key = format!("workers.buildbot[{i}]");
            let label = worker.name_prefix.as_deref().unwrap_or(&worker.name);
            let field = if worker.name_prefix.is_some() { "name_prefix" } else { "name" };
            if worker.name_prefix.is_some() && !worker.name.is_empty() {
                return Err((key, "give name or name_prefix, not both".into()));
            }
            if label.is_empty() || label.contains(':') || !names.insert(label) {
                return Err((
                    format!("{key}.{field}"),
                    format!("{label:?}: names and prefixes must be non-empty, unique and without ':'"),
                ));
            }
            let sources = [worker.password.is_some(), worker.password_env.is_some(), worker.password_file.is_some()];
            if sources.iter().filter(|s| **s).count() != 1 {
                return Err((key, "give exactly one of password, password_env and password_file".into()));
            }
            if worker.password().is_none_or(|p| p.is_empty()) {
                let (field, what) = match (&worker.password_env, &worker.password_file) {
                    (Some(var), _) => ("password_env", format!("environment variable {var} is not set or empty")),
                    (_, Some(file)) => ("password_file", format!("cannot read a password from {}", file.display())),
                    _ => ("password", "must not be empty".to_owned()),
                };
                return Err((format!("{key}.{field}"), what));
            }
            if let Some(pool) = &worker.pool
                && !self.pools.iter().any(|p| &p.name == pool)
            {
                return Err((format!("{key}.pool"), format!("no pool named {pool:?}")));
            }
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
        if let Some(www) = &self.http.www
            && !www.join("index.html").is_file()
            && !www.join("static/index.html").is_file()
        {
            return Err((
                "http.www".into(),
                format!(
                    "{}: no index.html there or in its static directory: name buildbot-www's static directory",
                    www.display()
                ),
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

    /// A builder's `workernames` can be met: with a worker token or a client CA, a worker of any
    /// name may join; without, only the local pools' workers, `<prefix>-1` … `<prefix>-max`, can.
    fn validate_workernames(&self) -> Result<(), (String, String)> {
        let outsiders_may_join =
            !self.workers.tokens.is_empty() || self.workers.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        if outsiders_may_join {
            return Ok(());
        }
        let buildbot = &self.workers.buildbot;
        for (i, builder) in self.builders.iter().enumerate() {
            let local: Vec<String> = self
                .pools
                .iter()
                .filter(|p| p.backend == BackendKind::Local && p.serves(builder))
                .flat_map(|p| (1..=p.policy().max).map(move |n| format!("{}-{n}", p.name_prefix())))
                .collect();
            for (j, name) in builder.workernames.iter().enumerate() {
                if !local.contains(name) && !buildbot.iter().any(|w| w.admits(name)) {
                    let offered = match local.as_slice() {
                        [] => "no local pool serves this builder".to_owned(),
                        [only] => format!("the local pools serving this builder have only {only}"),
                        [first, .., last] => {
                            format!("the local pools serving this builder name theirs {first} … {last}")
                        }
                    };
                    return Err((
                        format!("builders[{i}].workernames[{j}]"),
                        format!(
                            "no worker named {name:?} can ever join: without workers.tokens or workers.tls.client_ca \
                             no worker from elsewhere is admitted, and {offered}"
                        ),
                    ));
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

    /// The web UI's address for links: `buildbotURL`, else the HTTP listener's.
    pub fn buildbot_url(&self) -> String {
        self.buildbot_url.clone().unwrap_or_else(|| {
            let scheme = if self.http.tls.is_some() { "https" } else { "http" };
            format!("{scheme}://{}/", self.http.listen)
        })
    }

    pub fn builder(&self, name: &str) -> Option<&BuilderConfig> {
        self.builders.iter().find(|b| b.name == name)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn buildbot_workers_name_one_password_source_and_a_known_pool() {
        let with = |entries: &str| {
            Config::parse("c.yaml", &MINIMAL.replace("  tokens:", &format!("  buildbot:\n{entries}  tokens:")))
        };
        let config =
            with("    - {name: mac-1, password: s3cret}\n    - {name_prefix: kiln-worker-macs-, password: p}\n")
                .unwrap();
        assert_eq!(config.workers.buildbot[0].password().as_deref(), Some("s3cret"));
        assert!(config.workers.buildbot[0].admits("mac-1") && !config.workers.buildbot[0].admits("mac-10"));
        assert!(config.workers.buildbot[1].admits("kiln-worker-macs-7d9f-x2x"));
        assert!(!config.workers.buildbot[1].admits("kiln-worker-macs-"), "a prefix alone is no name");
        let none = with("    - {name: mac-1}\n").unwrap_err();
        assert!(none.key == "workers.buildbot[0]" && none.reason.contains("exactly one"), "{none}");
        let two = with("    - {name: mac-1, password: a, password_env: B}\n").unwrap_err();
        assert_eq!(two.key, "workers.buildbot[0]", "{two}");
        let unset = with("    - {name: mac-1, password_env: KILN_NO_SUCH_PASSWORD}\n").unwrap_err();
        assert_eq!(unset.key, "workers.buildbot[0].password_env", "{unset}");
        let twice = with("    - {name: m, password: a}\n    - {name: m, password: b}\n").unwrap_err();
        assert_eq!(twice.key, "workers.buildbot[1].name", "{twice}");
        let pool = with("    - {name: m, password: a, pool: nope}\n").unwrap_err();
        assert_eq!(pool.key, "workers.buildbot[0].pool", "{pool}");
    }

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
        assert_eq!(shell.flags().halt_on_failure, Some(true));
        assert_eq!(config.worker_tokens(), vec!["secret".to_owned()]);
    }

    /// The line of `needle` in `text`, 1-based.
    fn line_with(text: &str, needle: &str) -> usize {
        text.lines().position(|line| line.contains(needle)).unwrap() + 1
    }

    #[test]
    fn an_unknown_key_is_named_with_its_own_line_the_keys_allowed_and_a_guess() {
        let text = MINIMAL.replace(
            "- shell: {command: [echo, hi], haltOnFailure: true}",
            "- shell:\n          command: [echo, hi]\n          haltOnFailur: true",
        );
        let error = Config::parse("mem.yaml", &text).unwrap_err();
        assert_eq!(error.file, "mem.yaml");
        assert_eq!(error.key, "builders[0].steps[0].shell.haltOnFailur");
        assert_eq!(error.line, Some(line_with(&text, "haltOnFailur:")), "the key's line, not the step's");
        assert!(error.reason.starts_with("unknown field `haltOnFailur`, expected one of `name`, `command`"), "{error}");
        assert!(error.reason.contains("`alwaysRun`") && error.reason.ends_with("(did you mean `haltOnFailure`?)"));
        let shown = error.to_string();
        assert!(shown.starts_with(&format!(
            "mem.yaml:{}: builders[0].steps[0].shell.haltOnFailur: unknown",
            error.line.unwrap()
        )));
        assert_eq!(shown.matches("builders[0]").count(), 1, "the path once: {shown}");
        assert!(!shown.contains(" at line "), "{shown}");
    }

    #[test]
    fn a_wrong_type_inside_a_step_or_pool_names_the_key_and_its_line_once() {
        let text = MINIMAL.replace("haltOnFailure: true", "haltOnFailure: 3");
        let error = Config::parse("mem.yaml", &text).unwrap_err();
        assert_eq!(error.key, "builders[0].steps[0].shell.haltOnFailure");
        assert_eq!(error.line, Some(line_with(&text, "haltOnFailure: 3")));
        assert_eq!(error.reason, "invalid type: integer `3`, expected a boolean");
        let text = format!("{MINIMAL}pools:\n  - name: p\n    backend: local\n    max: lots\n");
        let error = Config::parse("mem.yaml", &text).unwrap_err();
        assert_eq!((error.key.as_str(), error.line), ("pools[0].max", Some(line_with(&text, "max: lots"))));
        assert_eq!(error.to_string().matches("pools[0].max").count(), 1, "{error}");
    }

    #[test]
    fn a_mistake_found_after_parsing_points_at_its_line() {
        let text = MINIMAL.replace("builderNames: [b]}\n  - {type: single", "builderNames: [nope]}\n  - {type: single");
        let error = Config::parse("mem.yaml", &text).unwrap_err();
        assert_eq!(error.key, "schedulers[0].builderNames[0]");
        assert_eq!(error.line, Some(line_with(&text, "[nope]")));
        let error = Config::parse("mem.yaml", &format!("databse: x\n{MINIMAL}")).unwrap_err();
        assert_eq!((error.key.as_str(), error.line), ("databse", Some(1)));
        assert!(error.reason.ends_with("(did you mean `database`?)"), "{error}");
    }

    #[test]
    fn a_buildbot_master_cfg_is_recognised() {
        let python = "# -*- python -*-\nfrom buildbot.plugins import *\nc = BuildmasterConfig = {}\n";
        let error = Config::parse("master.cfg", python).unwrap_err();
        assert!(error.reason.contains("Buildbot master.cfg (Python)"), "{error}");
        assert!(error.reason.contains("Coming from Buildbot"), "{error}");
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
    fn workernames_that_no_worker_can_ever_have_are_refused() {
        let text = |workernames: &str, tokens: bool| {
            let base = MINIMAL.replace("  - name: b\n", &format!("  - name: b\n    workernames: {workernames}\n"));
            let base = if tokens { base } else { base.replace("  tokens: [{name: t, value: secret}]\n", "") };
            format!("{base}pools:\n  - {{name: local, backend: local, max: 3}}\n")
        };
        assert!(Config::parse("c.yaml", &text("[w1]", true)).is_ok(), "a token admits a worker named w1");
        assert!(Config::parse("c.yaml", &text("[local-1, local-3]", false)).is_ok());
        let error = Config::parse("c.yaml", &text("[local-1, w1]", false)).unwrap_err();
        assert_eq!(error.key, "builders[0].workernames[1]");
        assert!(error.reason.contains("\"w1\"") && error.reason.contains("local-1 … local-3"), "{error}");
        assert_eq!(Config::parse("c.yaml", &text("[local-4]", false)).unwrap_err().key, "builders[0].workernames[0]");
    }

    #[test]
    fn a_template_that_cannot_render_is_refused_naming_its_key_and_line() {
        let with = |step: &str| {
            let text = MINIMAL.replace("- shell: {command: [echo, hi], haltOnFailure: true}", step);
            Config::parse("c.yaml", &text).map_err(|e| (e.key.clone(), e.line, e.reason.clone(), text))
        };
        let (key, line, reason, text) = with("- shell: {command: [echo, \"%(prp:x)s\"]}").unwrap_err();
        assert_eq!((key.as_str(), line), ("builders[0].steps[0].shell.command[1]", Some(line_with(&text, "prp:x"))));
        assert!(reason.contains("unknown selector \"prp\""), "{reason}");
        let (key, _, reason, _) = with("- shell: {command: x, env: {V: \"%(prop:x\"}}").unwrap_err();
        assert_eq!(key, "builders[0].steps[0].shell.env.V");
        assert!(reason.starts_with("unterminated"), "{reason}");
        let (key, ..) = with("- git: {repourl: \"%(src::colour)s\"}").unwrap_err();
        assert_eq!(key, "builders[0].steps[0].git.repourl");
        assert!(with("- shell: {command: \"echo %(prop:x:-none)s 100%%\", workdir: \"%(src::branch)s\"}").is_ok());
    }

    #[test]
    fn an_unsupported_database_is_refused() {
        let text = MINIMAL.replace("sqlite://kiln.sqlite", "mysql://x");
        let error = Config::parse("mem.yaml", &text).unwrap_err();
        assert_eq!(error.key, "database");
    }
}
