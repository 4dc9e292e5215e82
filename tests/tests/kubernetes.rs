//! The Kubernetes backend against a mock API: the exact scale and patch calls for a burst, a
//! scale-down that drains idle pods and makes the ReplicaSet spare the busy one, API errors that
//! back off, and a deleted pod whose build is retried at once. The test plays the ReplicaSet.

use std::time::Duration;

use kiln_master::config::Config;
use kiln_master::server::Options;
use kiln_tests::eventually;
use kiln_tests::kube::FakeKube;
use kiln_tests::system::{TOKEN, TestMaster, TestWorker};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

/// A master with one Kubernetes pool `linux` (Deployment `workers` in namespace `ci`).
async fn start(dir: &std::path::Path, fake: &FakeKube, pool: &str, heartbeat: f64, builders: &str) -> TestMaster {
    let text = format!(
        "collapseRequests: false\ndatabase: \"sqlite://{db}\"\ndata_dir: \"{data}\"\nhttp:\n  listen: 127.0.0.1:0\n  auth: open\nworkers:\n  listen: 127.0.0.1:0\n  heartbeat_interval: {heartbeat}\n  tokens: [{{name: t, value: {TOKEN}}}]\npools:\n  - {{name: linux, backend: kubernetes, kubernetes: {{namespace: ci, deployment: workers}}, {pool}}}\n{builders}",
        db = dir.join("kiln.sqlite").display(),
        data = dir.display(),
    );
    let config = Config::parse("kubernetes.yaml", &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    TestMaster::start_with_options(config, dir, Options { kube_client: Some(fake.client()), ..Options::default() })
        .await
}

fn scale_patches(fake: &FakeKube) -> Vec<serde_json::Value> {
    fake.patches().into_iter().filter(|c| c.path.ends_with("/deployments/workers/scale")).map(|c| c.body).collect()
}

fn pod_patches(fake: &FakeKube) -> Vec<(String, serde_json::Value)> {
    fake.patches()
        .into_iter()
        .filter_map(|c| Some((c.path.strip_prefix("/api/v1/namespaces/ci/pods/")?.to_owned(), c.body)))
        .collect()
}

/// Pods of the Deployment with a worker process each, connected as the pod's name.
async fn pods(master: &TestMaster, fake: &FakeKube, names: &[&str]) -> Vec<TestWorker> {
    let workers: Vec<TestWorker> = names
        .iter()
        .map(|name| {
            fake.put_pod(name, true);
            master.spawn_pool_worker(name, "linux")
        })
        .collect();
    master.wait_workers(names.len()).await;
    workers
}

/// The idle pods have the lowest deletion cost; the busy one stays above them (at 10 + seconds
/// busy when its build was already running at the decision, or unannotated, which counts as 0).
fn assert_the_busy_pod_is_spared(fake: &FakeKube, busy: &str) {
    let costs = fake.deletion_costs();
    let calls: Vec<String> =
        fake.patches().iter().map(|c| format!("{:.3} {} {}", c.at.elapsed().as_secs_f64(), c.path, c.body)).collect();
    for (pod, cost) in &costs {
        let cost: i64 = cost.as_deref().unwrap_or("0").parse().unwrap();
        if pod == busy {
            assert!(cost == 0 || cost >= 10, "busy {busy}: {costs:?}\n{}", calls.join("\n"));
        } else {
            assert_eq!(cost, -1000, "busy {busy}: {costs:?}\n{}", calls.join("\n"));
        }
    }
    assert_ne!(fake.lowest_cost_pod().as_deref(), Some(busy));
}

async fn force(master: &TestMaster, builders: &[&str]) -> Vec<i64> {
    let (status, reply) = master.force("force", json!({ "builderNames": builders })).await;
    assert_eq!(status, 200, "{reply}");
    reply["result"][1].as_object().unwrap().values().map(|v| v.as_i64().unwrap()).collect()
}

const THREE: &str = "builders:\n  - {name: a, steps: [{shell: {command: \"true\"}}]}\n  - {name: b, steps: [{shell: {command: \"true\"}}]}\n  - {name: c, steps: [{shell: {command: \"true\"}}]}\nschedulers:\n  - {type: force, name: force, builderNames: [a, b, c]}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_is_one_scale_call_and_the_drained_pool_goes_back_to_zero() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKube::new("ci", "workers", 0);
    let master = start(dir.path(), &fake, "min: 0, max: 5, scale_down_delay: 1", 0.5, THREE).await;
    // The master reads the scale subresource for the pod selector, then lists and watches pods.
    eventually("the pod watch", MINUTE, || async {
        fake.calls()
            .iter()
            .any(|c| c.path == "/api/v1/namespaces/ci/pods" && c.query.contains("watch=true"))
            .then_some(())
    })
    .await;
    let watch = fake.calls().into_iter().find(|c| c.query.contains("watch=true")).unwrap();
    assert!(watch.query.contains("labelSelector=app%3Dkiln-worker%2Cdeployment%3Dworkers"), "{watch:?}");

    // One buildset of three requests: one wake-up, one scale call, straight to three.
    let brids = force(&master, &["a", "b", "c"]).await;
    eventually("three replicas", MINUTE, || async { (fake.replicas() == 3).then_some(()) }).await;
    assert_eq!(scale_patches(&fake), vec![json!({ "spec": { "replicas": 3 } })]);
    assert!(pod_patches(&fake).is_empty(), "a scale-up touches no pod");

    // The ReplicaSet starts three pods; their workers build everything.
    let workers = pods(&master, &fake, &["workers-x1", "workers-x2", "workers-x3"]).await;
    for brid in brids {
        assert_eq!(master.wait_build_of_request(brid, MINUTE).await["results"], 0);
    }
    // Idle for the delay: every pod gets the lowest deletion cost, then replicas go to 0.
    eventually("zero replicas", MINUTE, || async { (fake.replicas() == 0).then_some(()) }).await;
    assert_eq!(scale_patches(&fake), vec![json!({ "spec": { "replicas": 3 } }), json!({ "spec": { "replicas": 0 } })]);
    let costs = fake.deletion_costs();
    assert!(costs.values().all(|c| c.as_deref() == Some("-1000")), "{costs:?}");
    assert_eq!(pod_patches(&fake).len(), 3, "one patch per victim");
    // Drained victims take no new work, on any master.
    let listed = master.get("/api/v2/workers").await;
    for worker in listed["workers"].as_array().unwrap() {
        assert_eq!(worker["paused"], true, "{worker}");
    }
    drop(workers);
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_down_removes_idle_pods_and_the_busy_one_is_spared() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKube::new("ci", "workers", 3);
    // The build runs until the test releases it (at most a minute), however slow the machine.
    let release = dir.path().join("release");
    let builders = format!(
        "builders:\n  - name: long\n    steps:\n      - shell: {{name: job, command: \"echo started; for i in $(seq 600); do [ -e {} ] && break; sleep 0.1; done; echo done\"}}\nschedulers:\n  - {{type: force, name: force, builderNames: [long]}}\n",
        release.display()
    );
    let master = start(dir.path(), &fake, "min: 0, max: 5, scale_down_delay: 3", 0.5, &builders).await;
    let workers = pods(&master, &fake, &["workers-a", "workers-b", "workers-c"]).await;
    let brid = force(&master, &["long"]).await[0];
    let busy = eventually("the build to start", MINUTE, || async {
        let builds = master.get(&format!("/api/v2/buildrequests/{brid}/builds")).await;
        let build = builds["builds"].as_array()?.first()?.clone();
        let worker = master.get(&format!("/api/v2/workers/{}", build["workerid"])).await;
        worker["workers"][0]["name"].as_str().map(str::to_owned)
    })
    .await;

    // One build runs: the pool shrinks to one, by the two idle pods. (Should it not, the failure
    // says what the scaler saw and which calls it made.)
    let shrunk = tokio::time::timeout(MINUTE, async {
        while fake.replicas() != 1 {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    })
    .await;
    if shrunk.is_err() {
        let calls: Vec<String> = fake.patches().iter().map(|c| format!("{} {}", c.path, c.body)).collect();
        panic!(
            "not one replica after a minute: {} replicas; pools {}; calls:\n{}",
            fake.replicas(),
            master.get("/api/v2/pools").await,
            calls.join("\n")
        );
    }
    assert_the_busy_pod_is_spared(&fake, &busy);
    // The ReplicaSet removes the two cheapest pods; their workers get SIGTERM and exit idle.
    for worker in &workers {
        if worker.name != busy {
            fake.delete_pod(&worker.name);
            worker.signal(libc::SIGTERM);
        }
    }
    std::fs::write(&release, "").unwrap();
    let build = master.wait_build_of_request(brid, MINUTE).await;
    assert_eq!(build["results"], 0, "the busy worker's build was not interrupted: {build}");
    let builds = master.get(&format!("/api/v2/buildrequests/{brid}/builds")).await;
    assert_eq!(builds["builds"].as_array().unwrap().len(), 1, "it ran once");
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_back_off_are_counted_and_the_scaler_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKube::new("ci", "workers", 0);
    fake.fail_scale_calls(4);
    let master = start(dir.path(), &fake, "min: 0, max: 5, scale_down_delay: 30", 0.5, THREE).await;
    force(&master, &["a", "b"]).await;
    eventually("two replicas despite the errors", MINUTE, || async { (fake.replicas() == 2).then_some(()) }).await;
    let (_, metrics) = master.get_text("/metrics").await;
    let errors = metrics
        .lines()
        .find(|l| l.starts_with("kiln_pool_api_errors_total{pool=\"linux\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(errors >= 1.0, "errors are counted:\n{metrics}");
    // Failures back off instead of hammering the API.
    let scale_calls = fake.calls().iter().filter(|c| c.path.ends_with("/scale")).count();
    assert!(scale_calls <= 12, "{scale_calls} scale calls for 4 failures");
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_pod_has_its_build_retried_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKube::new("ci", "workers", 1);
    let builders = "builders:\n  - name: long\n    steps:\n      - shell: {name: job, command: \"echo started; sleep 3; echo done\"}\nschedulers:\n  - {type: force, name: force, builderNames: [long]}\n";
    // Heartbeats every 10 s: a silent worker would be noticed after 30 s, the pod's deletion at once.
    let master = start(dir.path(), &fake, "min: 1, max: 1, scale_down_delay: 30", 10.0, builders).await;
    let first = pods(&master, &fake, &["workers-1"]).await;
    let brid = force(&master, &["long"]).await[0];
    eventually("the build to start", MINUTE, || async {
        let builds = master.get(&format!("/api/v2/buildrequests/{brid}/builds")).await;
        builds["builds"].as_array()?.first().map(|_| ())
    })
    .await;
    // The node freezes (the connection stays open, nothing is heard), then the pod is deleted.
    first[0].signal(libc::SIGSTOP);
    let deleted = std::time::Instant::now();
    fake.delete_pod("workers-1");
    eventually("the build to end as RETRY", Duration::from_secs(10), || async {
        let builds = master.get(&format!("/api/v2/buildrequests/{brid}/builds")).await;
        (builds["builds"][0]["results"] == 5).then_some(())
    })
    .await;
    assert!(deleted.elapsed() < Duration::from_secs(10), "well before the heartbeat timeout");
    first[0].signal(libc::SIGKILL);
    // The replacement pod builds the request again.
    let _second = pods(&master, &fake, &["workers-2"]).await;
    let build = master.wait_build_of_request(brid, MINUTE).await;
    assert_eq!(build["results"], 0, "{build}");
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_victim_whose_worker_connects_late_gets_no_work() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKube::new("ci", "workers", 2);
    // Two pods are up, but their workers have not connected yet when the pool shrinks to zero.
    fake.put_pod("workers-late-a", true);
    fake.put_pod("workers-late-b", true);
    let master = start(dir.path(), &fake, "min: 0, max: 5, scale_down_delay: 0", 0.5, THREE).await;
    eventually("zero replicas", MINUTE, || async { (fake.replicas() == 0).then_some(()) }).await;
    // Now one of them connects: it is being removed, so it must not take a build.
    let _late = master.spawn_pool_worker("workers-late-a", "linux");
    master.wait_workers(1).await;
    let brid = force(&master, &["a"]).await[0];
    // The request makes the pool grow again instead.
    eventually("a new replica", MINUTE, || async { (fake.replicas() == 1).then_some(()) }).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let builds = master.get(&format!("/api/v2/buildrequests/{brid}/builds")).await;
    assert!(builds["builds"].as_array().unwrap().is_empty(), "the drained worker took a build: {builds}");
    let workers = master.get("/api/v2/workers?name=workers-late-a").await;
    assert_eq!(workers["workers"][0]["paused"], true, "{workers}");
    master.stop().await;
}

/// The real process against an API server that refuses it, reached through a kubeconfig as on a
/// cluster: every call carries Kiln's User-Agent, and the refusal is logged as the API server's
/// message, once, by Kiln — not as the client's debug dump, nor again by the client itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_calls_carry_kilns_user_agent_and_refusals_read_as_their_message() {
    use std::sync::{Arc, Mutex};
    let agents: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = Arc::clone(&agents);
    let refuse = move |request: axum::extract::Request| {
        let seen = Arc::clone(&seen);
        async move {
            let agent = request.headers().get("user-agent").and_then(|v| v.to_str().ok()).unwrap_or("(none)");
            seen.lock().unwrap().push(agent.to_owned());
            let status = json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Forbidden", "code": 403,
                "message": "deployments.apps \"workers\" is forbidden: User \"system:serviceaccount:ci:kiln\" cannot get resource \"deployments/scale\"",
            });
            (axum::http::StatusCode::FORBIDDEN, axum::Json(status))
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, axum::Router::new().fallback(refuse)).await });

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"http://{api}\"}}}}]\nusers: [{{name: kiln, user: {{}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: kiln, namespace: ci}}}}]\ncurrent-context: fake\n"
        ),
    )
    .unwrap();
    let config = dir.path().join("kiln.yaml");
    std::fs::write(
        &config,
        format!(
            "database: \"sqlite://{}\"\ndata_dir: \"{}\"\nhttp: {{listen: \"127.0.0.1:{}\"}}\nworkers:\n  listen: \"127.0.0.1:{}\"\n  tokens: [{{name: t, value: {TOKEN}}}]\npools:\n  - {{name: linux, backend: kubernetes, min: 0, max: 2, kubernetes: {{deployment: workers}}}}\nbuilders:\n  - {{name: b, steps: [{{shell: {{command: \"true\"}}}}]}}\n",
            dir.path().join("kiln.sqlite").display(),
            dir.path().display(),
            kiln_tests::free_port(),
            kiln_tests::free_port(),
        ),
    )
    .unwrap();
    let log = dir.path().join("master.log");
    let mut master = tokio::process::Command::new(kiln_tests::binary("kiln-master"))
        .arg("--config")
        .arg(&config)
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KILN_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(dir.path().join("master.out")).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let logged = eventually("the refusal to be logged", MINUTE, || async {
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains("cannot read the deployment's scale").then_some(text)
    })
    .await;
    let _ = master.kill().await;
    let agents = agents.lock().unwrap().clone();
    assert!(!agents.is_empty() && agents.iter().all(|a| a.starts_with("kiln-master/")), "{agents:?}");
    let line = logged.lines().find(|l| l.contains("cannot read the deployment's scale")).unwrap();
    assert!(
        line.contains("deployments.apps \\\"workers\\\" is forbidden")
            || line.contains("deployments.apps \"workers\" is forbidden"),
        "{line}"
    );
    assert!(line.contains("(403 Forbidden)"), "{line}");
    assert!(!logged.contains("Status {") && !logged.contains("ApiError"), "a debug dump:\n{logged}");
    assert!(!logged.contains("kube_client"), "the client logged it too:\n{logged}");
}

