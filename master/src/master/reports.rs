//! Sending the reporters' outbox: claims due reports, renders each for its forge from the build
//! as stored, sends it, and settles or retries it. Off the build's path: a forge that is down
//! delays nothing but its own reports.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tracing::{info, warn};

use super::Master;
use crate::config::{ForgeStatusConfig, GithubCommentConfig, HttpPushConfig, ServiceConfig};
use crate::domain::SourceStamp;
use crate::properties::{Properties, SourceView};
use crate::results::Results;
use crate::store::{ClaimedReport, Filter, ListQuery, Op, ReportedBuild, Resource, Settled};

/// Reports being sent at once.
const IN_FLIGHT: usize = 64;
/// The shortest time between two claims.
const CLAIM_EVERY: Duration = Duration::from_millis(25);
/// How long a claim lasts before another master may take the report (longer than a send).
const CLAIM_MS: i64 = 60_000;
/// How often lapsed claims (of a master that died sending) are freed for another claim.
const FREE_LAPSED_EVERY: Duration = Duration::from_secs(5);
/// How long a reporter's token, once read, is used before it is read again.
const TOKEN_FOR: Duration = Duration::from_secs(10);
/// How long one send may take.
const SEND_TIMEOUT: Duration = Duration::from_secs(20);
/// How often the loop looks for due reports when nothing wakes it (retries coming due, reports
/// of other masters' builds).
const POLL: Duration = Duration::from_millis(500);
/// A report still failing after this long is abandoned.
const MAX_AGE_MS: i64 = 24 * 3600 * 1000;
/// The most of a forge's answer read (its message is kept with a failed report).
const ANSWER_LIMIT: usize = 64 * 1024;
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// What a forge's answer means for the report.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Sent,
    /// Try again after this long.
    Retry(Duration, String),
    /// Refused for good.
    Refused(String),
    /// Nothing to send (no revision, or a mode that does not report this result).
    Skip(String),
}

