//! The fault suite: real `kiln-master` and `kiln-worker` processes on loopback, broken on
//! purpose — SIGKILL, SIGSTOP, SIGTERM, a database stopped mid-build, a write lock held across a
//! dispatch — and counted with a ledger the builds' own step writes (see `kiln_tests::ledger`).
//! Every scenario ends with: every submitted job ran to its end exactly once, none ran twice at
//! the same time, none was lost. Run with `--nocapture` to see the table.
//!
//! The scenarios run one at a time (one stops the shared PostgreSQL cluster, and all of them
//! count processes), each bounded in time.

use std::time::{Duration, Instant};

use kiln_tests::ledger::Ledger;
use kiln_tests::process::MasterNode;
use kiln_tests::system::{TOKEN, TestWorker, spawn_worker, spawn_worker_env};
use kiln_tests::{eventually, pg, real_sleep};
use serde_json::{Value, json};

/// Seconds of a lease; heartbeats are 0.5 s, so a lost worker's commands are dead 4 s after its
/// session ends.
const LEASE: u64 = 10;
const MINUTE: Duration = Duration::from_secs(60);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

fn sqlite(dir: &std::path::Path) -> String {
    format!("sqlite://{}", dir.join("kiln.sqlite").display())
}

fn jobs(count: usize) -> Vec<String> {
    (1..=count).map(|i| format!("job{i}")).collect()
}

/// Forces a run of `job`; retries while the master is unreachable or answers 503.
async fn submit(client: &reqwest::Client, base: &str, job: &str) {
    let body =
        json!({ "jsonrpc": "2.0", "method": "force", "id": 1, "params": { "builderNames": ["ledger"], "job": job } });
    let url = format!("{base}/api/v2/forceschedulers/force");
    eventually(&format!("{job} to be accepted"), MINUTE, || {
        let request = client.post(&url).json(&body).send();
        async move {
            let response = request.await.ok()?;
            let status = response.status().as_u16();
            assert!(
                status == 200 || status == 503,
                "force {job}: {status} {}",
                response.text().await.unwrap_or_default()
            );
            (status == 200).then_some(())
        }
    })
    .await;
}

/// Waits until no request is incomplete, as the master at `base` reads the database.
async fn wait_all_complete(client: &reqwest::Client, base: &str, submitted: usize, limit: Duration) {
    let url = format!("{base}/api/v2/buildrequests?complete=false&limit=1");
    let all = format!("{base}/api/v2/buildrequests?limit=1");
    eventually("every request to complete", limit, || {
        let (open, all) = (client.get(&url).send(), client.get(&all).send());
        async move {
            let open: Value = open.await.ok()?.json().await.ok()?;
            let all: Value = all.await.ok()?.json().await.ok()?;
            let done = open["meta"]["total"].as_u64()? == 0 && all["meta"]["total"].as_u64()? >= submitted as u64;
            done.then_some(())
        }
    })
    .await;
}

/// Prints the scenario's row and asserts that nothing ran twice, overlapped or was lost.
fn settle(scenario: &str, ledger: &Ledger, jobs: &[String]) {
    let tally = ledger.tally(jobs);
    println!("{}", tally.row(scenario));
    assert_eq!(
        (tally.exactly_once, tally.duplicated, tally.overlapping, tally.lost),
        (tally.submitted, 0, 0, 0),
        "{scenario}: {tally:?}; the ledger:\n{}",
        std::fs::read_to_string(&ledger.path).unwrap_or_default()
    );
}

fn workers(master: &MasterNode, dir: &std::path::Path, names: &[&str]) -> Vec<TestWorker> {
    names.iter().map(|name| spawn_worker(&master.grpc_url(), name, TOKEN, dir)).collect()
}

/// Workers with their probe port open, as in a pod; returns each with its `/readyz` URL.
fn probed_workers(master: &MasterNode, dir: &std::path::Path, names: &[&str]) -> Vec<(TestWorker, String)> {
    names
        .iter()
        .map(|name| {
            let listen = format!("127.0.0.1:{}", kiln_tests::free_port());
            let worker =
                spawn_worker_env(&master.grpc_url(), name, TOKEN, dir, &[("KILN_WORKER_HTTP_LISTEN", listen.as_str())]);
            (worker, format!("http://{listen}/readyz"))
        })
        .collect()
}

