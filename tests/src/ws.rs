//! A client of the master's event stream at `/ws`, speaking Buildbot's protocol as its web UI
//! does: numbered commands, acknowledgements, and events `{"k": key, "m": object}`.

use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async_with_config};

/// The client's read buffer: a few batches of events.
const READ_BUFFER: usize = 8 * 1024;

/// One event received.
#[derive(Debug, Clone)]
pub struct Event {
    pub key: String,
    pub object: Value,
}

pub struct EventClient {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// Events that arrived while a command waited for its answer.
    pending: std::collections::VecDeque<Event>,
}

impl EventClient {
    pub async fn connect(http: SocketAddr) -> EventClient {
        // tungstenite zeroes its read buffer before every read, data or not: at its default of
        // 128 KiB that is most of what reading many small events costs.
        let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER);
        let connecting = connect_async_with_config(format!("ws://{http}/ws"), Some(config), false);
        let (socket, _) = tokio::time::timeout(Duration::from_secs(10), connecting)
            .await
            .expect("connected in time")
            .expect("WebSocket upgrade");
        EventClient { socket, next_id: 1, pending: Default::default() }
    }

    /// Sends a command and returns its answer (the message carrying its `_id`).
    pub async fn command(&mut self, mut command: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        command["_id"] = json!(id);
        self.socket.send(Message::Text(command.to_string().into())).await.expect("send a command");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let message = self.read_until(deadline).await.expect("an answer in time");
            if message.get("_id") == Some(&json!(id)) {
                return message;
            }
            self.keep(message);
        }
    }

    /// Subscribes to a path pattern; panics unless acknowledged as Buildbot does.
    pub async fn subscribe(&mut self, path: &str) {
        let answer = self.command(json!({ "cmd": "startConsuming", "path": path })).await;
        assert_eq!(answer["msg"], "OK", "startConsuming {path}: {answer}");
        assert_eq!(answer["code"], 200);
    }

    pub async fn unsubscribe(&mut self, path: &str) {
        let answer = self.command(json!({ "cmd": "stopConsuming", "path": path })).await;
        assert_eq!(answer["code"], 200, "stopConsuming {path}: {answer}");
    }

    /// The next event, or `None` when none comes within `limit`.
    pub async fn next_event(&mut self, limit: Duration) -> Option<Event> {
        if let Some(event) = self.pending.pop_front() {
            return Some(event);
        }
        let deadline = tokio::time::Instant::now() + limit;
        let message = self.read_until(deadline).await?;
        Some(as_event(&message).unwrap_or_else(|| panic!("an unexpected message: {message}")))
    }

    /// Events until one whose key is `last` (included), at most `limit` in all.
    pub async fn events_until(&mut self, last: &str, limit: Duration) -> Vec<Event> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut events = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(event) = self.next_event(left).await else {
                let keys: Vec<&str> = events.iter().map(|e: &Event| e.key.as_str()).collect();
                panic!("no {last} within {limit:?}; got {keys:?}");
            };
            let done = event.key == last;
            events.push(event);
            if done {
                return events;
            }
        }
    }

    /// Reads whatever arrives until the master closes the connection; the number of events
    /// read, or `None` if it stays open past `limit`.
    pub async fn drain_until_closed(&mut self, limit: Duration) -> Option<usize> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut count = self.pending.len();
        loop {
            match tokio::time::timeout_at(deadline, self.socket.next()).await {
                Err(_) => return None,
                Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => return Some(count),
                Ok(Some(Ok(Message::Text(_)))) => count += 1,
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Hands each text frame to `each` as it came (no JSON parsing, one timer for the whole read:
    /// for benchmarks reading many clients at once) until `until`, or until `each` says to stop;
    /// true when the connection ended.
    pub async fn read_frames(&mut self, until: tokio::time::Instant, mut each: impl FnMut(&str) -> bool) -> bool {
        let reading = async {
            loop {
                match self.socket.next().await {
                    Some(Ok(Message::Text(text))) => {
                        if !each(text.as_str()) {
                            return false;
                        }
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    _ => return true,
                }
            }
        };
        tokio::time::timeout_at(until, reading).await.unwrap_or(false)
    }

    fn keep(&mut self, message: Value) {
        match as_event(&message) {
            Some(event) => self.pending.push_back(event),
            None => panic!("an unexpected message: {message}"),
        }
    }

    async fn read_until(&mut self, deadline: tokio::time::Instant) -> Option<Value> {
        loop {
            match tokio::time::timeout_at(deadline, self.socket.next()).await {
                Err(_) => return None,
                Ok(Some(Ok(Message::Text(text)))) => {
                    return Some(serde_json::from_str(&text).expect("a JSON message"));
                }
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                Ok(other) => panic!("the event stream ended: {other:?}"),
            }
        }
    }
}

fn as_event(message: &Value) -> Option<Event> {
    Some(Event { key: message.get("k")?.as_str()?.to_owned(), object: message.get("m")?.clone() })
}