impl Master {
    /// Sends reports until the master shuts down.
    pub async fn run_reports(self: Arc<Self>) {
        if self.config.services.is_empty() {
            return;
        }
        // One client per set of trusted authorities: most reporters share the system's.
        let mut clients = std::collections::HashMap::new();
        for service in &self.config.services {
            let ca = service.ca_file().map(std::path::Path::to_path_buf);
            if clients.contains_key(&ca) {
                continue;
            }
            match http_client(ca.as_deref()) {
                Ok(client) => {
                    clients.insert(ca, client);
                }
                Err(error) => warn!(reporter = service.name(), %error, "reporters: cannot make an HTTP client"),
            }
        }
        let clients = Arc::new(Senders { http: clients, tokens: Tokens::default() });
        let mut shutdown = self.signals.shutdown();
        // Builds starting and ending write reports: look again at once.
        let mut queue = self.signals.queue_events();
        let mut in_flight: tokio::task::JoinSet<Option<i64>> = tokio::task::JoinSet::new();
        // Sent reports not yet recorded as sent.
        let mut sent: Vec<i64> = Vec::new();
        let mut lapsed_freed_at: Option<tokio::time::Instant> = None;
        loop {
            // When this round began: the next begins at least CLAIM_EVERY later, room or not.
            let round = tokio::time::Instant::now();
            // Records the sends that ended in one statement, then claims as many as there is
            // room for in another: the writer is the builds' too, so the loop writes at most
            // twice per CLAIM_EVERY however many reports come and go meanwhile.
            while let Some(done) = in_flight.try_join_next() {
                sent.extend(done.ok().flatten());
            }
            if !sent.is_empty() {
                if let Err(error) = self.store.settle_reports_sent(&sent, self.masterid).await {
                    // The claims lapse and the reports go out again: at least once, never lost.
                    warn!(%error, reports = sent.len(), "cannot record that reports were sent");
                }
                sent.clear();
            }
            if lapsed_freed_at.is_none_or(|at| at.elapsed() >= FREE_LAPSED_EVERY) {
                lapsed_freed_at = Some(tokio::time::Instant::now());
                match self.store.release_expired_report_claims().await {
                    Ok(0) => {}
                    Ok(freed) => {
                        info!(reports = freed, "reports claimed by a master that stopped sending are claimed again")
                    }
                    Err(error) => warn!(%error, "reporters: cannot free lapsed claims; trying again"),
                }
            }
            let room = IN_FLIGHT - in_flight.len();
            if room > 0 {
                match self.store.claim_reports(self.masterid, CLAIM_MS, room as i64).await {
                    Ok(claimed) if !claimed.is_empty() => {
                        // What the reports say is read for the whole claim at once.
                        let mut buildids: Vec<i64> = claimed.iter().map(|r| r.buildid).collect();
                        buildids.sort_unstable();
                        buildids.dedup();
                        let builds = self.store.reported_builds(&buildids).await.map_err(|e| e.to_string());
                        for report in claimed {
                            let build = match &builds {
                                Ok(builds) => builds
                                    .get(&report.buildid)
                                    .cloned()
                                    .ok_or_else(|| format!("no build {}", report.buildid)),
                                Err(error) => Err(error.clone()),
                            };
                            let (master, clients) = (Arc::clone(&self), Arc::clone(&clients));
                            in_flight.spawn(async move { master.send_report(&clients, report, build).await });
                        }
                    }
                    Ok(_) => {}
                    Err(error) => warn!(%error, "reporters: cannot claim reports; trying again"),
                }
            }
            if in_flight.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(POLL) => {}
                    _ = queue.changed() => {}
                    _ = shutdown.changed() => return,
                }
            }
            // Wake-ups come with every build event: the next round is at least CLAIM_EVERY after
            // this one, so a burst of builds costs the writer a claim per moment, not one per event.
            tokio::select! {
                _ = tokio::time::sleep_until(round + CLAIM_EVERY) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Sends one report and records what became of it, but for a report sent: returns its id
    /// for the caller to settle with the others.
    async fn send_report(
        &self,
        senders: &Senders,
        report: ClaimedReport,
        build: Result<ReportedBuild, String>,
    ) -> Option<i64> {
        let Some(service) = self.config.services.iter().find(|s| s.name() == report.reporter) else {
            // A reporter removed from the configuration since: nobody will send it.
            let _ = self.store.settle_report(report.id, self.masterid, Settled::Skipped, "no such reporter").await;
            return None;
        };
        let outcome = match (
            senders.http.get(&service.ca_file().map(std::path::Path::to_path_buf)),
            self.build_facts(report.buildid, build, service).await,
        ) {
            (Some(client), Ok(facts)) => {
                send(client, &senders.tokens, service, &report, &facts, &self.config.buildbot_url()).await
            }
            (None, _) => {
                Outcome::Retry(Duration::from_secs(60), "no HTTP client: its ca_file could not be read".into())
            }
            (_, Err(error)) => Outcome::Retry(Duration::from_secs(5), format!("cannot read the build: {error}")),
        };
        let reporter = report.reporter.as_str();
        crate::telemetry::report(reporter, outcome_name(&outcome));
        let settled = match &outcome {
            Outcome::Sent => return Some(report.id),
            Outcome::Skip(why) => {
                self.store.settle_report(report.id, self.masterid, Settled::Skipped, why).await.map(drop)
            }
            Outcome::Refused(answer) => {
                warn!(reporter, buildid = report.buildid, %answer, "the forge refused a report; not retried");
                self.store.settle_report(report.id, self.masterid, Settled::Failed, answer).await.map(drop)
            }
            Outcome::Retry(after, answer) => {
                let now = self.store.now_ms();
                if now - report.created_at_ms > MAX_AGE_MS {
                    warn!(reporter, buildid = report.buildid, %answer, "a report kept failing for a day; abandoned");
                    self.store.settle_report(report.id, self.masterid, Settled::Abandoned, answer).await.map(drop)
                } else {
                    info!(reporter, buildid = report.buildid, %answer, retry_in = ?after, "a report will be retried");
                    self.store.retry_report(report.id, self.masterid, now + after.as_millis() as i64, answer).await
                }
            }
        };
        if let Err(error) = settled {
            // The claim lapses and the report is sent again: at least once, never lost.
            warn!(reporter, %error, "cannot record what happened to a report");
        }
        None
    }

    async fn build_facts(
        &self,
        buildid: i64,
        build: Result<ReportedBuild, String>,
        service: &ServiceConfig,
    ) -> Result<BuildFacts, String> {
        let build = build?;
        let previous = if service.coverage().needs_previous() {
            self.store.previous_build_results(build.builderid, build.number).await.map_err(|e| e.to_string())?
        } else {
            None
        };
        // Only the HTTP push sends the build and its request whole, as the REST API shows them.
        let (object, request) = if matches!(service, ServiceConfig::HttpPush(_)) {
            let one = |resource: Resource, field: &str, id: i64| {
                let query = ListQuery {
                    filters: vec![Filter { field: field.into(), op: Op::Eq, values: vec![id.to_string()] }],
                    ..Default::default()
                };
                async move {
                    let (mut rows, _) = self.store.list(resource, &query).await.map_err(|e| e.to_string())?;
                    rows.pop().ok_or_else(|| format!("no {} {id}", resource.plural()))
                }
            };
            let object = one(Resource::Builds, "buildid", buildid).await?;
            let brid = object.get("buildrequestid").and_then(Value::as_i64).unwrap_or_default();
            (object, one(Resource::BuildRequests, "buildrequestid", brid).await?)
        } else {
            (Value::Null, Value::Null)
        };
        Ok(BuildFacts {
            previous,
            number: build.number,
            builderid: build.builderid,
            builder: build.builder,
            results: build.results,
            state_string: build.state_string,
            sourcestamps: build.sourcestamps,
            properties: build.properties,
            buildsetid: build.buildsetid,
            request,
            object,
        })
    }
}

/// What the reporters send with: HTTP clients by the extra authorities they trust, and tokens.
struct Senders {
    http: std::collections::HashMap<Option<std::path::PathBuf>, reqwest::Client>,
    tokens: Tokens,
}

/// The reporters' tokens, each read from its file or environment at most once per
/// [`TOKEN_FOR`]: a rotated token file is in use within that, and a report the forge refuses
/// with the old token is retried with the new one.
#[derive(Debug, Default)]
struct Tokens(std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, Option<String>)>>);

