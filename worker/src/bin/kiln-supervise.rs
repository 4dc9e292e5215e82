//! `kiln-supervise`: the supervisor of one shell command (see `kiln_worker::commands::supervise`)
//! as a binary of its own, so that starting it per command does not load the whole worker.

fn main() {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == kiln_worker::commands::supervise::ARG) {
        kiln_worker::commands::supervise::main(&argv[2..]);
    }
    eprintln!(
        "kiln-supervise is started by kiln-worker for each shell command: {} WATCHDOG_MS -- PROGRAM ARGS…",
        kiln_worker::commands::supervise::ARG
    );
    std::process::exit(2);
}
