//! A ledger of what builds really ran, for the fault suite: the test builder's step appends a
//! `start` and an `end` line per run of each job to a file, and holds a lock on a file of the
//! job's own while it runs, writing `overlap` when another run of the same job holds it. What
//! ran once, twice, at the same time, or never is read from there, not from the API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A ledger file and the directory of its per-job locks.
#[derive(Debug, Clone)]
pub struct Ledger {
    pub path: PathBuf,
    locks: PathBuf,
}

/// What the ledger says about one job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Runs {
    pub starts: u32,
    pub ends: u32,
    pub overlaps: u32,
}

/// The suite's row for a scenario.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub submitted: usize,
    /// Jobs whose step ran to its end exactly once (earlier runs may have been killed).
    pub exactly_once: usize,
    /// Jobs whose step ran to its end more than once.
    pub duplicated: usize,
    /// Jobs of which two runs were alive at the same time.
    pub overlapping: usize,
    /// Jobs whose step never ran to its end.
    pub lost: usize,
}

impl Tally {
    /// The row of the suite's table.
    pub fn row(&self, scenario: &str) -> String {
        format!(
            "| {scenario} | {} | {} | {} | {} | {} |",
            self.submitted, self.exactly_once, self.duplicated, self.overlapping, self.lost
        )
    }
}

impl Ledger {
    /// A new, empty ledger under `dir`.
    pub fn new(dir: &Path) -> Ledger {
        let locks = dir.join("ledger-locks");
        std::fs::create_dir_all(&locks).expect("ledger lock directory");
        let path = dir.join("ledger.txt");
        std::fs::write(&path, "").expect("ledger file");
        Ledger { path, locks }
    }

    /// The configuration of a builder `ledger` and a force scheduler `force` for it: one shell
    /// step that records its run of the job named by the `job` property and lasts `seconds`.
    pub fn builders(&self, seconds: f64) -> String {
        let (ledger, locks) = (self.path.display(), self.locks.display());
        format!(
            r#"
builders:
  - name: ledger
    collapseRequests: false
    steps:
      - shell:
          name: record
          command: |
            exec 9>>'{locks}/%(prop:job)s'
            if ! flock -n 9; then echo "overlap %(prop:job)s" >> '{ledger}'; fi
            echo "start %(prop:job)s %(prop:workername)s" >> '{ledger}'
            sleep {seconds}
            echo "end %(prop:job)s" >> '{ledger}'
schedulers:
  - {{type: force, name: force, builderNames: [ledger]}}
"#
        )
    }

    /// Every job's runs so far.
    pub fn runs(&self) -> BTreeMap<String, Runs> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let mut runs: BTreeMap<String, Runs> = BTreeMap::new();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            let (Some(what), Some(job)) = (words.next(), words.next()) else { continue };
            let entry = runs.entry(job.to_owned()).or_default();
            match what {
                "start" => entry.starts += 1,
                "end" => entry.ends += 1,
                "overlap" => entry.overlaps += 1,
                _ => {}
            }
        }
        runs
    }

    /// Jobs started and not ended: those running now, or killed.
    pub fn unfinished(&self) -> Vec<String> {
        self.runs().into_iter().filter(|(_, r)| r.starts > r.ends).map(|(job, _)| job).collect()
    }

    /// The worker each unfinished job last started on.
    pub fn running_on(&self) -> BTreeMap<String, String> {
        let unfinished = self.unfinished();
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let mut on = BTreeMap::new();
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let ["start", job, worker] = words.as_slice()
                && unfinished.iter().any(|j| j == job)
            {
                on.insert((*job).to_owned(), (*worker).to_owned());
            }
        }
        on
    }

    /// How many runs of all jobs have started.
    pub fn starts(&self) -> u32 {
        self.runs().values().map(|r| r.starts).sum()
    }

    /// The tally of `jobs`, the jobs submitted.
    pub fn tally(&self, jobs: &[String]) -> Tally {
        let runs = self.runs();
        let mut tally = Tally { submitted: jobs.len(), ..Tally::default() };
        for job in jobs {
            let r = runs.get(job).copied().unwrap_or_default();
            match r.ends {
                0 => tally.lost += 1,
                1 => tally.exactly_once += 1,
                _ => tally.duplicated += 1,
            }
            if r.overlaps > 0 {
                tally.overlapping += 1;
            }
        }
        tally
    }
}
