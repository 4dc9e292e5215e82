//! A throwaway PostgreSQL cluster, started once per test process and gone with it: `initdb` runs
//! as the `postgres` user when the tests run as root (it refuses root), the server is a child
//! that dies with the process, and every caller gets a fresh database of its own.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::free_port;

struct Cluster {
    port: u16,
    bin: PathBuf,
    dir: PathBuf,
    ids: Option<(u32, u32)>,
    /// The postmaster's pid.
    pid: std::sync::Mutex<u32>,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(1);

fn pg_bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("KILN_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .filter(|p| p.join("initdb").is_file())
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions.pop().expect("PostgreSQL is not installed: run scripts/test, or apt-get install -y postgresql")
}

/// The uid and gid to run PostgreSQL as: `postgres` when we are root, else ourselves.
fn run_as() -> Option<(u32, u32)> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return None;
    }
    let name = std::ffi::CString::new("postgres").expect("no NUL");
    // SAFETY: getpwnam with a valid C string; the result is read at once, before any other call.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(!entry.is_null(), "running as root needs a postgres user (apt-get install -y postgresql creates it)");
    // SAFETY: entry was checked to be non-null above.
    unsafe { Some(((*entry).pw_uid, (*entry).pw_gid)) }
}

fn as_postgres(command: &mut Command, ids: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = ids {
        command.uid(uid).gid(gid);
    }
    command
}

/// Removes clusters left by test processes that no longer exist.
fn sweep_stale(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix("kiln-pg-").and_then(|rest| rest.split('-').next())
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn start() -> Cluster {
    let bin = pg_bin_dir();
    let ids = run_as();
    let root = std::env::temp_dir();
    sweep_stale(&root);
    let dir = root.join(format!("kiln-pg-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).expect("cluster dir");
    if let Some((uid, gid)) = ids {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown cluster dir");
    }
    let data = dir.join("data");
    let mut initdb = Command::new(bin.join("initdb"));
    let status = as_postgres(&mut initdb, ids)
        .current_dir(&dir)
        .args(["-D"])
        .arg(&data)
        .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run initdb");
    assert!(status.status.success(), "initdb failed: {}", String::from_utf8_lossy(&status.stderr));
    let port = free_port();
    let pid = spawn_server(&bin, &dir, ids, port);
    Cluster { port, bin, dir, ids, pid: std::sync::Mutex::new(pid) }
}

/// Starts the server on the cluster in `dir` and waits until it accepts connections.
fn spawn_server(bin: &Path, dir: &Path, ids: Option<(u32, u32)>, port: u16) -> u32 {
    let (bin, data, socket_dir) = (bin.to_owned(), dir.join("data"), dir.to_owned());
    // The server must die with this process. PR_SET_PDEATHSIG fires when the *thread* that
    // spawned the child exits, so spawn it from a thread that lives as long as the process.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("postgres-parent".into())
        .spawn(move || {
            let mut command = Command::new(bin.join("postgres"));
            as_postgres(&mut command, ids)
                .current_dir(&socket_dir)
                .arg("-D")
                .arg(&data)
                .args(["-c", "listen_addresses=127.0.0.1", "-p", &port.to_string(), "-k"])
                .arg(&socket_dir)
                .args(["-c", "max_connections=300"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            // Tests need speed, not durability; benchmarks ask for the default, durable settings.
            if std::env::var_os("KILN_PG_DURABLE").is_none() {
                command.args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]);
            }
            // SAFETY: prctl in the child before exec only sets its parent-death signal.
            unsafe {
                command.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT);
                    Ok(())
                });
            }
            let child = command.spawn();
            let failed = child.is_err();
            tx.send(child.map(|mut c| {
                let pid = c.id();
                // Reap it when it exits (after a stop), so its pid does not linger.
                std::thread::spawn(move || c.wait());
                pid
            }))
            .expect("report spawn");
            if !failed {
                loop {
                    std::thread::park();
                }
            }
        })
        .expect("postgres parent thread");
    let pid = rx.recv().expect("spawn result").expect("start postgres");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "PostgreSQL did not start within 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    pid
}

/// Stops the test process's cluster (a fast shutdown: connections are closed), as an outage
/// would. Only for a test binary that owns its cluster alone.
pub fn stop_cluster() {
    let cluster = CLUSTER.get().expect("a cluster was started");
    let pid = *cluster.pid.lock().expect("pid");
    // SAFETY: SIGINT to the postmaster this process started.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Path::new("/proc").join(pid.to_string()).exists()
        || std::net::TcpStream::connect(("127.0.0.1", cluster.port)).is_ok()
    {
        assert!(Instant::now() < deadline, "PostgreSQL did not stop within 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts the stopped cluster again on the same port and data.
pub fn restart_cluster() {
    let cluster = CLUSTER.get().expect("a cluster was started");
    let pid = spawn_server(&cluster.bin, &cluster.dir, cluster.ids, cluster.port);
    *cluster.pid.lock().expect("pid") = pid;
}

/// A URL of a new, empty database on the shared throwaway cluster.
pub async fn fresh_database() -> String {
    let cluster = CLUSTER.get_or_init(start);
    let admin = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port);
    let name = format!("kiln_test_{}", NEXT_DB.fetch_add(1, Ordering::SeqCst));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        use sqlx::Connection;
        match sqlx::PgConnection::connect(&admin).await {
            Ok(mut conn) => {
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut conn)
                    .await
                    .expect("create database");
                let _ = conn.close().await;
                break;
            }
            Err(error) => {
                assert!(Instant::now() < deadline, "cannot reach the test cluster: {error}");
                crate::real_sleep(Duration::from_millis(50)).await;
            }
        }
    }
    format!("postgres://postgres@127.0.0.1:{}/{name}", cluster.port)
}
