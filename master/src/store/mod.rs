//! All persistence: the queue, builds, steps, logs, changes and workers in SQLite or PostgreSQL.
//! Every SQL statement of the master lives under this module; callers see domain types only.
//!
//! The same SQL serves both databases: placeholders are `$N` (SQLite accepts them too), booleans
//! are 0/1 integers, times are integer milliseconds, and the only dialect difference — row locks
//! for claiming — is chosen by [`Backend`].

mod builds;
mod buildsets;
mod changes;
mod data;
mod locks;
mod logs;
mod migrations;
mod notify;
mod queue;
mod registry;
mod reports;
mod scheduler_state;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyConnection, AnyPool, Row};

use crate::clock::Clock;
use crate::events::{Event, Events};

pub use builds::NewBuild;
pub use data::{DataError, Filter, ListQuery, Op, Related, Resource, Select};
pub use locks::{SessionLock, lock_key};
pub use logs::{LogChunk, LogTail, decode_chunk, encode_chunk};
pub use notify::{Notification, QueueListener};
pub use queue::Reaped;
pub use reports::{ClaimedReport, NewReport, ReportEvent, ReportedBuild, Settled};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("migration {version} failed: {source}")]
    Migration { version: i64, source: sqlx::Error },
    #[error("database error: {0}")]
    Database(sqlx::Error),
    #[error("corrupt data: {0}")]
    Corrupt(String),
    #[error("not found: {0}")]
    NotFound(String),
    /// The database refused a value the caller gave (for example a NUL byte in text, which
    /// PostgreSQL cannot store): the caller's mistake, not an outage.
    #[error("invalid input: {0}")]
    Invalid(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        // SQLSTATE class 22 is "data exception": the value, not the database, is at fault.
        // 22021 is a byte sequence invalid in the encoding (a NUL byte), 22P05 an untranslatable
        // character, 22003 a number out of range.
        let code = error.as_database_error().and_then(|e| e.code()).map(|c| c.into_owned());
        match code.as_deref() {
            Some("22021") | Some("22P05") => StoreError::Invalid("text must not contain NUL bytes".into()),
            Some("22003") => StoreError::Invalid("a number is out of range".into()),
            _ => StoreError::Database(error),
        }
    }
}

impl StoreError {
    /// Whether the failure is the database's (unreachable, failing): callers answer 503 and retry.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Database(_) | StoreError::Connect { .. })
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Which database is behind the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The handle to the database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    /// Writes go through here. On SQLite it holds one connection, so writers never contend.
    write: AnyPool,
    /// Reads go through here; on PostgreSQL it is the same pool as `write`.
    read: AnyPool,
    backend: Backend,
    clock: Clock,
    /// The SQLite database file (`None` in memory and on PostgreSQL); locks live beside it.
    file: Option<std::path::PathBuf>,
    /// What changed, for the data API's event stream: every write publishes here once it has
    /// committed.
    events: Arc<Events>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("backend", &self.backend).finish()
    }
}

pub(super) fn get_i64(row: &AnyRow, column: &str) -> Result<i64> {
    Ok(row.try_get::<i64, _>(column)?)
}

impl Store {
    /// Opens the database at `url`, creating a SQLite file if needed, and applies migrations.
    pub async fn connect(url: &str) -> Result<Store> {
        Self::connect_with_clock(url, Clock::system()).await
    }

