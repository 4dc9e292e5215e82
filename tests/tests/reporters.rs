//! Reporters against a fake GitHub on loopback: commit statuses go `pending` when a build starts
//! and `success` or `failure` when it ends, for the built commit and Buildbot's context, with a
//! link to the build's page; a forge that fails for a while gets every status once it answers,
//! in order per commit and context.

use std::time::Duration;

use kiln_master::config::Config;
use kiln_tests::eventually;
use kiln_tests::forge::FakeForge;
use kiln_tests::process::MasterNode;
use kiln_tests::system::{TOKEN as WORKER_TOKEN, TestMaster, config_text, spawn_worker};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);
const TOKEN: &str = "ghs_test_token";

/// A builder that succeeds, one that fails, and a force scheduler for both.
const BUILDERS: &str = r#"builders:
  - name: ok
    steps: [{shell: {command: "true"}}]
  - name: bad
    steps: [{shell: {command: "false"}}]
schedulers:
  - {type: force, name: force, builderNames: [ok, bad]}
"#;

/// Builders `ok` and `bad`, a force scheduler and a GitHub reporter sending to `github`.
fn setup(dir: &std::path::Path, github: &FakeForge) -> String {
    std::fs::write(dir.join("gh-token"), format!("{TOKEN}\n")).unwrap();
    format!(
        r#"
collapseRequests: false
{BUILDERS}services:
  - type: github_status
    name: github
    token_file: "{token}"
    base_url: "{base}"
"#,
        token = dir.join("gh-token").display(),
        base = github.base_url
    )
}

async fn master(dir: &std::path::Path, github: &FakeForge) -> TestMaster {
    let setup = setup(dir, github);
    let database = format!("sqlite://{}", dir.join("kiln.sqlite").display());
    let text = config_text(&database, dir, &setup);
    TestMaster::start_with(Config::parse("reporters.yaml", &text).unwrap(), dir).await
}

fn force_params(builder: i64, sha: &str) -> serde_json::Value {
    json!({ "builderid": builder, "repository": "https://github.com/kiln-ci/app.git", "revision": sha, "branch": "main" })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_marks_its_commit_pending_then_success_and_a_failing_one_failure() {
    let dir = tempfile::tempdir().unwrap();
    let github = FakeForge::github(TOKEN).await;
    let master = master(dir.path(), &github).await;
    let _worker = master.spawn_worker("w1");
    master.wait_workers(1).await;

    let ok = master.force_request("force", force_params(1, "a1b2c3d4")).await;
    let bad = master.force_request("force", force_params(2, "e5f6a7b8")).await;
    for brid in [ok, bad] {
        master.wait_build_of_request(brid, MINUTE).await;
    }
    eventually("both final statuses", MINUTE, || async {
        (github.accepted().iter().filter(|s| s.state != "pending").count() == 2).then_some(())
    })
    .await;
    assert_eq!(github.states("a1b2c3d4", "buildbot/ok"), ["pending", "success"]);
    assert_eq!(github.states("e5f6a7b8", "buildbot/bad"), ["pending", "failure"]);
    let success = github.accepted().into_iter().find(|s| s.state == "success").unwrap();
    assert_eq!((success.owner.as_str(), success.repo.as_str()), ("kiln-ci", "app"));
    assert!(success.target_url.ends_with("/#/builders/1/builds/1"), "{}", success.target_url);
    assert!(github.malformed().is_empty(), "{:?}", github.malformed());
    // Connections are kept for the next status (at most two of these sends overlap).
    assert!(github.connections() <= 2, "{} connections for {} statuses", github.connections(), github.requests());

    // The master records a send just after the forge answered it.
    let reports = eventually("the four reports recorded as sent", MINUTE, || async {
        let reports = master.get("/api/v2/reports?state=sent").await;
        (reports["meta"]["total"] == 4).then_some(reports)
    })
    .await;
    assert!(reports["reports"].as_array().unwrap().iter().all(|r| r["reporter"] == "github" && r["attempts"] == 1));
    let (status, _) = master.get_text("/api/v2/reports?state=lost").await;
    assert_eq!(status, 400);
    let cli = std::process::Command::new(kiln_tests::binary("kiln"))
        .args(["--url", &master.url(""), "reports", "--state", "sent"])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&cli.stdout);
    assert!(cli.status.success() && listing.matches("github").count() == 4, "{listing}");

    let (_, metrics) = master.get_text("/metrics").await;
    // The recorder is the test process's, shared with the other tests: at least these four.
    let sent = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kiln_reports_total{reporter=\"github\",outcome=\"sent\"} "))
        .and_then(|n| n.trim().parse::<u64>().ok());
    assert!(sent.is_some_and(|n| n >= 4), "{metrics}");
    assert!(!metrics.contains(TOKEN));
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forge_that_fails_for_a_while_gets_every_status_in_order_once_it_answers() {
    let dir = tempfile::tempdir().unwrap();
    let github = FakeForge::github(TOKEN).await;
    github.fail_next(6);
    let master = master(dir.path(), &github).await;
    let _worker = master.spawn_worker("w1");
    master.wait_workers(1).await;

    let shas = ["1111aaaa", "2222bbbb", "3333cccc"];
    for sha in shas {
        let brid = master.force_request("force", force_params(1, sha)).await;
        // The builds finish while the forge is still failing: reports wait, builds do not.
        master.wait_build_of_request(brid, MINUTE).await;
    }
    eventually("every status after the outage", MINUTE, || async {
        (github.accepted().len() == 2 * shas.len()).then_some(())
    })
    .await;
    for sha in shas {
        assert_eq!(github.states(sha, "buildbot/ok"), ["pending", "success"], "{sha}");
    }
    assert!(github.requests() > 2 * shas.len(), "the outage was met and retried");
    master.stop().await;
}

