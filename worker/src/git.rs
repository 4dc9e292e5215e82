//! The `git` command, natively with libgit2: fetch into a bare mirror in the cache directory
//! (shared by every build on the worker, and by every worker on a shared volume), then check out
//! the exact revision into the build directory, which borrows the mirror's objects through git's
//! alternates instead of copying them.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use git2::build::CheckoutBuilder;
use git2::{FetchOptions, Oid, RemoteCallbacks, Repository};

/// Arguments of a checkout.
#[derive(Debug, Clone)]
pub struct GitArgs {
    pub repourl: String,
    pub revision: Option<String>,
    pub branch: Option<String>,
    pub workdir: PathBuf,
    pub full: bool,
    pub timeout: Option<Duration>,
}

/// What a checkout produced, and what it did on the way (for the step's log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkout {
    pub revision: String,
    pub log: Vec<String>,
}

/// The mirror directory of a repository URL inside the cache.
pub fn mirror_path(cache_dir: &Path, url: &str) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    url.hash(&mut hasher);
    let readable: String = url
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("repo")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .take(40)
        .collect();
    cache_dir.join("git").join(format!("{readable}-{:016x}.git", hasher.finish()))
}

fn fetch_options<'a>(deadline: Option<Instant>, cancelled: &'a AtomicBool) -> FetchOptions<'a> {
    let mut callbacks = RemoteCallbacks::new();
    // Returning false aborts the transfer: that is how a timeout or an interrupt stops libgit2.
    callbacks
        .transfer_progress(move |_| !cancelled.load(Ordering::SeqCst) && deadline.is_none_or(|d| Instant::now() < d));
    let mut options = FetchOptions::new();
    options.remote_callbacks(callbacks);
    options.download_tags(git2::AutotagOption::All);
    options
}

fn find_commit(repo: &Repository, revision: &str) -> Option<Oid> {
    repo.revparse_single(revision).ok().and_then(|o| o.peel_to_commit().ok()).map(|c| c.id())
}

