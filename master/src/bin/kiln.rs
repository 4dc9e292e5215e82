//! `kiln`: Kiln at a terminal. Lists builders, the queue, workers and pools, forces builds and
//! follows a build's log as it is written, through the master's REST API and JSON-RPC control.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Kiln at a terminal: builders, queue, workers, pools, force, logs",
    after_help = "Exit status: 0 on success; 1 when a followed build does not end SUCCESS (or WARNINGS, \
                  unless --warnings-fail); 2 when the master cannot be reached or refuses the request."
)]
struct Args {
    /// The master's HTTP address.
    #[arg(long, env = "KILN_URL", hide_env_values = true, default_value = "http://127.0.0.1:8010", global = true)]
    url: String,
    /// A bearer token for control actions, when the master requires one.
    #[arg(long, env = "KILN_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Print listings as JSON (the API's objects), for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The builders.
    Builders,
    /// Build requests waiting or running, highest priority first.
    Queue,
    /// Workers: their pool, whether they are connected, busy or idle, and what they build.
    Workers,
    /// Worker pools: desired and actual workers.
    Pools,
    /// What happened to the newest reports (commit statuses, HTTP pushes), newest first.
    Reports {
        /// Only reports in this state: held (its build still running), pending, sent, skipped,
        /// failed or abandoned.
        #[arg(long)]
        state: Option<String>,
    },
    /// Forces a build of a builder; prints the build request's id.
    Force {
        /// The builder to build.
        builder: String,
        /// The force scheduler to use (default: the first that offers the builder).
        #[arg(long)]
        scheduler: Option<String>,
        /// The branch to build.
        #[arg(long)]
        branch: Option<String>,
        /// The revision to build (default: the branch's tip, or what the builder's steps fetch).
        #[arg(long)]
        revision: Option<String>,
        /// The repository to build (a URL or a path the workers can reach).
        #[arg(long)]
        repository: Option<String>,
        /// Why, shown on the build.
        #[arg(long, default_value = "forced from the command line")]
        reason: String,
        /// A property, as name=value (repeatable).
        #[arg(short = 'p', long = "property")]
        properties: Vec<String>,
        /// Follow the build's log until it finishes; exit 1 unless it ends SUCCESS or WARNINGS.
        #[arg(short, long)]
        follow: bool,
        /// With --follow, a build that ends WARNINGS fails too.
        #[arg(long)]
        warnings_fail: bool,
    },
    /// Prints a build's logs, by build id (`kiln force` and the API show it); with -f, follows
    /// them until the build finishes and exits 1 unless it ends SUCCESS or WARNINGS.
    Logs {
        /// The build's id (`buildid` in the API, not its number within the builder).
        buildid: i64,
        /// Follow the logs until the build finishes.
        #[arg(short, long)]
        follow: bool,
        /// With --follow, a build that ends WARNINGS fails too.
        #[arg(long)]
        warnings_fail: bool,
    },
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("cannot connect to {url}: is kiln-master running? ({source})")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("{0}")]
    Http(reqwest::Error),
    #[error("{0}")]
    Api(String),
}

impl CliError {
    fn from_http(url: &str, error: reqwest::Error) -> CliError {
        if error.is_connect() || error.is_timeout() {
            CliError::Unreachable { url: url.to_owned(), source: error }
        } else {
            CliError::Http(error)
        }
    }
}

/// How a command ended: its exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Done,
    /// A followed build did not end as the caller wanted.
    BuildFailed,
}

struct Client {
    http: reqwest::Client,
    url: String,
    token: Option<String>,
}

impl Client {
    async fn get(&self, path: &str) -> Result<Value, CliError> {
        let http = |e| CliError::from_http(&self.url, e);
        let response = self.http.get(format!("{}{path}", self.url)).send().await.map_err(http)?;
        let status = response.status();
        let body: Value = response.json().await.map_err(http)?;
        if !status.is_success() {
            return Err(CliError::Api(format!("{path}: {status}: {}", body["error"].as_str().unwrap_or("error"))));
        }
        Ok(body)
    }

    async fn rpc(&self, path: &str, method: &str, params: Value) -> Result<Value, CliError> {
        let mut request = self
            .http
            .post(format!("{}{path}", self.url))
            .json(&json!({ "jsonrpc": "2.0", "id": 1, "method": method, "params": params }));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let http = |e| CliError::from_http(&self.url, e);
        let reply: Value = request.send().await.map_err(http)?.json().await.map_err(http)?;
        if let Some(error) = reply.get("error").filter(|e| !e.is_null()) {
            return Err(CliError::Api(error["message"].as_str().unwrap_or("error").to_owned()));
        }
        Ok(reply["result"].clone())
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// An API time (epoch seconds) on the local clock, `-` when unset.
fn time(value: &Value) -> String {
    let Some(seconds) = value.as_f64() else { return "-".to_owned() };
    match jiff::Timestamp::from_millisecond((seconds * 1000.0) as i64) {
        Ok(at) => at.to_zoned(jiff::tz::TimeZone::system()).strftime("%Y-%m-%d %H:%M:%S").to_string(),
        Err(_) => text(value),
    }
}

/// Prints a listing: the API's objects as JSON with `--json`, else aligned columns.
fn listing(json: bool, objects: &Value, header: &[&str], rows: impl FnOnce() -> Vec<Vec<String>>) {
    if json {
        println!("{}", serde_json::to_string_pretty(objects).unwrap_or_default());
    } else {
        table(header, rows());
    }
}

/// Prints rows as aligned columns.
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_uppercase()).collect());
    for row in rows {
        line(row);
    }
}

