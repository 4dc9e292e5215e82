//! A `kiln-master` process on free loopback ports, for benchmarks that measure the real binary.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::{binary, free_port};

/// A running `kiln-master` binary.
pub struct MasterProcess {
    pub child: Child,
    pub pid: u32,
    /// `http://127.0.0.1:<port>`
    pub base: String,
    pub grpc_port: u16,
}

impl MasterProcess {
    /// Starts the master with `body` (builders, schedulers, anything but listeners) on top of a
    /// database and data directory, and waits until its API answers and `workers` workers are
    /// connected.
    pub async fn start(database: &str, dir: &std::path::Path, body: &str, workers: u64) -> MasterProcess {
        Self::start_on(database, dir, body, workers, free_port(), free_port()).await
    }

    /// [`MasterProcess::start`] on the given ports (to start workers before the master).
    pub async fn start_on(
        database: &str,
        dir: &std::path::Path,
        body: &str,
        workers: u64,
        http: u16,
        grpc: u16,
    ) -> MasterProcess {
        let config = format!(
            "database: \"{database}\"\ndata_dir: \"{}\"\nhttp: {{listen: \"127.0.0.1:{http}\", auth: open}}\nworkers:\n  listen: \"127.0.0.1:{grpc}\"\n{body}",
            dir.display()
        );
        let path = dir.join("master.yaml");
        std::fs::write(&path, config).unwrap();
        let child = Command::new(binary("kiln-master"))
            .arg("--config")
            .arg(&path)
            .env("KILN_LOG", std::env::var("KILN_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let base = format!("http://127.0.0.1:{http}");
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let connected = match client.get(format!("{base}/api/v2/workers")).send().await {
                Ok(r) => r.json::<serde_json::Value>().await.ok().and_then(|v| v["meta"]["total"].as_u64()),
                Err(_) => None,
            };
            if connected.is_some_and(|n| n >= workers) {
                break;
            }
            assert!(Instant::now() < deadline, "the master did not come up with {workers} workers");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        MasterProcess { child, pid, base, grpc_port: grpc }
    }

    /// Peak resident memory of the master so far, in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        self.memory_mib("VmHWM:")
    }

    /// Resident memory of the master now, in MiB.
    pub fn rss_mib(&self) -> f64 {
        self.memory_mib("VmRSS:")
    }

    /// A memory line of the master's `/proc/<pid>/status`, in MiB.
    fn memory_mib(&self, field: &str) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    }

    /// CPU time the master has used so far (user and system), in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds_of(self.pid)
    }

    /// Kills the master with SIGKILL, as a crash or a lost node would.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// Stops the master with SIGTERM, as an operator would.
    pub async fn stop(mut self) {
        // SAFETY: SIGTERM to our own child process.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
    }
}

/// CPU time process `pid` has used so far (user and system), in seconds.
pub fn cpu_seconds_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    // SAFETY: sysconf only reads a constant of the system.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / per_second
}

/// Forces a build through the `force` scheduler of the master at `base`; returns the request id.
pub async fn force(client: &reqwest::Client, base: &str) -> i64 {
    force_with(client, base, serde_json::json!({})).await
}

