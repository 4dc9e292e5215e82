//! A whole Kiln on loopback: a master served on port 0 (the same `run` the binary calls) and
//! real `kiln-worker` processes connecting to it over gRPC.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use kiln_master::clock::Clock;
use kiln_master::config::Config;
use kiln_master::master::Master;
use kiln_master::server::{self, Listeners, Options};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{binary, eventually};

pub const TOKEN: &str = "test-worker-token";

/// A running master.
pub struct TestMaster {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub master: Arc<Master>,
    pub dir: PathBuf,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// A `kiln-worker` process; killed when dropped.
pub struct TestWorker {
    pub name: String,
    pub child: Child,
}

impl TestWorker {
    /// Sends a signal to the worker process.
    pub fn signal(&self, signal: i32) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on our own child process.
            unsafe { libc::kill(pid as i32, signal) };
        }
    }
}

/// The configuration text of a test master: the given builders and schedulers on top of a
/// database, loopback listeners on port 0 and the test token.
pub fn config_text(database: &str, data_dir: &Path, builders_and_schedulers: &str) -> String {
    format!(
        "database: \"{database}\"\ndata_dir: \"{}\"\nhttp:\n  listen: 127.0.0.1:0\n  auth: open\nworkers:\n  listen: 127.0.0.1:0\n  heartbeat_interval: 0.5\n  lease_seconds: 10\n  tokens:\n    - name: test\n      value: {TOKEN}\n{builders_and_schedulers}",
        data_dir.display()
    )
}

impl TestMaster {
    /// Starts a master on `database` with the given builders and schedulers (YAML).
    pub async fn start(database: &str, dir: &Path, builders_and_schedulers: &str) -> TestMaster {
        let text = config_text(database, dir, builders_and_schedulers);
        let config = Config::parse("test.yaml", &text).unwrap_or_else(|e| panic!("test config: {e}\n{text}"));
        Self::start_with(config, dir).await
    }

