//! The adapter for Buildbot's own workers: `buildbot-worker` speaking `msgpack_experimental_v7`
//! (one MessagePack map per binary WebSocket frame). It checks the worker's name and password,
//! converts Buildbot's ops to and from the domain's [`ToWorker`]/[`FromWorker`], and delegates to
//! [`Master`]; like the gRPC adapter, nothing else knows this wire format.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use rmpv::Value as Mp;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::config::BuildbotWorkerConfig;
use crate::master::Master;
use crate::remote::{Command, FromWorker, GitCommand, StatInfo, Stream, ToWorker, Update, WorkerInfo, WorkerSession};
use crate::worker_port::Peer;

/// How long a worker has to describe itself after connecting.
const INFO_TIMEOUT: Duration = Duration::from_secs(30);
/// How deep a message may nest.
const MAX_DEPTH: usize = 16;
/// Seconds a Buildbot worker may hold command output before sending it.
const OUTPUT_FLUSH_SECS: f64 = 0.25;
/// Bytes per block of a file transfer.
const BLOCK_SIZE: i64 = 32 * 1024;
/// The prefix of the line a checkout prints with the revision it got.
const GOT_REVISION: &str = "kiln-got-revision: ";

/// Buildbot's worker protocol, served on the worker port.
struct BuildbotPort {
    master: Arc<Master>,
    /// The leases of commands running now, by their secret token: a command's watchdog asks
    /// for its lease and kills the command once it is gone (its session lost) or cannot be
    /// asked for three heartbeats (the worker cut off from the master).
    leases: Mutex<HashMap<String, String>>,
    /// Commands started on each worker and not seen to end, by worker name. A Buildbot worker
    /// keeps running its commands when its connection drops; they are interrupted when it
    /// connects again, before it gets new work.
    unfinished: Mutex<HashMap<String, Vec<String>>>,
}

/// The HTTP side of the protocol: Buildbot workers open a WebSocket on `/`.
pub fn router(master: Arc<Master>) -> axum::Router {
    let port =
        Arc::new(BuildbotPort { master, leases: Mutex::new(HashMap::new()), unfinished: Mutex::new(HashMap::new()) });
    axum::Router::new()
        .route("/", axum::routing::get(upgrade))
        .route("/lease/{token}", axum::routing::get(lease))
        .fallback(not_here)
        .with_state(port)
}

async fn not_here(ConnectInfo(Peer { addr, .. }): ConnectInfo<Peer>, uri: axum::http::Uri) -> Response {
    warn!(peer = %addr, path = %uri.path(), "a client asked the worker port for another path: Buildbot workers open a WebSocket on / (msgpack_experimental_v7)");
    (StatusCode::NOT_FOUND, "this is Kiln's worker port: Buildbot workers open a WebSocket on /\n").into_response()
}

/// A command's lease: 200 while the session that started it lives, 410 once it is gone.
async fn lease(
    State(port): State<Arc<BuildbotPort>>,
    axum::extract::Path(token): axum::extract::Path<String>,
) -> Response {
    if port.leases.lock().expect("leases poisoned").contains_key(&token) {
        (StatusCode::OK, "live\n").into_response()
    } else {
        (StatusCode::GONE, "gone\n").into_response()
    }
}

/// The name and password of an `Authorization: Basic` header.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (name, password) = text.split_once(':')?;
    Some((name.to_owned(), password.to_owned()))
}

fn refuse(reason: &'static str) -> Response {
    (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Basic realm=\"kiln workers\"")], reason).into_response()
}

async fn upgrade(
    State(port): State<Arc<BuildbotPort>>,
    ConnectInfo(Peer { addr: peer, tls }): ConnectInfo<Peer>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Ok(ws) = ws else {
        return (
            StatusCode::BAD_REQUEST,
            "this is Kiln's worker port: Buildbot workers connect with a WebSocket (msgpack_experimental_v7), \
             kiln-workers with gRPC\n",
        )
            .into_response();
    };
    // Buildbot's msgpack_experimental_v7 asks for no WebSocket subprotocol; a worker that asks
    // for one speaks something else.
    if let Some(asked) = headers.get(header::SEC_WEBSOCKET_PROTOCOL).and_then(|v| v.to_str().ok()) {
        warn!(%peer, protocol = asked, "a worker asked for a protocol Kiln does not speak: Kiln speaks msgpack_experimental_v7 (buildbot-worker 4.x, protocol = 'msgpack_experimental_v7')");
        let reason = format!("Kiln speaks msgpack_experimental_v7, not {asked}\n");
        return (StatusCode::BAD_REQUEST, reason).into_response();
    }
    let Some((name, password)) = basic_credentials(&headers) else {
        warn!(%peer, "refused a Buildbot worker: it sent no name and password");
        return refuse("a worker name and password are required\n");
    };
    // A worker's own entry first, then the longest prefix that admits it.
    let entries = &port.master.config.workers.buildbot;
    let configured = entries
        .iter()
        .find(|w| w.name_prefix.is_none() && w.admits(&name))
        .or_else(|| {
            entries.iter().filter(|w| w.admits(&name)).max_by_key(|w| w.name_prefix.as_ref().map_or(0, String::len))
        })
        .cloned();
    let admitted = configured
        .as_ref()
        .and_then(BuildbotWorkerConfig::password)
        .is_some_and(|expected| crate::secrets::matches_any(&[expected], &password));
    let Some(config) = configured.filter(|_| admitted) else {
        warn!(worker = %name, %peer, "refused a Buildbot worker: unknown name or wrong password (workers.buildbot)");
        return refuse("unknown worker name or wrong password\n");
    };
    // The address the worker reached this master at, for its commands' watchdogs.
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default().to_owned();
    let lease_base = format!("{}://{host}/lease/", if tls { "https" } else { "http" });
    ws.on_upgrade(move |socket| async move { port.serve(socket, name, config, peer, lease_base).await })
}

