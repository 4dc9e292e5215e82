//! The `shell` command: a child process in its own process group, its output streamed in
//! line-aligned chunks, killed as a group on interrupt or timeout.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::sync::mpsc;

use super::{Interrupt, Reporter, Stream, Update};

/// Arguments of a shell command, already resolved.
#[derive(Debug, Clone, Default)]
pub struct ShellArgs {
    pub argv: Vec<String>,
    pub script: Option<String>,
    pub workdir: PathBuf,
    pub env: BTreeMap<String, String>,
    pub unset_env: Vec<String>,
    pub timeout: Option<Duration>,
    pub max_time: Option<Duration>,
    pub log_environ: bool,
    /// Run under a supervisor that kills the command's group when the worker dies or stops
    /// feeding it (see `supervise`); `None` runs the program directly.
    pub supervision: Option<Supervision>,
}

/// How a command is supervised.
#[derive(Debug, Clone)]
pub struct Supervision {
    /// The supervisor: `kiln-supervise`, or the `kiln-worker` binary re-executed.
    pub program: PathBuf,
    /// The supervisor kills the command after this long without a feed.
    pub watchdog: Duration,
    /// Changes every heartbeat while the worker's session is alive; each change feeds the
    /// supervisor. Dropped senders stop the feeding.
    pub lifeline: tokio::sync::watch::Receiver<u64>,
}

/// Output is sent once this much is buffered, even in the middle of a line.
const MAX_CHUNK: usize = 64 * 1024;