    /// [`Store::connect`] with the clock that stamps rows and decides leases.
    pub async fn connect_with_clock(url: &str, clock: Clock) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let connect_error = |source| StoreError::Connect { url: redact(url), source };
        if let Some(rest) = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")) {
            let path = rest.split('?').next().unwrap_or(rest);
            let in_memory = path.is_empty() || path == ":memory:";
            if !in_memory
                && let Some(parent) = Path::new(path).parent()
                && !parent.as_os_str().is_empty()
            {
                std::fs::create_dir_all(parent).map_err(|e| connect_error(sqlx::Error::Io(e)))?;
            }
            let url = if rest.contains("mode=") || in_memory {
                url.to_owned()
            } else if url.contains('?') {
                format!("{url}&mode=rwc")
            } else {
                format!("{url}?mode=rwc")
            };
            // An embedded database's connection cannot be lost the way a server's can: sqlx's
            // ping before every acquire (a round trip to the connection's thread) buys nothing.
            let write = pool_options(clock, SQLITE_ACQUIRE)
                .test_before_acquire(false)
                .max_connections(1)
                .after_connect(sqlite_pragmas)
                .connect(&url)
                .await
                .map_err(connect_error)?;
            migrations::run(&write, Backend::Sqlite, clock).await?;
            let read = if in_memory {
                write.clone()
            } else {
                pool_options(clock, SQLITE_ACQUIRE)
                    .test_before_acquire(false)
                    .max_connections(4)
                    .after_connect(sqlite_pragmas)
                    .connect(&url)
                    .await
                    .map_err(connect_error)?
            };
            let file = (!in_memory).then(|| Path::new(path).to_path_buf());
            Ok(Store { write, read, backend: Backend::Sqlite, clock, file, events: Arc::default() })
        } else {
            let pool = pool_options(clock, Duration::from_secs(10))
                .max_connections(16)
                .connect(url)
                .await
                .map_err(connect_error)?;
            migrations::run(&pool, Backend::Postgres, clock).await?;
            Ok(Store {
                write: pool.clone(),
                read: pool,
                backend: Backend::Postgres,
                clock,
                file: None,
                events: Arc::default(),
            })
        }
    }

    /// The events of this store's writes (and of other masters', once received).
    pub fn events(&self) -> &Arc<Events> {
        &self.events
    }

    /// Publishes the events of a write that has committed.
    pub(super) fn published(&self, events: Vec<Event>) {
        if !events.is_empty() {
            self.events.publish(events);
        }
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Now, in milliseconds since the Unix epoch, by the master's clock.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// The clause that lets concurrent masters take different rows: `FOR UPDATE SKIP LOCKED` on
    /// PostgreSQL; nothing on SQLite, whose single writer connection serialises them anyway.
    pub(super) fn skip_locked(&self) -> &'static str {
        match self.backend {
            Backend::Postgres => "FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        }
    }

    /// `IN (…)` of the ids bound as the JSON array `$param` (see [`id_array`]): one statement
    /// text for any number of ids, prepared once, instead of a new text per list.
    pub(super) fn in_ids(&self, param: usize) -> String {
        match self.backend {
            Backend::Postgres => format!("IN (SELECT value::bigint FROM json_array_elements_text(${param}::json))"),
            Backend::Sqlite => format!("IN (SELECT value FROM json_each(${param}))"),
        }
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.read).await?;
        Ok(())
    }

    /// Whether the database answers and its schema is the one this binary expects.
    pub async fn schema_is_current(&self) -> Result<bool> {
        Ok(migrations::current_version(&self.read).await? == migrations::latest_version())
    }

    pub async fn close(&self) {
        self.write.close().await;
        self.read.close().await;
    }

    // ---------------------------------------------------------------------------------------
    // Masters, builders, workers

    /// Reads one resource collection of the data API; see [`data`].
    pub async fn list(
        &self,
        resource: Resource,
        query: &ListQuery,
    ) -> Result<(Vec<serde_json::Value>, i64), DataError> {
        data::list(&self.read, resource, query).await
    }

    /// The ids of objects related to `id`; see [`Related`].
    pub async fn related(&self, relation: Related, id: i64) -> Result<Vec<i64>, DataError> {
        data::related(&self.read, relation, id).await
    }

    /// A buildset's properties as the data API shows them; `None` when it does not exist.
    pub async fn buildset_properties(&self, bsid: i64) -> Result<Option<serde_json::Value>, DataError> {
        data::buildset_properties(&self.read, bsid).await
    }
}

/// Pool settings: waiting for a connection gives up after `limit` — unless the clock follows
/// tokio's: a test moves that clock in jumps, and a jump past the limit would fail whatever
/// waits at that moment for no reason.
/// SQLite's writers queue for its one connection; under a burst they may wait a while.
const SQLITE_ACQUIRE: Duration = Duration::from_secs(30);

fn pool_options(clock: Clock, limit: Duration) -> AnyPoolOptions {
    let limit = if clock.follows_tokio() { Duration::from_secs(100 * 365 * 86_400) } else { limit };
    AnyPoolOptions::new().acquire_timeout(limit)
}

/// Settings of every SQLite connection: WAL so readers never block the writer, and a busy timeout
/// so a checkpoint does not fail a write.
fn sqlite_pragmas(
    conn: &mut AnyConnection,
    _: sqlx::pool::PoolConnectionMetadata,
) -> BoxFuture<'_, Result<(), sqlx::Error>> {
    Box::pin(async move {
        sqlx::raw_sql(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;",
        )
        .execute(conn)
        .await
        .map(|_| ())
    })
}

/// Hides the password of a database URL for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Ids as the JSON array that [`Store::in_ids`] reads.
pub(super) fn id_array(ids: &[i64]) -> String {
    let list: Vec<String> = ids.iter().map(i64::to_string).collect();
    format!("[{}]", list.join(","))
}

/// `AND builderid IN (…)` for a set of builders (`None`: no condition). Ids are integers.
pub(super) fn builder_filter(builderids: Option<&[i64]>) -> String {
    match builderids {
        None => String::new(),
        Some(ids) => {
            let list: Vec<String> = ids.iter().map(i64::to_string).collect();
            format!("AND builderid IN ({})", list.join(","))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden_in_urls() {
        assert_eq!(redact("postgres://kiln:secret@db:5432/kiln"), "postgres://kiln:***@db:5432/kiln");
        assert_eq!(redact("sqlite://kiln.sqlite"), "sqlite://kiln.sqlite");
    }
}