/// What a request this side sent was, to make sense of its response.
#[derive(Debug)]
enum Asked {
    WorkerInfo,
    Start(String),
    Other(&'static str),
}

/// A command running on the worker.
#[derive(Debug, Default)]
struct Running {
    /// A checkout: its stdout is watched for the revision line.
    git: bool,
    /// Stdout not yet ending in a newline, for the revision line.
    partial: String,
    revision: Option<String>,
    /// For a download: data from the master not yet read by the worker, whether all of it has
    /// come, and the worker's reads waiting for data (sequence number, length).
    data: VecDeque<u8>,
    all_data: bool,
    reads: VecDeque<(Mp, usize)>,
}

/// One worker's connection: the socket, this side's request numbers and what it asked.
struct Connection {
    socket: WebSocket,
    next_seq: i64,
    asked: HashMap<i64, Asked>,
}

impl Connection {
    async fn send(&mut self, message: &Mp) -> bool {
        let mut bytes = Vec::new();
        if rmpv::encode::write_value(&mut bytes, message).is_err() {
            return false;
        }
        self.socket.send(Message::Binary(bytes.into())).await.is_ok()
    }

    /// Sends a request (`op` with `fields`) and remembers what it was.
    async fn request(&mut self, op: &'static str, fields: Vec<(&str, Mp)>, asked: Asked) -> bool {
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut pairs = vec![("op", Mp::from(op)), ("seq_number", Mp::from(seq))];
        pairs.extend(fields);
        self.asked.insert(seq, asked);
        self.send(&map(pairs)).await
    }

    /// Answers the worker's request numbered `seq`.
    async fn respond(&mut self, seq: Mp, result: Result<Mp, String>) -> bool {
        let mut pairs = vec![("op", Mp::from("response")), ("seq_number", seq)];
        match result {
            Ok(value) => pairs.push(("result", value)),
            Err(error) => {
                pairs.push(("result", Mp::from(error)));
                pairs.push(("is_exception", Mp::from(true)));
            }
        }
        self.send(&map(pairs)).await
    }

    /// The next decoded message; `None` when the connection ends.
    async fn receive(&mut self) -> Option<Mp> {
        loop {
            match self.socket.recv().await? {
                Ok(Message::Binary(bytes)) => match decode(&bytes) {
                    Some(value @ Mp::Map(_)) => return Some(value),
                    _ => debug!("ignoring a frame that is not a MessagePack map"),
                },
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }
}

/// One frame's MessagePack value. Buildbot's messages nest a few levels; deeper ones are
/// refused rather than followed down the stack.
fn decode(bytes: &[u8]) -> Option<Mp> {
    rmpv::decode::read_value_with_max_depth(&mut &bytes[..], MAX_DEPTH).ok()
}

fn map(pairs: Vec<(&str, Mp)>) -> Mp {
    Mp::Map(pairs.into_iter().map(|(k, v)| (Mp::from(k), v)).collect())
}

/// The value of `key` in a decoded map.
fn get<'a>(message: &'a Mp, key: &str) -> Option<&'a Mp> {
    message.as_map()?.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
}

fn get_str<'a>(message: &'a Mp, key: &str) -> Option<&'a str> {
    get(message, key).and_then(Mp::as_str)
}

/// A decoded value as JSON, for `workerinfo`.
fn to_json(value: &Mp) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        Mp::Nil => J::Null,
        Mp::Boolean(b) => J::Bool(*b),
        Mp::Integer(i) => i.as_i64().map(J::from).or_else(|| i.as_u64().map(J::from)).unwrap_or(J::Null),
        Mp::F32(f) => J::from(f64::from(*f)),
        Mp::F64(f) => J::from(*f),
        Mp::String(s) => J::from(s.as_str().unwrap_or_default()),
        Mp::Binary(b) => J::from(String::from_utf8_lossy(b).into_owned()),
        Mp::Array(items) => J::Array(items.iter().map(to_json).collect()),
        Mp::Map(pairs) => J::Object(
            pairs
                .iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), to_json(v))))
                .collect::<serde_json::Map<_, _>>(),
        ),
        Mp::Ext(..) => J::Null,
    }
}

