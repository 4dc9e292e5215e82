//! Git pollers with libgit2: list a repository's branch tips, fetch them into a bare repository in
//! the data directory, and turn commits not seen before into changes — oldest first, along
//! first-parent history. Blocking: run it off the async runtime.

use std::collections::BTreeMap;
use std::path::PathBuf;

use git2::{Direction, Oid, Repository, Sort};

use crate::config::{GitPollerConfig, PolledBranches};
use crate::domain::NewChange;

/// A configured poller, ready to poll.
#[derive(Debug, Clone)]
pub struct GitPoller {
    pub name: String,
    pub config: GitPollerConfig,
    /// The bare repository this master fetches into.
    pub workdir: PathBuf,
}

/// What one poll found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Poll {
    /// Branch → tip revision, for the followed branches that exist.
    pub tips: BTreeMap<String, String>,
    /// New commits as changes, oldest first (branch by branch).
    pub changes: Vec<NewChange>,
}

fn person(signature: &git2::Signature) -> String {
    match (signature.name().ok(), signature.email().ok()) {
        (Some(name), Some(email)) if !email.is_empty() => format!("{name} <{email}>"),
        (Some(name), _) => name.to_owned(),
        (None, Some(email)) => email.to_owned(),
        (None, None) => String::new(),
    }
}

impl GitPoller {
    pub fn new(config: GitPollerConfig, data_dir: &std::path::Path) -> GitPoller {
        let name = config.name();
        let dir = crate::config::sanitize_dir(&name);
        GitPoller { name, workdir: data_dir.join("pollers").join(format!("{dir}.git")), config }
    }

    fn follows(&self, branch: &str) -> bool {
        match &self.config.branches {
            None => branch == "main",
            Some(PolledBranches::All(_)) => true,
            Some(PolledBranches::List(list)) => list.iter().any(|b| b == branch),
        }
    }

    /// Polls the repository. `known` are the tips recorded last time; `first` means none were
    /// ever recorded, in which case the tips are learned and no change is reported (Buildbot's
    /// behaviour: a new poller does not build the whole history).
    pub fn poll(&self, known: &BTreeMap<String, String>, first: bool) -> Result<Poll, String> {
        std::fs::create_dir_all(&self.workdir).map_err(|e| format!("{}: {e}", self.workdir.display()))?;
        let repo = match Repository::open_bare(&self.workdir) {
            Ok(repo) => repo,
            Err(_) => {
                Repository::init_bare(&self.workdir).map_err(|e| format!("init {}: {e}", self.workdir.display()))?
            }
        };
        let url = &self.config.repourl;
        let mut remote = repo.remote_anonymous(url).map_err(|e| format!("remote {url}: {e}"))?;
        remote.connect(Direction::Fetch).map_err(|e| format!("connect to {url}: {e}"))?;
        let mut tips = BTreeMap::new();
        for head in remote.list().map_err(|e| format!("list {url}: {e}"))? {
            if let Some(branch) = head.name().strip_prefix("refs/heads/")
                && self.follows(branch)
            {
                tips.insert(branch.to_owned(), head.oid().to_string());
            }
        }
        let refspecs: Vec<String> = tips.keys().map(|b| format!("+refs/heads/{b}:refs/kiln/poll/{b}")).collect();
        if !refspecs.is_empty() {
            remote.download(&refspecs, None).map_err(|e| format!("fetch {url}: {e}"))?;
        }
        let _ = remote.disconnect();
        let mut poll = Poll { tips, changes: Vec::new() };
        if first {
            return Ok(poll);
        }
        let known_oids: Vec<Oid> = known.values().filter_map(|r| Oid::from_str(r).ok()).collect();
        for (branch, tip) in &poll.tips {
            if known.get(branch) == Some(tip) {
                continue;
            }
            let mut walk = repo.revwalk().map_err(|e| e.to_string())?;
            walk.push(Oid::from_str(tip).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
            walk.simplify_first_parent().map_err(|e| e.to_string())?;
            walk.set_sorting(Sort::TOPOLOGICAL | Sort::REVERSE).map_err(|e| e.to_string())?;
            for oid in &known_oids {
                // A known tip may be gone after a force push; hiding it is then moot.
                let _ = walk.hide(*oid);
            }
            for oid in walk {
                let oid = oid.map_err(|e| e.to_string())?;
                poll.changes.push(self.change(&repo, oid, branch)?);
            }
        }
        Ok(poll)
    }

    fn change(&self, repo: &Repository, oid: Oid, branch: &str) -> Result<NewChange, String> {
        let commit = repo.find_commit(oid).map_err(|e| format!("commit {oid}: {e}"))?;
        let tree = commit.tree().map_err(|e| e.to_string())?;
        let parent_tree = commit.parent(0).ok().and_then(|p| p.tree().ok());
        let diff = repo.diff_tree_to_tree(parent_tree.as_ref(), Some(&tree), None).map_err(|e| e.to_string())?;
        let files = diff
            .deltas()
            .filter_map(|d| {
                d.new_file().path().or_else(|| d.old_file().path()).map(|p| p.to_string_lossy().into_owned())
            })
            .collect();
        let mut properties = crate::properties::Properties::new();
        properties.set("event", serde_json::Value::from("poll"), "Change");
        Ok(NewChange {
            author: person(&commit.author()),
            committer: Some(person(&commit.committer())),
            comments: commit.message().unwrap_or_default().to_owned(),
            branch: Some(branch.to_owned()),
            revision: Some(oid.to_string()),
            revlink: None,
            when_ms: Some(commit.time().seconds() * 1000),
            category: self.config.category.clone(),
            repository: self.config.repourl.clone(),
            codebase: self.config.codebase.clone(),
            project: self.config.project.clone(),
            files,
            properties,
        })
    }
}
