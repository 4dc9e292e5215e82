//! Operability of real processes: the master's readiness follows its database (stopped and
//! started again under it), the worker's probes and metrics, and JSON logs in which every line
//! about a build names the build and its builder.

use std::process::Stdio;
use std::time::Duration;

use kiln_tests::process::{MasterProcess, force, wait_request};
use kiln_tests::system::{TOKEN, spawn_worker_env};
use kiln_tests::{binary, eventually, free_port, pg};

const MINUTE: Duration = Duration::from_secs(60);

fn body() -> String {
    format!(
        "  tokens: [{{name: t, value: {TOKEN}}}]\ncollapseRequests: false\nbuilders:\n  - name: b\n    steps:\n      - shell: {{name: hello, command: \"echo hello from the build\"}}\nschedulers:\n  - {{type: force, name: force, builderNames: [b]}}\n"
    )
}

async fn status(client: &reqwest::Client, url: &str) -> Option<u16> {
    Some(client.get(url).timeout(Duration::from_secs(5)).send().await.ok()?.status().as_u16())
}

async fn text(client: &reqwest::Client, url: &str) -> String {
    client.get(url).send().await.unwrap().text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_database_without_a_restart() {
    let database = pg::fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let master = MasterProcess::start(&database, dir.path(), &body(), 0).await;
    let client = reqwest::Client::new();
    let ready = format!("{}/readyz", master.base);
    assert_eq!(status(&client, &ready).await, Some(200));

    pg::stop_cluster();
    eventually("readiness to fail", MINUTE, || async { (status(&client, &ready).await == Some(503)).then_some(()) })
        .await;
    assert_eq!(status(&client, &format!("{}/healthz", master.base)).await, Some(200), "alive all along");

    pg::restart_cluster();
    eventually("readiness to return", MINUTE, || async { (status(&client, &ready).await == Some(200)).then_some(()) })
        .await;
    // The same process builds again.
    let _worker = spawn_worker_env(&format!("http://127.0.0.1:{}", master.grpc_port), "w", TOKEN, dir.path(), &[]);
    let brid = force(&client, &master.base).await;
    assert_eq!(wait_request(&client, &master.base, brid).await["results"], 0, "a build after the outage");
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_has_probes_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let master = MasterProcess::start(&database, dir.path(), &body(), 0).await;
    let client = reqwest::Client::new();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let worker = spawn_worker_env(
        &format!("http://127.0.0.1:{}", master.grpc_port),
        "probed",
        TOKEN,
        dir.path(),
        &[("KILN_WORKER_HTTP_LISTEN", listen.as_str())],
    );
    let base = format!("http://{listen}");
    eventually("the worker to be ready", MINUTE, || async {
        (status(&client, &format!("{base}/readyz")).await == Some(200)).then_some(())
    })
    .await;
    assert_eq!(status(&client, &format!("{base}/healthz")).await, Some(200));
    let brid = force(&client, &master.base).await;
    let metrics = eventually("the build's output to be counted", MINUTE, || async {
        let metrics = text(&client, &format!("{base}/metrics")).await;
        let bytes = metrics
            .lines()
            .find_map(|l| l.strip_prefix("kiln_worker_output_bytes_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())?;
        (bytes > 0.0).then_some(metrics)
    })
    .await;
    assert!(metrics.contains("kiln_worker_connected 1"), "{metrics}");
    for name in kiln_worker::probes::METRICS {
        assert!(metrics.contains(&format!("# TYPE {name}")), "{name} exported:\n{metrics}");
    }
    assert!(brid > 0);
    // SIGTERM: the worker drains, and readiness says so until it exits.
    worker.signal(libc::SIGTERM);
    eventually("the worker to stop being ready", MINUTE, || async {
        (status(&client, &format!("{base}/readyz")).await != Some(200)).then_some(())
    })
    .await;
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_name_the_build_and_builder_on_every_build_line() {
    let dir = tempfile::tempdir().unwrap();
    let (http, grpc) = (free_port(), free_port());
    let config = format!(
        "database: \"sqlite://{}\"\ndata_dir: \"{}\"\nhttp: {{listen: \"127.0.0.1:{http}\", auth: open}}\nworkers:\n  listen: \"127.0.0.1:{grpc}\"\n{}",
        dir.path().join("kiln.sqlite").display(),
        dir.path().display(),
        body()
    );
    let path = dir.path().join("master.yaml");
    std::fs::write(&path, config).unwrap();
    let log_path = dir.path().join("master.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = tokio::process::Command::new(binary("kiln-master"))
        .arg("--config")
        .arg(&path)
        .env("KILN_LOG_FORMAT", "json")
        .env("KILN_LOG", "debug,sqlx=warn,h2=warn,hyper=warn,tower=warn,tonic=warn")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{http}");
    let client = reqwest::Client::new();
    eventually("the master to answer", MINUTE, || async {
        (status(&client, &format!("{base}/healthz")).await == Some(200)).then_some(())
    })
    .await;
    let _worker = spawn_worker_env(&format!("http://127.0.0.1:{grpc}"), "w", TOKEN, dir.path(), &[]);
    let brid = force(&client, &base).await;
    wait_request(&client, &base, brid).await;
    // SAFETY: SIGTERM to our own child.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let _ = tokio::time::timeout(MINUTE, child.wait()).await;
    let lines = std::fs::read_to_string(&log_path).unwrap();
    let mut build_lines = 0;
    for line in lines.lines().filter(|l| !l.trim().is_empty()) {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(entry["timestamp"].is_string() && entry["level"].is_string(), "{line}");
        let in_build = entry["spans"].as_array().is_some_and(|spans| spans.iter().any(|s| s["name"] == "build"));
        if in_build {
            build_lines += 1;
            assert!(entry["span"]["buildid"].is_number() || entry["spans"][0]["buildid"].is_number(), "{line}");
            let builder = entry["spans"].as_array().unwrap().iter().find(|s| s["name"] == "build").unwrap();
            assert_eq!(builder["builder"], "b", "{line}");
            assert!(builder["buildid"].is_number(), "{line}");
        }
    }
    assert!(build_lines > 0, "some lines are about the build:\n{lines}");
}

/// A worker that cannot write its cache (here a file stands where the directory should be, as a
/// root-owned shared volume stands in the way on a cluster) stays not ready and unregistered,
/// with a reason naming the path, its uid and the fix, and goes to work once it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_cannot_write_its_cache_says_so_and_takes_no_work_until_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let master = MasterProcess::start(&database, dir.path(), &body(), 0).await;
    let client = reqwest::Client::new();
    let cache = dir.path().join("cache");
    std::fs::write(&cache, b"in the way").unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let _worker = spawn_worker_env(
        &format!("http://127.0.0.1:{}", master.grpc_port),
        "blocked",
        TOKEN,
        dir.path(),
        &[("KILN_WORKER_HTTP_LISTEN", listen.as_str())],
    );
    let readyz = format!("http://{listen}/readyz");
    let reason = eventually("the probe to give the reason", MINUTE, || async {
        let response = client.get(&readyz).send().await.ok()?;
        (response.status() == 503).then_some(())?;
        let reason = response.text().await.ok()?;
        reason.contains("not writable").then_some(reason)
    })
    .await;
    assert!(reason.contains(&cache.display().to_string()) && reason.contains("uid "), "{reason}");
    assert!(reason.contains("fsGroupPolicy: File"), "{reason}");
    let workers = text(&client, &format!("{}/api/v2/workers", master.base)).await;
    assert!(!workers.contains("blocked"), "it did not register: {workers}");
    let log = std::fs::read_to_string(dir.path().join("blocked.log")).unwrap();
    assert!(log.contains("not writable by this worker"), "{log}");

    std::fs::remove_file(&cache).unwrap();
    eventually("the worker to be ready once it can write", MINUTE, || async {
        (status(&client, &readyz).await == Some(200)).then_some(())
    })
    .await;
    let brid = force(&client, &master.base).await;
    let build = wait_request(&client, &master.base, brid).await;
    assert_eq!(build["results"], 0, "{build}");
    master.stop().await;
}
