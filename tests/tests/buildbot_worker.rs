//! Buildbot's own worker against a real `kiln-master`: unmodified `buildbot-worker` 4.3 processes
//! (from PyPI, made with `create-worker --protocol=msgpack_experimental_v7`) join on the worker
//! port with the name and password of `workers.buildbot`, are listed with their `workerinfo`,
//! and run checkouts, shell commands and property steps with the results and logs kiln-workers
//! give. A failing command fails its build, a stop kills its command, a worker killed mid-build
//! has its build rerun elsewhere, and a wrong password or a PB worker is refused at once with a
//! line saying why. Over TLS, Buildbot's worker connects with its own `tls:` connection string.

use std::path::Path;
use std::time::Duration;

use kiln_tests::buildbot::BuildbotWorker;
use kiln_tests::process::MasterNode;
use kiln_tests::repo::TestRepo;
use kiln_tests::system::{TOKEN, spawn_worker};
use kiln_tests::{eventually, real_sleep};
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);
const PASSWORD: &str = "bb-s3cret-pass";

/// The `workers.buildbot` entries: `bb1` (password from a file) and `bb2`.
fn buildbot_workers(dir: &Path) -> String {
    std::fs::write(dir.join("bb1.password"), format!("{PASSWORD}\n")).unwrap();
    format!(
        "  buildbot:\n    - {{name: bb1, password_file: \"{}\"}}\n    - {{name: bb2, password: {PASSWORD}}}\n",
        dir.join("bb1.password").display()
    )
}

async fn master(dir: &Path, body: &str) -> MasterNode {
    let database = format!("sqlite://{}", dir.join("kiln.sqlite").display());
    MasterNode::start_with_workers(dir, "m", "m", &database, 10, &buildbot_workers(dir), body).await
}

fn worker_address(master: &MasterNode) -> String {
    format!("127.0.0.1:{}", master.grpc)
}

fn start_buildbot_worker(dir: &Path, master: &MasterNode, name: &str) -> BuildbotWorker {
    BuildbotWorker::start(&dir.join("bb"), &worker_address(master), name, PASSWORD, "msgpack_experimental_v7")
}

async fn get(client: &reqwest::Client, master: &MasterNode, path: &str) -> Value {
    let response = client.get(format!("{}{path}", master.base())).send().await.unwrap();
    response.json().await.unwrap_or(Value::Null)
}

async fn wait_workers(client: &reqwest::Client, master: &MasterNode, names: &[&str]) {
    eventually(&format!("workers {names:?} connected"), MINUTE, || async {
        let workers = get(client, master, "/api/v2/workers").await;
        let connected: Vec<&str> = workers["workers"]
            .as_array()?
            .iter()
            .filter(|w| w["connected_to"].as_array().is_some_and(|c| !c.is_empty()))
            .filter_map(|w| w["name"].as_str())
            .collect();
        names.iter().all(|n| connected.contains(n)).then_some(())
    })
    .await;
}

/// Forces a build of `builder` with `params`; returns the request's id.
async fn force(client: &reqwest::Client, master: &MasterNode, builder: &str, params: Value) -> i64 {
    let mut params = params;
    params["builderNames"] = json!([builder]);
    kiln_tests::process::force_with(client, &master.base(), params).await
}

/// The builds of request `brid` once it is complete.
async fn builds_of(client: &reqwest::Client, master: &MasterNode, brid: i64) -> Vec<Value> {
    kiln_tests::process::wait_request(client, &master.base(), brid).await;
    let builds = get(client, master, &format!("/api/v2/buildrequests/{brid}/builds")).await;
    builds["builds"].as_array().cloned().unwrap_or_default()
}

/// The stored text of a step's stdio log.
async fn log_text(client: &reqwest::Client, master: &MasterNode, buildid: i64, step: &str) -> String {
    let contents = get(client, master, &format!("/api/v2/builds/{buildid}/steps/{step}/logs/stdio/contents")).await;
    contents["logchunks"][0]["content"].as_str().unwrap_or_default().to_owned()
}

