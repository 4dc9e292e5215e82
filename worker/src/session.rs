//! The worker's side of the contract in `kiln.proto`: connect (and reconnect with backoff),
//! register, run the master's commands, heartbeat, and drain on SIGTERM. The only module that
//! knows the wire types.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use kiln_proto as pb;
use kiln_proto::master_message::Body as In;
use kiln_proto::worker_message::Body as Out;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tracing::{error, info, warn};

use crate::commands::{self, Reporter, ShellArgs, Stream, Update};
use crate::git::{self, GitArgs};

/// What a worker needs to know to serve a master.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The master's gRPC address, e.g. `http://127.0.0.1:9989`, or `https://…` for TLS.
    pub master_url: String,
    /// The CA certificates (PEM) a TLS master's certificate must chain to.
    pub master_ca: Option<Vec<u8>>,
    /// This worker's certificate and key (PEM), for a master that admits workers by certificate.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    pub name: String,
    /// The token the master admits workers with; none when a certificate does.
    pub token: Option<String>,
    pub basedir: PathBuf,
    pub cache_dir: PathBuf,
    pub max_builds: u32,
    pub labels: BTreeMap<String, String>,
    /// The pool this worker belongs to, if any.
    pub pool: Option<String>,
    /// The `kiln-worker` binary that supervises shell commands (see
    /// [`crate::commands::supervise`]); `None` runs them unsupervised.
    pub supervisor: Option<PathBuf>,
}

/// Why the worker stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the master refused the worker's credentials: {0}")]
    Unauthenticated(String),
    #[error("the master refused the registration: {0}")]
    Refused(String),
}

/// The commands this worker implements.
pub const COMMANDS: &[&str] =
    &["shell", "git", "mkdir", "rmdir", "stat", "glob", "listdir", "upload_file", "download_file"];

/// How often a worker that cannot write its directories looks again.
const UNWRITABLE_RECHECK: Duration = Duration::from_secs(2);

/// How a session ended.
enum SessionEnd {
    /// The master asked the worker to exit.
    Shutdown,
    /// The connection was lost; try again.
    Lost(String),
    /// The worker was draining and has nothing left to do.
    Drained,
}

/// Serves the master until told to shut down. `terminate` turns true on the first SIGTERM (drain)
/// and `kill` on a second one (stop now).
pub async fn run(
    config: WorkerConfig,
    mut terminate: watch::Receiver<bool>,
    kill: watch::Receiver<bool>,
) -> Result<(), WorkerError> {
    // A worker that cannot write its directories would fail every build: it stays not ready,
    // and unregistered, until it can.
    loop {
        let unwritable =
            [&config.basedir, &config.cache_dir].into_iter().find_map(|dir| crate::dirs::check_writable(dir).err());
        crate::probes::unusable(unwritable.clone());
        let Some(reason) = unwritable else { break };
        error!(%reason, "cannot work; looking again in {:?}", UNWRITABLE_RECHECK);
        tokio::select! {
            _ = tokio::time::sleep(UNWRITABLE_RECHECK) => {}
            _ = terminate.changed() => return Ok(()),
        }
    }
    let mut backoff = Duration::from_millis(100);
    loop {
        if *terminate.borrow() {
            info!("terminating while disconnected");
            return Ok(());
        }
        match session(&config, terminate.clone(), kill.clone()).await {
            Ok(SessionEnd::Shutdown) => {
                info!("master asked the worker to shut down");
                return Ok(());
            }
            Ok(SessionEnd::Drained) => {
                info!("drained; exiting");
                return Ok(());
            }
            Ok(SessionEnd::Lost(reason)) => {
                warn!(%reason, "session lost; reconnecting");
                backoff = Duration::from_millis(100);
            }
            Err(SessionFailure::Fatal(error)) => return Err(error),
            Err(SessionFailure::Retry(reason)) => {
                warn!(%reason, retry_in = ?backoff, "cannot connect to the master")
            }
        }
        let jitter = Duration::from_millis(rand_jitter(backoff.as_millis() as u64 / 4 + 1));
        tokio::select! {
            _ = tokio::time::sleep(backoff + jitter) => {}
            _ = terminate.changed() => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(15));
    }
}

