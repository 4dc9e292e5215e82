//! Buildbot's WebSocket event stream at `/ws`: clients subscribe to path patterns
//! (`startConsuming`, `*` matching one segment) and receive `{"k": "<path>/<event>", "m": object}`
//! for every change of the data API's objects, on any master of the database.
//!
//! One publisher turns the store's events into messages: it reads each changed object once, in
//! the REST API's shape, and broadcasts it under every path Buildbot publishes it under. Each
//! connection filters the broadcast by its subscriptions. The broadcast is bounded: a connection
//! that falls behind it, or whose client stops reading, is closed; a build never waits for a
//! browser.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message as Frame, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures::SinkExt;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use crate::events::{Event, Origin, Topic};
use crate::master::Master;
use crate::store::{Backend, Filter, ListQuery, Op, Resource};

/// Rounds of messages the broadcast holds for connections not yet caught up (the publisher
/// makes at most a few hundred a second); one that falls further behind is closed.
const BACKLOG: usize = 2_048;
/// How long a client may leave a message unread before its connection is closed.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Subscriptions one connection may hold (the UI holds a few dozen).
const MAX_SUBSCRIPTIONS: usize = 1_000;
/// The largest message a client may send (commands are a few dozen bytes).
const MAX_CLIENT_MESSAGE: usize = 16 * 1024;
/// How long the publisher gathers events before reading what they are about.
const GATHER: Duration = Duration::from_millis(5);
/// The read buffer of a connection (tungstenite's default is 128 KiB).
const READ_BUFFER: usize = 4 * 1024;
/// Objects read per statement when the publisher fetches what changed.
const FETCH_CHUNK: usize = 200;
/// The shortest time between two writes to one connection. A message for an idle connection
/// is written at once; while events keep coming, each connection gets them in one write per
/// interval, so 200 browsers cost 200 writes per interval, not 200 per publisher round.
const FLUSH_EVERY: Duration = Duration::from_millis(25);
/// How long a path a client stopped consuming is still delivered (see [`Subscriptions`]).
const LINGER: Duration = Duration::from_secs(1);

/// One message of the stream, under one routing key.
#[derive(Debug)]
pub struct Message {
    key: String,
    /// Where each segment of the key ends: every connection matches every message against its
    /// subscriptions, so the key is split once, here.
    ends: Vec<u16>,
    frame: Utf8Bytes,
}

impl Message {
    fn new(key: String, frame: String) -> Message {
        let mut ends: Vec<u16> = key.match_indices('/').map(|(i, _)| i as u16).collect();
        ends.push(key.len() as u16);
        Message { key, ends, frame: Utf8Bytes::from(frame) }
    }

    /// The key's segments, in order.
    fn segments(&self) -> impl Iterator<Item = &str> {
        let starts = std::iter::once(0).chain(self.ends.iter().map(|end| *end as usize + 1));
        starts.zip(&self.ends).map(|(start, end)| &self.key[start..*end as usize])
    }
}

/// The messages of one round of the publisher, broadcast together so that a connection wakes
/// once per round, not once per message.
type Round = Arc<Vec<Message>>;

/// The broadcast of the stream, shared by the publisher and the connections.
#[derive(Debug)]
pub struct Hub {
    messages: broadcast::Sender<Round>,
    interest: Arc<Interest>,
}

impl Hub {
    /// Starts the publisher of `master`'s events; it runs until the master shuts down.
    pub fn start(master: Arc<Master>) -> Arc<Hub> {
        let hub = Arc::new(Hub { messages: broadcast::channel(BACKLOG).0, interest: Arc::default() });
        tokio::spawn(publish(master, Arc::clone(&hub)));
        hub
    }
}

/// The patterns consumed by any connection, each with how many connections consume it: the
/// publisher reads and frames only what one of them matches. A connection registers a pattern
/// before it acknowledges the subscription, and the publisher looks at them after it has taken
/// its batch, so every event committed after the acknowledgement finds the pattern.
#[derive(Debug, Default)]
struct Interest(std::sync::Mutex<HashMap<Pattern, usize>>);