/// A log's output lines (stdout `o`, stderr `e`), without the header lines that say how each
/// worker ran the command.
fn output_lines(log: &str) -> Vec<String> {
    log.lines().filter(|l| l.starts_with('o') || l.starts_with('e')).map(str::to_owned).collect()
}

const SAME_STEPS: &str = r#"    steps:
      - git: {}
      - shell:
          name: greet
          command: 'cat README; echo "$GREETING"; echo to-stderr >&2; pwd | sed "s|.*/||"'
          env: {GREETING: "hello from %(prop:buildername)s"}
      - set_property_from_command: {command: [cat, VERSION], property: version}
"#;

/// The same checkout, shell and property steps on a Buildbot worker and on a kiln-worker give
/// the same results, properties and output; the Buildbot worker is listed with its workerinfo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buildbot_worker_runs_the_steps_a_kiln_worker_runs_with_the_same_results() {
    let dir = tempfile::tempdir().unwrap();
    let repo = TestRepo::init(&dir.path().join("repo"));
    repo.commit("first", &[("README", "version one\n"), ("VERSION", "1.0\n")]);
    let sha = repo.commit("second", &[("README", "version two\n"), ("VERSION", "2.0\n")]);
    let body = format!(
        "builders:\n  - name: on-buildbot\n    workernames: [bb1]\n{SAME_STEPS}  - name: on-kiln\n    workernames: [kw1]\n{SAME_STEPS}\
         schedulers:\n  - {{type: force, name: force, builderNames: [on-buildbot, on-kiln]}}\n"
    );
    let master = master(dir.path(), &body).await;
    let client = reqwest::Client::new();
    let _bb1 = start_buildbot_worker(dir.path(), &master, "bb1");
    let _kw1 = spawn_worker(&master.grpc_url(), "kw1", TOKEN, dir.path());
    wait_workers(&client, &master, &["bb1", "kw1"]).await;

    let workers = get(&client, &master, "/api/v2/workers?name=bb1").await;
    let info = &workers["workers"][0]["workerinfo"];
    assert_eq!(info["version"], "4.3.0", "{info}");
    assert_eq!(info["admin"].as_str().map(str::trim), Some("Kiln Tests <tests@kiln.invalid>"), "{info}");
    assert_eq!(info["host"], "a buildbot-worker under test", "{info}");
    assert_eq!(info["system"], "posix", "{info}");
    assert!(info["environ"]["PATH"].is_string(), "{info}");
    assert!(info["environ"].get("WORKERPASS").is_none() && !info.to_string().contains(PASSWORD), "{info}");
    assert!(info["basedir"].as_str().unwrap().ends_with("/bb/bb1"), "{info}");
    let cli = std::process::Command::new(kiln_tests::binary("kiln"))
        .args(["--url", &master.base(), "workers"])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&cli.stdout);
    assert!(cli.status.success() && listing.contains("bb1") && listing.contains("kw1"), "{listing}");

    let params = json!({ "repository": repo.path.display().to_string(), "revision": sha, "branch": "main" });
    let mut results = Vec::new();
    for builder in ["on-buildbot", "on-kiln"] {
        let brid = force(&client, &master, builder, params.clone()).await;
        let builds = builds_of(&client, &master, brid).await;
        assert_eq!(builds.len(), 1, "{builds:?}");
        results.push(builds[0].clone());
    }
    let mut outputs = Vec::new();
    for build in &results {
        let buildid = build["buildid"].as_i64().unwrap();
        let properties = get(&client, &master, &format!("/api/v2/builds/{buildid}/properties")).await;
        let properties = &properties["properties"][0];
        assert_eq!(build["results"], 0, "{build} {properties}");
        assert_eq!(properties["got_revision"][0], sha.as_str(), "{properties}");
        assert_eq!(properties["version"][0], "2.0", "{properties}");
        outputs.push(output_lines(&log_text(&client, &master, buildid, "greet").await));
    }
    // Each worker interleaves stdout and stderr in its own way; the lines are the same.
    let builder_free = |lines: &[String]| {
        let mut lines: Vec<String> =
            lines.iter().map(|l| l.replace("on-buildbot", "B").replace("on-kiln", "B")).collect();
        lines.sort();
        lines
    };
    assert_eq!(builder_free(&outputs[0]), builder_free(&outputs[1]), "the same output on both kinds of worker");
    assert!(outputs[0].contains(&"oversion two".to_owned()), "{:?}", outputs[0]);
    assert!(outputs[0].contains(&"eto-stderr".to_owned()), "{:?}", outputs[0]);
    assert!(outputs[0].contains(&"ohello from on-buildbot".to_owned()), "{:?}", outputs[0]);
    master.signal(libc::SIGTERM);
}