/// An error with its causes, outermost first: a transport error's own text says only "transport
/// error", while its cause says, for example, that the master's certificate is not trusted.
fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn rand_jitter(max: u64) -> u64 {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    u64::from(nanos) % max.max(1)
}

enum SessionFailure {
    Fatal(WorkerError),
    Retry(String),
}

/// A command running in this session.
struct Running {
    interrupt: watch::Sender<bool>,
    cancelled: Arc<AtomicBool>,
    /// Where file chunks for a `download_file` go.
    chunks: Option<mpsc::Sender<(Vec<u8>, bool)>>,
}

async fn session(
    config: &WorkerConfig,
    mut terminate: watch::Receiver<bool>,
    mut kill: watch::Receiver<bool>,
) -> Result<SessionEnd, SessionFailure> {
    let endpoint = tonic::transport::Endpoint::from_shared(config.master_url.clone())
        .map_err(|e| SessionFailure::Fatal(WorkerError::Refused(format!("bad master URL: {e}"))))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20));
    let endpoint = if config.master_url.starts_with("https://") {
        let Some(ca) = &config.master_ca else {
            return Err(SessionFailure::Fatal(WorkerError::Refused(
                "an https:// master needs the CA its certificate is signed by (--master-ca or KILN_MASTER_CA)".into(),
            )));
        };
        let mut tls =
            tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca));
        if let Some((cert, key)) = &config.identity {
            tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        endpoint.tls_config(tls).map_err(|e| SessionFailure::Fatal(WorkerError::Refused(causes(&e))))?
    } else {
        endpoint
    };
    let channel = endpoint.connect().await.map_err(|e| SessionFailure::Retry(causes(&e)))?;
    let mut client = pb::worker_service_client::WorkerServiceClient::new(channel);

    let (out_tx, out_rx) = mpsc::channel::<pb::WorkerMessage>(64);
    let register = pb::Register {
        name: config.name.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        max_builds: config.max_builds,
        labels: config.labels.clone().into_iter().collect(),
        commands: COMMANDS.iter().map(|c| c.to_string()).collect(),
        basedir: config.basedir.display().to_string(),
        host: std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_default(),
        pool: config.pool.clone().unwrap_or_default(),
    };
    out_tx.send(pb::WorkerMessage { body: Some(Out::Register(register)) }).await.expect("fresh channel");
    let mut request = tonic::Request::new(ReceiverStream::new(out_rx));
    if let Some(token) = &config.token {
        let bearer: MetadataValue<_> = format!("Bearer {token}")
            .parse()
            .map_err(|_| SessionFailure::Fatal(WorkerError::Refused("the token is not valid header text".into())))?;
        request.metadata_mut().insert(kiln_proto::AUTHORIZATION, bearer);
    }
    let mut inbound = match client.session(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return Err(classify(status)),
    };
    let registered = match inbound.message().await {
        Ok(Some(pb::MasterMessage { body: Some(In::Registered(r)) })) => r,
        Ok(_) => {
            return Err(SessionFailure::Retry("the master did not confirm the registration".into()));
        }
        Err(status) => return Err(classify(status)),
    };
    let heartbeat = Duration::from_millis(u64::from(registered.heartbeat_interval_ms.max(100)));
    info!(master = %registered.master_name, worker_id = registered.worker_id, "registered with the master");
    crate::probes::connected(true);

    let mut running: HashMap<String, Running> = HashMap::new();
    let mut tasks: JoinSet<String> = JoinSet::new();
    // Set when the session ends: commands killed because of that report nothing more, so the
    // master sees their builds as lost (RETRY), not as failed commands.
    let cut_off = Arc::new(AtomicBool::new(false));
    let mut draining = *terminate.borrow();
    crate::probes::draining(draining);
    if draining {
        let _ = out_tx.send(pb::WorkerMessage { body: Some(Out::Draining(pb::Draining {})) }).await;
    }
    // Fed every heartbeat while the master is heard from; the supervisors of this session's
    // commands kill them when it stops (a frozen worker) or is dropped (the session ended).
    let (lifeline, lifeline_rx) = watch::channel(0u64);
    let supervision = config.supervisor.clone().map(|program| commands::Supervision {
        program,
        watchdog: watchdog(heartbeat),
        lifeline: lifeline_rx,
    });
    let mut beat = tokio::time::interval(heartbeat);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sequence = 0u64;
    let mut last_heard = tokio::time::Instant::now();
    let end = loop {
        tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(message)) => {
                    last_heard = tokio::time::Instant::now();
                    match message.body {
                        Some(In::Start(start)) => {
                            let id = start.command_id.clone();
                            match spawn_command(config, start, out_tx.clone(), Arc::clone(&cut_off), supervision.clone(), &mut tasks) {
                                Ok(handle) => { running.insert(id, handle); }
                                Err(reason) => {
                                    let complete = pb::CommandComplete { command_id: id, error: reason };
                                    let _ = out_tx.send(pb::WorkerMessage { body: Some(Out::Complete(complete)) }).await;
                                }
                            }
                        }
                        Some(In::Interrupt(interrupt)) => {
                            if let Some(command) = running.get(&interrupt.command_id) {
                                info!(command = %interrupt.command_id, reason = %interrupt.reason, "interrupting");
                                command.cancelled.store(true, std::sync::atomic::Ordering::SeqCst);
                                let _ = command.interrupt.send(true);
                            }
                        }
                        Some(In::FileChunk(chunk)) => {
                            if let Some(tx) = running.get(&chunk.command_id).and_then(|c| c.chunks.clone()) {
                                let _ = tx.send((chunk.data, chunk.last)).await;
                            }
                        }
                        Some(In::Drain(_)) => {
                            draining = true;
                            crate::probes::draining(true);
                        }
                        Some(In::Shutdown(shutdown)) => {
                            info!(reason = %shutdown.reason, "shutdown requested");
                            break SessionEnd::Shutdown;
                        }
                        Some(In::Heartbeat(_)) | Some(In::Registered(_)) | None => {}
                    }
                }
                Ok(None) => break SessionEnd::Lost("the master closed the session".into()),
                Err(status) => break SessionEnd::Lost(status.to_string()),
            },
            Some(finished) = tasks.join_next() => {
                if let Ok(id) = finished {
                    running.remove(&id);
                }
            }
            _ = beat.tick() => {
                if last_heard.elapsed() > heartbeat * 3 {
                    break SessionEnd::Lost("the master went silent".into());
                }
                lifeline.send_modify(|n| *n = n.wrapping_add(1));
                sequence += 1;
                let _ = out_tx.send(pb::WorkerMessage { body: Some(Out::Heartbeat(pb::Heartbeat { sequence })) }).await;
            }
            changed = terminate.changed(), if !draining => {
                if changed.is_ok() && *terminate.borrow() {
                    info!(running = running.len(), "SIGTERM: taking no new work, finishing the running build");
                    draining = true;
                    crate::probes::draining(true);
                    let _ = out_tx.send(pb::WorkerMessage { body: Some(Out::Draining(pb::Draining {})) }).await;
                }
            }
            changed = kill.changed() => {
                if changed.is_ok() && *kill.borrow() {
                    break SessionEnd::Lost("killed".into());
                }
            }
        }
    };
    // Whatever ended the session, no command of it may outlive it: the master is re-running (or
    // has finished) its builds elsewhere.
    crate::probes::connected(false);
    // Cut off first: dropping the lifeline makes the supervisors kill the commands, and a killed
    // command's exit status must not reach the master as a result (a FAILURE instead of RETRY).
    cut_off.store(true, std::sync::atomic::Ordering::SeqCst);
    drop(lifeline);
    drop(supervision);
    for command in running.values() {
        command.cancelled.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = command.interrupt.send(true);
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), async { while tasks.join_next().await.is_some() {} }).await;
    Ok(match end {
        SessionEnd::Lost(_) if draining || *kill.borrow() => SessionEnd::Drained,
        other => other,
    })
}

