//! Whole-system behaviour: real git, real `kiln-worker` processes, a master on loopback, and
//! SQLite or a throwaway PostgreSQL.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use kiln_tests::repo::TestRepo;
use kiln_tests::system::{TestMaster, config_text, spawn_worker};
use kiln_tests::{binary, eventually, pg};
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

fn sqlite_url(dir: &std::path::Path) -> String {
    format!("sqlite://{}", dir.join("kiln.sqlite").display())
}

const HELLO: &str = r#"
builders:
  - name: hello
    steps:
      - git: {mode: full}
      - shell:
          name: cat
          command: [cat, hello.txt]
      - shell:
          name: slow
          command: "echo first; sleep 1.5; echo second"
      - set_property_from_command:
          property: head
          command: git rev-parse HEAD
      - shell:
          name: show
          command: "echo got=%(prop:got_revision)s head=%(prop:head)s branch=%(src::branch)s"
schedulers:
  - {type: single_branch, name: main, branch: main, builderNames: [hello]}
  - {type: force, name: force, builderNames: [hello]}
"#;

/// The stored text of a step's stdio log; empty while the step or its log does not exist yet.
async fn log_text(master: &TestMaster, buildid: i64, step: &str) -> String {
    let (status, body) = master.get_text(&format!("/api/v2/builds/{buildid}/steps/{step}/logs/stdio/contents")).await;
    if status != 200 {
        return String::new();
    }
    let contents: Value = serde_json::from_str(&body).unwrap();
    contents["logchunks"][0]["content"].as_str().unwrap_or_default().to_owned()
}