/// On a Buildbot worker a failing command fails its build and skips later steps; a stop from
/// the API kills a running command (what it would have written later never appears) and ends
/// the build CANCELLED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_command_fails_the_build_and_a_stop_kills_a_running_one() {
    let dir = tempfile::tempdir().unwrap();
    let late = dir.path().join("late");
    let body = format!(
        r#"builders:
  - name: fails
    workernames: [bb1]
    steps:
      - shell: {{command: "echo before; exit 3", haltOnFailure: true}}
      - shell: {{command: "echo never"}}
  - name: slow
    workernames: [bb1]
    steps:
      - shell: {{name: wait, command: "echo started; sleep 4; echo too late > {late}"}}
schedulers:
  - {{type: force, name: force, builderNames: [fails, slow]}}
"#,
        late = late.display()
    );
    let master = master(dir.path(), &body).await;
    let client = reqwest::Client::new();
    let _bb1 = start_buildbot_worker(dir.path(), &master, "bb1");
    wait_workers(&client, &master, &["bb1"]).await;

    let brid = force(&client, &master, "fails", json!({})).await;
    let build = builds_of(&client, &master, brid).await.pop().unwrap();
    assert_eq!(build["results"], 2, "FAILURE: {build}");
    let buildid = build["buildid"].as_i64().unwrap();
    let steps = get(&client, &master, &format!("/api/v2/builds/{buildid}/steps")).await;
    let results: Vec<i64> = steps["steps"].as_array().unwrap().iter().map(|s| s["results"].as_i64().unwrap()).collect();
    assert_eq!(results, [2, 3], "the failing step FAILURE, the next SKIPPED");

    let brid = force(&client, &master, "slow", json!({})).await;
    let buildid = eventually("the slow command's first line, live", MINUTE, || async {
        let builds = get(&client, &master, &format!("/api/v2/buildrequests/{brid}/builds")).await;
        let buildid = builds["builds"][0]["buildid"].as_i64()?;
        log_text(&client, &master, buildid, "wait").await.contains("ostarted").then_some(buildid)
    })
    .await;
    let stop = json!({ "jsonrpc": "2.0", "method": "stop", "id": 1, "params": { "reason": "not wanted" } });
    let reply = client.post(format!("{}/api/v2/builds/{buildid}", master.base())).json(&stop).send().await.unwrap();
    assert!(reply.status().is_success(), "{}", reply.status());
    let build = builds_of(&client, &master, brid).await.pop().unwrap();
    assert_eq!(build["results"], 6, "CANCELLED: {build}");
    real_sleep(Duration::from_secs(6)).await;
    assert!(!late.exists(), "the interrupted command was killed before it could finish");
    master.signal(libc::SIGTERM);
}

