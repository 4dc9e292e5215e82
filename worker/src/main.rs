//! `kiln-worker`: parses flags and serves a master until told to stop. The first SIGTERM drains
//! (no new work, finish the running build, exit); a second one, or SIGINT, stops at once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use kiln_worker::{WorkerConfig, WorkerError};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

/// Kiln's build worker.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The master's gRPC address.
    #[arg(long, env = "KILN_MASTER", default_value = "http://127.0.0.1:9989")]
    master: String,
    /// The CA certificate file (PEM) that an `https://` master's certificate must chain to.
    #[arg(long, env = "KILN_MASTER_CA")]
    master_ca: Option<PathBuf>,
    /// This worker's name; on Kubernetes, the pod name.
    #[arg(long, env = "KILN_WORKER_NAME")]
    name: Option<String>,
    /// The token the master admits workers with (not needed with a client certificate).
    #[arg(long, env = "KILN_WORKER_TOKEN", hide_env_values = true, required_unless_present = "client_cert")]
    token: Option<String>,
    /// This worker's certificate (PEM), for a master that admits workers by certificate instead
    /// of token; it must carry the worker's name as a DNS name.
    #[arg(long, env = "KILN_WORKER_CERT", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// The private key (PEM) of `--client-cert`.
    #[arg(long, env = "KILN_WORKER_KEY", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Where builds run.
    #[arg(long, env = "KILN_WORKER_BASEDIR", default_value = "kiln-worker")]
    basedir: PathBuf,
    /// Where git mirrors and other shared caches live (a shared volume on Kubernetes).
    #[arg(long, env = "KILN_WORKER_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Builds run at once.
    #[arg(long, env = "KILN_WORKER_MAX_BUILDS", default_value_t = 1)]
    max_builds: u32,
    /// Labels as key=value, repeatable.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// The pool this worker belongs to: it then runs only the builders the pool serves.
    #[arg(long, env = "KILN_POOL")]
    pool: Option<String>,
    /// Serve `/healthz`, `/readyz` and `/metrics` on this address (e.g. 0.0.0.0:8011).
    #[arg(long, env = "KILN_WORKER_HTTP_LISTEN")]
    http_listen: Option<std::net::SocketAddr>,
    /// Log format: `text` for people, `json` for log collectors.
    #[arg(long, env = "KILN_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected key=value, got {text:?}"))
}

/// The program that supervises each shell command: `kiln-supervise` beside this binary, which
/// starts in a fraction of the time this one takes; without it, this binary re-executed.
fn supervisor_program() -> Option<PathBuf> {
    let worker = std::env::current_exe().ok()?;
    let beside = worker.with_file_name("kiln-supervise");
    Some(if beside.is_file() { beside } else { worker })
}

fn main() -> ExitCode {
    // Without `kiln-supervise`, the worker re-executes itself as the supervisor of each command.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == kiln_worker::commands::supervise::ARG) {
        kiln_worker::commands::supervise::main(&argv[2..]);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
    runtime.block_on(serve())
}

async fn serve() -> ExitCode {
    let args = Args::parse();
    let filter = EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    match args.log_format {
        // Colour only for a person at a terminal: not in files, pipes or log collectors.
        LogFormat::Text => tracing_subscriber::fmt()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none())
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init(),
        LogFormat::Json => tracing_subscriber::fmt().json().with_writer(std::io::stderr).with_env_filter(filter).init(),
    }
    if let Some(addr) = args.http_listen {
        match kiln_worker::probes::bind(addr).await {
            Ok(listener) => {
                kiln_worker::probes::serve(listener);
            }
            Err(error) => {
                eprintln!("kiln-worker: {error}");
                return ExitCode::from(2);
            }
        }
    }
    let name = args.name.unwrap_or_else(|| {
        std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()))
            .unwrap_or_else(|| "worker".to_owned())
    });
    let basedir = std::path::absolute(&args.basedir).unwrap_or(args.basedir);
    let cache_dir =
        args.cache_dir.map(|c| std::path::absolute(&c).unwrap_or(c)).unwrap_or_else(|| basedir.join(".cache"));
    let read = |flag: &str, path: &Option<PathBuf>| match path {
        None => None,
        Some(path) => match std::fs::read(path) {
            Ok(pem) => Some(pem),
            Err(error) => {
                eprintln!("kiln-worker: {flag} {}: {error}", path.display());
                std::process::exit(2);
            }
        },
    };
    let master_ca = read("--master-ca", &args.master_ca);
    let identity = read("--client-cert", &args.client_cert).zip(read("--client-key", &args.client_key));
    let config = WorkerConfig {
        master_url: args.master,
        master_ca,
        identity,
        name,
        token: args.token,
        basedir,
        cache_dir,
        max_builds: args.max_builds.max(1),
        labels: args.labels.into_iter().collect::<BTreeMap<_, _>>(),
        pool: args.pool.filter(|p| !p.is_empty()),
        supervisor: supervisor_program(),
    };
    let (terminate_tx, terminate_rx) = watch::channel(false);
    let (kill_tx, kill_rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => { let _ = terminate_tx.send(true); }
            _ = int.recv() => { let _ = terminate_tx.send(true); let _ = kill_tx.send(true); return; }
        }
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = kill_tx.send(true);
    });
    match kiln_worker::run(config, terminate_rx, kill_rx).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error @ WorkerError::Unauthenticated(_)) | Err(error @ WorkerError::Refused(_)) => {
            eprintln!("kiln-worker: {error}");
            ExitCode::from(3)
        }
    }
}
