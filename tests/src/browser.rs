//! Headless Chromium driven over the DevTools protocol, for tests of Buildbot's web UI against a
//! master: open a page, evaluate script in it, wait for what it shows, collect its console
//! errors and uncaught exceptions, and save screenshots.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

type Replies = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// The installed Buildbot UI package directory (`.../site-packages/buildbot_www`), as the test
/// script's prerequisites install it; panics saying how to install it when it is missing.
pub fn buildbot_www() -> PathBuf {
    let path = std::env::var_os("KILN_TEST_WWW").map(PathBuf::from).or_else(|| {
        let root = crate::bin_dir().parent()?.join("tools/www/lib");
        std::fs::read_dir(root)
            .ok()?
            .flatten()
            .map(|entry| entry.path().join("site-packages/buildbot_www"))
            .find(|path| path.join("static/index.html").is_file())
    });
    match path {
        Some(path) if path.join("static/index.html").is_file() => path,
        _ => panic!("Buildbot's UI is not installed: run scripts/test, or `source scripts/prerequisites; need_web_ui`"),
    }
}

fn chromium() -> PathBuf {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH")?
                .to_str()?
                .split(':')
                .map(|dir| Path::new(dir).join(name))
                .find(|path| path.is_file())
        })
        .expect("Chromium is not installed: run scripts/test, or `source scripts/prerequisites; need_web_ui`")
}

/// One problem the page reported: a console error or an uncaught exception.
#[derive(Debug, Clone)]
pub struct PageError {
    pub text: String,
    pub url: String,
}

pub struct Browser {
    process: Child,
    _profile: tempfile::TempDir,
    commands: mpsc::UnboundedSender<Message>,
    replies: Replies,
    next_id: u64,
    errors: Arc<Mutex<Vec<PageError>>>,
    /// The page's recent traffic: requests it made and WebSocket frames, oldest first.
    traffic: Arc<Mutex<std::collections::VecDeque<String>>>,
}

/// Entries of the page's traffic kept for a failure's report.
const TRAFFIC_KEPT: usize = 4_000;