/// What Kiln makes of a Buildbot worker's `get_worker_info` answer.
fn worker_info(name: &str, config: &BuildbotWorkerConfig, reply: &Mp) -> WorkerInfo {
    let text = |key: &str| get_str(reply, key).map(|s| s.trim().to_owned()).unwrap_or_default();
    let mut commands: Vec<String> = Vec::new();
    if let Some(Mp::Map(offered)) = get(reply, "worker_commands") {
        for name in offered.iter().filter_map(|(k, _)| k.as_str()) {
            let kiln = match name {
                "uploadFile" => "upload_file",
                "downloadFile" => "download_file",
                "uploadDirectory" => "upload_directory",
                other => other,
            };
            if !commands.iter().any(|c| c == kiln) {
                commands.push(kiln.to_owned());
            }
        }
    }
    // A checkout runs as git commands in the worker's shell, as Buildbot's Git step does.
    if commands.iter().any(|c| c == "shell") {
        commands.push("git".into());
    }
    commands.sort();
    let mut details = serde_json::Map::new();
    for (key, value) in reply.as_map().into_iter().flatten() {
        let Some(key) = key.as_str() else { continue };
        if !matches!(key, "basedir" | "version" | "worker_commands" | "host") {
            details.insert(key.to_owned(), to_json(value));
        }
    }
    // The worker's environment is shown as Buildbot shows it, less its password: the worker
    // image passes it as WORKERPASS, and no value equal to it is kept under any name.
    let password = config.password().unwrap_or_default();
    if let Some(serde_json::Value::Object(environ)) = details.get_mut("environ") {
        environ.retain(|key, value| key != "WORKERPASS" && (password.is_empty() || value.as_str() != Some(&password)));
    }
    details.insert("protocol".into(), serde_json::Value::from("msgpack_experimental_v7"));
    let mut labels = std::collections::BTreeMap::new();
    labels.insert("worker".to_owned(), "buildbot-worker".to_owned());
    if let Some(system) = get_str(reply, "system") {
        labels.insert("system".to_owned(), system.to_owned());
    }
    WorkerInfo {
        name: name.to_owned(),
        version: text("version"),
        max_builds: config.max_builds.max(1),
        labels,
        commands,
        basedir: text("basedir"),
        host: text("host"),
        pool: config.pool.clone(),
        details,
    }
}

/// A path the worker understands: absolute, under its base directory when relative.
fn absolute(basedir: &str, path: &str) -> String {
    if Path::new(path).is_absolute() || basedir.is_empty() {
        path.to_owned()
    } else {
        Path::new(basedir).join(path).to_string_lossy().into_owned()
    }
}

/// The checkout Buildbot's Git step does, as one POSIX shell script run with the repository,
/// branch, revision and mode as its arguments: clone or fetch, check out exactly the revision
/// (or the branch's head), and print the revision got.
const CHECKOUT_SCRIPT: &str = r#"set -e
repo=$1 branch=$2 revision=$3 mode=$4
if [ "$mode" = full ] || [ ! -d .git ]; then
  find . -mindepth 1 -maxdepth 1 -exec rm -rf {} +
  git init --quiet .
fi
if [ -n "$branch" ]; then
  git fetch --force --tags -- "$repo" "+refs/heads/$branch:refs/remotes/origin/$branch" || git fetch --force -- "$repo"
else
  git fetch --force --tags -- "$repo"
fi
if [ -n "$revision" ]; then
  git cat-file -e "$revision^{commit}" 2>/dev/null || git fetch --force -- "$repo" "$revision"
  git checkout --force --quiet "$revision"
elif [ -n "$branch" ]; then
  git checkout --force --quiet -B "$branch" "refs/remotes/origin/$branch"
else
  git checkout --force --quiet FETCH_HEAD
fi
if [ "$mode" = full ]; then git clean -xdf --quiet; fi
echo "kiln-got-revision: $(git rev-parse HEAD)"
"#;

/// Where a connection's command watchdogs ask for their leases, and how long they may fail to.
struct Watch {
    lease_base: String,
    silence_secs: f64,
}

/// One command's lease, for its watchdog.
struct Lease {
    url: String,
    silence_secs: f64,
}

/// Runs a command and kills its whole process group (the worker runs each command in a group
/// of its own) when the command's lease is gone, when it cannot be asked for `silence` seconds
/// (the worker cut off from the master), or when the worker process that started it dies. A
/// Buildbot worker does none of this itself: killed, cut off or frozen, it leaves its commands
/// running while the master reruns their builds elsewhere.
const WATCHDOG_PY: &str = r#"import os, signal, sys, time
url, silence, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
worker = os.getppid()
child = os.fork()
if child == 0:
    try:
        os.execvp(argv[0], argv)
    except OSError as error:
        sys.stderr.write("%s: %s\n" % (argv[0], error))
        os._exit(127)
