//! Collapsing of build requests, as Buildbot does by default: while no worker is free, newer
//! compatible requests make older ones redundant, and those complete as SKIPPED.

use std::time::Duration;

use kiln_tests::repo::TestRepo;
use kiln_tests::system::TestMaster;
use serde_json::Value;

const SETUP: &str = r#"
builders:
  - name: collapsing
    steps:
      - git: {mode: full}
  - name: keeps-all
    collapseRequests: false
    steps:
      - git: {mode: full}
schedulers:
  - {type: single_branch, name: every, builderNames: [collapsing, keeps-all]}
"#;

async fn requests_of(master: &TestMaster, builder: &str) -> Vec<Value> {
    let reply = master.get(&format!("/api/v2/builders/{builder}/buildrequests")).await;
    reply["buildrequests"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_queued_behind_a_busy_pool_collapse_into_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let repo = TestRepo::init(&dir.path().join("upstream"));
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let master = TestMaster::start(&database, dir.path(), SETUP).await;
    let repository = repo.path.display().to_string();
    let mut revisions = Vec::new();
    for (i, branch) in ["main", "main", "main", "dev"].iter().enumerate() {
        let revision = repo.commit(&format!("change {i}"), &[("f", &i.to_string())]);
        let fields = [("author", "a"), ("branch", *branch), ("revision", &revision), ("repository", &repository)];
        assert_eq!(master.post_change(&fields).await.0, 200);
        revisions.push(revision);
    }

    let collapsing = requests_of(&master, "collapsing").await;
    let states: Vec<(bool, i64)> =
        collapsing.iter().map(|r| (r["complete"].as_bool().unwrap(), r["results"].as_i64().unwrap())).collect();
    assert_eq!(states, vec![(true, 3), (true, 3), (false, -1), (false, -1)], "main's first two SKIPPED; dev apart");
    let (_, metrics) = master.get_text("/metrics").await;
    assert!(metrics.lines().any(|l| l == "kiln_buildrequests_collapsed_total 2"), "two collapsed:\n{metrics}");
    let keeps_all = requests_of(&master, "keeps-all").await;
    assert!(keeps_all.iter().all(|r| r["complete"] == false), "collapseRequests: false keeps every request");
    let buildsets = master.get("/api/v2/buildsets?complete=true").await;
    assert_eq!(buildsets["meta"]["total"], 0, "each buildset still has a pending request of keeps-all");

    let _worker = master.spawn_worker("w1");
    let newest_main = collapsing[2]["buildrequestid"].as_i64().unwrap();
    let build = master.wait_build_of_request(newest_main, Duration::from_secs(60)).await;
    assert_eq!(build["results"], 0);
    let props = master.get(&format!("/api/v2/builds/{}?property=got_revision", build["buildid"])).await;
    assert_eq!(props["builds"][0]["properties"]["got_revision"][0], revisions[2].as_str());
    for skipped in &collapsing[..2] {
        let builds = master.get(&format!("/api/v2/buildrequests/{}/builds", skipped["buildrequestid"])).await;
        assert_eq!(builds["meta"]["total"], 0, "a collapsed request never builds");
    }
    for request in requests_of(&master, "keeps-all").await {
        master.wait_build_of_request(request["buildrequestid"].as_i64().unwrap(), Duration::from_secs(60)).await;
    }
    let first_buildset = collapsing[0]["buildsetid"].as_i64().unwrap();
    let buildset = master.get(&format!("/api/v2/buildsets/{first_buildset}")).await;
    assert_eq!(buildset["buildsets"][0]["results"], 0, "SKIPPED counts as success for the buildset, as in Buildbot");
    master.stop().await;
}
