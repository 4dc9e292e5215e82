//! The supervisor of one shell command, so that no command outlives its worker: `kiln-worker`
//! re-executes itself as `kiln-worker __kiln-supervise WATCHDOG_MS -- PROGRAM ARGS…` at the head
//! of the command's process group, and the supervisor runs the program in that group.
//!
//! The supervisor's standard input is a pipe from the worker, its *lifeline*: the worker writes
//! a byte to it every heartbeat for as long as its session with the master is alive. When the
//! pipe reaches end-of-file (the worker died, even by SIGKILL, since the kernel closes its end)
//! or stays silent for the watchdog time (the worker is frozen, or it lost its master), the
//! supervisor kills its whole process group — the program, everything the program started in
//! the group, and itself. Otherwise it exits with the program's status (re-raising the signal
//! that killed the program), so the worker sees what it would have seen without it.
//!
//! Chosen over the alternatives: a parent-death signal reaches only the direct child, not the
//! shell's children; making the worker a subreaper does nothing once the worker itself is dead;
//! a cgroup needs a delegated cgroup tree, which an unprivileged worker or a plain container
//! does not have. A process that leaves the group on purpose (`setsid`) escapes all but a
//! cgroup; that is documented.

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// The first argument that turns `kiln-worker` into a supervisor.
pub const ARG: &str = "__kiln-supervise";

/// Runs the supervisor with the arguments after [`ARG`]; never returns.
pub fn main(args: &[OsString]) -> ! {
    let (watchdog, program) = match parse(args) {
        Ok(parsed) => parsed,
        Err(reason) => {
            eprintln!("kiln-worker {ARG}: {reason}");
            std::process::exit(125);
        }
    };
    let mut child =
        match std::process::Command::new(&program[0]).args(&program[1..]).stdin(std::process::Stdio::null()).spawn() {
            Ok(child) => child,
            Err(error) => {
                eprintln!("cannot start {}: {error}", program[0].to_string_lossy());
                std::process::exit(127);
            }
        };
    std::thread::spawn(move || {
        watch_lifeline(watchdog);
        kill_own_group();
    });
    match child.wait() {
        Ok(status) => exit_like(status),
        Err(_) => {
            kill_own_group();
            std::process::exit(126);
        }
    }
}

fn parse(args: &[OsString]) -> Result<(Duration, Vec<OsString>), String> {
    let watchdog = args
        .first()
        .and_then(|a| a.to_str())
        .and_then(|a| a.parse::<u64>().ok())
        .ok_or("expected the watchdog time in milliseconds")?;
    if args.get(1).and_then(|a| a.to_str()) != Some("--") {
        return Err("expected -- before the program".into());
    }
    let program = args[2..].to_vec();
    if program.is_empty() {
        return Err("no program to run".into());
    }
    Ok((Duration::from_millis(watchdog), program))
}

/// Returns when the lifeline on standard input ends or is silent for `watchdog`.
fn watch_lifeline(watchdog: Duration) {
    let stdin = std::io::stdin();
    let fd = stdin.as_raw_fd();
    let mut last_fed = Instant::now();
    let mut buffer = [0u8; 64];
    loop {
        let left = watchdog.saturating_sub(last_fed.elapsed());
        if left.is_zero() {
            return;
        }
        let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: poll(2) on one valid pollfd that lives across the call.
        let ready = unsafe { libc::poll(&mut poll, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if ready < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if ready == 0 {
            continue;
        }
        // SAFETY: read(2) into a buffer of the given length.
        let read = unsafe { libc::read(fd, buffer.as_mut_ptr().cast(), buffer.len()) };
        if read <= 0 {
            // End of file: the worker is gone.
            return;
        }
        last_fed = Instant::now();
    }
}

fn kill_own_group() {
    // SAFETY: kill(2) with pid 0 signals every process of the caller's group, this one too.
    unsafe { libc::kill(0, libc::SIGKILL) };
    std::process::exit(137);
}

/// Exits as the program did: with its code, or killed by the same signal.
fn exit_like(status: std::process::ExitStatus) -> ! {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        std::process::exit(code);
    }
    if let Some(signal) = status.signal() {
        // SAFETY: restoring the default action of a signal and sending it to ourselves.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            libc::kill(libc::getpid(), signal);
        }
        std::process::exit(128 + signal);
    }
    std::process::exit(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn arguments_name_the_watchdog_and_the_program() {
        let (watchdog, program) = parse(&args(&["1500", "--", "sh", "-c", "true"])).unwrap();
        assert_eq!(watchdog, Duration::from_millis(1500));
        assert_eq!(program, args(&["sh", "-c", "true"]));
        assert!(parse(&args(&["x", "--", "sh"])).is_err());
        assert!(parse(&args(&["10", "sh"])).is_err());
        assert!(parse(&args(&["10", "--"])).is_err());
    }
}