    pub async fn start_with(config: Config, dir: &Path) -> TestMaster {
        Self::start_on(config, dir, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts a master whose worker endpoint listens on `grpc` (to restart one in place).
    pub async fn start_on(config: Config, dir: &Path, grpc: SocketAddr) -> TestMaster {
        Self::start_full(config, dir, grpc, Options::default()).await
    }

    /// Starts a master whose wall clock is `clock` (see [`crate::tokio_clock`]).
    pub async fn start_with_clock(config: Config, dir: &Path, clock: Clock) -> TestMaster {
        Self::start_with_options(config, dir, Options { clock, ..Options::default() }).await
    }

    /// Starts a master with options (such as a Kubernetes client).
    pub async fn start_with_options(config: Config, dir: &Path, options: Options) -> TestMaster {
        Self::start_full(config, dir, "127.0.0.1:0".parse().unwrap(), options).await
    }

    async fn start_full(config: Config, dir: &Path, grpc: SocketAddr, options: Options) -> TestMaster {
        let http = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
        let grpc = TcpListener::bind(grpc).await.expect("bind grpc");
        let (http_addr, grpc_addr) = (http.local_addr().unwrap(), grpc.local_addr().unwrap());
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (started_tx, started_rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            let result = server::run_with(
                config,
                Listeners { http, grpc },
                options,
                async {
                    let _ = stop_rx.await;
                },
                move |master| {
                    let _ = started_tx.send(Arc::clone(master));
                },
            )
            .await;
            if let Err(error) = result {
                panic!("master failed: {error}");
            }
        });
        let master = tokio::time::timeout(Duration::from_secs(30), started_rx)
            .await
            .expect("master started in time")
            .expect("master started");
        TestMaster {
            http: http_addr,
            grpc: grpc_addr,
            master,
            dir: dir.to_path_buf(),
            client: reqwest::Client::new(),
            stop: Some(stop_tx),
            task: Some(task),
        }
    }

    /// Starts a worker process connected to this master.
    pub fn spawn_worker(&self, name: &str) -> TestWorker {
        self.spawn_worker_with_token(name, TOKEN)
    }

    pub fn spawn_worker_with_token(&self, name: &str, token: &str) -> TestWorker {
        spawn_worker(&format!("http://{}", self.grpc), name, token, &self.dir)
    }

    /// Starts a worker process of a pool (as a pod of the pool's Deployment would).
    pub fn spawn_pool_worker(&self, name: &str, pool: &str) -> TestWorker {
        spawn_worker_env(&format!("http://{}", self.grpc), name, TOKEN, &self.dir, &[("KILN_POOL", pool)])
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// GETs a REST path and returns the JSON body; panics unless 200.
    pub async fn get(&self, path: &str) -> Value {
        let response = self.client.get(self.url(path)).send().await.expect("GET");
        let status = response.status();
        let body = response.text().await.expect("body");
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"))
    }

    /// GETs a path and returns status and text.
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let response = self.client.get(self.url(path)).send().await.expect("GET");
        (response.status().as_u16(), response.text().await.expect("body"))
    }

    /// Forces a build through `scheduler`; asserts it was accepted and returns the (first)
    /// request id.
    pub async fn force_request(&self, scheduler: &str, params: Value) -> i64 {
        let (status, reply) = self.force(scheduler, params).await;
        assert_eq!(status, 200, "{reply}");
        reply["result"][1].as_object().and_then(|m| m.values().next()).and_then(Value::as_i64).expect("a request id")
    }

    /// Forces a build and returns `[bsid, {builderid: brid}]`.
    pub async fn force(&self, scheduler: &str, params: Value) -> (u16, Value) {
        let body = json!({ "jsonrpc": "2.0", "method": "force", "id": 1, "params": params });
        let response = self
            .client
            .post(self.url(&format!("/api/v2/forceschedulers/{scheduler}")))
            .json(&body)
            .send()
            .await
            .expect("POST");
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON-RPC reply"))
    }

    /// Posts form fields to the base change hook.
    pub async fn post_change(&self, fields: &[(&str, &str)]) -> (u16, String) {
        let body =
            fields.iter().map(|(k, v)| format!("{}={}", urlencode(k), urlencode(v))).collect::<Vec<_>>().join("&");
        let response = self
            .client
            .post(self.url("/change_hook/base"))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .expect("POST change");
        (response.status().as_u16(), response.text().await.expect("body"))
    }

    /// Waits until `count` workers are connected.
    pub async fn wait_workers(&self, count: usize) {
        let master = Arc::clone(&self.master);
        eventually(&format!("{count} connected workers"), Duration::from_secs(30), || {
            let master = Arc::clone(&master);
            async move { (master.workers.list().len() >= count).then_some(()) }
        })
        .await;
    }

    /// Waits until the build of a request is complete and returns it.
    pub async fn wait_build_of_request(&self, brid: i64, limit: Duration) -> Value {
        eventually(&format!("a finished build of request {brid}"), limit, || async move {
            // The request completes in the same transaction as its build, so once it reads as
            // complete, its builds read as finished.
            let request = self.get(&format!("/api/v2/buildrequests/{brid}")).await;
            if !request["buildrequests"][0]["complete"].as_bool().unwrap_or(false) {
                return None;
            }
            let builds = self.get(&format!("/api/v2/buildrequests/{brid}/builds")).await;
            builds["builds"].as_array().and_then(|b| b.last().cloned())
        })
        .await
    }

    /// Stops the master gracefully.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
    }
}

impl Drop for TestMaster {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Starts a `kiln-worker` process; its output goes to `<dir>/<name>.log`.
pub fn spawn_worker(master_url: &str, name: &str, token: &str, dir: &Path) -> TestWorker {
    spawn_worker_env(master_url, name, token, dir, &[])
}

/// [`spawn_worker`] with extra environment variables; an empty `token` passes none (a worker with a
/// client certificate needs none).
pub fn spawn_worker_env(master_url: &str, name: &str, token: &str, dir: &Path, env: &[(&str, &str)]) -> TestWorker {
    std::fs::create_dir_all(dir).expect("worker dir");
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("worker log");
    let child = Command::new(binary("kiln-worker"))
        .args(["--master", master_url, "--name", name])
        .args(if token.is_empty() { vec![] } else { vec!["--token", token] })
        .arg("--basedir")
        .arg(dir.join("workers").join(name))
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .env("KILN_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn kiln-worker");
    TestWorker { name: name.to_owned(), child }
}

/// Percent-encodes a form value.
pub fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
