//! Locks that live exactly as long as the process holding them: a PostgreSQL session-level
//! advisory lock on a connection of its own, or an exclusive `flock` on a file beside the SQLite
//! database. The kernel or the database server drops them when the holder dies, so whoever takes
//! one knows that no live process holds it.

use std::fs::{File, TryLockError};
use std::path::PathBuf;

use sqlx::{AnyConnection, Connection, Row};

use super::{Backend, Result, Store};

/// A held lock; dropping it (or the process ending) releases it.
pub struct SessionLock {
    name: String,
    held: Held,
}

enum Held {
    /// The connection whose session holds the advisory lock.
    Postgres(AnyConnection),
    /// The open file carrying the `flock`; closing it releases the lock.
    File(File),
    /// An in-memory SQLite database: no other process can reach it.
    Private,
}

impl std::fmt::Debug for SessionLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionLock").field("name", &self.name).finish()
    }
}

/// The advisory lock key of a name: stable across processes and releases (FNV-1a).
pub fn lock_key(name: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

/// The lock file for `name` beside the SQLite database at `database`.
fn lock_path(database: &std::path::Path, name: &str) -> PathBuf {
    let label: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
    let mut file = database.as_os_str().to_owned();
    file.push(format!(".{label}.lock"));
    PathBuf::from(file)
}

impl Store {
    /// Takes the lock called `name` if no live process holds it; `None` if one does.
    pub async fn try_session_lock(&self, name: &str) -> Result<Option<SessionLock>> {
        let held = match self.backend {
            Backend::Postgres => {
                let mut conn = self.write.acquire().await?.detach();
                let row = sqlx::query("SELECT pg_try_advisory_lock($1) AS ok")
                    .bind(lock_key(name))
                    .fetch_one(&mut conn)
                    .await?;
                if !row.try_get::<bool, _>("ok")? {
                    let _ = conn.close().await;
                    return Ok(None);
                }
                Held::Postgres(conn)
            }
            Backend::Sqlite => match &self.file {
                None => Held::Private,
                Some(database) => {
                    let file = File::options()
                        .create(true)
                        .truncate(false)
                        .write(true)
                        .open(lock_path(database, name))
                        .map_err(sqlx::Error::Io)?;
                    match file.try_lock() {
                        Ok(()) => Held::File(file),
                        Err(TryLockError::WouldBlock) => return Ok(None),
                        Err(TryLockError::Error(error)) => return Err(sqlx::Error::Io(error).into()),
                    }
                }
            },
        };
        Ok(Some(SessionLock { name: name.to_owned(), held }))
    }
}

impl SessionLock {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Checks that the lock is still held: on PostgreSQL, that its connection still answers (a
    /// database restart ends the session and with it the lock).
    pub async fn check(&mut self) -> Result<()> {
        if let Held::Postgres(conn) = &mut self.held {
            sqlx::query("SELECT 1").execute(&mut *conn).await?;
        }
        Ok(())
    }

    /// Gives the lock up now rather than when the process ends. On PostgreSQL the lock is
    /// unlocked before the connection closes: the server ends a closed session (and drops its
    /// locks) in its own time, so a process asking right after closing could still find it held.
    pub async fn release(mut self) {
        if let Held::Postgres(mut conn) = std::mem::replace(&mut self.held, Held::Private) {
            let _ = sqlx::query("SELECT pg_advisory_unlock($1)").bind(lock_key(&self.name)).execute(&mut conn).await;
            let _ = conn.close().await;
        }
    }
}

impl Drop for SessionLock {
    /// Unlocks a lock file explicitly rather than only closing it: a child process being started
    /// at that moment shares the open file until it executes its program, and closing alone would
    /// leave the lock held until then.
    fn drop(&mut self) {
        if let Held::File(file) = &self.held {
            let _ = file.unlock();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_get_distinct_stable_keys_and_safe_files() {
        assert_eq!(lock_key("pool:linux"), lock_key("pool:linux"));
        assert_ne!(lock_key("pool:linux"), lock_key("pool:arm"));
        assert_eq!(
            lock_path(std::path::Path::new("/var/lib/kiln/kiln.sqlite"), "master/3 x"),
            PathBuf::from("/var/lib/kiln/kiln.sqlite.master_3_x.lock")
        );
    }
}
