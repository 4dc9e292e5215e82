//! Numbered schema migrations per backend, embedded in the binary and applied at start-up. On
//! PostgreSQL an advisory lock keeps two masters starting together from migrating twice.

use sqlx::{AnyPool, Row};

use super::{Backend, Result, StoreError};
use crate::clock::Clock;

struct Migration {
    version: i64,
    description: &'static str,
    sqlite: &'static str,
    postgres: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "initial schema",
        sqlite: include_str!("../../migrations/sqlite/0001_init.sql"),
        postgres: include_str!("../../migrations/postgres/0001_init.sql"),
    },
    Migration {
        version: 2,
        description: "stop requests",
        sqlite: include_str!("../../migrations/sqlite/0002_control.sql"),
        postgres: include_str!("../../migrations/postgres/0002_control.sql"),
    },
    Migration {
        version: 3,
        description: "scheduler timers",
        sqlite: include_str!("../../migrations/sqlite/0003_scheduler_state.sql"),
        postgres: include_str!("../../migrations/postgres/0003_scheduler_state.sql"),
    },
    Migration {
        version: 4,
        description: "collapse keys",
        sqlite: include_str!("../../migrations/sqlite/0004_collapse_key.sql"),
        postgres: include_str!("../../migrations/postgres/0004_collapse_key.sql"),
    },
    Migration {
        version: 5,
        description: "git pollers",
        sqlite: include_str!("../../migrations/sqlite/0005_pollers.sql"),
        postgres: include_str!("../../migrations/postgres/0005_pollers.sql"),
    },
    Migration {
        version: 6,
        description: "timed schedulers",
        sqlite: include_str!("../../migrations/sqlite/0006_scheduler_fires.sql"),
        postgres: include_str!("../../migrations/postgres/0006_scheduler_fires.sql"),
    },
    Migration {
        version: 7,
        description: "completed buildsets outbox",
        sqlite: include_str!("../../migrations/sqlite/0007_completed_buildsets.sql"),
        postgres: include_str!("../../migrations/postgres/0007_completed_buildsets.sql"),
    },
    Migration {
        version: 8,
        description: "schedulers",
        sqlite: include_str!("../../migrations/sqlite/0008_schedulers.sql"),
        postgres: include_str!("../../migrations/postgres/0008_schedulers.sql"),
    },
    Migration {
        version: 9,
        description: "log horizon",
        sqlite: include_str!("../../migrations/sqlite/0009_log_horizon.sql"),
        postgres: include_str!("../../migrations/postgres/0009_log_horizon.sql"),
    },
    Migration {
        version: 10,
        description: "webhook deliveries",
        sqlite: include_str!("../../migrations/sqlite/0010_hook_deliveries.sql"),
        postgres: include_str!("../../migrations/postgres/0010_hook_deliveries.sql"),
    },
    Migration {
        version: 11,
        description: "workers' configured builders",
        sqlite: include_str!("../../migrations/sqlite/0011_configured_on.sql"),
        postgres: include_str!("../../migrations/postgres/0011_configured_on.sql"),
    },
    Migration {
        version: 12,
        description: "keys shared by the masters",
        sqlite: include_str!("../../migrations/sqlite/0012_master_keys.sql"),
        postgres: include_str!("../../migrations/postgres/0012_master_keys.sql"),
    },
    Migration {
        version: 13,
        description: "the reporters' outbox",
        sqlite: include_str!("../../migrations/sqlite/0013_reports.sql"),
        postgres: include_str!("../../migrations/postgres/0013_reports.sql"),
    },
    Migration {
        version: 14,
        description: "indexes of the open requests",
        sqlite: include_str!("../../migrations/sqlite/0014_open_requests.sql"),
        postgres: include_str!("../../migrations/postgres/0014_open_requests.sql"),
    },
    Migration {
        version: 15,
        description: "changes scheduled exactly once, even across a master's death",
        sqlite: include_str!("../../migrations/sqlite/0015_change_scheduling.sql"),
        postgres: include_str!("../../migrations/postgres/0015_change_scheduling.sql"),
    },
    Migration {
        version: 16,
        description: "the outbox's indexes of the reports each statement reads",
        sqlite: include_str!("../../migrations/sqlite/0016_report_indexes.sql"),
        postgres: include_str!("../../migrations/postgres/0016_report_indexes.sql"),
    },
    Migration {
        version: 17,
        description: "each builder's claimable requests in claim order",
        sqlite: include_str!("../../migrations/sqlite/0017_claimable_by_builder.sql"),
        postgres: include_str!("../../migrations/postgres/0017_claimable_by_builder.sql"),
    },
    Migration {
        version: 18,
        description: "settled reports found by when they were settled",
        sqlite: include_str!("../../migrations/sqlite/0018_settled_reports.sql"),
        postgres: include_str!("../../migrations/postgres/0018_settled_reports.sql"),
    },
];

/// An arbitrary constant naming Kiln's migration lock.
const ADVISORY_LOCK: i64 = 0x006b_696c_6e6d_6967;

/// The newest schema version this binary knows.
pub fn latest_version() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

pub async fn run(pool: &AnyPool, backend: Backend, clock: Clock) -> Result<()> {
    let mut conn = pool.acquire().await?;
    if backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_lock($1)").bind(ADVISORY_LOCK).execute(&mut *conn).await?;
    }
    let outcome = apply(&mut conn, backend, clock).await;
    if backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_unlock($1)").bind(ADVISORY_LOCK).execute(&mut *conn).await?;
    }
    outcome
}

async fn apply(conn: &mut sqlx::AnyConnection, backend: Backend, clock: Clock) -> Result<()> {
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS kiln_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL, applied_at BIGINT NOT NULL)",
    )
    .execute(&mut *conn)
    .await?;
    let rows = sqlx::query("SELECT version FROM kiln_migrations").fetch_all(&mut *conn).await?;
    let applied: Vec<i64> = rows.iter().map(|r| r.try_get::<i64, _>("version")).collect::<Result<_, _>>()?;
    if let Some(newest) = applied.iter().max()
        && *newest > latest_version()
    {
        return Err(StoreError::Corrupt(format!(
            "the database has schema version {newest}, newer than this binary's {}; upgrade Kiln",
            latest_version()
        )));
    }
    for migration in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        let sql = match backend {
            Backend::Sqlite => migration.sqlite,
            Backend::Postgres => migration.postgres,
        };
        let wrap = |source| StoreError::Migration { version: migration.version, source };
        let mut tx = sqlx::Connection::begin(&mut *conn).await.map_err(wrap)?;
        sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(wrap)?;
        sqlx::query("INSERT INTO kiln_migrations (version, description, applied_at) VALUES ($1, $2, $3)")
            .bind(migration.version)
            .bind(migration.description)
            .bind(clock.now_ms())
            .execute(&mut *tx)
            .await
            .map_err(wrap)?;
        tx.commit().await.map_err(wrap)?;
        tracing::info!(version = migration.version, description = migration.description, "applied migration");
    }
    Ok(())
}

/// The schema version a database is at.
pub async fn current_version(pool: &AnyPool) -> Result<i64> {
    let row = sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM kiln_migrations").fetch_one(pool).await?;
    Ok(row.try_get::<i64, _>("v")?)
}
