//! Which master scales a pool when several share a database: the one holding a PostgreSQL
//! session-level advisory lock named after the pool. The lock lives as long as the holder's
//! connection, so a master that dies (or loses the database) frees it and a standby takes over
//! within one retry interval. With SQLite there is one master, and it always leads.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::store::{Backend, SessionLock, Store};

/// How often a standby tries to take the lock, and a leader checks that it still holds it.
pub const RETRY: Duration = Duration::from_secs(1);

/// One master's claim to lead one pool.
pub struct Leadership {
    /// The database; `None` for SQLite, where this master always leads.
    store: Option<Store>,
    pool: String,
    held: Option<SessionLock>,
    checked: Instant,
}

impl std::fmt::Debug for Leadership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leadership").field("pool", &self.pool).field("leading", &self.held.is_some()).finish()
    }
}

/// The name of a pool's lock: stable across masters and releases.
fn lock_name(pool: &str) -> String {
    format!("kiln-pool:{pool}")
}

impl Leadership {
    pub fn new(store: &Store, pool: &str) -> Leadership {
        let store = (store.backend() == Backend::Postgres).then(|| store.clone());
        Leadership { store, pool: pool.to_owned(), held: None, checked: Instant::now() }
    }

    /// Whether this master leads the pool now: takes the lock if it is free, and checks (at most
    /// once per [`RETRY`]) that a held lock's connection is still alive.
    pub async fn hold(&mut self) -> bool {
        let Some(store) = &self.store else { return true };
        if let Some(lock) = &mut self.held {
            if self.checked.elapsed() < RETRY {
                return true;
            }
            self.checked = Instant::now();
            match tokio::time::timeout(RETRY * 3, lock.check()).await {
                Ok(Ok(())) => return true,
                Ok(Err(error)) => warn!(pool = %self.pool, %error, "lost the database connection; no longer leading"),
                Err(_) => warn!(pool = %self.pool, "the database does not answer; no longer leading"),
            }
            self.held = None;
            crate::telemetry::pool_leader(&self.pool, false);
            return false;
        }
        match tokio::time::timeout(RETRY * 3, store.try_session_lock(&lock_name(&self.pool))).await {
            Ok(Ok(Some(lock))) => {
                info!(pool = %self.pool, "leading the pool's scaler");
                self.held = Some(lock);
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
        if let Some(lock) = self.held.take() {
            lock.release().await;
            crate::telemetry::pool_leader(&self.pool, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_get_distinct_stable_lock_names() {
        assert_eq!(lock_name("linux"), "kiln-pool:linux");
        assert_ne!(crate::store::lock_key(&lock_name("linux")), crate::store::lock_key(&lock_name("arm")));
    }
}
