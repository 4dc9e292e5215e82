//! The master's wake-up and shutdown signals, shared by its loops, its worker registry and the
//! pool scalers: "the queue or the workers changed; look again" and "shutting down".

use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::{Notify, watch};

/// Wake-ups and the shutdown flag.
#[derive(Debug)]
pub struct Signals {
    /// Wakes the dispatcher: a request entered the queue, a worker freed a slot or joined.
    dispatch: Notify,
    /// Wakes every pool scaler on the same events (a count each follows, so none is missed).
    scale: watch::Sender<u64>,
    /// When the oldest wake-up not yet seen by a scaler happened, to measure reaction time.
    scale_woken_at: Mutex<Option<Instant>>,
    /// Counts the same events for whoever waits on the queue's progress (`trigger` steps
    /// waiting for their children).
    queue_events: watch::Sender<u64>,
    shutting_down: watch::Sender<bool>,
}

impl Default for Signals {
    fn default() -> Self {
        Signals {
            dispatch: Notify::new(),
            scale: watch::channel(0).0,
            scale_woken_at: Mutex::new(None),
            queue_events: watch::channel(0).0,
            shutting_down: watch::channel(false).0,
        }
    }
}

impl Signals {
    /// Something changed that may let a request run or change how many workers a pool needs:
    /// wakes the dispatcher, the scalers and whoever follows the queue.
    pub fn wake(&self) {
        self.dispatch.notify_one();
        self.queue_events.send_modify(|n| *n = n.wrapping_add(1));
        self.scale.send_modify(|n| *n = n.wrapping_add(1));
        self.scale_woken_at.lock().expect("scale_woken_at poisoned").get_or_insert_with(Instant::now);
    }

    /// Wakes only the scalers (a worker's count of busy slots changed, nothing else did).
    pub fn wake_scalers(&self) {
        self.scale.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Waits for the next wake-up of the dispatcher.
    pub async fn dispatch_wanted(&self) {
        self.dispatch.notified().await;
    }

    /// Follows what may change how many workers a pool needs: each scaler holds its own
    /// receiver, which sees every wake-up since it last looked.
    pub fn scale_events(&self) -> watch::Receiver<u64> {
        self.scale.subscribe()
    }

    /// When the earliest wake-up since the last call happened, if any (for the reaction-time
    /// histogram of the scalers).
    pub fn take_scale_wake(&self) -> Option<Instant> {
        self.scale_woken_at.lock().expect("scale_woken_at poisoned").take()
    }

    /// Follows the queue's progress: the value changes on every wake-up.
    pub fn queue_events(&self) -> watch::Receiver<u64> {
        self.queue_events.subscribe()
    }

    /// Raises the shutdown flag (once; later calls change nothing).
    pub fn begin_shutdown(&self) {
        let _ = self.shutting_down.send(true);
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutting_down.borrow()
    }

    /// Follows the shutdown flag: `changed()` resolves when shutdown begins.
    pub fn shutdown(&self) -> watch::Receiver<bool> {
        self.shutting_down.subscribe()
    }
}
