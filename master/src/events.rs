//! The data API's events: which object changed and how (`builds 7 finished`), as the store
//! records them after each commit, queued for the publisher that turns them into Buildbot's
//! WebSocket messages and shares them with the other masters of the database.
//!
//! Publishing never waits: a writer appends to a bounded queue and goes on, so a slow reader of
//! events can never slow a build. Events beyond the bound are dropped and counted.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

/// The kinds of object the data API publishes events about, each under its REST collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    Builds,
    BuildRequests,
    Buildsets,
    Steps,
    Logs,
    /// The properties of the build whose id the event carries.
    BuildProperties,
    Changes,
    Workers,
    Builders,
    Schedulers,
    Masters,
}

impl Topic {
    const ALL: [Topic; 11] = [
        Topic::Builds,
        Topic::BuildRequests,
        Topic::Buildsets,
        Topic::Steps,
        Topic::Logs,
        Topic::BuildProperties,
        Topic::Changes,
        Topic::Workers,
        Topic::Builders,
        Topic::Schedulers,
        Topic::Masters,
    ];

    /// A short name, for the notifications between masters.
    fn code(self) -> &'static str {
        match self {
            Topic::Builds => "b",
            Topic::BuildRequests => "r",
            Topic::Buildsets => "s",
            Topic::Steps => "t",
            Topic::Logs => "l",
            Topic::BuildProperties => "p",
            Topic::Changes => "c",
            Topic::Workers => "w",
            Topic::Builders => "u",
            Topic::Schedulers => "h",
            Topic::Masters => "m",
        }
    }
}

/// Buildbot's event names (the last segment of a routing key).
const NAMES: [&str; 14] = [
    "new",
    "update",
    "updated",
    "started",
    "finished",
    "claimed",
    "unclaimed",
    "complete",
    "cancel",
    "append",
    "connected",
    "disconnected",
    "state_updated",
    "stopped",
];

/// One change of one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Event {
    pub topic: Topic,
    pub id: i64,
    /// One of Buildbot's event names: `new`, `update`, `finished`, `append`, …
    pub name: &'static str,
}

impl Event {
    pub fn new(topic: Topic, id: i64, name: &'static str) -> Event {
        debug_assert!(NAMES.contains(&name), "unknown event name {name}");
        Event { topic, id, name }
    }
}

/// Where an event happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// On this master: other masters must hear of it.
    Here,
    /// On another master, which has told the others already.
    Elsewhere,
}

/// Events waiting for the publisher.
#[derive(Debug)]
pub struct Events {
    queue: Mutex<Vec<(Event, Origin)>>,
    ready: Notify,
    dropped: AtomicU64,
    /// Names this process in what it sends, so it can ignore its own notifications, which the
    /// database delivers to every listener, the sender's too.
    sender: u64,
}

impl Default for Events {
    fn default() -> Self {
        Events { queue: Mutex::default(), ready: Notify::new(), dropped: AtomicU64::new(0), sender: rand::random() }
    }
}

/// How many events may wait before new ones are dropped: far more than a busy master makes
/// between two rounds of the publisher.
const MAX_WAITING: usize = 100_000;

/// The largest notification payload sent to other masters (PostgreSQL allows 8000 bytes).
pub const MAX_PAYLOAD: usize = 7_000;

impl Events {
    /// Queues events that happened on this master (after their transaction committed).
    pub fn publish(&self, events: impl IntoIterator<Item = Event>) {
        self.push(events.into_iter().map(|e| (e, Origin::Here)));
    }

    /// Queues events another master announced, as [`Events::encode`] wrote them; its own, and
    /// entries it cannot read, are skipped.
    pub fn receive(&self, payload: &str) {
        let (sender, events) = payload.split_once('\n').unwrap_or((payload, ""));
        if sender.strip_prefix('@').and_then(|s| s.parse::<u64>().ok()).is_none_or(|s| s == self.sender) {
            return;
        }
        self.push(decode(events).map(|e| (e, Origin::Elsewhere)));
    }

    /// Encodes events for the other masters: a line naming this process, then `code id name`
    /// per line, in payloads of at most [`MAX_PAYLOAD`] bytes.
    pub fn encode(&self, events: &[Event]) -> Vec<String> {
        let header = format!("@{}", self.sender);
        encode(events, MAX_PAYLOAD - header.len() - 1).into_iter().map(|body| format!("{header}\n{body}")).collect()
    }