async fn change_to_result(database: String, dir: tempfile::TempDir) {
    let repo = TestRepo::init(&dir.path().join("upstream"));
    repo.commit("first", &[("hello.txt", "old\n")]);
    let revision = repo.commit("second", &[("hello.txt", "hello kiln\n")]);
    let master = TestMaster::start(&database, dir.path(), HELLO).await;
    let _worker = master.spawn_worker("w1");
    master.wait_workers(1).await;

    let repository = repo.path.display().to_string();
    let (status, body) = master
        .post_change(&[
            ("author", "Ada <ada@example.org>"),
            ("comments", "say hello"),
            ("revision", &revision),
            ("branch", "main"),
            ("repository", &repository),
            ("project", "demo"),
            ("files", "[\"hello.txt\"]"),
        ])
        .await;
    assert_eq!(status, 200, "{body}");

    // The request exists as soon as the hook has answered.
    let requests = master.get("/api/v2/buildrequests").await;
    assert_eq!(requests["meta"]["total"], 1);
    let brid = requests["buildrequests"][0]["buildrequestid"].as_i64().unwrap();

    // The log of a running step can be read before the step ends.
    let buildid = eventually("the slow step to print its first line", MINUTE, || async {
        let builds = master.get("/api/v2/builds").await;
        let buildid = builds["builds"][0]["buildid"].as_i64()?;
        let text = log_text(&master, buildid, "slow").await;
        (text.contains("ofirst\n") && !text.contains("osecond")).then_some(buildid)
    })
    .await;
    let running = master.get(&format!("/api/v2/builds/{buildid}")).await;
    assert_eq!(running["builds"][0]["complete"], false);
    assert_eq!(running["builds"][0]["results"], Value::Null);

    let build = master.wait_build_of_request(brid, MINUTE).await;
    assert_eq!(build["results"], 0, "{build}");
    assert_eq!(build["state_string"], "build successful");
    assert_eq!(build["number"], 1);
    assert!(build["started_at"].is_i64() && build["complete_at"].is_i64(), "integer epoch timestamps: {build}");

    // The checkout is at the commit's revision.
    let checkout = dir.path().join("workers/w1/hello/build");
    let checked_out =
        git2::Repository::open(&checkout).unwrap().head().unwrap().peel_to_commit().unwrap().id().to_string();
    assert_eq!(checked_out, revision);

    // Steps and their logs hold the commands' output.
    let steps = master.get(&format!("/api/v2/builds/{buildid}/steps")).await;
    let names: Vec<&str> = steps["steps"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["git", "cat", "slow", "set_property_head", "show"]);
    assert!(steps["steps"].as_array().unwrap().iter().all(|s| s["results"] == 0));
    assert!(log_text(&master, buildid, "cat").await.contains("ohello kiln\n"));
    let show = log_text(&master, buildid, "show").await;
    assert!(show.contains(&format!("ogot={revision} head={revision} branch=main")), "{show}");
    let (status, raw) = master.get_text(&format!("/api/v2/builds/{buildid}/steps/cat/logs/stdio/raw")).await;
    assert_eq!(status, 200);
    assert!(raw.contains("\nhello kiln\n") && raw.starts_with("Builder: hello\n"), "{raw}");

    // The rest of the data API agrees.
    let props = master.get(&format!("/api/v2/builds/{buildid}?property=got_revision&property=workername")).await;
    assert_eq!(props["builds"][0]["properties"]["got_revision"], json!([revision, "Git"]));
    assert_eq!(props["builds"][0]["properties"]["workername"], json!(["w1", "Worker"]));
    let request = master.get(&format!("/api/v2/buildrequests/{brid}")).await;
    assert_eq!(request["buildrequests"][0]["complete"], true);
    assert_eq!(request["buildrequests"][0]["results"], 0);
    assert_eq!(request["meta"], json!({}));
    let changes = master.get("/api/v2/changes").await;
    assert_eq!(changes["changes"][0]["revision"], revision);
    assert_eq!(changes["changes"][0]["files"], json!(["hello.txt"]));
    let builders = master.get("/api/v2/builders").await;
    assert_eq!(builders["builders"][0]["name"], "hello");
    let workers = master.get("/api/v2/workers").await;
    assert_eq!(workers["workers"][0]["name"], "w1");
    assert_eq!(workers["workers"][0]["connected_to"].as_array().unwrap().len(), 1);
    let by_number = master.get("/api/v2/builders/hello/builds/1").await;
    assert_eq!(by_number["builds"][0]["buildid"], buildid);
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_change_becomes_a_successful_build_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    change_to_result(sqlite_url(dir.path()), dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_change_becomes_a_successful_build_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    change_to_result(pg::fresh_database().await, dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_command_fails_the_build_and_skips_later_steps_unless_always_run() {
    let dir = tempfile::tempdir().unwrap();
    let master = TestMaster::start(
        &sqlite_url(dir.path()),
        dir.path(),
        r#"
builders:
  - name: b
    steps:
      - shell: {name: ok, command: "echo fine"}
      - shell: {name: broken, command: "echo about to fail; exit 3", haltOnFailure: true}
      - shell: {name: later, command: "echo should not run"}
      - shell: {name: cleanup, command: "echo cleaning up", alwaysRun: true}
schedulers:
  - {type: force, name: force, builderNames: [b]}
"#,
    )
    .await;
    let _worker = master.spawn_worker("w1");
    let brid = master.force_request("force", json!({ "builderNames": ["b"], "reason": "test" })).await;
    let build = master.wait_build_of_request(brid, MINUTE).await;
    assert_eq!(build["results"], 2, "FAILURE: {build}");
    assert_eq!(build["state_string"], "failed broken");
    let buildid = build["buildid"].as_i64().unwrap();
    let results = step_results(&master, buildid).await;
    assert_eq!(results["ok"], 0);
    assert_eq!(results["broken"], 2);
    assert_eq!(results["later"], 3, "SKIPPED");
    assert_eq!(results["cleanup"], 0);
    assert!(log_text(&master, buildid, "broken").await.contains("hprogram finished with exit code 3"));
    assert!(log_text(&master, buildid, "cleanup").await.contains("ocleaning up"));
    let request = master.get(&format!("/api/v2/buildrequests/{brid}")).await;
    assert_eq!(request["buildrequests"][0]["results"], 2);
    master.stop().await;
}

/// As in Buildbot, a step that ends EXCEPTION ends the build even without `haltOnFailure`: a
/// command that cannot be made (a checkout of a forced build that names no repository) is
/// followed only by `alwaysRun` steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exception_in_a_step_skips_later_steps_unless_always_run() {
    let dir = tempfile::tempdir().unwrap();
    let master = TestMaster::start(
        &sqlite_url(dir.path()),
        dir.path(),
        r#"
builders:
  - name: b
    steps:
      - git: {name: unrenderable, haltOnFailure: false}
      - shell: {name: later, command: "echo should not run"}
      - shell: {name: cleanup, command: "echo cleaning up", alwaysRun: true}
schedulers:
  - {type: force, name: force, builderNames: [b]}
"#,
    )
    .await;
    let _worker = master.spawn_worker("w1");
    let brid = master.force_request("force", json!({ "builderNames": ["b"] })).await;
    let build = master.wait_build_of_request(brid, MINUTE).await;
    assert_eq!(build["results"], 4, "EXCEPTION: {build}");
    let buildid = build["buildid"].as_i64().unwrap();
    let results = step_results(&master, buildid).await;
    assert_eq!(results["unrenderable"], 4, "EXCEPTION");
    assert_eq!(results["later"], 3, "SKIPPED");
    assert_eq!(results["cleanup"], 0);
    master.stop().await;
}

/// The result of each step of a build, by step name.
async fn step_results(master: &TestMaster, buildid: i64) -> HashMap<String, i64> {
    let steps = master.get(&format!("/api/v2/builds/{buildid}/steps")).await;
    steps["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap().to_owned(), s["results"].as_i64().unwrap()))
        .collect()
}

/// A master on SQLite with one builder `b` whose one step `work` runs `command`, and a force
/// scheduler `force` for it.
async fn one_step_master(dir: &std::path::Path, command: &str) -> TestMaster {
    TestMaster::start_with(one_step_config(dir, command), dir).await
}

fn one_step_config(dir: &std::path::Path, command: &str) -> kiln_master::config::Config {
    let setup = format!(
        "builders:\n  - name: b\n    steps:\n      - shell: {{name: job, command: \"{command}\"}}\nschedulers:\n  - {{type: force, name: force, builderNames: [b]}}\n"
    );
    kiln_master::config::Config::parse("test.yaml", &config_text(&sqlite_url(dir), dir, &setup)).unwrap()
}

/// Forces a build and returns its request id.
async fn force_one(master: &TestMaster) -> i64 {
    master.force_request("force", json!({})).await
}

/// Waits until the first build of a request has printed `text` in its `work` step.
async fn wait_printed(master: &TestMaster, brid: i64, text: &str) {
    eventually(&format!("the build of request {brid} to print {text:?}"), MINUTE, || async {
        let builds = master.get(&format!("/api/v2/buildrequests/{brid}/builds")).await;
        let buildid = builds["builds"][0]["buildid"].as_i64()?;
        log_text(master, buildid, "job").await.contains(text).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_build_has_its_build_retried_on_another_worker() {
    let dir = tempfile::tempdir().unwrap();
    let master = one_step_master(dir.path(), "echo working; sleep 2; echo done").await;
    let doomed = master.spawn_worker("doomed");
    master.wait_workers(1).await;
    let brid = force_one(&master).await;
    wait_printed(&master, brid, "oworking").await;
    doomed.signal(libc::SIGKILL);
    let _rescuer = master.spawn_worker("rescuer");
    let last = master.wait_build_of_request(brid, MINUTE).await;
    assert_eq!(last["results"], 0, "{last}");
    let builds = master.get(&format!("/api/v2/buildrequests/{brid}/builds")).await;
    let builds = builds["builds"].as_array().unwrap();
    assert_eq!(builds.len(), 2, "one lost build, one retry: {builds:?}");
    assert_eq!(builds[0]["results"], 5, "RETRY");
    assert_eq!(builds[1]["results"], 0);
    let rescuer = master.get("/api/v2/workers/rescuer").await;
    assert_eq!(builds[1]["workerid"], rescuer["workers"][0]["workerid"]);
    let request = master.get(&format!("/api/v2/buildrequests/{brid}")).await;
    assert_eq!(request["buildrequests"][0]["results"], 0);
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_told_to_terminate_finishes_its_build_then_exits() {
    let dir = tempfile::tempdir().unwrap();
    let master = one_step_master(dir.path(), "echo working; sleep 1.5; echo done").await;
    let mut worker = master.spawn_worker("w1");
    master.wait_workers(1).await;
    let first = force_one(&master).await;
    wait_printed(&master, first, "oworking").await;
    worker.signal(libc::SIGTERM);
    let second = force_one(&master).await;
    let build = master.wait_build_of_request(first, MINUTE).await;
    assert_eq!(build["results"], 0, "the running build finished: {build}");
    let status = tokio::time::timeout(MINUTE, worker.child.wait()).await.expect("worker exits").unwrap();
    assert!(status.success(), "clean exit: {status:?}");
    let builds = master.get(&format!("/api/v2/buildrequests/{second}/builds")).await;
    assert_eq!(builds["meta"]["total"], 0, "a draining worker takes no new build");
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_reconnects_after_the_master_restarts_and_the_queue_survives() {
    let dir = tempfile::tempdir().unwrap();
    let master = one_step_master(dir.path(), "echo built").await;
    let grpc = master.grpc;
    let worker = master.spawn_worker("w1");
    master.wait_workers(1).await;
    let before = force_one(&master).await;
    assert_eq!(master.wait_build_of_request(before, MINUTE).await["results"], 0);
    master.stop().await;

    // While the master is down the worker keeps trying; a request queued now must not be lost.
    let config = one_step_config(dir.path(), "echo built");
    let master = TestMaster::start_on(config, dir.path(), grpc).await;
    let queued = force_one(&master).await;
    master.wait_workers(1).await;
    let build = master.wait_build_of_request(queued, MINUTE).await;
    assert_eq!(build["results"], 0, "{build}");
    assert_eq!(build["number"], 2, "build numbers continue across restarts");
    drop(worker);
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_masters_on_one_postgres_build_every_request_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let database = pg::fresh_database().await;
    let setup = r#"
collapseRequests: false
builders:
  - name: quick
    steps:
      - shell: {name: run, command: ["true"]}
schedulers:
  - {type: force, name: force, builderNames: [quick]}
"#;
    let a = TestMaster::start(&database, &dir.path().join("a"), &format!("master_name: a\n{setup}")).await;
    let b = TestMaster::start(&database, &dir.path().join("b"), &format!("master_name: b\n{setup}")).await;
    let _workers = [
        a.spawn_worker("a1"),
        a.spawn_worker("a2"),
        spawn_worker(&format!("http://{}", b.grpc), "b1", kiln_tests::system::TOKEN, &dir.path().join("b")),
        spawn_worker(&format!("http://{}", b.grpc), "b2", kiln_tests::system::TOKEN, &dir.path().join("b")),
    ];
    a.wait_workers(2).await;
    b.wait_workers(2).await;
    for i in 0..200 {
        let target = if i % 2 == 0 { &a } else { &b };
        let (status, reply) = target.force("force", json!({ "reason": format!("r{i}") })).await;
        assert_eq!(status, 200, "{reply}");
    }
    eventually("all 200 requests to complete", Duration::from_secs(120), || async {
        let pending = a.get("/api/v2/buildrequests?complete=false&limit=1").await;
        (pending["meta"]["total"] == 0).then_some(())
    })
    .await;
    let requests = a.get("/api/v2/buildrequests").await;
    assert_eq!(requests["meta"]["total"], 200);
    assert!(requests["buildrequests"].as_array().unwrap().iter().all(|r| r["results"] == 0));
    let builds = a.get("/api/v2/builds").await;
    let builds = builds["builds"].as_array().unwrap();
    assert_eq!(builds.len(), 200, "one build per request");
    let per_request: HashSet<i64> = builds.iter().map(|b| b["buildrequestid"].as_i64().unwrap()).collect();
    assert_eq!(per_request.len(), 200, "no request built twice");
    assert!(builds.iter().all(|b| b["results"] == 0));
    let masters: HashSet<i64> = builds.iter().map(|b| b["masterid"].as_i64().unwrap()).collect();
    assert_eq!(masters.len(), 2, "both masters built");
    let numbers: HashSet<i64> = builds.iter().map(|b| b["number"].as_i64().unwrap()).collect();
    assert_eq!(numbers.len(), 200, "build numbers are unique per builder across masters");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_a_reason_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let master = TestMaster::start(&sqlite_url(dir.path()), dir.path(), HELLO).await;

    let (status, body) = master.post_change(&[("author", "a"), ("branch", "main"), ("files", "not json")]).await;
    assert_eq!(status, 400);
    assert!(body.contains("files"), "{body}");
    let (status, body) = master.post_change(&[("branch", "main"), ("when_timestamp", "yesterday")]).await;
    assert_eq!(status, 400);
    assert!(body.contains("when_timestamp"), "{body}");
    let response = master
        .client
        .post(master.url("/change_hook/base"))
        .header("Content-Type", "application/json")
        .body("{\"author\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let response = master
        .client
        .post(master.url("/change_hook/base"))
        .header("Content-Type", "text/xml")
        .body("<x/>")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let response = master.client.post(master.url("/change_hook/gitea")).body("x").send().await.unwrap();
    assert_eq!(response.status(), 400);
    let (status, body) = master.post_change(&[("branch", "main"), ("comments", "no author")]).await;
    assert_eq!(status, 400, "Buildbot stores no change without an author");
    assert!(body.contains("author"), "{body}");
    let big = "x".repeat(26 << 20);
    // The server drops a connection whose body it refused to read; use one of its own.
    let response = reqwest::Client::new().post(master.url("/change_hook/base")).body(big).send().await.unwrap();
    assert_eq!(response.status(), 413, "bodies above the limit are refused");
    assert_eq!(master.get("/api/v2/changes").await["meta"]["total"], 0);
    assert_eq!(master.get("/api/v2/buildrequests").await["meta"]["total"], 0);

    let (status, reply) = master.force("force", json!({ "builderNames": ["nope"] })).await;
    assert_eq!(status, 400);
    assert_eq!(reply["error"]["code"], -32602, "{reply}");
    assert!(reply["error"]["message"].as_str().unwrap().contains("nope"));
    let (status, reply) = master.force("nosuch", json!({})).await;
    assert_eq!(status, 404, "{reply}");
    assert!(reply["error"].is_object());
    let (status, reply) = master.force("force", json!({ "priority": "urgent" })).await;
    assert_eq!(status, 400, "{reply}");
    assert_eq!(master.get("/api/v2/buildrequests").await["meta"]["total"], 0);

    let (status, body) = master.get_text("/api/v2/builds?bogus=1").await;
    assert_eq!(status, 400);
    assert!(body.contains("unrecognized query parameter 'bogus'"), "{body}");
    let (status, _) = master.get_text("/api/v2/builds?limit=-3").await;
    assert_eq!(status, 400);
    let (status, _) = master.get_text("/api/v2/builds/12345").await;
    assert_eq!(status, 404);

    // A worker with a wrong token is refused and told so.
    let mut intruder = master.spawn_worker_with_token("intruder", "wrong-token");
    let status = tokio::time::timeout(MINUTE, intruder.child.wait()).await.expect("refused worker exits").unwrap();
    assert_eq!(status.code(), Some(3));
    let log = std::fs::read_to_string(dir.path().join("intruder.log")).unwrap();
    assert!(log.contains("refused the worker's credentials: invalid worker token"), "{log}");
    assert!(master.master.workers.list().is_empty());
    master.stop().await;
}

#[test]
fn an_invalid_config_stops_start_up_naming_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = config_text(&sqlite_url(dir.path()), dir.path(), HELLO)
        .replace("builderNames: [hello]}", "builderNames: [goodbye]}");
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, bad).unwrap();
    let output = std::process::Command::new(binary("kiln-master")).arg("--config").arg(&path).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("bad.yaml"), "{stderr}");
    assert!(stderr.contains("schedulers[0].builderNames[0]"), "{stderr}");
    assert!(stderr.contains("goodbye"), "{stderr}");
    assert!(!dir.path().join("kiln.sqlite").exists(), "nothing was created");
}

/// `kiln-master --check` refuses what start-up would, naming the file, the key's line and the key.
#[test]
fn check_names_the_line_and_key_of_every_mistake_start_up_would_find() {
    let dir = tempfile::tempdir().unwrap();
    let head = "database: sqlite://kiln.sqlite\nworkers: {}\npools:\n  - {name: local, backend: local, max: 2}\nbuilders:\n  - name: b\n";
    let cases = [
        (
            "steps:\n      - shell: {command: [echo, \"%(prp:branch)s\"]}",
            8,
            "builders[0].steps[0].shell.command[1]",
            "unknown selector",
        ),
        (
            "steps:\n      - shell:\n          command: \"echo %(prop:branch\"",
            9,
            "builders[0].steps[0].shell.command",
            "unterminated",
        ),
        (
            "workernames: [mac-mini]\n    steps:\n      - shell: {command: \"true\"}",
            7,
            "builders[0].workernames[0]",
            "can ever join",
        ),
        (
            "steps:\n      - shell:\n          command: \"true\"\n          haltOnFailur: true",
            10,
            "builders[0].steps[0].shell.haltOnFailur",
            "did you mean `haltOnFailure`",
        ),
    ];
    for (i, (builder, line, key, reason)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("case{i}.yaml"));
        std::fs::write(&path, format!("{head}    {builder}\n")).unwrap();
        let output = std::process::Command::new(binary("kiln-master"))
            .arg("--check")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "case {i}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let expected = format!("kiln-master: invalid configuration: {}:{line}: {key}: ", path.display());
        assert!(
            stderr.starts_with(&expected) && stderr.contains(reason),
            "case {i}: expected {expected}…{reason}, got {stderr}"
        );
    }
    // Run where no configuration is, without --config: it says where it looked and what to do.
    let output = std::process::Command::new(binary("kiln-master"))
        .arg("--check")
        .env_remove("KILN_CONFIG")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("config/quickstart.yaml") && stderr.contains("--config"), "{stderr}");
    assert!(stderr.contains(&dir.path().display().to_string()), "{stderr}");
}

const JANITOR: &str = r#"
logHorizon: 3600
builders:
  - name: hello
    steps:
      - shell: {name: greet, command: "echo hello"}
schedulers:
  - {type: force, name: force, builderNames: [hello]}
"#;

/// Old logs go, builds stay: with `logHorizon: 3600` a build's log text is deleted an hour
/// after it finished (on a paused clock walked past the horizon), its build, step and log
/// rows remain, and nothing younger is touched.
#[test]
fn logs_older_than_the_horizon_are_deleted_and_builds_kept() {
    kiln_tests::with_paused_clock(Duration::from_secs(120), || async {
        let dir = tempfile::tempdir().unwrap();
        let config = kiln_master::config::Config::parse(
            "janitor.yaml",
            &config_text(&sqlite_url(dir.path()), dir.path(), JANITOR),
        )
        .unwrap();
        let master = TestMaster::start_with_clock(config, dir.path(), kiln_tests::tokio_clock()).await;
        let _worker = master.spawn_worker("w1");
        master.wait_workers(1).await;
        let brid = master.force_request("force", json!({ "builderNames": ["hello"] })).await;
        let build = master.wait_build_of_request(brid, MINUTE).await;
        let logs = master.get(&format!("/api/v2/builds/{}/steps/0/logs", build["buildid"])).await;
        let logid = logs["logs"][0]["logid"].as_i64().unwrap();
        let contents = format!("/api/v2/logs/{logid}/contents");
        let before = master.get(&contents).await["logchunks"][0]["content"].as_str().unwrap().to_owned();
        assert!(!before.is_empty());

        // The janitor passes every quarter of the horizon: at 3599.999 s the build is not old yet.
        tokio::time::advance(Duration::from_millis(3_600_000 - 1)).await;
        kiln_tests::real_sleep(Duration::from_millis(300)).await;
        assert_eq!(master.get(&contents).await["logchunks"][0]["content"], before.as_str(), "younger than the horizon");

        tokio::time::advance(Duration::from_secs(900)).await;
        eventually("the old log deleted", MINUTE, || async {
            let log = master.get(&format!("/api/v2/logs/{logid}")).await;
            (log["logs"][0]["type"] == "d").then_some(())
        })
        .await;
        let left = master.get(&contents).await;
        assert!(left["logchunks"].as_array().unwrap().iter().all(|c| c["content"] == ""), "no text left: {left}");
        let kept = master.get(&format!("/api/v2/builds/{}", build["buildid"])).await;
        assert_eq!(kept["builds"][0]["results"], 0, "the build stays");
        let (_, metrics) = master.get_text("/metrics").await;
        assert!(metrics.lines().any(|l| l.starts_with("kiln_logs_deleted_total ") && !l.ends_with(" 0")), "{metrics}");
        master.stop().await;
    });
}