/// The forge goes off the network for 30 seconds (connections refused) while builds start and
/// end: the builds do not wait, and once the forge is back every status arrives, once, in order
/// per commit and context — a rebuilt commit's four states included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forge_off_the_network_for_30_seconds_gets_every_status_in_order_after_it_returns() {
    const OUTAGE: Duration = Duration::from_secs(30);
    let dir = tempfile::tempdir().unwrap();
    let github = FakeForge::github(TOKEN).await;
    let master = master(dir.path(), &github).await;
    let _worker = master.spawn_worker("w1");
    master.wait_workers(1).await;

    github.go_down().await;
    let down_at = std::time::Instant::now();
    let builds = [(1, "aaaa0001"), (2, "bbbb0002"), (1, "cccc0003"), (1, "aaaa0001"), (2, "dddd0004")];
    for (builder, sha) in builds {
        let brid = master.force_request("force", force_params(builder, sha)).await;
        master.wait_build_of_request(brid, MINUTE).await;
    }
    assert!(down_at.elapsed() < OUTAGE, "the builds ran while the forge was down, without waiting on it");
    let tried = eventually("reports tried and put off during the outage", MINUTE, || async {
        let reports = master.get("/api/v2/reports?state=pending").await;
        let retried = reports["reports"].as_array()?.iter().filter(|r| r["attempts"].as_i64() > Some(0)).count();
        (retried > 0).then_some(retried)
    })
    .await;
    assert!(github.accepted().is_empty(), "nothing can arrive while the forge is down");
    tokio::time::sleep(OUTAGE.saturating_sub(down_at.elapsed())).await;
    github.come_back().await;

    // Backoff doubles from 2 s: a report tried all through the outage is due again within 32 s.
    eventually("every status after the forge came back", 2 * MINUTE, || async {
        (github.accepted().len() == 2 * builds.len()).then_some(())
    })
    .await;
    assert_eq!(github.states("aaaa0001", "buildbot/ok"), ["pending", "success", "pending", "success"]);
    assert_eq!(github.states("bbbb0002", "buildbot/bad"), ["pending", "failure"]);
    assert_eq!(github.states("cccc0003", "buildbot/ok"), ["pending", "success"]);
    assert_eq!(github.states("dddd0004", "buildbot/bad"), ["pending", "failure"]);
    assert!(github.malformed().is_empty(), "{:?}", github.malformed());
    let settled = eventually("all reports settled as sent", MINUTE, || async {
        let reports = master.get("/api/v2/reports?state=sent").await;
        (reports["meta"]["total"] == 2 * builds.len()).then_some(reports)
    })
    .await;
    let attempts: i64 = settled["reports"].as_array().unwrap().iter().filter_map(|r| r["attempts"].as_i64()).sum();
    assert!(attempts > (2 * builds.len()) as i64, "{tried} reports were retried: {attempts} attempts in all");
    master.stop().await;
}

