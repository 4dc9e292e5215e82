//! The local pool follows the queue: it grows at once to what a burst needs (never beyond max),
//! shrinks after the delay without interrupting a build, and replaces a worker that dies.

use std::collections::HashSet;
use std::time::Duration;

use kiln_master::config::Config;
use kiln_tests::system::{TOKEN, TestMaster};
use kiln_tests::{binary, eventually};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

/// A master with a local pool whose workers are named `<prefix>-N` (tests run in parallel, and
/// one of them looks its worker up by name).
fn config(dir: &std::path::Path, prefix: &str, min: u32, max: u32, delay: f64, builders: &str) -> Config {
    let text = format!(
        "collapseRequests: false\ndatabase: \"sqlite://{db}\"\ndata_dir: \"{data}\"\nhttp:\n  listen: 127.0.0.1:0\n  auth: open\nworkers:\n  listen: 127.0.0.1:0\n  heartbeat_interval: 0.5\n  tokens: [{{name: t, value: {TOKEN}}}]\npools:\n  - {{name: {prefix}, backend: local, min: {min}, max: {max}, scale_down_delay: {delay}, local: {{binary: \"{bin}\"}}}}\n{builders}",
        db = dir.join("kiln.sqlite").display(),
        data = dir.display(),
        bin = binary("kiln-worker").display(),
    );
    Config::parse("pool.yaml", &text).unwrap()
}

async fn force(master: &TestMaster, builder: &str) -> i64 {
    master.force_request("force", json!({ "builderNames": [builder] })).await
}

