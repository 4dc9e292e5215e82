//! Buildbot's own web UI (`buildbot-www` 4.3 and its waterfall, console and grid views, installed
//! from PyPI) in headless Chromium against a real master and worker: every page renders without
//! a console error, a build forced from the UI's dialog runs live to SUCCESS without a reload,
//! its log grows on screen, and the workers page lists the connected worker.

use std::time::Duration;

use kiln_tests::browser::{Browser, buildbot_www};
use kiln_tests::system::{TestMaster, config_text};

const MINUTE: Duration = Duration::from_secs(60);

/// One builder whose step prints a line, waits (bounded) until the test creates `release` in
/// `dir`, then prints another: the test sees the build running for as long as it needs.
fn setup(dir: &std::path::Path, extra_builders: &str, extra_schedulers: &str) -> String {
    let release = dir.join("release");
    format!(
        r#"
collapseRequests: false
builders:
  - name: echo
    steps:
      - shell:
          name: talk
          command: "echo first-line; for i in $(seq 600); do [ -e {release} ] && break; sleep 0.1; done; echo second-line"
{extra_builders}schedulers:
  - {{type: force, name: force, builderNames: [echo]}}
{extra_schedulers}"#,
        release = release.display()
    )
}

async fn master_with_ui(dir: &std::path::Path, setup: &str) -> TestMaster {
    master_with_ui_and_auth(dir, setup, "  auth: open\n").await
}

/// [`master_with_ui`] with `auth` (YAML lines) for the `http.auth` of the test configuration.
async fn master_with_ui_and_auth(dir: &std::path::Path, setup: &str, auth: &str) -> TestMaster {
    let database = format!("sqlite://{}", dir.join("kiln.sqlite").display());
    let text = config_text(&database, dir, setup)
        .replace("http:\n", &format!("http:\n  www: \"{}\"\n", buildbot_www().display()))
        .replace("  auth: open\n", auth);
    TestMaster::start_with(kiln_master::config::Config::parse("ui.yaml", &text).unwrap(), dir).await
}

/// Where screenshots are kept for a person to look at after the run.
fn screenshot_path(name: &str) -> std::path::PathBuf {
    let dir = kiln_tests::bin_dir().join("ui-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}.png"))
}

fn page_text() -> &'static str {
    "document.body ? document.body.innerText : ''"
}

/// Forced from the builder page's own dialog, the build appears, its log shows its first line
/// while the step still runs, and it turns SUCCESS — all on one page load; the build page's Stop
/// ends a second build CANCELLED, and Rebuild runs a third.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_forced_from_the_dialog_runs_live_to_success() {
    let dir = tempfile::tempdir().unwrap();
    let master = master_with_ui(dir.path(), &setup(dir.path(), "", "")).await;
    let _worker = master.spawn_worker("w1");
    master.wait_workers(1).await;
    let mut browser = Browser::launch().await;
    browser.navigate(&master.url("/#/builders/1")).await;
    browser.wait_for("the builder page", &format!("({}).includes('Builds:')", page_text()), MINUTE).await;
    // Marks this page load: a reload would lose it.
    browser.eval("window.kilnPageLoad = 'one'").await;
    browser.click("button", "force").await;
    browser.click(".modal button", "Start build").await;
    browser.wait_for("the build's page", "location.hash.endsWith('/builds/1')", MINUTE).await;
    // The output lines as the log view shows them, each a line of its own: the step's summary
    // and the log's header both quote the command, which names both.
    let text = browser
        .wait_for(
            "the first log line while the step runs",
            &format!(
                "(t => {{ const lines = t.split('\\n').map(l => l.trim()); \
                 return lines.includes('first-line') && t.includes('(running)') && !lines.includes('second-line') ? t : ''; }})({})",
                page_text()
            ),
            MINUTE,
        )
        .await;
    assert!(text.as_str().unwrap().contains("building"), "{text}");
    std::fs::write(dir.path().join("release"), "").unwrap();
    browser.wait_for("SUCCESS on screen", &format!("(t => t.includes('SUCCESS'))({})", page_text()), MINUTE).await;
    assert_eq!(browser.eval("window.kilnPageLoad").await, "one", "the page was reloaded");
    browser.screenshot(&screenshot_path("build-success")).await;
    let build = master.get("/api/v2/builds/1").await;
    assert_eq!(build["builds"][0]["results"], 0, "{build}");

    // Stop, from the build page of a running build.
    std::fs::remove_file(dir.path().join("release")).unwrap();
    let brid = master.force_request("force", serde_json::json!({"builderid": 1})).await;
    kiln_tests::eventually("the second build to start", MINUTE, || async {
        let builds = master.get(&format!("/api/v2/buildrequests/{brid}/builds")).await;
        builds["builds"][0]["number"].as_i64()
    })
    .await;
    browser.navigate(&master.url("/#/builders/1/builds/2")).await;
    let first_line = format!("({}).split('\\n').map(l => l.trim()).includes('first-line')", page_text());
    browser.wait_for("the first log line", &first_line, MINUTE).await;
    browser.click("button", "Stop").await;
    browser.wait_for("CANCELLED on screen", &format!("({}).includes('CANCELLED')", page_text()), MINUTE).await;
    assert_eq!(master.get("/api/v2/builds/2").await["builds"][0]["results"], 6);

    std::fs::write(dir.path().join("release"), "").unwrap();
    browser.click("button", "Rebuild").await;
    browser.wait_for("the rebuild's page", "location.hash.endsWith('/builds/3')", MINUTE).await;
    let success = format!("({}).includes('SUCCESS')", page_text());
    if let Err(failure) = browser.try_wait_for("the rebuild's SUCCESS", &success, MINUTE).await {
        // Tell a build that did not finish from a screen that did not follow it.
        let build = master.get("/api/v2/builds/3").await;
        let steps = master.get("/api/v2/builds/3/steps").await;
        let worker_log = std::fs::read_to_string(dir.path().join("w1.log")).unwrap_or_default();
        let traffic = browser.traffic_with("builds/3");
        let rest = browser.traffic_tail(80);
        panic!(
            "{failure}\nthe API's build: {build}\nits steps: {steps}\nthe worker's log:\n{worker_log}\n\
             what the page was told of build 3:\n{traffic}\nits last requests and frames:\n{rest}"
        );
    }
    let errors = browser.take_errors();
    assert!(errors.is_empty(), "console errors: {errors:?}");
    master.stop().await;
}