/// A build of builder `mixed` (workers bb1 and kw1) running on the Buildbot worker bb1, its one
/// step `work` past its first line: it sleeps `seconds`, then appends the name of the worker it
/// ran on to a ledger. Only bb1 runs yet.
struct MidBuild {
    master: MasterNode,
    client: reqwest::Client,
    bb1: BuildbotWorker,
    brid: i64,
    ledger: std::path::PathBuf,
    dir: tempfile::TempDir,
}

impl MidBuild {
    async fn start(seconds: u32) -> MidBuild {
        let dir = tempfile::tempdir().unwrap();
        let ledger = dir.path().join("ledger");
        let body = format!(
            r#"builders:
  - name: mixed
    workernames: [bb1, kw1]
    steps:
      - shell: {{name: work, command: "echo started; sleep {seconds}; echo %(prop:workername)s >> {ledger}"}}
schedulers:
  - {{type: force, name: force, builderNames: [mixed]}}
"#,
            ledger = ledger.display()
        );
        let master = master(dir.path(), &body).await;
        let client = reqwest::Client::new();
        let bb1 = start_buildbot_worker(dir.path(), &master, "bb1");
        wait_workers(&client, &master, &["bb1"]).await;
        let brid = force(&client, &master, "mixed", json!({})).await;
        eventually("the build running on bb1", MINUTE, || async {
            let builds = get(&client, &master, &format!("/api/v2/buildrequests/{brid}/builds")).await;
            let buildid = builds["builds"][0]["buildid"].as_i64()?;
            log_text(&client, &master, buildid, "work").await.contains("ostarted").then_some(())
        })
        .await;
        MidBuild { master, client, bb1, brid, ledger, dir }
    }

    /// Starts the kiln-worker kw1, which can take the build's rerun.
    fn spawn_kiln_worker(&self) -> kiln_tests::system::TestWorker {
        spawn_worker(&self.master.grpc_url(), "kw1", TOKEN, self.dir.path())
    }

    /// Sends `signal` to the buildbot-worker process.
    fn signal_bb1(&self, signal: i32) {
        let pid = self.bb1.pid().expect("bb1 runs") as i32;
        // SAFETY: kill(2) on our own child process.
        unsafe { libc::kill(pid, signal) };
    }

    /// The results of the request's builds, once it is complete.
    async fn results(&self) -> Vec<i64> {
        let builds = builds_of(&self.client, &self.master, self.brid).await;
        builds.iter().map(|b| b["results"].as_i64().unwrap()).collect()
    }

    /// The workers whose run of the step got to its end, in order.
    fn ledger(&self) -> Vec<String> {
        std::fs::read_to_string(&self.ledger).unwrap_or_default().lines().map(str::to_owned).collect()
    }
}

/// A Buildbot worker SIGKILLed mid-build: the build ends RETRY and its request runs again on
/// the kiln-worker of the same builder, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buildbot_worker_killed_mid_build_has_its_build_rerun_elsewhere() {
    let mut build = MidBuild::start(3).await;
    let _kw1 = build.spawn_kiln_worker();
    build.bb1.kill().await;
    assert_eq!(build.results().await, [5, 0], "RETRY on the killed worker, then SUCCESS");
    real_sleep(Duration::from_secs(5)).await;
    assert_eq!(build.ledger(), ["kw1"], "the killed worker's command died with it");
    build.master.signal(libc::SIGTERM);
}

