//! Real git repositories for tests: made and committed to with libgit2.

use std::path::{Path, PathBuf};

use git2::{Repository, Signature};

/// A repository with a work tree on branch `main`.
pub struct TestRepo {
    pub path: PathBuf,
    repo: Repository,
}

impl TestRepo {
    pub fn init(path: &Path) -> TestRepo {
        let mut options = git2::RepositoryInitOptions::new();
        options.initial_head("main");
        let repo = Repository::init_opts(path, &options).expect("init repository");
        TestRepo { path: path.to_path_buf(), repo }
    }

    /// Writes `files` and commits them; returns the commit id.
    pub fn commit(&self, message: &str, files: &[(&str, &str)]) -> String {
        let mut index = self.repo.index().expect("index");
        for (name, content) in files {
            let file = self.path.join(name);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent).expect("mkdir");
            }
            std::fs::write(&file, content).expect("write file");
            index.add_path(Path::new(name)).expect("add");
        }
        index.write().expect("write index");
        let tree = self.repo.find_tree(index.write_tree().expect("tree")).expect("find tree");
        let signature = Signature::now("Ada Lovelace", "ada@example.org").expect("signature");
        let parent = self.repo.head().ok().and_then(|h| h.peel_to_commit().ok());
        let parents: Vec<&git2::Commit> = parent.iter().collect();
        self.repo.commit(Some("HEAD"), &signature, &signature, message, &tree, &parents).expect("commit").to_string()
    }
}
