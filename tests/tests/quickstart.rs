//! The README's quickstart as a new user follows it: the master on `config/quickstart.yaml` (moved
//! to free ports), the commands its start-up banner prints, then the README's commands in order —
//! every one works, every build they start ends SUCCESS, and forcing a few at once grows the pool.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use kiln_tests::repo::TestRepo;
use kiln_tests::{binary, eventually, free_port};
use tokio::io::{AsyncBufReadExt, BufReader};

const MINUTE: Duration = Duration::from_secs(60);

/// The commands of the README's first shell block after "From another terminal:", with
/// continuation lines joined and comments left out.
fn readme_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let after = &readme[readme.find("From another terminal:").expect("the quickstart's commands")..];
    let block = after.split("```sh\n").nth(1).and_then(|b| b.split("\n```").next()).expect("a shell block");
    let mut commands = Vec::new();
    let mut current = String::new();
    for line in block.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        match line.strip_suffix('\\') {
            Some(start) => current.push_str(start),
            None => {
                current.push_str(line);
                commands.push(std::mem::take(&mut current));
            }
        }
    }
    commands
}

/// Runs one command as a user would paste it into bash.
fn sh(command: &str, cwd: &Path, env: &[(&str, String)]) -> std::process::Output {
    std::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", command])
        .current_dir(cwd)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap()
}

fn check(output: &std::process::Output, command: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{command}\n{stdout}{}", String::from_utf8_lossy(&output.stderr));
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_works_as_the_readme_and_the_banner_say() {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let (http, grpc) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let config = std::fs::read_to_string(root.join("config/quickstart.yaml"))
        .unwrap()
        .replace("127.0.0.1:8010", &http)
        .replace("127.0.0.1:9989", &grpc);
    std::fs::write(dir.path().join("quickstart.yaml"), config).unwrap();
    let repo = TestRepo::init(&dir.path().join("repo"));
    repo.commit("start", &[("README", "hello\n")]);

    let mut master = tokio::process::Command::new(binary("kiln-master"))
        .args(["--config", "quickstart.yaml"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("master.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(master.stdout.take().unwrap()).lines();
    let mut banner = Vec::new();
    tokio::time::timeout(MINUTE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let done = line.starts_with("Press Ctrl-C");
            banner.push(line);
            if done {
                break;
            }
        }
    })
    .await
    .expect("the start-up banner");
    // The binaries the banner and the README name by their place in a clone.
    let bin = binary("kiln").parent().unwrap().display().to_string();
    let local = |command: &str| command.replace("target/debug/", &format!("{bin}/"));
    let env = [("KILN_URL", format!("http://{http}"))];

    // The banner's commands: the force it shows builds `smoke` and passes, the curl form too, and
    // its change hook, run in a git repository, builds that repository's head.
    let shown = |label: &str| {
        banner
            .iter()
            .find_map(|l| l.trim().strip_prefix(label).map(str::trim).map(str::to_owned))
            .unwrap_or_else(|| panic!("no {label:?} in the banner:\n{}", banner.join("\n")))
    };
    let force = shown("force a build:");
    assert!(force.contains("force smoke"), "the first build forced needs no repository: {force}");
    check(&sh(&local(&force), dir.path(), &env), &force);
    let curl = shown("or:");
    let reply = check(&sh(&curl, dir.path(), &env), &curl);
    assert!(reply.contains("\"result\""), "{reply}");
    let hook = shown("change hook:").replace("(in a git repository) ", "");
    assert_eq!(check(&sh(&hook, &repo.path, &env), &hook), "1 change found");

    // The README's commands, in order. A GET the user runs a moment later answers 200.
    let client = reqwest::Client::new();
    for command in readme_commands() {
        let command =
            local(&command).replace("127.0.0.1:8010", &http).replace("/path/to/repo", &repo.path.display().to_string());
        if let Some(url) = command.strip_prefix("curl ").filter(|rest| rest.starts_with("http")) {
            let url = url.trim().to_owned();
            eventually(&format!("{url} to answer 200"), MINUTE, || async {
                (client.get(&url).send().await.ok()?.status() == 200).then_some(())
            })
            .await;
        } else {
            check(&sh(&command, dir.path(), &env), &command);
        }
    }

    // Five smoke builds are waiting or running: the pool grows past one worker.
    let api = |path: &str| {
        let request = client.get(format!("http://{http}/api/v2/{path}")).send();
        async move { request.await.ok()?.json::<serde_json::Value>().await.ok() }
    };
    eventually("the local pool to grow", MINUTE, || async {
        let listed = api("workers").await?;
        let connected = listed["workers"]
            .as_array()?
            .iter()
            .filter(|w| w["connected_to"].as_array().is_some_and(|c| !c.is_empty()))
            .count();
        (connected >= 3).then_some(())
    })
    .await;
    let builds = eventually("every build to finish", Duration::from_secs(120), || async {
        if api("buildrequests?complete=false").await?["meta"]["total"] != 0 {
            return None;
        }
        let builds = api("builds").await?;
        Some(builds["builds"].as_array()?.clone())
    })
    .await;
    assert!(builds.len() >= 8, "the banner's two forces and hook, the README's five forces and hook: {builds:?}");
    for build in &builds {
        assert_eq!(build["results"], 0, "{build}");
    }
    let logs = check(&sh(&local("target/debug/kiln logs 1"), dir.path(), &env), "kiln logs 1");
    assert!(logs.contains("[count] step 3"), "{logs}");
    // SAFETY: kill(2) on our own child, which has not been waited for.
    unsafe { libc::kill(master.id().unwrap() as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(MINUTE, master.wait()).await.expect("the master stops").unwrap();
    assert!(status.success(), "{status:?}");
}