def end():
    os.killpg(0, signal.SIGKILL)
started = last_ok = time.monotonic()
next_ask = started + 0.5
while True:
    done, status = os.waitpid(child, os.WNOHANG)
    if done:
        code = os.waitstatus_to_exitcode(status)
        sys.exit(code if code >= 0 else 128 - code)
    if os.getppid() != worker:
        end()
    now = time.monotonic()
    if now >= next_ask:
        import ssl, urllib.error, urllib.request
        next_ask = now + 0.5
        try:
            context = ssl._create_unverified_context() if url.startswith("https:") else None
            urllib.request.urlopen(url, timeout=1, context=context).close()
            last_ok = time.monotonic()
        except urllib.error.HTTPError as error:
            if error.code == 410:
                end()
        except Exception:
            if time.monotonic() - last_ok > silence:
                end()
    time.sleep(0.005 if now - started < 1 else 0.1)
"#;

/// Starts the watchdog with Python; without Python, it ends the command when the worker
/// process dies only.
const WATCHDOG_SH: &str = r#"py=$1 url=$2 silence=$3
shift 3
# The worker's own interpreter where the system shows it (Linux), else the first python3.
python=$(readlink "/proc/$PPID/exe" 2>/dev/null)
case "$python" in */python*) ;; *) python=$(command -v python3 2>/dev/null) ;; esac
if [ -n "$python" ]; then exec "$python" -I -S -c "$py" "$url" "$silence" "$@"; fi
worker=$PPID
"$@" &
command=$!
(
  while kill -0 "$worker" 2>/dev/null && [ "$(ps -o ppid= -p $$ 2>/dev/null | tr -d ' ')" != 1 ]; do
    sleep 1
  done
  kill -KILL 0
) </dev/null >/dev/null 2>&1 &
watcher=$!
wait "$command"
status=$?
kill "$watcher" 2>/dev/null
exit "$status"
"#;

/// The argv that runs `argv` under the watchdog, when there is a lease to watch.
fn watched(lease: Option<&Lease>, argv: Vec<String>) -> Vec<String> {
    let Some(lease) = lease else { return argv };
    let mut wrapped = vec![
        "/bin/sh".to_owned(),
        "-c".to_owned(),
        WATCHDOG_SH.to_owned(),
        "kiln-watchdog".to_owned(),
        WATCHDOG_PY.to_owned(),
        lease.url.clone(),
        format!("{:.1}", lease.silence_secs),
    ];
    wrapped.extend(argv);
    wrapped
}

/// The `start_command` of a Kiln command: Buildbot's command name and its arguments. With a
/// lease (a POSIX worker), shell commands and checkouts run under the watchdog.
fn start_args(basedir: &str, lease: Option<&Lease>, command: Command) -> (&'static str, Vec<(&'static str, Mp)>) {
    let strings = |items: Vec<String>| Mp::Array(items.into_iter().map(Mp::from).collect());
    let seconds = |s: u32| if s == 0 { Mp::Nil } else { Mp::from(s) };
    match command {
        Command::Shell(shell) => {
            let command = match (shell.script, lease) {
                (Some(script), None) if shell.argv.is_empty() => Mp::from(script),
                (Some(script), Some(_)) if shell.argv.is_empty() => {
                    strings(watched(lease, vec!["/bin/sh".into(), "-c".into(), script]))
                }
                (_, _) => strings(watched(lease, shell.argv)),
            };
            let env = Mp::Map(shell.env.into_iter().map(|(k, v)| (Mp::from(k), Mp::from(v))).collect());
            (
                "shell",
                vec![
                    ("workdir", Mp::from(absolute(basedir, &shell.workdir))),
                    ("command", command),
                    ("env", env),
                    ("want_stdout", Mp::from(true)),
                    ("want_stderr", Mp::from(true)),
                    ("logEnviron", Mp::from(shell.log_environ)),
                    ("timeout", seconds(shell.timeout_secs)),
                    ("maxTime", seconds(shell.max_time_secs)),
                    ("usePTY", Mp::from(false)),
                    ("interruptSignal", Mp::from("KILL")),
                ],
            )
        }
        Command::Git(git) => checkout_args(basedir, lease, git),
        Command::Mkdir { paths } => {
            ("mkdir", vec![("paths", strings(paths.iter().map(|p| absolute(basedir, p)).collect()))])
        }
        Command::Rmdir { paths } => (
            "rmdir",
            vec![
                ("paths", strings(paths.iter().map(|p| absolute(basedir, p)).collect())),
                ("logEnviron", false.into()),
            ],
        ),
        Command::Stat { path } => ("stat", vec![("path", Mp::from(absolute(basedir, &path)))]),
        Command::Glob { path } => ("glob", vec![("path", Mp::from(absolute(basedir, &path)))]),
        Command::Listdir { path } => ("listdir", vec![("path", Mp::from(absolute(basedir, &path)))]),
        Command::UploadFile { path, max_size } => (
            "upload_file",
            vec![
                ("path", Mp::from(absolute(basedir, &path))),
                ("blocksize", Mp::from(BLOCK_SIZE)),
                ("maxsize", if max_size == 0 { Mp::Nil } else { Mp::from(max_size) }),
                ("keepstamp", Mp::from(false)),
            ],
        ),
        Command::DownloadFile { path, mode, .. } => (
            "download_file",
            vec![
                ("path", Mp::from(absolute(basedir, &path))),
                ("blocksize", Mp::from(BLOCK_SIZE)),
                ("maxsize", Mp::Nil),
                ("mode", if mode == 0 { Mp::Nil } else { Mp::from(mode) }),
            ],
        ),
    }
}

