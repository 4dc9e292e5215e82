//! Dispatch benchmark: the real `kiln-master` (release build) with K local workers runs N one-step
//! `true` builds forced through the REST API, and reports throughput, dispatch latency (request
//! submitted → build started) for a burst and for single requests with idle workers, and the
//! master's peak RSS.
//!
//! ```sh
//! cargo build --release --bins && cargo bench -p kiln-tests --bench dispatch -- --builds 1000 --workers 8 --database sqlite
//! ```
//!
//! `--static-workers` starts K `kiln-worker` processes of their own, `--buildbot-workers` K of
//! Buildbot's `buildbot-worker` instead (installed by `scripts/prerequisites`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use kiln_tests::process::{MasterProcess, bench_database, completed, force, percentile, timings, wait_completed};

#[derive(Debug, Parser)]
struct Args {
    /// Builds in the burst.
    #[arg(long, default_value_t = 1000)]
    builds: usize,
    /// Local workers.
    #[arg(long, default_value_t = 8)]
    workers: u32,
    /// `sqlite` or `postgres` (a throwaway cluster with default, durable settings).
    #[arg(long, default_value = "sqlite")]
    database: String,
    /// Single requests sent one at a time to idle workers.
    #[arg(long, default_value_t = 50)]
    singles: usize,
    /// Concurrent HTTP clients submitting the burst.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Workers connect over TLS (a throwaway CA) as K separate `kiln-worker` processes instead of
    /// a local pool; run without it with `--static-workers` for the plain-text comparison.
    #[arg(long)]
    tls: bool,
    /// K separate `kiln-worker` processes in plain text, as `--tls` starts them.
    #[arg(long)]
    static_workers: bool,
    /// K of Buildbot's own `buildbot-worker` processes (msgpack) instead of kiln-workers.
    #[arg(long)]
    buildbot_workers: bool,
    // `cargo bench` passes `--bench`; accept and ignore it.
    #[arg(long, hide = true)]
    bench: bool,
}

fn stats(label: &str, latencies: &mut [f64]) -> (f64, f64) {
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (p50, p99) = (percentile(latencies, 50.0), percentile(latencies, 99.0));
    println!("{label:<40} p50 {p50:>7.1} ms   p99 {p99:>7.1} ms   (n={})", latencies.len());
    (p50, p99)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir().unwrap();
    let database = bench_database(&args.database, dir.path()).await;
    const BUILDER: &str = "collapseRequests: false\nbuilders:\n  - name: quick\n    steps:\n      - shell: {name: run, command: [\"true\"]}\nschedulers:\n  - {type: force, name: force, builderNames: [quick]}\n";
    let (http, grpc) = (kiln_tests::free_port(), kiln_tests::free_port());
    let mut workers = Vec::new();
    let mut buildbot = Vec::new();
    let body = if args.buildbot_workers {
        for i in 0..args.workers {
            let (parent, address) = (dir.path().join("bb"), format!("127.0.0.1:{grpc}"));
            buildbot.push(kiln_tests::buildbot::BuildbotWorker::start(
                &parent,
                &address,
                &format!("bb{i}"),
                "bench-pass",
                "msgpack_experimental_v7",
            ));
        }
        format!("  buildbot: [{{name_prefix: bb, password: bench-pass}}]\n{BUILDER}")
    } else if args.tls || args.static_workers {
        let (url, mut env, tls) = if args.tls {
            let ca = kiln_tests::tls::Ca::new("bench CA");
            let (cert, key, _) = ca.issue(dir.path(), "master");
            let ca_file = ca.write(dir.path(), "ca.pem").display().to_string();
            let tls = format!("  tls: {{cert: \"{}\", key: \"{}\"}}\n", cert.display(), key.display());
            (format!("https://localhost:{grpc}"), vec![("KILN_MASTER_CA", ca_file)], tls)
        } else {
            (format!("http://127.0.0.1:{grpc}"), Vec::new(), String::new())
        };
        env.push(("KILN_LOG", "warn".to_owned()));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        for i in 0..args.workers {
            let name = format!("w{i}");
            workers.push(kiln_tests::system::spawn_worker_env(&url, &name, "bench-token", dir.path(), &env));
        }
        format!("{tls}  tokens: [{{name: bench, value: bench-token}}]\n{BUILDER}")
    } else {
        format!("pools:\n  - {{name: local, backend: local, count: {}}}\n{BUILDER}", args.workers)
    };
    let master = MasterProcess::start_on(&database, dir.path(), &body, u64::from(args.workers), http, grpc).await;
    let base = master.base.clone();
    let client = reqwest::Client::new();
    println!(
        "Kiln dispatch benchmark: {} builds, {} workers ({}), {} ({} CPUs)",
        args.builds,
        args.workers,
        if args.buildbot_workers {
            "buildbot-worker 4.3.0, msgpack"
        } else if args.tls {
            "TLS"
        } else if args.static_workers {
            "plain text"
        } else {
            "local pool"
        },
        args.database,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // Single requests with idle workers.
    for _ in 0..args.singles {
        let before = completed(&client, &base).await;
        force(&client, &base).await;
        wait_completed(&client, &base, before + 1, Duration::from_secs(30), Duration::from_millis(2)).await;
    }
    let singles = timings(&database, 0).await;
    let mut single_latency: Vec<f64> = singles.iter().map(|(s, b, _)| (b - s) as f64).collect();
    let last_single = singles.len() as i64;

    // The burst: N requests submitted as fast as `clients` connections allow.
    let cpu_before = master.cpu_seconds();
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut submitters = Vec::new();
    for _ in 0..args.clients {
        let (client, url, next, total) = (client.clone(), base.clone(), Arc::clone(&next), args.builds);
        submitters.push(tokio::spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < total {
                force(&client, &url).await;
            }
        }));
    }
    for s in submitters {
        s.await.unwrap();
    }
    let submitted_in = started.elapsed();
    wait_completed(
        &client,
        &base,
        last_single + args.builds as i64,
        Duration::from_secs(600),
        Duration::from_millis(50),
    )
    .await;
    let burst = timings(&database, last_single).await;
    let first_submit = burst.iter().map(|t| t.0).min().unwrap();
    let last_complete = burst.iter().map(|t| t.2).max().unwrap();
    let mut burst_latency: Vec<f64> = burst.iter().map(|(s, b, _)| (b - s) as f64).collect();
    let rss = master.peak_rss_mib();
    let cpu_per_build = (master.cpu_seconds() - cpu_before) / args.builds as f64;

    println!(
        "burst submitted in                       {:.2} s ({:.0} requests/s)",
        submitted_in.as_secs_f64(),
        args.builds as f64 / submitted_in.as_secs_f64()
    );
    println!(
        "throughput                               {:.0} builds/s (first submit → last complete {:.2} s)",
        burst.len() as f64 / ((last_complete - first_submit) as f64 / 1000.0),
        (last_complete - first_submit) as f64 / 1000.0
    );
    stats("dispatch latency, burst", &mut burst_latency);
    stats("dispatch latency, single, idle workers", &mut single_latency);
    println!("master CPU per build, burst              {:.2} ms", cpu_per_build * 1000.0);
    println!("master peak RSS                          {rss:.1} MiB");
    master.stop().await;
}
