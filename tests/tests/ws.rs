//! Buildbot's WebSocket event stream at `/ws`, against real masters and workers: subscriptions
//! with wildcards, the events of one build in Buildbot's order with the REST API's objects,
//! unsubscribing, ping, many clients, a client that never reads, and two masters on one
//! PostgreSQL database.

use std::time::Duration;

use kiln_master::domain::{NewBuildset, SourceStamp};
use kiln_tests::eventually;
use kiln_tests::pg;
use kiln_tests::system::TestMaster;
use kiln_tests::ws::{Event, EventClient};
use serde_json::{Value, json};

const MINUTE: Duration = Duration::from_secs(60);

const BUILDER: &str = r#"
collapseRequests: false
builders:
  - name: echo
    steps:
      - shell: {name: talk, command: "echo one; sleep 0.5; echo two"}
      - shell: {name: quiet, command: "true"}
schedulers:
  - {type: force, name: force, builderNames: [echo]}
"#;

fn sqlite_url(dir: &std::path::Path) -> String {
    format!("sqlite://{}", dir.join("kiln.sqlite").display())
}

/// Where the first event with this key is, panicking when there is none.
fn position(events: &[Event], key: &str) -> usize {
    events.iter().position(|e| e.key == key).unwrap_or_else(|| {
        let keys: Vec<&str> = events.iter().map(|e| e.key.as_str()).collect();
        panic!("no event {key} in {keys:?}")
    })
}

fn last<'a>(events: &'a [Event], key: &str) -> &'a Event {
    events.iter().rev().find(|e| e.key == key).unwrap_or_else(|| panic!("no event {key}"))
}

async fn subscribe_all(client: &mut EventClient) {
    for path in ["buildsets/*/*", "buildrequests/*/*", "builds/*/*", "builds/*/properties/*", "steps/*/*", "logs/*/*"] {
        client.subscribe(path).await;
    }
}