impl Browser {
    /// Starts headless Chromium with a fresh profile and attaches to its first page.
    pub async fn launch() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let process = Command::new(chromium())
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-extensions",
                "--window-size=1400,1000",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start Chromium");
        let port_file = profile.path().join("DevToolsActivePort");
        let port = crate::eventually("Chromium's DevTools port", Duration::from_secs(30), || {
            let port_file = port_file.clone();
            async move { std::fs::read_to_string(port_file).ok()?.lines().next()?.trim().parse::<u16>().ok() }
        })
        .await;
        let page_url = crate::eventually("Chromium's first page", Duration::from_secs(30), || async move {
            let targets: Value =
                reqwest::get(format!("http://127.0.0.1:{port}/json/list")).await.ok()?.json().await.ok()?;
            targets.as_array()?.iter().find(|t| t["type"] == "page")?["webSocketDebuggerUrl"]
                .as_str()
                .map(str::to_owned)
        })
        .await;
        let (socket, _) = connect_async(page_url).await.expect("DevTools WebSocket");
        let (mut sink, mut stream) = socket.split();
        let (commands, mut outgoing) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            while let Some(message) = outgoing.recv().await {
                if sink.send(message).await.is_err() {
                    break;
                }
            }
        });
        let replies: Replies = Default::default();
        let errors: Arc<Mutex<Vec<PageError>>> = Default::default();
        let traffic: Arc<Mutex<std::collections::VecDeque<String>>> = Default::default();
        let (replies_in, errors_in, traffic_in) = (Arc::clone(&replies), Arc::clone(&errors), Arc::clone(&traffic));
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                let Ok(text) = message.to_text() else { continue };
                let Ok(message) = serde_json::from_str::<Value>(text) else { continue };
                if let Some(id) = message["id"].as_u64() {
                    if let Some(reply) = replies_in.lock().unwrap().remove(&id) {
                        let _ = reply.send(message);
                    }
                } else if let Some(error) = page_error(&message) {
                    errors_in.lock().unwrap().push(error);
                } else if let Some(entry) = traffic_entry(&message) {
                    let mut traffic = traffic_in.lock().unwrap();
                    if traffic.len() == TRAFFIC_KEPT {
                        traffic.pop_front();
                    }
                    traffic.push_back(entry);
                }
            }
        });
        let mut browser = Browser { process, _profile: profile, commands, replies, next_id: 1, errors, traffic };
        for domain in ["Page.enable", "Runtime.enable", "Log.enable", "Network.enable"] {
            browser.call(domain, json!({})).await;
        }
        browser
    }

    /// Sends one DevTools command and returns its result; panics on a protocol error.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let (reply, answer) = oneshot::channel();
        self.replies.lock().unwrap().insert(id, reply);
        let command = json!({ "id": id, "method": method, "params": params });
        self.commands.send(Message::text(command.to_string())).expect("DevTools connection open");
        let answer = tokio::time::timeout(Duration::from_secs(30), answer)
            .await
            .unwrap_or_else(|_| panic!("{method}: no answer in 30 s"))
            .expect("DevTools connection open");
        assert!(answer.get("error").is_none(), "{method}: {answer}");
        answer["result"].clone()
    }

    pub async fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url })).await;
    }

    /// Evaluates a script expression in the page (awaiting a promise) and returns its value.
    pub async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call("Runtime.evaluate", json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }))
            .await;
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression}: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Waits until the expression is truthy (a non-empty string, true, a non-zero number) and
    /// returns its value; panics with `what`, the page's text and a screenshot otherwise.
    pub async fn wait_for(&mut self, what: &str, expression: &str, limit: Duration) -> Value {
        match self.try_wait_for(what, expression, limit).await {
            Ok(value) => value,
            Err(failure) => panic!("{failure}"),
        }
    }

    /// [`Browser::wait_for`] that returns the failure (what, a screenshot's path and the page's
    /// text) for the caller to add what it knows.
    pub async fn try_wait_for(&mut self, what: &str, expression: &str, limit: Duration) -> Result<Value, String> {
        let start = Instant::now();
        loop {
            let value = self.eval(expression).await;
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return Ok(value);
            }
            if start.elapsed() > limit {
                let text = self.eval("document.body ? document.body.innerText : ''").await;
                let shot = std::env::temp_dir().join(format!("kiln-ui-timeout-{}.png", std::process::id()));
                self.screenshot(&shot).await;
                return Err(format!(
                    "{what}: not within {limit:?} (screenshot {}); page text:\n{text}",
                    shot.display()
                ));
            }
            crate::real_sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks the first element matching the CSS selector whose text contains `text`.
    pub async fn click(&mut self, selector: &str, text: &str) {
        let script = format!(
            "(() => {{ const e = [...document.querySelectorAll({})].find(e => e.textContent.includes({}));
                      if (!e) return false; e.click(); return true; }})()",
            json!(selector),
            json!(text)
        );
        let what = format!("a {selector} saying {text:?}");
        self.wait_for(&what, &script, Duration::from_secs(20)).await;
    }

    pub async fn screenshot(&mut self, path: &Path) {
        use base64::Engine;
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" })).await;
        let bytes = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().unwrap_or("")).unwrap();
        std::fs::write(path, bytes).expect("write screenshot");
    }

    /// The page's recent requests and WebSocket frames that contain `needle`, in order, one per
    /// line: what a failure's report shows of what the page was told.
    pub fn traffic_with(&self, needle: &str) -> String {
        let traffic = self.traffic.lock().unwrap();
        traffic.iter().filter(|entry| entry.contains(needle)).cloned().collect::<Vec<_>>().join("\n")
    }

    /// The page's last `count` requests and WebSocket frames, one per line.
    pub fn traffic_tail(&self, count: usize) -> String {
        let traffic = self.traffic.lock().unwrap();
        let skip = traffic.len().saturating_sub(count);
        traffic.iter().skip(skip).cloned().collect::<Vec<_>>().join("\n")
    }

    /// The console errors and uncaught exceptions so far, taking them.
    pub fn take_errors(&self) -> Vec<PageError> {
        std::mem::take(&mut self.errors.lock().unwrap())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// One line of the page's traffic, from a DevTools Network event: the time (s), then what.
fn traffic_entry(message: &Value) -> Option<String> {
    let params = &message["params"];
    let at = params["timestamp"].as_f64().unwrap_or_default();
    match message["method"].as_str()? {
        "Network.requestWillBeSent" => Some(format!(
            "{at:.3} http {} {}",
            params["request"]["method"].as_str().unwrap_or_default(),
            params["request"]["url"].as_str().unwrap_or_default()
        )),
        "Network.webSocketFrameReceived" => {
            Some(format!("{at:.3} ws<- {}", params["response"]["payloadData"].as_str().unwrap_or_default()))
        }
        "Network.webSocketFrameSent" => {
            Some(format!("{at:.3} ws-> {}", params["response"]["payloadData"].as_str().unwrap_or_default()))
        }
        _ => None,
    }
}

fn page_error(message: &Value) -> Option<PageError> {
    let params = &message["params"];
    match message["method"].as_str()? {
        "Runtime.exceptionThrown" => {
            let details = &params["exceptionDetails"];
            let text = details["exception"]["description"].as_str().or(details["text"].as_str()).unwrap_or("exception");
            Some(PageError { text: text.to_owned(), url: details["url"].as_str().unwrap_or_default().to_owned() })
        }
        "Runtime.consoleAPICalled" if params["type"] == "error" => {
            let text = params["args"]
                .as_array()?
                .iter()
                .map(|a| a["value"].as_str().map(str::to_owned).unwrap_or_else(|| a["description"].to_string()))
                .collect::<Vec<_>>()
                .join(" ");
            Some(PageError { text, url: String::new() })
        }
        "Log.entryAdded" if params["entry"]["level"] == "error" => Some(PageError {
            text: params["entry"]["text"].as_str().unwrap_or_default().to_owned(),
            url: params["entry"]["url"].as_str().unwrap_or_default().to_owned(),
        }),
        _ => None,
    }
}
