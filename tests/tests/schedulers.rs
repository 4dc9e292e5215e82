//! Schedulers on a paused clock: tree-stable timers that gather changes, important files,
//! any-branch timers, timers across a master restart, Periodic and Nightly schedulers (also
//! across masters). The masters are real (HTTP hook, database, timer loops); only time is
//! virtual, so each test walks through minutes or weeks of schedule and checks that every build
//! was submitted at exactly the right millisecond — never one earlier.

use std::path::Path;
use std::time::Duration;

use kiln_master::clock::Clock;
use kiln_master::config::Config;
use kiln_tests::system::{TestMaster, config_text};
use kiln_tests::{CLOCK_START_MS as START_MS, eventually, real_sleep, tokio_clock, with_paused_clock};
use serde_json::Value;

const SECOND: i64 = 1000;
const DAY: i64 = 86_400 * SECOND;

/// Each test may take this long in real time.
const LIMIT: Duration = Duration::from_secs(120);

async fn start(database: &str, dir: &Path, setup: &str, clock: Clock) -> TestMaster {
    let config = Config::parse("schedulers.yaml", &config_text(database, dir, setup)).unwrap();
    TestMaster::start_with_clock(config, dir, clock).await
}

fn sqlite(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("kiln.sqlite").display())
}

async fn advance(ms: i64) {
    tokio::time::advance(Duration::from_millis(ms as u64)).await;
}

async fn push(master: &TestMaster, branch: &str, revision: &str, files: &str) {
    let fields = [("author", "a"), ("branch", branch), ("revision", revision), ("repository", "r"), ("files", files)];
    assert_eq!(master.post_change(&fields).await.0, 200);
}

async fn buildsets(master: &TestMaster) -> Vec<Value> {
    master.get("/api/v2/buildsets?order=bsid").await["buildsets"].as_array().unwrap().clone()
}

fn by_scheduler(sets: &[Value], name: &str) -> Vec<Value> {
    sets.iter().filter(|s| s["reason"].as_str().unwrap_or_default().contains(&format!("'{name}'"))).cloned().collect()
}

/// Waits (in real time) until `name` has submitted `count` buildsets, and returns them.
async fn wait_for(master: &TestMaster, name: &str, count: usize) -> Vec<Value> {
    eventually(&format!("{count} buildsets of {name}"), Duration::from_secs(30), || async {
        let mine = by_scheduler(&buildsets(master).await, name);
        (mine.len() >= count).then_some(mine)
    })
    .await
}

/// Gives the master real time to act on the clock, then checks `name` submitted only `count`.
async fn still(master: &TestMaster, name: &str, count: usize, why: &str) {
    real_sleep(Duration::from_millis(300)).await;
    assert_eq!(by_scheduler(&buildsets(master).await, name).len(), count, "{why}");
}

/// When a buildset was submitted, in milliseconds after the start (the API has seconds).
fn submitted(set: &Value) -> i64 {
    set["submitted_at"].as_i64().expect("submitted_at") * SECOND - START_MS
}

fn revision(set: &Value) -> &str {
    set["sourcestamps"][0]["revision"].as_str().unwrap_or_default()
}

const CHANGES: &str = r#"
builders:
  - name: b
    steps:
      - shell: {command: "true"}
schedulers:
  - type: single_branch
    name: stable
    builderNames: [b]
    branch: main
    treeStableTimer: 10
    fileIsImportant: ["src/*"]
  - type: any_branch
    name: branches
    builderNames: [b]
    change_filter: {branch_re: "^feature/"}
    treeStableTimer: 5
"#;