async fn builder_names(client: &Client) -> Result<std::collections::HashMap<i64, String>, CliError> {
    let builders = client.get("/api/v2/builders").await?;
    Ok(builders["builders"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| Some((b["builderid"].as_i64()?, b["name"].as_str()?.to_owned())))
        .collect())
}

/// Prints the build's log lines from where it left off; returns the build's state and result
/// once it has finished (read before the logs, so no line written before the end is missed).
async fn print_logs(
    client: &Client,
    buildid: i64,
    seen: &mut std::collections::HashMap<i64, i64>,
) -> Result<Option<(String, Option<i64>)>, CliError> {
    let build = client.get(&format!("/api/v2/builds/{buildid}")).await?;
    let steps = client.get(&format!("/api/v2/builds/{buildid}/steps")).await?;
    for step in steps["steps"].as_array().into_iter().flatten() {
        let logs = client.get(&format!("/api/v2/steps/{}/logs", step["stepid"])).await?;
        for log in logs["logs"].as_array().into_iter().flatten() {
            let Some(logid) = log["logid"].as_i64() else { continue };
            let offset = seen.entry(logid).or_insert(0);
            let chunk = client.get(&format!("/api/v2/logs/{logid}/contents?offset={offset}")).await?;
            let content = chunk["logchunks"][0]["content"].as_str().unwrap_or_default();
            let stdio = log["type"] == "s";
            for line in content.lines() {
                // Stdio logs prefix each line with its stream: o(ut), e(rr), h(eader).
                let line = if stdio && !line.is_empty() { &line[1..] } else { line };
                println!("[{}] {line}", text(&step["name"]));
                *offset += 1;
            }
        }
    }
    let build = &build["builds"][0];
    Ok((build["complete"] == true).then(|| (text(&build["state_string"]), build["results"].as_i64())))
}

