//! Event stream benchmark: the real `kiln-master` (release build) with K local workers, first
//! without and then with C WebSocket clients subscribed to builds, steps and logs as Buildbot's
//! UI subscribes. It reports event latency (a build's completion committed → its `finished`
//! message read by each client), the master's CPU and resident memory under a paced load of R
//! builds per second with and without the clients, how long that load's builds take to start
//! and to complete with and without them, and burst dispatch throughput with and
//! without them: bursts alone and with the clients alternate, so that the machine's drift
//! between runs falls on both sides, and the medians are compared.
//!
//! ```sh
//! cargo build --release --bins && cargo bench -p kiln-tests --bench events -- --clients 200 --rate 100
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use kiln_tests::process::{
    MasterProcess, bench_database, completed, cpu_seconds_of, finished_builds, force, percentile, timings,
    wait_completed,
};
use kiln_tests::ws::EventClient;
use sqlx::Row;

#[derive(Debug, Parser)]
struct Args {
    /// WebSocket clients.
    #[arg(long, default_value_t = 200)]
    clients: usize,
    /// Builds per second of the paced load.
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Seconds of paced load, with and without the clients.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Builds in each burst (with and without the clients).
    #[arg(long, default_value_t = 1000)]
    builds: usize,
    /// Bursts alone and with the clients, alternating.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Local workers.
    #[arg(long, default_value_t = 8)]
    workers: u32,
    /// `sqlite` or `postgres`.
    #[arg(long, default_value = "sqlite")]
    database: String,
    // `cargo bench` passes `--bench`; accept and ignore it.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Concurrent HTTP clients submitting a burst.
const SUBMITTERS: usize = 16;

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// What one client read: every frame counted, and when each build's `finished` arrived.
#[derive(Default)]
struct Received {
    frames: u64,
    finished: Vec<(i64, i64)>,
    /// The master closed the connection (the client fell behind).
    closed: bool,
}

/// Reads one client until `stop` is set (checked between frames) or the connection ends, at most
/// `limit`; parses only the routing key, as a cheap client would.
async fn read(mut client: EventClient, stop: Arc<AtomicUsize>, limit: Duration) -> Received {
    let deadline = tokio::time::Instant::now() + limit;
    let mut got = Received::default();
    while stop.load(Ordering::Relaxed) == 0 && tokio::time::Instant::now() < deadline {
        let slice = (tokio::time::Instant::now() + Duration::from_millis(200)).min(deadline);
        let ended = client
            .read_frames(slice, |frame| {
                got.frames += 1;
                if let Some(rest) = frame.strip_prefix("{\"k\":\"builds/")
                    && let Some((id, event)) = rest.split_once('/')
                    && event.starts_with("finished\"")
                    && let Ok(id) = id.parse::<i64>()
                {
                    got.finished.push((id, now_ms()));
                }
                stop.load(Ordering::Relaxed) == 0
            })
            .await;
        if ended {
            got.closed = true;
            break;
        }
    }
    got
}

/// Submits `total` builds as fast as [`SUBMITTERS`] connections allow; returns builds per
/// second from first submission to last completion, the master's CPU per build and this
/// process's (the submitters' and the clients').
async fn burst(master: &MasterProcess, database: &str, total: usize) -> (f64, f64, f64) {
    let client = reqwest::Client::new();
    let before = completed(&client, &master.base).await;
    let last = last_id(database, "buildrequests").await;
    let (cpu_before, own_before) = (master.cpu_seconds(), cpu_seconds_of(std::process::id()));
    let next = Arc::new(AtomicUsize::new(0));
    let mut submitters = Vec::new();
    for _ in 0..SUBMITTERS {
        let (client, url, next) = (client.clone(), master.base.clone(), Arc::clone(&next));
        submitters.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::SeqCst) < total {
                force(&client, &url).await;
            }
        }));
    }
    for s in submitters {
        s.await.unwrap();
    }
    let done = before + total as i64;
    wait_completed(&client, &master.base, done, Duration::from_secs(600), Duration::from_millis(50)).await;
    let runs = timings(database, last).await;
    let first_submit = runs.iter().map(|t| t.0).min().unwrap();
    let last_complete = runs.iter().map(|t| t.2).max().unwrap();
    let cpu = (master.cpu_seconds() - cpu_before) / total as f64;
    let own = (cpu_seconds_of(std::process::id()) - own_before) / total as f64;
    (runs.len() as f64 / ((last_complete - first_submit) as f64 / 1000.0), cpu, own)
}

