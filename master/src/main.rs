//! `kiln-master`: parses flags, loads the configuration, and runs the master until SIGINT or
//! SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use kiln_master::config::{Config, ControlAccess};
use kiln_master::plan::Plan;
use kiln_master::server::{self, Listeners};
use tracing_subscriber::EnvFilter;

/// Kiln's build master.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The YAML configuration file [default: config/quickstart.yaml, from the current directory].
    #[arg(long, short, env = "KILN_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides the configuration's database URL, e.g. `postgres://kiln@db/kiln`.
    #[arg(long, env = "KILN_DATABASE_URL", hide_env_values = true)]
    database: Option<String>,
    /// Only check the configuration and exit.
    #[arg(long)]
    check: bool,
    /// Log format: `text` for people, `json` for log collectors.
    #[arg(long, env = "KILN_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

/// The force scheduler and builder the banner shows: a builder that builds without a change
/// (no checkout of the change's repository), so the first build a newcomer forces can pass.
fn banner_force(config: &Config) -> Option<(String, String)> {
    use kiln_master::config::{SchedulerConfig, StepConfig};
    let needs_a_change = |name: &str| {
        config
            .builder(name)
            .is_none_or(|b| b.steps.iter().any(|s| matches!(s, StepConfig::Git(g) if g.repourl.is_none())))
    };
    let forces: Vec<_> = config
        .schedulers
        .iter()
        .filter_map(|s| match s {
            SchedulerConfig::Force(f) => Some(f),
            _ => None,
        })
        .collect();
    let standalone = forces.iter().find_map(|f| f.builder_names.iter().find(|b| !needs_a_change(b)).map(|b| (*f, b)));
    let (force, builder) =
        standalone.or_else(|| forces.first().and_then(|f| f.builder_names.first().map(|b| (*f, b))))?;
    Some((force.name.clone(), builder.clone()))
}

/// The configuration used without `--config`: the quickstart's, from a clone of Kiln.
const DEFAULT_CONFIG: &str = "config/quickstart.yaml";

fn default_config() -> Option<PathBuf> {
    let path = PathBuf::from(DEFAULT_CONFIG);
    path.exists().then_some(path)
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // Kiln logs every Kubernetes error it meets, once, with what it does next; the client's own
    // logs of the same errors show with KILN_LOG=debug.
    let filter =
        EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| EnvFilter::new("info,kube_client=off,kube_runtime=off"));
    match args.log_format {
        // Colour only for a person at a terminal: not in files, pipes or log collectors.
        LogFormat::Text => tracing_subscriber::fmt()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none())
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .init(),
        LogFormat::Json => tracing_subscriber::fmt().json().with_writer(std::io::stderr).with_env_filter(filter).init(),
    }
    let Some(config_path) = args.config.clone().or_else(default_config) else {
        let here = std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_else(|_| ".".into());
        eprintln!(
            "kiln-master: no configuration: looked for {DEFAULT_CONFIG} in {here}; pass --config FILE or set \
             KILN_CONFIG (run from a clone of Kiln to use its quickstart)"
        );
        return ExitCode::from(2);
    };
    let file = config_path.display().to_string();
    let config = Config::load(&config_path).and_then(|c| match args.database.clone() {
        Some(url) => c.with_database(&format!("{file} (--database)"), url),
        None => Ok(c),
    });
    // Compiled here too, so that `--check` accepts only what starts.
    let config = config.and_then(|c| match Plan::compile(&c) {
        Ok(_) => Ok(c),
        Err((key, reason)) => Err(c.error_at(&file, key, reason)),
    });
    let config = match config {
        Ok(config) => config,
        Err(error) => {
            eprintln!("kiln-master: invalid configuration: {error}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!("{}: configuration is valid", config_path.display());
        return ExitCode::SUCCESS;
    }
    let listeners = match Listeners::bind(&config).await {
        Ok(listeners) => listeners,
        Err(error) => {
            eprintln!("kiln-master: {}: {error}", config_path.display());
            return ExitCode::from(2);
        }
    };
    let http = config.http.listen;
    let grpc = config.workers.listen;
    let force = banner_force(&config);
    let scheme = if config.http.tls.is_some() { "https" } else { "http" };
    let credentials = match config.control_access() {
        ControlAccess::Open => Some(""),
        ControlAccess::Credentials { .. } => Some(" -H \"Authorization: Bearer $KILN_API_TOKEN\""),
        ControlAccess::Closed => None,
    };
    let result = server::run(config, listeners, shutdown_signal(), |master| {
        println!("Kiln master {:?} is running.", master.name);
        println!("  REST API:      {scheme}://{http}/api/v2/builds");
        println!("  workers (gRPC): {grpc}");
        println!(
            "  change hook:   (in a git repository) curl -d author=me -d branch=main -d repository=$PWD -d revision=$(git rev-parse HEAD) {scheme}://{http}/change_hook/base"
        );
        match (force, credentials) {
            (Some((force, builder)), Some(auth)) => {
                println!("  force a build: target/debug/kiln --url {scheme}://{http} force {builder} --follow");
                println!(
                    "            or: curl{auth} -H 'Content-Type: application/json' -d '{{\"jsonrpc\":\"2.0\",\"method\":\"force\",\"id\":1,\"params\":{{\"builderNames\":[\"{builder}\"]}}}}' {scheme}://{http}/api/v2/forceschedulers/{force}"
                )
            }
            (_, None) => println!("  control actions are closed: http.auth gives no credentials"),
            (None, Some(_)) => {}
        }
        println!("Press Ctrl-C to stop.");
    })
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kiln-master: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