/// Polls `urls` every 100 ms (for at most two minutes) until the returned sender is dropped or
/// sent to; the task then yields every answer that was not 200, as `url: status`.
fn sample_readiness(urls: Vec<String>) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<Vec<String>>) {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
        let mut unready = Vec::new();
        for _ in 0..1200 {
            for url in &urls {
                let status = match client.get(url).send().await {
                    Ok(response) => response.status().as_u16().to_string(),
                    Err(error) => error.to_string(),
                };
                if status != "200" {
                    unready.push(format!("{url}: {status}"));
                }
            }
            tokio::select! {
                _ = real_sleep(Duration::from_millis(100)) => {}
                _ = &mut stopped => break,
            }
        }
        unready
    });
    (stop, task)
}

async fn wait_running(ledger: &Ledger, count: usize) -> Vec<String> {
    eventually(&format!("{count} jobs running"), MINUTE, || async {
        let running = ledger.unfinished();
        (running.len() >= count).then_some(running)
    })
    .await
}

/// A master killed mid-build and started again under the same name, after `down` seconds:
/// its predecessor's builds end RETRY and run again. Returns how long after the restart the
/// last of them ran again.
async fn restart_under_the_same_name(scenario: &str, database: String, down: Duration) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::new(dir.path());
    let client = reqwest::Client::new();
    let mut master = MasterNode::start(dir.path(), "m1", &database, LEASE, &ledger.builders(3.0)).await;
    let (_workers, probes): (Vec<_>, Vec<_>) = probed_workers(&master, dir.path(), &["w1", "w2"]).into_iter().unzip();
    let jobs = jobs(4);
    for job in &jobs {
        submit(&client, &master.base(), job).await;
    }
    let orphans = wait_running(&ledger, 2).await;
    // Both workers are busy now, then lose their master for a while: a ReplicaSet scaling down
    // meanwhile, which deletes not-ready pods first, must not see them as not ready.
    let (stop_sampling, sampled) = sample_readiness(probes);
    master.kill().await;
    real_sleep(down).await;
    let restarted = Instant::now();
    master.restart().await;
    eventually("the killed builds to run again", MINUTE, || async {
        let runs = ledger.runs();
        orphans.iter().all(|job| runs.get(job).is_some_and(|r| r.starts >= 2)).then_some(())
    })
    .await;
    let rerun_after = restarted.elapsed();
    let _ = stop_sampling.send(());
    let unready = sampled.await.unwrap();
    assert!(unready.is_empty(), "{scenario}: a busy or reconnecting worker read as not ready: {unready:?}");
    wait_all_complete(&client, &master.base(), jobs.len(), MINUTE).await;
    println!("{scenario}: the killed builds ran again {:.1} s after the restart", rerun_after.as_secs_f64());
    settle(scenario, &ledger, &jobs);
    rerun_after
}

#[tokio::test]
async fn a_master_restarted_at_once_under_the_same_name_reruns_its_builds_on_sqlite() {
    let _serial = one_at_a_time().await;
    let dir = tempfile::tempdir().unwrap();
    let rerun =
        restart_under_the_same_name("master SIGKILL, restart at once (SQLite)", sqlite(dir.path()), Duration::ZERO)
            .await;
    assert!(rerun < Duration::from_secs(LEASE), "the orphans ran again only after {rerun:?}");
}

#[tokio::test]
async fn a_master_restarted_after_the_lease_under_the_same_name_reruns_its_builds_on_postgres() {
    let _serial = one_at_a_time().await;
    let database = pg::fresh_database().await;
    let down = Duration::from_secs(LEASE + 1);
    restart_under_the_same_name("master SIGKILL, restart after the lease (PostgreSQL)", database, down).await;
}

#[tokio::test]
async fn a_master_restarted_at_once_under_the_same_name_reruns_its_builds_on_postgres() {
    let _serial = one_at_a_time().await;
    let database = pg::fresh_database().await;
    let rerun =
        restart_under_the_same_name("master SIGKILL, restart at once (PostgreSQL)", database, Duration::ZERO).await;
    assert!(rerun < Duration::from_secs(LEASE), "the orphans ran again only after {rerun:?}");
}