fn checkout_args(basedir: &str, lease: Option<&Lease>, git: GitCommand) -> (&'static str, Vec<(&'static str, Mp)>) {
    let argv = watched(
        lease,
        vec![
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            CHECKOUT_SCRIPT.to_owned(),
            "kiln-checkout".to_owned(),
            git.repourl,
            git.branch.unwrap_or_default(),
            git.revision.unwrap_or_default(),
            git.mode,
        ],
    );
    (
        "shell",
        vec![
            ("workdir", Mp::from(absolute(basedir, &git.workdir))),
            ("command", Mp::Array(argv.into_iter().map(Mp::from).collect())),
            ("env", Mp::Map(vec![(Mp::from("GIT_TERMINAL_PROMPT"), Mp::from("0"))])),
            ("want_stdout", Mp::from(true)),
            ("want_stderr", Mp::from(true)),
            ("logEnviron", Mp::from(false)),
            ("timeout", if git.timeout_secs == 0 { Mp::Nil } else { Mp::from(git.timeout_secs) }),
            ("usePTY", Mp::from(false)),
            ("interruptSignal", Mp::from("KILL")),
        ],
    )
}

/// Output text of a Buildbot `update` value: `[text, newline indexes, times]`.
fn output_text(value: &Mp) -> Option<Vec<u8>> {
    match value {
        Mp::Array(parts) => match parts.first()? {
            Mp::String(s) => Some(s.as_bytes().to_vec()),
            Mp::Binary(b) => Some(b.clone()),
            _ => None,
        },
        Mp::String(s) => Some(s.as_bytes().to_vec()),
        _ => None,
    }
}

/// The updates one `update` pair carries.
fn decode_update(key: &str, value: &Mp) -> Option<Update> {
    Some(match key {
        "stdout" => Update::Output(Stream::Stdout, output_text(value)?),
        "stderr" => Update::Output(Stream::Stderr, output_text(value)?),
        "header" => Update::Output(Stream::Header, output_text(value)?),
        "rc" => Update::Rc(value.as_i64()? as i32),
        "elapsed" => Update::Elapsed(value.as_f64().or_else(|| value.as_i64().map(|i| i as f64))?),
        "failure_reason" => Update::FailureReason(value.as_str()?.to_owned()),
        "files" => Update::Files(value.as_array()?.iter().filter_map(|f| f.as_str().map(str::to_owned)).collect()),
        "stat" => {
            let fields: Vec<i64> = value.as_array()?.iter().map(|f| f.as_i64().unwrap_or_default()).collect();
            let mode = *fields.first()? as u32;
            Update::Stat(StatInfo {
                exists: true,
                is_dir: mode & 0o170_000 == 0o040_000,
                size: fields.get(6).copied().unwrap_or_default().max(0) as u64,
                mode,
                mtime: fields.get(8).copied().unwrap_or_default(),
            })
        }
        _ => return None,
    })
}