/// Expands `${VAR}` from the worker's environment, as Buildbot's worker does.
fn expand(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        match rest[start + 2..].find('}') {
            Some(end) => {
                let name = &rest[start + 2..start + 2 + end];
                out.push_str(&std::env::var(name).unwrap_or_default());
                rest = &rest[start + 3 + end..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

fn quote(arg: &str) -> String {
    if !arg.is_empty() && arg.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid {
        // SAFETY: kill(2) on the process group the child leads; it was started with
        // process_group(0), so the group id equals its pid.
        unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
    }
}

/// Reads a pipe and forwards chunks that end on line boundaries where possible.
async fn pump(mut pipe: impl AsyncRead + Unpin, stream: Stream, tx: mpsc::Sender<(Stream, Vec<u8>)>) {
    let mut buffer = vec![0u8; 16 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        match pipe.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                pending.extend_from_slice(&buffer[..n]);
                let cut = if pending.len() >= MAX_CHUNK {
                    pending.len()
                } else {
                    match pending.iter().rposition(|&b| b == b'\n') {
                        Some(i) => i + 1,
                        None => continue,
                    }
                };
                let chunk: Vec<u8> = pending.drain(..cut).collect();
                if tx.send((stream, chunk)).await.is_err() {
                    return;
                }
            }
        }
    }
    if !pending.is_empty() {
        let _ = tx.send((stream, pending)).await;
    }
}

/// Runs a shell command to completion, interruption or timeout.
pub async fn run_shell(args: ShellArgs, report: &Reporter, mut interrupt: Interrupt) -> Result<(), String> {
    std::fs::create_dir_all(&args.workdir).map_err(|e| format!("cannot create {}: {e}", args.workdir.display()))?;
    let (program, shown): (Vec<String>, String) = if args.argv.is_empty() {
        let script = args.script.clone().unwrap_or_default();
        (vec!["/bin/sh".into(), "-c".into(), script.clone()], script)
    } else {
        (args.argv.clone(), args.argv.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" "))
    };
    let mut command = match &args.supervision {
        Some(supervision) => {
            let mut command = Command::new(&supervision.program);
            command
                .arg(super::supervise::ARG)
                .arg(supervision.watchdog.as_millis().to_string())
                .arg("--")
                .args(&program)
                .stdin(Stdio::piped());
            command
        }
        None => {
            let mut command = Command::new(&program[0]);
            command.args(&program[1..]).stdin(Stdio::null());
            command
        }
    };
    for name in &args.unset_env {
        command.env_remove(name);
    }
    for (name, value) in &args.env {
        command.env(name, expand(value));
    }
    command
        .current_dir(&args.workdir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    report.header(shown).await;
    report.header(format!(" in dir {}", args.workdir.display())).await;
    if args.log_environ {
        let mut env: BTreeMap<String, String> = std::env::vars().collect();
        for (k, v) in &args.env {
            env.insert(k.clone(), expand(v));
        }
        for (k, v) in env {
            report.header(format!(" {k}={v}")).await;
        }
    }
    let started = Instant::now();
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            report.header(format!("cannot start the command: {error}")).await;
            report.send(Update::Rc(-1)).await;
            report.send(Update::Elapsed(started.elapsed().as_secs_f64())).await;
            return Ok(());
        }
    };
    let pid = child.id();
    let mut lifeline_pipe = child.stdin.take();
    let mut lifeline = args.supervision.as_ref().map(|s| s.lifeline.clone());
    let (out_tx, mut out_rx) = mpsc::channel(16);
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    tokio::spawn(pump(stdout, Stream::Stdout, out_tx.clone()));
    tokio::spawn(pump(stderr, Stream::Stderr, out_tx));

    let mut last_output = Instant::now();
    let mut failure: Option<&str> = None;
    let mut status = None;
    let mut pipes_open = true;
    // After the process exits, output still in the pipes is read for a moment; a grandchild that
    // keeps them open does not hold the command forever.
    let mut exit_deadline: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let mut deadline = exit_deadline;
        if status.is_none() {
            if let Some(timeout) = args.timeout {
                deadline = Some(deadline.map_or(last_output + timeout, |d: Instant| d.min(last_output + timeout)));
            }
            if let Some(max) = args.max_time {
                deadline = Some(deadline.map_or(started + max, |d: Instant| d.min(started + max)));
            }
        }
        let sleep =
            tokio::time::sleep(deadline.map_or(Duration::from_secs(3600), |d| d.saturating_duration_since(now)));
        tokio::select! {
            chunk = out_rx.recv(), if pipes_open => match chunk {
                Some((stream, data)) => {
                    last_output = Instant::now();
                    report.send(Update::Output(stream, data)).await;
                }
                None => pipes_open = false,
            },
            exit = child.wait(), if status.is_none() => {
                status = Some(exit);
                exit_deadline = Some(Instant::now() + Duration::from_secs(2));
            }
            fed = async { lifeline.as_mut().expect("guarded").changed().await }, if lifeline.is_some() => {
                match (fed, lifeline_pipe.as_mut()) {
                    (Ok(()), Some(pipe)) => {
                        // A closed pipe means the supervisor has ended; nothing to feed.
                        use tokio::io::AsyncWriteExt;
                        if pipe.write_all(b".").await.is_err() {
                            lifeline_pipe = None;
                        }
                    }
                    // The session ended: stop feeding; the worker kills the command anyway.
                    _ => {
                        lifeline = None;
                        lifeline_pipe = None;
                    }
                }
            }
            changed = interrupt.changed(), if failure.is_none() => {
                if changed.is_err() || *interrupt.borrow() {
                    failure = Some("interrupted");
                    kill_group(pid);
                }
            }
            _ = sleep => {
                if status.is_some() {
                    // The process is gone but something still holds its output open.
                    kill_group(pid);
                    break;
                }
                let reason = if args.max_time.is_some_and(|m| started.elapsed() >= m) { "timeout" } else { "timeout_without_output" };
                failure = Some(reason);
                kill_group(pid);
            }
        }
        if status.is_some() && !pipes_open {
            break;
        }
    }
    // Whatever the leader did, leave nothing of its group behind.
    kill_group(pid);
    let rc = match status {
        Some(Ok(status)) if failure.is_none() => status.code().unwrap_or(-1),
        _ => -1,
    };
    match failure {
        Some("interrupted") => report.header("command interrupted").await,
        Some(reason) => {
            report.header(format!("command timed out ({reason}); killed")).await;
            report.send(Update::FailureReason(reason.to_owned())).await;
        }
        _ => {}
    }
    let elapsed = started.elapsed().as_secs_f64();
    report.header(format!("program finished with exit code {rc}")).await;
    report.header(format!("elapsedTime={elapsed:.6}")).await;
    report.send(Update::Rc(rc)).await;
    report.send(Update::Elapsed(elapsed)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(args: ShellArgs) -> (Vec<Update>, tokio::sync::watch::Sender<bool>) {
        let (tx, mut rx) = mpsc::channel(1024);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        run_shell(args, &Reporter::new(tx), stop_rx).await.unwrap();
        let mut updates = Vec::new();
        while let Ok(u) = rx.try_recv() {
            updates.push(u);
        }
        (updates, stop_tx)
    }

    fn output(updates: &[Update], stream: Stream) -> String {
        updates
            .iter()
            .filter_map(|u| match u {
                Update::Output(s, d) if *s == stream => Some(String::from_utf8_lossy(d).into_owned()),
                _ => None,
            })
            .collect()
    }

    fn rc(updates: &[Update]) -> Option<i32> {
        updates.iter().find_map(|u| if let Update::Rc(rc) = u { Some(*rc) } else { None })
    }

    #[tokio::test]
    async fn output_and_exit_status_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let args = ShellArgs {
            script: Some("echo out; echo err >&2; exit 3".into()),
            workdir: dir.path().join("w"),
            ..Default::default()
        };
        let (updates, _) = run(args).await;
        assert_eq!(output(&updates, Stream::Stdout), "out\n");
        assert_eq!(output(&updates, Stream::Stderr), "err\n");
        assert_eq!(rc(&updates), Some(3));
        assert!(output(&updates, Stream::Header).contains("program finished with exit code 3"));
    }

    #[tokio::test]
    async fn a_silent_command_is_killed_with_its_children_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survived");
        let args = ShellArgs {
            script: Some(format!("(sleep 1; touch {}) & sleep 30", marker.display())),
            workdir: dir.path().to_path_buf(),
            timeout: Some(Duration::from_millis(300)),
            ..Default::default()
        };
        let (updates, _) = run(args).await;
        assert_eq!(rc(&updates), Some(-1));
        assert!(updates.contains(&Update::FailureReason("timeout_without_output".into())));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!marker.exists(), "a child of the killed command kept running");
    }

    #[tokio::test]
    async fn environment_values_expand_worker_variables() {
        let dir = tempfile::tempdir().unwrap();
        let mut env = BTreeMap::new();
        env.insert("GREETING".into(), "hi ${HOME}".into());
        let args = ShellArgs {
            argv: vec!["sh".into(), "-c".into(), "echo $GREETING".into()],
            workdir: dir.path().into(),
            env,
            ..Default::default()
        };
        let (updates, _) = run(args).await;
        assert_eq!(output(&updates, Stream::Stdout), format!("hi {}\n", std::env::var("HOME").unwrap_or_default()));
    }
}
