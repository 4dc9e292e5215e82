//! How many workers a pool should have: a pure function of the queue, the pool's workers and its
//! policy, with scale-down hysteresis. The scaler applies the answers; nothing here does IO.

use std::time::{Duration, Instant};

/// A pool's sizing rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub min: u32,
    pub max: u32,
    /// Builds one worker runs at once.
    pub builds_per_worker: u32,
    /// Idle workers kept ready beyond what the queue needs.
    pub warm: u32,
    /// How long the need must stay lower before the pool shrinks.
    pub scale_down_delay: Duration,
}

/// What the pool and its queue look like now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Requests the pool's workers could claim.
    pub claimable: u32,
    /// Builds running on the pool's workers.
    pub running: u32,
    /// Workers running at least one build: the pool never shrinks below them.
    pub busy_workers: u32,
    /// Workers that exist or are starting (a starting worker already counts as capacity, so a
    /// burst does not start more than it needs).
    pub workers: u32,
}

/// Remembers since when the pool has needed fewer workers than it has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hysteresis {
    lower_since: Option<Instant>,
}

/// What the pool should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// The number of workers to have.
    pub desired: u32,
    /// When to look again if nothing else happens (a pending scale-down), if at all.
    pub recheck_after: Option<Duration>,
}

/// The workers the load needs under the policy, before hysteresis:
/// `clamp(min, max, ceil((claimable + running) / builds_per_worker) + warm)`.
pub fn needed(policy: &Policy, load: &Load) -> u32 {
    let per = policy.builds_per_worker.max(1);
    let work = load.claimable.saturating_add(load.running);
    let workers = work.div_ceil(per).saturating_add(policy.warm);
    workers.clamp(policy.min, policy.max.max(policy.min))
}

/// Decides the pool's size at `now`. Growing happens at once; shrinking only once the need has
/// stayed lower for the whole delay, and never below the busy workers.
pub fn decide(policy: &Policy, load: &Load, hysteresis: &mut Hysteresis, now: Instant) -> Decision {
    let target = needed(policy, load);
    if target >= load.workers {
        hysteresis.lower_since = None;
        return Decision { desired: target, recheck_after: None };
    }
    let since = *hysteresis.lower_since.get_or_insert(now);
    let waited = now.saturating_duration_since(since);
    if waited < policy.scale_down_delay {
        return Decision { desired: load.workers, recheck_after: Some(policy.scale_down_delay - waited) };
    }
    let floor = load.busy_workers.min(policy.max.max(policy.min));
    let desired = target.max(floor);
    if desired >= load.workers {
        // Busy workers hold the pool up; look again when they may be done.
        return Decision { desired: load.workers, recheck_after: None };
    }
    hysteresis.lower_since = None;
    Decision { desired, recheck_after: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy { min: 1, max: 6, builds_per_worker: 1, warm: 0, scale_down_delay: Duration::from_secs(30) }
    }

    fn load(claimable: u32, running: u32, busy_workers: u32, workers: u32) -> Load {
        Load { claimable, running, busy_workers, workers }
    }

    #[test]
    fn the_need_follows_the_queue_within_bounds() {
        let p = policy();
        let table = [
            (load(0, 0, 0, 0), 1),  // min
            (load(3, 0, 0, 1), 3),  // one worker per build
            (load(60, 0, 0, 1), 6), // max reached
            (load(2, 2, 2, 4), 4),  // running builds count
        ];
        for (l, expected) in table {
            assert_eq!(needed(&p, &l), expected, "{l:?}");
        }
        let shared = Policy { builds_per_worker: 4, warm: 1, ..policy() };
        assert_eq!(needed(&shared, &load(5, 2, 0, 0)), 3, "ceil(7 / 4) + 1 warm");
        let zero = Policy { min: 0, ..policy() };
        assert_eq!(needed(&zero, &load(0, 0, 0, 0)), 0, "a pool may drain to zero");
    }

    #[test]
    fn a_burst_scales_up_at_once_and_counts_starting_workers() {
        let mut h = Hysteresis::default();
        let now = Instant::now();
        assert_eq!(decide(&policy(), &load(60, 0, 0, 1), &mut h, now).desired, 6);
        // Six are starting: nothing more is asked for.
        assert_eq!(decide(&policy(), &load(60, 0, 0, 6), &mut h, now).desired, 6);
    }

    #[test]
    fn shrinking_waits_for_the_delay_and_never_drops_busy_workers() {
        let p = policy();
        let mut h = Hysteresis::default();
        let t0 = Instant::now();
        let quiet = load(0, 2, 2, 6);
        let first = decide(&p, &quiet, &mut h, t0);
        assert_eq!(first, Decision { desired: 6, recheck_after: Some(Duration::from_secs(30)) });
        let later = decide(&p, &quiet, &mut h, t0 + Duration::from_secs(10));
        assert_eq!(later.desired, 6);
        assert_eq!(later.recheck_after, Some(Duration::from_secs(20)));
        let done = decide(&p, &quiet, &mut h, t0 + Duration::from_secs(31));
        assert_eq!(done.desired, 2, "down to the need, which the two busy workers also hold");
        let idle = decide(&p, &load(0, 0, 0, 2), &mut h, t0 + Duration::from_secs(32));
        assert_eq!(idle.desired, 2, "a new delay starts");
        assert_eq!(decide(&p, &load(0, 0, 0, 2), &mut h, t0 + Duration::from_secs(63)).desired, 1, "then min");
    }

    #[test]
    fn flapping_load_does_not_shrink_the_pool() {
        let p = policy();
        let mut h = Hysteresis::default();
        let t0 = Instant::now();
        for second in 0..120u64 {
            // Work arrives every 20 s, less than the 30 s delay: the pool stays at 4.
            let l = if second % 20 == 0 { load(4, 0, 0, 4) } else { load(0, 1, 1, 4) };
            let d = decide(&p, &l, &mut h, t0 + Duration::from_secs(second));
            assert_eq!(d.desired, 4, "at {second} s");
        }
    }

    #[test]
    fn draining_to_zero_after_the_delay() {
        let p = Policy { min: 0, ..policy() };
        let mut h = Hysteresis::default();
        let t0 = Instant::now();
        assert_eq!(decide(&p, &load(0, 0, 0, 3), &mut h, t0).desired, 3);
        assert_eq!(decide(&p, &load(0, 0, 0, 3), &mut h, t0 + Duration::from_secs(30)).desired, 0);
    }
}