/// A forge behind a private certificate authority: with the CA in `ca_file` statuses arrive
/// over HTTPS; a second reporter without it never sends, and its reports say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forge_with_a_private_ca_is_reached_over_https_when_its_ca_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let ca = kiln_tests::tls::Ca::new("Example Corp CA");
    let (cert, key, _) = ca.issue(dir.path(), "forge");
    let tls = kiln_master::config::TlsConfig { cert, key, client_ca: None };
    let github = FakeForge::github_https(TOKEN, &tls).await;
    let ca_file = ca.write(dir.path(), "corp-ca.pem");
    let setup = setup(dir.path(), &github)
        .replace("    base_url:", &format!("    ca_file: \"{}\"\n    base_url:", ca_file.display()))
        + &format!(
            "  - {{type: github_status, name: untrusting, builders: [ok], context: other/ok, token_file: \"{}\", base_url: \"{}\"}}\n",
            dir.path().join("gh-token").display(),
            github.base_url
        );
    assert!(setup.contains("ca_file"), "{setup}");
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let text = config_text(&database, dir.path(), &setup);
    let master = TestMaster::start_with(Config::parse("https.yaml", &text).unwrap(), dir.path()).await;
    let _worker = master.spawn_worker("w1");
    master.wait_workers(1).await;
    let brid = master.force_request("force", force_params(1, "cafe0001")).await;
    master.wait_build_of_request(brid, MINUTE).await;
    eventually("both statuses over HTTPS", MINUTE, || async {
        (github.states("cafe0001", "buildbot/ok").len() == 2).then_some(())
    })
    .await;
    assert_eq!(github.states("cafe0001", "buildbot/ok"), ["pending", "success"]);
    let refused = eventually("the untrusting reporter's failed attempt", MINUTE, || async {
        let reports = master.get("/api/v2/reports?state=pending").await;
        let answer = reports["reports"]
            .as_array()?
            .iter()
            .find(|r| r["reporter"] == "untrusting" && r["attempts"].as_i64() > Some(0))?["last_answer"]
            .as_str()?
            .to_owned();
        Some(answer)
    })
    .await;
    assert!(refused.contains("certificate"), "{refused}");
    assert!(github.states("cafe0001", "other/ok").is_empty());
    master.stop().await;
}

/// The master dies (SIGKILL) after a build ended and before its reports were sent — the start's
/// `pending` hanging at the forge, the end's `success` waiting behind it. Restarted, it sends
/// both, once each, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_before_sending_sends_each_report_once_after_its_restart() {
    let dir = tempfile::tempdir().unwrap();
    let github = FakeForge::github(TOKEN).await;
    github.hold(true);
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let mut master = MasterNode::start(dir.path(), "m1", &database, 10, &setup(dir.path(), &github)).await;
    let _worker = spawn_worker(&master.grpc_url(), "w1", WORKER_TOKEN, dir.path());
    let client = reqwest::Client::new();
    let force = json!({ "jsonrpc": "2.0", "method": "force", "id": 1, "params": force_params(1, "c0ffee42") });
    let reply = client.post(format!("{}/api/v2/forceschedulers/force", master.base())).json(&force).send().await;
    assert_eq!(reply.unwrap().status().as_u16(), 200);
    eventually("the build to end while its first report hangs", MINUTE, || async {
        let builds: serde_json::Value = client
            .get(format!("{}/api/v2/builds?complete=true", master.base()))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (builds["meta"]["total"] == 1 && github.held() == 1).then_some(())
    })
    .await;
    master.kill().await;
    github.hold(false);
    assert!(github.accepted().is_empty());

    master.restart().await;
    eventually("both statuses after the restart", MINUTE, || async { (github.accepted().len() == 2).then_some(()) })
        .await;
    // Nothing more comes: each was sent once.
    kiln_tests::real_sleep(Duration::from_secs(2)).await;
    assert_eq!(github.states("c0ffee42", "buildbot/ok"), ["pending", "success"]);
    assert!(master.log().contains("left reports unsent"), "{}", master.log());
    master.kill().await;
}

