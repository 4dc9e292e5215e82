//! The master's wall clock. Everything that stamps or schedules by wall time — tree-stable timers,
//! Periodic and Nightly schedulers, leases, build and request timestamps — asks this clock, so a
//! paused tokio runtime can drive a whole master through hours of schedule in a test.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, by the system clock or by tokio's.
#[derive(Debug, Clone, Copy, Default)]
pub struct Clock {
    /// `None`: the system clock. `Some((ms, instant))`: `ms` at tokio's `instant`, moving as
    /// tokio's clock moves (and standing still while it is paused).
    tokio_anchor: Option<(i64, tokio::time::Instant)>,
}

impl Clock {
    /// The system's wall clock: what a running master uses.
    pub fn system() -> Clock {
        Clock { tokio_anchor: None }
    }

    /// A clock that reads `start_ms` now and then follows tokio's clock. Under a paused runtime
    /// it moves only when the runtime's time is advanced, which is what tests want. Sleeps the
    /// master computes from it (`due - now`) then end exactly when this clock reaches `due`.
    ///
    /// Must be called inside a tokio runtime.
    pub fn following_tokio(start_ms: i64) -> Clock {
        Clock { tokio_anchor: Some((start_ms, tokio::time::Instant::now())) }
    }

    /// Whether this clock follows tokio's rather than the system's.
    pub fn follows_tokio(&self) -> bool {
        self.tokio_anchor.is_some()
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        match self.tokio_anchor {
            None => system_now_ms(),
            Some((start_ms, at)) => start_ms + millis(tokio::time::Instant::now().duration_since(at)),
        }
    }
}

/// Milliseconds since the Unix epoch by the system clock, for what no master drives (config
/// checks, change times a payload leaves out).
pub fn system_now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(millis).unwrap_or(0)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_tokio_clock_moves_only_with_tokio_time() {
        let clock = Clock::following_tokio(1_000_000);
        assert_eq!(clock.now_ms(), 1_000_000);
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(clock.now_ms(), 1_001_500);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(clock.now_ms(), 1_001_500 + 3_600_000);
    }

    #[test]
    fn the_system_clock_reads_the_wall_time() {
        let before = system_now_ms();
        let read = Clock::system().now_ms();
        assert!(read >= before && read - before < 60_000, "{before} then {read}");
    }
}