impl BuildbotPort {
    /// Runs one worker's connection: learns what it is, attaches it, then relays until either
    /// side ends.
    async fn serve(
        self: Arc<Self>,
        socket: WebSocket,
        name: String,
        config: BuildbotWorkerConfig,
        peer: SocketAddr,
        lease_base: String,
    ) {
        let mut conn = Connection { socket, next_seq: 0, asked: HashMap::new() };
        if !conn.request("get_worker_info", Vec::new(), Asked::WorkerInfo).await {
            return;
        }
        let reply = tokio::time::timeout(INFO_TIMEOUT, async {
            loop {
                let message = conn.receive().await?;
                if get_str(&message, "op") == Some("response") {
                    return Some(message);
                }
            }
        })
        .await;
        let reply = match reply {
            Ok(Some(reply)) if get(&reply, "is_exception").is_none() => reply,
            _ => {
                warn!(worker = %config.name, %peer, "a Buildbot worker did not describe itself; connection closed");
                return;
            }
        };
        conn.asked.clear();
        let info = worker_info(&name, &config, get(&reply, "result").unwrap_or(&Mp::Nil));
        let (tx, rx) = mpsc::channel::<ToWorker>(64);
        let session = match self.master.workers.attach(info, tx).await {
            Ok(session) => session,
            Err(error) => {
                warn!(worker = %config.name, %peer, %error, "could not attach a Buildbot worker");
                let message = format!("Kiln refused this worker: {error}");
                conn.request("print", vec![("message", Mp::from(message))], Asked::Other("print")).await;
                return;
            }
        };
        info!(worker = session.name(), %peer, version = %session.info.version, "a Buildbot worker connected (msgpack)");
        // Output comes within a quarter second, not the worker's default five: logs are live,
        // and a stop meets a command that is still running.
        let settings = map(vec![
            ("buffer_size", Mp::from(64 * 1024)),
            ("buffer_timeout", Mp::from(OUTPUT_FLUSH_SECS)),
            ("newline_re", Mp::from(r"(\r\n|\r(?=.)|\033\[u|\033\[[0-9]+;[0-9]+[Hf]|\033\[2J|\x08+)")),
            ("max_line_length", Mp::from(4096)),
        ]);
        conn.request("set_worker_settings", vec![("args", settings)], Asked::Other("set_worker_settings")).await;
        let leftovers = self.unfinished.lock().expect("unfinished poisoned").remove(session.name()).unwrap_or_default();
        for command_id in leftovers {
            info!(worker = session.name(), command = %command_id, "interrupting a command left from the worker's last connection");
            let fields = vec![
                ("command_id", Mp::from(command_id)),
                ("why", Mp::from("its master lost the connection it ran on")),
            ];
            conn.request("interrupt_command", fields, Asked::Other("interrupt_command")).await;
        }
        let mut running: HashMap<String, Running> = HashMap::new();
        let watch = Watch { lease_base, silence_secs: (self.master.heartbeat * 3).as_secs_f64() };
        self.relay(&mut conn, &session, rx, &mut running, &watch).await;
        // The session is gone: every lease of it with it, so the commands' watchdogs kill them.
        self.leases.lock().expect("leases poisoned").retain(|_, command| !running.contains_key(command));
        let left: Vec<String> = running.into_keys().collect();
        if !left.is_empty() {
            self.unfinished.lock().expect("unfinished poisoned").insert(session.name().to_owned(), left);
        }
        let _ = conn.socket.send(Message::Close(None)).await;
        self.master.workers.detach(&session).await;
    }