impl Interest {
    fn add(&self, pattern: &Pattern) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()).entry(pattern.clone()).or_default() += 1;
    }

    fn remove(&self, pattern: &Pattern) {
        let mut patterns = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = patterns.get_mut(pattern) {
            *count -= 1;
            if *count == 0 {
                patterns.remove(pattern);
            }
        }
    }

    /// The distinct patterns consumed now.
    fn patterns(&self) -> Vec<Pattern> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect()
    }
}

/// One connection's subscriptions (path as given, and its pattern), registered with the hub's
/// [`Interest`] for as long as the connection holds them — and, for [`LINGER`] after it stops
/// consuming a path, still delivered.
///
/// Buildbot's UI stops and starts the same paths when it draws a page again, a few milliseconds
/// apart; an event between the two would be lost to it for good, because its collections keep
/// an object's state from an event over the REST answer that follows. A path that lingers is
/// delivered as if it had never stopped (the UI ignores what none of its collections listens to).
#[derive(Debug, Default)]
struct Subscriptions {
    list: Vec<(String, Pattern)>,
    /// Paths stopped, still delivered until the instant given.
    lingering: Vec<(String, Pattern, tokio::time::Instant)>,
    interest: Arc<Interest>,
}

impl Subscriptions {
    fn new(interest: Arc<Interest>) -> Subscriptions {
        Subscriptions { list: Vec::new(), lingering: Vec::new(), interest }
    }

    fn matches(&self, message: &Message) -> bool {
        self.list.iter().any(|(_, p)| p.matches(message)) || self.lingering.iter().any(|(_, p, _)| p.matches(message))
    }

    /// Starts consuming `path`: false when it holds as many paths as it may.
    fn start(&mut self, path: String, pattern: Pattern) -> bool {
        if self.list.iter().any(|(p, _)| *p == path) {
            return true;
        }
        if let Some(at) = self.lingering.iter().position(|(p, _, _)| *p == path) {
            // Counted with the hub still: it only moves back.
            let (path, pattern, _) = self.lingering.remove(at);
            self.list.push((path, pattern));
            return true;
        }
        if self.list.len() + self.lingering.len() >= MAX_SUBSCRIPTIONS {
            return false;
        }
        self.interest.add(&pattern);
        self.list.push((path, pattern));
        true
    }

    /// Stops consuming `path`; it lingers for [`LINGER`]. False when it was not consumed.
    fn stop(&mut self, path: &str) -> bool {
        let Some(at) = self.list.iter().position(|(p, _)| p == path) else { return false };
        let (path, pattern) = self.list.remove(at);
        self.lingering.push((path, pattern, tokio::time::Instant::now() + LINGER));
        true
    }

    /// Forgets the paths whose linger is over.
    fn expire(&mut self) {
        let now = tokio::time::Instant::now();
        let interest = &self.interest;
        self.lingering.retain(|(_, pattern, until)| {
            let keep = *until > now;
            if !keep {
                interest.remove(pattern);
            }
            keep
        });
    }
}

impl Drop for Subscriptions {
    fn drop(&mut self) {
        for pattern in self.list.iter().map(|(_, p)| p).chain(self.lingering.iter().map(|(_, p, _)| p)) {
            self.interest.remove(pattern);
        }
    }
}

