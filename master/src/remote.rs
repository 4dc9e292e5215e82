//! Remote commands in Buildbot's model and the master's side of a session with one worker. This
//! module knows no transport: the gRPC adapter (and any later one, such as Buildbot's own worker
//! protocol) turns wire messages into [`FromWorker`] and [`ToWorker`] values and nothing more.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};

/// A remote command a build step asks a worker to run.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Shell(ShellCommand),
    Git(GitCommand),
    Mkdir { paths: Vec<String> },
    Rmdir { paths: Vec<String> },
    Stat { path: String },
    Glob { path: String },
    Listdir { path: String },
    UploadFile { path: String, max_size: u64 },
    DownloadFile { path: String, mode: u32, data: Vec<u8> },
}

impl Command {
    /// Buildbot's name of the command, as workers advertise it.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Shell(_) => "shell",
            Command::Git(_) => "git",
            Command::Mkdir { .. } => "mkdir",
            Command::Rmdir { .. } => "rmdir",
            Command::Stat { .. } => "stat",
            Command::Glob { .. } => "glob",
            Command::Listdir { .. } => "listdir",
            Command::UploadFile { .. } => "upload_file",
            Command::DownloadFile { .. } => "download_file",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShellCommand {
    /// Run directly when not empty; otherwise `script` runs under `/bin/sh -c`.
    pub argv: Vec<String>,
    pub script: Option<String>,
    pub workdir: String,
    pub env: BTreeMap<String, String>,
    pub timeout_secs: u32,
    pub max_time_secs: u32,
    pub log_environ: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct GitCommand {
    pub repourl: String,
    pub revision: Option<String>,
    pub branch: Option<String>,
    pub workdir: String,
    /// `incremental` or `full`.
    pub mode: String,
    pub timeout_secs: u32,
}

/// Which output a chunk belongs to; the letter is Buildbot's stdio log prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
    Header,
}

impl Stream {
    pub fn prefix(self) -> char {
        match self {
            Stream::Stdout => 'o',
            Stream::Stderr => 'e',
            Stream::Header => 'h',
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatInfo {
    pub exists: bool,
    pub is_dir: bool,
    pub size: u64,
    pub mode: u32,
    pub mtime: i64,
}

/// Progress of a running command.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    Output(Stream, Vec<u8>),
    Rc(i32),
    Elapsed(f64),
    Files(Vec<String>),
    Stat(StatInfo),
    Property(String, serde_json::Value),
    FileData(Vec<u8>),
    FailureReason(String),
}

/// What a build sees of its command.
#[derive(Debug, Clone, PartialEq)]
pub enum CommandEvent {
    Update(Update),
    /// The command ended; `Some` carries why it could not run at all.
    Complete(Option<String>),
    /// The session with the worker ended before the command did.
    Lost,
}

/// What a worker says about itself when it registers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerInfo {
    pub name: String,
    pub version: String,
    pub max_builds: u32,
    pub labels: BTreeMap<String, String>,
    pub commands: Vec<String>,
    pub basedir: String,
    pub host: String,
    /// The pool the worker says it belongs to, if any.
    pub pool: Option<String>,
    /// More of Buildbot's `workerinfo` keys the worker reported (a Buildbot worker's `admin`,
    /// `access_uri`, `environ`, `system`, `numcpus`, `os_*`), shown as they came.
    pub details: serde_json::Map<String, serde_json::Value>,
}

impl WorkerInfo {
    /// Buildbot's `workerinfo` object.
    pub fn to_json(&self) -> serde_json::Value {
        let mut info = serde_json::json!({
            "host": self.host,
            "version": self.version,
            "basedir": self.basedir,
            "max_builds": self.max_builds,
            // Buildbot's UI shows each value as text: no nested objects or lists.
            "labels": self.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", "),
            "pool": self.pool,
            "worker_commands": self.commands.join(", "),
            "admin": null,
            "access_uri": null,
        });
        if let Some(object) = info.as_object_mut() {
            object.extend(self.details.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        info
    }
}

/// A message for a worker, encoded by the transport.
#[derive(Debug, Clone, PartialEq)]
pub enum ToWorker {
    Registered { workerid: i64, master_name: String, heartbeat_interval_ms: u32 },
    Heartbeat(u64),
    Start { command_id: String, builder_name: String, buildid: i64, command: Command },
    FileChunk { command_id: String, data: Vec<u8>, last: bool },
    Interrupt { command_id: String, reason: String },
    Drain,
    Shutdown { reason: String },
}

/// A message from a worker, decoded by the transport.
#[derive(Debug, Clone, PartialEq)]
pub enum FromWorker {
    Heartbeat,
    Update { command_id: String, update: Update },
    Complete { command_id: String, error: Option<String> },
    Draining,
}

/// Why a command could not be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("the worker session has ended")]
    Closed,
    #[error("worker {worker} does not implement the {command} command")]
    Unsupported { worker: String, command: &'static str },
}

/// Updates buffered per command before the session stops reading from the worker; this bounds
/// memory end to end because the transport then stops reading from the network.
const COMMAND_BUFFER: usize = 256;

/// The master's side of one connected worker.
#[derive(Debug)]
pub struct WorkerSession {
    pub workerid: i64,
    pub info: WorkerInfo,
    outbound: mpsc::Sender<ToWorker>,
    commands: Mutex<HashMap<String, mpsc::Sender<CommandEvent>>>,
    next_command: AtomicU64,
    closed: AtomicBool,
    /// Builds running on this worker.
    running: AtomicU32,
    draining: AtomicBool,
    /// Wakes whoever waits for this session to end.
    ended: Notify,
    /// When the session ended, for the orphan deadline.
    ended_at: Mutex<Option<tokio::time::Instant>>,
    /// Set when the worker's machine is known to be gone (its pod was deleted): none of its
    /// commands can still run, so nobody needs to wait for the worker's own deadline.
    gone: AtomicBool,
}

impl WorkerSession {
    pub fn new(workerid: i64, info: WorkerInfo, outbound: mpsc::Sender<ToWorker>) -> Arc<WorkerSession> {
        Arc::new(WorkerSession {
            workerid,
            info,
            outbound,
            commands: Mutex::new(HashMap::new()),
            next_command: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            running: AtomicU32::new(0),
            draining: AtomicBool::new(false),
            ended: Notify::new(),
            ended_at: Mutex::new(None),
            gone: AtomicBool::new(false),
        })
    }