#[test]
fn a_tree_stable_timer_waits_for_quiet_and_builds_the_newest_change() {
    with_paused_clock(LIMIT, || async {
        let dir = tempfile::tempdir().unwrap();
        let master = start(&sqlite(dir.path()), dir.path(), CHANGES, tokio_clock()).await;

        // Three changes at once: one build of the newest, ten seconds later.
        push(&master, "main", "r1", r#"["src/a.rs"]"#).await;
        push(&master, "main", "r2", r#"["docs/x.md"]"#).await;
        push(&master, "main", "r3", r#"["src/b.rs"]"#).await;
        advance(10 * SECOND - 1).await;
        still(&master, "stable", 0, "nothing is built before the tree is stable").await;
        advance(1).await;
        let sets = wait_for(&master, "stable", 1).await;
        assert_eq!((submitted(&sets[0]), revision(&sets[0])), (10 * SECOND, "r3"));
        let changes = master.get("/api/v2/changes?order=changeid").await;
        assert_eq!(
            changes["changes"][0]["when_timestamp"],
            START_MS / SECOND,
            "a change without a time arrived at 0 s"
        );

        // An important change restarts the timer.
        push(&master, "main", "r4", r#"["src/c.rs"]"#).await;
        advance(6 * SECOND).await;
        push(&master, "main", "r5", r#"["src/d.rs"]"#).await;
        advance(10 * SECOND - 1).await;
        still(&master, "stable", 1, "the second important change restarted the timer").await;
        advance(1).await;
        let sets = wait_for(&master, "stable", 2).await;
        assert_eq!((submitted(&sets[1]), revision(&sets[1])), (26 * SECOND, "r5"));

        // An unimportant change pushes a running timer back and is built with it.
        push(&master, "main", "r6", r#"["src/e.rs"]"#).await;
        advance(5 * SECOND).await;
        push(&master, "main", "r7", r#"["docs/y.md"]"#).await;
        advance(10 * SECOND - 1).await;
        still(&master, "stable", 2, "the unimportant change pushed the timer back").await;
        advance(1).await;
        let sets = wait_for(&master, "stable", 3).await;
        assert_eq!((submitted(&sets[2]), revision(&sets[2])), (41 * SECOND, "r7"));

        // An unimportant change alone starts no timer: an hour later nothing more was built.
        push(&master, "main", "r8", r#"["docs/z.md"]"#).await;
        advance(3600 * SECOND).await;
        still(&master, "stable", 3, "an unimportant change alone is not built").await;
        master.stop().await;
    });
}

#[test]
fn an_any_branch_scheduler_keeps_a_timer_per_branch() {
    with_paused_clock(LIMIT, || async {
        let dir = tempfile::tempdir().unwrap();
        let master = start(&sqlite(dir.path()), dir.path(), CHANGES, tokio_clock()).await;
        push(&master, "feature/a", "a1", "[]").await;
        advance(3 * SECOND).await;
        push(&master, "feature/b", "b1", "[]").await;
        push(&master, "feature/a", "a2", "[]").await;
        push(&master, "release", "x1", "[]").await;

        // feature/a restarted its own timer at 3 s; feature/b's started then too.
        advance(5 * SECOND - 1).await;
        still(&master, "branches", 0, "each branch's timer started at 3 s").await;
        advance(1).await;
        let sets = wait_for(&master, "branches", 2).await;
        let mut built: Vec<(String, String, i64)> = sets
            .iter()
            .map(|s| {
                let ss = &s["sourcestamps"][0];
                (ss["branch"].as_str().unwrap().to_owned(), revision(s).to_owned(), submitted(s))
            })
            .collect();
        built.sort();
        assert_eq!(
            built,
            vec![("feature/a".into(), "a2".into(), 8 * SECOND), ("feature/b".into(), "b1".into(), 8 * SECOND)]
        );

        // A later change on one branch runs that branch's timer only.
        push(&master, "feature/b", "b2", "[]").await;
        advance(5 * SECOND).await;
        let sets = wait_for(&master, "branches", 3).await;
        assert_eq!((submitted(&sets[2]), revision(&sets[2])), (13 * SECOND, "b2"));
        still(&master, "branches", 3, "the release branch passes no filter").await;
        master.stop().await;
    });
}

#[test]
fn a_timer_running_when_the_master_stops_fires_on_time_after_it_restarts() {
    with_paused_clock(LIMIT, || async {
        let dir = tempfile::tempdir().unwrap();
        let database = sqlite(dir.path());
        let clock = tokio_clock();
        let master = start(&database, dir.path(), CHANGES, clock).await;
        push(&master, "main", "r1", r#"["src/a.rs"]"#).await;
        advance(4 * SECOND).await;
        push(&master, "main", "r2", r#"["src/b.rs"]"#).await;
        master.stop().await;

        // Down for five seconds; the timer (due at 14 s) is still running when it returns.
        advance(5 * SECOND).await;
        let master = start(&database, dir.path(), CHANGES, clock).await;
        advance(5 * SECOND - 1).await;
        still(&master, "stable", 0, "the restarted master keeps the timer's time").await;
        advance(1).await;
        let sets = wait_for(&master, "stable", 1).await;
        assert_eq!((submitted(&sets[0]), revision(&sets[0])), (14 * SECOND, "r2"));

        // A timer that came due while the master was down fires once, as soon as it is back.
        push(&master, "main", "r3", r#"["src/c.rs"]"#).await;
        master.stop().await;
        advance(60 * SECOND).await;
        let master = start(&database, dir.path(), CHANGES, clock).await;
        let sets = wait_for(&master, "stable", 2).await;
        assert_eq!((submitted(&sets[1]), revision(&sets[1])), (74 * SECOND, "r3"));
        advance(60 * SECOND).await;
        still(&master, "stable", 2, "a late timer fires once").await;
        master.stop().await;
    });
}

const TIMED: &str = r#"
collapseRequests: false
builders:
  - name: b
    steps:
      - shell: {command: "true"}
schedulers:
  - {type: periodic, name: every-ten-minutes, builderNames: [b], periodicBuildTimer: 600, branch: main, repository: r}
  - type: periodic
    name: when-changed
    builderNames: [b]
    periodicBuildTimer: 600
    onlyIfChanged: true
    branch: release
    fileIsImportant: ["src/*"]
  - {type: nightly, name: monday-three, builderNames: [b], hour: 3, minute: 0, dayOfWeek: 0, timezone: UTC}
  - {type: nightly, name: berlin-three, builderNames: [b], hour: 3, minute: 0, dayOfWeek: 0, timezone: Europe/Berlin}
"#;

#[test]
fn periodic_schedulers_fire_at_start_then_every_period_and_only_if_changed_waits_for_a_change() {
    with_paused_clock(LIMIT, || async {
        let dir = tempfile::tempdir().unwrap();
        let master = start(&sqlite(dir.path()), dir.path(), TIMED, tokio_clock()).await;
        // As in Buildbot, a Periodic scheduler that never fired fires at once.
        let every = wait_for(&master, "every-ten-minutes", 1).await;
        assert_eq!(submitted(&every[0]), 0);
        assert_eq!(every[0]["sourcestamps"][0]["branch"], "main");
        push(&master, "release", "rel-1", r#"["docs/a.md"]"#).await;

        advance(600 * SECOND - 1).await;
        still(&master, "every-ten-minutes", 1, "not a millisecond before the period").await;
        advance(1).await;
        let every = wait_for(&master, "every-ten-minutes", 2).await;
        assert_eq!(submitted(&every[1]), 600 * SECOND);
        still(&master, "when-changed", 0, "nothing, then an unimportant change: no build").await;

        push(&master, "release", "rel-2", r#"["src/a.rs"]"#).await;
        advance(600 * SECOND).await;
        let changed = wait_for(&master, "when-changed", 1).await;
        assert_eq!((submitted(&changed[0]), revision(&changed[0])), (1200 * SECOND, "rel-2"));
        assert_eq!(submitted(&wait_for(&master, "every-ten-minutes", 3).await[2]), 1200 * SECOND);

        advance(600 * SECOND).await;
        wait_for(&master, "every-ten-minutes", 4).await;
        still(&master, "when-changed", 1, "one build per important change").await;
        master.stop().await;
    });
}

#[test]
fn a_restart_keeps_a_periodic_schedule_and_a_new_period_counts_from_the_change() {
    with_paused_clock(LIMIT, || async {
        let dir = tempfile::tempdir().unwrap();
        let database = sqlite(dir.path());
        let clock = tokio_clock();
        let master = start(&database, dir.path(), TIMED, clock).await;
        wait_for(&master, "every-ten-minutes", 1).await;
        master.stop().await;

        advance(120 * SECOND).await;
        let master = start(&database, dir.path(), TIMED, clock).await;
        still(&master, "every-ten-minutes", 1, "a restart does not fire a Periodic scheduler again").await;
        master.stop().await;

        advance(60 * SECOND).await;
        let five_minutes =
            TIMED.replace("periodicBuildTimer: 600, branch: main", "periodicBuildTimer: 300, branch: main");
        let master = start(&database, dir.path(), &five_minutes, clock).await;
        still(&master, "every-ten-minutes", 1, "a changed period does not fire at once").await;
        advance(300 * SECOND - 1).await;
        still(&master, "every-ten-minutes", 1, "the new period counts from the change").await;
        advance(1).await;
        let sets = wait_for(&master, "every-ten-minutes", 2).await;
        assert_eq!(submitted(&sets[1]), 480 * SECOND);
        master.stop().await;
    });
}

#[test]
fn a_nightly_scheduler_fires_on_its_day_and_minute_and_once_after_an_outage() {
    with_paused_clock(LIMIT, || async {
        let dir = tempfile::tempdir().unwrap();
        let database = sqlite(dir.path());
        let clock = tokio_clock();
        let master = start(&database, dir.path(), TIMED, clock).await;
        // Sunday 02:59 UTC → Monday (dayOfWeek 0) 03:00 UTC is a day and a minute away; 03:00 in
        // Berlin (CET in November) comes an hour sooner.
        let monday_three = DAY + 60 * SECOND;
        let berlin_three = monday_three - 3600 * SECOND;
        advance(berlin_three - 1).await;
        still(&master, "berlin-three", 0, "not before 03:00 in Berlin").await;
        advance(1).await;
        assert_eq!(submitted(&wait_for(&master, "berlin-three", 1).await[0]), berlin_three);
        advance(monday_three - berlin_three - 1).await;
        still(&master, "monday-three", 0, "not on Sunday, not before 03:00").await;
        advance(1).await;
        let sets = wait_for(&master, "monday-three", 1).await;
        assert_eq!(submitted(&sets[0]), monday_three);

        advance(7 * DAY).await;
        let sets = wait_for(&master, "monday-three", 2).await;
        assert_eq!(submitted(&sets[1]), monday_three + 7 * DAY);

        // Down for two weeks: the missed Mondays give one build when the master returns.
        master.stop().await;
        advance(14 * DAY + 3600 * SECOND).await;
        let master = start(&database, dir.path(), TIMED, clock).await;
        let sets = wait_for(&master, "monday-three", 3).await;
        assert_eq!(submitted(&sets[2]), monday_three + 21 * DAY + 3600 * SECOND);
        still(&master, "monday-three", 3, "missed times fire once").await;
        advance(7 * DAY - 3600 * SECOND).await;
        let sets = wait_for(&master, "monday-three", 4).await;
        assert_eq!(submitted(&sets[3]), monday_three + 28 * DAY, "then on schedule again");
        master.stop().await;
    });
}

#[test]
fn a_periodic_scheduler_fires_once_per_period_across_masters() {
    with_paused_clock(LIMIT, || async {
        let dir = tempfile::tempdir().unwrap();
        let database = kiln_tests::pg::fresh_database().await;
        let clock = tokio_clock();
        let a = start(&database, &dir.path().join("a"), &format!("master_name: a\n{TIMED}"), clock).await;
        let b = start(&database, &dir.path().join("b"), &format!("master_name: b\n{TIMED}"), clock).await;
        wait_for(&a, "every-ten-minutes", 1).await;
        for period in 1..=3 {
            advance(600 * SECOND).await;
            let sets = wait_for(&a, "every-ten-minutes", period + 1).await;
            assert_eq!(submitted(&sets[period]), period as i64 * 600 * SECOND);
        }
        still(&b, "every-ten-minutes", 4, "both masters run the scheduler; each time fires once").await;
        a.stop().await;
        b.stop().await;
    });
}