/// When master `name` at `base` last renewed its leases (it stamps `last_active` as it does).
async fn last_renewal(client: &reqwest::Client, base: &str, name: &str) -> Option<Value> {
    let masters: Value = client.get(format!("{base}/api/v2/masters")).send().await.ok()?.json().await.ok()?;
    masters["masters"].as_array()?.iter().find(|m| m["name"] == name).map(|m| m["last_active"].clone())
}

/// Two live processes under one master name (a misconfiguration, or a rolling update that keeps
/// the name): the newcomer cannot take the instance lock, says so, and leaves the claims of the
/// live one alone. The lease is long here (renewed every 10 s) and the newcomer starts just after
/// a renewal, so claims brought forward to the orphan deadline (4 s) would be taken back before
/// the live master renewed them again.
#[tokio::test]
async fn a_second_live_process_under_the_same_name_leaves_the_first_ones_builds_alone() {
    const LONG_LEASE: u64 = 40;
    let _serial = one_at_a_time().await;
    let dir = tempfile::tempdir().unwrap();
    let database = pg::fresh_database().await;
    let ledger = Ledger::new(dir.path());
    let client = reqwest::Client::new();
    let first = MasterNode::start(dir.path(), "m1", &database, LONG_LEASE, &ledger.builders(15.0)).await;
    let _workers = workers(&first, dir.path(), &["w1", "w2"]);
    let jobs = jobs(2);
    for job in &jobs {
        submit(&client, &first.base(), job).await;
    }
    wait_running(&ledger, 2).await;
    let before = last_renewal(&client, &first.base(), "m1").await;
    eventually("the first master to renew its leases", MINUTE, || async {
        let now = last_renewal(&client, &first.base(), "m1").await;
        (now.is_some() && now != before).then_some(())
    })
    .await;
    let mut twin =
        MasterNode::start_as(dir.path(), "m1-twin", "m1", &database, LONG_LEASE, &ledger.builders(15.0)).await;
    eventually("the newcomer to say it does not hold the instance lock", MINUTE, || async {
        twin.log().contains("holds this master's instance lock").then_some(())
    })
    .await;
    // Past the orphan deadline and a reaping round, still before the next renewal.
    real_sleep(Duration::from_secs(6)).await;
    let runs = ledger.runs();
    assert!(
        jobs.iter().all(|job| runs[job].starts == 1),
        "a live master's build was taken back: {runs:?}\nFIRST\n{}\nTWIN\n{}",
        first.log(),
        twin.log()
    );
    twin.kill().await;
    wait_all_complete(&client, &first.base(), jobs.len(), MINUTE).await;
    settle("two live processes under one name (PostgreSQL)", &ledger, &jobs);
}

#[tokio::test]
async fn a_second_master_takes_over_the_builds_of_a_killed_one() {
    let _serial = one_at_a_time().await;
    let dir = tempfile::tempdir().unwrap();
    let database = pg::fresh_database().await;
    let ledger = Ledger::new(dir.path());
    let client = reqwest::Client::new();
    let mut first = MasterNode::start(dir.path(), "first", &database, LEASE, &ledger.builders(3.0)).await;
    let second = MasterNode::start(dir.path(), "second", &database, LEASE, &ledger.builders(3.0)).await;
    let _on_first = workers(&first, dir.path(), &["w1", "w2"]);
    let _on_second = workers(&second, dir.path(), &["w3"]);
    let jobs = jobs(4);
    for job in &jobs {
        submit(&client, &first.base(), job).await;
    }
    wait_running(&ledger, 3).await;
    first.kill().await;
    wait_all_complete(&client, &second.base(), jobs.len(), 2 * MINUTE).await;
    settle("master SIGKILL, another master takes over (PostgreSQL)", &ledger, &jobs);
}