/// Two masters on one PostgreSQL run 100 builds; each report is claimed by one master only, so
/// the forge sees exactly one `pending` and one final status per build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_masters_send_each_report_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let github = FakeForge::github(TOKEN).await;
    let database = kiln_tests::pg::fresh_database().await;
    let setup = setup(dir.path(), &github);
    let one = MasterNode::start(dir.path(), "m1", &database, 10, &setup).await;
    let two = MasterNode::start(dir.path(), "m2", &database, 10, &setup).await;
    let _workers = [
        spawn_worker(&one.grpc_url(), "w1", WORKER_TOKEN, dir.path()),
        spawn_worker(&two.grpc_url(), "w2", WORKER_TOKEN, dir.path()),
    ];
    let client = reqwest::Client::new();
    const BUILDS: usize = 100;
    let shas: Vec<String> = (0..BUILDS).map(|i| format!("{i:08x}")).collect();
    for (i, sha) in shas.iter().enumerate() {
        let base = if i % 2 == 0 { one.base() } else { two.base() };
        let force = json!({ "jsonrpc": "2.0", "method": "force", "id": 1, "params": force_params(1, sha) });
        let reply = client.post(format!("{base}/api/v2/forceschedulers/force")).json(&force).send().await.unwrap();
        assert_eq!(reply.status().as_u16(), 200);
    }
    eventually("every build's final status", Duration::from_secs(120), || async {
        (github.accepted().iter().filter(|s| s.state == "success").count() >= BUILDS).then_some(())
    })
    .await;
    kiln_tests::real_sleep(Duration::from_secs(2)).await;
    for sha in &shas {
        assert_eq!(github.states(sha, "buildbot/ok"), ["pending", "success"], "{sha}");
    }
    assert_eq!(github.accepted().len(), 2 * BUILDS);
}

type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>>;

