//! The worker's own directories — build directories and the shared cache — and whether this
//! process can write them. A shared volume whose storage driver ignores `fsGroup` is often
//! root-owned under a non-root worker; that is found at start, not as a failed build later.

use std::path::Path;

/// Creates `dir` if needed and proves it writable by writing and removing a file in it. The
/// error names the path, this process's uid and gid, the cause and the usual fixes.
pub fn check_writable(dir: &Path) -> Result<(), String> {
    let probe = dir.join(format!(".kiln-write-check-{}", std::process::id()));
    let result = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&probe, b""))
        .and_then(|()| std::fs::remove_file(&probe));
    result.map_err(|error| {
        // SAFETY: getuid(2) and getgid(2) cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        format!(
            "{} is not writable by this worker (uid {uid}, gid {gid}): {error}. Give it to this user \
             (chown {uid}:{gid} on it, or the chart's sharedVolume.fixOwnership), or let fsGroup apply: \
             many ReadWriteMany drivers need fsGroupPolicy: File in their CSIDriver",
            dir.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_that_cannot_be_made_is_named_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_writable(&dir.path().join("cache")).is_ok());
        std::fs::write(dir.path().join("file"), b"").unwrap();
        let error = check_writable(&dir.path().join("file/cache")).unwrap_err();
        assert!(error.contains("file/cache is not writable by this worker (uid "), "{error}");
        assert!(error.contains("fsGroupPolicy: File"), "{error}");
    }
}