#[tokio::test]
async fn workers_killed_mid_build_again_and_again_never_run_a_build_twice() {
    let _serial = one_at_a_time().await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::new(dir.path());
    let client = reqwest::Client::new();
    let master = MasterNode::start(dir.path(), "m1", &sqlite(dir.path()), LEASE, &ledger.builders(3.0)).await;
    let mut workers = workers(&master, dir.path(), &["w1", "w2", "w3"]);
    let jobs = jobs(18);
    for job in &jobs {
        submit(&client, &master.base(), job).await;
    }
    for round in 0..4 {
        let (job, name) =
            eventually("a job running", MINUTE, || async { ledger.running_on().into_iter().next() }).await;
        let starts = ledger.runs()[&job].starts;
        println!("round {round}: killing {name} while it runs {job}");
        let index = workers.iter().position(|w| w.name == name).expect("a worker of ours");
        workers[index].signal(libc::SIGKILL);
        let _ = workers[index].child.wait().await;
        workers[index] = spawn_worker(&master.grpc_url(), &name, TOKEN, dir.path());
        eventually(&format!("{job} to run again"), MINUTE, || async {
            (ledger.runs()[&job].starts > starts).then_some(())
        })
        .await;
    }
    wait_all_complete(&client, &master.base(), jobs.len(), 2 * MINUTE).await;
    settle("worker SIGKILL mid-build ×4, 3 workers (SQLite)", &ledger, &jobs);
}

#[tokio::test]
async fn a_worker_frozen_beyond_its_heartbeat_does_not_run_beside_the_retry() {
    let _serial = one_at_a_time().await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::new(dir.path());
    let client = reqwest::Client::new();
    let master = MasterNode::start(dir.path(), "m1", &sqlite(dir.path()), LEASE, &ledger.builders(8.0)).await;
    let workers = workers(&master, dir.path(), &["w1", "w2", "w3"]);
    let jobs = jobs(2);
    for job in &jobs {
        submit(&client, &master.base(), job).await;
    }
    wait_running(&ledger, 2).await;
    let (job, name) = ledger.running_on().into_iter().next().expect("a running job");
    let frozen = workers.iter().find(|w| w.name == name).expect("a worker of ours");
    // The command runs under its supervisor, the small binary of its own.
    let worker_pid = frozen.child.id().expect("a running worker");
    let supervisors: Vec<String> = children_of(worker_pid)
        .iter()
        .filter_map(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).ok())
        .map(|exe| exe.file_name().unwrap_or_default().to_string_lossy().into_owned())
        .collect();
    assert_eq!(supervisors, ["kiln-supervise"], "the worker's children while it runs one command");
    frozen.signal(libc::SIGSTOP);
    eventually(&format!("{job} to run again elsewhere"), MINUTE, || async {
        ledger.runs().get(&job).is_some_and(|r| r.starts >= 2).then_some(())
    })
    .await;
    real_sleep(Duration::from_secs(2)).await;
    frozen.signal(libc::SIGCONT);
    wait_all_complete(&client, &master.base(), jobs.len(), MINUTE).await;
    settle("worker SIGSTOP beyond the heartbeat, then SIGCONT (SQLite)", &ledger, &jobs);
}

async fn database_outage(scenario: &str, down: Duration) {
    let dir = tempfile::tempdir().unwrap();
    let database = pg::fresh_database().await;
    let ledger = Ledger::new(dir.path());
    let client = reqwest::Client::new();
    let master = MasterNode::start(dir.path(), "m1", &database, LEASE, &ledger.builders(2.0)).await;
    let _workers = workers(&master, dir.path(), &["w1", "w2"]);
    let mut jobs = jobs(6);
    for job in &jobs {
        submit(&client, &master.base(), job).await;
    }
    wait_running(&ledger, 2).await;
    pg::stop_cluster();
    // A write during the outage is told to come back later, not that the master broke.
    let body = json!({ "jsonrpc": "2.0", "method": "force", "id": 1, "params": { "builderNames": ["ledger"], "job": "late" } });
    let during =
        client.post(format!("{}/api/v2/forceschedulers/force", master.base())).json(&body).send().await.unwrap();
    assert_eq!(during.status(), 503, "a force during the outage: {}", during.text().await.unwrap_or_default());
    real_sleep(down).await;
    pg::restart_cluster();
    // The first write after it succeeds: no stale pooled connection fails it.
    let after =
        client.post(format!("{}/api/v2/forceschedulers/force", master.base())).json(&body).send().await.unwrap();
    assert_eq!(after.status(), 200, "the first force after the outage: {}", after.text().await.unwrap_or_default());
    jobs.push("late".into());
    wait_all_complete(&client, &master.base(), jobs.len(), 2 * MINUTE).await;
    settle(scenario, &ledger, &jobs);
}

#[tokio::test]
async fn builds_survive_a_database_outage_longer_than_a_lease() {
    let _serial = one_at_a_time().await;
    database_outage("PostgreSQL stopped 12 s (> lease) under load", Duration::from_secs(LEASE + 2)).await;
}