impl Tokens {
    /// The reporter's token, read again when the copy held is older than [`TOKEN_FOR`].
    fn get(&self, service: &ServiceConfig) -> Option<String> {
        let mut tokens = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((read_at, token)) = tokens.get(service.name())
            && read_at.elapsed() < TOKEN_FOR
        {
            return token.clone();
        }
        let token = service.credential();
        tokens.insert(service.name().to_owned(), (std::time::Instant::now(), token.clone()));
        token
    }

    /// Reads the reporter's token again; true when it is no longer `used` (an HTTP push without
    /// a bearer token sends none, which never changes).
    fn changed(&self, service: &ServiceConfig, used: &str) -> bool {
        let token = service.credential();
        let changed = token.as_deref().unwrap_or_default() != used;
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(service.name().to_owned(), (std::time::Instant::now(), token));
        changed
    }
}

/// An HTTP client trusting the system's authorities and those in `ca_file`.
fn http_client(ca_file: Option<&std::path::Path>) -> Result<reqwest::Client, String> {
    let mut builder =
        reqwest::Client::builder().timeout(SEND_TIMEOUT).user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| format!("{}: {e}", path.display()))? {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(|e| e.to_string())
}

/// What a report says, read from the store.
#[derive(Debug, Clone)]
struct BuildFacts {
    number: i64,
    builderid: i64,
    builder: String,
    results: Option<Results>,
    /// The results of the builder's build before this one, when the reporter's modes need it.
    previous: Option<Results>,
    state_string: String,
    sourcestamps: Vec<SourceStamp>,
    properties: Properties,
    buildsetid: i64,
    /// The build's request, as the REST API shows it (for the HTTP push only; null otherwise).
    request: Value,
    /// The build as the REST API shows it, with its properties (for the HTTP push only).
    object: Value,
}

fn outcome_name(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Sent => "sent",
        Outcome::Retry(..) => "retried",
        Outcome::Refused(_) => "failed",
        Outcome::Skip(_) => "skipped",
    }
}

