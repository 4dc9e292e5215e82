//! Buildbot's REST query language over HTTP, on SQLite and on PostgreSQL: filters with operators,
//! field selection, ordering, paging with the full total, and collections larger than a page
//! (streamed, never held whole in memory).

use kiln_master::domain::{NewBuildset, SourceStamp};
use kiln_tests::pg;
use kiln_tests::system::TestMaster;
use serde_json::Value;

const SETUP: &str = r#"
collapseRequests: false
builders:
  - {name: tagged, tags: [nightly, arm], steps: [{shell: {command: "true"}}]}
  - {name: plain, steps: [{shell: {command: "true"}}]}
"#;

const REQUESTS: i64 = 1234;

async fn query_language(database: String) {
    let dir = tempfile::tempdir().unwrap();
    let master = TestMaster::start(&database, dir.path(), SETUP).await;
    let builderid = master.master.builder_id("tagged").unwrap();
    for i in 0..REQUESTS {
        let buildset = NewBuildset {
            reason: format!("r{i}"),
            sourcestamps: vec![SourceStamp { branch: Some("main".into()), ..Default::default() }],
            builderids: vec![builderid],
            priority: i % 10,
            ..Default::default()
        };
        master.master.store.add_buildset(&buildset).await.unwrap();
    }
    let ids = |reply: &Value| -> Vec<i64> {
        reply["buildrequests"].as_array().unwrap().iter().map(|r| r["buildrequestid"].as_i64().unwrap()).collect()
    };

    // More than a page, streamed: every object once, in order, with the full total.
    let all = master.get("/api/v2/buildrequests").await;
    assert_eq!(all["meta"]["total"], REQUESTS);
    let every = ids(&all);
    assert_eq!(every.len() as i64, REQUESTS);
    assert!(every.windows(2).all(|w| w[0] < w[1]), "ordered by id, no repeats");
    let tail = master.get(&format!("/api/v2/buildrequests?offset={}", REQUESTS - 2)).await;
    assert_eq!((ids(&tail).len(), tail["meta"]["total"].as_i64()), (2, Some(REQUESTS)));
    let big_page = master.get("/api/v2/buildrequests?limit=700&offset=10").await;
    assert_eq!(ids(&big_page), every[10..710].to_vec());

    // Paging reports the full count, not the page size.
    let page = master.get("/api/v2/buildrequests?limit=3&offset=5&order=-buildrequestid").await;
    assert_eq!(ids(&page), vec![REQUESTS - 5, REQUESTS - 6, REQUESTS - 7]);
    assert_eq!(page["meta"]["total"], REQUESTS);

    // Operators, repeated equality and field selection.
    let high = master.get("/api/v2/buildrequests?priority__ge=8&limit=1000&field=buildrequestid&field=priority").await;
    assert!(high["buildrequests"].as_array().unwrap().iter().all(|r| r["priority"].as_i64().unwrap() >= 8));
    assert_eq!(high["meta"]["total"], REQUESTS / 10 * 2 + i64::from(REQUESTS % 10 > 8));
    let first = &high["buildrequests"][0];
    assert_eq!(first.as_object().unwrap().keys().collect::<Vec<_>>(), vec!["buildrequestid", "priority"]);
    let chosen = master.get("/api/v2/buildrequests?buildrequestid=1&buildrequestid=3&buildrequestid__ne=3").await;
    assert_eq!(ids(&chosen), vec![1]);
    let some = master.get("/api/v2/buildrequests?buildrequestid__in=2&buildrequestid__in=4&limit=10").await;
    assert_eq!(ids(&some), vec![2, 4]);
    let lt = master.get("/api/v2/buildrequests?buildrequestid__lt=3&complete=false").await;
    assert_eq!(ids(&lt), vec![1, 2]);
    let none = master.get("/api/v2/buildrequests?claimed=true").await;
    assert_eq!(none["meta"]["total"], 0);
    let tagged = master.get("/api/v2/builders?tags__contains=arm").await;
    assert_eq!(tagged["builders"].as_array().unwrap().len(), 1);
    assert_eq!(tagged["builders"][0]["name"], "tagged");
    let by_name = master.get("/api/v2/builders?name__contains=pla").await;
    assert_eq!(by_name["builders"][0]["name"], "plain");

    // Bad queries are refused with the reason.
    for bad in [
        "/api/v2/buildrequests?bogus=1",
        "/api/v2/buildrequests?priority__near=3",
        "/api/v2/buildrequests?field=colour",
        "/api/v2/buildrequests?order=colour",
        "/api/v2/buildrequests?priority=high",
        "/api/v2/buildrequests?limit=many",
        "/api/v2/buildrequests/1?limit=1",
    ] {
        let (status, body) = master.get_text(bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains("error"), "{bad}: {body}");
    }
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_language_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    query_language(format!("sqlite://{}", dir.path().join("kiln.sqlite").display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_language_on_postgres() {
    query_language(pg::fresh_database().await).await;
}

/// The root lists every collection there is, and each one it lists answers in its envelope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_lists_every_collection_and_each_answers() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let master = TestMaster::start(&database, dir.path(), SETUP).await;
    let root = master.get("/api/v2").await;
    let names: Vec<&str> = root["rootlinks"].as_array().unwrap().iter().map(|l| l["name"].as_str().unwrap()).collect();
    for expected in ["builders", "builds", "buildrequests", "workers", "schedulers", "forceschedulers", "pools"] {
        assert!(names.contains(&expected), "{expected} missing from {names:?}");
    }
    // Steps and logs are roots of single objects (`/steps/N`, `/logs/N`), as in Buildbot; their
    // collections hang below builds and steps.
    for name in names.iter().filter(|n| !["steps", "logs"].contains(n)) {
        let (status, body) = master.get_text(&format!("/api/v2/{name}")).await;
        assert_eq!(status, 200, "{name}: {body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert!(body[name].is_array() && body["meta"]["total"].is_number(), "{name}: {body}");
    }
    master.stop().await;
}

/// Buildbot's UI at `/`: its files as installed, `index.html` with the frontend configuration in
/// its placeholder, `/config`, and the plugins beside it. (The files here are stand-ins in the
/// package's layout; the UI itself is GPL and installed from PyPI, never kept here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_ui_is_served_with_its_configuration_or_a_page_says_how_to_install_it() {
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("site-packages");
    let www = site.join("buildbot_www/static");
    std::fs::create_dir_all(www.join("assets")).unwrap();
    std::fs::write(
        www.join("index.html"),
        "<html><head></head><body></body>\n  <!-- BUILDBOT_CONFIG_PLACEHOLDER -->\n</html>\n",
    )
    .unwrap();
    std::fs::write(www.join("assets/index-abc.js"), "console.log('ui');\n").unwrap();
    std::fs::create_dir_all(site.join("buildbot_waterfall_view/static")).unwrap();
    std::fs::write(site.join("buildbot_waterfall_view/static/scripts.js"), "// waterfall\n").unwrap();

    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let text = kiln_tests::system::config_text(&database, dir.path(), SETUP)
        .replace("http:\n", &format!("http:\n  www: \"{}\"\n", site.join("buildbot_www").display()));
    let config = kiln_master::config::Config::parse("ui.yaml", &text).unwrap();
    let master = TestMaster::start_with(config, dir.path()).await;
    let client = reqwest::Client::new();
    let page = client.get(master.url("/")).send().await.unwrap();
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let page = page.text().await.unwrap();
    let config = page
        .split("window.buildbotFrontendConfig = ")
        .nth(1)
        .and_then(|r| r.split(";\n</script>").next())
        .expect(&page);
    let config: Value = serde_json::from_str(config).unwrap();
    assert_eq!(config["buildbotURL"], format!("http://{}/", master.http));
    assert_eq!(config["plugins"], serde_json::json!({ "waterfall_view": {} }));
    assert_eq!(config["auth"]["name"], "NoAuth");
    assert_eq!(master.get("/config").await["title"], config["title"]);
    let script = client.get(master.url("/assets/index-abc.js")).send().await.unwrap();
    assert_eq!(
        (script.status().as_u16(), script.headers()["content-type"].to_str().unwrap()),
        (200, "text/javascript")
    );
    let plugin = client.get(master.url("/plugins/waterfall_view/scripts.js")).send().await.unwrap();
    assert_eq!(plugin.status(), 200);
    assert_eq!(client.get(master.url("/assets/missing.js")).send().await.unwrap().status(), 404);
    assert_eq!(master.get("/api/v2/builders").await["meta"]["total"], 2, "the API is unchanged below it");
    master.stop().await;

    // Without the UI (and none installed where Python puts it), `/` says how to install it.
    let other = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", other.path().join("kiln.sqlite").display());
    let master = TestMaster::start(&database, other.path(), SETUP).await;
    let (status, page) = master.get_text("/").await;
    if !page.contains("buildbotFrontendConfig") {
        assert_eq!(status, 200);
        assert!(
            page.contains("pip install buildbot-www==4.3.0") && page.contains("api/v2") && page.contains("metrics"),
            "{page}"
        );
    }
    master.stop().await;
}

const UI_SETUP: &str = r#"
collapseRequests: false
builders:
  - name: echo
    steps:
      - shell: {name: talk, command: "echo hello"}
schedulers:
  - {type: force, name: force, builderNames: [echo]}
"#;

/// The fields and endpoints Buildbot's UI reads beyond the plain collections: the builders a
/// worker is configured on and where, scalar workerinfo, a scheduler's master, the owners
/// property, nested force-form groups, the per-object sub-collections, `application.spec` and
/// Buildbot's raw-log file name.
async fn what_the_ui_reads(database: String) {
    let dir = tempfile::tempdir().unwrap();
    let master = TestMaster::start(&database, dir.path(), UI_SETUP).await;
    let _worker = master.spawn_worker("w1");
    master.wait_workers(1).await;
    let brid =
        master.force_request("force", serde_json::json!({"builderid": 1, "username": "Ada <ada@example.com>"})).await;
    let build = master.wait_build_of_request(brid, std::time::Duration::from_secs(60)).await;
    let buildid = build["buildid"].as_i64().unwrap();
    let masterid = master.get("/api/v2/masters").await["masters"][0]["masterid"].as_i64().unwrap();

    let worker = &master.get("/api/v2/workers").await["workers"][0];
    assert_eq!(worker["configured_on"], serde_json::json!([{"builderid": 1, "masterid": masterid}]), "{worker}");
    for (key, value) in worker["workerinfo"].as_object().unwrap() {
        assert!(!value.is_object() && !value.is_array(), "workerinfo.{key} is not a scalar: {value}");
    }
    let workerid = worker["workerid"].as_i64().unwrap();
    let builders = master.get(&format!("/api/v2/workers/{workerid}/builders")).await;
    assert_eq!(builders["builders"][0]["name"], "echo");
    let masters = master.get("/api/v2/builders/1/masters").await;
    assert_eq!(masters["masters"][0]["masterid"], masterid);
    for sub in ["builders", "workers", "schedulers"] {
        let listed = master.get(&format!("/api/v2/masters/{masterid}/{sub}")).await;
        assert_eq!(listed["meta"]["total"], 1, "masters/{masterid}/{sub}: {listed}");
    }
    let scheduler = &master.get("/api/v2/schedulers").await["schedulers"][0];
    assert_eq!(scheduler["master"]["masterid"], masterid, "{scheduler}");

    let properties = master.get(&format!("/api/v2/builds/{buildid}/properties")).await;
    assert_eq!(properties["properties"][0]["owners"], serde_json::json!([["Ada <ada@example.com>"], "Build"]));
    let bsid = master.get(&format!("/api/v2/buildrequests/{brid}")).await["buildrequests"][0]["buildsetid"].clone();
    let properties = master.get(&format!("/api/v2/buildsets/{bsid}/properties")).await;
    assert!(properties["properties"][0].is_object(), "{properties}");
    let of_request = master.get(&format!("/api/v2/buildrequests/{brid}/properties")).await;
    assert_eq!(of_request["properties"], properties["properties"], "a request's properties are its buildset's");
    for sub in ["changes", "triggered_builds", "test_result_sets"] {
        let listed = master.get(&format!("/api/v2/builds/{buildid}/{sub}")).await;
        assert_eq!(listed["meta"]["total"], 0, "builds/{buildid}/{sub}: {listed}");
    }

    // A change from the hook, then the builds made from it.
    master.post_change(&[("repository", "https://example.com/r.git"), ("revision", "abc"), ("author", "Bo")]).await;
    let changes = master.get("/api/v2/changes").await;
    let changeid = changes["changes"][0]["changeid"].as_i64().unwrap();
    assert_eq!(master.get(&format!("/api/v2/changes/{changeid}/builds")).await["meta"]["total"], 0);

    let form = &master.get("/api/v2/forceschedulers/force").await["forceschedulers"][0];
    assert_eq!(form["button_name"], "force");
    let groups = form["all_fields"].as_array().unwrap();
    assert!(
        groups.iter().all(|g| g["type"] == "nested" && g["fields"].is_array() && g["layout"].is_string()),
        "{form}"
    );
    let names: Vec<&str> =
        groups.iter().flat_map(|g| g["fields"].as_array().unwrap()).filter_map(|f| f["fullName"].as_str()).collect();
    for name in ["username", "reason", "priority", "branch", "revision"] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }

    let spec = master.get("/api/v2/application.spec").await;
    let paths: Vec<&str> = spec["specs"].as_array().unwrap().iter().filter_map(|s| s["path"].as_str()).collect();
    for path in ["builds/n:buildid/properties", "workers/n:workerid/builders", "changesources", "logs/n:logid/raw"] {
        assert!(paths.contains(&path), "{path} missing from application.spec");
    }
    for query in ["", "?active=true", "?name__contains=k&limit=5"] {
        let (status, body) = master.get_text(&format!("/api/v2/projects{query}")).await;
        assert_eq!(status, 200, "projects{query}: {body}");
    }
    let (status, body) = master.get_text("/api/v2/projects?active__near=1").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = master.get_text("/api/v2/projects?colour=red").await;
    assert_eq!(status, 400, "{body}");

    let step = &master.get(&format!("/api/v2/builds/{buildid}/steps")).await["steps"][0];
    let log = &master.get(&format!("/api/v2/steps/{}/logs", step["stepid"])).await["logs"][0];
    let raw = reqwest::get(master.url(&format!("/api/v2/logs/{}/raw", log["logid"]))).await.unwrap();
    let disposition = raw.headers()["content-disposition"].to_str().unwrap().to_owned();
    assert_eq!(disposition, format!("attachment; filename=\"echo_build_{}_step_talk_log_stdio\"", build["number"]));
    assert!(raw.text().await.unwrap().contains("hello\n"));
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_ui_reads_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    what_the_ui_reads(format!("sqlite://{}", dir.path().join("kiln.sqlite").display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_ui_reads_on_postgres() {
    what_the_ui_reads(pg::fresh_database().await).await;
}
