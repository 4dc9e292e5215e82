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
    /// Write an SVG plot of the autoscaled burst (pending requests, desired and busy workers).
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
    /// The scale-down delay of the autoscaled pool, in seconds.
    #[arg(long, default_value_t = 30.0)]
    plot_delay: f64,
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
async fn burst(args: &Args, pool: &str, prefix: &str, min_workers: u64, plot: bool) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let database = bench_database(&args.database, dir.path()).await;
    let body = format!("pools:\n  - {{name: {prefix}, backend: local, {pool}}}\n{}", builder(args.build_seconds));
    let master = MasterProcess::start(&database, dir.path(), &body, min_workers).await;
    let client = reqwest::Client::new();
    let started = Instant::now();
    let sampler = plot.then(|| tokio::spawn(sample(client.clone(), master.base.clone(), started)));
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
    if let (Some(sampler), Some(path)) = (sampler, &args.plot) {
        // Keep watching while the pool shrinks back after the delay.
        let samples = sampler.await.unwrap();
        std::fs::write(path, svg(&samples, args)).unwrap();
        println!("plot written to {}", path.display());
    }
    master.stop().await;
    (elapsed, full.unwrap_or(f64::NAN))
}

/// One reading of the pool: seconds since the burst began, pending, desired, workers, busy.
type Sample = (f64, f64, f64, f64, f64);

/// Reads the pool every 100 ms until it is back at its minimum after the burst (at most 120 s).
async fn sample(client: reqwest::Client, base: String, started: Instant) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut grew = false;
    while started.elapsed() < Duration::from_secs(120) {
        if let Ok(response) = client.get(format!("{base}/api/v2/pools")).send().await
            && let Ok(reply) = response.json::<serde_json::Value>().await
        {
            let pool = &reply["pools"][0];
            let value = |key: &str| pool[key].as_f64().unwrap_or(0.0);
            let reading =
                (started.elapsed().as_secs_f64(), value("pending"), value("desired"), value("workers"), value("busy"));
            grew |= reading.3 > value("min");
            let back = grew && reading.1 == 0.0 && reading.3 <= value("min");
            samples.push(reading);
            if back {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    samples
}

/// An SVG line chart of the samples.
fn svg(samples: &[Sample], args: &Args) -> String {
    let (width, height, left, right, top, bottom) = (860.0, 420.0, 60.0, 170.0, 40.0, 50.0);
    let t_max = samples.last().map_or(1.0, |s| s.0).max(1.0);
    let y_max = samples.iter().map(|s| s.1.max(s.2).max(s.3)).fold(1.0, f64::max).ceil();
    let x = |t: f64| left + t / t_max * (width - left - right);
    let y = |v: f64| height - bottom - v / y_max * (height - top - bottom);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{left}\" y=\"22\" font-size=\"15\">Kiln local pool: {} builds of {} s, max {} workers, scale-down delay {} s</text>\n",
        args.builds, args.build_seconds, args.max, args.plot_delay
    );
    for i in 0..=4 {
        let v = y_max * f64::from(i) / 4.0;
        out += &format!(
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v:.0}</text>\n",
            width - right,
            left - 6.0,
            y(v) + 4.0,
            y = y(v)
        );
    }
    for i in 0..=5 {
        let t = t_max * f64::from(i) / 5.0;
        out += &format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{t:.0} s</text>\n",
            x(t),
            height - bottom + 18.0
        );
    }
    type Series = (&'static str, &'static str, fn(&Sample) -> f64);
    let series: [Series; 4] = [
        ("pending requests", "#d62728", |s| s.1),
        ("desired workers", "#1f77b4", |s| s.2),
        ("workers", "#9467bd", |s| s.3),
        ("busy workers", "#2ca02c", |s| s.4),
    ];
    for (i, (name, color, value)) in series.iter().enumerate() {
        let points: Vec<String> = samples.iter().map(|s| format!("{:.1},{:.1}", x(s.0), y(value(s)))).collect();
        let dash = if i == 2 { " stroke-dasharray=\"5,4\"" } else { "" };
        out += &format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{dash} points=\"{}\"/>\n",
            points.join(" ")
        );
        let ly = top + 20.0 + 20.0 * i as f64;
        out += &format!(
            "<line x1=\"{}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"{dash}/><text x=\"{}\" y=\"{}\">{name}</text>\n",
            width - right + 12.0,
            width - right + 36.0,
            width - right + 42.0,
            ly + 4.0
        );
    }
    out += "</svg>\n";
    out
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
    let master = TestMaster::start_with_options(
        config,
        dir.path(),
        Options { kube_client: Some(fake.client()), ..Options::default() },
    )
    .await;
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
        // From an empty pool at rest: the scaler, which looks at most once per 25 ms while it is
        // busy (here, draining the last worker), has settled.
        tokio::time::sleep(Duration::from_millis(300)).await;
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

    let scaled_pool = format!("min: 1, max: {}, scale_down_delay: {}", args.max, args.plot_delay);
    let (scaled, full) = burst(&args, &scaled_pool, "scaled", 1, args.plot.is_some()).await;
    let (fixed, _) = burst(&args, &format!("count: {}", args.max), "fixed", u64::from(args.max), false).await;
    println!(
        "{} builds of {:.1} s, max {}: autoscaled from 1 {:.2} s (all {} workers up after {:.2} s), fixed pool of {} {:.2} s",
        args.builds, args.build_seconds, args.max, scaled, args.max, full, args.max, fixed
    );
}
