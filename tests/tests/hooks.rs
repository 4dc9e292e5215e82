//! GitHub and GitLab change hooks end to end: fixture payloads written from the documented
//! schemas, signatures computed here, a real repository the builds check out.

use std::time::Duration;

use hmac::{Hmac, Mac};
use kiln_tests::repo::TestRepo;
use kiln_tests::system::{TestMaster, urlencode};
use serde_json::Value;

const MINUTE: Duration = Duration::from_secs(60);
const SECRET: &str = "it is a secret to everybody";

/// Collapsing is off so that each commit of a push gets its own build, to check them all.
const SETUP: &str = r#"
collapseRequests: false
change_hooks:
  github: {secret: "it is a secret to everybody"}
  gitlab: {secret: gitlab-token}
builders:
  - name: hello
    steps:
      - git: {mode: full}
      - shell: {name: cat, command: [cat, hello.txt]}
schedulers:
  - {type: single_branch, name: every, builderNames: [hello]}
"#;

struct World {
    master: TestMaster,
    repo: TestRepo,
    parent: String,
    first: String,
    head: String,
    _dir: tempfile::TempDir,
}

async fn world() -> World {
    world_with("").await
}

/// [`world`] with more `http` settings (YAML lines under `http:`).
async fn world_with(http: &str) -> World {
    let dir = tempfile::tempdir().unwrap();
    let repo = TestRepo::init(&dir.path().join("upstream"));
    let parent = repo.commit("start", &[("README", "hello\n")]);
    let first = repo.commit("Add the greeting", &[("hello.txt", "hello\n")]);
    let head = repo.commit("Say hello to Kiln", &[("hello.txt", "hello kiln\n")]);
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let text = kiln_tests::system::config_text(&database, dir.path(), SETUP)
        .replace("  auth: open\n", &format!("  auth: open\n{http}"));
    let config = kiln_master::config::Config::parse("test.yaml", &text).unwrap();
    let master = TestMaster::start_with(config, dir.path()).await;
    World { master, repo, parent, first, head, _dir: dir }
}

impl World {
    fn fixture(&self, name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name);
        std::fs::read_to_string(path)
            .unwrap()
            .replace("{{REPO}}", &self.repo.path.display().to_string())
            .replace("{{PARENT}}", &self.parent)
            .replace("{{FIRST}}", &self.first)
            .replace("{{HEAD}}", &self.head)
            .into_bytes()
    }

    async fn post(&self, dialect: &str, headers: &[(&str, String)], body: Vec<u8>) -> (u16, String) {
        let mut request = self.master.client.post(self.master.url(&format!("/change_hook/{dialect}"))).body(body);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    async fn github(&self, event: &str, body: Vec<u8>) -> (u16, String) {
        let signature = sign_sha256(SECRET, &body);
        let headers = [
            ("Content-Type", "application/json".to_owned()),
            ("X-GitHub-Event", event.to_owned()),
            ("X-Hub-Signature-256", signature),
        ];
        self.post("github", &headers, body).await
    }

    async fn gitlab(&self, body: Vec<u8>, token: Option<&str>) -> (u16, String) {
        let mut headers = vec![("Content-Type", "application/json".to_owned())];
        if let Some(token) = token {
            headers.push(("X-Gitlab-Token", token.to_owned()));
        }
        self.post("gitlab", &headers, body).await
    }

    async fn changes(&self) -> Vec<Value> {
        self.master.get("/api/v2/changes").await["changes"].as_array().unwrap().clone()
    }
}