/// Takes the store's events batch by batch: shares this master's with the other masters, reads
/// the objects that changed and broadcasts them.
async fn publish(master: Arc<Master>, hub: Arc<Hub>) {
    let events = Arc::clone(master.store.events());
    let mut shutdown = master.signals.shutdown();
    loop {
        let mut batch = tokio::select! {
            batch = events.next_batch() => batch,
            _ = shutdown.changed() => return,
        };
        // A build's events come in quick succession: gathering them for a moment reads each
        // collection once per moment instead of once per event.
        tokio::time::sleep(GATHER).await;
        batch.extend(events.take());
        let here: Vec<Event> = batch.iter().filter(|(_, o)| *o == Origin::Here).map(|(e, _)| *e).collect();
        let share = async {
            if master.store.backend() == Backend::Postgres && !here.is_empty() {
                for payload in events.encode(&here) {
                    master.store.notify_events(&payload).await;
                }
            }
        };
        let deliver = async {
            let patterns = hub.interest.patterns();
            if hub.messages.receiver_count() == 0 || patterns.is_empty() {
                return;
            }
            // Only the events some connection may want are read and framed.
            let mut seen = HashSet::new();
            let unique: Vec<Event> = batch
                .iter()
                .map(|(e, _)| *e)
                .filter(|e| seen.insert(*e) && patterns.iter().any(|p| p.may_match(e)))
                .collect();
            let objects = fetch(&master, &unique).await;
            let mut round = Vec::new();
            for event in &unique {
                let Some(object) = objects.get(&(resource(event.topic), event.id)) else { continue };
                round.extend(messages(event, object, &patterns));
            }
            if !round.is_empty() {
                // No receiver left is not an error: the next batch checks again.
                let _ = hub.messages.send(Arc::new(round));
            }
        };
        tokio::join!(share, deliver);
    }
}

/// The collection an event's object is read from.
fn resource(topic: Topic) -> Resource {
    match topic {
        Topic::Builds | Topic::BuildProperties => Resource::Builds,
        Topic::BuildRequests => Resource::BuildRequests,
        Topic::Buildsets => Resource::Buildsets,
        Topic::Steps => Resource::Steps,
        Topic::Logs => Resource::Logs,
        Topic::Changes => Resource::Changes,
        Topic::Workers => Resource::Workers,
        Topic::Builders => Resource::Builders,
        Topic::Schedulers => Resource::Schedulers,
        Topic::Masters => Resource::Masters,
    }
}

fn id_field(resource: Resource) -> &'static str {
    match resource {
        Resource::Builds => "buildid",
        Resource::BuildRequests => "buildrequestid",
        Resource::Buildsets => "bsid",
        Resource::Steps => "stepid",
        Resource::Logs => "logid",
        Resource::Changes => "changeid",
        Resource::Workers => "workerid",
        Resource::Builders => "builderid",
        Resource::Schedulers => "schedulerid",
        Resource::Masters => "masterid",
        Resource::SourceStamps => "ssid",
    }
}

