//! Which master scales a pool when several share a database: the one holding a PostgreSQL
//! session-level advisory lock named after the pool. The lock lives as long as the holder's
//! connection, so a master that dies (or loses the database) frees it and a standby takes over
//! within one retry interval. With SQLite there is one master, and it always leads.

use std::time::{Duration, Instant};

use sqlx::{Connection, Row};
use tracing::{info, warn};

/// How often a standby tries to take the lock, and a leader checks that it still holds it.
pub const RETRY: Duration = Duration::from_secs(1);

/// One master's claim to lead one pool.
pub struct Leadership {
    /// The PostgreSQL URL; `None` for SQLite, where this master always leads.
    url: Option<String>,
    key: i64,
    pool: String,
    held: Option<sqlx::AnyConnection>,
    checked: Instant,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership").field("pool", &self.pool).field("leading", &self.held.is_some()).finish()
    }
}

/// The advisory lock key of a pool: stable across masters and releases (FNV-1a of the name).
pub fn lock_key(pool: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in "kiln-pool:".bytes().chain(pool.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

impl Leadership {
    pub fn new(database_url: &str, pool: &str) -> Leadership {
        let url = (database_url.starts_with("postgres://") || database_url.starts_with("postgresql://"))
            .then(|| database_url.to_owned());
        Leadership { url, key: lock_key(pool), pool: pool.to_owned(), held: None, checked: Instant::now() }
    }

    /// Whether this master leads the pool now: takes the lock if it is free, and checks (at most
    /// once per [`RETRY`]) that a held lock's connection is still alive.
    pub async fn hold(&mut self) -> bool {
        let Some(url) = &self.url else { return true };
        if let Some(conn) = &mut self.held {
            if self.checked.elapsed() < RETRY {
                return true;
            }
            self.checked = Instant::now();
            match tokio::time::timeout(RETRY * 3, sqlx::query("SELECT 1").execute(&mut *conn)).await {
                Ok(Ok(_)) => return true,
                Ok(Err(error)) => warn!(pool = %self.pool, %error, "lost the database connection; no longer leading"),
                Err(_) => warn!(pool = %self.pool, "the database does not answer; no longer leading"),
            }
            self.held = None;
            crate::telemetry::pool_leader(&self.pool, false);
            return false;
        }
        let attempt = async {
            let mut conn = sqlx::AnyConnection::connect(url).await?;
            let row = sqlx::query("SELECT pg_try_advisory_lock($1) AS ok").bind(self.key).fetch_one(&mut conn).await?;
            let ok: bool = row.try_get("ok")?;
            Ok::<_, sqlx::Error>(ok.then_some(conn))
        };
        match tokio::time::timeout(RETRY * 3, attempt).await {
            Ok(Ok(Some(conn))) => {
                info!(pool = %self.pool, "leading the pool's scaler");
                self.held = Some(conn);
                self.checked = Instant::now();
                crate::telemetry::pool_leader(&self.pool, true);
                true
            }
            Ok(Ok(None)) => false,
            Ok(Err(error)) => {
                warn!(pool = %self.pool, %error, "cannot try the pool's leader lock");
                false
            }
            Err(_) => false,
        }
    }

    /// Gives the lead up (at shutdown), so a standby takes over at once.
    pub async fn release(&mut self) {
        if let Some(conn) = self.held.take() {
            let _ = conn.close().await;
            crate::telemetry::pool_leader(&self.pool, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_get_distinct_stable_keys() {
        assert_eq!(lock_key("linux"), lock_key("linux"));
        assert_ne!(lock_key("linux"), lock_key("arm"));
        assert_eq!(Leadership::new("sqlite://x", "p").url, None);
    }
}