fn sign_sha256(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn sign_sha1(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha1={}", hex::encode(mac.finalize().into_bytes()))
}

async fn got_revision(master: &TestMaster, brid: i64) -> (i64, String) {
    let build = master.wait_build_of_request(brid, MINUTE).await;
    let props = master.get(&format!("/api/v2/builds/{}?property=got_revision", build["buildid"])).await;
    let revision = props["builds"][0]["properties"]["got_revision"][0].as_str().unwrap_or_default().to_owned();
    (build["results"].as_i64().unwrap(), revision)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_github_push_builds_each_commit() {
    let w = world().await;
    let _worker = w.master.spawn_worker("w1");
    let (status, body) = w.github("push", w.fixture("github/push.json")).await;
    assert_eq!((status, body.as_str()), (200, "2 change found"));
    let changes = w.changes().await;
    assert_eq!(changes.len(), 2);
    assert_eq!(changes[0]["revision"], w.first.as_str());
    assert_eq!(changes[0]["author"], "Ada Lovelace <ada@example.org>");
    assert_eq!(changes[0]["files"], serde_json::json!(["hello.txt"]));
    assert_eq!(changes[0]["when_timestamp"], 1_795_162_500, "2026-11-20T09:15:00+01:00");
    assert_eq!(changes[0]["project"], "octo-org/hello");
    assert_eq!(changes[0]["properties"]["github_distinct"], serde_json::json!([true, "Change"]));
    assert_eq!(changes[1]["committer"], "GitHub <noreply@github.com>");
    let requests = w.master.get("/api/v2/buildrequests").await;
    let brids: Vec<i64> =
        requests["buildrequests"].as_array().unwrap().iter().map(|r| r["buildrequestid"].as_i64().unwrap()).collect();
    assert_eq!(got_revision(&w.master, brids[0]).await, (0, w.first.clone()));
    assert_eq!(got_revision(&w.master, brids[1]).await, (0, w.head.clone()));
    w.master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_deliveries_must_carry_a_valid_signature() {
    let w = world().await;
    let body = w.fixture("github/push.json");
    let unsigned = [("Content-Type", "application/json".to_owned()), ("X-GitHub-Event", "push".to_owned())];
    let (status, reason) = w.post("github", &unsigned, body.clone()).await;
    assert_eq!(status, 401, "{reason}");
    let mut wrong = unsigned.to_vec();
    wrong.push(("X-Hub-Signature-256", sign_sha256("guess", &body)));
    assert_eq!(w.post("github", &wrong, body.clone()).await.0, 403);
    let mut tampered = unsigned.to_vec();
    tampered.push(("X-Hub-Signature-256", sign_sha256(SECRET, b"another body")));
    assert_eq!(w.post("github", &tampered, body.clone()).await.0, 403);
    assert!(w.changes().await.is_empty(), "nothing stored from refused deliveries");

    // The legacy SHA-1 header is still accepted, and so is a form-encoded delivery.
    let ping = w.fixture("github/ping.json");
    let legacy = [
        ("Content-Type", "application/json".to_owned()),
        ("X-GitHub-Event", "ping".to_owned()),
        ("X-Hub-Signature", sign_sha1(SECRET, &ping)),
    ];
    assert_eq!(w.post("github", &legacy, ping).await, (200, "no change found".to_owned()));
    let form = format!("payload={}", urlencode(&String::from_utf8(body).unwrap())).into_bytes();
    let form_headers = [
        ("Content-Type", "application/x-www-form-urlencoded".to_owned()),
        ("X-GitHub-Event", "push".to_owned()),
        ("X-Hub-Signature-256", sign_sha256(SECRET, &form)),
    ];
    assert_eq!(w.post("github", &form_headers, form).await.0, 200);
    assert_eq!(w.changes().await.len(), 2);

    let (status, reason) = w.github("push", b"{\"ref\": ".to_vec()).await;
    assert_eq!(status, 400);
    assert!(reason.contains("invalid JSON"), "{reason}");
    let (status, reason) = w.github("fork", b"{}".to_vec()).await;
    assert_eq!((status, reason.as_str()), (400, "Unknown event: fork"));
    w.master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_tags_deletions_and_skips_follow_buildbot() {
    let w = world().await;
    let (status, _) = w.github("push", w.fixture("github/tag.json")).await;
    assert_eq!(status, 200);
    let changes = w.changes().await;
    assert_eq!(changes.len(), 1, "a created ref gives its head commit only");
    assert_eq!((changes[0]["branch"].as_str(), changes[0]["category"].as_str()), (Some("v1.0"), Some("tag")));

    let mut deleted: Value = serde_json::from_slice(&w.fixture("github/push.json")).unwrap();
    deleted["deleted"] = Value::Bool(true);
    assert_eq!(w.github("push", deleted.to_string().into_bytes()).await.1, "no change found");
    let mut skipped: Value = serde_json::from_slice(&w.fixture("github/push.json")).unwrap();
    skipped["head_commit"]["message"] = Value::from("Fix a typo [skip ci]");
    assert_eq!(w.github("push", skipped.to_string().into_bytes()).await.1, "no change found");
    assert_eq!(w.changes().await.len(), 1);
    w.master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_github_pull_request_builds_its_head_through_the_pull_ref() {
    let w = world().await;
    // GitHub keeps `refs/pull/<n>/merge` in the base repository; so does this one.
    let git = git2::Repository::open(&w.repo.path).unwrap();
    git.reference("refs/pull/7/merge", git2::Oid::from_str(&w.head).unwrap(), true, "pull request").unwrap();
    let _worker = w.master.spawn_worker("w1");
    let (status, body) = w.github("pull_request", w.fixture("github/pull_request.json")).await;
    assert_eq!((status, body.as_str()), (200, "1 change found"));
    let change = &w.changes().await[0];
    assert_eq!(change["branch"], "refs/pull/7/merge");
    assert_eq!(change["category"], "pull");
    assert_eq!(change["properties"]["pullrequesturl"][0], "https://github.com/octo-org/hello/pull/7");
    let brid = w.master.get("/api/v2/buildrequests").await["buildrequests"][0]["buildrequestid"].as_i64().unwrap();
    assert_eq!(got_revision(&w.master, brid).await, (0, w.head.clone()));
    w.master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitlab_deliveries_need_the_token_and_map_like_buildbot() {
    let w = world().await;
    let push = w.fixture("gitlab/push.json");
    assert_eq!(w.gitlab(push.clone(), None).await.0, 401);
    assert_eq!(w.gitlab(push.clone(), Some("guess")).await.0, 403);
    assert!(w.changes().await.is_empty());
    assert_eq!(w.gitlab(push, Some("gitlab-token")).await, (200, "1 change found".to_owned()));
    assert_eq!(w.gitlab(w.fixture("gitlab/tag_push.json"), Some("gitlab-token")).await.0, 200);
    assert_eq!(w.gitlab(w.fixture("gitlab/merge_request.json"), Some("gitlab-token")).await.0, 200);
    // A comment on the merge request is a change for it, as in Buildbot.
    assert_eq!(w.gitlab(w.fixture("gitlab/note.json"), Some("gitlab-token")).await.0, 200);
    let changes = w.changes().await;
    assert_eq!(changes.len(), 4);
    // Buildbot's mapping, so that a change_filter copied from a Buildbot config matches: a push's
    // repository is the project's SSH URL and its project the display name; a merge request's
    // are the target's HTTP URL and name.
    assert_eq!(changes[0]["repository"], "git@gitlab.example.org:group/hello.git");
    assert_eq!(changes[0]["project"], "Hello");
    assert_eq!(changes[0]["category"], "push");
    assert_eq!(changes[0]["revision"], w.head.as_str());
    assert_eq!((changes[1]["branch"].as_str(), changes[1]["category"].as_str()), (Some("v1.0"), Some("tag_push")));
    assert_eq!((changes[2]["branch"].as_str(), changes[2]["category"].as_str()), (Some("main"), Some("merge_request")));
    assert_eq!(changes[2]["properties"]["source_branch"][0], "french");
    assert_eq!(changes[2]["properties"]["target_git_ssh_url"][0], "git@gitlab.example.org:group/hello.git");
    assert_eq!(changes[2]["properties"]["source_git_ssh_url"][0], "git@gitlab.example.org:ada/hello.git");
    assert_eq!(
        (changes[2]["repository"].as_str(), changes[2]["project"].as_str()),
        (Some(w.repo.path.to_str().unwrap()), Some("Hello"))
    );
    assert_eq!(
        (changes[3]["category"].as_str(), changes[3]["revision"].as_str()),
        (Some("note"), Some(w.head.as_str()))
    );
    assert_eq!(changes[3]["properties"]["comments"][0], "The bonjour looks right; rebuild please.");
    assert_eq!(w.gitlab(b"not json".to_vec(), Some("gitlab-token")).await.0, 400);
    // Events Kiln does not act on are answered 200, or GitLab would disable the webhook after
    // four of them in a row; they store nothing.
    for kind in ["wiki_page", "pipeline", "build", "note"] {
        let body = format!("{{\"object_kind\": \"{kind}\"}}").into_bytes();
        let (status, reason) = w.gitlab(body, Some("gitlab-token")).await;
        assert_eq!(status, 200, "{kind}: {reason}");
        assert!(reason.starts_with("ignored: "), "{kind}: {reason}");
    }
    assert_eq!(w.changes().await.len(), 4);
    w.master.stop().await;
}

/// Posts `body` to `master`'s `dialect` hook with `headers` (the GitHub signature is added).
async fn deliver(master: &TestMaster, dialect: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    let mut request = master
        .client
        .post(master.url(&format!("/change_hook/{dialect}")))
        .header("Content-Type", "application/json")
        .body(body.to_vec());
    if dialect == "github" {
        request = request.header("X-Hub-Signature-256", sign_sha256(SECRET, body));
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_webhook_is_acted_on_once_across_masters() {
    let dir = tempfile::tempdir().unwrap();
    let repo = TestRepo::init(&dir.path().join("upstream"));
    let parent = repo.commit("start", &[("README", "hello\n")]);
    let first = repo.commit("Add the greeting", &[("hello.txt", "hello\n")]);
    let head = repo.commit("Say hello to Kiln", &[("hello.txt", "hello kiln\n")]);
    let database = kiln_tests::pg::fresh_database().await;
    let a = TestMaster::start(&database, &dir.path().join("a"), &format!("master_name: a\n{SETUP}")).await;
    let b = TestMaster::start(&database, &dir.path().join("b"), &format!("master_name: b\n{SETUP}")).await;
    let fixture = |name: &str| {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name);
        std::fs::read_to_string(path)
            .unwrap()
            .replace("{{REPO}}", &repo.path.display().to_string())
            .replace("{{PARENT}}", &parent)
            .replace("{{FIRST}}", &first)
            .replace("{{HEAD}}", &head)
            .into_bytes()
    };
    let push = fixture("github/push.json");
    let github = [("X-GitHub-Event", "push"), ("X-GitHub-Delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958")];
    // The same delivery reaches both masters at once (a retry racing the original), then again.
    let (one, two) = tokio::join!(deliver(&a, "github", &github, &push), deliver(&b, "github", &github, &push));
    let mut answers = [one.1.clone(), two.1.clone()];
    answers.sort();
    assert_eq!((one.0, two.0), (200, 200));
    assert_eq!(answers, ["2 change found".to_owned(), "already processed".to_owned()]);
    assert_eq!(deliver(&b, "github", &github, &push).await, (200, "already processed".to_owned()));
    // Another delivery of the same payload is a new event: GitHub gives it a new id.
    let again = [("X-GitHub-Event", "push"), ("X-GitHub-Delivery", "9a1b6f2c-cc78-11e3-81ab-4c9367dc0958")];
    assert_eq!(deliver(&a, "github", &again, &push).await, (200, "2 change found".to_owned()));

    let gitlab_push = fixture("gitlab/push.json");
    let idempotent = [("X-Gitlab-Token", "gitlab-token"), ("Idempotency-Key", "908a6d9e-45fd-46c8-97e6-c4f350f219dd")];
    assert_eq!(deliver(&a, "gitlab", &idempotent, &gitlab_push).await, (200, "1 change found".to_owned()));
    assert_eq!(deliver(&b, "gitlab", &idempotent, &gitlab_push).await, (200, "already processed".to_owned()));
    let uuid = [("X-Gitlab-Token", "gitlab-token"), ("X-Gitlab-Event-UUID", "13792a34-cac6-4fda-95a8-c58e00a3954e")];
    assert_eq!(deliver(&b, "gitlab", &uuid, &gitlab_push).await, (200, "1 change found".to_owned()));
    assert_eq!(deliver(&a, "gitlab", &uuid, &gitlab_push).await, (200, "already processed".to_owned()));

    assert_eq!(a.get("/api/v2/changes").await["meta"]["total"], 6, "2 + 2 from GitHub, 1 + 1 from GitLab");
    assert_eq!(b.get("/api/v2/buildrequests").await["meta"]["total"], 6, "one build request per change");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialect_not_configured_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let master = TestMaster::start(
        &database,
        dir.path(),
        "builders:\n  - name: b\n    steps:\n      - shell: {command: [\"true\"]}\n",
    )
    .await;
    let response = master.client.post(master.url("/change_hook/github")).body("{}").send().await.unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("wasn't whitelisted"));
    master.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_of_a_few_megabytes_is_taken_while_the_api_keeps_a_small_limit() {
    let w = world().await;
    // A push touching many files, as a vendored dependency or a generated tree does: ~1.2 MB.
    let mut push: Value = serde_json::from_slice(&w.fixture("github/push.json")).unwrap();
    let files: Vec<String> =
        (0..24_000).map(|i| format!("third_party/generated/module_{i:05}/source_file.c")).collect();
    push["commits"][1]["added"] = serde_json::json!(files);
    let body = serde_json::to_vec(&push).unwrap();
    assert!(body.len() > 1 << 20, "{} bytes", body.len());
    let (status, reply) = w.github("push", body).await;
    assert_eq!((status, reply.as_str()), (200, "2 change found"));
    assert_eq!(w.changes().await[1]["files"].as_array().unwrap().len(), 24_001);

    // Beyond GitHub's own cap of 25 MB a delivery is refused, and so is a large API request.
    let huge = vec![b' '; (25 << 20) + 1];
    let (status, _) = w.github("push", huge).await;
    assert_eq!(status, 413);
    let force = format!(
        "{{\"jsonrpc\":\"2.0\",\"method\":\"force\",\"id\":1,\"params\":{{\"x\":\"{}\"}}}}",
        "y".repeat(2 << 20)
    );
    let response =
        reqwest::Client::new().post(w.master.url("/api/v2/forceschedulers/force")).body(force).send().await.unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(w.changes().await.len(), 2, "nothing stored from refused requests");
    w.master.stop().await;
}

/// Reads what the master sends on `stream` until it closes the connection, for at most `limit`;
/// `None` when it is still open then.
async fn until_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = tokio::time::timeout(limit, stream.read_to_end(&mut got)).await;
    read.ok().map(|_| String::from_utf8_lossy(&got).into_owned())
}

/// A client that never finishes its request's headers is disconnected — on the HTTP port and on
/// the worker port, where Buildbot's workers open their WebSocket — and a delivery whose body is
/// trickled in is answered 408 and stores nothing, all once `http.request_timeout` has passed;
/// the master answers everyone else meanwhile, and a delivery sent whole is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_trickled_in_is_cut_off_after_the_request_timeout() {
    use tokio::io::AsyncWriteExt;
    let w = world_with("  request_timeout: 1\n").await;
    let master = &w.master;
    let started = std::time::Instant::now();
    let mut stalled = tokio::net::TcpStream::connect(master.http).await.unwrap();
    stalled.write_all(b"GET /api/v2/builders HTTP/1.1\r\nHost: kiln\r\n").await.unwrap();
    let mut stalled_worker = tokio::net::TcpStream::connect(master.grpc).await.unwrap();
    stalled_worker.write_all(b"GET / HTTP/1.1\r\nHost: kiln\r\nUpgrade: websocket\r\n").await.unwrap();
    let mut trickled = tokio::net::TcpStream::connect(master.http).await.unwrap();
    trickled
        .write_all(
            b"POST /change_hook/github HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/json\r\n\
              X-GitHub-Event: push\r\nContent-Length: 5000\r\n\r\n{\"ref\": \"refs/heads/",
        )
        .await
        .unwrap();
    let answer = master.client.get(master.url("/api/v2/builders")).send().await.unwrap();
    assert_eq!(answer.status(), 200, "others are answered meanwhile");

    let said = until_closed(&mut stalled, Duration::from_secs(20)).await.expect("the stalled client disconnected");
    assert!(started.elapsed() >= Duration::from_millis(900), "not before the timeout: {:?}", started.elapsed());
    assert!(!said.contains("200 OK"), "{said}");
    let said = until_closed(&mut stalled_worker, Duration::from_secs(20)).await.expect("the worker port let go");
    assert!(said.is_empty(), "{said}");
    let said = until_closed(&mut trickled, Duration::from_secs(20)).await.expect("the trickled delivery ended");
    assert!(said.starts_with("HTTP/1.1 408"), "{said}");
    assert!(said.contains("http.request_timeout"), "{said}");

    let (status, reply) = w.github("push", w.fixture("github/push.json")).await;
    assert_eq!((status, reply.as_str()), (200, "2 change found"), "a delivery sent whole is taken");
    assert_eq!(w.changes().await.len(), 2, "and nothing of the trickled one");
    w.master.stop().await;
}