/// Reads the objects the events are about, a few statements per collection; an object gone
/// since (or a database that did not answer) publishes nothing.
async fn fetch(master: &Master, events: &[Event]) -> HashMap<(Resource, i64), Map<String, Value>> {
    let mut wanted: HashMap<Resource, Vec<i64>> = HashMap::new();
    for event in events {
        let ids = wanted.entry(resource(event.topic)).or_default();
        if !ids.contains(&event.id) {
            ids.push(event.id);
        }
    }
    let mut objects = HashMap::new();
    for (resource, ids) in wanted {
        let field = id_field(resource);
        for chunk in ids.chunks(FETCH_CHUNK) {
            let filter =
                Filter { field: field.to_owned(), op: Op::In, values: chunk.iter().map(i64::to_string).collect() };
            let query = ListQuery { filters: vec![filter], ..Default::default() };
            match master.store.list(resource, &query).await {
                Ok((rows, _)) => {
                    for row in rows {
                        if let Value::Object(object) = row
                            && let Some(id) = object.get(field).and_then(Value::as_i64)
                        {
                            objects.insert((resource, id), object);
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "events not published: their objects could not be read"),
            }
        }
    }
    objects
}

/// The paths Buildbot publishes an event of each topic under, each `{field}` filled from the
/// event's object (a path whose field the object lacks is left out); the key adds the event name.
fn paths(topic: Topic) -> &'static [&'static str] {
    match topic {
        Topic::Builds => {
            &["builders/{builderid}/builds/{number}", "builds/{buildid}", "workers/{workerid}/builds/{buildid}"]
        }
        Topic::BuildProperties => &["builds/{buildid}/properties"],
        Topic::BuildRequests => &[
            "buildsets/{buildsetid}/builders/{builderid}/buildrequests/{buildrequestid}",
            "builders/{builderid}/buildrequests/{buildrequestid}",
            "buildrequests/{buildrequestid}",
        ],
        Topic::Buildsets => &["buildsets/{bsid}"],
        Topic::Steps => &["builds/{buildid}/steps/{stepid}", "steps/{stepid}"],
        Topic::Logs => &["steps/{stepid}/logs/{slug}", "logs/{logid}"],
        Topic::Changes => &["changes/{changeid}"],
        Topic::Workers => &["workers/{workerid}"],
        Topic::Builders => &["builders/{builderid}"],
        Topic::Schedulers => &["schedulers/{schedulerid}"],
        Topic::Masters => &["masters/{masterid}"],
    }
}

/// The field a path segment is filled from, if it is a `{field}`.
fn placeholder(segment: &str) -> Option<&str> {
    segment.strip_prefix('{')?.strip_suffix('}')
}

/// The messages of one event that one of `patterns` matches: its object under each of its paths.
fn messages(event: &Event, object: &Map<String, Value>, patterns: &[Pattern]) -> Vec<Message> {
    let mut keys = Vec::new();
    'paths: for path in paths(event.topic) {
        let mut key = String::with_capacity(path.len() + 16);
        for segment in path.split('/') {
            let filled = match placeholder(segment) {
                None => segment.to_owned(),
                Some(field) => match object.get(field) {
                    Some(Value::Number(n)) => n.to_string(),
                    Some(Value::String(s)) if !s.is_empty() && !s.contains('/') => s.clone(),
                    _ => continue 'paths,
                },
            };
            key.push_str(&filled);
            key.push('/');
        }
        key.push_str(event.name);
        let message = Message::new(key, String::new());
        if patterns.iter().any(|p| p.matches(&message)) {
            keys.push(message);
        }
    }
    if keys.is_empty() {
        return keys;
    }
    let body = match event.topic {
        Topic::BuildProperties => object.get("properties").cloned().unwrap_or_else(|| json!({})),
        topic => super::rest::shape(resource(topic), object.clone(), &super::rest::Params::default()),
    }
    .to_string();
    for message in &mut keys {
        message.frame = Utf8Bytes::from(format!("{{\"k\":{},\"m\":{body}}}", Value::String(message.key.clone())));
    }
    keys
}

/// One segment of a subscription's path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Segment {
    Any,
    Exactly(String),
}

/// A subscription: a path pattern, `*` matching exactly one segment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Pattern(Vec<Segment>);

impl Pattern {
    fn parse(path: &str) -> Result<Pattern, String> {
        if path.is_empty() || path.len() > 1024 {
            return Err("a path of 1 to 1024 characters is needed".into());
        }
        let segments: Vec<Segment> = path
            .trim_matches('/')
            .split('/')
            .map(|s| if s == "*" { Segment::Any } else { Segment::Exactly(s.to_owned()) })
            .collect();
        if segments.len() > 32 || segments.iter().any(|s| *s == Segment::Exactly(String::new())) {
            return Err(format!("invalid path {path:?}"));
        }
        Ok(Pattern(segments))
    }

    fn matches(&self, message: &Message) -> bool {
        message.ends.len() == self.0.len()
            && self.0.iter().zip(message.segments()).all(|(segment, part)| match segment {
                Segment::Any => true,
                Segment::Exactly(want) => want == part,
            })
    }

