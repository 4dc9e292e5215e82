//! Autoscaling benchmark (release build): how long from a request entering the queue to the
//! scale call — for the local backend, the new `kiln-worker` process appearing; for the
//! Kubernetes backend, the PATCH of the Deployment's scale reaching the API (a mock API in
//! process) — and how long a burst takes on an autoscaled local pool against a fixed pool of the
//! same maximum.
//!
//! ```sh
//! cargo build --release --bins && cargo bench -p kiln-tests --bench scaling -- --database sqlite
//! ```

use std::collections::HashSet;
use std::time::{Duration, Instant};

use clap::Parser;
use kiln_master::config::Config;
use kiln_master::server::Options;
use kiln_tests::kube::FakeKube;
use kiln_tests::process::{MasterProcess, bench_database, force, percentile, requests_with};
use kiln_tests::system::{TestMaster, config_text};

#[derive(Debug, Parser)]
struct Args {
    /// Scale-ups from an empty pool to measure.
    #[arg(long, default_value_t = 30)]
    reactions: usize,
    /// Builds in the burst.
    #[arg(long, default_value_t = 60)]
    builds: usize,
    /// The pool's maximum.
    #[arg(long, default_value_t = 6)]
    max: u32,
    /// Seconds each burst build sleeps.
    #[arg(long, default_value_t = 1.0)]
    build_seconds: f64,
    #[arg(long, default_value = "sqlite")]
    database: String,
    /// Only the Kubernetes reaction measurement.
    #[arg(long)]
    kubernetes_only: bool,
    #[arg(long, hide = true)]
    bench: bool,
}

/// Pids of `kiln-worker` processes whose name starts with `prefix`.
fn workers(prefix: &str) -> HashSet<i32> {
    let mut found = HashSet::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return found };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.first().is_some_and(|a| a.ends_with(b"kiln-worker"))
            && args.windows(2).any(|w| w[0] == b"--name" && w[1].starts_with(prefix.as_bytes()))
        {
            found.insert(pid);
        }
    }
    found
}

async fn pending(client: &reqwest::Client, base: &str) -> i64 {
    requests_with(client, base, false).await
}

fn builder(seconds: f64) -> String {
    format!(
        "collapseRequests: false\nbuilders:\n  - name: b\n    steps:\n      - shell: {{command: \"sleep {seconds}\"}}\nschedulers:\n  - {{type: force, name: force, builderNames: [b]}}\n"
    )
}

/// Runs `count` builds at once on a pool; returns the seconds until all are done, and until the
/// pool had `max` worker processes (from the first request sent).
async fn burst(args: &Args, pool: &str, prefix: &str, min_workers: u64) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let database = bench_database(&args.database, dir.path()).await;
    let body = format!("pools:\n  - {{name: {prefix}, backend: local, {pool}}}\n{}", builder(args.build_seconds));
    let master = MasterProcess::start(&database, dir.path(), &body, min_workers).await;
    let client = reqwest::Client::new();
    let started = Instant::now();
    for _ in 0..args.builds {
        force(&client, &master.base).await;
    }
    let deadline = started + Duration::from_secs(600);
    let mut full = None;
    while pending(&client, &master.base).await > 0 {
        assert!(Instant::now() < deadline, "the burst did not finish");
        if full.is_none() && workers(prefix).len() >= args.max as usize {
            full = Some(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    master.stop().await;
    (elapsed, full.unwrap_or(f64::NAN))
}

/// Request queued (the force call sent) → PATCH of the scale subresource received by the API.
async fn kubernetes_reaction(args: &Args) {
    let dir = tempfile::tempdir().unwrap();
    let database = bench_database(&args.database, dir.path()).await;
    let fake = FakeKube::new("ci", "workers", 0);
    let pools = format!(
        "pools:\n  - {{name: k8s, backend: kubernetes, kubernetes: {{namespace: ci, deployment: workers}}, min: 0, max: {}, scale_down_delay: 600}}\n{}",
        args.reactions + 1,
        builder(0.0)
    );
    let text = config_text(&database, dir.path(), &pools);
    let config = Config::parse("bench.yaml", &text).unwrap();
    let master = TestMaster::start_with_options(config, dir.path(), Options { kube_client: Some(fake.client()) }).await;
    let client = reqwest::Client::new();
    let base = format!("http://{}", master.http);
    let scale_patches = || fake.patches().into_iter().filter(|c| c.path.ends_with("/scale")).collect::<Vec<_>>();
    let mut reactions = Vec::new();
    for i in 0..args.reactions {
        // No workers: every request stays queued and raises the wanted replicas by one.
        let sent = Instant::now();
        force(&client, &base).await;
        let deadline = sent + Duration::from_secs(30);
        let patch = loop {
            if let Some(patch) = scale_patches().into_iter().find(|c| c.body["spec"]["replicas"] == i + 1) {
                break patch;
            }
            assert!(Instant::now() < deadline, "no scale call for request {}", i + 1);
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        reactions.push(patch.at.duration_since(sent).as_secs_f64() * 1000.0);
    }
    master.stop().await;
    reactions.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "request queued → Deployment scale PATCH   p50 {:>6.1} ms   p99 {:>6.1} ms   (n={}, kubernetes backend, mock API)",
        percentile(&reactions, 50.0),
        percentile(&reactions, 99.0),
        reactions.len()
    );
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    kubernetes_reaction(&args).await;
    if args.kubernetes_only {
        return;
    }
    println!(
        "Kiln autoscaling benchmark: local pool, {} ({} CPUs)",
        args.database,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // Reaction: from an empty pool, a request → a worker process.
    let dir = tempfile::tempdir().unwrap();
    let database = bench_database(&args.database, dir.path()).await;
    let prefix = "react";
    let body = format!(
        "pools:\n  - {{name: {prefix}, backend: local, min: 0, max: 1, scale_down_delay: 0}}\n{}",
        builder(0.0)
    );
    let master = MasterProcess::start(&database, dir.path(), &body, 0).await;
    let client = reqwest::Client::new();
    let mut reactions = Vec::new();
    for _ in 0..args.reactions {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !workers(prefix).is_empty() {
            assert!(Instant::now() < deadline, "the pool did not drain");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let sent = Instant::now();
        force(&client, &master.base).await;
        loop {
            if !workers(prefix).is_empty() {
                reactions.push(sent.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            assert!(sent.elapsed() < Duration::from_secs(30), "no worker started");
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        while pending(&client, &master.base).await > 0 {
            assert!(sent.elapsed() < Duration::from_secs(60), "the build did not finish");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    master.stop().await;
    reactions.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "request queued → worker process started   p50 {:>6.1} ms   p99 {:>6.1} ms   (n={})",
        percentile(&reactions, 50.0),
        percentile(&reactions, 99.0),
        reactions.len()
    );

    let (scaled, full) = burst(&args, &format!("min: 1, max: {}, scale_down_delay: 30", args.max), "scaled", 1).await;
    let (fixed, _) = burst(&args, &format!("count: {}", args.max), "fixed", u64::from(args.max)).await;
    println!(
        "{} builds of {:.1} s, max {}: autoscaled from 1 {:.2} s (all {} workers up after {:.2} s), fixed pool of {} {:.2} s",
        args.builds, args.build_seconds, args.max, scaled, args.max, full, args.max, fixed
    );
}
