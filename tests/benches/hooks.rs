//! Change-hook benchmark: a burst of signed GitHub push deliveries against the real `kiln-master`
//! (release build). Each delivery is answered only after its change and the build request it
//! triggers are committed, so the round trip of a delivery is its hook-to-build-request latency.
//! Reports that latency (p50/p99) and the hooks' throughput.
//!
//! ```sh
//! cargo build --release --bins && cargo bench -p kiln-tests --bench hooks -- --pushes 1000 --database sqlite
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use clap::Parser;
use hmac::{Hmac, Mac};
use kiln_tests::process::{MasterProcess, bench_database, percentile};
use serde_json::json;

#[derive(Debug, Parser)]
struct Args {
    /// Deliveries in the burst.
    #[arg(long, default_value_t = 1000)]
    pushes: usize,
    /// Concurrent senders.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// `sqlite` or `postgres` (a throwaway cluster with default, durable settings).
    #[arg(long, default_value = "sqlite")]
    database: String,
    #[arg(long, hide = true)]
    bench: bool,
}

const SECRET: &str = "benchmark-secret";

/// A push of one commit on its own branch, so that no request collapses into another.
fn delivery(i: usize) -> Vec<u8> {
    json!({
        "ref": format!("refs/heads/topic-{i}"),
        "created": false,
        "deleted": false,
        "head_commit": { "id": format!("{i:040x}"), "message": "work" },
        "commits": [{
            "id": format!("{i:040x}"), "message": "work", "timestamp": "2026-11-20T09:15:00Z",
            "url": "https://github.com/o/r/commit/x", "distinct": true,
            "author": { "name": "Ada", "email": "ada@example.org" },
            "committer": { "name": "Ada", "email": "ada@example.org" },
            "added": ["src/lib.rs"], "modified": [], "removed": []
        }],
        "repository": { "html_url": "https://github.com/o/r", "full_name": "o/r" }
    })
    .to_string()
    .into_bytes()
}

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir().unwrap();
    let database = bench_database(&args.database, dir.path()).await;
    let body = format!(
        "change_hooks:\n  github: {{secret: {SECRET}}}\nbuilders:\n  - name: b\n    steps:\n      - shell: {{command: [\"true\"]}}\nschedulers:\n  - {{type: any_branch, name: all, builderNames: [b]}}\n"
    );
    let master = MasterProcess::start(&database, dir.path(), &body, 0).await;
    let url = format!("{}/change_hook/github", master.base);
    let client = reqwest::Client::new();
    let deliveries: Arc<Vec<(Vec<u8>, String)>> =
        Arc::new((0..args.pushes).map(delivery).map(|b| (b.clone(), sign(&b))).collect());
    println!(
        "Kiln change-hook benchmark: {} signed GitHub pushes, {} clients, {} ({} CPUs)",
        args.pushes,
        args.clients,
        args.database,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut senders = Vec::new();
    for _ in 0..args.clients {
        let (client, url, next, deliveries) = (client.clone(), url.clone(), Arc::clone(&next), Arc::clone(&deliveries));
        senders.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some((body, signature)) = deliveries.get(i) else { return latencies };
                let sent = Instant::now();
                let response = client
                    .post(&url)
                    .header("Content-Type", "application/json")
                    .header("X-GitHub-Event", "push")
                    .header("X-Hub-Signature-256", signature)
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200, "{}", response.text().await.unwrap_or_default());
                response.bytes().await.unwrap();
                latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
            }
        }));
    }
    let mut latencies = Vec::new();
    for sender in senders {
        latencies.extend(sender.await.unwrap());
    }
    let elapsed = started.elapsed();
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let requests: serde_json::Value =
        client.get(format!("{}/api/v2/buildrequests?limit=1", master.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(requests["meta"]["total"].as_u64(), Some(args.pushes as u64), "every push became a build request");
    println!(
        "throughput                               {:.0} pushes/s ({:.2} s)",
        args.pushes as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    println!(
        "hook → build request latency             p50 {:>6.1} ms   p99 {:>6.1} ms   max {:>6.1} ms",
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        latencies.last().copied().unwrap_or(f64::NAN)
    );
    println!("master peak RSS                          {:.1} MiB", master.peak_rss_mib());
    master.stop().await;
}
