//! The remote commands a worker runs, independent of the transport: each takes its arguments and
//! reports [`Update`]s into a bounded channel, then ends with `Ok(())` or the reason it could not
//! run.

mod fs;
mod shell;
pub mod supervise;

use std::path::{Component, Path, PathBuf};

use tokio::sync::{mpsc, watch};

pub use fs::{download_file, glob, listdir, mkdir, rmdir, stat, upload_file};
pub use shell::{ShellArgs, Supervision, run_shell};

/// Which output a chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
    Header,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatInfo {
    pub exists: bool,
    pub is_dir: bool,
    pub size: u64,
    pub mode: u32,
    pub mtime: i64,
}

/// Progress of a command, in the order it happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    Output(Stream, Vec<u8>),
    Rc(i32),
    Elapsed(f64),
    Files(Vec<String>),
    Stat(StatInfo),
    Property(String, serde_json::Value),
    FileData(Vec<u8>),
    FailureReason(String),
}

/// Where a command reports; sending waits when the transport is behind, which bounds memory.
#[derive(Debug, Clone)]
pub struct Reporter {
    tx: mpsc::Sender<Update>,
}

impl Reporter {
    pub fn new(tx: mpsc::Sender<Update>) -> Self {
        Self { tx }
    }

    pub async fn send(&self, update: Update) {
        // A closed channel means the session is gone; the command is being interrupted anyway.
        let _ = self.tx.send(update).await;
    }

    pub async fn header(&self, text: impl Into<String>) {
        let mut text = text.into();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        self.send(Update::Output(Stream::Header, text.into_bytes())).await;
    }
}

/// A request to stop a command early; `true` once it has been asked.
pub type Interrupt = watch::Receiver<bool>;

/// Resolves a command path against the base directory. Relative paths may not climb out of it.
pub fn resolve(basedir: &Path, path: &str) -> Result<PathBuf, String> {
    let candidate = Path::new(path);
    if candidate.is_absolute() {
        return Ok(candidate.to_path_buf());
    }
    if candidate.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("path {path:?} leaves the base directory"));
    }
    Ok(basedir.join(candidate))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_stay_under_the_base_directory() {
        let base = Path::new("/w");
        assert_eq!(resolve(base, "b/build").unwrap(), PathBuf::from("/w/b/build"));
        assert_eq!(resolve(base, "/abs").unwrap(), PathBuf::from("/abs"));
        assert!(resolve(base, "../etc").is_err());
    }
}
