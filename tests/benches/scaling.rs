//! Autoscaling benchmark for the local pool (release build): how long from a request entering
//! the queue to the scale call — for the local backend, the new `kiln-worker` process appearing —
//! and how long a burst takes on an autoscaled pool against a fixed pool of the same maximum.
//!
//! ```sh
//! cargo build --release --bins && cargo bench -p kiln-tests --bench scaling -- --database sqlite
//! ```

use std::collections::HashSet;
use std::time::{Duration, Instant};

use clap::Parser;
use kiln_tests::process::{MasterProcess, bench_database, force, percentile, requests_with};

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

/// Runs `count` builds at once on a pool and returns the seconds until all are done.
async fn burst(args: &Args, pool: &str, prefix: &str, min_workers: u64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let database = bench_database(&args.database, dir.path()).await;
    let body = format!("  local: {{{pool}, name_prefix: {prefix}}}\n{}", builder(args.build_seconds));
    let master = MasterProcess::start(&database, dir.path(), &body, min_workers).await;
    let client = reqwest::Client::new();
    let started = Instant::now();
    for _ in 0..args.builds {
        force(&client, &master.base).await;
    }
    let deadline = started + Duration::from_secs(600);
    while pending(&client, &master.base).await > 0 {
        assert!(Instant::now() < deadline, "the burst did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    master.stop().await;
    elapsed
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    println!(
        "Kiln autoscaling benchmark: local pool, {} ({} CPUs)",
        args.database,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // Reaction: from an empty pool, a request → a worker process.
    let dir = tempfile::tempdir().unwrap();
    let database = bench_database(&args.database, dir.path()).await;
    let prefix = "react";
    let body = format!("  local: {{min: 0, max: 1, scale_down_delay: 0, name_prefix: {prefix}}}\n{}", builder(0.0));
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

    let scaled = burst(&args, &format!("min: 1, max: {}, scale_down_delay: 30", args.max), "scaled", 1).await;
    let fixed = burst(&args, &format!("count: {}", args.max), "fixed", u64::from(args.max)).await;
    println!(
        "{} builds of {:.1} s, max {}: autoscaled from 1 {:.2} s, fixed pool of {} {:.2} s",
        args.builds, args.build_seconds, args.max, scaled, args.max, fixed
    );
}