/// A pool of Buildbot's own workers: pods running `buildbot-worker` join under their pod names
/// (admitted by the Deployment's name prefix) and count in the pool; with one build running, the
/// pool shrinks by its idle pods and the busy one keeps a higher deletion cost and its build.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_buildbot_workers_scales_down_by_its_idle_pods() {
    use kiln_tests::buildbot::BuildbotWorker;
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKube::new("ci", "workers", 3);
    let release = dir.path().join("release");
    let builders = format!(
        "builders:\n  - name: long\n    steps:\n      - shell: {{name: job, command: \"echo started; for i in $(seq 600); do [ -e {} ] && break; sleep 0.1; done; echo done\"}}\nschedulers:\n  - {{type: force, name: force, builderNames: [long]}}\n",
        release.display()
    );
    let text = format!(
        "database: \"sqlite://{db}\"\ndata_dir: \"{data}\"\nhttp:\n  listen: 127.0.0.1:0\n  auth: open\nworkers:\n  listen: 127.0.0.1:0\n  heartbeat_interval: 0.5\n  buildbot: [{{name_prefix: workers-, password: pod-pass, pool: linux}}]\npools:\n  - {{name: linux, backend: kubernetes, kubernetes: {{namespace: ci, deployment: workers}}, min: 0, max: 5, scale_down_delay: 3}}\n{builders}",
        db = dir.path().join("kiln.sqlite").display(),
        data = dir.path().display(),
    );
    let config = Config::parse("buildbot-pool.yaml", &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let master = TestMaster::start_with_options(
        config,
        dir.path(),
        Options { kube_client: Some(fake.client()), ..Options::default() },
    )
    .await;
    let names = ["workers-a", "workers-b", "workers-c"];
    let mut workers = Vec::new();
    for name in names {
        fake.put_pod(name, true);
        let address = master.grpc.to_string();
        workers.push(BuildbotWorker::start(
            &dir.path().join("pods"),
            &address,
            name,
            "pod-pass",
            "msgpack_experimental_v7",
        ));
    }
    master.wait_workers(names.len()).await;
    eventually("the three pods counted in the pool", MINUTE, || async {
        let pools = master.get("/api/v2/pools").await;
        (pools["pools"][0]["workers"] == 3).then_some(())
    })
    .await;
    let brid = force(&master, &["long"]).await[0];
    let busy = eventually("the build to start", MINUTE, || async {
        let builds = master.get(&format!("/api/v2/buildrequests/{brid}/builds")).await;
        let build = builds["builds"].as_array()?.first()?.clone();
        let worker = master.get(&format!("/api/v2/workers/{}", build["workerid"])).await;
        worker["workers"][0]["name"].as_str().map(str::to_owned)
    })
    .await;
    eventually("one replica", MINUTE, || async { (fake.replicas() == 1).then_some(()) }).await;
    assert_the_busy_pod_is_spared(&fake, &busy);
    for (worker, name) in workers.iter_mut().zip(names) {
        if name != busy {
            fake.delete_pod(name);
            worker.kill().await;
        }
    }
    std::fs::write(&release, "").unwrap();
    let build = master.wait_build_of_request(brid, MINUTE).await;
    assert_eq!(build["results"], 0, "the busy worker's build was not interrupted: {build}");
    let builds = master.get(&format!("/api/v2/buildrequests/{brid}/builds")).await;
    assert_eq!(builds["builds"].as_array().unwrap().len(), 1, "it ran once");
    master.stop().await;
}