/// The pid of the `kiln-worker` process named `name`.
fn worker_pid(name: &str) -> Option<i32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let named = args.windows(2).any(|w| w[0] == b"--name" && w[1] == name.as_bytes());
        if named && args.first().is_some_and(|a| a.ends_with(b"kiln-worker")) {
            return Some(pid);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_grows_the_pool_to_max_and_it_shrinks_back_without_interrupting_builds() {
    let dir = tempfile::tempdir().unwrap();
    let builders = "builders:\n  - name: b\n    steps:\n      - shell: {name: job, command: \"echo start; sleep 2; echo done\"}\nschedulers:\n  - {type: force, name: force, builderNames: [b]}\n";
    let master = TestMaster::start_with(config(dir.path(), "burst", 1, 6, 2.0, builders), dir.path()).await;
    master.wait_workers(1).await;
    let mut brids = Vec::new();
    for _ in 0..60 {
        brids.push(force(&master, "b").await);
    }
    // The pool grows to its maximum and never beyond, however many builds wait.
    let most = std::sync::atomic::AtomicUsize::new(0);
    eventually("all 60 builds to finish", Duration::from_secs(180), || async {
        most.fetch_max(master.master.workers.list().len(), std::sync::atomic::Ordering::SeqCst);
        let pending = master.get("/api/v2/buildrequests?complete=false&limit=1").await;
        (pending["meta"]["total"] == 0).then_some(())
    })
    .await;
    assert_eq!(most.into_inner(), 6, "the pool reached max and stayed within it");
    let builds = master.get("/api/v2/builds").await;
    let builds = builds["builds"].as_array().unwrap();
    assert_eq!(builds.len(), 60, "every build ran exactly once");
    let requests: HashSet<i64> = builds.iter().map(|b| b["buildrequestid"].as_i64().unwrap()).collect();
    assert_eq!(requests, brids.iter().copied().collect::<HashSet<_>>());
    for build in builds {
        assert_eq!(build["results"], 0, "{build}");
        let log = master.get(&format!("/api/v2/builds/{}/steps/job/logs/stdio/contents", build["buildid"])).await;
        assert!(
            log["logchunks"][0]["content"].as_str().unwrap().contains("odone\n"),
            "build {} was cut short",
            build["buildid"]
        );
    }
    // After the delay the pool returns to its minimum.
    eventually("the pool back at min", MINUTE, || async { (master.master.workers.list().len() == 1).then_some(()) })
        .await;
    // Grown again, it takes the names its retired workers left, so the worker list stays as
    // long as the pool is wide.
    for _ in 0..12 {
        force(&master, "b").await;
    }
    eventually("the second burst to grow the pool", MINUTE, || async {
        (master.master.workers.list().len() > 2).then_some(())
    })
    .await;
    eventually("the second burst to finish", Duration::from_secs(120), || async {
        let pending = master.get("/api/v2/buildrequests?complete=false&limit=1").await;
        (pending["meta"]["total"] == 0).then_some(())
    })
    .await;
    let workers = master.get("/api/v2/workers").await;
    let names: Vec<&str> = workers["workers"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
    let allowed: Vec<String> = (1..=6).map(|i| format!("burst-{i}")).collect();
    assert!(names.iter().all(|n| allowed.iter().any(|a| a == n)), "names beyond the pool's width: {names:?}");
    let ids: Vec<i64> =
        workers["workers"].as_array().unwrap().iter().map(|w| w["workerid"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "the list is in id order, as in Buildbot: {ids:?}");
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_the_pool_shrinks_has_its_build_retried() {
    let dir = tempfile::tempdir().unwrap();
    let builders = "builders:\n  - name: quick\n    steps:\n      - shell: {name: job, command: \"echo quick\"}\n  - name: slow\n    steps:\n      - shell: {name: job, command: \"echo started; sleep 4; echo done\"}\nschedulers:\n  - {type: force, name: force, builderNames: [quick, slow]}\n";
    let master = TestMaster::start_with(config(dir.path(), "shrinking", 1, 3, 0.5, builders), dir.path()).await;
    master.wait_workers(1).await;
    let slow = force(&master, "slow").await;
    force(&master, "quick").await;
    force(&master, "quick").await;
    let worker = eventually("the slow build to start", MINUTE, || async {
        let builds = master.get(&format!("/api/v2/buildrequests/{slow}/builds")).await;
        let build = builds["builds"].as_array()?.first()?.clone();
        let log = master.get_text(&format!("/api/v2/builds/{}/steps/job/logs/stdio/contents", build["buildid"])).await;
        if !log.1.contains("ostarted") {
            return None;
        }
        let worker = master.get(&format!("/api/v2/workers/{}", build["workerid"])).await;
        worker["workers"][0]["name"].as_str().map(str::to_owned)
    })
    .await;
    // The quick builds are done and the pool is shrinking towards the one busy worker.
    eventually("the pool to shrink", MINUTE, || async { (master.master.workers.list().len() <= 2).then_some(()) })
        .await;
    let pid = worker_pid(&worker).expect("the busy worker's process");
    // SAFETY: SIGKILL to a worker process this test's master started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let build = master.wait_build_of_request(slow, MINUTE).await;
    assert_eq!(build["results"], 0, "{build}");
    let builds = master.get(&format!("/api/v2/buildrequests/{slow}/builds")).await;
    let results: Vec<i64> =
        builds["builds"].as_array().unwrap().iter().map(|b| b["results"].as_i64().unwrap()).collect();
    assert_eq!(results, vec![5, 0], "RETRY, then SUCCESS on a replacement");
    eventually("the pool back at min", MINUTE, || async { (master.master.workers.list().len() == 1).then_some(()) })
        .await;
    master.stop().await;
}

/// `/api/v2/pools` says what is so: pending is the queue as it is when asked, and a build that
/// starts on any pool's worker wakes that pool's scaler too, not just one scaler of several.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pools_status_follows_its_queue_and_its_busy_workers() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let body = "collapseRequests: false\npools:\n  - {name: first, backend: static, min: 0, max: 2, builders: [a]}\n  - {name: second, backend: static, min: 0, max: 2, builders: [b]}\nbuilders:\n  - {name: a, steps: [{shell: {command: \"sleep 3\"}}]}\n  - {name: b, steps: [{shell: {command: \"sleep 3\"}}]}\nschedulers:\n  - {type: force, name: force, builderNames: [a, b]}\n";
    let config = Config::parse("pools.yaml", &kiln_tests::system::config_text(&db, dir.path(), body)).unwrap();
    let master = TestMaster::start_with(config, dir.path()).await;
    let pool = |status: &serde_json::Value, name: &str| {
        status["pools"].as_array().unwrap().iter().find(|p| p["name"] == name).cloned().unwrap()
    };
    let brid = force(&master, "b").await;
    // No worker yet: the request waits, and the status says so the moment it is asked.
    let status = master.get("/api/v2/pools").await;
    assert_eq!(
        (pool(&status, "second")["pending"].as_i64(), pool(&status, "first")["pending"].as_i64()),
        (Some(1), Some(0))
    );
    let _worker = master.spawn_pool_worker("second-1", "second");
    // Well inside the scalers' 30 s sweep, which a missed wake-up would wait for.
    eventually("the second pool to show its busy worker", Duration::from_secs(10), || async {
        let second = pool(&master.get("/api/v2/pools").await, "second");
        (second["busy"] == 1 && second["pending"] == 0).then_some(())
    })
    .await;
    assert_eq!(master.wait_build_of_request(brid, MINUTE).await["results"], 0);
    master.stop().await;
}
