//! Triggerable schedulers and the `trigger` step: waiting or not, properties set and copied,
//! the child's result becoming the step's.

use std::time::Duration;

use kiln_tests::system::TestMaster;
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

const SETUP: &str = r#"
collapseRequests: false
builders:
  - name: parent
    steps:
      - trigger:
          schedulerNames: [ok]
          waitForFinish: true
          set_properties: {from: "%(prop:buildername)s"}
          copy_properties: [colour]
  - name: parent-of-failure
    steps:
      - trigger: {schedulerNames: [bad], waitForFinish: true}
      - shell: {name: after, command: "echo after"}
  - name: fire-and-forget
    steps:
      - trigger: {schedulerNames: [ok]}
  - name: child-ok
    steps:
      - shell: {name: job, command: "echo child of %(prop:from:-nobody)s in %(prop:colour:-no colour)s"}
  - name: child-fail
    steps:
      - shell: {name: job, command: "exit 1"}
schedulers:
  - {type: force, name: force, builderNames: [parent, parent-of-failure, fire-and-forget]}
  - {type: triggerable, name: ok, builderNames: [child-ok]}
  - {type: triggerable, name: bad, builderNames: [child-fail]}
"#;

async fn start() -> (TestMaster, tempfile::TempDir, Vec<kiln_tests::system::TestWorker>) {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let master = TestMaster::start(&database, dir.path(), SETUP).await;
    let workers = vec![master.spawn_worker("w1"), master.spawn_worker("w2")];
    master.wait_workers(2).await;
    (master, dir, workers)
}

async fn force(master: &TestMaster, builder: &str, params: Value) -> i64 {
    let mut params = params;
    params["builderNames"] = json!([builder]);
    master.force_request("force", params).await
}

async fn child_of(master: &TestMaster, parent_buildid: i64) -> Value {
    let sets = master.get(&format!("/api/v2/buildsets?parent_buildid={parent_buildid}")).await;
    assert_eq!(sets["meta"]["total"], 1, "{sets}");
    let bsid = sets["buildsets"][0]["bsid"].as_i64().unwrap();
    let requests = master.get(&format!("/api/v2/buildrequests?buildsetid={bsid}")).await;
    requests["buildrequests"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_trigger_takes_the_childs_result_and_passes_properties() {
    let (master, _dir, _workers) = start().await;
    let brid = force(&master, "parent", json!({ "colour": "blue" })).await;
    let parent = master.wait_build_of_request(brid, MINUTE).await;
    assert_eq!(parent["results"], 0, "{parent}");
    let child_request = child_of(&master, parent["buildid"].as_i64().unwrap()).await;
    assert_eq!(child_request["waited_for"], true);
    let child = master.wait_build_of_request(child_request["buildrequestid"].as_i64().unwrap(), MINUTE).await;
    let log = master.get(&format!("/api/v2/builds/{}/steps/job/logs/stdio/contents", child["buildid"])).await;
    assert!(log["logchunks"][0]["content"].as_str().unwrap().contains("ochild of parent in blue"), "{log}");

    let brid = force(&master, "parent-of-failure", json!({})).await;
    let parent = master.wait_build_of_request(brid, MINUTE).await;
    assert_eq!(parent["results"], 2, "the child failed, so did the trigger step: {parent}");
    let steps = master.get(&format!("/api/v2/builds/{}/steps", parent["buildid"])).await;
    assert_eq!(steps["steps"][0]["results"], 2);
    assert_eq!(steps["steps"][1]["results"], 0, "a trigger step does not halt the build by default");
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_that_does_not_wait_finishes_at_once() {
    let (master, _dir, _workers) = start().await;
    let brid = force(&master, "fire-and-forget", json!({})).await;
    let parent = master.wait_build_of_request(brid, MINUTE).await;
    assert_eq!(parent["results"], 0);
    let child_request = child_of(&master, parent["buildid"].as_i64().unwrap()).await;
    assert_eq!(child_request["waited_for"], false);
    let child = master.wait_build_of_request(child_request["buildrequestid"].as_i64().unwrap(), MINUTE).await;
    assert_eq!(child["results"], 0);
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependent_scheduler_follows_successful_upstream_buildsets() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let setup = r#"
builders:
  - name: test
    steps:
      - shell: {command: "test %(src::branch)s != broken"}
  - name: deploy
    steps:
      - shell: {name: job, command: "echo deploying %(src::revision)s"}
schedulers:
  - {type: single_branch, name: tests, builderNames: [test]}
  - {type: dependent, name: deploys, upstream: tests, builderNames: [deploy]}
"#;
    let master = TestMaster::start(&database, dir.path(), setup).await;
    let _worker = master.spawn_worker("w1");
    for (branch, revision) in [("main", "good"), ("broken", "bad")] {
        let fields = [("author", "a"), ("branch", branch), ("revision", revision)];
        assert_eq!(master.post_change(&fields).await.0, 200);
    }
    let deploy = kiln_tests::eventually("the deploy buildset", MINUTE, || async {
        let sets = master.get("/api/v2/buildsets").await;
        sets["buildsets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["reason"].as_str().unwrap().contains("'deploys'"))
            .cloned()
    })
    .await;
    assert_eq!(deploy["sourcestamps"][0]["revision"], "good");
    let requests = master.get(&format!("/api/v2/buildrequests?buildsetid={}", deploy["bsid"])).await;
    let build =
        master.wait_build_of_request(requests["buildrequests"][0]["buildrequestid"].as_i64().unwrap(), MINUTE).await;
    assert_eq!(build["results"], 0);
    // The failed upstream buildset starts nothing.
    let failed = kiln_tests::eventually("the failing upstream build", MINUTE, || async {
        let sets = master.get("/api/v2/buildsets?complete=true&results=2").await;
        (sets["meta"]["total"] == 1).then_some(())
    });
    failed.await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sets = master.get("/api/v2/buildsets").await;
    let deploys = sets["buildsets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["reason"].as_str().unwrap().contains("'deploys'"))
        .count();
    assert_eq!(deploys, 1);
    master.stop().await;
}

/// With time standing still, a parent still learns at once that its child finished: the wait
/// is woken by the queue's events, not by its safety-net sweep.
#[test]
fn a_waiting_trigger_is_woken_when_its_child_finishes() {
    kiln_tests::with_paused_clock(Duration::from_secs(120), || async {
        let dir = tempfile::tempdir().unwrap();
        let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
        let text = kiln_tests::system::config_text(&database, dir.path(), SETUP);
        let config = kiln_master::config::Config::parse("trigger.yaml", &text).unwrap();
        let master = TestMaster::start_with_clock(config, dir.path(), kiln_tests::tokio_clock()).await;
        let _worker = master.spawn_worker("w1");
        let _other = master.spawn_worker("w2");
        master.wait_workers(2).await;
        let brid = force(&master, "parent", json!({ "colour": "blue" })).await;
        let parent = master.wait_build_of_request(brid, MINUTE).await;
        assert_eq!(parent["results"], 0, "{parent}");
        master.stop().await;
    });
}
