//! The git poller against a real repository: first poll learns the tips, new commits become
//! changes oldest first, forced polls through the hook, and exactly-once reporting when two
//! masters poll the same repository.

use std::time::Duration;

use kiln_tests::repo::TestRepo;
use kiln_tests::system::TestMaster;
use kiln_tests::{eventually, pg};
use serde_json::Value;

const MINUTE: Duration = Duration::from_secs(60);

fn setup(repo: &std::path::Path, interval: f64, branches: &str) -> String {
    format!(
        r#"
change_sources:
  - type: git_poller
    name: upstream
    repourl: "{}"
    branches: {branches}
    pollInterval: {interval}
    project: demo
builders:
  - name: b
    steps:
      - git: {{mode: full}}
schedulers:
  - {{type: any_branch, name: all, builderNames: [b]}}
"#,
        repo.display()
    )
}

async fn changes(master: &TestMaster) -> Vec<Value> {
    master.get("/api/v2/changes").await["changes"].as_array().unwrap().clone()
}

async fn wait_changes(master: &TestMaster, count: usize) -> Vec<Value> {
    eventually(&format!("{count} changes"), MINUTE, || async {
        let all = changes(master).await;
        (all.len() >= count).then_some(all)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_commits_become_changes_oldest_first_and_are_built() {
    let dir = tempfile::tempdir().unwrap();
    let repo = TestRepo::init(&dir.path().join("upstream"));
    repo.commit("history that is not rebuilt", &[("a.txt", "0")]);
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let master = TestMaster::start(&database, dir.path(), &setup(&repo.path, 0.2, "[main]")).await;
    let _worker = master.spawn_worker("w1");
    // The first poll only learns the tips; it reports nothing.
    eventually("the first poll", MINUTE, || async {
        let (status, _) = master.get_text("/api/v2/changes").await;
        let started = master.master.store.poller_tips("upstream").await.unwrap().0;
        (status == 200 && started).then_some(())
    })
    .await;
    assert!(changes(&master).await.is_empty());

    let first = repo.commit("first", &[("b.txt", "1")]);
    let second = repo.commit("second", &[("a.txt", "2"), ("c/d.txt", "2")]);
    let found = wait_changes(&master, 2).await;
    assert_eq!(found.len(), 2);
    assert_eq!(found[0]["revision"], first.as_str());
    assert_eq!(found[1]["revision"], second.as_str());
    assert_eq!(found[0]["files"], serde_json::json!(["b.txt"]));
    assert_eq!(found[1]["files"], serde_json::json!(["a.txt", "c/d.txt"]));
    assert_eq!(found[0]["author"], "Ada Lovelace <ada@example.org>");
    assert_eq!((found[0]["branch"].as_str(), found[0]["project"].as_str()), (Some("main"), Some("demo")));
    // The newest commit is built (an older request may have collapsed into it, or been built
    // too if it was polled and claimed first).
    eventually("a successful build of the newest commit", MINUTE, || async {
        let builds = master.get("/api/v2/builds?results=0&property=got_revision").await;
        let built = builds["builds"].as_array()?.iter().any(|b| b["properties"]["got_revision"][0] == second.as_str());
        built.then_some(())
    })
    .await;
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_poller_hook_polls_at_once_and_all_branches_are_followed() {
    let dir = tempfile::tempdir().unwrap();
    let repo = TestRepo::init(&dir.path().join("upstream"));
    let base = repo.commit("base", &[("a.txt", "0")]);
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let master = TestMaster::start(&database, dir.path(), &setup(&repo.path, 3600.0, "all")).await;
    let poll = || async {
        let response = master.client.post(master.url("/change_hook/poller?poller=upstream")).send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    };
    // The scheduled first poll may or may not have run yet; either way the tips are learned.
    let (status, body) = poll().await;
    assert_eq!(status, 200, "{body}");
    // The scheduled first poll may run just before or after each forced one; whichever reports a
    // commit, once a forced poll has answered the commit is stored, exactly once.
    let revisions =
        |all: Vec<Value>| all.iter().map(|c| c["revision"].as_str().unwrap().to_owned()).collect::<Vec<_>>();
    let on_main = repo.commit("on main", &[("a.txt", "1")]);
    assert_eq!(poll().await.0, 200);
    assert_eq!(revisions(changes(&master).await), vec![on_main.clone()], "stored when the hook answers");
    let git = git2::Repository::open(&repo.path).unwrap();
    let base_commit = git.find_commit(git2::Oid::from_str(&base).unwrap()).unwrap();
    git.branch("dev", &base_commit, false).unwrap();
    git.set_head("refs/heads/dev").unwrap();
    git.checkout_head(Some(git2::build::CheckoutBuilder::new().force())).unwrap();
    let on_dev = repo.commit("on dev", &[("dev.txt", "1")]);
    assert_eq!(poll().await, (200, "1 change found".to_owned()), "a new branch reports only its own commits");
    assert_eq!(poll().await, (200, "0 change found".to_owned()));
    let found = changes(&master).await;
    let seen: Vec<(&str, &str)> =
        found.iter().map(|c| (c["branch"].as_str().unwrap(), c["revision"].as_str().unwrap())).collect();
    assert_eq!(seen, vec![("main", on_main.as_str()), ("dev", on_dev.as_str())]);
    let response = master.client.post(master.url("/change_hook/poller?poller=nope")).send().await.unwrap();
    assert_eq!(response.status(), 400);
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_masters_polling_one_repository_report_each_commit_once() {
    let dir = tempfile::tempdir().unwrap();
    let repo = TestRepo::init(&dir.path().join("upstream"));
    repo.commit("base", &[("a.txt", "0")]);
    let database = pg::fresh_database().await;
    let body = setup(&repo.path, 0.1, "[main]");
    let a = TestMaster::start(&database, &dir.path().join("a"), &format!("master_name: a\n{body}")).await;
    let b = TestMaster::start(&database, &dir.path().join("b"), &format!("master_name: b\n{body}")).await;
    eventually("the first poll", MINUTE, || async {
        a.master.store.poller_tips("upstream").await.unwrap().0.then_some(())
    })
    .await;
    let mut commits = Vec::new();
    for i in 0..5 {
        commits.push(repo.commit(&format!("c{i}"), &[("a.txt", &i.to_string())]));
        // Forced polls on both masters race the scheduled one.
        let (ra, rb) = tokio::join!(
            a.client.post(a.url("/change_hook/poller")).send(),
            b.client.post(b.url("/change_hook/poller")).send()
        );
        assert_eq!((ra.unwrap().status().as_u16(), rb.unwrap().status().as_u16()), (200, 200));
    }
    let found = wait_changes(&a, 5).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let found_later = changes(&a).await;
    assert_eq!(found_later.len(), 5, "each commit reported once: {found_later:?}");
    let revisions: Vec<&str> = found.iter().map(|c| c["revision"].as_str().unwrap()).collect();
    assert_eq!(revisions, commits.iter().map(String::as_str).collect::<Vec<_>>());
    a.stop().await;
    b.stop().await;
}