async fn one_build_in_order(database: String) {
    let dir = tempfile::tempdir().unwrap();
    let master = TestMaster::start(&database, dir.path(), BUILDER).await;
    let _worker = master.spawn_worker("w1");
    master.wait_workers(1).await;
    let mut client = EventClient::connect(master.http).await;
    subscribe_all(&mut client).await;
    let pong = client.command(json!({"cmd": "ping"})).await;
    assert_eq!((pong["msg"].as_str(), pong["code"].as_i64()), (Some("pong"), Some(200)));

    let brid = master.force_request("force", json!({"builderid": 1, "username": "Ada <ada@example.com>"})).await;
    let build = master.wait_build_of_request(brid, MINUTE).await;
    let (buildid, bsid) = (build["buildid"].as_i64().unwrap(), 1);
    let events = client.events_until(&format!("buildsets/{bsid}/complete"), MINUTE).await;

    // Buildbot's order: the request, its claim, the build, its steps and logs, the build's end,
    // the request's and the buildset's.
    let order = [
        format!("buildsets/{bsid}/new"),
        format!("buildrequests/{brid}/new"),
        format!("buildrequests/{brid}/claimed"),
        format!("builds/{buildid}/new"),
        format!("builds/{buildid}/finished"),
        format!("buildrequests/{brid}/complete"),
        format!("buildsets/{bsid}/complete"),
    ];
    let at: Vec<usize> = order.iter().map(|k| position(&events, k)).collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "out of order: {order:?} at {at:?}");

    let steps = master.get(&format!("/api/v2/builds/{buildid}/steps")).await;
    let steps = steps["steps"].as_array().unwrap().clone();
    assert_eq!(steps.len(), 2);
    for step in &steps {
        let stepid = step["stepid"].as_i64().unwrap();
        let keys = ["new", "started", "finished"].map(|e| position(&events, &format!("steps/{stepid}/{e}")));
        assert!(keys[0] < keys[1] && keys[1] < keys[2], "step {stepid}: {keys:?}");
        assert!(at[3] < keys[0] && keys[2] < at[4], "step {stepid} inside its build");
        let logs = master.get(&format!("/api/v2/steps/{stepid}/logs")).await;
        let logid = logs["logs"][0]["logid"].as_i64().unwrap();
        let new = position(&events, &format!("logs/{logid}/new"));
        let finished = position(&events, &format!("logs/{logid}/finished"));
        assert!(new < finished);
        let finished = &events[finished].object;
        assert_eq!(finished, &logs["logs"][0], "a log event carries the REST object");
    }
    // The talking step's log grew by `append` events, the last one counting both lines.
    let talk = steps[0]["stepid"].as_i64().unwrap();
    let logs = master.get(&format!("/api/v2/steps/{talk}/logs")).await;
    let logid = logs["logs"][0]["logid"].as_i64().unwrap();
    let appends: Vec<i64> = events
        .iter()
        .filter(|e| e.key == format!("logs/{logid}/append"))
        .map(|e| e.object["num_lines"].as_i64().unwrap())
        .collect();
    assert!(!appends.is_empty(), "the log grew by append events");
    assert!(appends.windows(2).all(|w| w[0] <= w[1]), "{appends:?}");
    assert_eq!(*appends.last().unwrap(), logs["logs"][0]["num_lines"].as_i64().unwrap());

    // Events carry the REST API's object, without its properties.
    let rest = master.get(&format!("/api/v2/builds/{buildid}")).await;
    assert_eq!(last(&events, &format!("builds/{buildid}/finished")).object, rest["builds"][0]);
    assert_eq!(rest["builds"][0]["results"], 0);
    let rest = master.get(&format!("/api/v2/buildrequests/{brid}")).await;
    assert_eq!(last(&events, &format!("buildrequests/{brid}/complete")).object, rest["buildrequests"][0]);
    // Properties arrive as their own event, with the build's owners.
    let properties = &last(&events, &format!("builds/{buildid}/properties/update")).object;
    assert_eq!(properties["owners"], json!([["Ada <ada@example.com>"], "Build"]));
    assert_eq!(properties["buildnumber"], json!([1, "Build"]));

    // Unsubscribed from builds, a second build shows only its requests and buildset.
    client.unsubscribe("builds/*/*").await;
    client.unsubscribe("steps/*/*").await;
    client.unsubscribe("logs/*/*").await;
    client.unsubscribe("builds/*/properties/*").await;
    let again = client.command(json!({"cmd": "stopConsuming", "path": "builds/*/*"})).await;
    assert_eq!(again["code"], 400, "{again}");
    // A stopped path is still delivered for a second (the UI stops and starts paths as it draws).
    kiln_tests::real_sleep(std::time::Duration::from_millis(1500)).await;
    let second = master.force_request("force", json!({"builderid": 1})).await;
    let events = client.events_until("buildsets/2/complete", MINUTE).await;
    assert!(events.iter().all(|e| e.key.starts_with("buildrequests/") || e.key.starts_with("buildsets/")));
    assert!(events.iter().any(|e| e.key == format!("buildrequests/{second}/claimed")));
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builds_events_arrive_in_buildbots_order_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    one_build_in_order(sqlite_url(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builds_events_arrive_in_buildbots_order_on_postgres() {
    one_build_in_order(pg::fresh_database().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_matches_one_segment_and_a_narrow_path_only_its_objects() {
    let dir = tempfile::tempdir().unwrap();
    let master = TestMaster::start(&sqlite_url(dir.path()), dir.path(), BUILDER).await;
    let _worker = master.spawn_worker("w1");
    master.wait_workers(1).await;
    let mut narrow = EventClient::connect(master.http).await;
    // As the UI's build page subscribes: one build and its steps, by id, before the build exists.
    narrow.subscribe("builds/2/*").await;
    narrow.subscribe("builds/2/steps/*/*").await;
    narrow.subscribe("builders/1/builds/*/*").await;
    let mut wrong_length = EventClient::connect(master.http).await;
    wrong_length.subscribe("builds/*").await;
    wrong_length.subscribe("builds/*/steps/*").await;

    let first = master.force_request("force", json!({"builderid": 1})).await;
    master.wait_build_of_request(first, MINUTE).await;
    let second = master.force_request("force", json!({"builderid": 1})).await;
    master.wait_build_of_request(second, MINUTE).await;
    let events = narrow.events_until("builds/2/finished", MINUTE).await;
    let keys: Vec<&str> = events.iter().map(|e| e.key.as_str()).collect();
    for key in &keys {
        let ours = key.starts_with("builds/2/") || key.starts_with("builders/1/builds/");
        assert!(ours, "{key} does not match the subscriptions: {keys:?}");
    }
    assert!(keys.contains(&"builders/1/builds/1/finished"), "the builder's path covers every build: {keys:?}");
    assert!(keys.iter().filter(|k| k.starts_with("builds/2/steps/")).count() >= 6, "{keys:?}");
    assert!(wrong_length.next_event(Duration::from_secs(1)).await.is_none(), "no key has those lengths");
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_see_the_same_events_and_a_client_that_never_reads_is_let_go() {
    let dir = tempfile::tempdir().unwrap();
    // Twenty builders only an absent worker may run, so their requests wait.
    let queued: String = (0..20)
        .map(|i| format!("  - {{name: queued{i}, workernames: [nobody], steps: [{{shell: {{command: \"true\"}}}}]}}\n"))
        .collect();
    let setup = BUILDER.replace("schedulers:\n", &format!("{queued}schedulers:\n"));
    let master = TestMaster::start(&sqlite_url(dir.path()), dir.path(), &setup).await;
    let _worker = master.spawn_worker("w1");
    master.wait_workers(1).await;

    let mut readers = Vec::new();
    for _ in 0..20 {
        let mut client = EventClient::connect(master.http).await;
        client.subscribe("buildsets/*/*").await;
        readers.push(client);
    }
    // A client that subscribes to every path of every request and then never reads again.
    let mut stalled = EventClient::connect(master.http).await;
    for path in ["buildrequests/*/*", "builders/*/buildrequests/*/*", "buildsets/*/builders/*/buildrequests/*/*"] {
        stalled.subscribe(path).await;
    }
    let dropped_before = dropped(&master).await;

    // A burst no worker serves: 20 requests per buildset, each published under three paths.
    let builderids: Vec<i64> = (0..20).map(|i| master.master.builder_id(&format!("queued{i}")).unwrap()).collect();
    const BUILDSETS: i64 = 600;
    for i in 0..BUILDSETS {
        let buildset = NewBuildset {
            reason: format!("burst {i} {}", "x".repeat(200)),
            sourcestamps: vec![SourceStamp { branch: Some("main".into()), ..Default::default() }],
            builderids: builderids.clone(),
            ..Default::default()
        };
        master.master.store.add_buildset(&buildset).await.unwrap();
    }
    // Builds go on meanwhile: the stalled client slows nothing.
    let brid = master.force_request("force", json!({"builderid": 1})).await;
    let build = master.wait_build_of_request(brid, MINUTE).await;
    assert_eq!(build["results"], 0);

    // Every reader saw every buildset, in order, then the forced one.
    let forced = BUILDSETS + 1;
    for reader in &mut readers {
        let events = reader.events_until(&format!("buildsets/{forced}/complete"), MINUTE).await;
        let new: Vec<i64> =
            events.iter().filter(|e| e.key.ends_with("/new")).map(|e| e.object["bsid"].as_i64().unwrap()).collect();
        assert_eq!(new, (1..=forced).collect::<Vec<_>>());
    }
    // The master let the stalled client go: it counted it, and the connection ends before the
    // client has read anywhere near everything published to it.
    eventually("the stalled client dropped", MINUTE, || async {
        (dropped(&master).await > dropped_before).then_some(())
    })
    .await;
    let published = BUILDSETS * 20 * 3;
    let read = stalled.drain_until_closed(Duration::from_secs(30)).await.expect("the master closed the connection");
    assert!((read as i64) < published, "read {read} of {published}");
    master.stop().await;
}

/// The master's count of event stream clients it dropped.
async fn dropped(master: &TestMaster) -> f64 {
    let (_, text) = master.get_text("/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix("kiln_websocket_clients_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_on_one_master_sees_a_build_another_master_runs() {
    let database = pg::fresh_database().await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = TestMaster::start(&database, dir_a.path(), BUILDER).await;
    let b = TestMaster::start(&database, dir_b.path(), BUILDER).await;
    // Only master B has a worker, so B runs the build; the browser is on A.
    let _worker = b.spawn_worker("w1");
    b.wait_workers(1).await;
    let mut client = EventClient::connect(a.http).await;
    subscribe_all(&mut client).await;
    client.subscribe("workers/*/*").await;

    let brid = b.force_request("force", json!({"builderid": 1})).await;
    let build = b.wait_build_of_request(brid, MINUTE).await;
    let buildid = build["buildid"].as_i64().unwrap();
    let events = client.events_until("buildsets/1/complete", MINUTE).await;
    let started = position(&events, &format!("builds/{buildid}/new"));
    let finished = position(&events, &format!("builds/{buildid}/finished"));
    assert!(started < finished);
    assert_eq!(events[finished].object["masterid"], b.master.masterid);
    assert_eq!(events[finished].object["results"], 0);
    assert!(events.iter().any(|e| e.key.starts_with("logs/") && e.key.ends_with("/append")));
    // And each event once, though both masters hear the database's notifications.
    let news = events.iter().filter(|e| e.key == format!("builds/{buildid}/new")).count();
    assert_eq!(news, 1);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_commands_are_answered_and_the_connection_stays() {
    let dir = tempfile::tempdir().unwrap();
    let master = TestMaster::start(&sqlite_url(dir.path()), dir.path(), BUILDER).await;
    let mut client = EventClient::connect(master.http).await;
    let unknown = client.command(json!({"cmd": "dance"})).await;
    assert_eq!(unknown["code"], 404, "{unknown}");
    let no_path = client.command(json!({"cmd": "startConsuming"})).await;
    assert_eq!(no_path["code"], 400, "{no_path}");
    let empty = client.command(json!({"cmd": "startConsuming", "path": "builds//new"})).await;
    assert_eq!(empty["code"], 400, "{empty}");
    let pong = client.command(json!({"cmd": "ping"})).await;
    assert_eq!(pong["msg"], Value::from("pong"));
    master.stop().await;
}