/// A wrong password gets 401 at once and the worker says it was refused; a worker still on PB
/// is told apart by its silence, and the master logs one line naming the fix, in seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_and_a_pb_worker_are_refused_at_once_with_a_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let body = "builders:\n  - {name: b, workernames: [bb1], steps: [{shell: {command: \"true\"}}]}\n";
    let master = master(dir.path(), body).await;
    let client = reqwest::Client::new();
    let address = worker_address(&master);
    let started = std::time::Instant::now();
    let wrong =
        BuildbotWorker::start(&dir.path().join("bb"), &address, "bb1", "not-the-password", "msgpack_experimental_v7");
    let pb = BuildbotWorker::start(&dir.path().join("pb"), &address, "bb2", PASSWORD, "pb");
    let logged = eventually("the master's refusals", MINUTE, || async {
        let log = master.log();
        (log.contains("refused a Buildbot worker") && log.contains("a Buildbot PB worker connected")).then_some(log)
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(30), "refused in seconds, not after a hang");
    assert!(logged.contains("set protocol = 'msgpack_experimental_v7' in buildbot.tac"), "{logged}");
    assert!(!logged.contains("not-the-password") && !logged.contains(PASSWORD), "no password in the log");
    eventually("the refused worker's own log", MINUTE, || async { wrong.log().contains("401").then_some(()) }).await;
    eventually("the PB worker's log shows the refusal", MINUTE, || async {
        pb.log().contains("doesn't speak any of the protocols offered by the server").then_some(())
    })
    .await;
    let workers = get(&client, &master, "/api/v2/workers").await;
    assert!(
        workers["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["connected_to"].as_array().is_none_or(|c| c.is_empty())),
        "{workers}"
    );
    // A WebSocket asking for a protocol Kiln does not speak is refused with a reason and a line.
    let other = client
        .get(format!("http://{address}/"))
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("Sec-WebSocket-Protocol", "msgpack_experimental_v8")
        .basic_auth("bb1", Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 400);
    assert!(other.text().await.unwrap().contains("Kiln speaks msgpack_experimental_v7, not msgpack_experimental_v8"));
    eventually("the line for the unknown protocol", MINUTE, || async {
        master.log().contains("a worker asked for a protocol Kiln does not speak").then_some(())
    })
    .await;
    master.signal(libc::SIGTERM);
}

/// With `workers.tls` set, Buildbot's own worker connects over TLS the way Buildbot documents it —
/// a Twisted `tls:` connection string trusting the master's CA — and builds, so its password
/// never crosses the network in clear; the same worker speaking plain text is refused with a
/// line saying the port serves TLS, and never joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buildbot_worker_builds_over_tls_and_one_in_plain_text_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = kiln_tests::tls::Ca::new("kiln test CA");
    let (cert, key, _) = ca.issue(dir.path(), "master");
    let roots = dir.path().join("roots");
    std::fs::create_dir_all(&roots).unwrap();
    ca.write(&roots, "ca.pem");
    let tls = format!("  tls: {{cert: \"{}\", key: \"{}\"}}\n", cert.display(), key.display());
    let body = "builders:\n  - name: b\n    workernames: [bb1]\n    steps:\n      - shell: {name: greet, command: [echo, hello over tls]}\n\
                schedulers:\n  - {type: force, name: force, builderNames: [b]}\n";
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let workers = format!("{tls}{}", buildbot_workers(dir.path()));
    let master = MasterNode::start_with_workers(dir.path(), "m", "m", &database, 10, &workers, body).await;
    let client = reqwest::Client::new();
    let connection = format!("tls:host=127.0.0.1:port={}:trustRoots={}", master.grpc, roots.display());
    let _bb1 = BuildbotWorker::start_with(
        &dir.path().join("bb"),
        &worker_address(&master),
        "bb1",
        PASSWORD,
        "msgpack_experimental_v7",
        &["--connection-string", &connection],
    );
    let plain = start_buildbot_worker(dir.path(), &master, "bb2");
    wait_workers(&client, &master, &["bb1"]).await;

    let brid = force(&client, &master, "b", json!({})).await;
    let builds = builds_of(&client, &master, brid).await;
    assert_eq!(builds[0]["results"], 0, "{builds:?}");
    let buildid = builds[0]["buildid"].as_i64().unwrap();
    let log = log_text(&client, &master, buildid, "greet").await;
    assert!(output_lines(&log).contains(&"ohello over tls".to_owned()), "{log}");

    eventually("the refusal of the plain-text worker", MINUTE, || async {
        master.log().contains("a plain-text client connected to the worker port, which serves TLS").then_some(())
    })
    .await;
    let workers = get(&client, &master, "/api/v2/workers?name=bb2").await;
    let bb2 = &workers["workers"][0];
    assert!(bb2["connected_to"].as_array().is_none_or(|c| c.is_empty()), "{workers}");
    assert!(!master.log().contains(PASSWORD) && !plain.log().contains(PASSWORD), "no password in a log");
    master.signal(libc::SIGTERM);
}