/// Forces a build through the `force` scheduler of the master at `base` with `params`; returns
/// the (first) request's id.
pub async fn force_with(client: &reqwest::Client, base: &str, params: serde_json::Value) -> i64 {
    let body = serde_json::json!({ "jsonrpc": "2.0", "method": "force", "id": 1, "params": params });
    let reply: serde_json::Value = client
        .post(format!("{base}/api/v2/forceschedulers/force"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    reply["result"][1].as_object().and_then(|m| m.values().next()).and_then(|v| v.as_i64()).expect("a request id")
}

/// Waits up to a minute for build request `brid` of the master at `base` to complete; returns it.
pub async fn wait_request(client: &reqwest::Client, base: &str, brid: i64) -> serde_json::Value {
    crate::eventually(&format!("request {brid} to complete"), Duration::from_secs(60), || async {
        let reply: serde_json::Value =
            client.get(format!("{base}/api/v2/buildrequests/{brid}")).send().await.ok()?.json().await.ok()?;
        let request = reply["buildrequests"][0].clone();
        (request["complete"] == true).then_some(request)
    })
    .await
}

/// How many build requests of the master at `base` are complete (`true`) or not (`false`).
pub async fn requests_with(client: &reqwest::Client, base: &str, complete: bool) -> i64 {
    let reply: serde_json::Value = client
        .get(format!("{base}/api/v2/buildrequests?complete={complete}&limit=1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    reply["meta"]["total"].as_i64().unwrap_or(0)
}

/// How many build requests of the master at `base` are complete.
pub async fn completed(client: &reqwest::Client, base: &str) -> i64 {
    requests_with(client, base, true).await
}

/// Polls until `count` requests are complete. Latencies come from the database's timestamps, so
/// the poll interval only bounds how soon a benchmark notices, not what it measures.
pub async fn wait_completed(client: &reqwest::Client, base: &str, count: i64, limit: Duration, every: Duration) {
    let deadline = Instant::now() + limit;
    while completed(client, base).await < count {
        assert!(Instant::now() < deadline, "builds did not complete within {limit:?}");
        tokio::time::sleep(every).await;
    }
}

/// (submitted_at, started_at, complete_at) in ms of each complete request with id > `after`
/// and its build, by request id.
pub async fn timings(database: &str, after: i64) -> Vec<(i64, i64, i64)> {
    use sqlx::Row;
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(database).await.unwrap();
    let rows = sqlx::query(
        "SELECT r.submitted_at, b.started_at, r.complete_at FROM buildrequests r JOIN builds b ON b.buildrequestid = r.id \
         WHERE r.id > $1 AND r.complete = 1 ORDER BY r.id",
    )
    .bind(after)
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    rows.iter()
        .map(|r| (r.get::<i64, _>(0), r.get::<i64, _>(1), r.get::<Option<i64>, _>(2).unwrap_or_default()))
        .collect()
}

/// `(id, number, complete_at in ms)` of each finished build with id > `after`.
pub async fn finished_builds(database: &str, after: i64) -> Vec<(i64, i64, i64)> {
    use sqlx::Row;
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(database).await.unwrap();
    let rows = sqlx::query("SELECT id, number, complete_at FROM builds WHERE id > $1 AND complete_at IS NOT NULL")
        .bind(after)
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    rows.iter().map(|r| (r.get::<i64, _>(0), r.get::<i64, _>(1), r.get::<i64, _>(2))).collect()
}

/// The database URL a benchmark runs on: `sqlite` (a file in `dir`) or `postgres` (a throwaway
/// cluster with the default, durable settings).
pub async fn bench_database(kind: &str, dir: &std::path::Path) -> String {
    match kind {
        "sqlite" => format!("sqlite://{}", dir.join("kiln.sqlite").display()),
        "postgres" => {
            // SAFETY: set before the cluster starts and before any thread reads it.
            unsafe { std::env::set_var("KILN_PG_DURABLE", "1") };
            crate::pg::fresh_database().await
        }
        other => panic!("unknown database {other}: use sqlite or postgres"),
    }
}

/// The `p`th percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// A `kiln-master` process for the fault suite: its ports and configuration are fixed when it is
/// made, so it can be killed and started again in place, as a crashed master is restarted.
pub struct MasterNode {
    pub name: String,
    pub http: u16,
    pub grpc: u16,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
    child: Option<Child>,
}

impl MasterNode {
    /// Writes the configuration of master `name` — `body` (builders, schedulers) on `database`,
    /// the test token, heartbeats of 0.5 s and a lease of `lease` seconds — and starts it.
    pub async fn start(dir: &std::path::Path, name: &str, database: &str, lease: u64, body: &str) -> MasterNode {
        Self::start_as(dir, name, name, database, lease, body).await
    }

    /// [`MasterNode::start`] for a process called `node` here (its files and ports are its own)
    /// that runs as master `name`, so two processes can share one master name.
    pub async fn start_as(
        dir: &std::path::Path,
        node: &str,
        name: &str,
        database: &str,
        lease: u64,
        body: &str,
    ) -> MasterNode {
        Self::start_with_workers(dir, node, name, database, lease, "", body).await
    }

    /// [`MasterNode::start_as`] with more of the `workers` section: `workers` are YAML lines
    /// indented by two spaces (such as a `buildbot:` list).
    pub async fn start_with_workers(
        dir: &std::path::Path,
        node: &str,
        name: &str,
        database: &str,
        lease: u64,
        workers: &str,
        body: &str,
    ) -> MasterNode {
        let (http, grpc) = (free_port(), free_port());
        let data = dir.join(format!("data-{node}"));
        let config = format!(
            "master_name: {name}\ndatabase: \"{database}\"\ndata_dir: \"{}\"\nhttp: {{listen: \"127.0.0.1:{http}\", auth: open}}\n\
             workers:\n  listen: \"127.0.0.1:{grpc}\"\n  heartbeat_interval: 0.5\n  lease_seconds: {lease}\n  \
             tokens: [{{name: test, value: {}}}]\n{workers}{body}",
            data.display(),
            crate::system::TOKEN
        );
        let path = dir.join(format!("master-{node}.yaml"));
        std::fs::write(&path, config).expect("master config");
        let mut node = MasterNode {
            name: node.to_owned(),
            http,
            grpc,
            config: path,
            log: dir.join(format!("master-{node}.log")),
            child: None,
        };
        node.restart().await;
        node
    }

    /// `http://127.0.0.1:<port>` of the API.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }

    /// The worker endpoint's URL.
    pub fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc)
    }

    /// Starts the process (again) and waits until its API answers.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "master {} is running", self.name);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("master log");
        let child = Command::new(binary("kiln-master"))
            .arg("--config")
            .arg(&self.config)
            .env("KILN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn kiln-master");
        self.child = Some(child);
        let client = reqwest::Client::new();
        let url = format!("{}/api/v2/masters", self.base());
        crate::eventually(&format!("master {} to answer", self.name), Duration::from_secs(60), || {
            let request = client.get(&url).send();
            async move { request.await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
        })
        .await;
    }

    /// Kills the process with SIGKILL, as a crash or a lost node would, and reaps it.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// What the process has logged so far (across restarts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal to the running process.
    pub fn signal(&self, signal: i32) {
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            // SAFETY: kill(2) on our own child process.
            unsafe { libc::kill(pid as i32, signal) };
        }
    }
}
