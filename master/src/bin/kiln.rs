//! `kiln`: Kiln at a terminal. Lists builders, the queue, workers and pools, forces builds and
//! follows a build's log as it is written, through the master's REST API and JSON-RPC control.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(version, about = "Kiln at a terminal: builders, queue, workers, pools, force, logs")]
struct Args {
    /// The master's HTTP address.
    #[arg(long, env = "KILN_URL", default_value = "http://127.0.0.1:8010", global = true)]
    url: String,
    /// A bearer token for control actions, when the master requires one.
    #[arg(long, env = "KILN_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// The builders.
    Builders,
    /// Build requests waiting or running, highest priority first.
    Queue,
    /// Workers, their pool and state.
    Workers,
    /// Worker pools: desired and actual workers.
    Pools,
    /// Forces a build of a builder; prints the build request's id.
    Force {
        builder: String,
        /// The force scheduler to use (default: the first that offers the builder).
        #[arg(long)]
        scheduler: Option<String>,
        #[arg(long)]
        branch: Option<String>,
        #[arg(long)]
        revision: Option<String>,
        #[arg(long, default_value = "forced from the command line")]
        reason: String,
        /// A property, as name=value (repeatable).
        #[arg(short = 'p', long = "property")]
        properties: Vec<String>,
        /// Follow the build's log until it finishes.
        #[arg(short, long)]
        follow: bool,
    },
    /// Prints a build's logs; with -f, follows them until the build finishes.
    Logs {
        buildid: i64,
        #[arg(short, long)]
        follow: bool,
    },
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{0}")]
    Http(#[from] reqwest::Error),
    #[error("{0}")]
    Api(String),
}

struct Client {
    http: reqwest::Client,
    url: String,
    token: Option<String>,
}

impl Client {
    async fn get(&self, path: &str) -> Result<Value, CliError> {
        let response = self.http.get(format!("{}{path}", self.url)).send().await?;
        let status = response.status();
        let body: Value = response.json().await?;
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
        let reply: Value = request.send().await?.json().await?;
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

/// Prints the build's log lines from where it left off; returns the build's state once it has
/// finished (read before the logs, so no line written before the end is missed).
async fn print_logs(
    client: &Client,
    buildid: i64,
    seen: &mut std::collections::HashMap<i64, i64>,
) -> Result<Option<String>, CliError> {
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
    Ok((build["complete"] == true).then(|| text(&build["state_string"])))
}

async fn follow(client: &Client, buildid: i64, wait: bool) -> Result<(), CliError> {
    let mut seen = std::collections::HashMap::new();
    loop {
        let finished = print_logs(client, buildid, &mut seen).await?;
        if let Some(state) = &finished {
            println!("build {buildid}: {state}");
        }
        if finished.is_some() || !wait {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One arm per subcommand, each a request and its table: a long match that reads best whole.
async fn run(args: Args) -> Result<(), CliError> {
    let client =
        Client { http: reqwest::Client::new(), url: args.url.trim_end_matches('/').to_owned(), token: args.token };
    match args.command {
        Cmd::Builders => {
            let builders = client.get("/api/v2/builders").await?;
            let rows = builders["builders"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| vec![text(&b["builderid"]), text(&b["name"]), text(&b["description"])])
                .collect();
            table(&["id", "name", "description"], rows);
        }
        Cmd::Queue => {
            let names = builder_names(&client).await?;
            let requests =
                client.get("/api/v2/buildrequests?complete=false&order=-priority&order=submitted_at").await?;
            let rows = requests["buildrequests"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    let builder = r["builderid"].as_i64().and_then(|id| names.get(&id).cloned()).unwrap_or_default();
                    let state = if r["claimed"] == true { "running" } else { "pending" };
                    vec![
                        text(&r["buildrequestid"]),
                        builder,
                        text(&r["priority"]),
                        state.to_owned(),
                        text(&r["submitted_at"]),
                    ]
                })
                .collect();
            table(&["request", "builder", "priority", "state", "submitted"], rows);
        }
        Cmd::Workers => {
            let workers = client.get("/api/v2/workers").await?;
            let rows = workers["workers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|w| {
                    let connected = w["connected_to"].as_array().is_some_and(|c| !c.is_empty());
                    let state = match (connected, w["paused"] == true, w["graceful"] == true) {
                        (false, _, _) => "disconnected",
                        (true, true, _) => "paused",
                        (true, _, true) => "stopping",
                        _ => "connected",
                    };
                    vec![
                        text(&w["name"]),
                        text(&w["workerinfo"]["pool"]),
                        state.to_owned(),
                        text(&w["workerinfo"]["host"]),
                    ]
                })
                .collect();
            table(&["name", "pool", "state", "host"], rows);
        }
        Cmd::Pools => {
            let pools = client.get("/api/v2/pools").await?;
            let rows = pools["pools"]
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
                .collect();
            table(&["pool", "backend", "pending", "desired", "workers", "busy", "range", "leader", "error"], rows);
        }
        Cmd::Force { builder, scheduler, branch, revision, reason, properties, follow: wait } => {
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
            if let Some(branch) = branch {
                params["branch"] = json!(branch);
            }
            if let Some(revision) = revision {
                params["revision"] = json!(revision);
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
                follow(&client, buildid, true).await?;
            }
        }
        Cmd::Logs { buildid, follow: wait } => follow(&client, buildid, wait).await?,
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kiln: {error}");
            ExitCode::FAILURE
        }
    }
}