/// Prints the build's logs, following them with `wait` until the build ends; then whether it
/// ended as wanted: SUCCESS, or WARNINGS unless `warnings_fail`.
async fn follow(client: &Client, buildid: i64, wait: bool, warnings_fail: bool) -> Result<Outcome, CliError> {
    let mut seen = std::collections::HashMap::new();
    loop {
        let finished = print_logs(client, buildid, &mut seen).await?;
        if let Some((state, results)) = &finished {
            println!("build {buildid}: {state}");
            if !wait {
                return Ok(Outcome::Done);
            }
            let passed = *results == Some(0) || (*results == Some(1) && !warnings_fail);
            return Ok(if passed { Outcome::Done } else { Outcome::BuildFailed });
        }
        if !wait {
            return Ok(Outcome::Done);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What each worker is building now: `builder#number` of its running builds.
async fn running_builds(client: &Client) -> Result<std::collections::HashMap<i64, Vec<String>>, CliError> {
    let names = builder_names(client).await?;
    let builds = client.get("/api/v2/builds?complete=false").await?;
    let mut by_worker: std::collections::HashMap<i64, Vec<String>> = std::collections::HashMap::new();
    for build in builds["builds"].as_array().into_iter().flatten() {
        let (Some(worker), Some(builder)) = (build["workerid"].as_i64(), build["builderid"].as_i64()) else { continue };
        let builder = names.get(&builder).cloned().unwrap_or_else(|| builder.to_string());
        by_worker.entry(worker).or_default().push(format!("{builder}#{}", text(&build["number"])));
    }
    Ok(by_worker)
}

/// One arm per subcommand, each a request and its table: a long match that reads best whole.
async fn run(args: Args) -> Result<Outcome, CliError> {
    let client =
        Client { http: reqwest::Client::new(), url: args.url.trim_end_matches('/').to_owned(), token: args.token };
    let json = args.json;
    match args.command {
        Cmd::Builders => {
            let builders = client.get("/api/v2/builders").await?;
            listing(json, &builders["builders"], &["id", "name", "description"], || {
                builders["builders"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|b| vec![text(&b["builderid"]), text(&b["name"]), text(&b["description"])])
                    .collect()
            });
        }
        Cmd::Queue => {
            let names = builder_names(&client).await?;
            let requests =
                client.get("/api/v2/buildrequests?complete=false&order=-priority&order=submitted_at").await?;
            listing(
                json,
                &requests["buildrequests"],
                &["request", "builder", "priority", "state", "submitted"],
                || {
                    requests["buildrequests"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|r| {
                            let builder =
                                r["builderid"].as_i64().and_then(|id| names.get(&id).cloned()).unwrap_or_default();
                            let state = if r["claimed"] == true { "running" } else { "pending" };
                            vec![
                                text(&r["buildrequestid"]),
                                builder,
                                text(&r["priority"]),
                                state.to_owned(),
                                time(&r["submitted_at"]),
                            ]
                        })
                        .collect()
                },
            );
        }
        Cmd::Workers => {
            let workers = client.get("/api/v2/workers").await?;
            let running = running_builds(&client).await?;
            listing(json, &workers["workers"], &["name", "pool", "state", "building", "host"], || {
                workers["workers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|w| {
                        let connected = w["connected_to"].as_array().is_some_and(|c| !c.is_empty());
                        let builds =
                            w["workerid"].as_i64().and_then(|id| running.get(&id)).cloned().unwrap_or_default();
                        let state = match (connected, w["paused"] == true, w["graceful"] == true, builds.is_empty()) {
                            (false, ..) => "disconnected",
                            (true, true, ..) => "paused",
                            (true, _, true, _) => "stopping",
                            (true, _, _, true) => "idle",
                            _ => "busy",
                        };
                        let building = if builds.is_empty() { "-".to_owned() } else { builds.join(", ") };
                        vec![
                            text(&w["name"]),
                            text(&w["workerinfo"]["pool"]),
                            state.to_owned(),
                            building,
                            text(&w["workerinfo"]["host"]),
                        ]
                    })
                    .collect()
            });
        }
        Cmd::Pools => {
            let pools = client.get("/api/v2/pools").await?;
            let header = ["pool", "backend", "pending", "desired", "workers", "busy", "range", "leader", "error"];
            listing(json, &pools["pools"], &header, || {
                pools["pools"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| {
                        vec![
                            text(&p["name"]),
                            text(&p["backend"]),
                            text(&p["pending"]),
                            text(&p["desired"]),
                            text(&p["workers"]),
                            text(&p["busy"]),
                            format!("{}..{}", text(&p["min"]), text(&p["max"])),
                            if p["leader"] == true { "yes" } else { "no" }.to_owned(),
                            text(&p["last_error"]),
                        ]
                    })
                    .collect()
            });
        }
        Cmd::Reports { state } => {
            let path = match state {
                Some(state) => format!("/api/v2/reports?state={state}"),
                None => "/api/v2/reports".to_owned(),
            };
            let reports = client.get(&path).await?;
            let header = ["report", "reporter", "build", "event", "state", "attempts", "last answer"];
            listing(json, &reports["reports"], &header, || {
                reports["reports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|r| {
                        vec![
                            text(&r["reportid"]),
                            text(&r["reporter"]),
                            text(&r["buildid"]),
                            text(&r["event"]),
                            text(&r["state"]),
                            text(&r["attempts"]),
                            text(&r["last_answer"]),
                        ]
                    })
                    .collect()
            });
        }
        Cmd::Force {
            builder,
            scheduler,
            branch,
            revision,
            repository,
            reason,
            properties,
            follow: wait,
            warnings_fail,
        } => {
            let scheduler = match scheduler {
                Some(name) => name,
                None => {
                    let schedulers = client.get("/api/v2/forceschedulers").await?;
                    schedulers["forceschedulers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|s| {
                            s["builder_names"].as_array().is_some_and(|b| b.iter().any(|n| *n == builder.as_str()))
                        })
                        .and_then(|s| s["name"].as_str().map(str::to_owned))
                        .ok_or_else(|| CliError::Api(format!("no force scheduler offers builder {builder:?}")))?
                }
            };
            let mut params = json!({ "builderNames": [builder], "reason": reason });
            for (field, value) in [("branch", branch), ("revision", revision), ("repository", repository)] {
                if let Some(value) = value {
                    params[field] = json!(value);
                }
            }
            for property in properties {
                let (name, value) = property
                    .split_once('=')
                    .ok_or_else(|| CliError::Api(format!("property {property:?}: expected name=value")))?;
                params[name] = json!(value);
            }
            let result = client.rpc(&format!("/api/v2/forceschedulers/{scheduler}"), "force", params).await?;
            let brid = result[1].as_object().and_then(|m| m.values().next()).and_then(Value::as_i64);
            let Some(brid) = brid else { return Err(CliError::Api(format!("unexpected reply {result}"))) };
            println!("build request {brid} (buildset {})", text(&result[0]));
            if wait {
                let buildid = loop {
                    let builds = client.get(&format!("/api/v2/buildrequests/{brid}/builds")).await?;
                    if let Some(id) =
                        builds["builds"].as_array().and_then(|b| b.last()).and_then(|b| b["buildid"].as_i64())
                    {
                        break id;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                };
                println!("build {buildid} started");
                return follow(&client, buildid, true, warnings_fail).await;
            }
        }
        Cmd::Logs { buildid, follow: wait, warnings_fail } => {
            return follow(&client, buildid, wait, warnings_fail).await;
        }
    }
    Ok(Outcome::Done)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::BuildFailed) => ExitCode::from(1),
        Err(error) => {
            eprintln!("kiln: {error}");
            ExitCode::from(2)
        }
    }
}