#[tokio::test]
async fn builds_survive_a_database_restarted_fast() {
    let _serial = one_at_a_time().await;
    database_outage("PostgreSQL stopped 1 s under load", Duration::from_secs(1)).await;
}

/// The processes whose parent is `pid` (from `/proc/<pid>/task/*/children`).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| list.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>())
        .collect()
}

/// Waits up to `limit` for a worker process to exit; returns whether it did.
async fn exits_within(worker: &mut TestWorker, limit: Duration) -> bool {
    tokio::time::timeout(limit, worker.child.wait()).await.is_ok()
}

#[tokio::test]
async fn sigterm_while_a_dispatch_holds_a_reservation_lets_the_worker_exit() {
    use sqlx::Connection;
    let _serial = one_at_a_time().await;
    let dir = tempfile::tempdir().unwrap();
    let database = sqlite(dir.path());
    let ledger = Ledger::new(dir.path());
    let client = reqwest::Client::new();
    let master = MasterNode::start(dir.path(), "m1", &database, LEASE, &ledger.builders(2.0)).await;
    let mut workers = workers(&master, dir.path(), &["idle", "busy"]);
    eventually("two workers connected", MINUTE, || async {
        let reply: Value =
            client.get(format!("{}/api/v2/workers", master.base())).send().await.ok()?.json().await.ok()?;
        let connected = reply["workers"]
            .as_array()?
            .iter()
            .filter(|w| w["connected_to"].as_array().is_some_and(|masters| !masters.is_empty()))
            .count();
        (connected == 2).then_some(())
    })
    .await;
    let jobs = jobs(1);
    submit(&client, &master.base(), &jobs[0]).await;
    let running = wait_running(&ledger, 1).await;
    let on = ledger.running_on();
    let busy_name = on.get(&running[0]).expect("a worker").clone();
    let (busy, idle): (Vec<_>, Vec<_>) = workers.iter_mut().partition(|w| w.name == busy_name);
    let (busy, idle) = (busy.into_iter().next().unwrap(), idle.into_iter().next().unwrap());

    // Hold SQLite's write lock across the dispatcher's 5 s sweep: its claim for the idle worker
    // waits on the lock with a slot reserved. SIGTERM the idle worker meanwhile, then let go.
    let mut holder = sqlx::SqliteConnection::connect(&database).await.unwrap();
    sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut holder).await.unwrap();
    real_sleep(Duration::from_secs(6)).await;
    idle.signal(libc::SIGTERM);
    busy.signal(libc::SIGTERM);
    real_sleep(Duration::from_secs(1)).await;
    sqlx::raw_sql("COMMIT").execute(&mut holder).await.unwrap();
    assert!(exits_within(idle, Duration::from_secs(15)).await, "the idle worker was never told to shut down");
    assert!(exits_within(busy, Duration::from_secs(30)).await, "the busy worker did not exit after its build");
    wait_all_complete(&client, &master.base(), jobs.len(), MINUTE).await;
    settle("SIGTERM to an idle and a busy worker during a held dispatch (SQLite)", &ledger, &jobs);
}

#[tokio::test]
async fn three_masters_on_postgres_run_every_request_once() {
    let _serial = one_at_a_time().await;
    let dir = tempfile::tempdir().unwrap();
    let database = pg::fresh_database().await;
    let ledger = Ledger::new(dir.path());
    let client = reqwest::Client::new();
    let mut masters = Vec::new();
    let mut fleet = Vec::new();
    for name in ["a", "b", "c"] {
        let master = MasterNode::start(dir.path(), name, &database, LEASE, &ledger.builders(0.0)).await;
        fleet.extend(workers(&master, dir.path(), &[&format!("{name}1"), &format!("{name}2")]));
        masters.push(master);
    }
    let jobs = jobs(300);
    for (i, job) in jobs.iter().enumerate() {
        submit(&client, &masters[i % 3].base(), job).await;
    }
    wait_all_complete(&client, &masters[0].base(), jobs.len(), 4 * MINUTE).await;
    settle("three masters on PostgreSQL drain 300 requests", &ledger, &jobs);
}

