//! Change schedulers end to end: tree-stable timers that gather changes, important files,
//! any-branch timers, and timers that survive a master restart.

use std::time::{Duration, Instant};

use kiln_master::config::Config;
use kiln_tests::eventually;
use kiln_tests::system::{TestMaster, config_text};
use serde_json::Value;

const SETUP: &str = r#"
builders:
  - name: b
    steps:
      - shell: {command: "true"}
schedulers:
  - type: single_branch
    name: stable
    builderNames: [b]
    branch: main
    treeStableTimer: 1.0
    fileIsImportant: ["src/*"]
  - type: any_branch
    name: branches
    builderNames: [b]
    change_filter: {branch_re: "^feature/"}
    treeStableTimer: 0.5
"#;

fn config(dir: &std::path::Path) -> Config {
    let database = format!("sqlite://{}", dir.join("kiln.sqlite").display());
    Config::parse("schedulers.yaml", &config_text(&database, dir, SETUP)).unwrap()
}

async fn push(master: &TestMaster, branch: &str, revision: &str, files: &str) {
    let fields = [("author", "a"), ("branch", branch), ("revision", revision), ("repository", "r"), ("files", files)];
    assert_eq!(master.post_change(&fields).await.0, 200);
}

async fn buildsets(master: &TestMaster) -> Vec<Value> {
    master.get("/api/v2/buildsets").await["buildsets"].as_array().unwrap().clone()
}

async fn wait_buildsets(master: &TestMaster, count: usize) -> Vec<Value> {
    eventually(&format!("{count} buildsets"), Duration::from_secs(30), || async {
        let sets = buildsets(master).await;
        (sets.len() >= count).then_some(sets)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_stable_timer_gathers_changes_into_one_build_of_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let master = TestMaster::start_with(config(dir.path()), dir.path()).await;
    let started = Instant::now();
    push(&master, "main", "r1", r#"["src/a.rs"]"#).await;
    push(&master, "main", "r2", r#"["docs/x.md"]"#).await;
    push(&master, "main", "r3", r#"["src/b.rs"]"#).await;
    assert!(buildsets(&master).await.is_empty(), "nothing is built while the tree is not stable");
    let sets = wait_buildsets(&master, 1).await;
    assert!(started.elapsed() >= Duration::from_millis(1000), "the timer waited a full second");
    assert_eq!(sets.len(), 1);
    assert_eq!(sets[0]["sourcestamps"][0]["revision"], "r3");
    assert!(sets[0]["reason"].as_str().unwrap().contains("'stable'"));

    // An unimportant change alone starts no timer and builds nothing.
    push(&master, "main", "r4", r#"["docs/y.md"]"#).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(buildsets(&master).await.len(), 1, "an unimportant change alone is not built");
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_any_branch_scheduler_keeps_a_timer_per_branch() {
    let dir = tempfile::tempdir().unwrap();
    let master = TestMaster::start_with(config(dir.path()), dir.path()).await;
    push(&master, "feature/a", "a1", "[]").await;
    push(&master, "feature/b", "b1", "[]").await;
    push(&master, "feature/a", "a2", "[]").await;
    push(&master, "release", "x1", "[]").await;
    let sets = wait_buildsets(&master, 2).await;
    let mut built: Vec<(String, String)> = sets
        .iter()
        .map(|s| {
            let ss = &s["sourcestamps"][0];
            (ss["branch"].as_str().unwrap().to_owned(), ss["revision"].as_str().unwrap().to_owned())
        })
        .collect();
    built.sort();
    assert_eq!(built, vec![("feature/a".into(), "a2".into()), ("feature/b".into(), "b1".into())]);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(buildsets(&master).await.len(), 2, "the release branch passes no filter");
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_running_when_the_master_stops_fires_after_it_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let master = TestMaster::start_with(config(dir.path()), dir.path()).await;
    push(&master, "main", "r1", r#"["src/a.rs"]"#).await;
    push(&master, "main", "r2", r#"["src/b.rs"]"#).await;
    assert!(buildsets(&master).await.is_empty(), "the timer is still running when the master stops");
    master.stop().await;

    let master = TestMaster::start_with(config(dir.path()), dir.path()).await;
    let sets = wait_buildsets(&master, 1).await;
    assert_eq!(sets.len(), 1, "both classified changes built once, after the restart");
    assert_eq!(sets[0]["sourcestamps"][0]["revision"], "r2");
    master.stop().await;
}

const TIMED: &str = r#"
collapseRequests: false
builders:
  - name: b
    steps:
      - shell: {command: "true"}
schedulers:
  - {type: periodic, name: every-second, builderNames: [b], periodicBuildTimer: 1, branch: main, repository: r}
  - type: periodic
    name: when-changed
    builderNames: [b]
    periodicBuildTimer: 1
    onlyIfChanged: true
    branch: release
    fileIsImportant: ["src/*"]
  - {type: nightly, name: nightly, builderNames: [b], hour: 3, minute: 0, dayOfWeek: 0}
"#;

fn by_scheduler<'a>(sets: &'a [Value], name: &str) -> Vec<&'a Value> {
    sets.iter().filter(|s| s["reason"].as_str().unwrap_or_default().contains(&format!("'{name}'"))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_schedulers_fire_on_time_and_only_if_changed_waits_for_a_change() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let master = TestMaster::start(&database, dir.path(), TIMED).await;
    let started = Instant::now();
    let sets = wait_buildsets(&master, 2).await;
    assert!(started.elapsed() >= Duration::from_millis(1900), "two periods passed");
    let every = by_scheduler(&sets, "every-second");
    assert_eq!(every[0]["sourcestamps"][0]["branch"], "main");
    assert!(by_scheduler(&sets, "when-changed").is_empty(), "nothing changed, nothing built");
    assert!(by_scheduler(&sets, "nightly").is_empty());

    push(&master, "release", "rel-1", r#"["docs/a.md"]"#).await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(by_scheduler(&buildsets(&master).await, "when-changed").is_empty(), "an unimportant change is not enough");
    push(&master, "release", "rel-2", r#"["src/a.rs"]"#).await;
    let built = eventually("the only-if-changed build", Duration::from_secs(30), || async {
        let sets = buildsets(&master).await;
        let mine: Vec<Value> = by_scheduler(&sets, "when-changed").into_iter().cloned().collect();
        (!mine.is_empty()).then_some(mine)
    })
    .await;
    assert_eq!(built.len(), 1);
    assert_eq!(built[0]["sourcestamps"][0]["revision"], "rel-2");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(by_scheduler(&buildsets(&master).await, "when-changed").len(), 1, "once per change");
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_periodic_scheduler_fires_once_per_period_across_masters() {
    let dir = tempfile::tempdir().unwrap();
    let database = kiln_tests::pg::fresh_database().await;
    let a = TestMaster::start(&database, &dir.path().join("a"), &format!("master_name: a\n{TIMED}")).await;
    let b = TestMaster::start(&database, &dir.path().join("b"), &format!("master_name: b\n{TIMED}")).await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let fired = by_scheduler(&buildsets(&a).await, "every-second").len();
    assert!((2..=4).contains(&fired), "about three periods, fired by one master each time: {fired}");
    a.stop().await;
    b.stop().await;
}