/// Every page of the UI and its three views, with a finished build, a change from a hook and a
/// request waiting for a builder without workers: each shows what it is about and none logs a
/// console error or an uncaught exception; the waiting request is then cancelled from its page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_renders_without_a_console_error() {
    let dir = tempfile::tempdir().unwrap();
    let waiting = "  - {name: waiting, workernames: [nobody], steps: [{shell: {command: \"true\"}}]}\n";
    let later = "  - {type: force, name: later, builderNames: [waiting]}\n  - {type: single_branch, name: main, branch: main, builderNames: [echo]}\n";
    let master = master_with_ui(dir.path(), &setup(dir.path(), waiting, later)).await;
    let _worker = master.spawn_worker("w1");
    master.wait_workers(1).await;
    let (status, body) = master
        .post_change(&[
            ("repository", "https://example.com/r.git"),
            ("revision", "0123abcd"),
            ("author", "Ada <ada@example.com>"),
            ("comments", "a change from the hook"),
            ("branch", "main"),
        ])
        .await;
    assert_eq!(status, 200, "{body}");
    // The build outlasts a second: the waterfall cannot scale a time axis whose builds all began
    // and ended within the same second (it draws at NaN, with Buildbot's master as with Kiln's).
    kiln_tests::eventually("the change's build to start", MINUTE, || async {
        master.get("/api/v2/builds").await["meta"]["total"].as_i64().filter(|n| *n > 0)
    })
    .await;
    kiln_tests::real_sleep(Duration::from_millis(1500)).await;
    std::fs::write(dir.path().join("release"), "").unwrap();
    kiln_tests::eventually("the change's build to finish", MINUTE, || async {
        let done = master.get("/api/v2/builds?complete=true").await["meta"]["total"].as_i64();
        done.filter(|n| *n > 0)
    })
    .await;
    let waiting = master.force_request("later", serde_json::json!({"builderid": 2})).await;

    let mut browser = Browser::launch().await;
    let pages = [
        ("#/", "recent builds"),
        ("#/builders", "echo"),
        ("#/builders/1", "Builds:"),
        ("#/builders/1/builds/1", "Build steps"),
        ("#/pendingbuildrequests", "waiting"),
        ("#/changes", "a change from the hook"),
        ("#/workers", "w1"),
        ("#/workers/1", "w1"),
        ("#/schedulers", "force"),
        ("#/masters", "echo"),
        ("#/projects", "Projects"),
        ("#/about", "Kiln version"),
        ("#/waterfall", "echo"),
        ("#/console", "a change from the hook"),
        ("#/grid", "a change from the hook"),
    ];
    let mut problems = Vec::new();
    for (page, shows) in pages {
        browser.navigate(&master.url(&format!("/{page}"))).await;
        browser
            .wait_for(
                &format!("{page} showing {shows:?}"),
                &format!("({}).includes({})", page_text(), serde_json::json!(shows)),
                MINUTE,
            )
            .await;
        // Let late requests and subscriptions settle before counting errors.
        kiln_tests::real_sleep(Duration::from_millis(1500)).await;
        for error in browser.take_errors() {
            problems.push(format!("{page}: {} ({})", error.text, error.url));
        }
        let name = page.trim_start_matches("#/").replace('/', "-");
        browser.screenshot(&screenshot_path(if name.is_empty() { "home" } else { &name })).await;
    }

    // The waiting request, cancelled from its own page (the UI has no set-priority action).
    browser.navigate(&master.url(&format!("/#/buildrequests/{waiting}"))).await;
    browser.wait_for("the request's page", &format!("({}).includes('waiting')", page_text()), MINUTE).await;
    browser.click("button, a", "Cancel").await;
    kiln_tests::eventually("the request cancelled", MINUTE, || async {
        let request = &master.get(&format!("/api/v2/buildrequests/{waiting}")).await["buildrequests"][0];
        (request["complete"] == true).then(|| request["results"].clone())
    })
    .await
    .as_i64()
    .filter(|r| *r == 6)
    .expect("CANCELLED");
    for error in browser.take_errors() {
        problems.push(format!("#/buildrequests/{waiting}: {} ({})", error.text, error.url));
    }
    assert!(problems.is_empty(), "console errors:\n{}", problems.join("\n"));
    master.stop().await;
}

