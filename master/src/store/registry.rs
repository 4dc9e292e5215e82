//! The registry tables: masters, builders, schedulers and workers, with their pause and drain flags;
//! and the keys the masters share.

use std::collections::HashMap;

use sqlx::Row;

use super::{Result, Store, StoreError, get_i64};
use crate::events::{Event, Topic};

impl Store {
    /// The random key named `name` that every master of the database shares (32 bytes), made
    /// now if no master has made it yet.
    pub async fn shared_key(&self, name: &str) -> Result<Vec<u8>> {
        let fresh = hex::encode(rand::random::<[u8; 32]>());
        sqlx::query("INSERT INTO master_keys (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(&fresh)
            .execute(&self.write)
            .await?;
        let row =
            sqlx::query("SELECT value FROM master_keys WHERE name = $1").bind(name).fetch_one(&self.write).await?;
        let value: String = row.try_get(0)?;
        hex::decode(&value).map_err(|_| StoreError::Invalid(format!("master key {name} is not hexadecimal")))
    }

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
        let masterid = get_i64(&row, "id")?;
        self.published(vec![Event::new(Topic::Masters, masterid, "started")]);
        Ok(masterid)
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
        let workers =
            sqlx::query("UPDATE workers SET connected_masterid = NULL WHERE connected_masterid = $1 RETURNING id")
                .bind(masterid)
                .fetch_all(&self.write)
                .await?;
        let mut events = vec![Event::new(Topic::Masters, masterid, "stopped")];
        for worker in &workers {
            events.push(Event::new(Topic::Workers, get_i64(worker, "id")?, "disconnected"));
        }
        self.published(events);
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
        let builderid = get_i64(&row, "id")?;
        self.published(vec![Event::new(Topic::Builders, builderid, "update")]);
        Ok(builderid)
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
        let name = row.map(|r| r.try_get::<String, _>("name")).transpose()?;
        if name.is_some() {
            self.published(vec![Event::new(Topic::Schedulers, schedulerid, "updated")]);
        }
        Ok(name)
    }

    /// Names of disabled schedulers.
    pub async fn disabled_schedulers(&self) -> Result<std::collections::HashSet<String>> {
        let rows = sqlx::query("SELECT name FROM schedulers WHERE enabled = 0").fetch_all(&self.write).await?;
        rows.iter().map(|r| Ok(r.try_get::<String, _>("name")?)).collect()
    }

    /// Records a worker's connection to a master (or its disconnection with `None`), with the
    /// builders it may run there.
    pub async fn worker_connected(
        &self,
        name: &str,
        info: &serde_json::Value,
        masterid: Option<i64>,
        builderids: &[i64],
    ) -> Result<i64> {
        let configured: Vec<serde_json::Value> = masterid
            .map(|m| builderids.iter().map(|b| serde_json::json!({ "builderid": b, "masterid": m })).collect())
            .unwrap_or_default();
        let row = sqlx::query(
            "INSERT INTO workers (name, info, connected_masterid, last_connected_at, configured_on) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (name) DO UPDATE SET info = $2, connected_masterid = $3, last_connected_at = $4, graceful = 0, \
             configured_on = $5 RETURNING id",
        )
        .bind(name)
        .bind(info.to_string())
        .bind(masterid)
        .bind(self.now_ms())
        .bind(serde_json::Value::from(configured).to_string())
        .fetch_one(&self.write)
        .await?;
        let workerid = get_i64(&row, "id")?;
        let name = if masterid.is_some() { "connected" } else { "disconnected" };
        self.published(vec![Event::new(Topic::Workers, workerid, name)]);
        Ok(workerid)
    }

    /// Records that a worker left this master.
    pub async fn worker_disconnected(&self, workerid: i64, masterid: i64) -> Result<()> {
        let done =
            sqlx::query("UPDATE workers SET connected_masterid = NULL WHERE id = $1 AND connected_masterid = $2")
                .bind(workerid)
                .bind(masterid)
                .execute(&self.write)
                .await?;
        if done.rows_affected() > 0 {
            self.published(vec![Event::new(Topic::Workers, workerid, "disconnected")]);
        }
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Changes and buildsets

    /// Pauses or unpauses a worker by name. Returns false for an unknown worker.
    pub async fn set_worker_paused(&self, name: &str, paused: bool, reason: Option<&str>) -> Result<bool> {
        let row = sqlx::query("UPDATE workers SET paused = $1, pause_reason = $2 WHERE name = $3 RETURNING id")
            .bind(i64::from(paused))
            .bind(reason.filter(|_| paused).map(str::to_owned))
            .bind(name)
            .fetch_optional(&self.write)
            .await?;
        self.worker_state_updated(row)
    }

    /// Pauses a worker by name for a scale-down, creating its row when it has never connected
    /// (its pod may connect only after the decision; the pause must hold then too).
    pub async fn pause_for_scale_down(&self, name: &str) -> Result<()> {
        let row = sqlx::query(
            "INSERT INTO workers (name, paused, pause_reason) VALUES ($1, 1, 'scale-down') \
             ON CONFLICT (name) DO UPDATE SET paused = 1, pause_reason = 'scale-down' RETURNING id",
        )
        .bind(name)
        .fetch_optional(&self.write)
        .await?;
        self.worker_state_updated(row)?;
        Ok(())
    }

    /// Marks a worker as stopping gracefully (shown as `graceful` in the API).
    pub async fn set_worker_graceful(&self, name: &str, graceful: bool) -> Result<()> {
        let row = sqlx::query("UPDATE workers SET graceful = $1 WHERE name = $2 RETURNING id")
            .bind(i64::from(graceful))
            .bind(name)
            .fetch_optional(&self.write)
            .await?;
        self.worker_state_updated(row)?;
        Ok(())
    }

    /// Publishes that the worker of a `RETURNING id` row changed state; whether there was one.
    fn worker_state_updated(&self, row: Option<sqlx::any::AnyRow>) -> Result<bool> {
        let Some(row) = row else { return Ok(false) };
        self.published(vec![Event::new(Topic::Workers, get_i64(&row, "id")?, "state_updated")]);
        Ok(true)
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
}