/// What a paced run measured: the master's CPU use (cores), and each build's dispatch (request
/// submitted → build started) and turnaround (submitted → request complete), sorted, in ms.
struct Paced {
    cores: f64,
    dispatch: Vec<f64>,
    turnaround: Vec<f64>,
}

/// Forces `rate` builds a second for `seconds`, each on its own task so that a slow answer
/// does not slow the pace.
async fn paced(master: &MasterProcess, database: &str, rate: u32, seconds: u32) -> Paced {
    let client = reqwest::Client::new();
    let before = completed(&client, &master.base).await;
    let last = last_id(database, "buildrequests").await;
    let total = u64::from(rate) * u64::from(seconds);
    let (cpu_before, started) = (master.cpu_seconds(), Instant::now());
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    let mut forces = Vec::new();
    for _ in 0..total {
        tick.tick().await;
        let (client, url) = (client.clone(), master.base.clone());
        forces.push(tokio::spawn(async move { force(&client, &url).await }));
    }
    for f in forces {
        f.await.unwrap();
    }
    let done = before + total as i64;
    wait_completed(&client, &master.base, done, Duration::from_secs(600), Duration::from_millis(20)).await;
    let cores = (master.cpu_seconds() - cpu_before) / started.elapsed().as_secs_f64();
    let runs = timings(database, last).await;
    let sorted = |pick: fn(&(i64, i64, i64)) -> i64| {
        let mut values: Vec<f64> = runs.iter().map(|r| pick(r) as f64).collect();
        values.sort_by(|a, b| a.partial_cmp(b).unwrap());
        values
    };
    Paced { cores, dispatch: sorted(|r| r.1 - r.0), turnaround: sorted(|r| r.2 - r.0) }
}

/// `p50 / p99` of sorted values, in ms.
fn spread(values: &[f64]) -> String {
    format!("p50 {:.0} / p99 {:.0} ms", percentile(values, 50.0), percentile(values, 99.0))
}