/// How long a supervisor lets a command run without a feed: three heartbeats, at least three
/// seconds (a loaded machine may delay a tick). The master waits longer than this before it
/// re-runs a lost worker's build (`Master::orphan_deadline`).
pub fn watchdog(heartbeat: Duration) -> Duration {
    (heartbeat * 3).max(Duration::from_secs(3))
}

fn classify(status: tonic::Status) -> SessionFailure {
    match status.code() {
        Code::Unauthenticated => SessionFailure::Fatal(WorkerError::Unauthenticated(status.message().to_owned())),
        Code::InvalidArgument | Code::PermissionDenied => {
            SessionFailure::Fatal(WorkerError::Refused(status.message().to_owned()))
        }
        _ => SessionFailure::Retry(format!("{}: {}", status.code(), status.message())),
    }
}

fn encode_update(update: Update) -> pb::command_update::Body {
    use pb::command_update::Body as U;
    match update {
        Update::Output(stream, data) => {
            let stream = match stream {
                Stream::Stdout => pb::OutputStream::Stdout,
                Stream::Stderr => pb::OutputStream::Stderr,
                Stream::Header => pb::OutputStream::Header,
            };
            U::Output(pb::Output { stream: stream as i32, data })
        }
        Update::Rc(rc) => U::Rc(rc),
        Update::Elapsed(e) => U::Elapsed(e),
        Update::Files(paths) => U::Files(pb::FileList { paths }),
        Update::Stat(s) => {
            U::Stat(pb::StatResult { exists: s.exists, is_dir: s.is_dir, size: s.size, mode: s.mode, mtime: s.mtime })
        }
        Update::Property(name, value) => U::Property(pb::Property { name, value_json: value.to_string() }),
        Update::FileData(data) => U::FileData(data),
        Update::FailureReason(reason) => U::FailureReason(reason),
    }
}