/// An HTTP endpoint on loopback recording each POST to `/hook`: its URL and what it received
/// (the `Authorization` header and the JSON body).
async fn hook_receiver() -> (String, Received) {
    let received: Received = Default::default();
    let app = {
        let received = std::sync::Arc::clone(&received);
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::Json<serde_json::Value>| {
                let received = std::sync::Arc::clone(&received);
                async move {
                    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
                    received.lock().unwrap().push((auth.to_owned(), body.0));
                    "ok"
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (hook, received)
}

/// `mode: [problem]` reports a failure only when the builder's build before it did not fail:
/// fail (first build: reported), fail (not), success (not), fail (reported).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn problem_mode_reports_a_failure_only_after_a_build_that_did_not_fail() {
    let (hook, received) = hook_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let exit_code = dir.path().join("exit-code");
    let setup = format!(
        r#"
collapseRequests: false
builders:
  - name: flip
    steps: [{{shell: {{command: ["sh", "-c", "exit $(cat {exit})"]}}}}]
schedulers:
  - {{type: force, name: force, builderNames: [flip]}}
services:
  - {{type: http_push, name: problems, url: "{hook}", mode: [problem]}}
"#,
        exit = exit_code.display()
    );
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let text = config_text(&database, dir.path(), &setup);
    let master = TestMaster::start_with(Config::parse("problem.yaml", &text).unwrap(), dir.path()).await;
    let _worker = master.spawn_worker("w1");
    master.wait_workers(1).await;
    for (number, code) in [(1, "1"), (2, "1"), (3, "0"), (4, "1")] {
        std::fs::write(&exit_code, code).unwrap();
        let brid = master.force_request("force", force_params(1, &format!("abcd000{number}"))).await;
        master.wait_build_of_request(brid, MINUTE).await;
    }
    eventually("the four finished reports settled", MINUTE, || async {
        let reports = master.get("/api/v2/reports").await;
        let settled = reports["reports"].as_array()?.iter().filter(|r| r["state"] != "pending").count();
        (settled == 4).then_some(())
    })
    .await;
    let numbers: Vec<i64> = received.lock().unwrap().iter().filter_map(|(_, body)| body["number"].as_i64()).collect();
    assert_eq!(numbers, [1, 4], "builds 1 and 4 follow no failure");
    let skipped = master.get("/api/v2/reports?state=skipped").await;
    assert_eq!(skipped["meta"]["total"], 2, "{skipped}");
    master.stop().await;
}

/// An HTTP push with `mode: [failing]` and a bearer token POSTs the failing build only, as
/// Buildbot's `HttpStatusPush` does: the build with its builder, buildset (source stamps),
/// request, properties and the link to its page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_push_posts_the_failing_build_with_its_details() {
    let (hook, received) = hook_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: set before the master starts; no other test of this binary reads this variable.
    unsafe { std::env::set_var("KILN_TEST_CHAT_TOKEN", "chat-s3cret") };
    let setup = format!(
        r#"
{BUILDERS}services:
  - {{type: http_push, name: chat, url: "{hook}", bearer_env: KILN_TEST_CHAT_TOKEN, mode: [failing]}}
"#
    );
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let text = config_text(&database, dir.path(), &setup);
    let master = TestMaster::start_with(Config::parse("push.yaml", &text).unwrap(), dir.path()).await;
    let _worker = master.spawn_worker("w1");
    master.wait_workers(1).await;
    for (builder, sha) in [(1, "aaaa1111"), (2, "bbbb2222")] {
        let brid = master.force_request("force", force_params(builder, sha)).await;
        master.wait_build_of_request(brid, MINUTE).await;
    }
    eventually("the failing build's push", MINUTE, || async { (!received.lock().unwrap().is_empty()).then_some(()) })
        .await;
    kiln_tests::real_sleep(Duration::from_secs(1)).await;
    let received = received.lock().unwrap().clone();
    assert_eq!(received.len(), 1, "only the failing build: {received:?}");
    let (auth, body) = &received[0];
    assert_eq!(auth, "Bearer chat-s3cret");
    assert_eq!((body["results"].as_i64(), body["complete"].as_bool()), (Some(2), Some(true)), "{body}");
    assert_eq!(body["builder"]["name"], "bad");
    assert_eq!(body["buildset"]["sourcestamps"][0]["revision"], "bbbb2222");
    assert_eq!(body["buildrequest"]["buildrequestid"], body["buildrequestid"]);
    assert!(body["url"].as_str().unwrap().ends_with("/#/builders/2/builds/1"), "{body}");
    assert!(body["properties"]["buildername"].is_array(), "{body}");
    for field in ["buildid", "number", "builderid", "workerid", "masterid", "started_at", "complete_at", "state_string"]
    {
        assert!(body.get(field).is_some(), "{field} missing: {body}");
    }
    master.stop().await;
}

/// GitLab: `running` when a build starts, `success` or `failed` when it ends, the project found
/// from the repository URL (a subgroup's too), the context in `name`, the branch in `ref`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitlab_commits_go_running_then_success_or_failed() {
    let dir = tempfile::tempdir().unwrap();
    let gitlab = FakeForge::gitlab("glpat-test").await;
    std::fs::write(dir.path().join("gl-token"), "glpat-test").unwrap();
    let setup = setup(dir.path(), &gitlab).replace(
        &format!(
            "  - type: github_status\n    name: github\n    token_file: \"{}\"",
            dir.path().join("gh-token").display()
        ),
        &format!(
            "  - type: gitlab_status\n    name: gitlab\n    token_file: \"{}\"",
            dir.path().join("gl-token").display()
        ),
    );
    assert!(setup.contains("gitlab_status"), "{setup}");
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let text = config_text(&database, dir.path(), &setup);
    let master = TestMaster::start_with(Config::parse("gitlab.yaml", &text).unwrap(), dir.path()).await;
    let _worker = master.spawn_worker("w1");
    master.wait_workers(1).await;
    for (builder, sha) in [(1, "ab12cd34"), (2, "ef56ab78")] {
        let params = json!({ "builderid": builder, "repository": "https://gitlab.example/group/sub/app.git", "revision": sha, "branch": "main" });
        let brid = master.force_request("force", params).await;
        master.wait_build_of_request(brid, MINUTE).await;
    }
    eventually("both final statuses", MINUTE, || async { (gitlab.accepted().len() == 4).then_some(()) }).await;
    assert_eq!(gitlab.states("ab12cd34", "buildbot/ok"), ["running", "success"]);
    assert_eq!(gitlab.states("ef56ab78", "buildbot/bad"), ["running", "failed"]);
    let status = &gitlab.accepted()[0];
    assert_eq!((status.owner.as_str(), status.repo.as_str()), ("group", "sub/app"));
    assert!(gitlab.malformed().is_empty(), "{:?}", gitlab.malformed());
    master.stop().await;
}