    async fn relay(
        &self,
        conn: &mut Connection,
        session: &Arc<WorkerSession>,
        mut outbound: mpsc::Receiver<ToWorker>,
        running: &mut HashMap<String, Running>,
        watch: &Watch,
    ) {
        let heartbeat = self.master.heartbeat;
        let silence = heartbeat * 3;
        let mut last_heard = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = outbound.recv() => {
                    let Some(message) = message else { return };
                    if !self.on_master_message(conn, session, running, watch, message).await {
                        info!(worker = session.name(), "the Buildbot worker's connection ended");
                        return;
                    }
                }
                message = conn.receive() => {
                    let Some(message) = message else {
                        info!(worker = session.name(), "the Buildbot worker closed its connection");
                        return;
                    };
                    last_heard = tokio::time::Instant::now();
                    if !self.on_worker_message(conn, session, running, message).await {
                        return;
                    }
                }
                _ = tick.tick() => {
                    if last_heard.elapsed() > silence {
                        warn!(worker = session.name(), seconds = silence.as_secs_f64(), "Buildbot worker silent too long; session lost");
                        return;
                    }
                    if !conn.request("keepalive", Vec::new(), Asked::Other("keepalive")).await {
                        return;
                    }
                }
                _ = session.closed() => return,
            }
        }
    }

    /// Sends what the master has for the worker; false when the connection is gone.
    async fn on_master_message(
        &self,
        conn: &mut Connection,
        session: &Arc<WorkerSession>,
        running: &mut HashMap<String, Running>,
        watch: &Watch,
        message: ToWorker,
    ) -> bool {
        match message {
            ToWorker::Registered { master_name, .. } => {
                let text = format!("attached to Kiln master {master_name}");
                conn.request("print", vec![("message", Mp::from(text))], Asked::Other("print")).await
            }
            ToWorker::Heartbeat(_) => true,
            ToWorker::Start { command_id, builder_name, command, .. } => {
                let git = matches!(command, Command::Git(_));
                let posix = session.info.details.get("system").and_then(|s| s.as_str()) == Some("posix");
                let token = format!("{:032x}", rand::random::<u128>());
                self.leases.lock().expect("leases poisoned").insert(token.clone(), command_id.clone());
                let lease = posix
                    .then(|| Lease { url: format!("{}{token}", watch.lease_base), silence_secs: watch.silence_secs });
                let (name, args) = start_args(&session.info.basedir, lease.as_ref(), command);
                running.insert(command_id.clone(), Running { git, ..Default::default() });
                let fields = vec![
                    ("command_id", Mp::from(command_id.clone())),
                    ("command_name", Mp::from(name)),
                    ("args", map(args)),
                    ("builder_name", Mp::from(builder_name)),
                ];
                conn.request("start_command", fields, Asked::Start(command_id)).await
            }
            ToWorker::FileChunk { command_id, data, last } => {
                let Some(command) = running.get_mut(&command_id) else { return true };
                command.data.extend(data);
                command.all_data |= last;
                serve_reads(conn, command).await
            }
            ToWorker::Interrupt { command_id, reason } => {
                let fields = vec![("command_id", Mp::from(command_id)), ("why", Mp::from(reason))];
                conn.request("interrupt_command", fields, Asked::Other("interrupt_command")).await
            }
            // A Buildbot worker has no drain of its own: the master sends it no new builds.
            ToWorker::Drain => true,
            ToWorker::Shutdown { reason } => {
                info!(worker = session.name(), %reason, "telling the Buildbot worker to shut down");
                conn.request("shutdown", Vec::new(), Asked::Other("shutdown")).await
            }
        }
    }

    /// Handles one message from the worker; false when the connection is gone.
    async fn on_worker_message(
        &self,
        conn: &mut Connection,
        session: &Arc<WorkerSession>,
        running: &mut HashMap<String, Running>,
        message: Mp,
    ) -> bool {
        let seq = get(&message, "seq_number").cloned().unwrap_or(Mp::Nil);
        let op = get_str(&message, "op").unwrap_or_default().to_owned();
        let command_id = get_str(&message, "command_id").unwrap_or_default().to_owned();
        let deliver = |update: Update| FromWorker::Update { command_id: command_id.clone(), update };
        match op.as_str() {
            "response" => {
                let failed = get(&message, "is_exception").is_some();
                let result = get(&message, "result").map(to_json).unwrap_or_default();
                match seq.as_i64().and_then(|seq| conn.asked.remove(&seq)) {
                    Some(Asked::Start(id)) if failed => {
                        running.remove(&id);
                        self.leases.lock().expect("leases poisoned").retain(|_, command| *command != id);
                        let error = format!("the worker could not start the command: {}", json_text(&result));
                        session.on_message(FromWorker::Complete { command_id: id, error: Some(error) }).await;
                    }
                    Some(Asked::Other(what)) if failed => {
                        debug!(worker = session.name(), what, answer = %result, "the Buildbot worker refused a request");
                    }
                    _ => {}
                }
                true
            }
            "update" => {
                let pairs = get(&message, "args").and_then(Mp::as_array).cloned().unwrap_or_default();
                for pair in &pairs {
                    let Some([key, value]) = pair.as_array().map(Vec::as_slice) else { continue };
                    let Some(key) = key.as_str() else { continue };
                    let Some(update) = decode_update(key, value) else { continue };
                    if let Some(command) = running.get_mut(&command_id) {
                        watch_checkout(command, &update);
                        if update == Update::Rc(0)
                            && let Some(revision) = command.revision.take()
                        {
                            let property = Update::Property("got_revision".into(), serde_json::Value::from(revision));
                            session.on_message(deliver(property)).await;
                        }
                    }
                    session.on_message(deliver(update)).await;
                }
                conn.respond(seq, Ok(Mp::Nil)).await
            }
            "complete" => {
                running.remove(&command_id);
                self.leases.lock().expect("leases poisoned").retain(|_, command| *command != command_id);
                let error = get(&message, "args").and_then(Mp::as_str).map(str::to_owned);
                session.on_message(FromWorker::Complete { command_id: command_id.clone(), error }).await;
                conn.respond(seq, Ok(Mp::Nil)).await
            }
            "update_upload_file_write" => {
                let data = match get(&message, "args") {
                    Some(Mp::Binary(data)) => data.clone(),
                    Some(Mp::String(text)) => text.as_bytes().to_vec(),
                    _ => Vec::new(),
                };
                session.on_message(deliver(Update::FileData(data))).await;
                conn.respond(seq, Ok(Mp::Nil)).await
            }
            "update_upload_file_close" | "update_upload_file_utime" | "update_read_file_close" => {
                conn.respond(seq, Ok(Mp::Nil)).await
            }
            "update_read_file" => {
                let length = get(&message, "length").and_then(Mp::as_u64).unwrap_or(BLOCK_SIZE as u64) as usize;
                let Some(command) = running.get_mut(&command_id) else {
                    return conn.respond(seq, Err(format!("no download {command_id} is running"))).await;
                };
                command.reads.push_back((seq, length));
                serve_reads(conn, command).await
            }
            "update_upload_directory_write" | "update_upload_directory_unpack" => {
                conn.respond(seq, Err("Kiln takes no directory uploads".into())).await
            }
            other => conn.respond(seq, Err(format!("Command {other} does not exist."))).await,
        }
    }
}