/// Starts a command in its own task. Its updates flow to the master through `out`, and it ends
/// with exactly one `CommandComplete`.
fn spawn_command(
    config: &WorkerConfig,
    start: pb::StartCommand,
    out: mpsc::Sender<pb::WorkerMessage>,
    cut_off: Arc<AtomicBool>,
    supervision: Option<commands::Supervision>,
    tasks: &mut JoinSet<String>,
) -> Result<Running, String> {
    use pb::start_command::Command as C;
    let command = start.command.ok_or("the command is empty")?;
    let basedir = config.basedir.clone();
    let cache_dir = config.cache_dir.clone();
    let resolve = |path: &str| commands::resolve(&basedir, path);
    let (interrupt_tx, interrupt_rx) = watch::channel(false);
    let cancelled = Arc::new(AtomicBool::new(false));
    let mut chunks = None;
    enum Job {
        Shell(ShellArgs),
        Git(GitArgs),
        Mkdir(Vec<PathBuf>),
        Rmdir(Vec<PathBuf>),
        Stat(PathBuf),
        Glob(PathBuf),
        Listdir(PathBuf),
        Upload(PathBuf, u64),
        Download(PathBuf, u32, mpsc::Receiver<(Vec<u8>, bool)>),
    }
    let job = match command {
        C::Shell(s) => Job::Shell(ShellArgs {
            argv: s.argv,
            script: Some(s.script).filter(|s| !s.is_empty()),
            workdir: resolve(&s.workdir)?,
            env: s.env.into_iter().collect(),
            unset_env: s.unset_env,
            timeout: (s.timeout_secs > 0).then(|| Duration::from_secs(u64::from(s.timeout_secs))),
            max_time: (s.max_time_secs > 0).then(|| Duration::from_secs(u64::from(s.max_time_secs))),
            log_environ: s.log_environ,
            supervision,
        }),
        C::Git(g) => Job::Git(GitArgs {
            repourl: g.repourl,
            revision: Some(g.revision).filter(|r| !r.is_empty()),
            branch: Some(g.branch).filter(|b| !b.is_empty()),
            workdir: resolve(&g.workdir)?,
            full: g.mode == "full",
            timeout: (g.timeout_secs > 0).then(|| Duration::from_secs(u64::from(g.timeout_secs))),
        }),
        C::Mkdir(p) => Job::Mkdir(p.paths.iter().map(|p| resolve(p)).collect::<Result<_, _>>()?),
        C::Rmdir(p) => Job::Rmdir(p.paths.iter().map(|p| resolve(p)).collect::<Result<_, _>>()?),
        C::Stat(p) => Job::Stat(resolve(&p.path)?),
        C::Glob(p) => Job::Glob(resolve(&p.path)?),
        C::Listdir(p) => Job::Listdir(resolve(&p.path)?),
        C::UploadFile(u) => Job::Upload(resolve(&u.path)?, u.max_size),
        C::DownloadFile(d) => {
            let (tx, rx) = mpsc::channel(16);
            chunks = Some(tx);
            Job::Download(resolve(&d.path)?, d.mode, rx)
        }
    };
    let command_id = start.command_id;
    let task_cancelled = Arc::clone(&cancelled);
    let running = crate::probes::CommandGauge::start();
    tasks.spawn(async move {
        let _running = running;
        let (update_tx, mut update_rx) = mpsc::channel::<Update>(64);
        let forward_id = command_id.clone();
        let forward_out = out.clone();
        let forward_cut_off = Arc::clone(&cut_off);
        let forwarder = tokio::spawn(async move {
            while let Some(update) = update_rx.recv().await {
                if forward_cut_off.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                if let Update::Output(_, bytes) = &update {
                    crate::probes::output(bytes.len());
                }
                let update = pb::CommandUpdate { command_id: forward_id.clone(), body: Some(encode_update(update)) };
                if forward_out.send(pb::WorkerMessage { body: Some(Out::Update(update)) }).await.is_err() {
                    break;
                }
            }
        });
        let report = Reporter::new(update_tx);
        let outcome: Result<(), String> = match job {
            Job::Shell(args) => commands::run_shell(args, &report, interrupt_rx).await,
            Job::Git(args) => {
                let started = std::time::Instant::now();
                let cache = cache_dir.clone();
                let result = tokio::task::spawn_blocking(move || git::checkout(&cache, &args, task_cancelled))
                    .await
                    .unwrap_or_else(|e| Err(format!("checkout panicked: {e}")));
                match result {
                    Ok(done) => {
                        for line in done.log {
                            report.header(line).await;
                        }
                        report
                            .send(Update::Property("got_revision".into(), serde_json::Value::from(done.revision)))
                            .await;
                        report.send(Update::Rc(0)).await;
                    }
                    Err(reason) => {
                        report.header(reason).await;
                        report.send(Update::Rc(1)).await;
                    }
                }
                report.send(Update::Elapsed(started.elapsed().as_secs_f64())).await;
                Ok(())
            }
            Job::Mkdir(paths) => {
                commands::mkdir(&paths, &report).await;
                Ok(())
            }
            Job::Rmdir(paths) => {
                commands::rmdir(&paths, &report).await;
                Ok(())
            }
            Job::Stat(path) => {
                commands::stat(&path, &report).await;
                Ok(())
            }
            Job::Glob(path) => {
                commands::glob(&path, &report).await;
                Ok(())
            }
            Job::Listdir(path) => {
                commands::listdir(&path, &report).await;
                Ok(())
            }
            Job::Upload(path, max) => {
                commands::upload_file(&path, max, &report).await;
                Ok(())
            }
            Job::Download(path, mode, rx) => {
                commands::download_file(&path, mode, rx, &report).await;
                Ok(())
            }
        };
        drop(report);
        let _ = forwarder.await;
        if !cut_off.load(std::sync::atomic::Ordering::SeqCst) {
            let complete =
                pb::CommandComplete { command_id: command_id.clone(), error: outcome.err().unwrap_or_default() };
            let _ = out.send(pb::WorkerMessage { body: Some(Out::Complete(complete)) }).await;
        }
        command_id
    });
    Ok(Running { interrupt: interrupt_tx, cancelled, chunks })
}
