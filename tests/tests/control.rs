//! Buildbot's control actions over JSON-RPC, end to end: stop, cancel, rebuild, set_priority,
//! worker pause/unpause/stop/kill, and authentication of control actions.

use std::time::Duration;

use kiln_master::config::Config;
use kiln_tests::eventually;
use kiln_tests::pg;
use kiln_tests::system::{TOKEN, TestMaster, config_text, spawn_worker};
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

/// One builder `b` running `command`, with collapsing off: these tests queue identical requests
/// on purpose.
fn setup(command: &str) -> String {
    format!(
        "collapseRequests: false\nbuilders:\n  - name: b\n    steps:\n      - shell: {{name: job, command: \"{command}\"}}\nschedulers:\n  - {{type: force, name: force, builderNames: [b]}}\n"
    )
}

async fn start(dir: &std::path::Path, command: &str) -> TestMaster {
    let database = format!("sqlite://{}", dir.join("kiln.sqlite").display());
    TestMaster::start(&database, dir, &setup(command)).await
}

async fn rpc(master: &TestMaster, path: &str, method: &str, params: Value) -> (u16, Value) {
    let body = json!({ "jsonrpc": "2.0", "method": method, "id": 7, "params": params });
    let response = master.client.post(master.url(&format!("/api/v2/{path}"))).json(&body).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn force(master: &TestMaster, params: Value) -> i64 {
    master.force_request("force", params).await
}

async fn request(master: &TestMaster, brid: i64) -> Value {
    master.get(&format!("/api/v2/buildrequests/{brid}")).await["buildrequests"][0].clone()
}

async fn wait_running(master: &TestMaster, brid: i64) -> i64 {
    eventually("the build to print", MINUTE, || async {
        let builds = master.get(&format!("/api/v2/buildrequests/{brid}/builds")).await;
        let buildid = builds["builds"][0]["buildid"].as_i64()?;
        let (status, body) = master.get_text(&format!("/api/v2/builds/{buildid}/steps/job/logs/stdio/contents")).await;
        (status == 200 && body.contains("ostarted")).then_some(buildid)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_build_kills_its_command_and_cancels_it() {
    let dir = tempfile::tempdir().unwrap();
    let master = start(dir.path(), "echo started; sleep 60").await;
    let _worker = master.spawn_worker("w1");
    let brid = force(&master, json!({})).await;
    let buildid = wait_running(&master, brid).await;
    let (status, reply) = rpc(&master, &format!("builds/{buildid}"), "stop", json!({ "reason": "enough" })).await;
    assert_eq!((status, &reply["result"]), (200, &Value::Null), "{reply}");
    // Well before the command's own 60 s: the worker killed its process group.
    let build = master.wait_build_of_request(brid, Duration::from_secs(20)).await;
    assert_eq!(build["results"], 6, "CANCELLED: {build}");
    assert_eq!(request(&master, brid).await["results"], 6);
    let steps = master.get(&format!("/api/v2/builds/{buildid}/steps")).await;
    assert_eq!(steps["steps"][0]["results"], 6);
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_requests_before_and_while_they_run() {
    let dir = tempfile::tempdir().unwrap();
    let master = start(dir.path(), "echo started; sleep 60").await;
    let waiting = force(&master, json!({})).await;
    let (status, reply) = rpc(&master, &format!("buildrequests/{waiting}"), "cancel", json!({})).await;
    assert_eq!(status, 200, "{reply}");
    let cancelled = request(&master, waiting).await;
    assert_eq!((cancelled["complete"].as_bool(), cancelled["results"].as_i64()), (Some(true), Some(6)));
    let buildsets = master.get("/api/v2/buildsets").await;
    assert_eq!(buildsets["buildsets"][0]["results"], 6);

    let _worker = master.spawn_worker("w1");
    let running = force(&master, json!({})).await;
    wait_running(&master, running).await;
    let (status, _) = rpc(&master, &format!("buildrequests/{running}"), "cancel", json!({})).await;
    assert_eq!(status, 200);
    let build = master.wait_build_of_request(running, Duration::from_secs(20)).await;
    assert_eq!(build["results"], 6);
    let none = master.get(&format!("/api/v2/buildrequests/{waiting}/builds")).await;
    assert_eq!(none["meta"]["total"], 0, "a request cancelled in the queue never builds");
    let (status, reply) = rpc(&master, "buildrequests/999", "cancel", json!({})).await;
    assert_eq!(status, 404, "{reply}");
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_priority_is_built_first() {
    let dir = tempfile::tempdir().unwrap();
    let master = start(dir.path(), "echo started").await;
    let first = force(&master, json!({})).await;
    let second = force(&master, json!({})).await;
    let third = force(&master, json!({})).await;
    let (status, reply) =
        rpc(&master, &format!("buildrequests/{third}"), "set_priority", json!({ "priority": 10 })).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(request(&master, third).await["priority"], 10);
    let (status, _) = rpc(&master, &format!("buildrequests/{first}"), "set_priority", json!({ "priority": "x" })).await;
    assert_eq!(status, 400);
    let _worker = master.spawn_worker("w1");
    let mut started = Vec::new();
    for brid in [first, second, third] {
        let build = master.wait_build_of_request(brid, MINUTE).await;
        started.push((build["number"].as_i64().unwrap(), brid));
    }
    started.sort();
    assert_eq!(started.iter().map(|(_, brid)| *brid).collect::<Vec<_>>(), vec![third, first, second]);
    let (status, _) = rpc(&master, &format!("buildrequests/{first}"), "set_priority", json!({ "priority": 1 })).await;
    assert_eq!(status, 400, "a complete request keeps its priority");
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_builds_the_same_sources_and_properties_again() {
    let dir = tempfile::tempdir().unwrap();
    let master = start(dir.path(), "echo started").await;
    let _worker = master.spawn_worker("w1");
    let brid = force(&master, json!({ "branch": "topic", "revision": "abc", "colour": "blue" })).await;
    let build = master.wait_build_of_request(brid, MINUTE).await;
    let buildid = build["buildid"].as_i64().unwrap();
    let (status, reply) = rpc(&master, &format!("builds/{buildid}"), "rebuild", json!({})).await;
    assert_eq!(status, 200, "{reply}");
    let bsid = reply["result"][0].as_i64().unwrap();
    let again = reply["result"][1].as_object().unwrap().values().next().unwrap().as_i64().unwrap();
    let rebuilt = master.wait_build_of_request(again, MINUTE).await;
    assert_eq!(rebuilt["results"], 0);
    let props = master.get(&format!("/api/v2/builds/{}?property=*", rebuilt["buildid"])).await;
    assert_eq!(props["builds"][0]["properties"]["colour"][0], "blue");
    assert_eq!(props["builds"][0]["properties"]["branch"][0], "topic");
    let buildset = master.get(&format!("/api/v2/buildsets/{bsid}")).await;
    assert_eq!(buildset["buildsets"][0]["rebuilt_buildid"], buildid);
    assert_eq!(buildset["buildsets"][0]["reason"], "rebuild");
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_workers_take_no_builds_until_unpaused() {
    let dir = tempfile::tempdir().unwrap();
    let master = start(dir.path(), "echo started").await;
    let _worker = master.spawn_worker("w1");
    master.wait_workers(1).await;
    let (status, reply) = rpc(&master, "workers/w1", "pause", json!({ "reason": "maintenance" })).await;
    assert_eq!(status, 200, "{reply}");
    let worker = master.get("/api/v2/workers/w1").await;
    assert_eq!(worker["workers"][0]["paused"], true);
    assert_eq!(worker["workers"][0]["pause_reason"], "maintenance");
    let brid = force(&master, json!({})).await;
    // Nothing can prove a negative but time: give the dispatcher ample chance to get it wrong.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(request(&master, brid).await["claimed"], false, "a paused worker took a build");
    let workerid = worker["workers"][0]["workerid"].as_i64().unwrap();
    let (status, _) = rpc(&master, &format!("workers/{workerid}"), "unpause", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(master.wait_build_of_request(brid, MINUTE).await["results"], 0);
    let (status, _) = rpc(&master, "workers/nobody", "pause", json!({})).await;
    assert_eq!(status, 404);
    let (status, _) = rpc(&master, "workers/w1", "dance", json!({})).await;
    assert_eq!(status, 400, "an unknown action is the client's mistake");
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gracefully_stopped_worker_finishes_its_build_and_a_killed_one_has_it_retried() {
    let dir = tempfile::tempdir().unwrap();
    let master = start(dir.path(), "echo started; sleep 1").await;
    let mut graceful = master.spawn_worker("graceful");
    master.wait_workers(1).await;
    let brid = force(&master, json!({})).await;
    wait_running(&master, brid).await;
    let (status, _) = rpc(&master, "workers/graceful", "stop", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(master.get("/api/v2/workers/graceful").await["workers"][0]["graceful"], true);
    assert_eq!(master.wait_build_of_request(brid, MINUTE).await["results"], 0);
    let exit = tokio::time::timeout(MINUTE, graceful.child.wait()).await.expect("the worker exits").unwrap();
    assert!(exit.success(), "{exit:?}");

    let mut doomed = master.spawn_worker("doomed");
    let brid = force(&master, json!({})).await;
    wait_running(&master, brid).await;
    let (status, _) = rpc(&master, "workers/doomed", "kill", json!({})).await;
    assert_eq!(status, 200);
    tokio::time::timeout(MINUTE, doomed.child.wait()).await.expect("the killed worker exits").unwrap();
    let _rescuer = master.spawn_worker("rescuer");
    let build = master.wait_build_of_request(brid, MINUTE).await;
    assert_eq!(build["results"], 0);
    let builds = master.get(&format!("/api/v2/buildrequests/{brid}/builds")).await;
    assert_eq!(builds["builds"][0]["results"], 5, "the killed worker's build was retried");
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_actions_need_credentials_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let text = config_text(&database, dir.path(), &setup("true")).replace(
        "  auth: open\n",
        "  auth:\n    tokens: [{name: ci, value: s3cret}]\n    users: [{username: ada, password: lovelace}]\n",
    );
    let master = TestMaster::start_with(Config::parse("auth.yaml", &text).unwrap(), dir.path()).await;
    let url = master.url("/api/v2/forceschedulers/force");
    let body = json!({ "jsonrpc": "2.0", "method": "force", "id": 1, "params": {} });
    let post = |auth: Option<(&'static str, String)>| {
        let mut request = master.client.post(&url).json(&body);
        if let Some((name, value)) = auth {
            request = request.header(name, value);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(post(None).await, 401);
    assert_eq!(post(Some(("Authorization", "Bearer wrong".into()))).await, 403);
    assert_eq!(post(Some(("Authorization", "Bearer s3cret".into()))).await, 200);
    // "ada:lovelace" and "ada:wrong" in base64.
    assert_eq!(post(Some(("Authorization", "Basic YWRhOmxvdmVsYWNl".into()))).await, 200);
    assert_eq!(post(Some(("Authorization", "Basic YWRhOndyb25n".into()))).await, 403);
    assert_eq!(master.get("/api/v2/buildrequests").await["meta"]["total"], 2, "reading stays open");
    master.stop().await;
}

/// The web UI's login: `/auth/login` challenges for one of `http.auth.users`, sets a session
/// cookie and sends the browser back to the page it came from (never to another site); the UI's
/// configuration then names the user, and control actions accept the cookie — from the master's
/// own pages only. Logging out clears the cookie.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_from_the_ui_gives_a_session_that_control_actions_accept() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let text = config_text(&database, dir.path(), &setup("true"))
        .replace("  auth: open\n", "  auth:\n    users: [{username: ada, password: lovelace}]\n");
    let master = TestMaster::start_with(Config::parse("auth.yaml", &text).unwrap(), dir.path()).await;
    let browser = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let login = master.url("/auth/login?redirect=/%23/builders/1");

    let challenged = browser.get(&login).send().await.unwrap();
    assert_eq!(challenged.status().as_u16(), 401);
    assert_eq!(challenged.headers()["www-authenticate"], "Basic realm=\"kiln\"");
    let wrong = browser.get(&login).basic_auth("ada", Some("babbage")).send().await.unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    assert!(wrong.headers().get("set-cookie").is_none());

    let foreign = master.url("/auth/login?redirect=//evil.example/");
    let elsewhere = browser.get(&foreign).basic_auth("ada", Some("lovelace")).send().await.unwrap();
    assert_eq!(elsewhere.headers()["location"], "/", "never sent to another site");
    let logged_in = browser.get(&login).basic_auth("ada", Some("lovelace")).send().await.unwrap();
    assert_eq!(logged_in.status().as_u16(), 302);
    assert_eq!(logged_in.headers()["location"], "/#/builders/1");
    let set_cookie = logged_in.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Lax"), "{set_cookie}");
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    assert!(!cookie.contains("lovelace"), "the password is not in the cookie");

    let force = json!({ "jsonrpc": "2.0", "method": "force", "id": 1, "params": {} });
    let own_origin = format!("http://{}", master.http);
    let post = |cookie: Option<&str>, origin: &str| {
        let mut request =
            browser.post(master.url("/api/v2/forceschedulers/force")).header("Origin", origin).json(&force);
        if let Some(cookie) = cookie {
            request = request.header("Cookie", cookie);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    // A page gets no challenge (the browser would ask for a password for that one call).
    assert_eq!(post(None, &own_origin).await, 403, "anonymous");
    assert_eq!(post(Some(&cookie), &own_origin).await, 200, "logged in");
    assert_eq!(post(Some(&cookie), "http://evil.example").await, 403, "another site's page");
    let tampered = cookie.replacen(&cookie[cookie.len() - 4..], "0000", 1);
    assert_eq!(post(Some(&tampered), &own_origin).await, 403, "a forged cookie");
    assert_eq!(master.get("/api/v2/buildrequests").await["meta"]["total"], 1);

    let config = |cookie: Option<String>| {
        let mut request = browser.get(master.url("/config"));
        if let Some(cookie) = cookie {
            request = request.header("Cookie", cookie);
        }
        async move { request.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let anonymous = config(None).await;
    assert_eq!(anonymous["auth"]["name"], "UserPasswordAuth", "{anonymous}");
    assert_eq!(anonymous["user"], json!({"anonymous": true}));
    assert_eq!(config(Some(cookie.clone())).await["user"]["username"], "ada");

    let logout = browser.get(master.url("/auth/logout?redirect=/%23/")).send().await.unwrap();
    assert_eq!(logout.headers()["location"], "/#/");
    assert!(logout.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    master.stop().await;
}

/// A page on another site cannot drive a browser that can reach the master into control
/// actions: a JSON-RPC call whose `Origin` is not the master's own is refused and changes
/// nothing, while the UI's own calls (same origin) and clients that send no `Origin` pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_actions_from_another_origin_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let master = start(dir.path(), "true").await;
    let force = json!({ "jsonrpc": "2.0", "method": "force", "id": 1, "params": {} });
    let post = |origin: String| {
        master.client.post(master.url("/api/v2/forceschedulers/force")).header("Origin", origin).json(&force).send()
    };
    let refused = post("http://evil.example".to_owned()).await.unwrap();
    assert_eq!(refused.status().as_u16(), 403);
    let body: Value = refused.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("origin"), "{body}");
    assert_eq!(master.get("/api/v2/buildrequests").await["meta"]["total"], 0, "nothing was queued");
    let own = post(format!("http://{}", master.http)).await.unwrap();
    assert_eq!(own.status().as_u16(), 200);
    let (status, _) = rpc(&master, "forceschedulers/force", "force", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(master.get("/api/v2/buildrequests").await["meta"]["total"], 2);
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_actions_are_closed_unless_the_configuration_opens_them() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let text = config_text(&database, dir.path(), &setup("true")).replace("  auth: open\n", "");
    let master = TestMaster::start_with(Config::parse("closed.yaml", &text).unwrap(), dir.path()).await;
    let force = json!({ "jsonrpc": "2.0", "method": "force", "id": 1, "params": {} });
    let reply = master.client.post(master.url("/api/v2/forceschedulers/force")).json(&force).send().await.unwrap();
    assert_eq!(reply.status().as_u16(), 403);
    let body: serde_json::Value = reply.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("http.auth"), "{body}");
    let (status, _) = rpc(&master, "workers/1", "kill", json!({})).await;
    assert_eq!(status, 403);
    assert_eq!(master.get("/api/v2/buildrequests").await["meta"]["total"], 0, "nothing was queued");
    assert_eq!(master.get("/api/v2/builders").await["meta"]["total"], 1, "reading stays open");
    master.stop().await;

    let error = Config::parse(
        "typo.yaml",
        &config_text(&database, dir.path(), &setup("true")).replace("auth: open", "auth: opne"),
    )
    .unwrap_err();
    assert_eq!(error.key, "http.auth", "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_reaches_a_build_running_on_another_master() {
    let dir = tempfile::tempdir().unwrap();
    let database = pg::fresh_database().await;
    let a = TestMaster::start(
        &database,
        &dir.path().join("a"),
        &format!("master_name: a\n{}", setup("echo started; sleep 60")),
    )
    .await;
    let b = TestMaster::start(
        &database,
        &dir.path().join("b"),
        &format!("master_name: b\n{}", setup("echo started; sleep 60")),
    )
    .await;
    let _worker = spawn_worker(&format!("http://{}", b.grpc), "on-b", TOKEN, &dir.path().join("b"));
    b.wait_workers(1).await;
    let brid = force(&a, json!({})).await;
    let buildid = wait_running(&a, brid).await;
    let build = a.get(&format!("/api/v2/builds/{buildid}")).await;
    assert_ne!(build["builds"][0]["masterid"], a.master.masterid, "the build runs on the other master");
    let (status, _) = rpc(&a, &format!("builds/{buildid}"), "stop", json!({})).await;
    assert_eq!(status, 200);
    let stopped = a.wait_build_of_request(brid, Duration::from_secs(20)).await;
    assert_eq!(stopped["results"], 6);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_scheduler_ignores_changes_and_forces_until_enabled() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let setup = format!("{}  - {{type: single_branch, name: main, branch: main, builderNames: [b]}}\n", setup("true"));
    let master = TestMaster::start(&database, dir.path(), &setup).await;
    let schedulers = master.get("/api/v2/schedulers").await;
    assert_eq!(schedulers["meta"]["total"], 2);
    let id_of = |name: &str| {
        schedulers["schedulers"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap()["schedulerid"]
            .as_i64()
            .unwrap()
    };
    let (main, forced) = (id_of("main"), id_of("force"));
    assert_eq!(master.get(&format!("/api/v2/schedulers/{main}")).await["schedulers"][0]["enabled"], true);
    for id in [main, forced] {
        let (status, reply) = rpc(&master, &format!("schedulers/{id}"), "enable", json!({ "enabled": false })).await;
        assert_eq!(status, 200, "{reply}");
    }
    assert_eq!(master.post_change(&[("author", "a"), ("branch", "main"), ("revision", "r1")]).await.0, 200);
    let (status, reply) = master.force("force", json!({})).await;
    assert_eq!(status, 400, "{reply}");
    assert!(reply["error"]["message"].as_str().unwrap().contains("disabled"));
    assert_eq!(master.get("/api/v2/buildrequests").await["meta"]["total"], 0);

    rpc(&master, &format!("schedulers/{main}"), "enable", json!({ "enabled": true })).await;
    assert_eq!(master.post_change(&[("author", "a"), ("branch", "main"), ("revision", "r2")]).await.0, 200);
    assert_eq!(master.get("/api/v2/buildrequests").await["meta"]["total"], 1);
    let (status, _) = rpc(&master, "schedulers/999", "enable", json!({ "enabled": true })).await;
    assert_eq!(status, 404);
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_force_parameters_become_checked_properties() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let setup = r#"
builders:
  - name: b
    steps:
      - shell: {command: "true"}
schedulers:
  - type: force
    name: release
    builderNames: [b]
    parameters:
      - {name: flavour, type: choice, choices: [debug, release], default: debug}
      - {name: jobs, type: int, default: 2}
      - {name: ticket, type: string, required: true, regex: "^[A-Z]+-[0-9]+$"}
"#;
    let master = TestMaster::start(&database, dir.path(), setup).await;
    let (status, reply) = master.force("release", json!({ "flavour": "fast", "jobs": "many" })).await;
    assert_eq!(status, 400);
    assert_eq!(reply["error"]["code"], -32602);
    let fields: Vec<&String> = reply["error"]["message"].as_object().unwrap().keys().collect();
    assert_eq!(fields, vec!["flavour", "jobs", "ticket"], "{reply}");
    assert_eq!(master.get("/api/v2/buildrequests").await["meta"]["total"], 0);

    let (status, reply) = master.force("release", json!({ "jobs": "8", "ticket": "KILN-7", "stray": 1 })).await;
    assert_eq!(status, 200, "{reply}");
    let bsid = reply["result"][0].as_i64().unwrap();
    let buildsets = master.get(&format!("/api/v2/buildsets/{bsid}")).await;
    assert_eq!(buildsets["meta"], json!({}));
    let _worker = master.spawn_worker("w1");
    let brid = reply["result"][1].as_object().unwrap().values().next().unwrap().as_i64().unwrap();
    let build = master.wait_build_of_request(brid, MINUTE).await;
    let props = master.get(&format!("/api/v2/builds/{}?property=*", build["buildid"])).await;
    let props = &props["builds"][0]["properties"];
    assert_eq!(props["jobs"], json!([8, "Force Build Form"]), "typed as an integer");
    assert_eq!(props["flavour"][0], "debug", "the default fills in");
    assert_eq!(props["ticket"][0], "KILN-7");
    assert!(props.get("stray").is_none(), "undeclared fields are not properties");
    let form = master.get("/api/v2/forceschedulers/release").await;
    let names = form_field_names(&form["forceschedulers"][0]["all_fields"]);
    assert!(names.ends_with(&["flavour".to_string(), "jobs".into(), "ticket".into()]), "{names:?}");
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_force_sets_sources_for_each_named_codebase() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let setup = r#"
builders:
  - name: b
    steps:
      - shell: {command: "true"}
schedulers:
  - {type: force, name: force, builderNames: [b], codebases: [app, lib]}
"#;
    let master = TestMaster::start(&database, dir.path(), setup).await;
    let params = json!({ "app_branch": "main", "app_revision": "abc", "lib_branch": "dev", "lib_repository": "https://example.org/lib.git" });
    let (status, reply) = master.force("force", params).await;
    assert_eq!(status, 200, "{reply}");
    let buildset = master.get(&format!("/api/v2/buildsets/{}", reply["result"][0])).await;
    let stamps = buildset["buildsets"][0]["sourcestamps"].as_array().unwrap().clone();
    let by_codebase = |cb: &str| stamps.iter().find(|s| s["codebase"] == cb).cloned().unwrap();
    assert_eq!(
        (by_codebase("app")["branch"].as_str(), by_codebase("app")["revision"].as_str()),
        (Some("main"), Some("abc"))
    );
    assert_eq!(by_codebase("lib")["repository"], "https://example.org/lib.git");
    let form = master.get("/api/v2/forceschedulers/force").await;
    let names = form_field_names(&form["forceschedulers"][0]["all_fields"]);
    let has = |name: &str| names.iter().any(|n| n == name);
    assert!(has("lib_revision") && !has("revision"), "{names:?}");
    master.stop().await;
}

/// The full names (the names a force's parameters use) of a force form's input fields, in order, at any depth of Buildbot's nested groups.
fn form_field_names(fields: &Value) -> Vec<String> {
    let mut names = Vec::new();
    for field in fields.as_array().into_iter().flatten() {
        match field.get("fields") {
            Some(nested) => names.extend(form_field_names(nested)),
            None => names.extend(field["fullName"].as_str().map(str::to_string)),
        }
    }
    names
}