async fn send(
    client: &reqwest::Client,
    tokens: &Tokens,
    service: &ServiceConfig,
    report: &ClaimedReport,
    facts: &BuildFacts,
    base_url: &str,
) -> Outcome {
    let finished = report.event == "finished";
    if finished
        && let Some(results) = facts.results
        && !service.coverage().reports(results, facts.previous)
    {
        return Outcome::Skip(format!("mode does not report {}", results.name()));
    }
    let url = build_url(base_url, facts);
    let Some(credential) =
        tokens.get(service).or_else(|| matches!(service, ServiceConfig::HttpPush(_)).then(String::new))
    else {
        return Outcome::Retry(Duration::from_secs(60), "the reporter's token cannot be read".into());
    };
    let request = match service {
        ServiceConfig::GithubStatus(forge) => match commit_status(Forge::Github, forge, report, facts, &url) {
            Ok((endpoint, body)) => github_post(client, endpoint, &credential, &body),
            Err(skip) => return skip,
        },
        ServiceConfig::GitlabStatus(forge) => match commit_status(Forge::Gitlab, forge, report, facts, &url) {
            Ok((endpoint, body)) => client.post(endpoint).header("PRIVATE-TOKEN", credential.as_str()).json(&body),
            Err(skip) => return skip,
        },
        ServiceConfig::GithubComment(comment) => match pull_request_comment(comment, facts, &url) {
            Ok((endpoint, body)) => github_post(client, endpoint, &credential, &body),
            Err(skip) => return skip,
        },
        ServiceConfig::HttpPush(push) => {
            let mut body = facts.object.clone();
            body["url"] = json!(url);
            body["builder"] = json!({ "builderid": facts.builderid, "name": facts.builder });
            body["buildset"] = json!({
                "bsid": facts.buildsetid,
                "sourcestamps": facts.sourcestamps.iter().map(sourcestamp_json).collect::<Vec<_>>(),
            });
            body["buildrequest"] = facts.request.clone();
            http_push(client, push, &credential).json(&body)
        }
    };
    match request.send().await {
        Ok(response) => {
            let outcome = answer(response.status().as_u16(), response.headers());
            // What the forge said is kept with a report it refused or failed; an answer read to
            // its end also leaves its connection to the pool for the next report.
            let body = read_answer(response).await;
            match outcome {
                Outcome::Refused(status) if status == "401" && tokens.changed(service, &credential) => Outcome::Retry(
                    Duration::from_secs(1),
                    "401 with a token replaced since: retrying with the new one".into(),
                ),
                Outcome::Refused(status) => Outcome::Refused(with_message(status, &body)),
                Outcome::Retry(after, status) => Outcome::Retry(after, with_message(status, &body)),
                outcome => outcome,
            }
        }
        Err(error) => Outcome::Retry(backoff(report.attempts), format!("no answer: {}", error_chain(&error))),
    }
}

/// The body of a forge's answer, up to [`ANSWER_LIMIT`] (a longer one is left unread).
async fn read_answer(mut response: reqwest::Response) -> Vec<u8> {
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        if body.len() + chunk.len() > ANSWER_LIMIT {
            break;
        }
        body.extend_from_slice(&chunk);
    }
    body
}

/// `status` with what the forge said of it: the `message` (GitHub, GitLab) or `error` of a JSON
/// answer, shortened.
fn with_message(status: String, body: &[u8]) -> String {
    let said = serde_json::from_slice::<Value>(body).ok().and_then(|answer| {
        ["message", "error"].iter().find_map(|field| answer.get(*field).and_then(Value::as_str).map(str::to_owned))
    });
    match said {
        Some(message) if !message.trim().is_empty() => {
            let message: String = message.trim().chars().take(200).collect();
            format!("{status}: {message}")
        }
        _ => status,
    }
}

/// A POST to GitHub's REST API with the token, as GitHub documents its use.
fn github_post(client: &reqwest::Client, endpoint: String, token: &str, body: &Value) -> reqwest::RequestBuilder {
    client
        .post(endpoint)
        .header("Authorization", format!("token {token}"))
        .header("Accept", "application/vnd.github+json")
        .json(body)
}

fn http_push(client: &reqwest::Client, push: &HttpPushConfig, bearer: &str) -> reqwest::RequestBuilder {
    let request = client.post(&push.url);
    match (&push.user, &push.password_env) {
        (Some(user), Some(var)) => request.basic_auth(user, std::env::var(var).ok()),
        _ if !bearer.is_empty() => request.bearer_auth(bearer),
        _ => request,
    }
}

/// The two forges whose commit statuses Kiln sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Forge {
    Github,
    Gitlab,
}