/// One builder served by two Buildbot workers and two kiln-workers drains 100 requests: the
/// ledger its step writes shows each job run to its end exactly once, never two runs at once,
/// and both kinds of worker took their share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builder_of_both_kinds_of_worker_runs_100_requests_each_exactly_once() {
    const JOBS: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let ledger = kiln_tests::ledger::Ledger::new(dir.path());
    let master = master(dir.path(), &ledger.builders(0.05)).await;
    let client = reqwest::Client::new();
    let _bb = [start_buildbot_worker(dir.path(), &master, "bb1"), start_buildbot_worker(dir.path(), &master, "bb2")];
    let _kw = [
        spawn_worker(&master.grpc_url(), "kw1", TOKEN, dir.path()),
        spawn_worker(&master.grpc_url(), "kw2", TOKEN, dir.path()),
    ];
    wait_workers(&client, &master, &["bb1", "bb2", "kw1", "kw2"]).await;
    let jobs: Vec<String> = (1..=JOBS).map(|i| format!("job{i}")).collect();
    for job in &jobs {
        force(&client, &master, "ledger", json!({ "job": job })).await;
    }
    kiln_tests::process::wait_completed(&client, &master.base(), JOBS as i64, 3 * MINUTE, Duration::from_millis(200))
        .await;
    let tally = ledger.tally(&jobs);
    assert_eq!((tally.exactly_once, tally.duplicated, tally.overlapping, tally.lost), (JOBS, 0, 0, 0), "{tally:?}");
    let text = std::fs::read_to_string(&ledger.path).unwrap();
    let on = |worker: &str| text.lines().filter(|l| l.starts_with("start ") && l.ends_with(worker)).count();
    assert!(on("bb1") + on("bb2") > 0 && on("kw1") + on("kw2") > 0, "both kinds built:\n{text}");
    let builds = get(&client, &master, "/api/v2/builds?results=0&limit=1").await;
    assert_eq!(builds["meta"]["total"], JOBS, "every build SUCCESS");
    master.signal(libc::SIGTERM);
}

/// A Buildbot worker does not kill its commands when its connection drops. Frozen (SIGSTOP)
/// past three heartbeats, it loses its session and its build reruns on the kiln-worker; thawed,
/// it reconnects, and the master interrupts the command it left running before it can finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_buildbot_worker_has_the_command_it_left_running_interrupted() {
    let build = MidBuild::start(10).await;
    build.signal_bb1(libc::SIGSTOP);
    eventually("bb1's session lost", MINUTE, || async {
        let workers = get(&build.client, &build.master, "/api/v2/workers?name=bb1").await;
        workers["workers"][0]["connected_to"].as_array().is_some_and(|c| c.is_empty()).then_some(())
    })
    .await;
    build.signal_bb1(libc::SIGCONT);
    let _kw1 = build.spawn_kiln_worker();
    assert_eq!(build.results().await, [5, 0], "RETRY on the frozen worker, then SUCCESS");
    wait_workers(&build.client, &build.master, &["bb1"]).await;
    eventually("the left command interrupted", MINUTE, || async {
        build.bb1.log().contains("asked to interrupt current command").then_some(())
    })
    .await;
    real_sleep(Duration::from_secs(12)).await;
    // The rerun may have gone to either worker; the command bb1 was left with never finished.
    assert_eq!(build.ledger().len(), 1, "one run finished: {:?}\n{}", build.ledger(), build.bb1.log());
    build.master.signal(libc::SIGTERM);
}