/// Connects `count` clients subscribed as Buildbot's UI subscribes, each read on its own task
/// until `stop` is set.
async fn connect_clients(
    http: std::net::SocketAddr,
    count: usize,
    stop: &Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<Received>> {
    let mut clients = Vec::new();
    for _ in 0..count {
        let mut client = EventClient::connect(http).await;
        for path in ["builds/*/*", "steps/*/*", "logs/*/*"] {
            client.subscribe(path).await;
        }
        clients.push(client);
    }
    let limit = Duration::from_secs(600);
    clients.into_iter().map(|c| tokio::spawn(read(c, Arc::clone(stop), limit))).collect()
}

/// The master's count of connected event stream clients, a second after they disconnect (NaN
/// when its metrics do not say).
async fn connected_clients(base: &str) -> f64 {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let text = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix("kiln_websocket_clients "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    percentile(&sorted, 50.0)
}

/// The highest id in `table` (`builds` or `buildrequests`), 0 when it is empty.
async fn last_id(database: &str, table: &str) -> i64 {
    let statement = match table {
        "builds" => "SELECT COALESCE(MAX(id), 0) FROM builds",
        "buildrequests" => "SELECT COALESCE(MAX(id), 0) FROM buildrequests",
        other => panic!("no table {other}"),
    };
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(database).await.unwrap();
    let row = sqlx::query(statement).fetch_one(&pool).await.unwrap();
    pool.close().await;
    row.get::<i64, _>(0)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir().unwrap();
    let database = bench_database(&args.database, dir.path()).await;
    let body = format!(
        "pools:\n  - {{name: local, backend: local, count: {}}}\ncollapseRequests: false\nbuilders:\n  - name: quick\n    steps:\n      - shell: {{name: run, command: [\"echo\", \"one line\"]}}\nschedulers:\n  - {{type: force, name: force, builderNames: [quick]}}\n",
        args.workers
    );
    let master = MasterProcess::start(&database, dir.path(), &body, u64::from(args.workers)).await;
    let http: std::net::SocketAddr = master.base.trim_start_matches("http://").parse().unwrap();
    println!(
        "Kiln event stream benchmark: {} clients, {} builds/s for {} s, bursts of {}, {} local workers, {} ({} CPUs)",
        args.clients,
        args.rate,
        args.seconds,
        args.builds,
        args.workers,
        args.database,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let alone_paced = paced(&master, &database, args.rate, args.seconds).await;
    let rss_alone = master.rss_mib();

    let stop = Arc::new(AtomicUsize::new(0));
    let readers = connect_clients(http, args.clients, &stop).await;
    let builds_before = last_id(&database, "builds").await;
    let with_paced = paced(&master, &database, args.rate, args.seconds).await;
    let rss_with = master.rss_mib();
    let paced_builds: std::collections::HashMap<i64, i64> =
        finished_builds(&database, builds_before).await.into_iter().map(|(id, _, done)| (id, done)).collect();
    // The last `finished` messages are on their way when the requests read as complete.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(1, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let (mut frames, mut closed, mut missing) = (0u64, 0usize, 0usize);
    for reader in readers {
        let got = reader.await.unwrap();
        frames += got.frames;
        closed += usize::from(got.closed);
        let seen: std::collections::HashSet<i64> = got.finished.iter().map(|(id, _)| *id).collect();
        missing += paced_builds.keys().filter(|id| !seen.contains(id)).count();
        latencies
            .extend(got.finished.iter().filter_map(|(id, at)| paced_builds.get(id).map(|done| (at - done) as f64)));
    }
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());

    // Bursts, alone and with a fresh set of clients, alternating.
    let (mut alone, mut with) = (Vec::new(), Vec::new());
    let mut burst_closed = 0usize;
    // Connections the master still counts once a round's clients have gone.
    let mut lingering = Vec::new();
    for _ in 0..args.rounds {
        alone.push(burst(&master, &database, args.builds).await);
        let stop = Arc::new(AtomicUsize::new(0));
        let readers = connect_clients(http, args.clients, &stop).await;
        with.push(burst(&master, &database, args.builds).await);
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(1, Ordering::Relaxed);
        for reader in readers {
            let got = reader.await.unwrap();
            frames += got.frames;
            burst_closed += usize::from(got.closed);
        }
        lingering.push(connected_clients(&master.base).await);
    }
    let rss_burst_with = master.rss_mib();
    let column = |runs: &[(f64, f64, f64)], pick: fn(&(f64, f64, f64)) -> f64, scale: f64| {
        let values: Vec<f64> = runs.iter().map(|r| pick(r) * scale).collect();
        let listed = values.iter().map(|v| format!("{v:.2}")).collect::<Vec<_>>().join(", ");
        (median(&values), listed)
    };
    let (throughput_alone, each_alone) = column(&alone, |r| r.0, 1.0);
    let (throughput_with, each_with) = column(&with, |r| r.0, 1.0);
    let (cpu_alone, cpu_each_alone) = column(&alone, |r| r.1, 1000.0);
    let (cpu_with, cpu_each_with) = column(&with, |r| r.1, 1000.0);
    let (own_alone, _) = column(&alone, |r| r.2, 1000.0);
    let (own_with, _) = column(&with, |r| r.2, 1000.0);

    println!(
        "event latency, commit → client ({} builds × {} clients)   p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms",
        paced_builds.len(),
        args.clients,
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        latencies.last().copied().unwrap_or(f64::NAN)
    );
    println!("messages read by the clients             {frames}");
    println!(
        "clients closed by the master             {closed} (paced), {burst_closed} (bursts)   finished messages missing {missing}"
    );
    println!("connections the master still held a second after each round's clients left   {lingering:?}");
    println!(
        "master CPU at {} builds/s                 {:.2} cores alone, {:.2} cores with the clients",
        args.rate, alone_paced.cores, with_paced.cores
    );
    println!(
        "at {} builds/s, submitted → started      {} alone, {} with the clients",
        args.rate,
        spread(&alone_paced.dispatch),
        spread(&with_paced.dispatch)
    );
    println!(
        "at {} builds/s, submitted → complete     {} alone, {} with the clients",
        args.rate,
        spread(&alone_paced.turnaround),
        spread(&with_paced.turnaround)
    );
    println!(
        "master RSS                               {rss_alone:.1} MiB alone, {rss_with:.1} MiB with the clients (paced), {rss_burst_with:.1} MiB after the bursts"
    );
    println!(
        "burst throughput, median of {}           {throughput_alone:.0} builds/s alone, {throughput_with:.0} builds/s with the clients ({:+.1} %)",
        args.rounds,
        (throughput_with / throughput_alone - 1.0) * 100.0
    );
    println!("  each burst, builds/s                   alone {each_alone}; with the clients {each_with}");
    println!(
        "master CPU per build, burst (median)     {cpu_alone:.2} ms alone, {cpu_with:.2} ms with the clients (each: {cpu_each_alone}; {cpu_each_with})"
    );
    println!(
        "benchmark's own CPU per build, burst     {own_alone:.2} ms alone, {own_with:.2} ms with the clients (on the same cores)"
    );
    master.stop().await;
}
