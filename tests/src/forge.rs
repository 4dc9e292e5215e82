//! A fake GitHub or GitLab on 127.0.0.1 for the reporters: it checks commit-status requests as
//! each forge's API documents them (path, method, GitHub's `Authorization: token …` or GitLab's
//! `PRIVATE-TOKEN`, the JSON body's fields and states), records what it accepted, and can be
//! told to fail or hang.

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
    /// How long the fake takes to answer, as a real forge does.
    delay: std::time::Duration,
    /// When each accepted status arrived (ms since the epoch).
    arrived: Vec<i64>,
    comments: Vec<(String, u64, String)>,
    /// Connections accepted.
    connections: usize,
}

/// The fake's handle: its base URL and what it saw.
#[derive(Debug, Clone)]
pub struct FakeForge {
    pub base_url: String,
    shared: Arc<Mutex<Shared>>,
    hold: Arc<tokio::sync::watch::Sender<bool>>,
    server: Arc<Mutex<Server>>,
}

/// The listening server, which can be taken down and brought back on the same address.
struct Server {
    address: std::net::SocketAddr,
    app: axum::Router,
    /// Serves HTTPS with this when set.
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Ends the running server: it stops accepting and closes its idle connections.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    running: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("address", &self.address).field("tls", &self.tls.is_some()).finish()
    }
}

impl Server {
    fn serve(&mut self, listener: tokio::net::TcpListener, shared: &Arc<Mutex<Shared>>) {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shared = Arc::clone(shared);
        let app = self.app.clone();
        self.stop = Some(stop);
        let stopped = async move {
            let _ = stopped.await;
        };
        self.running = Some(match self.tls.clone() {
            None => tokio::spawn(async move {
                let listener = Counted { inner: listener, shared };
                let _ = axum::serve(listener, app).with_graceful_shutdown(stopped).await;
            }),
            Some(acceptor) => tokio::spawn(async move {
                let listener = kiln_master::tls::TlsListener::new(listener, acceptor).unwrap();
                let listener = Counted { inner: listener, shared };
                let _ = axum::serve(listener, app).with_graceful_shutdown(stopped).await;
            }),
        });
    }
}

/// A listener counting the connections it accepts.
struct Counted<L> {
    inner: L,
    shared: Arc<Mutex<Shared>>,
}

