//! All persistence: the queue, builds, steps, logs, changes and workers in SQLite or PostgreSQL.
//! Every SQL statement of the master lives under this module; callers see domain types only.
//!
//! The same SQL serves both databases: placeholders are `$N` (SQLite accepts them too), booleans
//! are 0/1 integers, times are integer milliseconds, and the only dialect difference — row locks
//! for claiming — is chosen by [`Backend`].

mod data;
mod locks;
mod logs;
mod migrations;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyConnection, AnyPool, AssertSqlSafe, Row};

use crate::clock::Clock;
use crate::collapse::CollapseView;
use crate::domain::{
    BuildOrigin, BuildsetDetails, Change, ClaimedRequest, CompletedBuildset, NewBuildset, NewChange, SourceStamp,
};
use crate::properties::Properties;
use crate::results::Results;

pub use data::{DataError, Filter, ListQuery, Op, Resource};
pub use locks::{SessionLock, lock_key};
pub use logs::{LogChunk, decode_chunk, encode_chunk};

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
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("backend", &self.backend).finish()
    }
}

/// The last lines of a log, written when its step finishes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogTail {
    pub logid: i64,
    pub first_line: i64,
    pub text: String,
}

/// A build row just created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewBuild {
    pub buildid: i64,
    pub number: i64,
}

/// What became of expired claims.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Requests put back in the queue.
    pub requeued: Vec<i64>,
    /// Builds finished as RETRY (or CANCELLED, for a request someone asked to stop).
    pub retried_builds: Vec<i64>,
    /// Requests someone asked to stop, completed as CANCELLED instead of re-queued.
    pub cancelled: Vec<i64>,
}