    /// Whether the pattern may match a message of `event`, before its object is read: a path's
    /// `{field}` matches any segment, but the event's own id.
    fn may_match(&self, event: &Event) -> bool {
        let id = event.id.to_string();
        let own = id_field(resource(event.topic));
        paths(event.topic).iter().any(|path| {
            let segments = path.split('/').chain(std::iter::once(event.name));
            path.split('/').count() + 1 == self.0.len()
                && self.0.iter().zip(segments).all(|(want, segment)| match (want, placeholder(segment)) {
                    (Segment::Any, _) => true,
                    (Segment::Exactly(want), None) => want == segment,
                    (Segment::Exactly(want), Some(field)) => field != own || *want == id,
                })
        })
    }
}

/// What a client asks.
#[derive(Debug, serde::Deserialize)]
struct Command {
    cmd: Option<String>,
    path: Option<String>,
    #[serde(rename = "_id", default)]
    id: Value,
}

/// Answers one command, changing the connection's subscriptions.
fn answer(text: &str, subscriptions: &mut Subscriptions) -> Value {
    let command: Command = match serde_json::from_str(text) {
        Ok(command) => command,
        Err(error) => return json!({ "error": format!("invalid command: {error}"), "code": 400, "_id": null }),
    };
    let id = command.id;
    let error = |code: u16, error: String| json!({ "error": error, "code": code, "_id": id });
    match command.cmd.as_deref() {
        Some("ping") => json!({ "msg": "pong", "code": 200, "_id": id }),
        Some(cmd @ ("startConsuming" | "stopConsuming")) => {
            let Some(path) = command.path else { return error(400, "missing path".into()) };
            subscriptions.expire();
            if cmd == "stopConsuming" {
                if !subscriptions.stop(&path) {
                    return error(400, format!("{path:?} is not consumed"));
                }
            } else {
                let pattern = match Pattern::parse(&path) {
                    Ok(pattern) => pattern,
                    Err(reason) => return error(400, reason),
                };
                if !subscriptions.start(path, pattern) {
                    return error(400, format!("at most {MAX_SUBSCRIPTIONS} paths may be consumed at once"));
                }
            }
            json!({ "msg": "OK", "code": 200, "_id": id })
        }
        Some(other) => error(404, format!("no such command type '{other}'")),
        None => error(400, "missing cmd".into()),
    }
}

/// `GET /ws`: upgrades to Buildbot's event stream.
pub async fn upgrade(
    State(master): State<Arc<Master>>,
    axum::Extension(hub): axum::Extension<Arc<Hub>>,
    ws: WebSocketUpgrade,
) -> Response {
    let shutdown = master.signals.shutdown();
    // The read buffer is made ready (zeroed up to its size) each time the connection looks for a
    // command, that is after every event sent: keep it as small as the commands are.
    let ws = ws.read_buffer_size(READ_BUFFER).max_message_size(MAX_CLIENT_MESSAGE).max_frame_size(MAX_CLIENT_MESSAGE);
    ws.on_upgrade(move |socket| {
        let messages = hub.messages.subscribe();
        serve(socket, messages, Arc::clone(&hub.interest), shutdown)
    })
}