/// With users in `http.auth`, the UI shows "Anonymous" and its force is refused; after the UI's
/// own login link (`/auth/login`, answered with the user's password) it names the user and the
/// same dialog forces a build that runs to SUCCESS; logging out makes the page anonymous again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_logs_in_from_the_ui_and_then_forces_a_build() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("release"), "").unwrap();
    let users = "  auth:\n    users: [{username: ada, password: lovelace}]\n";
    let master = master_with_ui_and_auth(dir.path(), &setup(dir.path(), "", ""), users).await;
    let _worker = master.spawn_worker("w1");
    master.wait_workers(1).await;
    let mut browser = Browser::launch().await;
    browser.navigate(&master.url("/#/builders/1")).await;
    let anonymous = format!("(t => t.includes('Builds:') && t.includes('Anonymous'))({})", page_text());
    browser.wait_for("the builder page, anonymous", &anonymous, MINUTE).await;
    browser.click("button", "force").await;
    browser.click(".modal button", "Start build").await;
    browser.wait_for("the refusal", &format!("({}).includes('valid credentials')", page_text()), MINUTE).await;
    assert_eq!(master.get("/api/v2/buildrequests").await["meta"]["total"], 0);
    browser.take_errors();

    // The login link of the UI, with the password the browser would be asked for.
    let login = master.url("/auth/login?redirect=/%23/builders/1").replacen("http://", "http://ada:lovelace@", 1);
    browser.navigate(&login).await;
    let named = "(t => t.includes('Builds:') && t.includes('ada') && !t.includes('Anonymous'))";
    browser.wait_for("the builder page, logged in", &format!("{named}({})", page_text()), MINUTE).await;
    browser.click("button", "force").await;
    browser.click(".modal button", "Start build").await;
    browser.wait_for("the build's page", "location.hash.endsWith('/builds/1')", MINUTE).await;
    browser.wait_for("SUCCESS on screen", &format!("({}).includes('SUCCESS')", page_text()), MINUTE).await;
    let errors = browser.take_errors();
    assert!(errors.is_empty(), "console errors: {errors:?}");
    let properties = master.get("/api/v2/builds/1/properties").await;
    assert_eq!(properties["properties"][0]["owner"][0], "ada", "the session's user owns the build: {properties}");

    browser.navigate(&master.url("/auth/logout?redirect=/%23/builders")).await;
    browser.wait_for("anonymous again", &format!("({}).includes('Anonymous')", page_text()), MINUTE).await;
    master.stop().await;
}