/// The endpoint and body of a commit status, or why there is none.
fn commit_status(
    forge: Forge,
    config: &ForgeStatusConfig,
    report: &ClaimedReport,
    facts: &BuildFacts,
    url: &str,
) -> Result<(String, Value), Outcome> {
    let source = facts.sourcestamps.iter().find(|s| s.revision.is_some() && repo_path(&s.repository).is_some());
    let Some(source) = source else {
        return Err(Outcome::Skip("no forge repository and revision to report on".into()));
    };
    let (owner, repo) = repo_path(&source.repository).unwrap_or_default();
    let sha = source.revision.clone().unwrap_or_default();
    let mut props = facts.properties.clone();
    props.set("buildername", json!(facts.builder), "Builder");
    props.set("buildnumber", json!(facts.number), "Build");
    let views: Vec<SourceView> = facts.sourcestamps.iter().map(SourceView::from).collect();
    let context = crate::properties::interpolate(&config.context, &props, &views)
        .unwrap_or_else(|_| format!("buildbot/{}", facts.builder));
    let started = report.event == "started";
    let description =
        if started { "Build started.".to_owned() } else { format!("Build done: {}.", facts.state_string) };
    Ok(match forge {
        Forge::Github => {
            let state = match (started, facts.results) {
                (true, _) => "pending",
                (false, Some(Results::Success | Results::Warnings | Results::Skipped)) => "success",
                (false, Some(Results::Failure)) => "failure",
                (false, _) => "error",
            };
            let endpoint = format!("{}/repos/{owner}/{repo}/statuses/{sha}", config.base_url("https://api.github.com"));
            (endpoint, json!({ "state": state, "target_url": url, "description": description, "context": context }))
        }
        Forge::Gitlab => {
            let state = match (started, facts.results) {
                (true, _) => "running",
                (false, Some(Results::Success | Results::Warnings | Results::Skipped)) => "success",
                (false, Some(Results::Cancelled)) => "canceled",
                (false, _) => "failed",
            };
            // The project by its path, URL-encoded, as GitLab's API accepts it in place of an id.
            let project = format!("{owner}%2F{}", repo.replace('/', "%2F"));
            let endpoint =
                format!("{}/api/v4/projects/{project}/statuses/{sha}", config.base_url("https://gitlab.com"));
            let mut body = json!({ "state": state, "target_url": url, "description": description, "name": context });
            if let Some(branch) = &source.branch {
                body["ref"] = json!(branch);
            }
            (endpoint, body)
        }
    })
}

/// The endpoint and body of a comment on the pull request the build was for, or why there is
/// none (the build was not of a pull request's change).
fn pull_request_comment(
    config: &GithubCommentConfig,
    facts: &BuildFacts,
    url: &str,
) -> Result<(String, Value), Outcome> {
    let pull = facts.properties.get("pullrequesturl").and_then(Value::as_str).unwrap_or_default();
    // https://github.com/OWNER/REPO/pull/NUMBER
    let path: Vec<&str> = pull.split_once("://").map_or("", |(_, rest)| rest).split('/').skip(1).collect();
    let (owner, repo, number) = match path.as_slice() {
        [owner, repo, "pull", number] if number.parse::<u64>().is_ok() => (*owner, *repo, *number),
        _ => return Err(Outcome::Skip("not a pull request's build".into())),
    };
    let mut props = facts.properties.clone();
    props.set("buildername", json!(facts.builder), "Builder");
    props.set("buildnumber", json!(facts.number), "Build");
    props.set("result", json!(facts.results.map_or("unknown", Results::name).to_lowercase()), "Reporter");
    props.set("build_url", json!(url), "Reporter");
    let views: Vec<SourceView> = facts.sourcestamps.iter().map(SourceView::from).collect();
    let text = crate::properties::interpolate(&config.template, &props, &views)
        .map_err(|e| Outcome::Refused(format!("the template does not render: {e}")))?;
    let endpoint =
        format!("{}/repos/{owner}/{repo}/issues/{number}/comments", config.base_url("https://api.github.com"));
    Ok((endpoint, json!({ "body": text })))
}

/// The owner (GitHub's owner, GitLab's top-level group) and the rest of a repository's path on
/// its forge, from its URL (`https://github.com/o/r.git`, `git@github.com:o/r.git`,
/// `ssh://git@gitlab.example/group/sub/r`): `r`, or `sub/r` in a GitLab subgroup.
fn repo_path(url: &str) -> Option<(String, String)> {
    let path = if let Some(rest) = url.split_once("://").map(|(_, rest)| rest) {
        rest.split_once('/')?.1
    } else {
        url.split_once(':')?.1
    };
    let path = path.trim_end_matches('/').trim_end_matches(".git");
    let (owner, repo) = path.split_once('/')?;
    (!owner.is_empty() && !repo.is_empty() && !repo.split('/').any(str::is_empty))
        .then(|| (owner.to_owned(), repo.to_owned()))
}

fn sourcestamp_json(source: &SourceStamp) -> Value {
    json!({
        "branch": source.branch, "revision": source.revision, "repository": source.repository,
        "project": source.project, "codebase": source.codebase,
    })
}

/// The build's page in the web UI.
fn build_url(base_url: &str, facts: &BuildFacts) -> String {
    format!("{}/#/builders/{}/builds/{}", base_url.trim_end_matches('/'), facts.builderid, facts.number)
}