/// Every remote command Kiln has, sent straight through a Buildbot worker's session: a file
/// goes down and comes back byte for byte (Buildbot 4.3's own master writes it empty over
/// msgpack), and the directory commands make, find, describe and remove what they should.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_and_directory_commands_work_through_a_buildbot_worker() {
    use kiln_master::remote::{Command, CommandEvent, Update};
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let setup = "builders:\n  - {name: b, workernames: [bb1], steps: [{shell: {command: \"true\"}}]}\n";
    let text = kiln_tests::system::config_text(&database, dir.path(), setup)
        .replace("workers:\n", &format!("workers:\n  buildbot: [{{name: bb1, password: {PASSWORD}}}]\n"));
    let config = kiln_master::config::Config::parse("commands.yaml", &text).unwrap();
    let master = kiln_tests::system::TestMaster::start_with(config, dir.path()).await;
    let _bb1 = BuildbotWorker::start(
        &dir.path().join("bb"),
        &master.grpc.to_string(),
        "bb1",
        PASSWORD,
        "msgpack_experimental_v7",
    );
    master.wait_workers(1).await;
    let session = master.master.workers.get("bb1").expect("bb1 attached");
    let basedir = session.info.basedir.clone();

    // Runs one command to its end: its updates, and its rc.
    let run = |command: Command| {
        let session = std::sync::Arc::clone(&session);
        async move {
            let mut running = session.start("b", 1, command).await.expect("started");
            let mut updates = Vec::new();
            let ended = tokio::time::timeout(MINUTE, async {
                loop {
                    match running.next().await {
                        CommandEvent::Update(update) => updates.push(update),
                        CommandEvent::Complete(error) => return error,
                        CommandEvent::Lost => panic!("the session was lost"),
                    }
                }
            })
            .await
            .expect("the command ended in time");
            assert_eq!(ended, None, "{updates:?}");
            let rc = updates.iter().find_map(|u| if let Update::Rc(rc) = u { Some(*rc) } else { None });
            (updates, rc)
        }
    };

    let (_, rc) = run(Command::Mkdir { paths: vec!["b/build/sub".into(), "b/build/other".into()] }).await;
    assert_eq!(rc, Some(0));
    assert!(Path::new(&basedir).join("b/build/sub").is_dir());

    // Bigger than a block, with every byte value.
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let (_, rc) =
        run(Command::DownloadFile { path: "b/build/sub/data.bin".into(), mode: 0o640, data: data.clone() }).await;
    assert_eq!(rc, Some(0));
    let written = std::fs::read(Path::new(&basedir).join("b/build/sub/data.bin")).unwrap();
    assert!(written == data, "downloaded {} bytes of {}", written.len(), data.len());
    let (updates, rc) = run(Command::UploadFile { path: "b/build/sub/data.bin".into(), max_size: 0 }).await;
    assert_eq!(rc, Some(0));
    let uploaded: Vec<u8> = updates
        .iter()
        .filter_map(|u| if let Update::FileData(d) = u { Some(d.clone()) } else { None })
        .flatten()
        .collect();
    assert!(uploaded == data, "uploaded {} bytes of {}", uploaded.len(), data.len());

    let (updates, _) = run(Command::Stat { path: "b/build/sub/data.bin".into() }).await;
    let stat = updates.iter().find_map(|u| if let Update::Stat(s) = u { Some(*s) } else { None }).expect("a stat");
    assert!(stat.exists && !stat.is_dir && stat.size == data.len() as u64 && stat.mode & 0o777 == 0o640, "{stat:?}");
    let files = |updates: &[Update]| {
        let mut files: Vec<String> = updates
            .iter()
            .filter_map(|u| if let Update::Files(f) = u { Some(f.clone()) } else { None })
            .flatten()
            .map(|f| f.rsplit('/').next().unwrap_or_default().to_owned())
            .collect();
        files.sort();
        files
    };
    let (updates, _) = run(Command::Listdir { path: "b/build".into() }).await;
    assert_eq!(files(&updates), ["other", "sub"]);
    let (updates, _) = run(Command::Glob { path: format!("{basedir}/b/build/sub/*.bin") }).await;
    assert_eq!(files(&updates), ["data.bin"]);
    let (_, rc) = run(Command::Rmdir { paths: vec!["b/build/sub".into()] }).await;
    assert_eq!(rc, Some(0));
    assert!(!Path::new(&basedir).join("b/build/sub").exists());
    master.stop().await;
}