#[tokio::test]
async fn a_stop_of_a_build_whose_master_died_takes_effect() {
    let _serial = one_at_a_time().await;
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::new(dir.path());
    let client = reqwest::Client::new();
    let mut master = MasterNode::start(dir.path(), "m1", &sqlite(dir.path()), LEASE, &ledger.builders(3.0)).await;
    let _workers = workers(&master, dir.path(), &["w1"]);
    submit(&client, &master.base(), "orphan").await;
    wait_running(&ledger, 1).await;
    master.kill().await;
    master.restart().await;
    // No running master holds the build now; the stop is kept and acted on when its claim is
    // taken back: the request ends CANCELLED and the build does not run again.
    let body = json!({ "jsonrpc": "2.0", "method": "stop", "id": 1, "params": { "reason": "not wanted" } });
    let reply = client.post(format!("{}/api/v2/builds/1", master.base())).json(&body).send().await.unwrap();
    assert_eq!(reply.status(), 200, "{}", reply.text().await.unwrap_or_default());
    wait_all_complete(&client, &master.base(), 1, MINUTE).await;
    let request: Value =
        client.get(format!("{}/api/v2/buildrequests/1", master.base())).send().await.unwrap().json().await.unwrap();
    assert_eq!(request["buildrequests"][0]["results"], 6, "{request}");
    real_sleep(Duration::from_secs(2)).await;
    assert_eq!(ledger.runs()["orphan"].starts, 1, "the stopped build ran again");
}

/// A change stored by a master that is killed before any scheduler acted on it — a lock held on
/// `buildsets` keeps its submission waiting — is built after the restart, once.
#[tokio::test]
async fn a_change_whose_master_died_before_scheduling_it_builds_once() {
    use sqlx::{Connection, Row};
    let _serial = one_at_a_time().await;
    let dir = tempfile::tempdir().unwrap();
    let database = pg::fresh_database().await;
    let ledger = Ledger::new(dir.path());
    let client = reqwest::Client::new();
    let body = format!(
        "{}  - {{type: single_branch, name: main, branch: main, builderNames: [ledger]}}\n",
        ledger.builders(0.2)
    );
    let mut master = MasterNode::start(dir.path(), "m1", &database, LEASE, &body).await;
    let _workers = workers(&master, dir.path(), &["w1"]);
    let change = [
        ("author", "dev <dev@example.com>"),
        ("branch", "main"),
        ("revision", "4f1c2d3e"),
        ("repository", "https://git.example/app.git"),
        ("properties", r#"{"job": "pushed"}"#),
    ];
    let form: Vec<String> = change.iter().map(|(k, v)| format!("{k}={}", kiln_tests::system::urlencode(v))).collect();
    let hook = client
        .post(format!("{}/change_hook/base", master.base()))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(form.join("&"))
        .send();

    let mut holder = sqlx::PgConnection::connect(&database).await.unwrap();
    sqlx::raw_sql("BEGIN; LOCK TABLE buildsets IN EXCLUSIVE MODE").execute(&mut holder).await.unwrap();
    let hook = tokio::spawn(hook);
    eventually("the change to be stored", MINUTE, || async {
        let changes: Value =
            client.get(format!("{}/api/v2/changes", master.base())).send().await.ok()?.json().await.ok()?;
        (changes["meta"]["total"] == 1).then_some(())
    })
    .await;
    master.kill().await;
    assert!(hook.await.unwrap().is_err(), "the hook was answered before its change was scheduled");
    sqlx::raw_sql("ROLLBACK").execute(&mut holder).await.unwrap();
    let buildsets = sqlx::query("SELECT COUNT(*) AS n FROM buildsets").fetch_one(&mut holder).await.unwrap();
    assert_eq!(buildsets.get::<i64, _>("n"), 0, "the killed master's submission was not rolled back");

    master.restart().await;
    wait_running(&ledger, 1).await;
    wait_all_complete(&client, &master.base(), 1, MINUTE).await;
    assert!(master.log().contains("a change was stored but not scheduled"), "{}", master.log());
    // Housekeeping rounds after it schedule nothing more.
    real_sleep(Duration::from_secs(4)).await;
    let buildsets = sqlx::query("SELECT COUNT(*) AS n FROM buildsets").fetch_one(&mut holder).await.unwrap();
    assert_eq!(buildsets.get::<i64, _>("n"), 1);
    settle("master killed between storing a change and scheduling it (PostgreSQL)", &ledger, &["pushed".to_owned()]);
}