/// A forge that refuses the token (401) gets each report once: it is marked failed with the
/// answer, logged with the reporter's name, and not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_report_is_failed_once_and_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let github = FakeForge::github("the-right-token").await;
    let master = master(dir.path(), &github).await;
    let _worker = master.spawn_worker("w1");
    master.wait_workers(1).await;
    let brid = master.force_request("force", force_params(1, "deadbeef")).await;
    master.wait_build_of_request(brid, MINUTE).await;
    eventually("both reports failed", MINUTE, || async {
        let failed = master.get("/api/v2/reports?state=failed").await;
        (failed["meta"]["total"] == 2).then_some(failed)
    })
    .await;
    kiln_tests::real_sleep(Duration::from_secs(2)).await;
    assert_eq!(github.requests(), 2, "each report was tried once");
    let failed = master.get("/api/v2/reports?state=failed").await;
    for report in failed["reports"].as_array().unwrap() {
        assert_eq!(
            (report["last_answer"].as_str(), report["attempts"].as_i64()),
            (Some("401: Bad credentials"), Some(1)),
            "{report}"
        );
    }
    assert!(github.accepted().is_empty());
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_is_used_without_losing_a_report() {
    let dir = tempfile::tempdir().unwrap();
    let github = FakeForge::github(TOKEN).await;
    let master = master(dir.path(), &github).await;
    let _worker = master.spawn_worker("w1");
    master.wait_workers(1).await;
    let first = master.force_request("force", force_params(1, "1111aaaa")).await;
    master.wait_build_of_request(first, MINUTE).await;
    eventually("the first build's statuses", MINUTE, || async {
        (github.states("1111aaaa", "buildbot/ok").len() == 2).then_some(())
    })
    .await;

    // The token is replaced at the forge and in the file at once: the master holds the old one
    // for a while, is refused with it, and sends again with the new one.
    github.accept_token("the-rotated-token");
    std::fs::write(dir.path().join("gh-token"), "the-rotated-token\n").unwrap();
    let second = master.force_request("force", force_params(1, "2222bbbb")).await;
    master.wait_build_of_request(second, MINUTE).await;
    eventually("the second build's statuses", MINUTE, || async {
        (github.states("2222bbbb", "buildbot/ok") == ["pending", "success"]).then_some(())
    })
    .await;
    // The old token was refused at least once on the way.
    assert!(github.requests() > github.accepted().len(), "{} requests", github.requests());
    let failed = master.get("/api/v2/reports?state=failed").await;
    assert_eq!(failed["meta"]["total"], 0, "{failed}");
    master.stop().await;
}

