//! Buildbot's own worker as a test process: `buildbot-worker` from PyPI at pinned versions
//! (installed by `scripts/prerequisites`), made with its `create-worker` exactly as Buildbot
//! documents and run in the foreground, its log read from its `twistd.log`.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::{Child, Command};

/// The `buildbot-worker` program: `$KILN_TEST_BUILDBOT_WORKER`, or where the prerequisites put it.
pub fn program() -> PathBuf {
    let path = std::env::var_os("KILN_TEST_BUILDBOT_WORKER").map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/buildbot-worker/bin/buildbot-worker")
    });
    assert!(
        path.is_file(),
        "{} is missing (run scripts/test, which installs buildbot-worker from PyPI)",
        path.display()
    );
    path
}

/// A running `buildbot-worker`; killed (SIGKILL) when dropped.
pub struct BuildbotWorker {
    pub name: String,
    /// Its base directory (`buildbot.tac`, `twistd.log`, the builders' directories).
    pub dir: PathBuf,
    /// Its password, also in its environment as `WORKERPASS`, as Buildbot's worker image has it.
    password: String,
    child: Option<Child>,
}

impl BuildbotWorker {
    /// Creates worker `name` in `<parent>/<name>` for the master at `master` (`HOST:PORT`)
    /// with `password`, speaking `protocol` (`msgpack_experimental_v7`, or `pb`), and starts it.
    pub fn start(parent: &Path, master: &str, name: &str, password: &str, protocol: &str) -> BuildbotWorker {
        BuildbotWorker::start_with(parent, master, name, password, protocol, &[])
    }

    /// [`BuildbotWorker::start`] with more of `create-worker`'s options (such as
    /// `--connection-string`).
    pub fn start_with(
        parent: &Path,
        master: &str,
        name: &str,
        password: &str,
        protocol: &str,
        options: &[&str],
    ) -> BuildbotWorker {
        let dir = parent.join(name);
        std::fs::create_dir_all(parent).expect("worker parent directory");
        let created = std::process::Command::new(program())
            .args(["create-worker", "--quiet", &format!("--protocol={protocol}")])
            .args(options)
            .arg(&dir)
            .args([master, name, password])
            .stdin(Stdio::null())
            .output()
            .expect("run buildbot-worker create-worker");
        assert!(
            created.status.success(),
            "create-worker: {}{}",
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr)
        );
        std::fs::write(dir.join("info").join("admin"), "Kiln Tests <tests@kiln.invalid>\n").unwrap();
        std::fs::write(dir.join("info").join("host"), "a buildbot-worker under test\n").unwrap();
        let mut worker = BuildbotWorker { name: name.to_owned(), dir, password: password.to_owned(), child: None };
        worker.restart();
        worker
    }

    /// Starts the worker process (again) in its directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "buildbot-worker {} is running", self.name);
        let child = Command::new(program())
            .args(["start", "--nodaemon"])
            .arg(&self.dir)
            .current_dir(&self.dir)
            .env("WORKERPASS", &self.password)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn buildbot-worker");
        self.child = Some(child);
    }

    /// Kills the worker process with SIGKILL and reaps it.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// What the worker has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("twistd.log")).unwrap_or_default()
    }
}