/// Why the master ends a connection.
enum Ending {
    /// The client left or broke the protocol: nothing more to say.
    Gone,
    /// The client left a message unread too long: nothing more can be said.
    Stalled,
    /// Closing with a code and reason.
    Close(u16, &'static str),
}

/// Adds `first` (when given) and the rounds already waiting to `rounds`, up to 16 in all; or says
/// why the connection ends.
fn take_waiting(
    messages: &mut broadcast::Receiver<Round>,
    first: Option<std::result::Result<Round, broadcast::error::RecvError>>,
    rounds: &mut Vec<Round>,
) -> Option<Ending> {
    use broadcast::error::{RecvError, TryRecvError};
    let mut next = first;
    while rounds.len() < 16 {
        let received = match next.take() {
            Some(received) => received,
            None => match messages.try_recv() {
                Ok(round) => Ok(round),
                Err(TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
                Err(TryRecvError::Closed) => Err(RecvError::Closed),
                Err(TryRecvError::Empty) => return None,
            },
        };
        match received {
            Ok(round) => rounds.push(round),
            Err(RecvError::Lagged(missed)) => {
                tracing::info!(missed, "closing an event stream client that fell behind");
                crate::telemetry::websocket_client_dropped();
                return Some(Ending::Close(1008, "too slow: events were missed; reload"));
            }
            Err(RecvError::Closed) => return Some(Ending::Close(1001, "master stopping")),
        }
    }
    None
}

/// Writes the messages of the `held` rounds that the subscriptions match, in one write, and
/// empties `held`; `last_write` moves when something was written. False when the client did not
/// take them in time: feeding writes too once the socket's buffer is full, so the whole is
/// bounded in time and a client that stops reading is let go.
async fn write(
    socket: &mut WebSocket,
    subscriptions: &mut Subscriptions,
    held: &mut Vec<Round>,
    last_write: &mut tokio::time::Instant,
) -> bool {
    subscriptions.expire();
    let written = tokio::time::timeout(SEND_TIMEOUT, async {
        let mut fed = 0usize;
        for message in held.iter().flat_map(|r| r.iter()) {
            if subscriptions.matches(message) {
                socket.feed(Frame::Text(message.frame.clone())).await?;
                fed += 1;
            }
        }
        if fed > 0 {
            socket.flush().await?;
        }
        Ok::<_, axum::Error>(fed)
    });
    let written = written.await;
    held.clear();
    match written {
        Ok(Ok(fed)) => {
            if fed > 0 {
                *last_write = tokio::time::Instant::now();
            }
            true
        }
        _ => false,
    }
}

async fn serve(
    mut socket: WebSocket,
    mut messages: broadcast::Receiver<Round>,
    interest: Arc<Interest>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    crate::telemetry::websocket_client(true);
    let mut subscriptions = Subscriptions::new(interest);
    // A connection written to less than FLUSH_EVERY ago holds what comes meanwhile, without
    // looking at the broadcast again, and writes it all when the interval is over.
    let mut held: Vec<Round> = Vec::new();
    let mut last_write = tokio::time::Instant::now() - FLUSH_EVERY;
    let ending = loop {
        tokio::select! {
            incoming = socket.recv() => match incoming {
                Some(Ok(Frame::Text(text))) => {
                    let reply = answer(text.as_str(), &mut subscriptions);
                    let sent = tokio::time::timeout(SEND_TIMEOUT, socket.send(Frame::Text(reply.to_string().into())));
                    if !matches!(sent.await, Ok(Ok(()))) {
                        break Ending::Gone;
                    }
                }
                Some(Ok(Frame::Binary(_))) => break Ending::Close(1003, "commands are JSON text"),
                Some(Ok(Frame::Ping(_) | Frame::Pong(_))) => {}
                Some(Ok(Frame::Close(_))) | Some(Err(_)) | None => break Ending::Gone,
            },
            _ = tokio::time::sleep_until(last_write + FLUSH_EVERY), if !held.is_empty() => {
                if let Some(ending) = take_waiting(&mut messages, None, &mut held) {
                    break ending;
                }
                if !write(&mut socket, &mut subscriptions, &mut held, &mut last_write).await {
                    break Ending::Stalled;
                }
            },
            received = messages.recv(), if held.is_empty() => {
                if let Some(ending) = take_waiting(&mut messages, Some(received), &mut held) {
                    break ending;
                }
                // An idle connection is written to at once; a busy one when its interval is over.
                if last_write.elapsed() >= FLUSH_EVERY && !write(&mut socket, &mut subscriptions, &mut held, &mut last_write).await {
                    break Ending::Stalled;
                }
            },
            _ = shutdown.changed() => break Ending::Close(1001, "master stopping"),
        }
    };
    match ending {
        Ending::Close(code, reason) => {
            let close = Frame::Close(Some(CloseFrame { code, reason: Utf8Bytes::from_static(reason) }));
            let _ = tokio::time::timeout(Duration::from_secs(1), socket.send(close)).await;
        }
        Ending::Stalled => {
            tracing::info!("closing an event stream client that stopped reading");
            crate::telemetry::websocket_client_dropped();
        }
        Ending::Gone => {}
    }
    crate::telemetry::websocket_client(false);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_star_matches_exactly_one_segment() {
        let key = |key: &str| Message::new(key.to_owned(), String::new());
        let pattern = Pattern::parse("builds/*/*").unwrap();
        assert!(pattern.matches(&key("builds/7/new")));
        assert!(!pattern.matches(&key("builds/7/steps/3/new")));
        assert!(!pattern.matches(&key("builds/7")));
        assert!(!pattern.matches(&key("builders/7/new")));
        let pattern = Pattern::parse("builds/7/steps/*/*").unwrap();
        assert!(pattern.matches(&key("builds/7/steps/25/started")));
        assert!(!pattern.matches(&key("builds/8/steps/25/started")));
        assert_eq!(key("logs/3/append").segments().collect::<Vec<_>>(), ["logs", "3", "append"]);
        assert!(Pattern::parse("").is_err());
        assert!(Pattern::parse("builds//new").is_err());
    }

    #[test]
    fn commands_are_answered_as_buildbot_answers_them() {
        let interest = Arc::new(Interest::default());
        let mut subs = Subscriptions::new(Arc::clone(&interest));
        let ok = answer(r#"{"cmd":"startConsuming","path":"builds/*/*","_id":1}"#, &mut subs);
        assert_eq!(ok, json!({"msg": "OK", "code": 200, "_id": 1}));
        assert_eq!(subs.list.len(), 1);
        // Subscribing twice keeps one subscription.
        answer(r#"{"cmd":"startConsuming","path":"builds/*/*","_id":2}"#, &mut subs);
        assert_eq!(subs.list.len(), 1);
        assert_eq!(interest.patterns(), [Pattern::parse("builds/*/*").unwrap()]);
        let pong = answer(r#"{"cmd":"ping","_id":3}"#, &mut subs);
        assert_eq!(pong, json!({"msg": "pong", "code": 200, "_id": 3}));
        let ok = answer(r#"{"cmd":"stopConsuming","path":"builds/*/*","_id":4}"#, &mut subs);
        assert_eq!(ok["code"], 200);
        assert!(subs.list.is_empty());
        let again = answer(r#"{"cmd":"stopConsuming","path":"builds/*/*","_id":5}"#, &mut subs);
        assert_eq!(again["code"], 400);
        assert_eq!(answer(r#"{"cmd":"dance","_id":6}"#, &mut subs)["code"], 404);
        assert_eq!(answer("not json", &mut subs)["code"], 400);
        assert_eq!(answer(r#"{"cmd":"startConsuming","_id":7}"#, &mut subs)["code"], 400);
        // A connection's patterns leave the hub with it; another's stay.
        let mut other = Subscriptions::new(Arc::clone(&interest));
        answer(r#"{"cmd":"startConsuming","path":"steps/*/*","_id":8}"#, &mut subs);
        answer(r#"{"cmd":"startConsuming","path":"steps/*/*","_id":9}"#, &mut other);
        drop(subs);
        assert_eq!(interest.patterns(), [Pattern::parse("steps/*/*").unwrap()]);
        drop(other);
        assert!(interest.patterns().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_path_stopped_and_started_again_at_once_misses_nothing() {
        let interest = Arc::new(Interest::default());
        let mut subs = Subscriptions::new(Arc::clone(&interest));
        let build = Message::new("builds/3/finished".into(), String::new());
        answer(r#"{"cmd":"startConsuming","path":"builds/*/*","_id":1}"#, &mut subs);
        answer(r#"{"cmd":"stopConsuming","path":"builds/*/*","_id":2}"#, &mut subs);
        assert!(subs.matches(&build), "a path stopped a moment ago is still delivered");
        assert_eq!(interest.patterns().len(), 1, "and still read by the publisher");
        assert_eq!(answer(r#"{"cmd":"stopConsuming","path":"builds/*/*","_id":3}"#, &mut subs)["code"], 400);
        answer(r#"{"cmd":"startConsuming","path":"builds/*/*","_id":4}"#, &mut subs);
        assert_eq!((subs.list.len(), subs.lingering.len()), (1, 0), "started again, it is consumed once");
        tokio::time::advance(LINGER * 2).await;
        subs.expire();
        assert!(subs.matches(&build));
        answer(r#"{"cmd":"stopConsuming","path":"builds/*/*","_id":5}"#, &mut subs);
        tokio::time::advance(LINGER + Duration::from_millis(1)).await;
        subs.expire();
        assert!(!subs.matches(&build), "past the linger, a stopped path is not delivered");
        assert!(interest.patterns().is_empty());
    }

    #[test]
    fn only_events_a_pattern_may_match_are_read() {
        let pattern = |p: &str| Pattern::parse(p).unwrap();
        let build = Event::new(Topic::Builds, 7, "finished");
        assert!(pattern("builds/*/*").may_match(&build));
        assert!(pattern("builds/7/finished").may_match(&build));
        assert!(!pattern("builds/8/*").may_match(&build));
        assert!(pattern("builders/2/builds/*/*").may_match(&build), "the builder is known once read");
        assert!(!pattern("steps/*/*").may_match(&build));
        assert!(!pattern("builds/*/*").may_match(&Event::new(Topic::BuildRequests, 7, "new")));
        assert!(pattern("builds/7/steps/*/*").may_match(&Event::new(Topic::Steps, 30, "started")));
        assert!(pattern("steps/30/logs/*/*").may_match(&Event::new(Topic::Logs, 4, "append")));
        assert!(pattern("builds/*/properties/*").may_match(&Event::new(Topic::BuildProperties, 7, "update")));
    }

    #[test]
    fn a_build_is_published_under_each_of_buildbots_paths() {
        let object = json!({"buildid": 7, "builderid": 2, "number": 3, "workerid": 5, "properties": {"a": [1, "x"]}});
        let Value::Object(object) = object else { unreachable!() };
        let all: Vec<Pattern> =
            ["builders/*/builds/*/*", "builds/*/*", "workers/*/builds/*/*", "builds/*/properties/*"]
                .iter()
                .map(|p| Pattern::parse(p).unwrap())
                .collect();
        let keys: Vec<String> =
            messages(&Event::new(Topic::Builds, 7, "new"), &object, &all).into_iter().map(|m| m.key).collect();
        assert_eq!(keys, ["builders/2/builds/3/new", "builds/7/new", "workers/5/builds/7/new"]);
        // Only the paths some connection consumes are framed.
        let some = messages(&Event::new(Topic::Builds, 7, "new"), &object, &all[1..2]);
        assert_eq!(some.iter().map(|m| m.key.as_str()).collect::<Vec<_>>(), ["builds/7/new"]);
        assert!(messages(&Event::new(Topic::Builds, 7, "new"), &object, &[]).is_empty());
        let properties = messages(&Event::new(Topic::BuildProperties, 7, "update"), &object, &all);
        assert_eq!(properties[0].key, "builds/7/properties/update");
        assert_eq!(properties[0].frame.as_str(), r#"{"k":"builds/7/properties/update","m":{"a":[1,"x"]}}"#);
        let build = messages(&Event::new(Topic::Builds, 7, "finished"), &object, &all);
        let frame: Value = serde_json::from_str(build[1].frame.as_str()).unwrap();
        assert_eq!(frame["m"]["properties"], json!({}), "events carry no properties, as in Buildbot");
    }
}