impl<L: axum::serve::Listener> axum::serve::Listener for Counted<L> {
    type Io = L::Io;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let accepted = self.inner.accept().await;
        self.shared.lock().unwrap().connections += 1;
        accepted
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl FakeForge {
    /// A fake GitHub accepting `token` only.
    pub async fn github(token: &str) -> FakeForge {
        let routes = axum::Router::new()
            .route("/repos/{owner}/{repo}/statuses/{sha}", post(github_status))
            .route("/repos/{owner}/{repo}/issues/{number}/comments", post(github_comment));
        Self::start(token, routes, None).await
    }

    /// A fake GitHub accepting `token` only, over HTTPS with the certificate and key `tls`
    /// names (its base URL `https://127.0.0.1:PORT`).
    pub async fn github_https(token: &str, tls: &kiln_master::config::TlsConfig) -> FakeForge {
        let acceptor = kiln_master::tls::acceptor("forge", tls, &[b"http/1.1"]).unwrap();
        let routes = axum::Router::new().route("/repos/{owner}/{repo}/statuses/{sha}", post(github_status));
        let mut forge = Self::start(token, routes, Some(acceptor)).await;
        forge.base_url = forge.base_url.replace("http://", "https://");
        forge
    }

    /// A fake GitLab accepting `token` only (statuses at `/api/v4/projects/{id}/statuses/{sha}`).
    pub async fn gitlab(token: &str) -> FakeForge {
        let routes = axum::Router::new().route("/api/v4/projects/{project}/statuses/{sha}", post(gitlab_status));
        Self::start(token, routes, None).await
    }

    async fn start(token: &str, routes: axum::Router<FakeState>, tls: Option<tokio_rustls::TlsAcceptor>) -> FakeForge {
        let shared = Arc::new(Mutex::new(Shared { token: token.to_owned(), ..Default::default() }));
        let hold = Arc::new(tokio::sync::watch::channel(false).0);
        let app = routes.with_state((Arc::clone(&shared), Arc::clone(&hold)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut server = Server { address, app, tls, stop: None, running: None };
        server.serve(listener, &shared);
        FakeForge { base_url: format!("http://{address}"), shared, hold, server: Arc::new(Mutex::new(server)) }
    }

    /// Takes the forge off the network: its port refuses connections and the connections it had
    /// are closed, as when a forge's load balancer goes away.
    pub async fn go_down(&self) {
        let (stop, running) = {
            let mut server = self.server.lock().unwrap();
            (server.stop.take(), server.running.take())
        };
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
        if let Some(running) = running {
            // Connections end once their requests are answered; bounded, in case one hangs.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), running).await;
        }
    }

    /// Brings the forge back on the same address.
    pub async fn come_back(&self) {
        let address = self.server.lock().unwrap().address;
        let listener = tokio::net::TcpListener::bind(address).await.unwrap();
        self.server.lock().unwrap().serve(listener, &self.shared);
    }

    /// While held, requests wait unanswered (as a forge that hangs); when let go, those that
    /// waited are answered 503 and recorded nowhere, as if the forge never processed them.
    pub fn hold(&self, held: bool) {
        self.hold.send_replace(held);
    }

    /// Accepts `token` from now on, and no longer the one before (a rotated token).
    pub fn accept_token(&self, token: &str) {
        self.shared.lock().unwrap().token = token.to_owned();
    }

    /// Makes every answer take `delay`.
    pub fn answer_after(&self, delay: std::time::Duration) {
        self.shared.lock().unwrap().delay = delay;
    }

    /// Each accepted status with when it arrived (ms since the epoch).
    pub fn arrivals(&self) -> Vec<(Status, i64)> {
        let shared = self.shared.lock().unwrap();
        shared.accepted.iter().cloned().zip(shared.arrived.iter().copied()).collect()
    }

    /// Comments posted on pull requests: (owner/repo, number, body).
    pub fn comments(&self) -> Vec<(String, u64, String)> {
        self.shared.lock().unwrap().comments.clone()
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

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.lock().unwrap().connections
    }
}

type FakeState = (Arc<Mutex<Shared>>, Arc<tokio::sync::watch::Sender<bool>>);

/// How one forge names things in a commit status.
struct Dialect {
    token_header: &'static str,
    token_prefix: &'static str,
    states: &'static [&'static str],
    context_field: &'static str,
}

const GITHUB: Dialect = Dialect {
    token_header: "authorization",
    token_prefix: "token ",
    states: &["error", "failure", "pending", "success"],
    context_field: "context",
};

const GITLAB: Dialect = Dialect {
    token_header: "private-token",
    token_prefix: "",
    states: &["pending", "running", "success", "failed", "canceled"],
    context_field: "name",
};

async fn github_status(
    State(state): State<FakeState>,
    Path((owner, repo, sha)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Json<Value>,
) -> Response {
    accept(&GITHUB, state, owner, repo, sha, headers, body.0).await
}

async fn github_comment(
    State((shared, _)): State<FakeState>,
    Path((owner, repo, number)): Path<(String, String, u64)>,
    headers: HeaderMap,
    body: Json<Value>,
) -> Response {
    let mut shared = shared.lock().unwrap();
    shared.requests += 1;
    let given = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
    if given != format!("token {}", shared.token) {
        return (StatusCode::UNAUTHORIZED, Json(json!({ "message": "Bad credentials" }))).into_response();
    }
    let Some(text) = body.get("body").and_then(Value::as_str).filter(|t| !t.is_empty()) else {
        shared.malformed.push(format!("a comment without a body: {}", body.0));
        return (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({ "message": "body is missing" }))).into_response();
    };
    shared.comments.push((format!("{owner}/{repo}"), number, text.to_owned()));
    (StatusCode::CREATED, Json(json!({ "id": shared.comments.len() }))).into_response()
}

async fn gitlab_status(
    State(state): State<FakeState>,
    Path((project, sha)): Path<(String, String)>,
    headers: HeaderMap,
    body: Json<Value>,
) -> Response {
    // The project by its URL-encoded path (`group%2Fname`), which axum has decoded.
    let Some((owner, repo)) = project.split_once('/') else {
        return (StatusCode::NOT_FOUND, Json(json!({ "message": "404 Project Not Found" }))).into_response();
    };
    accept(&GITLAB, state, owner.to_owned(), repo.to_owned(), sha, headers, body.0).await
}

async fn accept(
    dialect: &Dialect,
    (shared, hold): FakeState,
    owner: String,
    repo: String,
    sha: String,
    headers: HeaderMap,
    body: Value,
) -> Response {
    let mut held = hold.subscribe();
    if *held.borrow_and_update() {
        shared.lock().unwrap().held += 1;
        // Bounded: a test lets go within minutes or is over.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(300), held.wait_for(|h| !*h)).await;
        shared.lock().unwrap().held -= 1;
        return (StatusCode::SERVICE_UNAVAILABLE, "was hanging").into_response();
    }
    let arrived =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let delay = shared.lock().unwrap().delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut shared = shared.lock().unwrap();
    shared.requests += 1;
    if shared.fail_next > 0 {
        shared.fail_next -= 1;
        return (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "1")], "try later").into_response();
    }
    let given = headers.get(dialect.token_header).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if given != format!("{}{}", dialect.token_prefix, shared.token) {
        return (StatusCode::UNAUTHORIZED, Json(json!({ "message": "Bad credentials" }))).into_response();
    }
    let text = |name: &str| body.get(name).and_then(Value::as_str).map(str::to_owned);
    let problem = match (text("state"), text(dialect.context_field), text("target_url")) {
        (Some(state), Some(_), Some(_)) if !dialect.states.contains(&state.as_str()) => {
            Some(format!("state {state:?} is not one of the forge's"))
        }
        (Some(_), Some(_), Some(url)) if !url.starts_with("http") => Some(format!("target_url {url:?}")),
        (Some(_), Some(_), Some(_)) if sha.len() < 4 => Some(format!("sha {sha:?}")),
        (Some(_), Some(_), Some(_)) => None,
        _ => Some(format!("missing state, {} or target_url: {body}", dialect.context_field)),
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
        context: text(dialect.context_field).unwrap_or_default(),
        target_url: text("target_url").unwrap_or_default(),
        description: text("description").unwrap_or_default(),
    };
    shared.accepted.push(status.clone());
    shared.arrived.push(arrived);
    (StatusCode::CREATED, Json(json!({ "state": status.state, "id": shared.accepted.len() }))).into_response()
}
