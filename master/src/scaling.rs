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

/// A worker as a scale-down sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    /// Started but not yet connected to the master.
    pub starting: bool,
    /// Builds running on it.
    pub running: u32,
    /// How long its oldest running build has run, in seconds.
    pub busy_for_secs: u64,
}

/// The workers to retire to shrink by `count`: workers still starting first (they hold no build
/// and no warm cache), then idle ones; a worker with a build is never chosen, so the pool may
/// shrink by less than asked.
pub fn victims(members: &[Member], count: u32) -> Vec<String> {
    let mut candidates: Vec<&Member> = members.iter().filter(|m| m.running == 0).collect();
    // Starting workers first; then by name, newest-numbered last, for a stable choice.
    candidates.sort_by(|a, b| b.starting.cmp(&a.starting).then_with(|| b.name.cmp(&a.name)));
    candidates.into_iter().take(count as usize).map(|m| m.name.clone()).collect()
}

/// `controller.kubernetes.io/pod-deletion-cost` for each pod of a Deployment being scaled down,
/// so that the ReplicaSet removes exactly the chosen victims: victims lowest, other idle pods
/// next, busy pods highest and more so the longer their build has run (capped at a day).
pub fn deletion_costs(members: &[Member], victims: &[String]) -> Vec<(String, i32)> {
    members
        .iter()
        .map(|m| {
            let cost = if victims.contains(&m.name) {
                -1000
            } else if m.running == 0 {
                0
            } else {
                10 + m.busy_for_secs.min(86_400) as i32
            };
            (m.name.clone(), cost)
        })
        .collect()
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

    fn member(name: &str, starting: bool, running: u32, busy_for_secs: u64) -> Member {
        Member { name: name.into(), starting, running, busy_for_secs }
    }

    #[test]
    fn victims_are_starting_then_idle_workers_never_busy_ones() {
        let pool = [
            member("w-1", false, 1, 300),
            member("w-2", false, 0, 0),
            member("w-3", true, 0, 0),
            member("w-4", false, 0, 0),
        ];
        assert_eq!(victims(&pool, 1), vec!["w-3"]);
        assert_eq!(victims(&pool, 3), vec!["w-3", "w-4", "w-2"]);
        assert_eq!(victims(&pool, 4), vec!["w-3", "w-4", "w-2"], "the busy worker stays");
        assert!(victims(&[member("w-1", false, 2, 10)], 1).is_empty());
    }

    #[test]
    fn deletion_costs_make_the_replica_set_remove_the_victims() {
        let pool = [member("a", false, 1, 30), member("b", false, 0, 0), member("c", false, 1, 999_999)];
        let costs = deletion_costs(&pool, &["b".to_owned()]);
        assert_eq!(costs, vec![("a".into(), 40), ("b".into(), -1000), ("c".into(), 86_410)]);
        let lowest = costs.iter().min_by_key(|(_, cost)| *cost).unwrap();
        assert_eq!(lowest.0, "b");
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