/// Decodes one frame from a worker as the adapter does and reads what it can carry: the updates
/// of an `update`, and a `workerinfo` from a response. For the fuzz target.
pub(crate) fn read_frame(bytes: &[u8]) -> Option<(Vec<Update>, WorkerInfo)> {
    let message = decode(bytes)?;
    let updates = get(&message, "args")
        .and_then(Mp::as_array)
        .into_iter()
        .flatten()
        .filter_map(|pair| match pair.as_array().map(Vec::as_slice) {
            Some([key, value]) => decode_update(key.as_str()?, value),
            _ => None,
        })
        .collect();
    let config = BuildbotWorkerConfig {
        name: "w".into(),
        name_prefix: None,
        password: None,
        password_env: None,
        password_file: None,
        max_builds: 1,
        pool: None,
    };
    Some((updates, worker_info("w", &config, get(&message, "result").unwrap_or(&Mp::Nil))))
}

/// Answers the worker's waiting reads of a download as far as the master's data goes.
async fn serve_reads(conn: &mut Connection, command: &mut Running) -> bool {
    while let Some((_, length)) = command.reads.front() {
        let length = (*length).max(1);
        if command.data.len() < length && !command.all_data {
            return true;
        }
        let (seq, _) = command.reads.pop_front().expect("a read is waiting");
        let take = length.min(command.data.len());
        let block: Vec<u8> = command.data.drain(..take).collect();
        if !conn.respond(seq, Ok(Mp::Binary(block))).await {
            return false;
        }
    }
    true
}

/// Follows a checkout's stdout for the line naming the revision it got.
fn watch_checkout(command: &mut Running, update: &Update) {
    let Update::Output(Stream::Stdout, data) = update else { return };
    if !command.git {
        return;
    }
    command.partial.push_str(&String::from_utf8_lossy(data));
    while let Some(end) = command.partial.find('\n') {
        let line: String = command.partial.drain(..=end).collect();
        if let Some(revision) = line.trim_end().strip_prefix(GOT_REVISION) {
            command.revision = Some(revision.to_owned());
        }
    }
}

fn json_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_read_as_buildbot_workers_send_them() {
        let mut headers = HeaderMap::new();
        assert_eq!(basic_credentials(&headers), None);
        let value = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("w1:pa:ss"));
        headers.insert(header::AUTHORIZATION, value.parse().unwrap());
        assert_eq!(basic_credentials(&headers), Some(("w1".into(), "pa:ss".into())));
    }

    #[test]
    fn updates_decode_from_buildbots_pairs() {
        let text = Mp::Array(vec![Mp::from("one\ntwo\n"), Mp::Array(vec![3.into(), 7.into()]), Mp::Array(vec![])]);
        assert_eq!(decode_update("stdout", &text), Some(Update::Output(Stream::Stdout, b"one\ntwo\n".to_vec())));
        assert_eq!(decode_update("rc", &Mp::from(-1)), Some(Update::Rc(-1)));
        let stat =
            Mp::Array([0o040_755i64, 1, 2, 3, 4, 5, 4096, 7, 1_700_000_000, 9].into_iter().map(Mp::from).collect());
        let Some(Update::Stat(info)) = decode_update("stat", &stat) else { panic!("no stat") };
        assert!(info.exists && info.is_dir && info.size == 4096 && info.mtime == 1_700_000_000);
        assert_eq!(decode_update("log", &Mp::Nil), None);
    }

    #[test]
    fn commands_go_out_with_absolute_paths_and_buildbots_argument_names() {
        let shell = Command::Shell(crate::remote::ShellCommand {
            argv: vec!["make".into(), "test".into()],
            workdir: "app/build".into(),
            timeout_secs: 60,
            ..Default::default()
        });
        let (name, args) = start_args("/var/lib/worker", None, shell);
        assert_eq!(name, "shell");
        let args = map(args);
        assert_eq!(get_str(&args, "workdir"), Some("/var/lib/worker/app/build"));
        assert_eq!(get(&args, "timeout").and_then(Mp::as_u64), Some(60));
        assert_eq!(get(&args, "maxTime"), Some(&Mp::Nil));
        let (name, args) = start_args("/w", None, Command::Mkdir { paths: vec!["a".into(), "/abs".into()] });
        assert_eq!(name, "mkdir");
        assert_eq!(to_json(&map(args))["paths"], serde_json::json!(["/w/a", "/abs"]));
    }

    #[test]
    fn a_checkout_reports_the_revision_it_printed() {
        let mut command = Running { git: true, ..Default::default() };
        watch_checkout(&mut command, &Update::Output(Stream::Stdout, b"HEAD is now\nkiln-got-rev".to_vec()));
        assert_eq!(command.revision, None);
        watch_checkout(&mut command, &Update::Output(Stream::Stdout, b"ision: abc123\n".to_vec()));
        assert_eq!(command.revision.as_deref(), Some("abc123"));
    }
}