    fn push(&self, events: impl Iterator<Item = (Event, Origin)>) {
        let mut queue = self.queue.lock().expect("event queue poisoned");
        let before = queue.len();
        for event in events {
            if queue.len() >= MAX_WAITING {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            queue.push(event);
        }
        let added = queue.len() > before;
        drop(queue);
        if added {
            self.ready.notify_one();
        }
    }

    /// Waits until events are queued and takes them all, oldest first.
    pub async fn next_batch(&self) -> Vec<(Event, Origin)> {
        loop {
            let notified = self.ready.notified();
            let batch = self.take();
            if !batch.is_empty() {
                return batch;
            }
            notified.await;
        }
    }

    /// The events queued now, if any, without waiting.
    pub fn take(&self) -> Vec<(Event, Origin)> {
        std::mem::take(&mut *self.queue.lock().expect("event queue poisoned"))
    }

    /// How many events were dropped because the publisher fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Encodes events as `code id name` per line, in payloads of at most `max` bytes.
fn encode(events: &[Event], max: usize) -> Vec<String> {
    let mut payloads = Vec::new();
    let mut current = String::new();
    for event in events {
        let line = format!("{} {} {}", event.topic.code(), event.id, event.name);
        if !current.is_empty() && current.len() + 1 + line.len() > max {
            payloads.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push('\n');
        }
        current.push_str(&line);
    }
    if !current.is_empty() {
        payloads.push(current);
    }
    payloads
}

/// Decodes what [`encode`] wrote, skipping anything else.
fn decode(payload: &str) -> impl Iterator<Item = Event> + '_ {
    payload.lines().filter_map(|line| {
        let mut parts = line.split(' ');
        let code = parts.next()?;
        let id = parts.next()?.parse::<i64>().ok()?;
        let name = parts.next()?;
        if parts.next().is_some() {
            return None;
        }
        let topic = Topic::ALL.into_iter().find(|t| t.code() == code)?;
        let name = NAMES.into_iter().find(|n| *n == name)?;
        Some(Event { topic, id, name })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_travel_between_masters_unchanged_and_in_bounded_payloads() {
        let events: Vec<Event> = (0..2_000)
            .map(|i| Event::new(Topic::ALL[i as usize % Topic::ALL.len()], i, NAMES[i as usize % NAMES.len()]))
            .collect();
        let (here, there) = (Events::default(), Events::default());
        let payloads = here.encode(&events);
        assert!(payloads.len() > 1, "2000 events need more than one payload");
        assert!(payloads.iter().all(|p| p.len() <= MAX_PAYLOAD));
        for payload in &payloads {
            here.receive(payload);
            there.receive(payload);
        }
        assert!(here.queue.lock().unwrap().is_empty(), "a master ignores its own notifications");
        let back: Vec<Event> = there
            .queue
            .lock()
            .unwrap()
            .iter()
            .map(|(e, origin)| {
                assert_eq!(*origin, Origin::Elsewhere);
                *e
            })
            .collect();
        assert_eq!(back, events);
    }

    #[test]
    fn a_foreign_payload_yields_only_what_it_spells_correctly() {
        let decoded: Vec<Event> =
            decode("b 7 new\nx 1 new\nb seven new\nb 7 exploded\nb 7 new extra\n\nl 3 append").collect();
        assert_eq!(decoded, vec![Event::new(Topic::Builds, 7, "new"), Event::new(Topic::Logs, 3, "append")]);
    }

    #[tokio::test]
    async fn publishing_never_waits_and_drops_beyond_the_bound() {
        let events = Events::default();
        for i in 0..(MAX_WAITING as i64 + 10) {
            events.publish([Event::new(Topic::Logs, i, "append")]);
        }
        assert_eq!(events.dropped(), 10);
        let batch = events.next_batch().await;
        assert_eq!(batch.len(), MAX_WAITING);
        assert_eq!(batch[0], (Event::new(Topic::Logs, 0, "append"), Origin::Here));
        events.receive("@1\nb 1 new");
        events.receive("b 2 new");
        assert_eq!(events.next_batch().await, vec![(Event::new(Topic::Builds, 1, "new"), Origin::Elsewhere)]);
    }
}
