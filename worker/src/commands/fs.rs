//! File-system commands: `mkdir`, `rmdir`, `stat`, `glob`, `listdir`, `upload_file` and
//! `download_file`. Each reports `rc` 0 on success and a header line with the reason otherwise.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use tokio::sync::mpsc;

use super::{Reporter, StatInfo, Update};

async fn finish(report: &Reporter, outcome: Result<(), String>) {
    match outcome {
        Ok(()) => report.send(Update::Rc(0)).await,
        Err(reason) => {
            report.header(reason).await;
            report.send(Update::Rc(1)).await;
        }
    }
}

pub async fn mkdir(paths: &[std::path::PathBuf], report: &Reporter) {
    let outcome =
        paths.iter().try_for_each(|p| std::fs::create_dir_all(p).map_err(|e| format!("mkdir {}: {e}", p.display())));
    finish(report, outcome).await;
}

pub async fn rmdir(paths: &[std::path::PathBuf], report: &Reporter) {
    let outcome = paths.iter().try_for_each(|p| match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("rmdir {}: {e}", p.display())),
    });
    finish(report, outcome).await;
}

pub async fn stat(path: &Path, report: &Reporter) {
    let info = match std::fs::metadata(path) {
        Ok(m) => {
            StatInfo { exists: true, is_dir: m.is_dir(), size: m.len(), mode: m.permissions().mode(), mtime: m.mtime() }
        }
        Err(_) => StatInfo::default(),
    };
    report.send(Update::Stat(info)).await;
    report.send(Update::Rc(if info.exists { 0 } else { 1 })).await;
}

pub async fn glob(pattern: &Path, report: &Reporter) {
    let pattern = pattern.to_string_lossy().into_owned();
    match glob::glob(&pattern) {
        Ok(paths) => {
            let files: Vec<String> = paths.filter_map(Result::ok).map(|p| p.to_string_lossy().into_owned()).collect();
            report.send(Update::Files(files)).await;
            report.send(Update::Rc(0)).await;
        }
        Err(e) => finish(report, Err(format!("bad glob pattern {pattern:?}: {e}"))).await,
    }
}

pub async fn listdir(path: &Path, report: &Reporter) {
    match std::fs::read_dir(path) {
        Ok(entries) => {
            let mut files: Vec<String> =
                entries.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
            files.sort();
            report.send(Update::Files(files)).await;
            report.send(Update::Rc(0)).await;
        }
        Err(e) => finish(report, Err(format!("listdir {}: {e}", path.display()))).await,
    }
}

/// Sends a file to the master in chunks.
pub async fn upload_file(path: &Path, max_size: u64, report: &Reporter) {
    let outcome = async {
        let mut file = std::fs::File::open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        if max_size > 0 && size > max_size {
            return Err(format!("{} is {size} bytes, more than the limit of {max_size}", path.display()));
        }
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = file.read(&mut buffer).map_err(|e| format!("read {}: {e}", path.display()))?;
            if n == 0 {
                return Ok(());
            }
            report.send(Update::FileData(buffer[..n].to_vec())).await;
        }
    }
    .await;
    finish(report, outcome).await;
}

/// Writes a file the master sends in chunks; the last chunk is marked.
pub async fn download_file(path: &Path, mode: u32, mut chunks: mpsc::Receiver<(Vec<u8>, bool)>, report: &Reporter) {
    let outcome = async {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("mkdir {}: {e}", parent.display()))?;
        }
        let partial = path.with_extension("kiln-partial");
        let mut data = Vec::new();
        loop {
            match chunks.recv().await {
                Some((chunk, last)) => {
                    data.extend_from_slice(&chunk);
                    if last {
                        break;
                    }
                }
                None => return Err("the transfer was cut off".to_owned()),
            }
        }
        std::fs::write(&partial, &data).map_err(|e| format!("write {}: {e}", partial.display()))?;
        if mode != 0 {
            std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("chmod: {e}"))?;
        }
        std::fs::rename(&partial, path).map_err(|e| format!("rename to {}: {e}", path.display()))
    }
    .await;
    finish(report, outcome).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run<F, Fut>(f: F) -> Vec<Update>
    where
        F: FnOnce(Reporter) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let (tx, mut rx) = mpsc::channel(64);
        f(Reporter::new(tx)).await;
        let mut updates = Vec::new();
        while let Ok(u) = rx.try_recv() {
            updates.push(u);
        }
        updates
    }

    #[tokio::test]
    async fn directories_are_made_listed_globbed_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_path_buf();
        let at = |p: &str| base.join(p);
        let nested = at("a/b");
        assert!(run(|r| async move { mkdir(&[nested], &r).await }).await.contains(&Update::Rc(0)));
        std::fs::write(at("a/x.txt"), "x").unwrap();
        std::fs::write(at("a/y.log"), "y").unwrap();
        let a = at("a");
        let listed = run(|r| async move { listdir(&a, &r).await }).await;
        assert_eq!(listed[0], Update::Files(vec!["b".into(), "x.txt".into(), "y.log".into()]));
        let pattern = at("a/*.txt");
        let globbed = run(|r| async move { glob(&pattern, &r).await }).await;
        assert_eq!(globbed[0], Update::Files(vec![at("a/x.txt").display().to_string()]));
        let x = at("a/x.txt");
        let stat_x = run(|r| async move { stat(&x, &r).await }).await;
        assert!(matches!(stat_x[0], Update::Stat(StatInfo { exists: true, is_dir: false, size: 1, .. })));
        let gone = at("a");
        assert!(run(|r| async move { rmdir(&[gone], &r).await }).await.contains(&Update::Rc(0)));
        assert!(!at("a").exists());
        let a = at("a");
        let missing = run(|r| async move { stat(&a, &r).await }).await;
        assert!(missing.contains(&Update::Rc(1)));
    }

    #[tokio::test]
    async fn files_travel_both_ways_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (tx, rx) = mpsc::channel(4);
        let target = dir.path().join("sub/file.bin");
        let sender = {
            let data = data.clone();
            tokio::spawn(async move {
                let mut chunks = data.chunks(65_536).peekable();
                while let Some(chunk) = chunks.next() {
                    tx.send((chunk.to_vec(), chunks.peek().is_none())).await.unwrap();
                }
            })
        };
        let written = run(|r| async move { download_file(&target, 0o640, rx, &r).await }).await;
        sender.await.unwrap();
        assert!(written.contains(&Update::Rc(0)), "{written:?}");
        let target = dir.path().join("sub/file.bin");
        assert_eq!(std::fs::read(&target).unwrap(), data);
        assert_eq!(std::fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o640);
        let uploaded = run(|r| async move { upload_file(&target, 0, &r).await }).await;
        let bytes: Vec<u8> = uploaded
            .iter()
            .filter_map(|u| if let Update::FileData(d) = u { Some(d.clone()) } else { None })
            .flatten()
            .collect();
        assert_eq!(bytes, data);
        let target = dir.path().join("sub/file.bin");
        let refused = run(|r| async move { upload_file(&target, 10, &r).await }).await;
        assert!(refused.contains(&Update::Rc(1)), "files above max_size are refused");
    }
}