fn get_i64(row: &AnyRow, column: &str) -> Result<i64> {
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
            let write = pool_options(clock, SQLITE_ACQUIRE)
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
                    .max_connections(4)
                    .after_connect(sqlite_pragmas)
                    .connect(&url)
                    .await
                    .map_err(connect_error)?
            };
            let file = (!in_memory).then(|| Path::new(path).to_path_buf());
            Ok(Store { write, read, backend: Backend::Sqlite, clock, file })
        } else {
            let pool = pool_options(clock, Duration::from_secs(10))
                .max_connections(16)
                .connect(url)
                .await
                .map_err(connect_error)?;
            migrations::run(&pool, Backend::Postgres, clock).await?;
            Ok(Store { write: pool.clone(), read: pool, backend: Backend::Postgres, clock, file: None })
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
    fn skip_locked(&self) -> &'static str {
        match self.backend {
            Backend::Postgres => "FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
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

    /// Registers (or re-activates) a master by name and returns its id.
    pub async fn register_master(&self, name: &str) -> Result<i64> {
        let now = self.now_ms();
        let row = sqlx::query(
            "INSERT INTO masters (name, active, last_active) VALUES ($1, 1, $2) \
             ON CONFLICT (name) DO UPDATE SET active = 1, last_active = $2 RETURNING id",
        )
        .bind(name)
        .bind(now)
        .fetch_one(&self.write)
        .await?;
        get_i64(&row, "id")
    }

    /// Records that a master is alive.
    pub async fn master_heartbeat(&self, masterid: i64) -> Result<()> {
        sqlx::query("UPDATE masters SET active = 1, last_active = $1 WHERE id = $2")
            .bind(self.now_ms())
            .bind(masterid)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    /// Marks a master stopped (on clean shutdown).
    pub async fn master_stopped(&self, masterid: i64) -> Result<()> {
        sqlx::query("UPDATE masters SET active = 0 WHERE id = $1").bind(masterid).execute(&self.write).await?;
        sqlx::query("UPDATE workers SET connected_masterid = NULL WHERE connected_masterid = $1")
            .bind(masterid)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    /// Creates or updates a builder by name and returns its id.
    pub async fn upsert_builder(&self, name: &str, description: Option<&str>, tags: &[String]) -> Result<i64> {
        let tags = serde_json::to_string(tags).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let row = sqlx::query(
            "INSERT INTO builders (name, description, tags) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET description = $2, tags = $3 RETURNING id",
        )
        .bind(name)
        .bind(description.map(str::to_owned))
        .bind(tags)
        .fetch_one(&self.write)
        .await?;
        get_i64(&row, "id")
    }

    /// Registers a scheduler by name (keeping its id and enabled flag) and returns its id.
    pub async fn upsert_scheduler(&self, name: &str) -> Result<i64> {
        let row = sqlx::query(
            "INSERT INTO schedulers (name) VALUES ($1) ON CONFLICT (name) DO UPDATE SET name = $1 RETURNING id",
        )
        .bind(name)
        .fetch_one(&self.write)
        .await?;
        get_i64(&row, "id")
    }

    /// Enables or disables a scheduler by id; returns its name, `None` if unknown.
    pub async fn set_scheduler_enabled(&self, schedulerid: i64, enabled: bool) -> Result<Option<String>> {
        let row = sqlx::query("UPDATE schedulers SET enabled = $1 WHERE id = $2 RETURNING name")
            .bind(i64::from(enabled))
            .bind(schedulerid)
            .fetch_optional(&self.write)
            .await?;
        row.map(|r| Ok(r.try_get::<String, _>("name")?)).transpose()
    }

    /// Names of disabled schedulers.
    pub async fn disabled_schedulers(&self) -> Result<std::collections::HashSet<String>> {
        let rows = sqlx::query("SELECT name FROM schedulers WHERE enabled = 0").fetch_all(&self.write).await?;
        rows.iter().map(|r| Ok(r.try_get::<String, _>("name")?)).collect()
    }

    /// Records a worker's connection to a master (or its disconnection with `None`).
    pub async fn worker_connected(&self, name: &str, info: &serde_json::Value, masterid: Option<i64>) -> Result<i64> {
        let row = sqlx::query(
            "INSERT INTO workers (name, info, connected_masterid, last_connected_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (name) DO UPDATE SET info = $2, connected_masterid = $3, last_connected_at = $4, graceful = 0 \
             RETURNING id",
        )
        .bind(name)
        .bind(info.to_string())
        .bind(masterid)
        .bind(self.now_ms())
        .fetch_one(&self.write)
        .await?;
        get_i64(&row, "id")
    }

    /// Records that a worker left this master.
    pub async fn worker_disconnected(&self, workerid: i64, masterid: i64) -> Result<()> {
        sqlx::query("UPDATE workers SET connected_masterid = NULL WHERE id = $1 AND connected_masterid = $2")
            .bind(workerid)
            .bind(masterid)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Changes and buildsets

    async fn find_or_create_sourcestamp(conn: &mut sqlx::AnyConnection, ss: &SourceStamp, now: i64) -> Result<i64> {
        let hash = sourcestamp_hash(ss);
        sqlx::query(
            "INSERT INTO sourcestamps (ss_hash, branch, revision, repository, project, codebase, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (ss_hash) DO NOTHING",
        )
        .bind(&hash)
        .bind(ss.branch.clone())
        .bind(ss.revision.clone())
        .bind(&ss.repository)
        .bind(&ss.project)
        .bind(&ss.codebase)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        let row =
            sqlx::query("SELECT id FROM sourcestamps WHERE ss_hash = $1").bind(&hash).fetch_one(&mut *conn).await?;
        get_i64(&row, "id")
    }

    /// Stores a change (and its source stamp) durably.
    pub async fn add_change(&self, change: &NewChange) -> Result<Change> {
        Ok(self.add_changes(std::slice::from_ref(change)).await?.remove(0))
    }

    /// Stores several changes in one transaction: all of them or none.
    pub async fn add_changes(&self, changes: &[NewChange]) -> Result<Vec<Change>> {
        let mut tx = self.write.begin().await?;
        let stored = Self::add_changes_in(&mut tx, changes, self.now_ms()).await?;
        tx.commit().await?;
        Ok(stored)
    }

    async fn add_changes_in(tx: &mut AnyConnection, changes: &[NewChange], now: i64) -> Result<Vec<Change>> {
        let mut stored = Vec::with_capacity(changes.len());
        for change in changes {
            let ssid = Self::find_or_create_sourcestamp(tx, &change.sourcestamp(), now).await?;
            let files = serde_json::to_string(&change.files).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let row = sqlx::query(
                "INSERT INTO changes (author, committer, comments, branch, revision, revlink, when_timestamp, \
                 category, repository, codebase, project, files, properties, sourcestampid) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) RETURNING changeid",
            )
            .bind(&change.author)
            .bind(change.committer.clone())
            .bind(&change.comments)
            .bind(change.branch.clone())
            .bind(change.revision.clone())
            .bind(change.revlink.clone())
            .bind(change.when_ms.unwrap_or(now))
            .bind(change.category.clone())
            .bind(&change.repository)
            .bind(&change.codebase)
            .bind(&change.project)
            .bind(files)
            .bind(change.properties.to_json().to_string())
            .bind(ssid)
            .fetch_one(&mut *tx)
            .await?;
            stored.push(Change { changeid: get_i64(&row, "changeid")?, sourcestampid: ssid, change: change.clone() });
        }
        Ok(stored)
    }

    /// Stores a buildset and one build request per builder, atomically, collapsing older
    /// compatible requests of the builders in `collapse_builderids` (they complete as SKIPPED).
    /// Returns the buildset id and `(builderid, brid)` pairs.
    pub async fn add_buildset(&self, buildset: &NewBuildset) -> Result<(i64, Vec<(i64, i64)>)> {
        let mut tx = self.write.begin().await?;
        let mut collapsed = 0;
        let submitted = Self::add_buildset_in(&mut tx, buildset, self.now_ms(), &mut collapsed).await?;
        tx.commit().await?;
        crate::telemetry::requests_collapsed(collapsed);
        Ok(submitted)
    }

    /// [`Store::add_buildset`] inside a transaction; adds the number of requests it collapsed
    /// to `collapsed`, for the caller to count once the transaction commits.
    async fn add_buildset_in(
        tx: &mut AnyConnection,
        buildset: &NewBuildset,
        now: i64,
        collapsed: &mut u64,
    ) -> Result<(i64, Vec<(i64, i64)>)> {
        let row = sqlx::query(
            "INSERT INTO buildsets (external_idstring, reason, submitted_at, properties, rebuilt_buildid, parent_buildid, \
             parent_relationship) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
        )
        .bind(buildset.external_idstring.clone())
        .bind(&buildset.reason)
        .bind(now)
        .bind(buildset.properties.to_json().to_string())
        .bind(buildset.rebuilt_buildid)
        .bind(buildset.parent_buildid)
        .bind(buildset.parent_relationship.clone())
        .fetch_one(&mut *tx)
        .await?;
        let bsid = get_i64(&row, "id")?;
        let collapse_key = crate::collapse::key(&buildset.sourcestamps);
        let mut view = CollapseView { sourcestamps: Vec::new(), properties: buildset.properties.clone() };
        for ss in &buildset.sourcestamps {
            let ssid = Self::find_or_create_sourcestamp(tx, ss, now).await?;
            if !buildset.collapse_builderids.is_empty() {
                let changes = sqlx::query("SELECT 1 AS found FROM changes WHERE sourcestampid = $1 LIMIT 1")
                    .bind(ssid)
                    .fetch_optional(&mut *tx)
                    .await?;
                view.sourcestamps.push((ss.clone(), changes.is_some()));
            }
            sqlx::query(
                "INSERT INTO buildset_sourcestamps (buildsetid, sourcestampid) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(bsid)
            .bind(ssid)
            .execute(&mut *tx)
            .await?;
        }
        let mut brids = Vec::with_capacity(buildset.builderids.len());
        for &builderid in &buildset.builderids {
            let row = sqlx::query(
                "INSERT INTO buildrequests (buildsetid, builderid, priority, submitted_at, collapse_key, waited_for) \
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
            )
            .bind(bsid)
            .bind(builderid)
            .bind(buildset.priority)
            .bind(now)
            .bind(&collapse_key)
            .bind(i64::from(buildset.waited_for))
            .fetch_one(&mut *tx)
            .await?;
            let brid = get_i64(&row, "id")?;
            brids.push((builderid, brid));
            if buildset.collapse_builderids.contains(&builderid) {
                *collapsed += Self::collapse_older(tx, builderid, brid, &collapse_key, &view, now).await?;
            }
        }
        Ok((bsid, brids))
    }

    /// Completes as SKIPPED the unclaimed requests of `builderid` older than `brid` that the new
    /// buildset makes redundant; returns how many.
    async fn collapse_older(
        conn: &mut AnyConnection,
        builderid: i64,
        brid: i64,
        key: &str,
        new: &CollapseView,
        now: i64,
    ) -> Result<u64> {
        let rows = sqlx::query(
            "SELECT r.id, r.buildsetid, b.properties, s.id AS ssid, s.branch, s.revision, s.repository, s.project, s.codebase, \
             CAST(CASE WHEN EXISTS (SELECT 1 FROM changes c WHERE c.sourcestampid = s.id) THEN 1 ELSE 0 END AS BIGINT) AS has_changes \
             FROM buildrequests r JOIN buildsets b ON b.id = r.buildsetid \
             LEFT JOIN buildset_sourcestamps bs ON bs.buildsetid = r.buildsetid \
             LEFT JOIN sourcestamps s ON s.id = bs.sourcestampid \
             WHERE r.builderid = $1 AND r.collapse_key = $3 AND r.complete = 0 AND r.claimed_by_masterid IS NULL \
             AND r.id < $2 ORDER BY r.id",
        )
        .bind(builderid)
        .bind(brid)
        .bind(key)
        .fetch_all(&mut *conn)
        .await?;
        let mut candidates: Vec<(i64, i64, CollapseView)> = Vec::new();
        for row in &rows {
            let id = get_i64(row, "id")?;
            if candidates.last().is_none_or(|(last, _, _)| *last != id) {
                let props: String = row.try_get("properties")?;
                let props = serde_json::from_str(&props).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                let view = CollapseView { sourcestamps: Vec::new(), properties: Properties::from_json(&props) };
                candidates.push((id, get_i64(row, "buildsetid")?, view));
            }
            if row.try_get::<Option<i64>, _>("ssid")?.is_some() {
                let has_changes = get_i64(row, "has_changes")? != 0;
                let ss = SourceStamp {
                    branch: row.try_get("branch")?,
                    revision: row.try_get("revision")?,
                    repository: row.try_get::<Option<String>, _>("repository")?.unwrap_or_default(),
                    project: row.try_get::<Option<String>, _>("project")?.unwrap_or_default(),
                    codebase: row.try_get::<Option<String>, _>("codebase")?.unwrap_or_default(),
                };
                candidates.last_mut().expect("pushed above").2.sourcestamps.push((ss, has_changes));
            }
        }
        let mut count = 0;
        for (old, bsid, view) in candidates {
            if !crate::collapse::can_collapse(new, &view) {
                continue;
            }
            if Self::complete_unclaimed(conn, old, bsid, Results::Skipped, now).await? {
                tracing::info!(collapsed = old, into = brid, "collapsing a build request");
                count += 1;
            }
        }
        Ok(count)
    }

    /// Records a change a timed scheduler accepted, and moves its tree-stable timer to `fire_at`
    /// (`None` leaves the timer as it is: an unimportant change with no timer running).
    pub async fn classify_change(
        &self,
        scheduler: &str,
        timer_key: &str,
        changeid: i64,
        important: bool,
        fire_at: impl FnOnce(Option<i64>) -> Option<i64>,
    ) -> Result<()> {
        let mut tx = self.write.begin().await?;
        let running = sqlx::query("SELECT fire_at FROM scheduler_timers WHERE scheduler = $1 AND timer_key = $2")
            .bind(scheduler)
            .bind(timer_key)
            .fetch_optional(&mut *tx)
            .await?
            .map(|row| get_i64(&row, "fire_at"))
            .transpose()?;
        let Some(fire_at) = fire_at(running) else {
            // An unimportant change with no timer running is not remembered, as in Buildbot.
            return Ok(());
        };
        sqlx::query(
            "INSERT INTO scheduler_changes (scheduler, timer_key, changeid, important) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (scheduler, changeid) DO NOTHING",
        )
        .bind(scheduler)
        .bind(timer_key)
        .bind(changeid)
        .bind(i64::from(important))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO scheduler_timers (scheduler, timer_key, fire_at) VALUES ($1, $2, $3) \
             ON CONFLICT (scheduler, timer_key) DO UPDATE SET fire_at = $3",
        )
        .bind(scheduler)
        .bind(timer_key)
        .bind(fire_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Remembers a change for a scheduler that builds only if something changed (Nightly and
    /// Periodic with `onlyIfChanged`).
    pub async fn remember_change(&self, scheduler: &str, changeid: i64, important: bool) -> Result<()> {
        sqlx::query(
            "INSERT INTO scheduler_changes (scheduler, timer_key, changeid, important) VALUES ($1, '', $2, $3) \
             ON CONFLICT (scheduler, changeid) DO NOTHING",
        )
        .bind(scheduler)
        .bind(changeid)
        .bind(i64::from(important))
        .execute(&self.write)
        .await?;
        Ok(())
    }

    /// When a timed scheduler fires next. `spec` describes its schedule: a scheduler never seen
    /// before fires at `first`; a stored time of another schedule (the configuration changed) is
    /// replaced by `changed`.
    pub async fn scheduler_next_fire(&self, scheduler: &str, spec: &str, first: i64, changed: i64) -> Result<i64> {
        let row = sqlx::query(
            "INSERT INTO scheduler_fires (scheduler, spec, next_fire_at) VALUES ($1, $2, $3) \
             ON CONFLICT (scheduler) DO UPDATE SET spec = $2, next_fire_at = $4 WHERE scheduler_fires.spec <> $2 \
             RETURNING next_fire_at",
        )
        .bind(scheduler)
        .bind(spec)
        .bind(first)
        .bind(changed)
        .fetch_optional(&self.write)
        .await?;
        match row {
            Some(row) => get_i64(&row, "next_fire_at"),
            None => {
                let row = sqlx::query("SELECT next_fire_at FROM scheduler_fires WHERE scheduler = $1")
                    .bind(scheduler)
                    .fetch_one(&self.write)
                    .await?;
                get_i64(&row, "next_fire_at")
            }
        }
    }

    /// Fires a timed scheduler due at `due`: moves its next time to `next` and, in the same
    /// transaction, takes the changes remembered for it and submits what `make` builds from them
    /// (each with whether it was important). Returns `None` when another master fired it first.
    pub async fn fire_scheduled(
        &self,
        scheduler: &str,
        due: i64,
        next: i64,
        make: impl FnOnce(&[(Change, bool)]) -> Option<NewBuildset>,
    ) -> Result<Option<Option<(i64, Vec<(i64, i64)>)>>> {
        let now = self.now_ms();
        let mut tx = self.write.begin().await?;
        let moved =
            sqlx::query("UPDATE scheduler_fires SET next_fire_at = $1 WHERE scheduler = $2 AND next_fire_at = $3")
                .bind(next)
                .bind(scheduler)
                .bind(due)
                .execute(&mut *tx)
                .await?;
        if moved.rows_affected() == 0 {
            return Ok(None);
        }
        let changes = Self::take_scheduler_changes(&mut tx, scheduler, "").await?;
        let mut collapsed = 0;
        let submitted = match make(&changes) {
            Some(buildset) => Some(Self::add_buildset_in(&mut tx, &buildset, now, &mut collapsed).await?),
            None => None,
        };
        tx.commit().await?;
        crate::telemetry::requests_collapsed(collapsed);
        Ok(Some(submitted))
    }

    /// Takes (reads and forgets) the changes classified under one of a scheduler's timers, oldest
    /// first, each with whether it was important.
    async fn take_scheduler_changes(
        conn: &mut AnyConnection,
        scheduler: &str,
        timer_key: &str,
    ) -> Result<Vec<(Change, bool)>> {
        let rows = sqlx::query(
            "SELECT c.changeid, c.author, c.committer, c.comments, c.branch, c.revision, c.revlink, c.when_timestamp, \
             c.category, c.repository, c.codebase, c.project, c.files, c.properties, c.sourcestampid, s.important \
             FROM scheduler_changes s JOIN changes c ON c.changeid = s.changeid \
             WHERE s.scheduler = $1 AND s.timer_key = $2 ORDER BY c.changeid",
        )
        .bind(scheduler)
        .bind(timer_key)
        .fetch_all(&mut *conn)
        .await?;
        let changes = rows
            .iter()
            .map(|row| Ok((change_from_row(row)?, get_i64(row, "important")? != 0)))
            .collect::<Result<Vec<_>>>()?;
        sqlx::query("DELETE FROM scheduler_changes WHERE scheduler = $1 AND timer_key = $2")
            .bind(scheduler)
            .bind(timer_key)
            .execute(&mut *conn)
            .await?;
        Ok(changes)
    }

    /// When the next tree-stable timer fires, if any runs.
    pub async fn next_timer_at(&self) -> Result<Option<i64>> {
        let row = sqlx::query("SELECT MIN(fire_at) AS next FROM scheduler_timers").fetch_one(&self.write).await?;
        Ok(row.try_get::<Option<i64>, _>("next")?)
    }

    /// Fires every timer due at `now`: takes its classified changes and submits the buildset
    /// `make` builds from them (`None` submits nothing), in one transaction per timer, so a timer
    /// fires exactly once even when several masters share the database. Returns the submitted
    /// buildsets.
    pub async fn fire_due_timers(
        &self,
        now: i64,
        make: impl Fn(&str, &[Change]) -> Option<NewBuildset>,
    ) -> Result<Vec<(i64, Vec<(i64, i64)>)>> {
        let lock = self.skip_locked();
        let mut submitted = Vec::new();
        loop {
            let mut tx = self.write.begin().await?;
            let due = sqlx::query(AssertSqlSafe(format!(
                "SELECT scheduler, timer_key FROM scheduler_timers WHERE fire_at <= $1 ORDER BY fire_at LIMIT 1 {lock}"
            )))
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(due) = due else { return Ok(submitted) };
            let scheduler: String = due.try_get("scheduler")?;
            let timer_key: String = due.try_get("timer_key")?;
            let taken = Self::take_scheduler_changes(&mut tx, &scheduler, &timer_key).await?;
            let changes: Vec<Change> = taken.into_iter().map(|(change, _)| change).collect();
            sqlx::query("DELETE FROM scheduler_timers WHERE scheduler = $1 AND timer_key = $2")
                .bind(&scheduler)
                .bind(&timer_key)
                .execute(&mut *tx)
                .await?;
            let mut collapsed = 0;
            if let Some(buildset) = make(&scheduler, &changes) {
                submitted.push(Self::add_buildset_in(&mut tx, &buildset, now, &mut collapsed).await?);
            }
            tx.commit().await?;
            crate::telemetry::requests_collapsed(collapsed);
        }
    }

    /// The branch tips a poller last recorded, and whether it ever recorded any.
    pub async fn poller_tips(&self, poller: &str) -> Result<(bool, BTreeMap<String, String>)> {
        let started = sqlx::query("SELECT 1 AS started FROM poller_started WHERE poller = $1")
            .bind(poller)
            .fetch_optional(&self.write)
            .await?
            .is_some();
        let rows = sqlx::query("SELECT branch, revision FROM poller_tips WHERE poller = $1")
            .bind(poller)
            .fetch_all(&self.write)
            .await?;
        let tips = rows
            .iter()
            .map(|r| Ok((r.try_get::<String, _>("branch")?, r.try_get::<String, _>("revision")?)))
            .collect::<Result<_>>()?;
        Ok((started, tips))
    }

    /// Records a poll: the new tips and the changes found, in one transaction, but only if the
    /// stored tips are still `expected` — otherwise another poll got there first and `None` is
    /// returned with nothing written. So a commit is reported once, however many masters poll.
    pub async fn record_poll(
        &self,
        poller: &str,
        expected: &BTreeMap<String, String>,
        tips: &BTreeMap<String, String>,
        changes: &[NewChange],
    ) -> Result<Option<Vec<Change>>> {
        let mut tx = self.write.begin().await?;
        // Taking the row lock first serialises concurrent polls of one poller on PostgreSQL.
        sqlx::query("INSERT INTO poller_started (poller) VALUES ($1) ON CONFLICT (poller) DO NOTHING")
            .bind(poller)
            .execute(&mut *tx)
            .await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT poller FROM poller_started WHERE poller = $1 FOR UPDATE")
                .bind(poller)
                .execute(&mut *tx)
                .await?;
        }
        let rows = sqlx::query("SELECT branch, revision FROM poller_tips WHERE poller = $1")
            .bind(poller)
            .fetch_all(&mut *tx)
            .await?;
        let current: BTreeMap<String, String> = rows
            .iter()
            .map(|r| Ok((r.try_get::<String, _>("branch")?, r.try_get::<String, _>("revision")?)))
            .collect::<Result<_>>()?;
        if &current != expected {
            return Ok(None);
        }
        sqlx::query("DELETE FROM poller_tips WHERE poller = $1").bind(poller).execute(&mut *tx).await?;
        for (branch, revision) in tips {
            sqlx::query("INSERT INTO poller_tips (poller, branch, revision) VALUES ($1, $2, $3)")
                .bind(poller)
                .bind(branch)
                .bind(revision)
                .execute(&mut *tx)
                .await?;
        }
        let stored = Self::add_changes_in(&mut tx, changes, self.now_ms()).await?;
        tx.commit().await?;
        Ok(Some(stored))
    }

    /// Claims (or keeps) the right to poll `poller` on schedule for `lease_ms`. Returns whether
    /// this master holds it: only one master polls a repository while its lease runs.
    pub async fn claim_poller(&self, poller: &str, masterid: i64, lease_ms: i64) -> Result<bool> {
        let now = self.now_ms();
        let row = sqlx::query(
            "INSERT INTO poller_claims (poller, masterid, lease_expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (poller) DO UPDATE SET masterid = $2, lease_expires_at = $3 \
             WHERE poller_claims.masterid = $2 OR poller_claims.lease_expires_at < $4 \
             RETURNING masterid",
        )
        .bind(poller)
        .bind(masterid)
        .bind(now + lease_ms)
        .bind(now)
        .fetch_optional(&self.write)
        .await?;
        Ok(row.is_some())
    }

    /// Takes up to `limit` completed buildsets from the outbox and, in the same transaction,
    /// submits the buildsets `react` asks for in response (e.g. Dependent schedulers'). Several
    /// masters may call this at once; each completion is taken by one. Returns how many were
    /// taken and the buildsets submitted.
    pub async fn take_completed_buildsets(
        &self,
        limit: i64,
        react: impl Fn(&CompletedBuildset) -> Vec<NewBuildset>,
    ) -> Result<(usize, Vec<(i64, Vec<(i64, i64)>)>)> {
        let lock = self.skip_locked();
        let now = self.now_ms();
        let mut tx = self.write.begin().await?;
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT bsid, results FROM completed_buildsets ORDER BY bsid LIMIT {} {lock}",
            limit.max(1)
        )))
        .fetch_all(&mut *tx)
        .await?;
        let mut submitted = Vec::new();
        let mut collapsed = 0;
        for row in &rows {
            let bsid = get_i64(row, "bsid")?;
            let results = Results::from_code(get_i64(row, "results")?).unwrap_or(Results::Exception);
            let details = Self::buildset_details_in(&mut tx, bsid).await?;
            let completed = CompletedBuildset { bsid, results, details };
            for buildset in react(&completed) {
                submitted.push(Self::add_buildset_in(&mut tx, &buildset, now, &mut collapsed).await?);
            }
            sqlx::query("DELETE FROM completed_buildsets WHERE bsid = $1").bind(bsid).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        crate::telemetry::requests_collapsed(collapsed);
        Ok((rows.len(), submitted))
    }

    /// The results of buildsets, `None` for those not complete yet.
    pub async fn buildset_results(&self, bsids: &[i64]) -> Result<Vec<Option<Results>>> {
        let mut results = Vec::with_capacity(bsids.len());
        for bsid in bsids {
            let row = sqlx::query("SELECT complete, results FROM buildsets WHERE id = $1")
                .bind(bsid)
                .fetch_optional(&self.read)
                .await?
                .ok_or_else(|| StoreError::NotFound(format!("buildset {bsid}")))?;
            let complete = get_i64(&row, "complete")? != 0;
            results.push(
                complete
                    .then(|| Results::from_code(get_i64(&row, "results").unwrap_or(4)).unwrap_or(Results::Exception)),
            );
        }
        Ok(results)
    }

    /// Reason, properties and source stamps of a buildset.
    pub async fn buildset_details(&self, bsid: i64) -> Result<BuildsetDetails> {
        let mut conn = self.read.acquire().await?;
        Self::buildset_details_in(&mut conn, bsid).await
    }

    async fn buildset_details_in(conn: &mut AnyConnection, bsid: i64) -> Result<BuildsetDetails> {
        let rows = sqlx::query(
            "SELECT b.reason, b.properties, s.branch, s.revision, s.repository, s.project, s.codebase \
             FROM buildsets b LEFT JOIN buildset_sourcestamps bs ON bs.buildsetid = b.id \
             LEFT JOIN sourcestamps s ON s.id = bs.sourcestampid WHERE b.id = $1 ORDER BY s.codebase",
        )
        .bind(bsid)
        .fetch_all(&mut *conn)
        .await?;
        let first = rows.first().ok_or_else(|| StoreError::NotFound(format!("buildset {bsid}")))?;
        let reason: String = first.try_get("reason")?;
        let props: String = first.try_get("properties")?;
        let props = serde_json::from_str(&props).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut sourcestamps = Vec::with_capacity(rows.len());
        for row in &rows {
            let Some(repository) = row.try_get::<Option<String>, _>("repository")? else { continue };
            sourcestamps.push(SourceStamp {
                branch: row.try_get("branch")?,
                revision: row.try_get("revision")?,
                repository,
                project: row.try_get::<Option<String>, _>("project")?.unwrap_or_default(),
                codebase: row.try_get::<Option<String>, _>("codebase")?.unwrap_or_default(),
            });
        }
        Ok(BuildsetDetails { reason, properties: Properties::from_json(&props), sourcestamps })
    }

    // ---------------------------------------------------------------------------------------
    // The queue

    /// Claims the next claimable request — highest priority first, then oldest — among
    /// `builderids` (all builders when `None`), under a lease of `lease_ms`. Several masters may
    /// call this at once: on PostgreSQL the row is locked with `FOR UPDATE SKIP LOCKED`, so each
    /// request goes to exactly one of them.
    pub async fn claim_next(
        &self,
        masterid: i64,
        builderids: Option<&[i64]>,
        lease_ms: i64,
    ) -> Result<Option<ClaimedRequest>> {
        if builderids.is_some_and(<[i64]>::is_empty) {
            return Ok(None);
        }
        let now = self.now_ms();
        let token: i64 = rand::random::<i64>() & i64::MAX;
        let builder_filter = builder_filter(builderids);
        let lock = self.skip_locked();
        let sql = format!(
            "UPDATE buildrequests SET claimed_by_masterid = $1, claimed_at = $2, claim_token = $3, lease_expires_at = $4 \
             WHERE id = (SELECT id FROM buildrequests WHERE complete = 0 AND claimed_by_masterid IS NULL {builder_filter} \
                         ORDER BY priority DESC, submitted_at, id LIMIT 1 {lock}) \
             AND complete = 0 AND claimed_by_masterid IS NULL \
             RETURNING id, buildsetid, builderid, priority, submitted_at"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(masterid)
            .bind(now)
            .bind(token)
            .bind(now + lease_ms)
            .fetch_optional(&self.write)
            .await?;
        row.map(|row| {
            Ok(ClaimedRequest {
                brid: get_i64(&row, "id")?,
                buildsetid: get_i64(&row, "buildsetid")?,
                builderid: get_i64(&row, "builderid")?,
                priority: get_i64(&row, "priority")?,
                submitted_at_ms: get_i64(&row, "submitted_at")?,
                claim_token: token,
            })
        })
        .transpose()
    }

    /// Extends the leases of the claims in `held` — the builds this process runs, by request id
    /// and claim token — and the master's heartbeat. Only these: a claim of the same master id
    /// that this process does not run (a predecessor's, after a restart under the same name)
    /// must expire and be taken back. Returns the requests whose claims are still held; a
    /// missing one was taken back.
    pub async fn renew_leases(&self, masterid: i64, held: &[(i64, i64)], lease_ms: i64) -> Result<Vec<i64>> {
        let now = self.now_ms();
        self.master_heartbeat(masterid).await?;
        let mut renewed = Vec::with_capacity(held.len());
        // Ids are integers formatted here, never caller text; a few hundred per statement.
        for batch in held.chunks(500) {
            let ids = batch.iter().map(|(brid, _)| brid.to_string()).collect::<Vec<_>>().join(",");
            let rows = sqlx::query(AssertSqlSafe(format!(
                "UPDATE buildrequests SET lease_expires_at = $1 \
                 WHERE claimed_by_masterid = $2 AND complete = 0 AND id IN ({ids}) RETURNING id, claim_token"
            )))
            .bind(now + lease_ms)
            .bind(masterid)
            .fetch_all(&self.write)
            .await?;
            for row in rows {
                let (brid, token) = (get_i64(&row, "id")?, row.try_get::<Option<i64>, _>("claim_token")?);
                if batch.iter().any(|(b, t)| *b == brid && Some(*t) == token) {
                    renewed.push(brid);
                }
            }
        }
        Ok(renewed)
    }

    /// Brings the leases of `masterid`'s claims forward to `until` (where they run later): done
    /// by a master at start, holding the instance lock of its id, so a predecessor's claims —
    /// no live process runs them — are taken back as soon as its commands are surely dead
    /// instead of a whole lease later. Returns how many claims were shortened.
    pub async fn shorten_claims(&self, masterid: i64, until: i64) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE buildrequests SET lease_expires_at = $1 \
             WHERE claimed_by_masterid = $2 AND complete = 0 AND lease_expires_at > $1",
        )
        .bind(until)
        .bind(masterid)
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected())
    }

    /// Whether a claim is still held with this token.
    pub async fn claim_held(&self, brid: i64, claim_token: i64) -> Result<bool> {
        let row =
            sqlx::query("SELECT 1 AS held FROM buildrequests WHERE id = $1 AND claim_token = $2 AND complete = 0")
                .bind(brid)
                .bind(claim_token)
                .fetch_optional(&self.write)
                .await?;
        Ok(row.is_some())
    }

    /// Completes a claimed request with a final result, then its buildset if all of its requests
    /// are complete. Returns false (and changes nothing) when the claim is no longer held.
    pub async fn complete_request(&self, brid: i64, claim_token: i64, results: Results) -> Result<bool> {
        debug_assert_ne!(results, Results::Retry, "RETRY re-queues; use release_request");
        let now = self.now_ms();
        let mut tx = self.write.begin().await?;
        let done = sqlx::query(
            "UPDATE buildrequests SET complete = 1, complete_at = $1, results = $2, lease_expires_at = NULL \
             WHERE id = $3 AND claim_token = $4 AND complete = 0",
        )
        .bind(now)
        .bind(results.code())
        .bind(brid)
        .bind(claim_token)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        let row =
            sqlx::query("SELECT buildsetid FROM buildrequests WHERE id = $1").bind(brid).fetch_one(&mut *tx).await?;
        Self::maybe_complete_buildset(&mut tx, get_i64(&row, "buildsetid")?, now).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Completes buildset `bsid` with the worst result of its requests once all are complete.
    async fn maybe_complete_buildset(conn: &mut sqlx::AnyConnection, bsid: i64, now: i64) -> Result<()> {
        let rows = sqlx::query("SELECT complete, results FROM buildrequests WHERE buildsetid = $1")
            .bind(bsid)
            .fetch_all(&mut *conn)
            .await?;
        // As in Buildbot, a buildset starts from SUCCESS: one whose requests were all collapsed
        // (SKIPPED) reports SUCCESS.
        let mut results = Results::Success;
        for row in &rows {
            if get_i64(row, "complete")? == 0 {
                return Ok(());
            }
            results = results.worst(Results::from_code(get_i64(row, "results")?).unwrap_or(Results::Exception));
        }
        let done = sqlx::query(
            "UPDATE buildsets SET complete = 1, complete_at = $1, results = $2 WHERE id = $3 AND complete = 0",
        )
        .bind(now)
        .bind(results.code())
        .bind(bsid)
        .execute(&mut *conn)
        .await?;
        if done.rows_affected() > 0 {
            sqlx::query(
                "INSERT INTO completed_buildsets (bsid, results) VALUES ($1, $2) ON CONFLICT (bsid) DO NOTHING",
            )
            .bind(bsid)
            .bind(results.code())
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }

    /// Puts a claimed request back in the queue, finishing any build of it still open as RETRY
    /// (a build cut short by a database failure). Returns false when the claim was no longer held.
    pub async fn release_request(&self, brid: i64, claim_token: i64) -> Result<bool> {
        let now = self.now_ms();
        let mut tx = self.write.begin().await?;
        let done = sqlx::query(
            "UPDATE buildrequests SET claimed_by_masterid = NULL, claimed_at = NULL, claim_token = NULL, \
             lease_expires_at = NULL WHERE id = $1 AND claim_token = $2 AND complete = 0",
        )
        .bind(brid)
        .bind(claim_token)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        let builds = sqlx::query("SELECT id FROM builds WHERE buildrequestid = $1 AND complete_at IS NULL")
            .bind(brid)
            .fetch_all(&mut *tx)
            .await?;
        for build in builds {
            Self::finish_open_build(&mut tx, get_i64(&build, "id")?, Results::Retry, "retry", now).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Cancels a request nobody has claimed yet: it completes as CANCELLED. Returns false when it
    /// is claimed or already complete.
    pub async fn cancel_unclaimed(&self, brid: i64) -> Result<bool> {
        let mut tx = self.write.begin().await?;
        let Some(row) = sqlx::query("SELECT buildsetid FROM buildrequests WHERE id = $1")
            .bind(brid)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(false);
        };
        let bsid = get_i64(&row, "buildsetid")?;
        let done = Self::complete_unclaimed(&mut tx, brid, bsid, Results::Cancelled, self.now_ms()).await?;
        tx.commit().await?;
        Ok(done)
    }

    /// Completes a request no master has claimed with `results` (SKIPPED when collapsed,
    /// CANCELLED when cancelled), then its buildset if that was its last open request. Returns
    /// false, changing nothing, when the request is claimed or complete.
    async fn complete_unclaimed(
        conn: &mut AnyConnection,
        brid: i64,
        bsid: i64,
        results: Results,
        now: i64,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE buildrequests SET complete = 1, complete_at = $1, results = $2 \
             WHERE id = $3 AND complete = 0 AND claimed_by_masterid IS NULL",
        )
        .bind(now)
        .bind(results.code())
        .bind(brid)
        .execute(&mut *conn)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        Self::maybe_complete_buildset(conn, bsid, now).await?;
        Ok(true)
    }

    /// Records that a request's build must stop, for whichever master runs it. Returns false when
    /// the request is already complete.
    pub async fn request_stop(&self, brid: i64) -> Result<bool> {
        let done = sqlx::query("UPDATE buildrequests SET stop_requested = 1 WHERE id = $1 AND complete = 0")
            .bind(brid)
            .execute(&self.write)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Requests this master holds whose builds someone asked to stop.
    pub async fn stops_requested(&self, masterid: i64) -> Result<Vec<i64>> {
        let rows = sqlx::query(
            "SELECT id FROM buildrequests WHERE claimed_by_masterid = $1 AND complete = 0 AND stop_requested = 1",
        )
        .bind(masterid)
        .fetch_all(&self.write)
        .await?;
        rows.iter().map(|r| get_i64(r, "id")).collect()
    }

    /// Changes the priority of a request still in the queue or running. Returns false when it is
    /// complete or unknown.
    pub async fn set_priority(&self, brid: i64, priority: i64) -> Result<bool> {
        let done = sqlx::query("UPDATE buildrequests SET priority = $1 WHERE id = $2 AND complete = 0")
            .bind(priority)
            .bind(brid)
            .execute(&self.write)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// The request, builder and buildset of a build.
    pub async fn build_origin(&self, buildid: i64) -> Result<BuildOrigin> {
        let row = sqlx::query(
            "SELECT b.buildrequestid, b.builderid, r.buildsetid, r.priority, r.complete FROM builds b \
             JOIN buildrequests r ON r.id = b.buildrequestid WHERE b.id = $1",
        )
        .bind(buildid)
        .fetch_optional(&self.read)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("build {buildid}")))?;
        Ok(BuildOrigin {
            brid: get_i64(&row, "buildrequestid")?,
            builderid: get_i64(&row, "builderid")?,
            buildsetid: get_i64(&row, "buildsetid")?,
            priority: get_i64(&row, "priority")?,
            request_complete: get_i64(&row, "complete")? != 0,
        })
    }

    /// Whether a request exists and is complete.
    pub async fn request_complete(&self, brid: i64) -> Result<bool> {
        let row = sqlx::query("SELECT complete FROM buildrequests WHERE id = $1")
            .bind(brid)
            .fetch_optional(&self.read)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("build request {brid}")))?;
        Ok(get_i64(&row, "complete")? != 0)
    }

    /// Pauses or unpauses a worker by name. Returns false for an unknown worker.
    pub async fn set_worker_paused(&self, name: &str, paused: bool, reason: Option<&str>) -> Result<bool> {
        let done = sqlx::query("UPDATE workers SET paused = $1, pause_reason = $2 WHERE name = $3")
            .bind(i64::from(paused))
            .bind(reason.filter(|_| paused).map(str::to_owned))
            .bind(name)
            .execute(&self.write)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Pauses a worker by name for a scale-down, creating its row when it has never connected
    /// (its pod may connect only after the decision; the pause must hold then too).
    pub async fn pause_for_scale_down(&self, name: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO workers (name, paused, pause_reason) VALUES ($1, 1, 'scale-down') \
             ON CONFLICT (name) DO UPDATE SET paused = 1, pause_reason = 'scale-down'",
        )
        .bind(name)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    /// Marks a worker as stopping gracefully (shown as `graceful` in the API).
    pub async fn set_worker_graceful(&self, name: &str, graceful: bool) -> Result<()> {
        sqlx::query("UPDATE workers SET graceful = $1 WHERE name = $2")
            .bind(i64::from(graceful))
            .bind(name)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    /// The name of a worker by id.
    pub async fn worker_name(&self, workerid: i64) -> Result<Option<String>> {
        let row =
            sqlx::query("SELECT name FROM workers WHERE id = $1").bind(workerid).fetch_optional(&self.read).await?;
        row.map(|r| Ok(r.try_get::<String, _>("name")?)).transpose()
    }

    /// Whether a worker of that name has ever connected.
    pub async fn worker_exists(&self, name: &str) -> Result<bool> {
        let row =
            sqlx::query("SELECT 1 AS known FROM workers WHERE name = $1").bind(name).fetch_optional(&self.read).await?;
        Ok(row.is_some())
    }

    /// Names of paused workers.
    pub async fn paused_workers(&self) -> Result<std::collections::HashSet<String>> {
        let rows = sqlx::query("SELECT name FROM workers WHERE paused = 1").fetch_all(&self.write).await?;
        rows.iter().map(|r| Ok(r.try_get::<String, _>("name")?)).collect()
    }

    /// Takes back every claim whose lease has expired (its master vanished or stalled): the
    /// builds running under it finish as RETRY and the requests return to the queue.
    pub async fn reap_expired_claims(&self) -> Result<Reaped> {
        let now = self.now_ms();
        let mut tx = self.write.begin().await?;
        let lock = self.skip_locked();
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT id, buildsetid, stop_requested FROM buildrequests WHERE complete = 0 \
             AND claimed_by_masterid IS NOT NULL AND lease_expires_at < $1 ORDER BY id {lock}"
        )))
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let mut reaped = Reaped::default();
        for row in rows {
            let brid = get_i64(&row, "id")?;
            // A stop asked of a build whose master is gone takes effect here: the request ends
            // CANCELLED instead of returning to the queue.
            let stopped = get_i64(&row, "stop_requested")? != 0;
            let (results, state) =
                if stopped { (Results::Cancelled, "cancelled") } else { (Results::Retry, "retry: lease expired") };
            let builds = sqlx::query("SELECT id FROM builds WHERE buildrequestid = $1 AND complete_at IS NULL")
                .bind(brid)
                .fetch_all(&mut *tx)
                .await?;
            for build in builds {
                let buildid = get_i64(&build, "id")?;
                Self::finish_open_build(&mut tx, buildid, results, state, now).await?;
                reaped.retried_builds.push(buildid);
            }
            if stopped {
                sqlx::query(
                    "UPDATE buildrequests SET complete = 1, complete_at = $1, results = $2, lease_expires_at = NULL \
                     WHERE id = $3",
                )
                .bind(now)
                .bind(Results::Cancelled.code())
                .bind(brid)
                .execute(&mut *tx)
                .await?;
                Self::maybe_complete_buildset(&mut tx, get_i64(&row, "buildsetid")?, now).await?;
                reaped.cancelled.push(brid);
                continue;
            }
            sqlx::query(
                "UPDATE buildrequests SET claimed_by_masterid = NULL, claimed_at = NULL, claim_token = NULL, \
                 lease_expires_at = NULL WHERE id = $1",
            )
            .bind(brid)
            .execute(&mut *tx)
            .await?;
            reaped.requeued.push(brid);
        }
        tx.commit().await?;
        Ok(reaped)
    }

    async fn finish_open_build(
        conn: &mut sqlx::AnyConnection,
        buildid: i64,
        results: Results,
        state: &str,
        now: i64,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE steps SET complete_at = $1, results = $2, state_string = state_string || ' (interrupted)' \
             WHERE buildid = $3 AND complete_at IS NULL AND started_at IS NOT NULL",
        )
        .bind(now)
        .bind(results.code())
        .bind(buildid)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "UPDATE logs SET complete = 1 WHERE complete = 0 AND stepid IN (SELECT id FROM steps WHERE buildid = $1)",
        )
        .bind(buildid)
        .execute(&mut *conn)
        .await?;
        sqlx::query(
            "UPDATE builds SET complete_at = $1, results = $2, state_string = $3 WHERE id = $4 AND complete_at IS NULL",
        )
        .bind(now)
        .bind(results.code())
        .bind(state)
        .bind(buildid)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Claimable requests per builder, and the submission time of the oldest one.
    pub async fn pending_by_builder(&self) -> Result<(Vec<(String, i64)>, Option<i64>)> {
        let rows = sqlx::query(
            "SELECT b.name, COUNT(r.id) AS n, MIN(r.submitted_at) AS oldest FROM builders b \
             LEFT JOIN buildrequests r ON r.builderid = b.id AND r.complete = 0 AND r.claimed_by_masterid IS NULL \
             GROUP BY b.name ORDER BY b.name",
        )
        .fetch_all(&self.read)
        .await?;
        let mut oldest: Option<i64> = None;
        let mut counts = Vec::with_capacity(rows.len());
        for row in &rows {
            counts.push((row.try_get::<String, _>("name")?, get_i64(row, "n")?));
            if let Some(at) = row.try_get::<Option<i64>, _>("oldest")? {
                oldest = Some(oldest.map_or(at, |o: i64| o.min(at)));
            }
        }
        Ok((counts, oldest))
    }

    /// Counts requests waiting to be claimed.
    pub async fn pending_count(&self) -> Result<i64> {
        Ok(self.queue_counts(None).await?.0)
    }

    /// Requests of some builders (`None`: all) waiting to be claimed, and claimed (being built).
    pub async fn queue_counts(&self, builderids: Option<&[i64]>) -> Result<(i64, i64)> {
        if builderids.is_some_and(<[i64]>::is_empty) {
            return Ok((0, 0));
        }
        let sql = format!(
            "SELECT COALESCE(SUM(CASE WHEN claimed_by_masterid IS NULL THEN 1 ELSE 0 END), 0) AS pending, \
                    COALESCE(SUM(CASE WHEN claimed_by_masterid IS NULL THEN 0 ELSE 1 END), 0) AS claimed \
             FROM buildrequests WHERE complete = 0 {}",
            builder_filter(builderids)
        );
        let row = sqlx::query(AssertSqlSafe(sql)).fetch_one(&self.read).await?;
        Ok((get_i64(&row, "pending")?, get_i64(&row, "claimed")?))
    }

    /// Builds running now, per worker name: how many, and since when the oldest has run (ms).
    /// Counts builds of every master, so a pool's scaler sees workers connected elsewhere.
    pub async fn running_by_worker(&self) -> Result<HashMap<String, (u32, i64)>> {
        let rows = sqlx::query(
            "SELECT w.name AS name, COUNT(*) AS n, MIN(b.started_at) AS since FROM builds b \
             JOIN workers w ON w.id = b.workerid WHERE b.complete_at IS NULL GROUP BY w.name",
        )
        .fetch_all(&self.read)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get::<String, _>("name")?, (get_i64(r, "n")? as u32, get_i64(r, "since")?))))
            .collect()
    }

    // ---------------------------------------------------------------------------------------
    // Builds and steps

    /// Creates the next numbered build of a builder for a claimed request, recording its number
    /// as the `buildnumber` property too.
    pub async fn new_build(
        &self,
        builderid: i64,
        brid: i64,
        workerid: i64,
        masterid: i64,
        properties: &Properties,
    ) -> Result<NewBuild> {
        let now = self.now_ms();
        // Two masters may race for the same number; the unique (builderid, number) index decides
        // and the loser takes the next one.
        for _ in 0..20 {
            let row = sqlx::query("SELECT COALESCE(MAX(number), 0) + 1 AS next FROM builds WHERE builderid = $1")
                .bind(builderid)
                .fetch_one(&self.write)
                .await?;
            let number = get_i64(&row, "next")?;
            let mut properties = properties.clone();
            properties.set("buildnumber", serde_json::Value::from(number), "Build");
            let row = sqlx::query(
                "INSERT INTO builds (number, builderid, buildrequestid, workerid, masterid, started_at, state_string, properties) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'building', $7) ON CONFLICT (builderid, number) DO NOTHING RETURNING id",
            )
            .bind(number)
            .bind(builderid)
            .bind(brid)
            .bind(workerid)
            .bind(masterid)
            .bind(now)
            .bind(properties.to_json().to_string())
            .fetch_optional(&self.write)
            .await?;
            if let Some(row) = row {
                return Ok(NewBuild { buildid: get_i64(&row, "id")?, number });
            }
        }
        Err(StoreError::Corrupt(format!("could not number a build of builder {builderid}")))
    }

    pub async fn set_build_state(&self, buildid: i64, state: &str) -> Result<()> {
        sqlx::query("UPDATE builds SET state_string = $1 WHERE id = $2")
            .bind(state)
            .bind(buildid)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    /// Finishes a build with its final properties and, in the same transaction, completes its
    /// request with the build's result — or, for RETRY, puts the request back in the queue.
    /// Returns false and changes nothing when the claim is no longer held: whoever took it back
    /// has already finished the build.
    pub async fn finish_build(
        &self,
        buildid: i64,
        results: Results,
        state: &str,
        properties: &Properties,
        claim: &ClaimedRequest,
    ) -> Result<bool> {
        let now = self.now_ms();
        let mut tx = self.write.begin().await?;
        let mut results = results;
        let mut settled = false;
        if results == Results::Retry {
            // A retry never undoes a stop: a request someone asked to stop ends CANCELLED.
            let requeued = sqlx::query(
                "UPDATE buildrequests SET claimed_by_masterid = NULL, claimed_at = NULL, claim_token = NULL, \
                 lease_expires_at = NULL WHERE id = $1 AND claim_token = $2 AND complete = 0 AND stop_requested = 0",
            )
            .bind(claim.brid)
            .bind(claim.claim_token)
            .execute(&mut *tx)
            .await?;
            settled = requeued.rows_affected() > 0;
            if !settled {
                results = Results::Cancelled;
            }
        }
        let state = if results == Results::Cancelled { "cancelled" } else { state };
        if !settled {
            let completed = sqlx::query(
                "UPDATE buildrequests SET complete = 1, complete_at = $1, results = $2, lease_expires_at = NULL \
                 WHERE id = $3 AND claim_token = $4 AND complete = 0",
            )
            .bind(now)
            .bind(results.code())
            .bind(claim.brid)
            .bind(claim.claim_token)
            .execute(&mut *tx)
            .await?;
            settled = completed.rows_affected() > 0;
        }
        if !settled {
            return Ok(false);
        }
        if results != Results::Retry {
            Self::maybe_complete_buildset(&mut tx, claim.buildsetid, now).await?;
        }
        // The engine has finished every step it started, so only the build row changes here.
        sqlx::query(
            "UPDATE builds SET properties = $1, complete_at = $2, results = $3, state_string = $4 \
             WHERE id = $5 AND complete_at IS NULL",
        )
        .bind(properties.to_json().to_string())
        .bind(now)
        .bind(results.code())
        .bind(state)
        .bind(buildid)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Records a step that did not run.
    pub async fn skip_step(&self, buildid: i64, number: i64, name: &str) -> Result<i64> {
        let row = sqlx::query(
            "INSERT INTO steps (number, name, buildid, complete_at, results, state_string) VALUES ($1, $2, $3, $4, $5, 'skipped') \
             RETURNING id",
        )
        .bind(number)
        .bind(name)
        .bind(buildid)
        .bind(self.now_ms())
        .bind(Results::Skipped.code())
        .fetch_one(&self.write)
        .await?;
        get_i64(&row, "id")
    }

    /// Starts a step together with its `stdio` log; returns the step and log ids.
    pub async fn begin_step(&self, buildid: i64, number: i64, name: &str, state: &str) -> Result<(i64, i64)> {
        let mut tx = self.write.begin().await?;
        let row = sqlx::query(
            "INSERT INTO steps (number, name, buildid, started_at, state_string) VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(number)
        .bind(name)
        .bind(buildid)
        .bind(self.now_ms())
        .bind(state)
        .fetch_one(&mut *tx)
        .await?;
        let stepid = get_i64(&row, "id")?;
        let row =
            sqlx::query("INSERT INTO logs (name, slug, stepid, type) VALUES ('stdio', 'stdio', $1, 's') RETURNING id")
                .bind(stepid)
                .fetch_one(&mut *tx)
                .await?;
        let logid = get_i64(&row, "id")?;
        tx.commit().await?;
        Ok((stepid, logid))
    }

    pub async fn set_step_state(&self, stepid: i64, state: &str) -> Result<()> {
        sqlx::query("UPDATE steps SET state_string = $1 WHERE id = $2")
            .bind(state)
            .bind(stepid)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    /// Finishes a step: writes the last lines of its log, closes the log and records the result,
    /// in one transaction.
    pub async fn finish_step(&self, stepid: i64, results: Results, state: &str, log: &LogTail) -> Result<()> {
        let mut tx = self.write.begin().await?;
        let lines = Self::insert_chunk(&mut tx, log.logid, log.first_line, &log.text).await?;
        sqlx::query("UPDATE logs SET num_lines = $1, complete = 1 WHERE id = $2")
            .bind(log.first_line + lines)
            .bind(log.logid)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE steps SET complete_at = $1, results = $2, state_string = $3 WHERE id = $4")
            .bind(self.now_ms())
            .bind(results.code())
            .bind(state)
            .bind(stepid)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Logs

    /// Appends whole lines (each ending in `\n`) to a log as one compressed chunk; returns the
    /// number of the next line.
    pub async fn append_log(&self, logid: i64, first_line: i64, text: &str) -> Result<i64> {
        let mut tx = self.write.begin().await?;
        let next = Self::append_log_in(&mut tx, logid, first_line, text).await?;
        tx.commit().await?;
        Ok(next)
    }

    async fn append_log_in(conn: &mut AnyConnection, logid: i64, first_line: i64, text: &str) -> Result<i64> {
        let lines = Self::insert_chunk(conn, logid, first_line, text).await?;
        if lines > 0 {
            sqlx::query("UPDATE logs SET num_lines = $1 WHERE id = $2")
                .bind(first_line + lines)
                .bind(logid)
                .execute(&mut *conn)
                .await?;
        }
        Ok(first_line + lines)
    }

    /// Stores whole lines as one chunk; returns how many lines it held.
    async fn insert_chunk(conn: &mut AnyConnection, logid: i64, first_line: i64, text: &str) -> Result<i64> {
        let lines = text.matches('\n').count() as i64;
        if lines == 0 {
            return Ok(0);
        }
        let (content, compressed) = encode_chunk(text.as_bytes());
        sqlx::query(
            "INSERT INTO logchunks (logid, first_line, last_line, content, compressed) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(logid)
        .bind(first_line)
        .bind(first_line + lines - 1)
        .bind(content)
        .bind(compressed)
        .execute(&mut *conn)
        .await?;
        Ok(lines)
    }

    /// Deletes the text of up to `limit` logs of builds that finished before `before` (in
    /// milliseconds), in one short transaction, and marks them deleted (type `d`, as Buildbot
    /// does); the logs' rows, steps and builds stay. Returns how many logs it deleted: fewer than
    /// `limit` means none is left.
    pub async fn delete_old_logs(&self, before: i64, limit: i64) -> Result<u64> {
        // The same batch twice in one transaction: its chunks go first, then the logs are marked.
        const BATCH: &str = "SELECT l.id FROM logs l JOIN steps s ON s.id = l.stepid JOIN builds b ON b.id = s.buildid \
             WHERE l.type <> 'd' AND b.complete_at IS NOT NULL AND b.complete_at < $1 ORDER BY l.id LIMIT $2";
        let mut tx = self.write.begin().await?;
        sqlx::query(AssertSqlSafe(format!("DELETE FROM logchunks WHERE logid IN ({BATCH})")))
            .bind(before)
            .bind(limit)
            .execute(&mut *tx)
            .await?;
        let marked = sqlx::query(AssertSqlSafe(format!("UPDATE logs SET type = 'd' WHERE id IN ({BATCH})")))
            .bind(before)
            .bind(limit)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(marked.rows_affected())
    }

    /// Lines `offset..offset+limit` of a log (all from `offset` when `limit` is `None`), as stored
    /// (stdio lines keep their one-letter channel prefix).
    pub async fn log_lines(&self, logid: i64, offset: i64, limit: Option<i64>) -> Result<String> {
        let last = limit.map(|l| offset + l - 1).unwrap_or(i64::MAX);
        let rows = sqlx::query(
            "SELECT first_line, content, compressed FROM logchunks WHERE logid = $1 AND last_line >= $2 AND first_line <= $3 \
             ORDER BY first_line",
        )
        .bind(logid)
        .bind(offset)
        .bind(last)
        .fetch_all(&self.read)
        .await?;
        let mut out = String::new();
        for row in rows {
            let first: i64 = row.try_get("first_line")?;
            let content: Vec<u8> = row.try_get("content")?;
            let compressed: i64 = row.try_get("compressed")?;
            let text = decode_chunk(&content, compressed)?;
            for (i, line) in text.split_inclusive('\n').enumerate() {
                let n = first + i as i64;
                if n >= offset && n <= last {
                    out.push_str(line);
                }
            }
        }
        Ok(out)
    }

    /// Tells other masters sharing the database that the queue changed (PostgreSQL only; a
    /// SQLite database has one master).
    pub async fn notify_queue(&self) {
        if self.backend == Backend::Postgres
            && let Err(error) = sqlx::query("SELECT pg_notify('kiln_queue', '')").execute(&self.write).await
        {
            tracing::warn!(%error, "could not notify other masters");
        }
    }

    /// Sends a control message (a stop, a worker action) to every master sharing the database
    /// (PostgreSQL only).
    pub async fn notify_control(&self, payload: &str) {
        if self.backend == Backend::Postgres
            && let Err(error) =
                sqlx::query("SELECT pg_notify('kiln_control', $1)").bind(payload).execute(&self.write).await
        {
            tracing::warn!(%error, "could not notify other masters");
        }
    }

    /// Subscribes to queue changes and control messages of other masters; `None` on SQLite.
    pub async fn listen_queue(&self, url: &str) -> Result<Option<QueueListener>> {
        if self.backend != Backend::Postgres {
            return Ok(None);
        }
        let mut listener = sqlx::postgres::PgListener::connect(url).await?;
        listener.listen_all(["kiln_queue", "kiln_control"]).await?;
        Ok(Some(QueueListener(listener)))
    }

    /// Reads one resource collection of the data API; see [`data`].
    pub async fn list(
        &self,
        resource: Resource,
        query: &ListQuery,
    ) -> Result<(Vec<serde_json::Value>, i64), DataError> {
        data::list(&self.read, resource, query).await
    }
}

/// A subscription to the queue notifications of other masters.
pub struct QueueListener(sqlx::postgres::PgListener);

/// What another master said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// The queue changed.
    Queue,
    /// A control message, as sent with [`Store::notify_control`].
    Control(String),
}

impl QueueListener {
    /// Waits for the next notification.
    pub async fn recv(&mut self) -> Result<Notification> {
        let notification = self.0.recv().await?;
        Ok(match notification.channel() {
            "kiln_control" => Notification::Control(notification.payload().to_owned()),
            _ => Notification::Queue,
        })
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

/// A stored change from a row of `changes`.
fn change_from_row(row: &AnyRow) -> Result<Change> {
    let files: String = row.try_get("files")?;
    let properties: String = row.try_get("properties")?;
    let properties: serde_json::Value =
        serde_json::from_str(&properties).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(Change {
        changeid: get_i64(row, "changeid")?,
        sourcestampid: get_i64(row, "sourcestampid")?,
        change: NewChange {
            author: row.try_get("author")?,
            committer: row.try_get("committer")?,
            comments: row.try_get("comments")?,
            branch: row.try_get("branch")?,
            revision: row.try_get("revision")?,
            revlink: row.try_get("revlink")?,
            when_ms: Some(get_i64(row, "when_timestamp")?),
            category: row.try_get("category")?,
            repository: row.try_get("repository")?,
            codebase: row.try_get("codebase")?,
            project: row.try_get("project")?,
            files: serde_json::from_str(&files).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            properties: Properties::from_json(&properties),
        },
    })
}

/// A stable key for de-duplicating source stamps.
fn sourcestamp_hash(ss: &SourceStamp) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for part in
        [ss.branch.as_deref(), ss.revision.as_deref(), Some(&ss.repository), Some(&ss.project), Some(&ss.codebase)]
    {
        match part {
            Some(p) => {
                hasher.update(b"s");
                hasher.update(p.as_bytes());
            }
            None => hasher.update(b"n"),
        }
        hasher.update([0u8]);
    }
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
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

/// `AND builderid IN (…)` for a set of builders (`None`: no condition). Ids are integers.
fn builder_filter(builderids: Option<&[i64]>) -> String {
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

    #[test]
    fn sourcestamp_hashes_tell_none_from_empty() {
        let a = SourceStamp { branch: None, ..Default::default() };
        let b = SourceStamp { branch: Some(String::new()), ..Default::default() };
        assert_ne!(sourcestamp_hash(&a), sourcestamp_hash(&b));
    }
}
