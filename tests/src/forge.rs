//! A fake GitHub on 127.0.0.1 for the reporters: it checks commit-status requests as GitHub's API
//! documents them (path, method, `Authorization: token …`, the JSON body's fields and states),
//! records what it accepted, and can be told to fail the next requests.

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// One accepted commit status.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub owner: String,
    pub repo: String,
    pub sha: String,
    pub state: String,
    pub context: String,
    pub target_url: String,
    pub description: String,
}

#[derive(Debug, Default)]
struct Shared {
    token: String,
    accepted: Vec<Status>,
    /// Requests still to answer with 503 (`Retry-After: 1`).
    fail_next: usize,
    /// Requests refused because they were malformed, with why.
    malformed: Vec<String>,
    requests: usize,
    /// Requests waiting, unanswered, while the fake holds them.
    held: usize,
}

/// The fake's handle: its base URL and what it saw.
#[derive(Debug, Clone)]
pub struct FakeGithub {
    pub base_url: String,
    shared: Arc<Mutex<Shared>>,
    hold: Arc<tokio::sync::watch::Sender<bool>>,
}

impl FakeGithub {
    /// Starts the fake, accepting `token` only.
    pub async fn start(token: &str) -> FakeGithub {
        let shared = Arc::new(Mutex::new(Shared { token: token.to_owned(), ..Default::default() }));
        let hold = Arc::new(tokio::sync::watch::channel(false).0);
        let app = axum::Router::new()
            .route("/repos/{owner}/{repo}/statuses/{sha}", post(status))
            .with_state((Arc::clone(&shared), Arc::clone(&hold)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeGithub { base_url, shared, hold }
    }

    /// While held, requests wait unanswered (as a forge that hangs); when let go, those that
    /// waited are answered 503 and recorded nowhere, as if the forge never processed them.
    pub fn hold(&self, held: bool) {
        self.hold.send_replace(held);
    }

    /// Requests waiting now.
    pub fn held(&self) -> usize {
        self.shared.lock().unwrap().held
    }

    /// Answers the next `n` requests 503 with `Retry-After: 1`.
    pub fn fail_next(&self, n: usize) {
        self.shared.lock().unwrap().fail_next = n;
    }

    pub fn accepted(&self) -> Vec<Status> {
        self.shared.lock().unwrap().accepted.clone()
    }

    /// The states accepted for one commit and context, in the order they arrived.
    pub fn states(&self, sha: &str, context: &str) -> Vec<String> {
        self.accepted().into_iter().filter(|s| s.sha == sha && s.context == context).map(|s| s.state).collect()
    }

    pub fn malformed(&self) -> Vec<String> {
        self.shared.lock().unwrap().malformed.clone()
    }

    pub fn requests(&self) -> usize {
        self.shared.lock().unwrap().requests
    }
}

type FakeState = (Arc<Mutex<Shared>>, Arc<tokio::sync::watch::Sender<bool>>);

async fn status(
    State((shared, hold)): State<FakeState>,
    Path((owner, repo, sha)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Json<Value>,
) -> Response {
    let mut held = hold.subscribe();
    if *held.borrow_and_update() {
        shared.lock().unwrap().held += 1;
        // Bounded: a test lets go within minutes or is over.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(300), held.wait_for(|h| !*h)).await;
        shared.lock().unwrap().held -= 1;
        return (StatusCode::SERVICE_UNAVAILABLE, "was hanging").into_response();
    }
    let mut shared = shared.lock().unwrap();
    shared.requests += 1;
    if shared.fail_next > 0 {
        shared.fail_next -= 1;
        return (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "1")], "try later").into_response();
    }
    let authorization = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if authorization != format!("token {}", shared.token) {
        return (StatusCode::UNAUTHORIZED, Json(json!({ "message": "Bad credentials" }))).into_response();
    }
    let text = |name: &str| body.get(name).and_then(Value::as_str).map(str::to_owned);
    let problem = match (text("state"), text("context"), text("target_url")) {
        (Some(state), Some(_), Some(_)) if !["error", "failure", "pending", "success"].contains(&state.as_str()) => {
            Some(format!("state {state:?} is not one of GitHub's"))
        }
        (Some(_), Some(_), Some(url)) if !url.starts_with("http") => Some(format!("target_url {url:?}")),
        (Some(_), Some(_), Some(_)) if sha.len() < 4 => Some(format!("sha {sha:?}")),
        (Some(_), Some(_), Some(_)) => None,
        _ => Some(format!("missing state, context or target_url: {}", body.0)),
    };
    if let Some(problem) = problem {
        shared.malformed.push(problem.clone());
        return (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({ "message": problem }))).into_response();
    }
    let status = Status {
        owner,
        repo,
        sha,
        state: text("state").unwrap_or_default(),
        context: text("context").unwrap_or_default(),
        target_url: text("target_url").unwrap_or_default(),
        description: text("description").unwrap_or_default(),
    };
    shared.accepted.push(status.clone());
    (StatusCode::CREATED, Json(json!({ "state": status.state, "context": status.context }))).into_response()
}
