//! Fixtures for Kiln's whole-system tests and benchmarks: a throwaway PostgreSQL cluster, git
//! repositories, masters on loopback ports and real `kiln-worker` processes.

pub mod browser;
pub mod buildbot;
pub mod forge;
pub mod kube;
pub mod ledger;
pub mod pg;
pub mod process;
pub mod repo;
pub mod system;
pub mod tls;
pub mod ws;

use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The directory holding the workspace's built binaries (`target/debug` or `target/release`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// A TCP port on 127.0.0.1 that nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// Path of a workspace binary; panics with the fix if it was not built.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(path.is_file(), "{} is missing: run `cargo build --bins` first (scripts/test does)", path.display());
    path
}

/// Polls `check` until it returns `Some`, at most until `limit`; panics with `what` otherwise.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        real_sleep(Duration::from_millis(25)).await;
    }
}

/// Where test clocks start: Sunday 2026-11-22 02:59:00 UTC, in milliseconds.
pub const CLOCK_START_MS: i64 = 1_795_316_340_000;

/// A master clock for [`with_paused_clock`] tests: it reads [`CLOCK_START_MS`] now and moves
/// only with tokio's clock. Give the same one to every master of a test (restarts included).
pub fn tokio_clock() -> kiln_master::clock::Clock {
    kiln_master::clock::Clock::following_tokio(CLOCK_START_MS)
}

/// Sleeps for `duration` of real time, also when tokio's clock is paused (on a blocking thread,
/// which keeps a paused clock from jumping ahead meanwhile).
pub async fn real_sleep(duration: Duration) {
    tokio::task::spawn_blocking(move || std::thread::sleep(duration)).await.expect("sleeping thread");
}

/// Runs `body` on a current-thread runtime whose clock starts paused and moves only when the test
/// calls `tokio::time::advance`: it never jumps ahead by itself, not even while the runtime waits
/// for a database. Whatever the master computes from its clock then happens at exactly the
/// virtual time the test chose. Waiting for the master to act takes real time: use
/// [`eventually`] or [`real_sleep`], never `tokio::time::sleep`. Panics if `body` has not
/// finished after `limit` of real time (a task waiting on a timer the test never advances).
pub fn with_paused_clock<F, Fut>(limit: Duration, body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a paused runtime");
        runtime.block_on(async {
            // A paused clock jumps to the next timer whenever the runtime idles, except while a
            // blocking task runs: this one runs until the body is done.
            let (release, held) = std::sync::mpsc::channel::<()>();
            let hold = tokio::task::spawn_blocking(move || {
                let _ = held.recv();
            });
            body().await;
            drop(release);
            hold.await.expect("clock holder");
        });
    });
    let deadline = Instant::now() + limit;
    while !thread.is_finished() {
        assert!(Instant::now() < deadline, "the paused-clock test did not finish within {limit:?} of real time");
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}