/// From GitHub's own deliveries (signed, in the published payload shapes): a push marks its head
/// commit, a pull request its head commit — the commit that was built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_push_and_a_pull_request_mark_the_commits_they_built() {
    let dir = tempfile::tempdir().unwrap();
    let github = FakeForge::github(TOKEN).await;
    const SECRET: &str = "hook-secret";
    let setup = setup(dir.path(), &github)
        .replace(
            "  - {type: force, name: force, builderNames: [ok, bad]}\n",
            "  - {type: force, name: force, builderNames: [ok, bad]}\n  - {type: any_branch, name: all, builderNames: [ok]}\n",
        )
        .replace("services:\n", &format!("change_hooks:\n  github: {{secret: {SECRET}}}\nservices:\n"))
        + &format!(
            "  - {{type: github_comment, name: comments, token_file: \"{}\", base_url: \"{}\"}}\n",
            dir.path().join("gh-token").display(),
            github.base_url
        );
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let text = config_text(&database, dir.path(), &setup);
    let master = TestMaster::start_with(Config::parse("hooked.yaml", &text).unwrap(), dir.path()).await;
    let _worker = master.spawn_worker("w1");
    master.wait_workers(1).await;

    let (head, first, parent) = ("1f".repeat(20), "2e".repeat(20), "3d".repeat(20));
    let delivery = |name: &str| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/github").join(name);
        std::fs::read_to_string(path)
            .unwrap()
            .replace("{{REPO}}", "https://github.com/kiln-ci/app")
            .replace("{{HEAD}}", &head)
            .replace("{{FIRST}}", &first)
            .replace("{{PARENT}}", &parent)
    };
    for (event, body, id) in
        [("push", delivery("push.json"), "d-1"), ("pull_request", delivery("pull_request.json"), "d-2")]
    {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(body.as_bytes());
        let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        let response = master
            .client
            .post(master.url("/change_hook/github"))
            .header("Content-Type", "application/json")
            .header("X-GitHub-Event", event)
            .header("X-GitHub-Delivery", id)
            .header("X-Hub-Signature-256", signature)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200, "{event}");
    }
    eventually("the head commit's final statuses", MINUTE, || async {
        let states = github.states(&head, "buildbot/ok");
        (states.iter().filter(|s| *s == "success").count() == 2).then_some(())
    })
    .await;
    let on_head: Vec<_> = github.accepted().into_iter().filter(|s| s.sha == head).collect();
    assert!(on_head.iter().all(|s| s.owner == "kiln-ci" && s.repo == "app"), "{on_head:?}");
    // The push's build and the pull request's, each pending before its success.
    assert_eq!(github.states(&head, "buildbot/ok"), ["pending", "success", "pending", "success"]);
    // Only the pull request's build is commented on, on its pull request.
    let comments = eventually("the pull request's comment", MINUTE, || async {
        let comments = github.comments();
        (!comments.is_empty()).then_some(comments)
    })
    .await;
    kiln_tests::real_sleep(Duration::from_secs(1)).await;
    assert_eq!(github.comments().len(), 1, "{comments:?}");
    let (repo, number, body) = &comments[0];
    // The pull request as the delivery names it (its `html_url`).
    assert_eq!((repo.as_str(), *number), ("octo-org/hello", 7));
    // "Build ok #N: **success** (…/#/builders/1/builds/N)", N the pull request's build.
    let number = body.strip_prefix("Build ok #").and_then(|rest| rest.split(':').next()).unwrap_or_default();
    assert!(!number.is_empty() && body.contains(": **success** (http"), "{body}");
    assert!(body.ends_with(&format!("/#/builders/1/builds/{number})")), "{body}");
    master.stop().await;
}
