//! The `kiln` command line against a running master: builders, force with a followed log,
//! queue, workers and pools, and a clear error for a builder nobody can force.

use std::process::Output;

use kiln_tests::binary;
use kiln_tests::system::{TestMaster, config_text};

fn kiln(master: &TestMaster, args: &[&str]) -> Output {
    std::process::Command::new(binary("kiln"))
        .args(args)
        .env("KILN_URL", format!("http://{}", master.http))
        .output()
        .expect("run kiln")
}

fn stdout(output: &Output) -> String {
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_lists_forces_and_follows_a_build() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let body = "pools:\n  - {name: ci, backend: static, min: 0, max: 3}\nbuilders:\n  - name: smoke\n    description: quick check\n    steps:\n      - shell: {name: count, command: \"for i in 1 2 3; do echo line $i; sleep 0.2; done\"}\n  - {name: hidden, steps: [{shell: {command: \"true\"}}]}\nschedulers:\n  - {type: force, name: force, builderNames: [smoke]}\n";
    let text = config_text(&db, dir.path(), body);
    let config = kiln_master::config::Config::parse("cli.yaml", &text).unwrap();
    let master = TestMaster::start_with(config, dir.path()).await;
    let _worker = master.spawn_pool_worker("cli-worker", "ci");
    master.wait_workers(1).await;

    let master_ref = &master;
    let run = |args: &'static [&'static str]| async move {
        let master = master_ref;
        tokio::task::block_in_place(|| kiln(master, args))
    };
    let builders = stdout(&run(&["builders"]).await);
    assert!(builders.contains("smoke") && builders.contains("quick check"), "{builders}");

    let forced = stdout(&run(&["force", "smoke", "--follow", "-p", "owner=cli"]).await);
    for line in ["[count] line 1", "[count] line 2", "[count] line 3"] {
        assert!(forced.contains(line), "{forced}");
    }
    assert!(forced.contains("build 1"), "{forced}");

    let logs = stdout(&run(&["logs", "1"]).await);
    assert!(logs.contains("[count] line 3"), "{logs}");
    let workers = stdout(&run(&["workers"]).await);
    assert!(workers.contains("cli-worker") && workers.contains("ci") && workers.contains("connected"), "{workers}");
    let pools = stdout(&run(&["pools"]).await);
    assert!(pools.contains("ci") && pools.contains("static"), "{pools}");
    let queue = stdout(&run(&["queue"]).await);
    assert!(queue.starts_with("REQUEST"), "{queue}");

    let refused = run(&["force", "hidden"]).await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no force scheduler offers builder \"hidden\""));
    master.stop().await;
}
