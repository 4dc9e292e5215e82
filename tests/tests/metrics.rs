//! The master's Prometheus metrics, scraped from a real `kiln-master` process: the queue is
//! visible as it fills and empties, and finished builds are counted.

use std::time::Duration;

use kiln_tests::eventually;
use kiln_tests::process::{MasterProcess, force};
use kiln_tests::system::{TOKEN, spawn_worker};

async fn scrape(client: &reqwest::Client, base: &str) -> String {
    let response = client.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

/// The value of the sample whose line starts with `series` (name and labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_and_finished_builds_show_in_the_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let body = format!(
        "  tokens: [{{name: t, value: {TOKEN}}}]\ncollapseRequests: false\npools:\n  - {{name: ci, backend: static, min: 0, max: 4}}\nbuilders:\n  - name: b\n    steps:\n      - shell: {{command: \"true\"}}\nschedulers:\n  - {{type: force, name: force, builderNames: [b]}}\n"
    );
    let master = MasterProcess::start(&database, dir.path(), &body, 0).await;
    let client = reqwest::Client::new();
    for _ in 0..3 {
        force(&client, &master.base).await;
    }
    let text = scrape(&client, &master.base).await;
    assert_eq!(sample(&text, "kiln_buildrequests_pending{builder=\"b\"}"), Some(3.0), "{text}");
    assert_eq!(sample(&text, "kiln_buildrequests_submitted_total"), Some(3.0));
    assert!(sample(&text, "kiln_buildrequests_oldest_pending_age_seconds").is_some());
    assert!(text.contains("# HELP kiln_buildrequests_pending"), "described for Prometheus");

    let _worker = spawn_worker(&format!("http://127.0.0.1:{}", master.grpc_port), "w1", TOKEN, dir.path());
    let text = eventually("the queue to drain", Duration::from_secs(60), || async {
        let text = scrape(&client, &master.base).await;
        let finished = sample(&text, "kiln_builds_finished_total{builder=\"b\",result=\"success\"}") == Some(3.0);
        let idle = sample(&text, "kiln_workers{state=\"idle\",pool=\"\"}") == Some(1.0);
        (finished && idle).then_some(text)
    })
    .await;
    assert_eq!(sample(&text, "kiln_buildrequests_pending{builder=\"b\"}"), Some(0.0));
    assert_eq!(sample(&text, "kiln_buildrequests_completed_total{result=\"success\"}"), Some(3.0));
    assert_eq!(sample(&text, "kiln_dispatch_latency_seconds_count{builder=\"b\"}"), Some(3.0));
    for name in kiln_master::telemetry::METRICS {
        assert!(text.contains(&format!("# TYPE {name}")), "{name} is exported");
    }
    // Prometheus's own linter finds nothing to complain about.
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed (scripts/test installs it)");
    std::io::Write::write_all(&mut promtool.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let lint = promtool.wait_with_output().unwrap();
    let complaints = format!("{}{}", String::from_utf8_lossy(&lint.stdout), String::from_utf8_lossy(&lint.stderr));
    assert!(lint.status.success() && complaints.trim().is_empty(), "promtool: {complaints}");
    master.stop().await;
}