/// Fetches into the mirror and checks out the wanted revision. Blocking: run it off the async
/// runtime. `cancelled` stops a fetch in progress.
pub fn checkout(cache_dir: &Path, args: &GitArgs, cancelled: Arc<AtomicBool>) -> Result<Checkout, String> {
    let deadline = args.timeout.map(|t| Instant::now() + t);
    let mut log = Vec::new();
    let mirror_dir = mirror_path(cache_dir, &args.repourl);
    std::fs::create_dir_all(mirror_dir.parent().expect("mirror has a parent")).map_err(|e| format!("cache: {e}"))?;
    // One fetch into a mirror at a time, across builds and across workers sharing the volume.
    let lock_path = mirror_dir.with_extension("lock");
    let lock = File::create(&lock_path).map_err(|e| format!("{}: {e}", lock_path.display()))?;
    lock.lock().map_err(|e| format!("lock {}: {e}", lock_path.display()))?;
    let mirror = match Repository::open_bare(&mirror_dir) {
        Ok(repo) => repo,
        Err(_) => Repository::init_bare(&mirror_dir).map_err(|e| format!("init mirror: {e}"))?,
    };
    let wanted = args.revision.clone().filter(|r| !r.is_empty());
    let already_there =
        wanted.as_deref().and_then(|r| Oid::from_str(r).ok()).and_then(|oid| mirror.find_commit(oid).ok()).is_some();
    if !already_there {
        log.push(format!("fetching {} into {}", args.repourl, mirror_dir.display()));
        let mut remote = mirror.remote_anonymous(&args.repourl).map_err(|e| format!("remote {}: {e}", args.repourl))?;
        let refspecs = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*", "+HEAD:refs/kiln/HEAD"];
        remote.fetch(&refspecs, Some(&mut fetch_options(deadline, &cancelled)), None).map_err(|e| {
            if cancelled.load(Ordering::SeqCst) {
                "interrupted".to_owned()
            } else if deadline.is_some_and(|d| Instant::now() >= d) {
                "timed out".to_owned()
            } else {
                format!("fetch {}: {e}", args.repourl)
            }
        })?;
        if let Some(revision) = &wanted
            && find_commit(&mirror, revision).is_none()
        {
            // The commit may be reachable only from a ref not fetched above; ask for it.
            let _ = remote.fetch(&[revision.as_str()], Some(&mut fetch_options(deadline, &cancelled)), None);
        }
    } else {
        log.push(format!("revision {} already in the mirror", wanted.as_deref().unwrap_or_default()));
    }
    let oid = match (&wanted, &args.branch) {
        (Some(revision), _) => find_commit(&mirror, revision)
            .ok_or_else(|| format!("revision {revision} not found in {}", args.repourl))?,
        (None, Some(branch)) if branch.starts_with("refs/") => {
            find_commit(&mirror, branch).ok_or_else(|| format!("{branch} not found in {}", args.repourl))?
        }
        (None, Some(branch)) => find_commit(&mirror, &format!("refs/heads/{branch}"))
            .ok_or_else(|| format!("branch {branch} not found in {}", args.repourl))?,
        (None, None) => {
            find_commit(&mirror, "refs/kiln/HEAD").ok_or_else(|| format!("{} has no HEAD", args.repourl))?
        }
    };
    drop(mirror);
    drop(lock);

    std::fs::create_dir_all(&args.workdir).map_err(|e| format!("{}: {e}", args.workdir.display()))?;
    let repo = match Repository::open(&args.workdir) {
        Ok(repo) if repo.workdir().is_some_and(|w| same_dir(w, &args.workdir)) => repo,
        _ => Repository::init(&args.workdir).map_err(|e| format!("init {}: {e}", args.workdir.display()))?,
    };
    let alternates = repo.path().join("objects").join("info").join("alternates");
    let objects = mirror_dir.join("objects");
    std::fs::create_dir_all(alternates.parent().expect("alternates has a parent")).map_err(|e| e.to_string())?;
    std::fs::write(&alternates, format!("{}\n", objects.display()))
        .map_err(|e| format!("{}: {e}", alternates.display()))?;
    // Re-open so libgit2 reads the alternates file just written.
    let repo = Repository::open(&args.workdir).map_err(|e| format!("open {}: {e}", args.workdir.display()))?;
    let commit = repo.find_commit(oid).map_err(|e| format!("commit {oid}: {e}"))?;
    let mut checkout = CheckoutBuilder::new();
    checkout.force();
    if args.full {
        checkout.remove_untracked(true).remove_ignored(true);
    }
    repo.checkout_tree(commit.as_object(), Some(&mut checkout)).map_err(|e| format!("checkout {oid}: {e}"))?;
    repo.set_head_detached(oid).map_err(|e| format!("set HEAD to {oid}: {e}"))?;
    log.push(format!("checked out {oid} into {}", args.workdir.display()));
    Ok(Checkout { revision: oid.to_string(), log })
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit_file(repo: &Repository, name: &str, content: &str, message: &str) -> Oid {
        let workdir = repo.workdir().unwrap();
        std::fs::write(workdir.join(name), content).unwrap();
        let mut index = repo.index().unwrap();
        index.add_path(Path::new(name)).unwrap();
        index.write().unwrap();
        let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
        let sig = git2::Signature::now("T", "t@example.org").unwrap();
        let parents: Vec<git2::Commit> = repo.head().ok().and_then(|h| h.peel_to_commit().ok()).into_iter().collect();
        let parents: Vec<&git2::Commit> = parents.iter().collect();
        repo.commit(Some("HEAD"), &sig, &sig, message, &tree, &parents).unwrap()
    }

    #[test]
    fn checks_out_an_exact_revision_through_the_mirror() {
        let dir = tempfile::tempdir().unwrap();
        let upstream = Repository::init(dir.path().join("up")).unwrap();
        let first = commit_file(&upstream, "a.txt", "one", "first");
        let second = commit_file(&upstream, "a.txt", "two", "second");
        let args = |revision: Option<Oid>, full| GitArgs {
            repourl: dir.path().join("up").display().to_string(),
            revision: revision.map(|r| r.to_string()),
            branch: None,
            workdir: dir.path().join("build"),
            full,
            timeout: None,
        };
        let cache = dir.path().join("cache");
        let done = checkout(&cache, &args(Some(first), false), Arc::default()).unwrap();
        assert_eq!(done.revision, first.to_string());
        assert_eq!(std::fs::read_to_string(dir.path().join("build/a.txt")).unwrap(), "one");
        std::fs::write(dir.path().join("build/untracked"), "x").unwrap();
        let done = checkout(&cache, &args(None, true), Arc::default()).unwrap();
        assert_eq!(done.revision, second.to_string());
        assert_eq!(std::fs::read_to_string(dir.path().join("build/a.txt")).unwrap(), "two");
        assert!(!dir.path().join("build/untracked").exists(), "full mode removes untracked files");
        assert!(mirror_path(&cache, &args(None, false).repourl).exists());
    }

    #[test]
    fn an_unknown_revision_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let upstream = Repository::init(dir.path().join("up")).unwrap();
        commit_file(&upstream, "a.txt", "one", "first");
        let args = GitArgs {
            repourl: dir.path().join("up").display().to_string(),
            revision: Some("0123456789012345678901234567890123456789".into()),
            branch: None,
            workdir: dir.path().join("build"),
            full: false,
            timeout: None,
        };
        let error = checkout(&dir.path().join("cache"), &args, Arc::default()).unwrap_err();
        assert!(error.contains("not found"), "{error}");
    }
}
