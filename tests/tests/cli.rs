//! The `kiln` command line against a running master: builders, force with a followed log,
//! queue, workers and pools, and a clear error for a builder nobody can force; exit statuses a
//! script can gate on, JSON listings, and what it says when no master answers.

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
    assert!(workers.contains("cli-worker") && workers.contains("ci") && workers.contains("idle"), "{workers}");
    let pools = stdout(&run(&["pools"]).await);
    assert!(pools.contains("ci") && pools.contains("static"), "{pools}");
    let queue = stdout(&run(&["queue"]).await);
    assert!(queue.starts_with("REQUEST"), "{queue}");

    let refused = run(&["force", "hidden"]).await;
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no force scheduler offers builder \"hidden\""));
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_statuses_follow_the_build_and_listings_are_fit_for_scripts() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let body = "collapseRequests: false\nbuilders:\n  - {name: green, steps: [{shell: {command: \"true\"}}]}\n  - {name: red, steps: [{shell: {command: \"exit 3\"}}]}\n  - {name: amber, steps: [{shell: {command: \"exit 1\", warnOnFailure: true, flunkOnFailure: false}}]}\n  - {name: waiting, workernames: [nobody], steps: [{shell: {command: \"true\"}}]}\nschedulers:\n  - {type: force, name: force, builderNames: [green, red, amber, waiting]}\n";
    let config = kiln_master::config::Config::parse("cli.yaml", &config_text(&db, dir.path(), body)).unwrap();
    let master = TestMaster::start_with(config, dir.path()).await;
    let _worker = master.spawn_worker("w1");
    master.wait_workers(1).await;
    let run = |args: Vec<&str>| {
        let master = &master;
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            tokio::task::block_in_place(|| kiln(master, &args))
        }
    };
    let code = |output: &Output| output.status.code();

    assert_eq!(code(&run(vec!["force", "green", "--follow"]).await), Some(0));
    let red = run(vec!["force", "red", "--follow"]).await;
    assert_eq!(code(&red), Some(1), "a failed build fails the script: {}", String::from_utf8_lossy(&red.stdout));
    let red_build = String::from_utf8_lossy(&red.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("build ").and_then(|r| r.strip_suffix(" started")).map(str::to_owned))
        .expect("the build's id");
    assert_eq!(code(&run(vec!["logs", "-f", &red_build]).await), Some(1));
    assert_eq!(code(&run(vec!["logs", &red_build]).await), Some(0), "printing logs is not a verdict");
    assert_eq!(code(&run(vec!["force", "amber", "--follow"]).await), Some(0), "WARNINGS passes by default");
    assert_eq!(code(&run(vec!["force", "amber", "--follow", "--warnings-fail"]).await), Some(1));

    // A request no worker can take stays in the queue, with a time a person can read.
    assert_eq!(code(&run(vec!["force", "waiting"]).await), Some(0));
    let queue = stdout(&run(vec!["queue"]).await);
    let row = queue.lines().find(|l| l.contains("waiting")).expect(&queue);
    let stamp = row.split_whitespace().rev().take(2).collect::<Vec<_>>();
    assert!(stamp[1].len() == 10 && stamp[1].as_bytes()[4] == b'-' && stamp[0].len() == 8, "{row}");

    let workers = stdout(&run(vec!["workers"]).await);
    assert!(workers.lines().any(|l| l.starts_with("w1") && l.contains("idle")), "{workers}");
    let listed: serde_json::Value = serde_json::from_str(&stdout(&run(vec!["--json", "workers"]).await)).unwrap();
    assert_eq!(listed[0]["name"], "w1");
    let queued: serde_json::Value = serde_json::from_str(&stdout(&run(vec!["queue", "--json"]).await)).unwrap();
    assert_eq!(queued.as_array().unwrap().len(), 1);

    let version = stdout(&run(vec!["--version"]).await);
    assert!(version.starts_with("kiln "), "{version}");
    let help = stdout(&run(vec!["force", "--help"]).await);
    assert!(!help.contains("KILN_URL="), "an unset variable does not look like a value: {help}");
    assert!(help.contains("--repository") && help.contains("The builder to build"), "{help}");
    master.stop().await;

    // No master: say so, with the address, and exit 2.
    let port = kiln_tests::free_port();
    let output = std::process::Command::new(binary("kiln"))
        .arg("builders")
        .env("KILN_URL", format!("http://127.0.0.1:{port}"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with(&format!("kiln: cannot connect to http://127.0.0.1:{port}: is kiln-master running?")),
        "{stderr}"
    );
}
