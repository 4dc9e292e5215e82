//! No secret leaks: a master and a worker run with every kind of secret configured — worker
//! token, API token and password, hook secrets, reporter tokens, the database password — through builds, hook
//! deliveries (good and badly signed), control actions with right and wrong credentials, the
//! REST API, `/metrics` and `--check`; then their logs (at debug level) and every answer are
//! searched for each secret.

use std::process::Stdio;
use std::time::Duration;

use hmac::{Hmac, Mac};
use kiln_tests::{binary, eventually, free_port};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);
const WORKER_TOKEN: &str = "wt-SECRET-1111";
const API_TOKEN: &str = "api-SECRET-2222";
const PASSWORD: &str = "pw-SECRET-3333";
const GITHUB: &str = "gh-SECRET-4444";
const GITLAB: &str = "gl-SECRET-5555";
const DATABASE_PASSWORD: &str = "db-SECRET-6666";
const REPORTER_TOKEN: &str = "rt-SECRET-7777";
const PUSH_TOKEN: &str = "pt-SECRET-8888";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_configured_secret_appears_in_logs_answers_or_metrics() {
    let dir = tempfile::tempdir().unwrap();
    // The throwaway cluster trusts local connections, so any password is accepted: enough to
    // see whether the master ever repeats it.
    let database =
        kiln_tests::pg::fresh_database().await.replacen("postgres@", &format!("postgres:{DATABASE_PASSWORD}@"), 1);
    assert!(database.contains(DATABASE_PASSWORD), "{database}");
    let (http, grpc) = (free_port(), free_port());
    let config = format!(
        "database: \"{database}\"\ndata_dir: \"{data}\"\n\
         http:\n  listen: 127.0.0.1:{http}\n  auth:\n    tokens: [{{name: ci, value: {API_TOKEN}}}]\n    users: [{{username: ada, password: {PASSWORD}}}]\n\
         workers:\n  listen: 127.0.0.1:{grpc}\n  heartbeat_interval: 0.5\n  tokens: [{{name: w, value: {WORKER_TOKEN}}}]\n\
         change_hooks:\n  base: true\n  github: {{secret: {GITHUB}}}\n  gitlab: {{secret: {GITLAB}}}\n\
         builders:\n  - name: b\n    steps:\n      - shell: {{command: [echo, built]}}\n\
         schedulers:\n  - {{type: force, name: force, builderNames: [b]}}\n  - {{type: any_branch, name: all, builderNames: [b]}}\n\
         services:\n  - {{type: github_status, name: gh, token_file: \"{token_file}\", base_url: \"http://127.0.0.1:1\"}}\n\
         \x20 - {{type: http_push, name: chat, url: \"http://127.0.0.1:1/hook\", bearer_env: KILN_TEST_PUSH_TOKEN}}\n",
        data = dir.path().join("data").display(),
        token_file = dir.path().join("reporter-token").display()
    );
    std::fs::write(dir.path().join("reporter-token"), REPORTER_TOKEN).unwrap();
    let path = dir.path().join("master.yaml");
    std::fs::write(&path, &config).unwrap();
    let master_log = dir.path().join("master.log");
    let _master = tokio::process::Command::new(binary("kiln-master"))
        .arg("--config")
        .arg(&path)
        .env("KILN_LOG", "debug")
        .env("KILN_TEST_PUSH_TOKEN", PUSH_TOKEN)
        .stdout(log_file(&master_log))
        .stderr(log_file(&master_log))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{http}");
    let client = reqwest::Client::new();
    eventually("the master to answer", MINUTE, || async {
        client.get(format!("{base}/api/v2/masters")).send().await.ok().filter(|r| r.status() == 200)
    })
    .await;
    let worker_log = dir.path().join("worker.log");
    let _worker = tokio::process::Command::new(binary("kiln-worker"))
        .args(["--master", &format!("http://127.0.0.1:{grpc}"), "--name", "w1", "--basedir"])
        .arg(dir.path().join("builds"))
        .env("KILN_WORKER_TOKEN", WORKER_TOKEN)
        .env("KILN_LOG", "debug")
        .stdout(log_file(&worker_log))
        .stderr(log_file(&worker_log))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let _intruder = tokio::process::Command::new(binary("kiln-worker"))
        .args(["--master", &format!("http://127.0.0.1:{grpc}"), "--name", "w2", "--basedir"])
        .arg(dir.path().join("builds2"))
        .env("KILN_WORKER_TOKEN", "wrong-token")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let mut answers = Vec::new();
    let force = json!({ "jsonrpc": "2.0", "method": "force", "id": 1, "params": {} });
    let url = format!("{base}/api/v2/forceschedulers/force");
    for auth in [
        format!("Bearer {API_TOKEN}"),
        "Bearer wrong".to_owned(),
        format!("Basic {}", base64_of(&format!("ada:{PASSWORD}"))),
        format!("Basic {}", base64_of("ada:wrong")),
    ] {
        let reply = client.post(&url).header("Authorization", auth).json(&force).send().await.unwrap();
        answers.push(reply.text().await.unwrap());
    }
    let push = br#"{"ref": "refs/heads/main", "after": "abc", "commits": [], "repository": {"html_url": "https://example.org/r", "full_name": "o/r"}}"#;
    for signature in [sign(GITHUB, push), sign("wrong", push)] {
        let reply = client
            .post(format!("{base}/change_hook/github"))
            .header("Content-Type", "application/json")
            .header("X-GitHub-Event", "push")
            .header("X-Hub-Signature-256", signature)
            .body(push.to_vec())
            .send()
            .await
            .unwrap();
        answers.push(reply.text().await.unwrap());
    }
    for token in [GITLAB, "wrong"] {
        let reply = client
            .post(format!("{base}/change_hook/gitlab"))
            .header("Content-Type", "application/json")
            .header("X-Gitlab-Token", token)
            .body(b"{\"object_kind\": \"push\"}".to_vec())
            .send()
            .await
            .unwrap();
        answers.push(reply.text().await.unwrap());
    }
    let done = eventually("a build to finish", MINUTE, || async {
        let builds: serde_json::Value =
            client.get(format!("{base}/api/v2/builds?complete=true")).send().await.ok()?.json().await.ok()?;
        (builds["meta"]["total"].as_i64()? >= 1).then_some(builds)
    })
    .await;
    answers.push(done.to_string());
    for path in [
        "/api/v2/workers",
        "/api/v2/masters",
        "/api/v2/builders",
        "/api/v2/changes",
        "/metrics",
        "/readyz",
        "/api/v2/pools",
    ] {
        answers.push(client.get(format!("{base}{path}")).send().await.unwrap().text().await.unwrap());
    }
    let check = std::process::Command::new(binary("kiln-master"))
        .arg("--config")
        .arg(&path)
        .arg("--check")
        .env("KILN_TEST_PUSH_TOKEN", PUSH_TOKEN)
        .output()
        .unwrap();
    answers.push(String::from_utf8_lossy(&check.stdout).into_owned() + &String::from_utf8_lossy(&check.stderr));
    tokio::time::sleep(Duration::from_secs(1)).await;

    let logs = std::fs::read_to_string(&master_log).unwrap() + &std::fs::read_to_string(&worker_log).unwrap();
    assert!(logs.contains("build finished") && logs.contains("is running"), "the run happened:\n{logs}");
    assert!(logs.contains("a report will be retried"), "the reporters tried:\n{logs}");
    // Written to files, the logs are plain text: no terminal colour codes for a log reader to trip on.
    assert!(!logs.contains('\u{1b}'), "an escape code in a redirected log:\n{logs}");
    for secret in [WORKER_TOKEN, API_TOKEN, PASSWORD, GITHUB, GITLAB, DATABASE_PASSWORD, REPORTER_TOKEN, PUSH_TOKEN] {
        for line in logs.lines() {
            assert!(!line.contains(secret), "a log line holds {secret}: {line}");
        }
        for answer in &answers {
            assert!(!answer.contains(secret), "an answer holds {secret}: {answer}");
        }
    }
}

/// A log file both output streams append to, so neither overwrites the other.
fn log_file(path: &std::path::Path) -> std::fs::File {
    std::fs::File::options().create(true).append(true).open(path).unwrap()
}

fn base64_of(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}