/// What an answer means: 2xx sent; rate limits and server errors retried (after `Retry-After` or
/// the rate limit's reset when given); other refusals final.
fn answer(status: u16, headers: &reqwest::header::HeaderMap) -> Outcome {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let retry_after = header("retry-after").and_then(|v| v.trim().parse::<u64>().ok()).map(Duration::from_secs);
    let reset = header("x-ratelimit-reset").and_then(|v| v.trim().parse::<u64>().ok()).map(|at| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        Duration::from_secs(at.saturating_sub(now).max(1))
    });
    let limited = header("x-ratelimit-remaining").as_deref() == Some("0") || retry_after.is_some();
    match status {
        200..=299 => Outcome::Sent,
        429 => {
            Outcome::Retry(retry_after.or(reset).unwrap_or(Duration::from_secs(60)), format!("{status}: rate limited"))
        }
        403 if limited => {
            Outcome::Retry(retry_after.or(reset).unwrap_or(Duration::from_secs(60)), format!("{status}: rate limited"))
        }
        408 | 500..=599 => Outcome::Retry(retry_after.unwrap_or(Duration::from_secs(2)), format!("{status}")),
        _ => Outcome::Refused(format!("{status}")),
    }
}

/// 2 s, 4 s, 8 s … up to five minutes.
fn backoff(attempts: i64) -> Duration {
    Duration::from_secs(2u64.saturating_pow(attempts.clamp(0, 16) as u32 + 1)).min(MAX_BACKOFF)
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_urls_name_their_forge_repository() {
        for url in [
            "https://github.com/o/r.git",
            "https://github.com/o/r",
            "git@github.com:o/r.git",
            "ssh://git@ghe.example/o/r",
        ] {
            assert_eq!(repo_path(url), Some(("o".into(), "r".into())), "{url}");
        }
        assert_eq!(repo_path("https://gitlab.example/g/sub/r.git"), Some(("g".into(), "sub/r".into())));
        assert_eq!(repo_path("https://github.com/o"), None);
        assert_eq!(repo_path("/srv/git/r.git"), None);
    }

    #[test]
    fn a_refusal_is_retried_only_for_a_token_replaced_since() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "first\n").unwrap();
        let github: ServiceConfig = serde_json::from_value(json!({
            "type": "github_status", "name": "gh", "token_file": file, "base_url": "http://127.0.0.1:1"
        }))
        .unwrap();
        let tokens = Tokens::default();
        assert_eq!(tokens.get(&github).as_deref(), Some("first"));
        std::fs::write(&file, "second\n").unwrap();
        assert_eq!(tokens.get(&github).as_deref(), Some("first"), "held for a while");
        assert!(!tokens.changed(&github, "second"));
        assert!(tokens.changed(&github, "first"));
        assert_eq!(tokens.get(&github).as_deref(), Some("second"), "read again when it changed");
        let push: ServiceConfig =
            serde_json::from_value(json!({ "type": "http_push", "name": "p", "url": "http://127.0.0.1:1/" })).unwrap();
        assert!(!tokens.changed(&push, ""), "a push without a token has none to replace");
    }

    #[test]
    fn answers_are_sent_retried_or_refused() {
        let none = reqwest::header::HeaderMap::new();
        assert_eq!(answer(201, &none), Outcome::Sent);
        assert!(matches!(answer(502, &none), Outcome::Retry(..)));
        assert_eq!(answer(401, &none), Outcome::Refused("401".into()));
        assert_eq!(answer(403, &none), Outcome::Refused("403".into()));
        let mut limited = reqwest::header::HeaderMap::new();
        limited.insert("retry-after", "7".parse().unwrap());
        assert_eq!(answer(403, &limited), Outcome::Retry(Duration::from_secs(7), "403: rate limited".into()));
        assert_eq!(answer(429, &limited), Outcome::Retry(Duration::from_secs(7), "429: rate limited".into()));
        assert_eq!(backoff(0), Duration::from_secs(2));
        assert_eq!(with_message("401".into(), br#"{"message": "Bad credentials"}"#), "401: Bad credentials");
        assert_eq!(with_message("404".into(), br#"{"error": "404 Project Not Found"}"#), "404: 404 Project Not Found");
        assert_eq!(with_message("502".into(), b"<html>Bad gateway</html>"), "502");
        assert_eq!(backoff(40), MAX_BACKOFF);
    }
}
