//! Reporters benchmark: the real `kiln-master` (release build) with K local workers runs N
//! one-step builds, each of its own commit, while a GitHub reporter sends their statuses to a fake
//! GitHub that answers in 50 ms. It reports statuses per second, the time from a build's end to
//! its final status arriving (p50/p99), and burst throughput with the reporter on and off: runs
//! without and with alternate, each on a fresh master and database, so that the machine's drift
//! between runs falls on both sides, and the medians are compared.
//!
//! ```sh
//! cargo build --release --bins && cargo bench -p kiln-tests --bench reports -- --builds 1000
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clap::Parser;
use kiln_tests::forge::FakeForge;
use kiln_tests::process::{
    MasterProcess, bench_database, cpu_seconds_of, finished_builds, percentile, timings, wait_completed,
};
use serde_json::json;

#[derive(Debug, Parser)]
struct Args {
    /// Builds in the burst.
    #[arg(long, default_value_t = 1000)]
    builds: usize,
    /// Local workers.
    #[arg(long, default_value_t = 8)]
    workers: u32,
    /// Runs without and with the reporter, alternating.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// How long the fake forge takes to answer, in ms.
    #[arg(long, default_value_t = 50)]
    forge_ms: u64,
    // `cargo bench` passes `--bench`; accept and ignore it.
    #[arg(long, hide = true)]
    bench: bool,
}

const SUBMITTERS: usize = 16;
const TOKEN: &str = "bench-token";

/// Forces `total` builds, each of commit `{i:08x}`, through `SUBMITTERS` connections; returns
/// builds per second from first submission to last completion, the master's CPU per build and
/// this process's (the submitters' and the fake forge's).
async fn burst(master: &MasterProcess, database: &str, total: usize) -> (f64, f64, f64) {
    let client = reqwest::Client::new();
    let (cpu_before, own_before) = (master.cpu_seconds(), cpu_seconds_of(std::process::id()));
    let next = Arc::new(AtomicUsize::new(0));
    let mut submitters = Vec::new();
    for _ in 0..SUBMITTERS {
        let (client, base, next) = (client.clone(), master.base.clone(), Arc::clone(&next));
        submitters.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= total {
                    break;
                }
                let params =
                    json!({ "repository": "https://github.com/kiln-ci/app.git", "revision": format!("{i:08x}") });
                let body = json!({ "jsonrpc": "2.0", "method": "force", "id": 1, "params": params });
                let url = format!("{base}/api/v2/forceschedulers/force");
                let reply = client.post(url).json(&body).send().await.expect("force");
                assert!(reply.status().is_success(), "force refused: {}", reply.status());
            }
        }));
    }
    for s in submitters {
        s.await.unwrap();
    }
    wait_completed(&client, &master.base, total as i64, Duration::from_secs(600), Duration::from_millis(50)).await;
    let runs = timings(database, 0).await;
    let first = runs.iter().map(|t| t.0).min().unwrap();
    let last = runs.iter().map(|t| t.2).max().unwrap();
    let cpu = (master.cpu_seconds() - cpu_before) / total as f64;
    let own = (cpu_seconds_of(std::process::id()) - own_before) / total as f64;
    (runs.len() as f64 / ((last - first) as f64 / 1000.0), cpu, own)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    println!(
        "Kiln reporters benchmark: {} builds, {} local workers, a fake GitHub answering in {} ms, sqlite ({} CPUs)",
        args.builds,
        args.workers,
        args.forge_ms,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let builder = "collapseRequests: false\nbuilders:\n  - name: quick\n    steps:\n      - shell: {name: run, command: [\"true\"]}\nschedulers:\n  - {type: force, name: force, builderNames: [quick]}\n";
    let pool = format!("pools:\n  - {{name: local, backend: local, count: {}}}\n", args.workers);

    let (mut without, mut with) = (Vec::new(), Vec::new());
    let (mut lag, mut rates) = (Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        // Without reporters.
        let dir = tempfile::tempdir().unwrap();
        let database = bench_database("sqlite", dir.path()).await;
        let master =
            MasterProcess::start(&database, dir.path(), &format!("{pool}{builder}"), u64::from(args.workers)).await;
        without.push(burst(&master, &database, args.builds).await);
        master.stop().await;

        // With a GitHub reporter.
        let github = FakeForge::github(TOKEN).await;
        github.answer_after(Duration::from_millis(args.forge_ms));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), TOKEN).unwrap();
        let services = format!(
            "services:\n  - {{type: github_status, name: github, token_file: \"{}\", base_url: \"{}\"}}\n",
            dir.path().join("token").display(),
            github.base_url
        );
        let database = bench_database("sqlite", dir.path()).await;
        let body = format!("{pool}{builder}{services}");
        let master = MasterProcess::start(&database, dir.path(), &body, u64::from(args.workers)).await;
        with.push(burst(&master, &database, args.builds).await);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        while github.accepted().iter().filter(|s| s.state != "pending").count() < args.builds {
            assert!(tokio::time::Instant::now() < deadline, "statuses did not all arrive");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let done: HashMap<i64, i64> =
            finished_builds(&database, 0).await.into_iter().map(|(_, number, at)| (number, at)).collect();
        let arrivals = github.arrivals();
        lag.extend(arrivals.iter().filter(|(s, _)| s.state != "pending").filter_map(|(s, at)| {
            let number: i64 = s.target_url.rsplit('/').next()?.parse().ok()?;
            done.get(&number).map(|end| (at - end) as f64)
        }));
        let first = arrivals.iter().map(|(_, at)| *at).min().unwrap_or_default();
        let last = arrivals.iter().map(|(_, at)| *at).max().unwrap_or_default();
        rates.push((arrivals.len(), arrivals.len() as f64 / ((last - first).max(1) as f64 / 1000.0)));
        master.stop().await;
    }
    lag.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = |values: Vec<f64>| {
        let mut sorted = values;
        sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
        percentile(&sorted, 50.0)
    };
    let listed = |values: Vec<f64>| values.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(", ");
    let (throughput_without, throughput_with) =
        (median(without.iter().map(|r| r.0).collect()), median(with.iter().map(|r| r.0).collect()));
    let (cpu_without, cpu_with) =
        (median(without.iter().map(|r| r.1 * 1000.0).collect()), median(with.iter().map(|r| r.1 * 1000.0).collect()));

    println!(
        "statuses sent, each run                  {}",
        rates.iter().map(|(n, rate)| format!("{n} ({rate:.0} per second)")).collect::<Vec<_>>().join(", ")
    );
    println!(
        "build end → final status received        p50 {:.0} ms   p99 {:.0} ms   (n={})",
        percentile(&lag, 50.0),
        percentile(&lag, 99.0),
        lag.len()
    );
    println!(
        "burst throughput, median of {}            {throughput_without:.0} builds/s without reporters, {throughput_with:.0} with ({:+.1} %)",
        args.rounds,
        (throughput_with / throughput_without - 1.0) * 100.0
    );
    println!(
        "  each run, builds/s                     without {}; with {}",
        listed(without.iter().map(|r| r.0).collect()),
        listed(with.iter().map(|r| r.0).collect())
    );
    let (own_without, own_with) =
        (median(without.iter().map(|r| r.2 * 1000.0).collect()), median(with.iter().map(|r| r.2 * 1000.0).collect()));
    println!(
        "master CPU per build, burst (median)     {cpu_without:.2} ms without reporters, {cpu_with:.2} ms with (statuses sent meanwhile)"
    );
    println!(
        "benchmark's own CPU per build (median)   {own_without:.2} ms without, {own_with:.2} ms with: submitters, and the fake forge on the same cores"
    );
}
