//! A real Prometheus scrapes a running master: the queue it sees fills and drains, finished
//! builds are counted, and every query of the Grafana dashboard names an exported metric and
//! runs.

use std::process::Stdio;
use std::time::Duration;

use kiln_tests::process::{MasterProcess, force};
use kiln_tests::system::{TOKEN, spawn_worker, urlencode};
use kiln_tests::{eventually, free_port};
use serde_json::Value;

const MINUTE: Duration = Duration::from_secs(60);

fn dashboard_queries() -> Vec<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/kiln/dashboards/kiln.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).expect("the dashboard parses");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            queries.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    queries
}

/// The metric names a query uses (histogram series mapped to their histogram).
fn metric_names(query: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = query.as_bytes();
    let mut i = 0;
    while let Some(start) = query[i..].find("kiln_").map(|p| p + i) {
        let end =
            query[start..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(query.len(), |p| p + start);
        let name = &query[start..end];
        let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        names.push(base.to_owned());
        i = end.min(bytes.len());
    }
    names
}

#[test]
fn every_dashboard_query_names_an_exported_metric() {
    let queries = dashboard_queries();
    assert!(queries.len() >= 8, "{queries:?}");
    let panels: String = queries.join("\n");
    for wanted in
        ["kiln_buildrequests_pending", "kiln_buildrequests_oldest_pending_age_seconds", "kiln_pool_desired_workers"]
    {
        assert!(panels.contains(wanted), "the dashboard shows {wanted}");
    }
    for query in &queries {
        let names = metric_names(query);
        assert!(!names.is_empty(), "{query}");
        for name in names {
            assert!(kiln_master::telemetry::METRICS.contains(&name.as_str()), "{name} (in {query}) is not exported");
        }
    }
}

async fn query(client: &reqwest::Client, prometheus: &str, promql: &str) -> Option<Value> {
    let reply: Value = client
        .get(format!("{prometheus}/api/v1/query?query={}", urlencode(promql)))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    (reply["status"] == "success").then(|| reply["data"].clone())
}

async fn scalar(client: &reqwest::Client, prometheus: &str, promql: &str) -> Option<f64> {
    let data = query(client, prometheus, promql).await?;
    data["result"][0]["value"][1].as_str()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_the_queue_fill_and_drain() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let body = format!(
        "  tokens: [{{name: t, value: {TOKEN}}}]\ncollapseRequests: false\npools:\n  - {{name: ci, backend: static, min: 0, max: 10}}\nbuilders:\n  - {{name: b, steps: [{{shell: {{command: \"true\"}}}}]}}\nschedulers:\n  - {{type: force, name: force, builderNames: [b]}}\n"
    );
    let master = MasterProcess::start(&database, dir.path(), &body, 0).await;
    let port = free_port();
    let target = master.base.trim_start_matches("http://").to_owned();
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n  - job_name: kiln\n    static_configs:\n      - targets: ['{target}']\n"
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let _prometheus = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus is installed (scripts/test installs it)");
    let prometheus = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    eventually("Prometheus to scrape the master", MINUTE, || async {
        (scalar(&client, &prometheus, "up{job=\"kiln\"}").await? == 1.0).then_some(())
    })
    .await;

    const N: usize = 5;
    for _ in 0..N {
        force(&client, &master.base).await;
    }
    eventually("PromQL to see N pending", MINUTE, || async {
        (scalar(&client, &prometheus, "sum(kiln_buildrequests_pending)").await? == N as f64).then_some(())
    })
    .await;
    assert_eq!(scalar(&client, &prometheus, "max(kiln_pool_desired_workers{pool=\"ci\"})").await, Some(N as f64));

    let _worker = spawn_worker(&format!("http://127.0.0.1:{}", master.grpc_port), "w", TOKEN, dir.path());
    eventually("PromQL to see the queue drained and N builds finished", MINUTE, || async {
        let pending = scalar(&client, &prometheus, "sum(kiln_buildrequests_pending)").await?;
        let finished = scalar(&client, &prometheus, "sum(kiln_builds_finished_total{result=\"success\"})").await?;
        (pending == 0.0 && finished == N as f64).then_some(())
    })
    .await;
    for promql in dashboard_queries() {
        assert!(query(&client, &prometheus, &promql).await.is_some(), "the dashboard query runs: {promql}");
    }
    master.stop().await;
}