/// A Buildbot worker honours a step's timeout (the command is killed after that long without
/// output and the step fails), and a paused one takes no build until it is unpaused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_command_times_out_and_a_paused_worker_waits() {
    let dir = tempfile::tempdir().unwrap();
    let body = r#"builders:
  - name: silent
    workernames: [bb1]
    steps:
      - shell: {name: quiet, command: "sleep 30", timeout: 1}
  - name: quick
    workernames: [bb1]
    steps:
      - shell: {command: "true"}
schedulers:
  - {type: force, name: force, builderNames: [silent, quick]}
"#;
    let master = master(dir.path(), body).await;
    let client = reqwest::Client::new();
    let _bb1 = start_buildbot_worker(dir.path(), &master, "bb1");
    wait_workers(&client, &master, &["bb1"]).await;
    let started = std::time::Instant::now();
    let brid = force(&client, &master, "silent", json!({})).await;
    let build = builds_of(&client, &master, brid).await.pop().unwrap();
    assert_eq!(build["results"], 2, "FAILURE: {build}");
    assert!(started.elapsed() < Duration::from_secs(20), "killed at its timeout, not after the sleep");
    let log = log_text(&client, &master, build["buildid"].as_i64().unwrap(), "quiet").await;
    assert!(log.contains("timeout"), "{log}");

    let rpc = |path: String, method: &'static str| {
        let body = json!({ "jsonrpc": "2.0", "method": method, "id": 1, "params": { "reason": "maintenance" } });
        client.post(format!("{}/api/v2/{path}", master.base())).json(&body).send()
    };
    assert!(rpc("workers/bb1".into(), "pause").await.unwrap().status().is_success());
    let brid = force(&client, &master, "quick", json!({})).await;
    real_sleep(Duration::from_secs(1)).await;
    let request = get(&client, &master, &format!("/api/v2/buildrequests/{brid}")).await;
    assert_eq!(request["buildrequests"][0]["claimed"], false, "a paused worker took a build");
    let workers = get(&client, &master, "/api/v2/workers?name=bb1").await;
    let workerid = workers["workers"][0]["workerid"].as_i64().unwrap();
    assert!(rpc(format!("workers/{workerid}"), "unpause").await.unwrap().status().is_success());
    assert_eq!(builds_of(&client, &master, brid).await.pop().unwrap()["results"], 0);
    master.signal(libc::SIGTERM);
}

/// A Buildbot worker cut off from the master (frozen with SIGSTOP and left so, as a network
/// partition leaves it) keeps its process and its command: the command's watchdog finds its
/// lease gone once the master lost the session, and kills it before it can finish beside the
/// rerun.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_buildbot_workers_command_is_killed_before_it_can_finish_beside_the_rerun() {
    let build = MidBuild::start(8).await;
    build.signal_bb1(libc::SIGSTOP);
    let _kw1 = build.spawn_kiln_worker();
    assert_eq!(build.results().await, [5, 0], "RETRY on the cut-off worker, then SUCCESS");
    real_sleep(Duration::from_secs(10)).await;
    let ran = build.ledger();
    build.signal_bb1(libc::SIGCONT);
    assert_eq!(ran, ["kw1"], "the cut-off worker's command never finished");
    build.master.signal(libc::SIGTERM);
}