    pub fn name(&self) -> &str {
        &self.info.name
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn running_builds(&self) -> u32 {
        self.running.load(Ordering::SeqCst)
    }

    /// Whether the worker can take another build now.
    pub fn has_free_slot(&self) -> bool {
        !self.is_closed() && !self.is_draining() && self.running_builds() < self.info.max_builds.max(1)
    }

    /// Reserves a build slot unless the worker is draining or closed; the guard frees it when
    /// dropped. Together with [`WorkerSession::set_draining`] followed by a look at
    /// [`WorkerSession::running_builds`], this is a two-flag handshake (both sides write, then
    /// read the other's flag, sequentially consistent): either the reservation sees the drain
    /// and backs off, or the drainer sees the reservation and waits for that build to end.
    pub fn try_reserve(self: &Arc<Self>) -> Option<BuildSlot> {
        self.running.fetch_add(1, Ordering::SeqCst);
        let slot = BuildSlot { session: Arc::clone(self) };
        if self.is_draining() || self.is_closed() || self.running_builds() > self.info.max_builds.max(1) {
            return None;
        }
        Some(slot)
    }

    /// Reserves a build slot; the returned guard frees it when dropped.
    pub fn reserve(self: &Arc<Self>) -> BuildSlot {
        self.running.fetch_add(1, Ordering::SeqCst);
        BuildSlot { session: Arc::clone(self) }
    }

    /// Sends a message to the worker; fails once the session has ended.
    pub async fn send(&self, message: ToWorker) -> Result<(), SessionError> {
        if self.is_closed() {
            return Err(SessionError::Closed);
        }
        self.outbound.send(message).await.map_err(|_| SessionError::Closed)
    }

    /// Starts a command on the worker.
    pub async fn start(
        self: &Arc<Self>,
        builder_name: &str,
        buildid: i64,
        command: Command,
    ) -> Result<RunningCommand, SessionError> {
        if !self.info.commands.is_empty() && !self.info.commands.iter().any(|c| c == command.name()) {
            return Err(SessionError::Unsupported { worker: self.info.name.clone(), command: command.name() });
        }
        let command_id = format!("{buildid}-{}", self.next_command.fetch_add(1, Ordering::SeqCst));
        let (tx, rx) = mpsc::channel(COMMAND_BUFFER);
        self.commands.lock().expect("command table poisoned").insert(command_id.clone(), tx);
        let file = match &command {
            Command::DownloadFile { data, .. } => Some(data.clone()),
            _ => None,
        };
        let start =
            ToWorker::Start { command_id: command_id.clone(), builder_name: builder_name.to_owned(), buildid, command };
        if let Err(error) = self.send(start).await {
            self.commands.lock().expect("command table poisoned").remove(&command_id);
            return Err(error);
        }
        if let Some(data) = file {
            const CHUNK: usize = 64 * 1024;
            let mut chunks = data.chunks(CHUNK).peekable();
            if chunks.peek().is_none() {
                self.send(ToWorker::FileChunk { command_id: command_id.clone(), data: Vec::new(), last: true }).await?;
            }
            while let Some(chunk) = chunks.next() {
                let last = chunks.peek().is_none();
                self.send(ToWorker::FileChunk { command_id: command_id.clone(), data: chunk.to_vec(), last }).await?;
            }
        }
        Ok(RunningCommand { command_id, events: rx, session: Arc::clone(self) })
    }

    /// Routes a message from the worker. Waits when a command's buffer is full, which in turn
    /// stops the transport from reading more.
    pub async fn on_message(&self, message: FromWorker) {
        match message {
            FromWorker::Heartbeat => {}
            FromWorker::Draining => {
                self.draining.store(true, Ordering::SeqCst);
            }
            FromWorker::Update { command_id, update } => {
                let tx = self.commands.lock().expect("command table poisoned").get(&command_id).cloned();
                if let Some(tx) = tx {
                    let _ = tx.send(CommandEvent::Update(update)).await;
                }
            }
            FromWorker::Complete { command_id, error } => {
                let tx = self.commands.lock().expect("command table poisoned").remove(&command_id);
                if let Some(tx) = tx {
                    let _ = tx.send(CommandEvent::Complete(error)).await;
                }
            }
        }
    }

    /// Marks the worker as taking no new builds.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Returns the worker to service after a drain that was called off.
    pub fn clear_draining(&self) {
        self.draining.store(false, Ordering::SeqCst);
    }

    /// Ends the session: every running command sees [`CommandEvent::Lost`].
    pub fn close(&self) {
        self.ended_at.lock().expect("ended_at poisoned").get_or_insert_with(tokio::time::Instant::now);
        self.closed.store(true, Ordering::SeqCst);
        let commands: Vec<_> = self.commands.lock().expect("command table poisoned").drain().collect();
        for (_, tx) in commands {
            let _ = tx.try_send(CommandEvent::Lost);
        }
        self.ended.notify_waiters();
    }

    /// Records that the worker's machine is gone, then ends the session.
    pub fn close_gone(&self) {
        self.gone.store(true, Ordering::SeqCst);
        self.close();
    }

    /// Waits, after the session ended, until no command of it can still run on the worker:
    /// `deadline` after the end — the worker kills its commands within that time of losing its
    /// master (see `kiln.proto`) — or at once when its machine is known to be gone.
    pub async fn orphans_dead(&self, deadline: Duration) {
        if self.gone.load(Ordering::SeqCst) {
            return;
        }
        let ended = *self.ended_at.lock().expect("ended_at poisoned");
        let Some(ended) = ended else { return };
        tokio::time::sleep_until(ended + deadline).await;
    }

    /// Waits until the session ends.
    pub async fn closed(&self) {
        let ended = self.ended.notified();
        if self.is_closed() {
            return;
        }
        ended.await;
    }
}

/// A build's hold on one of a worker's slots, released on drop.
#[derive(Debug)]
pub struct BuildSlot {
    session: Arc<WorkerSession>,
}

impl BuildSlot {
    pub fn session(&self) -> &Arc<WorkerSession> {
        &self.session
    }
}

impl Drop for BuildSlot {
    fn drop(&mut self) {
        self.session.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A command started on a worker.
#[derive(Debug)]
pub struct RunningCommand {
    pub command_id: String,
    events: mpsc::Receiver<CommandEvent>,
    session: Arc<WorkerSession>,
}

impl RunningCommand {
    /// The next event; [`CommandEvent::Lost`] once the session is gone.
    pub async fn next(&mut self) -> CommandEvent {
        if self.session.is_closed() && self.events.is_empty() {
            return CommandEvent::Lost;
        }
        self.events.recv().await.unwrap_or(CommandEvent::Lost)
    }

    /// The session the command runs in.
    pub fn session(&self) -> &Arc<WorkerSession> {
        &self.session
    }

    /// Asks the worker to kill the command; it still ends with `Complete`.
    pub async fn interrupt(&self, reason: &str) {
        let _ = self
            .session
            .send(ToWorker::Interrupt { command_id: self.command_id.clone(), reason: reason.to_owned() })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(commands: &[&str]) -> (Arc<WorkerSession>, mpsc::Receiver<ToWorker>) {
        let (tx, rx) = mpsc::channel(16);
        let info = WorkerInfo {
            name: "w".into(),
            max_builds: 1,
            commands: commands.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        };
        (WorkerSession::new(1, info, tx), rx)
    }

    #[tokio::test]
    async fn updates_reach_the_command_in_order_and_loss_ends_it() {
        let (session, mut outbound) = session(&["shell"]);
        let mut command = session.start("b", 7, Command::Shell(ShellCommand::default())).await.unwrap();
        let Some(ToWorker::Start { command_id, .. }) = outbound.recv().await else { panic!("no start") };
        session.on_message(FromWorker::Update { command_id: command_id.clone(), update: Update::Rc(0) }).await;
        assert_eq!(command.next().await, CommandEvent::Update(Update::Rc(0)));
        session.close();
        assert_eq!(command.next().await, CommandEvent::Lost);
        assert!(session.start("b", 7, Command::Shell(ShellCommand::default())).await.is_err());
    }

    #[tokio::test]
    async fn a_command_the_worker_lacks_is_refused() {
        let (session, _outbound) = session(&["shell"]);
        let error = session.start("b", 1, Command::Stat { path: "x".into() }).await.unwrap_err();
        assert!(matches!(error, SessionError::Unsupported { command: "stat", .. }));
    }

    #[tokio::test]
    async fn slots_are_freed_when_builds_end() {
        let (session, _outbound) = session(&[]);
        assert!(session.has_free_slot());
        let slot = session.reserve();
        assert!(!session.has_free_slot());
        drop(slot);
        assert!(session.has_free_slot());
    }
}
